//! The tool catalog against the official Python SDK's servers (`mcp<2` and `mcp>=2`, JSON and
//! SSE), over AMQP (a `tools/list` job) and HTTP (`GET /v1/tools`): per-user lists from a server
//! whose list depends on the token it receives, routing, paging, the cache and its invalidation.
//!
//! In these tests the `qlik` server (tools `qlik_*`, the user's token in `X-Qlik-Access-Token`)
//! and the `plain` server (exactly `echo`, `sleep` and `count_job`, no token) are the same Python
//! process, which lists every tool it has to both, plus `qlik_for_<8 hex of sha256(token)>` to a
//! request that carries a token. What each server's list must become is known exactly.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{
    Flavor, McpServer, SERVICE_KEY, TestApp, spawn_app, spawn_app_with, spawn_app_with_oauth, wait_until,
};

/// The tool the test server lists only to the holder of `token`.
fn token_tool(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("qlik_for_{}", &hex[..8])
}

/// The user's catalog over AMQP: the `result` of the ok reply to a `tools/list` job.
async fn listed_over_amqp(app: &TestApp, user: &str) -> Value {
    let job_id = format!("list-{}", uuid::Uuid::new_v4().simple());
    let job = json!({ "job_id": job_id, "user_id": user, "method": "tools/list" });
    app.publish(&serde_json::to_vec(&job).unwrap(), Some(&job_id)).await;
    let (reply, correlation) = app.next_reply().await;
    assert_eq!(correlation.as_deref(), Some(job_id.as_str()));
    assert_eq!((&reply["status"], &reply["job_id"]), (&json!("ok"), &json!(job_id)), "{reply}");
    reply["result"].clone()
}

/// The user's catalog over HTTP.
async fn listed_over_http(app: &TestApp, user: &str) -> Value {
    let url = reqwest::Url::parse_with_params(&format!("{}/v1/tools", app.api), [("user_id", user)]).unwrap();
    let answer = reqwest::Client::new().get(url).bearer_auth(SERVICE_KEY).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    answer.json().await.unwrap()
}

/// `(server, name)` of each tool, in the catalog's order.
fn tools(catalog: &Value) -> Vec<(String, String)> {
    let tools = catalog["tools"].as_array().unwrap_or_else(|| panic!("no tools: {catalog}"));
    tools.iter().map(|t| (t["server"].as_str().unwrap().to_owned(), t["name"].as_str().unwrap().to_owned())).collect()
}

fn named(server: &str, names: &[&str]) -> Vec<(String, String)> {
    names.iter().map(|name| (server.to_owned(), (*name).to_owned())).collect()
}

/// What the catalog of a user holding `token` must be, in order: `plain` before `qlik` (the
/// configured names in order), each server's tools in the order the server lists them.
fn expected_tools(token: &str) -> Vec<(String, String)> {
    let mut expected = named("plain", &["echo", "count_job", "sleep"]);
    expected.extend(named("qlik", &["qlik_whoami", "qlik_fail", "qlik_delete_note", &token_tool(token)]));
    expected
}

/// The number of `tools/list` requests the server received carrying `token` (or none).
fn lists_with(server: &McpServer, token: Option<&str>) -> usize {
    server.tool_lists().iter().filter(|r| r.x_qlik_access_token.as_deref() == token).count()
}

async fn each_user_gets_their_own_catalog_over_amqp_and_http(flavor: Flavor) {
    let server = McpServer::spawn(flavor).await;
    // `plain` at the same server under a query of its own, so the log tells the two apart.
    let plain = json!({ "url": format!("{}?as=plain", server.url()), "tools": ["echo", "sleep", "count_job"] });
    let app = spawn_app_with(&server.url(), &[("mcp.servers.plain", plain)]).await;
    app.store_token("alice", "tok-alice").await;
    app.store_token("bob", "tok-bob").await;

    for (user, token) in [("alice", "tok-alice"), ("bob", "tok-bob")] {
        let over_amqp = listed_over_amqp(&app, user).await;
        assert_eq!(tools(&over_amqp), expected_tools(token), "{flavor:?} {user}: {over_amqp:#}");
        assert_eq!(over_amqp["unavailable"], json!([]), "{over_amqp}");
        let over_http = listed_over_http(&app, user).await;
        assert_eq!(over_http, over_amqp, "{flavor:?} {user}: one answer, two ways to ask");
    }
    // A tool advertised outside its server's routing is absent: `echo` and the rest that `plain`
    // serves are not attributed to `qlik`, which lists them too, and `flaky`, which no server
    // serves, is nowhere.
    let alice = listed_over_amqp(&app, "alice").await;
    let names: Vec<String> = tools(&alice).into_iter().map(|(_, name)| name).collect();
    assert!(!names.contains(&"flaky".to_owned()) && !names.contains(&token_tool("tok-bob")), "{names:?}");
    let whoami = &alice["tools"].as_array().unwrap().iter().find(|t| t["name"] == "qlik_whoami").unwrap();
    assert_eq!(whoami["title"], "Who am I", "{whoami}");
    assert_eq!(whoami["annotations"]["readOnlyHint"], true, "{whoami}");
    assert_eq!(whoami["inputSchema"]["type"], "object", "{whoami}");

    // Without a token: the public server's tools, and the reason for Qlik.
    let carol = listed_over_http(&app, "carol").await;
    assert_eq!(tools(&carol), named("plain", &["echo", "count_job", "sleep"]), "{carol}");
    assert_eq!(
        carol["unavailable"],
        json!([{ "server": "qlik", "error": {
            "code": "not_connected",
            "message": "the user has not connected qlik; send them through the connect flow",
            "retryable": false,
            "provider": "qlik",
        }}]),
    );
    assert_eq!(listed_over_amqp(&app, "carol").await, carol);

    // No request carried a token but a listing or a call to `qlik`, and each only its own
    // user's; `plain`, which takes none, got none, in no header.
    let requests = server.requests();
    for request in &requests {
        if let Some(token) = &request.x_qlik_access_token {
            assert!(matches!(request.mcp_method.as_deref(), Some("tools/list" | "tools/call")), "{request:?}");
            assert!(token == "tok-alice" || token == "tok-bob", "{request:?}");
            assert_ne!(request.query, "as=plain", "a token went to the public server: {request:?}");
        }
        assert!(request.authorization.is_none(), "{request:?}");
    }
    assert!(requests.iter().any(|r| r.query == "as=plain" && r.mcp_method.as_deref() == Some("tools/list")));
    for token in ["tok-alice", "tok-bob"] {
        assert!(lists_with(&server, Some(token)) >= 1, "{token} was listed with");
    }
    assert!(lists_with(&server, None) >= 1, "the public server was listed without a token");
    app.stop().await;
}

#[tokio::test]
async fn each_user_gets_their_own_catalog_from_fastmcp_v1_json() {
    each_user_gets_their_own_catalog_over_amqp_and_http(Flavor::V1Json).await;
}

#[tokio::test]
async fn each_user_gets_their_own_catalog_from_fastmcp_v1_sse() {
    each_user_gets_their_own_catalog_over_amqp_and_http(Flavor::V1Sse).await;
}

#[tokio::test]
async fn each_user_gets_their_own_catalog_from_mcpserver_v2_json() {
    each_user_gets_their_own_catalog_over_amqp_and_http(Flavor::V2Json).await;
}

#[tokio::test]
async fn each_user_gets_their_own_catalog_from_mcpserver_v2_sse() {
    each_user_gets_their_own_catalog_over_amqp_and_http(Flavor::V2Sse).await;
}

#[tokio::test]
async fn a_list_of_three_pages_is_read_whole_and_in_order() {
    let server = McpServer::spawn_with(Flavor::V2Sse, McpServer::reserve_port(), &["--page-size", "3"]).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "tok-alice").await;

    let catalog = listed_over_amqp(&app, "alice").await;
    // Eight tools to a token (three pages): `qlik_whoami` and `echo` are on the first,
    // `count_job` and `sleep` on the second, `qlik_delete_note` and the token's tool on the third.
    assert_eq!(tools(&catalog), expected_tools("tok-alice"), "{catalog:#}");
    let cursors: Vec<Option<String>> = server
        .tool_lists()
        .into_iter()
        .filter(|r| r.x_qlik_access_token.as_deref() == Some("tok-alice"))
        .map(|r| r.cursor)
        .collect();
    assert_eq!(cursors.len(), 3, "{cursors:?}");
    assert_eq!(cursors[0], None, "the first page is asked for without a cursor");
    assert!(cursors[1].is_some() && cursors[2].is_some() && cursors[1] != cursors[2], "{cursors:?}");
    app.stop().await;
}

#[tokio::test]
async fn within_the_ttl_lists_are_reused_per_user_and_a_token_event_drops_them() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    // A provider, so that disconnecting (revoke, delete, the event) is served.
    let fx = spawn_app_with_oauth(&server.url(), |_| {}, &[]).await;
    let app = &fx.app;
    app.store_token("alice", "tok-alice").await;
    app.store_token("bob", "tok-bob").await;

    // Five requests at once, with nothing cached: one listing per server.
    let at_once = futures::future::join_all((0..5).map(|_| listed_over_http(app, "alice"))).await;
    assert!(at_once.iter().all(|catalog| tools(catalog) == expected_tools("tok-alice")));
    assert_eq!((lists_with(&server, Some("tok-alice")), lists_with(&server, None)), (1, 1));
    // Within the TTL, no MCP request at all, whichever door.
    assert_eq!(tools(&listed_over_amqp(app, "alice").await), expected_tools("tok-alice"));
    assert_eq!(server.tool_lists().len(), 2, "the second request made no MCP request");
    // Another user has lists of their own; the public server's is shared.
    assert_eq!(tools(&listed_over_http(app, "bob").await), expected_tools("tok-bob"));
    assert_eq!((lists_with(&server, Some("tok-bob")), lists_with(&server, None)), (1, 1));

    // Alice disconnects: at once she is not connected (her token is read on every request).
    assert_eq!(app.disconnect("alice").await, 204);
    let gone = listed_over_http(app, "alice").await;
    assert_eq!(gone["unavailable"][0]["error"]["code"], "not_connected", "{gone}");
    // She connects again, with another token. Her list was dropped on the disconnect event, so
    // she is listed again, with the new token; without the event, her old list (and her old
    // token's tool) would be served until the TTL.
    app.store_token("alice", "tok-alice-2").await;
    wait_until("alice is listed again after the disconnect event", || async {
        tools(&listed_over_http(app, "alice").await) == expected_tools("tok-alice-2")
    })
    .await;
    assert_eq!(lists_with(&server, Some("tok-alice-2")), 1);
    assert_eq!(lists_with(&server, Some("tok-bob")), 1, "bob's list was not dropped");
    assert_eq!(tools(&listed_over_http(app, "bob").await), expected_tools("tok-bob"));
    assert_eq!(lists_with(&server, Some("tok-bob")), 1);

    let metrics = reqwest::get(format!("{}/metrics", app.api)).await.unwrap().text().await.unwrap();
    let sample = |name: &str| {
        let line = metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}:\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    assert!(sample(r#"mcp_worker_catalog_cache_total{result="hit"}"#) >= 8.0, "{metrics}");
    assert!(sample(r#"mcp_worker_catalog_cache_total{result="miss"}"#) >= 3.0, "{metrics}");
    assert!(sample(r#"mcp_worker_catalog_requests_total{via="http",outcome="complete"}"#) >= 7.0);
    assert!(sample(r#"mcp_worker_catalog_requests_total{via="http",outcome="partial"}"#) >= 1.0);
    assert_eq!(sample(r#"mcp_worker_catalog_requests_total{via="amqp",outcome="complete"}"#), 1.0);
    assert!(sample(r#"mcp_worker_mcp_list_duration_seconds_count{server="qlik",outcome="ok"}"#) >= 3.0);
    fx.app.stop().await;
}

#[tokio::test]
async fn a_servers_ttl_ms_shorter_than_the_configured_ttl_wins() {
    // The server says its lists are fresh for 1.5 s; the worker would keep them 300 s.
    let flags = ["--list-ttl-ms", "1500"];
    let server = McpServer::spawn_with(Flavor::V2Json, McpServer::reserve_port(), &flags).await;
    let app = spawn_app_with(&server.url(), &[("catalog.ttl_secs", json!(300))]).await;
    app.store_token("alice", "tok-alice").await;

    listed_over_http(&app, "alice").await;
    assert_eq!(lists_with(&server, Some("tok-alice")), 1);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    listed_over_http(&app, "alice").await;
    assert_eq!(lists_with(&server, Some("tok-alice")), 2, "the list was stale after the server's ttlMs");
    app.stop().await;
}

#[tokio::test]
async fn a_list_the_server_marks_public_is_shared_but_only_with_users_who_may_list() {
    let flags = ["--list-ttl-ms", "60000", "--list-scope", "public"];
    let server = McpServer::spawn_with(Flavor::V2Json, McpServer::reserve_port(), &flags).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "tok-alice").await;
    app.store_token("bob", "tok-bob").await;

    let alice = listed_over_http(&app, "alice").await;
    let bob = listed_over_http(&app, "bob").await;
    // The server said the list is the same for every authorization: bob is given alice's, as it
    // was listed (this test server lies about that, which is how the sharing shows).
    assert_eq!(bob, alice);
    assert_eq!((lists_with(&server, Some("tok-alice")), lists_with(&server, Some("tok-bob"))), (1, 0));
    // A user who may not list the server is not given its shared list.
    let carol = listed_over_http(&app, "carol").await;
    let servers: BTreeSet<String> = tools(&carol).into_iter().map(|(server, _)| server).collect();
    assert_eq!(servers, BTreeSet::from(["plain".to_owned()]), "{carol}");
    assert_eq!(carol["unavailable"][0]["error"]["code"], "not_connected");
    app.stop().await;
}

#[tokio::test]
async fn a_token_too_short_for_the_listing_is_a_reason_not_a_wait() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = spawn_app(&server.url()).await;
    // Valid for another 20 s: less than the call timeout (10 s here) plus the clock skew (30 s).
    app.store_tokens("alice", "tok-short", "refresh-short", chrono::Utc::now() + chrono::Duration::seconds(20)).await;
    let catalog = listed_over_amqp(&app, "alice").await;
    assert_eq!(tools(&catalog), named("plain", &["echo", "count_job", "sleep"]), "{catalog}");
    let reason = &catalog["unavailable"][0];
    assert_eq!((&reason["server"], &reason["error"]["code"]), (&json!("qlik"), &json!("token_unavailable")));
    assert_eq!((&reason["error"]["retryable"], &reason["error"]["provider"]), (&json!(true), &json!("qlik")));
    assert_eq!(lists_with(&server, Some("tok-short")), 0, "the short token was not used");
    app.stop().await;
}

#[tokio::test]
async fn bad_catalog_requests_are_refused_clearly() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = spawn_app(&server.url()).await;
    let client = reqwest::Client::new();
    let url = |query: &str| format!("{}/v1/tools{query}", app.api);
    let without_key = client.get(url("?user_id=alice")).send().await.unwrap();
    assert_eq!(without_key.status(), 401);
    for (query, status) in
        [("", 400), ("?user_id=", 400), ("?user_id=%20", 400), (&format!("?user_id={}", "u".repeat(256)), 400)]
    {
        let answer = client.get(url(query)).bearer_auth(SERVICE_KEY).send().await.unwrap();
        assert_eq!(answer.status(), status, "{query}");
        let body: Value = answer.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("user_id"), "{body}");
    }
    // A listing whose deadline has passed is answered at once, like a call.
    let job =
        json!({ "job_id": "late", "user_id": "alice", "method": "tools/list", "deadline": "2020-01-01T00:00:00Z" });
    app.publish(&serde_json::to_vec(&job).unwrap(), None).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "deadline_exceeded", "{reply}");
    assert!(server.tool_lists().is_empty(), "nothing was listed");
    app.stop().await;
}
