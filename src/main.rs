//! The `mcp-worker` binary: parse the command line, load config, start logging, run.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use clap::{Parser, Subcommand};
use mcp_worker::app::{self, App, Roles};
use mcp_worker::config::Settings;
use mcp_worker::crypto::TokenCipher;
use mcp_worker::messages::ConnectionStatus;
use mcp_worker::oauth::TokenRules;
use mcp_worker::oauth::accept::{MIN_LIFETIME, check_tokens};
use mcp_worker::provider::Provider;
use mcp_worker::queue::Broker;
use mcp_worker::secret::Secret;
use mcp_worker::store::{NewTokens, Store};
use tokio_util::sync::CancellationToken;

/// Runs MCP tool calls from RabbitMQ jobs, with each user's OAuth token from MongoDB.
///
/// Configuration: embedded defaults, then config/$MCP_WORKER_ENV.toml, then MCP_WORKER_* variables
/// (see config/default.toml for every key).
#[derive(Parser)]
#[command(name = "mcp-worker", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run until SIGTERM or Ctrl-C: the job worker, the token refresher and the HTTP API. Every
    /// process, whatever its roles, serves /healthz, /readyz and /metrics on http.listen.
    Run {
        /// Which parts to run, comma-separated, so they can scale apart.
        #[arg(long, value_delimiter = ',', default_value = "worker,refresher,api")]
        roles: Vec<Role>,
    },
    /// Apply the database migrations (indexes); safe to repeat.
    Migrate {
        /// Apply nothing: list each migration as applied or pending, and exit 1 if any is
        /// pending (e.g. before rolling out a version that needs them).
        #[arg(long)]
        check: bool,
    },
    /// Publish one tool-call job, wait for its reply and print it. Exit code: 0 for an ok reply,
    /// 3 for an error reply, 1 when no reply came.
    Call {
        /// The user whose token the call uses.
        #[arg(long)]
        user: String,
        /// The tool to call, e.g. qlik_list_apps.
        #[arg(long)]
        tool: String,
        /// The tool's arguments, a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Publish one `tools/list` job, wait for its reply and print it: the tools the user may call,
    /// and the servers that could not be listed for them. Exit codes as for `call`.
    Tools {
        /// The user whose catalog to list.
        #[arg(long)]
        user: String,
        /// Seconds to wait for the reply.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Manage stored tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Manage the RabbitMQ queues.
    #[command(subcommand)]
    Queues(QueuesCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the effective configuration (all layers) and print it, secrets redacted. An
    /// invalid configuration exits 2 with the offending key named.
    Check,
}

#[derive(Subcommand)]
enum QueuesCommand {
    /// Move a broker over from an earlier version's classic delay, retry, dead-letter and
    /// refresh queues: each becomes a quorum queue of the same name, its messages kept. Stop the
    /// earlier version's processes first; safe to repeat, and to run again after an interruption.
    Migrate,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// Consume tool-call jobs.
    Worker,
    /// Renew tokens before they expire.
    Refresher,
    /// Serve the connect flow, disconnect and status endpoints.
    Api,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Print a user's connection as JSON (connected, status, expires_at, updated_at; never a
    /// token). Exit code: 0 when jobs can use the token, 3 when the user is not connected or
    /// must reconnect (reauth_required).
    Status {
        #[arg(long)]
        user: String,
    },
    /// Re-encrypt every stored token under encryption.active_key (after adding a new key). Safe
    /// to run while workers run; values already under the active key are left alone.
    Reencrypt,
    /// Store a user's tokens obtained elsewhere (a demo, or a move from another token store).
    /// Reads {"access_token": "...", "refresh_token": "..."} from stdin, so tokens stay out of the
    /// process list and shell history.
    Import {
        #[arg(long)]
        user: String,
        /// Seconds until the access token expires (Qlik's tokens live 21600).
        #[arg(long, default_value_t = 21_600)]
        expires_in: i64,
    },
}

#[derive(serde::Deserialize)]
struct ImportedTokens {
    access_token: Secret<String>,
    refresh_token: Secret<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = std::env::var("MCP_WORKER_ENV").ok();
    let settings = match Settings::load(env.as_deref(), Path::new("config")).and_then(|s| app::check(&s).map(|()| s)) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("mcp-worker: {e}");
            return ExitCode::from(2);
        }
    };
    mcp_worker::telemetry::init(&settings.telemetry);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match runtime.block_on(execute(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mcp-worker: {e:#}");
            // Bad input exits 2, like an invalid configuration: running it again will not help.
            if e.is::<Refused>() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// Input the command refuses (exit 2), with the problem in words; never a token's value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

async fn execute(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { roles } => {
            let roles = Roles {
                worker: roles.contains(&Role::Worker),
                refresher: roles.contains(&Role::Refresher),
                api: roles.contains(&Role::Api),
            };
            let app = App::build(&settings, roles).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            app.run(shutdown).await?;
        }
        Command::Migrate { check: false } => {
            for (id, status) in app::migrate(&settings).await? {
                println!("{id}: {status:?}");
            }
        }
        Command::Migrate { check: true } => {
            let report = app::check_migrations(&settings).await?;
            for (id, status) in &report {
                println!("{id}: {status:?}");
            }
            if report.iter().any(|(_, status)| *status == mcp_worker::store::MigrationStatus::Pending) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Queues(QueuesCommand::Migrate) => {
            for (queue, outcome) in app::migrate_queues(&settings).await? {
                println!("{queue}: {outcome}");
            }
        }
        Command::Call { user, tool, args, wait } => return call(&settings, user, tool, &args, wait).await,
        Command::Tools { user, wait } => {
            let job_id = uuid::Uuid::new_v4().to_string();
            let job = serde_json::json!({ "job_id": job_id, "user_id": user, "method": "tools/list" });
            return request(&settings, &job_id, &job, wait).await;
        }
        Command::Config(ConfigCommand::Check) => {
            // `Secret` values print as [redacted] in Debug output, and the userinfo of every URL
            // is redacted, so this is safe to share.
            println!("{}", mcp_worker::redact::credentials(&format!("{settings:#?}")));
            println!("configuration is valid");
        }
        Command::Tokens(TokensCommand::Status { user }) => {
            let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
            let store = Store::connect(&settings.mongodb).await?;
            let status = ConnectionStatus::of(store.tokens(Provider::Qlik, &cipher).get(&user).await)?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            if !status.usable() {
                return Ok(ExitCode::from(3));
            }
        }
        Command::Tokens(TokensCommand::Reencrypt) => {
            let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
            let store = Store::connect(&settings.mongodb).await?;
            let rewritten = store.tokens(Provider::Qlik, &cipher).reencrypt().await?;
            eprintln!("re-encrypted {rewritten} token document(s) under the active key");
        }
        Command::Tokens(TokensCommand::Import { user, expires_in }) => {
            if !mcp_worker::job::usable_id(&user) {
                bail!(Refused(format!("--user must be 1 to {} bytes and not blank", mcp_worker::job::MAX_ID_LEN)));
            }
            let provider = settings.providers.get(Provider::Qlik).unwrap_or(&settings.providers.qlik);
            let rules = TokenRules::from_settings(provider, &settings.tokens);
            let lifetime = u64::try_from(expires_in)
                .ok()
                .map(Duration::from_secs)
                .filter(|l| (MIN_LIFETIME..=rules.max_lifetime).contains(l))
                .ok_or_else(|| {
                    Refused(format!(
                        "--expires-in must be between {} and {} seconds (providers.qlik.max_token_lifetime_secs)",
                        MIN_LIFETIME.as_secs(),
                        rules.max_lifetime.as_secs()
                    ))
                })?;
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let imported: ImportedTokens = serde_json::from_str(&input)
                .context("stdin must hold {\"access_token\": \"...\", \"refresh_token\": \"...\"}")?;
            check_tokens(imported.access_token.expose(), imported.refresh_token.expose(), &rules)
                .map_err(|problem| Refused(format!("{problem} (tokens.max_token_bytes, visible ASCII only)")))?;
            let now = Utc::now();
            let tokens = NewTokens {
                access_token: imported.access_token,
                refresh_token: imported.refresh_token,
                expires_at: mcp_worker::dates::after(now, lifetime),
            };
            let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
            let store = Store::connect(&settings.mongodb).await?;
            store.tokens(Provider::Qlik, &cipher).save(&user, &tokens, now).await?;
            eprintln!("stored tokens for user {user}, expiring at {}", tokens.expires_at.to_rfc3339());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn call(settings: &Settings, user: String, tool: String, args: &str, wait: u64) -> anyhow::Result<ExitCode> {
    let arguments: serde_json::Value = serde_json::from_str(args).context("--args must be a JSON object")?;
    if !arguments.is_object() {
        bail!("--args must be a JSON object");
    }
    let job_id = uuid::Uuid::new_v4().to_string();
    let job = serde_json::json!({ "job_id": job_id, "user_id": user, "tool": tool, "arguments": arguments });
    request(settings, &job_id, &job, wait).await
}

/// Publishes `job`, waits up to `wait` seconds for its reply, and prints it.
async fn request(settings: &Settings, job_id: &str, job: &serde_json::Value, wait: u64) -> anyhow::Result<ExitCode> {
    let broker = Broker::connect(&settings.amqp, "mcp-worker call", None).await?;
    let reply =
        broker.request(&settings.amqp.jobs_queue, job_id, &serde_json::to_vec(job)?, Duration::from_secs(wait)).await?;
    broker.close().await;
    let Some(reply) = reply else { bail!("no reply within {wait} s; is a worker running?") };
    let reply: serde_json::Value = serde_json::from_slice(&reply).context("the reply is not JSON")?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(if reply["status"] == "ok" { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// Fires `shutdown` on SIGTERM (how container runtimes stop a process) or Ctrl-C.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutdown requested; finishing jobs in flight");
    shutdown.cancel();
}
