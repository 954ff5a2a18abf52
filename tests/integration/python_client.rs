//! The Python client example (`examples/python/`) against a running worker: this test starts a
//! worker whose provider is the in-repo OAuth server, prepares a connected user and one whose
//! grant the provider refused, and runs the example's own `unittest` suite
//! (`examples/python/test_client.py`) against it. That suite covers results, `not_connected` and
//! `reauth_required` followed through the connect flow as a browser, other error codes,
//! concurrent calls and timeouts; see its docstring. Then the demo CLI (`example.py`) is run for
//! a connected and an unconnected user.

use std::path::PathBuf;
use std::process::{Output, Stdio};

use chrono::Utc;
use serde_json::json;

use crate::support::{Flavor, McpServer, SERVICE_KEY, TestApp, repo, spawn_app_with_oauth, wait_until};

/// Where the connect flow sends the browser at the end (allowed by the OAuth fixture's
/// `http.return_to_allowlist`; nothing listens there, and nothing needs to).
const RETURN_TO: &str = "http://127.0.0.1:9/settings";

/// The access token stored for the connected user; the Python side checks the MCP server got it.
const CONNECTED_TOKEN: &str = "py-client-test-access-token";

fn client_python() -> PathBuf {
    let python = repo().join(".venv/client/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/python-envs client", python.display());
    python
}

/// Runs the client venv's Python with `args` in the repo root, with the client's settings for
/// `app` (and the test's users) in the environment. Returns its output and stdout + stderr.
async fn run_python(app: &TestApp, args: &[&str]) -> (Output, String) {
    let output = tokio::process::Command::new(client_python())
        .args(args)
        .current_dir(repo())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("MCP_CLIENT_AMQP_URL", app.settings.amqp.url.expose())
        .env("MCP_CLIENT_JOBS_QUEUE", &app.settings.amqp.jobs_queue)
        .env("MCP_CLIENT_API_URL", &app.api)
        .env("MCP_CLIENT_SERVICE_KEY", SERVICE_KEY)
        .env("MCP_CLIENT_RETURN_TO", RETURN_TO)
        .env("MCP_CLIENT_TEST_CONNECTED_USER", "py-connected")
        .env("MCP_CLIENT_TEST_CONNECTED_TOKEN", CONNECTED_TOKEN)
        .env("MCP_CLIENT_TEST_REAUTH_USER", "py-reauth")
        .env("MCP_CLIENT_TEST_AUTHORIZE_URL", &app.settings.providers.qlik.authorize_url)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the client venv's python runs");
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!text.contains(SERVICE_KEY), "the service key was printed:\n{text}");
    (output, text)
}

#[tokio::test]
async fn the_python_client_example_passes_its_tests_against_the_worker() {
    client_python();
    let server = McpServer::spawn(Flavor::V2Json).await;
    // A refresher that scans every second, so the refused grant below is found at once.
    let quick_refresher = [("refresher.interval_secs", json!(1)), ("refresher.retry_initial_secs", json!(1))];
    let fx = spawn_app_with_oauth(&server.url(), |_| {}, &quick_refresher).await;
    let app = &fx.app;

    app.store_token("py-connected", CONNECTED_TOKEN).await;
    // A refresh token the provider never issued, due for renewal: the refresher's refresh is
    // refused (invalid_grant) and the user's jobs get reauth_required, as after a revoked grant.
    app.store_tokens("py-reauth", "stale-access", "never-issued", Utc::now() + chrono::Duration::seconds(120)).await;
    wait_until("the refused grant is marked reauth_required", || async {
        app.connection_status("py-reauth").await["status"] == "reauth_required"
    })
    .await;

    let (output, text) = run_python(app, &["-m", "unittest", "-v", "examples/python/test_client.py"]).await;
    assert!(output.status.success(), "the Python client's tests failed ({})\n{text}", output.status);
    assert!(text.contains("\nOK"), "unittest did not report OK:\n{text}");
    eprintln!("{text}");
    // The reauth user reconnected through the flow: a fresh grant replaced the refused one.
    let stored = app.stored("py-reauth").await.expect("py-reauth has tokens again");
    assert!(fx.oauth.access_token_active(stored.access_token.expose()), "the provider's new token is stored");

    // The demo CLI: a connected user's result, and where to send one who is not connected.
    let example = "examples/python/example.py";
    let (output, text) = run_python(app, &[example, "--user", "py-connected", "--tool", "qlik_whoami"]).await;
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains(CONNECTED_TOKEN), "the result shows the token the MCP server got:\n{text}");
    let (output, text) = run_python(app, &[example, "--user", "py-example-newcomer", "--tool", "qlik_whoami"]).await;
    assert_eq!(output.status.code(), Some(2), "{text}");
    let expected = format!("send the user to: {}?", app.settings.providers.qlik.authorize_url);
    assert!(text.contains(&expected), "expected {expected:?} in:\n{text}");
}
