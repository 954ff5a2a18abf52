//! `oauth-test-server`: the strict test authorization server as a standalone process,
//! for the local demo. Binds loopback by default: it is a test double, not a service.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use oauth_test_server::{Config, ErrorStyle, OAuthServer};

#[derive(Parser)]
#[command(version, about = "A strict OAuth 2.0 authorization server for tests and local runs")]
struct Args {
    /// Port to listen on (0 = any free port).
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value = "mcp-worker")]
    client_id: String,
    #[arg(long, default_value = "test-secret")]
    client_secret: String,
    /// Allowed redirect URI, matched exactly (repeatable).
    #[arg(long = "redirect-uri", required = true)]
    redirect_uris: Vec<String>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    access_token_ttl: u64,
    /// Username accepted by the login form (repeatable; none = any non-empty username).
    #[arg(long = "user")]
    users: Vec<String>,
    /// Answer used/invalid refresh tokens with HTTP 401, like Qlik Cloud, instead of 400.
    #[arg(long)]
    qlik_errors: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let config = Config {
        client_id: args.client_id,
        client_secret: args.client_secret,
        redirect_uris: args.redirect_uris,
        access_token_ttl: Duration::from_secs(args.access_token_ttl),
        error_style: if args.qlik_errors { ErrorStyle::Qlik } else { ErrorStyle::Rfc },
        users: args.users,
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!("oauth-test-server listening on http://{addr}");
    OAuthServer::new(config).serve(listener).await;
    Ok(())
}
