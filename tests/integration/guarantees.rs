//! Which tool calls run exactly once and which at least once (issue 16): a tool whose server's
//! annotations the operator trusts, and which they say is read-only or idempotent, is neither
//! claimed nor recorded, so a copy of its job (a redelivery, a resend) runs it again and is
//! answered again; every other tool keeps the claim and the recorded reply, and runs once per
//! `job_id`. A copy here is the same job published again after its reply came: to the worker
//! it is what a redelivery is.
//!
//! The Python test server's annotations: `echo` and `qlik_whoami` are read-only, `count_job` is
//! neither read-only nor idempotent. `plain` serves `echo`, `sleep` and `count_job`.

use mongodb::bson::doc;
use serde_json::{Value, json};

use crate::support::{Flavor, McpServer, SERVICE_KEY, TestApp, spawn_app_with};

/// Lists the user's catalog over HTTP, which is what lets the worker know the annotations.
async fn list(app: &TestApp, user: &str) {
    let url = reqwest::Url::parse_with_params(&format!("{}/v1/tools", app.api), [("user_id", user)]).unwrap();
    let answer = reqwest::Client::new().get(url).bearer_auth(SERVICE_KEY).send().await.unwrap();
    assert_eq!(answer.status(), 200);
}

/// Publishes the job `job_id` twice, one after the other's reply, and returns both replies.
async fn twice(app: &TestApp, job_id: &str, user: &str, tool: &str, arguments: Value) -> [Value; 2] {
    let mut replies = Vec::new();
    for _ in 0..2 {
        app.call(job_id, user, tool, arguments.clone()).await;
        let (reply, _) = app.next_reply().await;
        assert_eq!((&reply["status"], &reply["job_id"]), (&json!("ok"), &json!(job_id)), "{reply}");
        replies.push(reply);
    }
    [replies.remove(0), replies.remove(0)]
}

/// How many `tools/call` of `tool` the server received.
fn calls(server: &McpServer, tool: &str) -> usize {
    server.tool_calls().iter().filter(|r| r.tool.as_deref() == Some(tool)).count()
}

/// Whether the worker wrote a claim for `job_id`.
async fn claimed(app: &TestApp, job_id: &str) -> bool {
    app.db
        .collection::<mongodb::bson::Document>("job_results")
        .find_one(doc! { "_id": job_id })
        .await
        .unwrap()
        .is_some()
}

async fn app_trusting(server: &McpServer, plain: Value) -> TestApp {
    let mut plain_settings = json!({ "url": server.url(), "tools": ["echo", "sleep", "count_job"] });
    plain_settings.as_object_mut().unwrap().extend(plain.as_object().unwrap().clone());
    let overrides = [("mcp.servers.plain", plain_settings), ("mcp.servers.qlik.trust_annotations", json!(false))];
    spawn_app_with(&server.url(), &overrides).await
}

#[tokio::test]
async fn a_trusted_read_only_tool_runs_again_on_a_copy_while_a_writing_one_runs_once() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = app_trusting(&server, json!({ "trust_annotations": true })).await;
    list(&app, "alice").await;

    let [first, second] = twice(&app, "j-echo", "alice", "echo", json!({ "text": "hi" })).await;
    assert_eq!(calls(&server, "echo"), 2, "the read-only tool ran again");
    assert_eq!(first["result"], second["result"]);
    assert!(!claimed(&app, "j-echo").await, "no claim was written for it");

    let [first, second] = twice(&app, "j-count", "alice", "count_job", json!({ "job_id": "j-count" })).await;
    assert_eq!(calls(&server, "count_job"), 1, "a tool that may change something runs once");
    assert_eq!(first, second, "the copy got the recorded reply");
    assert!(claimed(&app, "j-count").await);
    app.stop().await;
}

#[tokio::test]
async fn a_tool_named_exactly_once_and_every_tool_of_an_untrusted_server_run_once() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = app_trusting(&server, json!({ "trust_annotations": true, "exactly_once_tools": ["echo"] })).await;
    app.store_token("alice", "tok-alice").await;
    list(&app, "alice").await;

    twice(&app, "j-echo", "alice", "echo", json!({ "text": "hi" })).await;
    assert_eq!(calls(&server, "echo"), 1, "echo is named in exactly_once_tools");
    // `qlik` (trust_annotations = false here) says qlik_whoami is read-only: not taken.
    twice(&app, "j-whoami", "alice", "qlik_whoami", json!({})).await;
    assert_eq!(calls(&server, "qlik_whoami"), 1, "the annotations of an untrusted server change nothing");
    assert!(claimed(&app, "j-echo").await && claimed(&app, "j-whoami").await);
    app.stop().await;
}

#[tokio::test]
async fn before_the_catalog_is_listed_a_read_only_tool_keeps_exactly_once() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = app_trusting(&server, json!({ "trust_annotations": true })).await;
    twice(&app, "j-echo", "alice", "echo", json!({ "text": "hi" })).await;
    assert_eq!(calls(&server, "echo"), 1, "its annotations are not known yet");
    app.stop().await;
}
