//! Deletes what a `bench/run` run declared on the broker: the worker's topology, as its
//! settings (from the environment) name it, and the extra queues named on the command line.

use clap::Parser;
use mcp_worker::config::Settings;

#[derive(Parser)]
struct Args {
    /// Further queues to delete (the ceiling's and the Python peer's).
    queues: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings::load(std::env::var("MCP_WORKER_ENV").ok().as_deref(), std::path::Path::new("config"))?;
    mcp_worker_bench::delete_topology(&settings, &args.queues).await
}
