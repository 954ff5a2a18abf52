//! No token, key or secret in the logs, even at debug level, across a whole token lifecycle run by
//! a real `mcp-worker run` process: connect, refresh, a tool call with the token, disconnect.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mcp_worker::crypto::TokenCipher;
use mcp_worker::provider::Provider;
use mcp_worker::store::{Store, StoredToken};
use serde_json::json;

use crate::support::{
    Flavor, McpServer, SERVICE_KEY, TEST_KEY, connect_through, spawn_oauth, spawn_worker, terminate, test_settings,
    wait_until, worker_env,
};

#[tokio::test]
async fn no_secret_reaches_the_debug_logs_of_a_whole_token_lifecycle() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // Access tokens live 300 s, inside the refresher's 600 s lead: each one is renewed at once.
    let (oauth, provider) = spawn_oauth(|config| config.access_token_ttl = Duration::from_secs(300)).await;
    let settings = test_settings(&server.url(), &provider);
    mcp_worker::app::migrate(&settings).await.unwrap();
    let store = Store::connect(&settings.mongodb).await.unwrap();
    let tokens = store.tokens(Provider::Qlik, &Arc::new(TokenCipher::from_settings(&settings.encryption).unwrap()));

    let logs = tempfile::NamedTempFile::new().unwrap();
    let mut extra = provider.clone();
    extra.extend([("refresher.interval_secs", json!(1)), ("telemetry.filter", json!("debug"))]);
    let env = worker_env(&settings, &extra);
    let mut worker = spawn_worker(&["run"], &env, Stdio::from(logs.reopen().unwrap()));
    let api = format!("http://{}", settings.http.listen);
    wait_until("the API listens", || async { tokio::net::TcpStream::connect(settings.http.listen).await.is_ok() })
        .await;

    assert_eq!(connect_through(&api, "alice", "allow").await.status, 303);
    let first: StoredToken = tokens.get("alice").await.unwrap().expect("connected");
    let mut second = None;
    for _ in 0..300 {
        second = tokens.get("alice").await.unwrap().filter(|t| t.access_token.expose() != first.access_token.expose());
        if second.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = second.expect("the refresher renewed the token");

    // A tool call that carries the token in its header (and whose result does not echo it).
    let call = Command::new(env!("CARGO_BIN_EXE_mcp-worker"))
        .args(["call", "--user", "alice", "--tool", "qlik_fail"])
        .env_remove("MCP_WORKER_ENV")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(call.status.success(), "{}", String::from_utf8_lossy(&call.stderr));
    assert_eq!(server.tool_calls()[0].x_qlik_access_token.as_deref(), Some(second.access_token.expose().as_str()));

    let status = reqwest::Client::new()
        .delete(format!("{api}/v1/connections/qlik/alice"))
        .bearer_auth(SERVICE_KEY)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    assert!(terminate(&mut worker), "mcp-worker exits 0 on SIGTERM");
    assert_eq!(oauth.stats().refresh_token_reuse, 0);

    let logs = std::fs::read_to_string(logs.path()).unwrap();
    assert!(logs.contains("job done") && logs.contains("token refreshed"), "debug logs were captured:\n{logs}");
    let secrets = [
        ("first access token", first.access_token.expose().as_str()),
        ("first refresh token", first.refresh_token.expose().as_str()),
        ("second access token", second.access_token.expose().as_str()),
        ("second refresh token", second.refresh_token.expose().as_str()),
        ("client secret", "test-secret"),
        ("service key", SERVICE_KEY),
        ("encryption key", TEST_KEY),
        ("broker password", "guest:guest"),
    ];
    for (what, value) in secrets {
        assert!(!logs.contains(value), "the {what} appears in the logs");
    }
}
