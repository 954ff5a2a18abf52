//! The worker against the official MCP Python SDK's servers in each mode it ships: `mcp<2`
//! FastMCP and `mcp>=2` MCPServer (protocol 2026-07-28), each answering in JSON and in SSE.

use serde_json::{Value, json};

use crate::support::{Flavor, McpServer, spawn_app};

async fn the_reply_carries_the_token_the_server_saw(flavor: Flavor) {
    let server = McpServer::spawn(flavor).await;
    let app = spawn_app(&server.url()).await;
    let token = format!("token-for-{flavor:?}");
    app.store_token("alice", &token).await;

    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, correlation) = app.next_reply().await;

    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["job_id"], "job-1");
    assert_eq!(correlation.as_deref(), Some("corr-job-1"));
    assert_ne!(reply["result"]["isError"], true, "{reply}");
    let text = reply["result"]["content"][0]["text"].as_str().expect("a text content block");
    let seen: Value = serde_json::from_str(text).unwrap();
    assert_eq!(seen["token"], token.as_str(), "the MCP server saw another token");

    let requests = server.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.path, "/mcp", "a request outside the MCP endpoint: {request:?}");
        assert_eq!(request.method, "POST", "{request:?}");
        let accept = request.accept.as_deref().unwrap_or_default();
        assert!(accept.contains("application/json") && accept.contains("text/event-stream"), "{request:?}");
        // Only the tool call carries the user's token; handshakes carry nobody's.
        let expected = (request.mcp_method.as_deref() == Some("tools/call")).then_some(token.as_str());
        assert_eq!(request.x_qlik_access_token.as_deref(), expected, "{request:?}");
    }
    assert_eq!(server.tool_calls().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn fastmcp_v1_json_responses() {
    the_reply_carries_the_token_the_server_saw(Flavor::V1Json).await;
}

#[tokio::test]
async fn fastmcp_v1_sse_responses() {
    the_reply_carries_the_token_the_server_saw(Flavor::V1Sse).await;
}

#[tokio::test]
async fn mcpserver_v2_json_responses() {
    the_reply_carries_the_token_the_server_saw(Flavor::V2Json).await;
}

#[tokio::test]
async fn mcpserver_v2_sse_responses() {
    the_reply_carries_the_token_the_server_saw(Flavor::V2Sse).await;
}

#[tokio::test]
async fn one_client_serves_many_users_each_call_with_its_own_token() {
    let server = McpServer::spawn(Flavor::V2Sse).await;
    let app = spawn_app(&server.url()).await;
    for user in 0..20 {
        app.store_token(&format!("user-{user}"), &format!("token-{user}")).await;
    }
    for user in 0..20 {
        app.call(&format!("job-{user}"), &format!("user-{user}"), "qlik_whoami", json!({})).await;
    }
    for _ in 0..20 {
        let (reply, _) = app.next_reply().await;
        let job = reply["job_id"].as_str().unwrap();
        let user = job.strip_prefix("job-").unwrap();
        let seen: Value = serde_json::from_str(reply["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
        assert_eq!(seen["token"], format!("token-{user}"), "job {job} ran with another user's token");
    }
    app.stop().await;
}
