//! The command line itself: `config check`. Needs no services.

use std::process::Command;

fn mcp_worker(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mcp-worker"))
        .args(args)
        .env_remove("MCP_WORKER_ENV")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("mcp-worker runs")
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_redacted() {
    let secret = "a-service-key-that-must-not-print";
    let output = mcp_worker(
        &[("MCP_WORKER_HTTP__SERVICE_KEY", secret), ("MCP_WORKER_WORKER__CONCURRENCY", "7")],
        &["config", "check"],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("concurrency: 7"), "the environment layer is applied:\n{stdout}");
    assert!(stdout.contains("service_key") && stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains(secret), "the service key was printed");
    assert!(stdout.ends_with("configuration is valid\n"));
}

#[test]
fn config_check_names_the_key_of_an_invalid_config_and_exits_2() {
    let output = mcp_worker(&[("MCP_WORKER_AMQP__PREFETCH", "0")], &["config", "check"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("amqp.prefetch"));
}

/// The checks a part makes of its own settings (here the registry's of a server URL) refuse a
/// configuration as early, and as clearly, as the checks of the settings themselves.
#[test]
fn config_check_refuses_what_the_parts_refuse_and_exits_2() {
    for (key, value, named) in [
        ("MCP_WORKER_MCP__SERVERS__QLIK__URL", "ftp://x", "mcp.servers.qlik.url"),
        ("MCP_WORKER_ENCRYPTION__KEYS__K1", "not-base64!", "encryption.keys.k1"),
    ] {
        let output = mcp_worker(&[(key, value)], &["config", "check"]);
        assert_eq!(output.status.code(), Some(2), "{key}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{key}: {stderr}");
    }
}
