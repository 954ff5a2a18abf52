//! The job path's rules that need the real services to show: a `job_id` is bound to its call,
//! every wait ends, and the replies that end a job are recorded. Each test fails when its rule
//! is removed from `worker::decision` or `store::results`.

use mongodb::bson::doc;
use serde_json::{Value, json};

use crate::support::{Flavor, McpServer, header, spawn_app, spawn_app_with, spawn_app_with_oauth, wait_until};

#[tokio::test]
async fn a_job_id_reused_for_another_user_is_refused_and_never_sees_the_first_reply() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "alice-secret-token").await;
    app.store_token("bob", "bob-token").await;

    app.call("shared-id", "alice", "qlik_whoami", json!({})).await;
    let (alice, _) = app.next_reply().await;
    assert_eq!(alice["status"], "ok", "{alice}");
    assert!(alice.to_string().contains("alice-secret-token"), "alice's call got her token: {alice}");

    // Bob's job reuses the id, for another user and another tool: a different call.
    app.call("shared-id", "bob", "qlik_whoami", json!({})).await;
    let (bob, _) = app.next_reply().await;
    assert!(!bob.to_string().contains("alice-secret-token"), "bob was given alice's reply: {bob}");
    assert_eq!(bob["error"]["code"], "invalid_job", "{bob}");
    assert!(bob["error"]["message"].as_str().unwrap().contains("job_id reused for a different call"), "{bob}");
    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("bob's job is dead-lettered");
    assert!(header(&dead.properties, "x-mcp-worker-reason").unwrap().contains("job_id reused"));

    // The same arguments in another key order, by the same user, are the same call: replayed.
    app.call("args-id", "alice", "echo", json!({ "text": "hi" })).await;
    let (first, _) = app.next_reply().await;
    app.call("args-id", "bob", "echo", json!({ "text": "hi" })).await;
    let (other_user, _) = app.next_reply().await;
    assert_eq!(other_user["error"]["code"], "invalid_job", "same tool and arguments, another user: {other_user}");
    app.call("args-id", "alice", "echo", json!({ "text": "hi" })).await;
    let (again, _) = app.next_reply().await;
    assert_eq!(again, first, "the same call again gets its recorded reply");
    assert_eq!(server.tool_calls().len(), 2, "only alice's two first calls ran");
    app.stop().await;
}

#[tokio::test]
async fn a_job_id_reused_while_its_first_call_runs_is_refused_without_waiting_for_it() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = spawn_app_with(&server.url(), &[("tokens.defer_ms", json!(200))]).await;

    app.call("busy-id", "alice", "sleep", json!({ "seconds": 2 })).await;
    wait_until("the first call reached the server", || async { !server.tool_calls().is_empty() }).await;
    app.call("busy-id", "bob", "sleep", json!({ "seconds": 2 })).await;
    let (first, _) = app.next_reply().await;
    assert_eq!(first["error"]["code"], "invalid_job", "bob's copy is answered first, at once: {first}");
    let (second, _) = app.next_reply().await;
    assert_eq!(second["status"], "ok", "alice's call ends as it would have: {second}");
    assert_eq!(server.tool_calls().len(), 1);
    app.stop().await;
}

/// Token documents of shapes the older Python writer of `qlik_tokens` could leave behind.
fn wrong_shapes() -> Vec<(&'static str, mongodb::bson::Document)> {
    let now = mongodb::bson::DateTime::now();
    vec![
        (
            "expires_at",
            doc! { "access_token": "a", "refresh_token": "r", "expires_at": "2030-01-01T00:00:00Z",
            "created_at": now, "updated_at": now },
        ),
        ("created_at", doc! { "access_token": "a", "refresh_token": "r", "expires_at": now, "updated_at": now }),
        (
            "access_token",
            doc! { "access_token": 12345_i64, "refresh_token": "r", "expires_at": now, "created_at": now,
            "updated_at": now },
        ),
    ]
}

#[tokio::test]
async fn a_token_document_of_the_wrong_shape_gets_reauth_required_at_once_and_the_status_agrees() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // A configured provider, for the status endpoint.
    let overrides = [("tokens.defer_ms", json!(200)), ("providers.qlik.client_id", json!("test-client"))];
    let app = spawn_app_with(&server.url(), &overrides).await;
    let tokens = app.db.collection::<mongodb::bson::Document>("qlik_tokens");
    for (field, mut document) in wrong_shapes() {
        let user = format!("user-{field}");
        document.insert("user_id", &user);
        tokens.insert_one(document).await.unwrap();

        app.call(&format!("job-{field}"), &user, "qlik_whoami", json!({})).await;
        let (reply, _) = app.next_reply().await;
        assert_eq!(reply["error"]["code"], "reauth_required", "{field}: {reply}");
        assert_eq!(reply["error"]["provider"], "qlik");
        assert!(!reply.to_string().contains("12345"), "no stored value in the reply: {reply}");
        let status = app.connection_status(&user).await;
        assert_eq!(status["status"], "reauth_required", "{field}: the status endpoint agrees: {status}");
    }
    assert!(server.tool_calls().is_empty());
    let metrics = reqwest::get(format!("{}/metrics", app.api)).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "mcp_worker_unreadable_tokens_total 3"), "{metrics}");
    let waits = metrics.lines().find(|l| l.starts_with("mcp_worker_job_deferrals_total{reason=\"wait\"}"));
    assert_eq!(waits, None, "no job waited");
    app.stop().await;
}

#[tokio::test]
async fn a_job_waiting_for_an_unreachable_database_is_answered_internal_after_the_configured_waits() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app_name = format!("waits-{}", uuid::Uuid::new_v4().simple());
    let uri = format!("mongodb://127.0.0.1:27017/?directConnection=true&appName={app_name}");
    let overrides = [("mongodb.uri", json!(uri)), ("tokens.defer_ms", json!(200)), ("worker.max_waits", json!(2))];
    let app = spawn_app_with(&server.url(), &overrides).await;
    app.store_token("alice", "t").await;

    // Only this worker's claims fail (a new claim is an insert, one taken back an update), with
    // a "try again" code.
    let admin = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true")
        .await
        .unwrap()
        .database("admin");
    let fail = doc! {
        "configureFailPoint": "failCommand", "mode": "alwaysOn",
        "data": { "appName": &app_name, "errorCode": 91, "failCommands": ["insert", "update"] },
    };
    admin.run_command(fail).await.expect("SecantusDB arms the failpoint (--enable-test-commands)");
    app.call("job-1", "alice", "echo", json!({ "text": "hi" })).await;
    let (reply, _) = app.next_reply().await;
    admin.run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" }).await.unwrap();

    assert_eq!(reply["error"]["code"], "internal", "{reply}");
    assert_eq!(reply["error"]["retryable"], true);
    assert!(reply["error"]["message"].as_str().unwrap().contains("2 waits"), "{reply}");
    assert!(server.tool_calls().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_token_unavailable_reply_is_recorded_so_a_redelivery_replays_it() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app_with(&server.url(), &[("tokens.max_deferrals", json!(0))]).await;
    // Too short for a 10 s call plus 30 s of skew, and nobody refreshes it.
    app.store_tokens("alice", "short", "r", chrono::Utc::now() + chrono::Duration::seconds(20)).await;

    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (first, _) = app.next_reply().await;
    assert_eq!(first["error"]["code"], "token_unavailable", "{first}");

    // Now the token is good, but the job ended: its redelivery replays the same answer.
    app.store_token("alice", "long").await;
    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (again, _) = app.next_reply().await;
    assert_eq!(again, first, "the recorded reply, not a new run");
    assert!(server.tool_calls().is_empty(), "the tool never ran");
    let replies = app.db.collection::<mongodb::bson::Document>("job_replies");
    let recorded = replies.find_one(doc! { "_id": "job-1" }).await.unwrap().expect("the reply is recorded");
    let body: Value = serde_json::from_str(recorded.get_str("reply").unwrap()).unwrap();
    assert_eq!(body, first);
    app.stop().await;
}

/// A worker whose provider is the in-repo OAuth server, with refreshes only on request, and
/// alice holding a grant whose access token is `access_token` (the refresh token is real).
async fn refusing_server_fixture(access_token: &str) -> (McpServer, crate::support::OAuthFixture) {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let overrides =
        [("refresher.interval_secs", json!(3600)), ("refresher.lead_secs", json!(1)), ("tokens.defer_ms", json!(300))];
    let fx = spawn_app_with_oauth(&server.url(), |_| {}, &overrides).await;
    let issued = fx.oauth.issue_grant("alice", "offline_access", std::time::Duration::from_secs(3600));
    let expires = chrono::Utc::now() + chrono::Duration::hours(1);
    fx.app.store_tokens("alice", access_token, &issued.refresh_token, expires).await;
    (server, fx)
}

#[tokio::test]
async fn an_access_token_the_mcp_server_refuses_is_renewed_and_the_call_made_again() {
    // Revoked at the provider before its expiry: the MCP server answers 401 to it.
    let (server, fx) = refusing_server_fixture("refused-but-not-expired").await;

    fx.app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, _) = fx.app.next_reply().await;

    assert_eq!(reply["status"], "ok", "{reply}");
    let renewed = fx.app.stored("alice").await.unwrap();
    assert_eq!(reply["result"]["structuredContent"]["token"], renewed.access_token.expose().as_str());
    let seen: Vec<_> = server.tool_calls().into_iter().map(|c| c.x_qlik_access_token).collect();
    assert_eq!(seen, vec![Some("refused-but-not-expired".into()), Some(renewed.access_token.expose().clone())]);
    assert_eq!(fx.oauth.stats().refresh_successes, 1, "one forced renewal");
    fx.app.stop().await;
}

#[tokio::test]
async fn a_renewed_token_the_mcp_server_refuses_too_means_reauth_required_with_the_event() {
    let (server, fx) = refusing_server_fixture("good-token").await;
    let events = fx.app.watch_events().await;

    // `qlik_refused` is answered 401 whatever the token.
    fx.app.call("job-1", "alice", "qlik_refused", json!({})).await;
    let (reply, _) = fx.app.next_reply().await;

    assert_eq!(reply["error"]["code"], "reauth_required", "{reply}");
    assert_eq!(reply["error"]["provider"], "qlik");
    assert_eq!(server.tool_calls().len(), 2, "called with the token, then once with the renewed one");
    assert_eq!(fx.oauth.stats().refresh_successes, 1);
    let stored = fx.app.stored("alice").await.unwrap();
    assert_eq!(stored.status, mcp_worker::store::TokenStatus::ReauthRequired);
    let (key, event) = fx.app.next_event(&events).await;
    assert_eq!(key, "token.reauth_required", "{event}");
    assert_eq!(event["user_id"], "alice");
    let status = fx.app.connection_status("alice").await;
    assert_eq!(status["status"], "reauth_required", "{status}");
    fx.app.stop().await;
}

#[tokio::test]
async fn a_403_from_the_mcp_server_is_forbidden_with_the_servers_description() {
    let (server, fx) = refusing_server_fixture("good-token").await;

    fx.app.call("job-1", "alice", "qlik_forbidden", json!({})).await;
    let (reply, _) = fx.app.next_reply().await;

    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    assert_eq!(reply["error"]["retryable"], false);
    assert_eq!(reply["error"]["provider"], "qlik");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("Qlik MCP: Allowed"), "the server's description is passed on: {message}");
    assert_eq!(server.tool_calls().len(), 1, "not retried");
    assert_eq!(fx.oauth.stats().refresh_successes, 0, "a 403 is not about the token's freshness");
    assert_eq!(fx.app.stored("alice").await.unwrap().status, mcp_worker::store::TokenStatus::Active);
    fx.app.stop().await;
}
