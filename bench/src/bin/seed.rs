//! Seeds warm tokens for the benchmark's users `user-0` … `user-<n-1>`: sealed, through
//! mcp-worker's own store (configured like the worker, by `MCP_WORKER_…` variables), and with
//! `--peer-database`, also in plain text in that database, as the old Python backend kept them.

use std::sync::Arc;

use clap::Parser;
use mcp_worker::config::Settings;
use mcp_worker::crypto::TokenCipher;
use mcp_worker::provider::Provider;
use mcp_worker::secret::Secret;
use mcp_worker::store::{NewTokens, Store};
use mongodb::bson::{DateTime, doc};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long)]
    peer_database: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(std::env::var("MCP_WORKER_ENV").ok().as_deref(), std::path::Path::new("config"))?;
    let store = Store::connect(&settings.mongodb).await?;
    let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
    let tokens = store.tokens(Provider::Qlik, &cipher);
    let now = chrono::Utc::now();
    for user in 0..args.users {
        let new = NewTokens {
            access_token: Secret::new(format!("bench-access-{user}")),
            refresh_token: Secret::new(format!("bench-refresh-{user}")),
            expires_at: now + chrono::Duration::hours(6),
        };
        tokens.save(&format!("user-{user}"), &new, now).await?;
    }
    if let Some(database) = args.peer_database {
        let client = mongodb::Client::with_uri_str(settings.mongodb.uri.expose()).await?;
        let collection = client.database(&database).collection::<mongodb::bson::Document>("qlik_tokens");
        collection.create_index(mongodb::IndexModel::builder().keys(doc! { "user_id": 1 }).build()).await?;
        let expires = DateTime::from_millis((now + chrono::Duration::hours(6)).timestamp_millis());
        let documents = (0..args.users).map(|user| {
            doc! {
                "user_id": format!("user-{user}"),
                "access_token": format!("bench-access-{user}"),
                "refresh_token": format!("bench-refresh-{user}"),
                "expires_at": expires,
                "created_at": DateTime::now(),
                "updated_at": DateTime::now(),
            }
        });
        collection.insert_many(documents).await?;
    }
    eprintln!("seed: {} users", args.users);
    Ok(())
}
