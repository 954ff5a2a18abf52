//! A fast MCP server for benchmarks: just enough Streamable HTTP (stateless, JSON responses) for
//! a client to connect and call a tool, so that the server is never the bottleneck.
//!
//! `server/discover` gets "method not found" (so clients fall back to `initialize`),
//! `initialize` a minimal result, notifications 202, and every `tools/call` the result
//! `{"content":[{"type":"text","text":"ok"}]}`, after `?delay_ms=N` milliseconds if the URL has
//! that query (to keep many calls in flight); with `?result_bytes=N` the text is N bytes long
//! (large answers, for the memory measurement in `bench/rss`). `tools/list` lists one tool,
//! `qlik_bench`, annotated read-only, as shared by every user for an hour (`cacheScope: public`),
//! so one listing tells a worker its annotations. It speaks HTTP/1.1 and, with prior knowledge,
//! HTTP/2 (h2c) on the same port.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::Parser;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18801")]
    listen: SocketAddr,
}

#[derive(Deserialize)]
struct Delay {
    delay_ms: Option<u64>,
    result_bytes: Option<usize>,
}

async fn mcp(Query(delay): Query<Delay>, Json(request): Json<Value>) -> Response {
    let id = request["id"].clone();
    let result = |result: Value| Json(json!({ "jsonrpc": "2.0", "id": id, "result": result })).into_response();
    match request["method"].as_str().unwrap_or_default() {
        "server/discover" => Json(json!({
            "jsonrpc": "2.0", "id": id, "error": { "code": -32601, "message": "Method not found" }
        }))
        .into_response(),
        "initialize" => result(json!({
            "protocolVersion": "2025-06-18",
            "capabilities": { "tools": {} },
            "serverInfo": { "name": "mcp-stub", "version": "0" },
        })),
        "tools/list" => result(json!({
            "tools": [{
                "name": "qlik_bench",
                "description": "Answers ok.",
                "inputSchema": { "type": "object" },
                "annotations": { "readOnlyHint": true },
            }],
            "ttlMs": 3_600_000,
            "cacheScope": "public",
        })),
        "tools/call" => {
            if let Some(ms) = delay.delay_ms {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let text = delay.result_bytes.map_or_else(|| "ok".to_owned(), |n| "x".repeat(n));
            result(json!({ "content": [{ "type": "text", "text": text }], "isError": false }))
        }
        _ if request.get("id").is_none() => StatusCode::ACCEPTED.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("mcp-stub: http://{}/mcp", listener.local_addr()?);
    axum::serve(listener, axum::Router::new().route("/mcp", post(mcp))).await?;
    Ok(())
}
