//! The refresher benchmark: `--tokens` tokens all due, refreshed against the in-repo OAuth
//! server (strict, with rotation) under a provider rate cap; then the cost of one scan when 1 %
//! of the tokens are due. Runs the real refresher in this process, on the services
//! `MCP_WORKER_…` points at. Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use figment::providers::Serialized;
use mcp_worker::app::{App, Roles};
use mcp_worker::config::Settings;
use mcp_worker::crypto::TokenCipher;
use mcp_worker::provider::Provider;
use mcp_worker::secret::Secret;
use mcp_worker::store::{NewTokens, Store};
use oauth_test_server::{Config, OAuthServer};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    tokens: usize,
    /// The provider's cap, token requests per minute.
    #[arg(long, default_value_t = 6000)]
    rate_per_minute: u32,
}

fn settings(database: &str, overrides: serde_json::Value) -> anyhow::Result<Settings> {
    let figment = Settings::figment(std::env::var("MCP_WORKER_ENV").ok().as_deref(), std::path::Path::new("config"))?
        .merge(Serialized::defaults(json!({ "mongodb": { "database": database } })))
        .merge(Serialized::defaults(overrides));
    Ok(Settings::from_figment(figment)?)
}

async fn seed(settings: &Settings, users: impl Iterator<Item = (String, NewTokens)>) -> anyhow::Result<()> {
    mcp_worker::app::migrate(settings).await?;
    let store = Store::connect(&settings.mongodb).await?;
    let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
    let tokens = store.tokens(Provider::Qlik, &cipher);
    let now = chrono::Utc::now();
    // Many writes in flight: the database's commit latency, not its CPU, limits one at a time.
    let saves = futures::stream::iter(users.map(|(user, new)| {
        let tokens = &tokens;
        async move { tokens.save(&user, &new, now).await }
    }));
    let results: Vec<_> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(saves, 64)).await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let config = Config {
        client_id: "bench".into(),
        client_secret: "bench-secret".into(),
        redirect_uris: vec!["http://127.0.0.1:9/callback".into()],
        access_token_ttl: Duration::from_secs(300),
        ..Config::default()
    };
    let (oauth, url) = OAuthServer::spawn(config).await;
    let provider = json!({
        "providers": { "qlik": {
            "client_id": "bench", "client_secret": "bench-secret",
            "authorize_url": format!("{url}/authorize"), "token_url": format!("{url}/token"),
            "revoke_url": format!("{url}/revoke"), "redirect_uri": "http://127.0.0.1:9/callback",
            "rate_limit_per_minute": args.rate_per_minute,
        }},
        "refresher": { "interval_secs": 1, "lead_secs": 600, "batch": 500, "concurrency": 8 },
        "amqp": { "jobs_queue": format!("bench.{run}.jobs"), "dead_letter_queue": format!("bench.{run}.dead"),
                  "refresh_queue": format!("bench.{run}.refresh"), "events_exchange": format!("bench.{run}.events") },
    });

    // Every token due: each expires in 5 minutes, inside the 10-minute lead.
    let all_due = settings(&format!("bench_refresh_{}", &run[..12]), provider.clone())?;
    let grants: Vec<_> = (0..args.tokens)
        .map(|i| {
            let user = format!("user-{i}");
            let issued = oauth.issue_grant(&user, "user_default offline_access", Duration::from_secs(300));
            let tokens = NewTokens {
                access_token: Secret::new(issued.access_token),
                refresh_token: Secret::new(issued.refresh_token),
                expires_at: chrono::Utc::now() + chrono::Duration::seconds(300),
            };
            (user, tokens)
        })
        .collect();
    seed(&all_due, grants.into_iter()).await?;
    let app = App::build(&all_due, Roles { worker: false, refresher: true, api: false }).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(app.run(shutdown.clone()));
    while oauth.stats().refresh_successes < args.tokens as u64 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(3600), "refreshing took over an hour");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    running.await??;
    mcp_worker_bench::delete_topology(&all_due, &[]).await?;
    let stats = oauth.stats();
    let times = &stats.refresh_request_times_ms;
    // The most token requests in any one second, and in any one minute.
    let most_within = |window_ms: u64| {
        let mut most = 0;
        let mut start = 0;
        for end in 0..times.len() {
            while times[end] - times[start] >= window_ms {
                start += 1;
            }
            most = most.max(end - start + 1);
        }
        most
    };

    // One scan's cost with 1 % due: the due query the refresher's scan runs.
    let one_percent = settings(&format!("bench_scan_{}", &run[..12]), provider)?;
    let due_count = args.tokens / 100;
    seed(
        &one_percent,
        (0..args.tokens).map(|i| {
            let expires = if i < due_count { chrono::Duration::seconds(300) } else { chrono::Duration::hours(6) };
            let tokens = NewTokens {
                access_token: Secret::new(format!("a{i}")),
                refresh_token: Secret::new(format!("r{i}")),
                expires_at: chrono::Utc::now() + expires,
            };
            (format!("user-{i}"), tokens)
        }),
    )
    .await?;
    let store = Store::connect(&one_percent.mongodb).await?;
    let tokens = store.tokens(Provider::Qlik, &Arc::new(TokenCipher::from_settings(&one_percent.encryption)?));
    let mut scans = Vec::new();
    for _ in 0..20 {
        let now = chrono::Utc::now();
        let began = Instant::now();
        let due = tokens.due(now, now + chrono::Duration::seconds(600), 500).await?;
        scans.push(began.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(due.len() == due_count, "the scan found {} due tokens, not {due_count}", due.len());
    }
    scans.sort_by(f64::total_cmp);

    println!(
        "{}",
        json!({
            "tokens": args.tokens,
            "rate_per_minute": args.rate_per_minute,
            "seconds": took.as_secs_f64(),
            "refreshes_per_s": args.tokens as f64 / took.as_secs_f64(),
            "most_requests_in_1s": most_within(1000),
            "most_requests_in_60s": most_within(60_000),
            "token_requests": stats.refresh_requests,
            "refresh_token_reuse": stats.refresh_token_reuse,
            "scan_1pct_due_ms": { "p50": scans[scans.len() / 2], "max": scans[scans.len() - 1] },
        })
    );
    Ok(())
}
