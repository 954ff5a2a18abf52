//! `mcp-worker` as a child process, configured like a test's settings through the environment,
//! for tests that need separate processes (several replicas, captured logs, signals).

use std::process::{Child, Command, Stdio};

use mcp_worker::config::Settings;
use serde_json::Value;

use super::{SERVICE_KEY, TEST_KEY};

/// `MCP_WORKER_…` variables giving a child the test's database, queues, keys and MCP server, plus
/// `extra` (dotted keys, e.g. from [`super::spawn_oauth`]).
pub fn worker_env(settings: &Settings, extra: &[(&str, Value)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = vec![
        ("mongodb.database".into(), settings.mongodb.database.clone()),
        ("amqp.jobs_queue".into(), settings.amqp.jobs_queue.clone()),
        ("amqp.dead_letter_queue".into(), settings.amqp.dead_letter_queue.clone()),
        ("amqp.refresh_queue".into(), settings.amqp.refresh_queue.clone()),
        ("amqp.events_exchange".into(), settings.amqp.events_exchange.clone()),
        ("encryption.active_key".into(), "test1".into()),
        ("encryption.keys.test1".into(), TEST_KEY.into()),
        ("http.service_key".into(), SERVICE_KEY.into()),
        // Every process binds the HTTP listener (health and metrics): on its own free port.
        ("http.listen".into(), settings.http.listen.to_string()),
    ];
    for (name, server) in &settings.mcp.servers {
        pairs.push((format!("mcp.servers.{name}.url"), server.url.clone()));
        if let Some(tools) = &server.tools {
            pairs.push((format!("mcp.servers.{name}.tools"), format!("[{}]", tools.join(", "))));
        }
        if let Some(auth) = &server.auth {
            pairs.push((format!("mcp.servers.{name}.auth.provider"), auth.provider.to_string()));
            pairs.push((format!("mcp.servers.{name}.auth.header"), auth.header.clone()));
            pairs.push((format!("mcp.servers.{name}.auth.value"), auth.value.clone()));
        }
    }
    pairs.extend(
        extra
            .iter()
            .map(|(key, value)| (key.to_string(), value.as_str().map_or_else(|| value.to_string(), str::to_owned))),
    );
    pairs
        .into_iter()
        .map(|(key, value)| (format!("MCP_WORKER_{}", key.replace('.', "__").to_uppercase()), value))
        .collect()
}

/// Starts `mcp-worker <args>` with `env`; its stderr (the logs) goes to `stderr`.
pub fn spawn_worker(args: &[&str], env: &[(String, String)], stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mcp-worker"))
        .args(args)
        .env_remove("MCP_WORKER_ENV")
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("mcp-worker starts")
}

/// SIGTERM, then wait for the exit; returns whether it exited successfully.
pub fn terminate(child: &mut Child) -> bool {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().map(|status| status.success()).unwrap_or(false)
}
