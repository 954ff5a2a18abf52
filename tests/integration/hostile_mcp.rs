//! Hostile MCP servers: a redirect never takes a request (let alone a token) to another origin,
//! and many large answers at once stay within the process's response budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use mcp_worker::mcp::{McpCallError, McpClients, McpLimits};
use mcp_worker::registry::Registry;
use serde_json::{Value, json};

use crate::support::hostile::{Length, Recorder, redirect, slow_large_result};
use crate::support::{TestApp, spawn_app_with, test_settings};

const REDIRECTS: [u16; 5] = [301, 302, 303, 307, 308];

/// A worker whose `qlik` server takes the token in `X-Qlik-Access-Token` and whose `bearer`
/// server (the same URL) in `Authorization: Bearer {token}`, with alice connected.
async fn app_with_both_headers(url: &str, token: &str) -> TestApp {
    let bearer = json!({
        "url": url,
        "tools": ["bearer_echo"],
        "auth": { "provider": "qlik", "header": "Authorization", "value": "Bearer {token}" },
    });
    // No retries: a redirect is not retryable, and an unavailable answer would be a failure here.
    let app = spawn_app_with(url, &[("mcp.servers.bearer", bearer), ("worker.retry_delays_ms", json!([]))]).await;
    app.store_token("alice", token).await;
    app
}

/// Runs a job for each redirect status and each credential header, and checks its reply names
/// the redirect, while `elsewhere` received nothing at all.
async fn each_redirect_is_refused(app: &TestApp, elsewhere: &Recorder, status_now: &AtomicU16) {
    for status in REDIRECTS {
        status_now.store(status, Ordering::SeqCst);
        for tool in ["qlik_echo", "bearer_echo"] {
            let job = format!("{tool}-{status}");
            app.call(&job, "alice", tool, json!({ "status": status })).await;
            let (reply, _) = app.next_reply().await;
            assert_eq!(reply["job_id"], job.as_str(), "{reply}");
            assert_eq!(reply["status"], "error", "{status} {tool}: {reply}");
            assert_eq!(reply["error"]["code"], "mcp_protocol_error", "{status} {tool}: {reply}");
            assert_eq!(reply["error"]["retryable"], false, "{reply}");
            let message = reply["error"]["message"].as_str().unwrap();
            assert!(
                message.contains(&format!("HTTP {status}")) && message.contains("redirects are not followed"),
                "{message}"
            );
            assert!(
                elsewhere.received().is_empty(),
                "{status} {tool}: the other origin received {:?}",
                elsewhere.received()
            );
        }
    }
}

#[tokio::test]
async fn a_redirect_answering_tools_call_is_refused_and_the_other_origin_receives_nothing() {
    let elsewhere = Recorder::elsewhere().await;
    let target = format!("{}/mcp", elsewhere.base);
    let server = Recorder::mcp(move |_, call: &Value| {
        let status = call["params"]["arguments"]["status"].as_u64().unwrap() as u16;
        redirect(status, &target)
    })
    .await;
    let token = "hostile-call-token";
    let app = app_with_both_headers(&format!("{}/mcp", server.base), token).await;

    each_redirect_is_refused(&app, &elsewhere, &AtomicU16::new(0)).await;

    // The hostile server itself got the calls, each with its token in the configured header.
    let calls: Vec<_> = server.received().into_iter().filter(|r| r.text().contains("tools/call")).collect();
    assert_eq!(calls.len(), REDIRECTS.len() * 2);
    assert!(calls.iter().all(|r| r.text().contains(token)));
    app.stop().await;
}

#[tokio::test]
async fn a_redirect_answering_the_handshake_is_refused_and_the_other_origin_receives_nothing() {
    let elsewhere = Recorder::elsewhere().await;
    let target = format!("{}/mcp", elsewhere.base);
    let status_now = Arc::new(AtomicU16::new(307));
    let server = Recorder::spawn({
        let status_now = status_now.clone();
        move |_| redirect(status_now.load(Ordering::SeqCst), &target)
    })
    .await;
    let app = app_with_both_headers(&format!("{}/mcp", server.base), "hostile-handshake-token").await;

    each_redirect_is_refused(&app, &elsewhere, &status_now).await;

    // Every job met a failed handshake, so none got as far as a tools/call.
    assert!(server.received().iter().all(|r| !r.text().contains("tools/call")));
    app.stop().await;
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// MCP clients (no worker) for `server`, whose answers may hold `budget` bytes at once.
fn clients_with_budget(server: &Recorder, budget: u64) -> McpClients {
    let url = format!("{}/mcp", server.base);
    let overrides = [("mcp.max_response_bytes", json!(500_000)), ("mcp.response_budget_bytes", json!(budget))];
    let settings = test_settings(&url, &overrides);
    let registry = Registry::from_settings(&settings.mcp).unwrap();
    McpClients::new(&registry, &McpLimits::from_settings(&settings.mcp, 8), Default::default()).unwrap()
}

/// A result is about as large as the answer it was built from, and it lives on until its reply
/// is published: its answer's bytes stay held from the budget for as long as the caller keeps
/// the result's `held` bytes. Without that, the budget bounded only the answers being read, and
/// 64 finished 15 MiB results waiting to be published took 1 GiB past a 64 MiB budget
/// (PERFORMANCE.md). The worker keeps them until the reply is confirmed (`Worker::handle`).
#[tokio::test]
async fn a_result_holds_its_answer_bytes_from_the_budget_until_its_holder_lets_go() {
    const ANSWER: usize = 400_000;
    let server =
        Recorder::mcp(|_, call: &Value| slow_large_result(&call["id"], ANSWER, Duration::ZERO, Length::Declared)).await;
    let clients = clients_with_budget(&server, 500_000);
    let client = clients.get("plain").unwrap();
    let call = || client.call_tool("echo", Default::default(), None, Duration::from_millis(1_500));

    let first = call().await.expect("the first answer fits the budget");
    let refused = call().await.err().expect("no room for a second answer while the first result is held");
    assert!(matches!(refused, McpCallError::OverBudget { .. }), "{refused}");
    drop(first.held);
    let second = call().await.expect("the bytes came back once the first result was let go");
    assert_eq!(second.result["content"][0]["text"].as_str().unwrap().len(), ANSWER);
    assert_eq!(first.result["content"][0]["text"].as_str().unwrap().len(), ANSWER);
}

/// Answers that declare their length take all of it from the budget before they read a byte.
/// Taken chunk by chunk instead, four answers of half the budget each got their first halves
/// (the whole budget between them) and then all waited for room that only they could free,
/// until their timeouts ended every one (`bench/rss` saw it at scale: PERFORMANCE.md). Now two
/// read at once and the other two wait their turn.
#[tokio::test]
async fn answers_of_declared_length_wait_their_turn_instead_of_starving_each_other() {
    const ANSWER: usize = 470_000;
    let pause = Duration::from_millis(500);
    let server =
        Recorder::mcp(move |_, call: &Value| slow_large_result(&call["id"], ANSWER, pause, Length::Declared)).await;
    let clients = clients_with_budget(&server, 1_000_000);
    let client = clients.get("plain").unwrap();
    // Each caller lets go of its result at once, so the bytes go back as each call ends.
    let call = || async {
        let called = client.call_tool("echo", Default::default(), None, Duration::from_secs(4)).await;
        called.map(|called| called.result["content"][0]["text"].as_str().map(str::len))
    };
    let outcomes = futures::future::join_all((0..4).map(|_| call())).await;
    for outcome in outcomes {
        match outcome {
            Ok(length) => assert_eq!(length, Some(ANSWER)),
            Err(e) => panic!("every answer fits the budget in turn, but one failed: {e}"),
        }
    }
}

#[tokio::test]
async fn many_large_answers_at_once_stay_within_the_response_budget() {
    const ANSWER: usize = 400_000;
    const BUDGET: u64 = 1_000_000;
    const JOBS: usize = 12;
    let server = Recorder::mcp(|_, call: &Value| {
        slow_large_result(&call["id"], ANSWER, Duration::from_millis(300), Length::Chunked)
    })
    .await;
    let app = spawn_app_with(
        &format!("{}/mcp", server.base),
        &[
            ("mcp.max_response_bytes", json!(500_000)),
            ("mcp.response_budget_bytes", json!(BUDGET)),
            ("mcp.call_timeout_ms", json!(3_000)),
            ("worker.retry_delays_ms", json!([200, 400])),
        ],
    )
    .await;

    for n in 0..JOBS {
        app.call(&format!("big-{n}"), "nobody", "echo", json!({})).await;
    }
    let mut ok = 0;
    for _ in 0..JOBS {
        let (reply, _) = app.next_reply().await;
        if reply["status"] == "ok" {
            assert_eq!(reply["result"]["content"][0]["text"].as_str().unwrap().len(), ANSWER);
            ok += 1;
        } else {
            assert_eq!(reply["error"]["code"], "mcp_unavailable", "{reply}");
            assert!(reply["error"]["message"].as_str().unwrap().contains("mcp.response_budget_bytes"), "{reply}");
        }
    }
    assert!(ok > 0, "some answers fit in the budget");
    let metrics = reqwest::get(format!("{}/metrics", app.api)).await.unwrap().text().await.unwrap();
    let peak = metric(&metrics, "mcp_worker_mcp_response_bytes_peak");
    assert!(peak > ANSWER as u64, "answers were held at the same time (peak {peak})");
    assert!(peak <= BUDGET, "the bytes held at once ({peak}) passed the budget ({BUDGET})");
    assert_eq!(metric(&metrics, "mcp_worker_mcp_response_bytes "), 0, "every byte went back");
    app.stop().await;
}

/// A page of a tool list answering the JSON-RPC request `id`.
fn tool_page(id: &Value, tools: Value, next_cursor: Option<String>) -> axum::response::Response {
    let mut result = json!({ "tools": tools });
    if let Some(cursor) = next_cursor {
        result["nextCursor"] = json!(cursor);
    }
    crate::support::hostile::json_response(200, &json!({ "jsonrpc": "2.0", "id": id, "result": result }))
}

fn tool(name: &str, description: &str) -> Value {
    json!({ "name": name, "description": description, "inputSchema": { "type": "object" } })
}

/// Servers that abuse `tools/list`, each on its own path of one hostile server: one whose list
/// never ends, one that names the same cursor again, one whose pages add up to more than
/// `mcp.max_response_bytes`, and a token server that redirects the listing elsewhere. Each is
/// named unavailable with the reason, within bounds, and the one good server is still listed;
/// the redirect's target receives nothing.
#[tokio::test]
async fn hostile_tool_lists_are_cut_off_and_the_other_servers_are_still_listed() {
    let elsewhere = Recorder::elsewhere().await;
    let target = format!("{}/mcp", elsewhere.base);
    let server = Recorder::mcp(move |request, message: &Value| {
        let id = &message["id"];
        let page: u64 = message["params"]["cursor"]
            .as_str()
            .and_then(|c| c.strip_prefix('c'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        match request.uri.path() {
            "/good" => tool_page(id, json!([tool("echo", "fine")]), None),
            "/endless" => tool_page(id, json!([tool("endless_tool", "again")]), Some(format!("c{}", page + 1))),
            "/repeat" => tool_page(id, json!([tool("repeat_tool", "again")]), Some("c1".into())),
            "/long" => tool_page(id, json!([tool("long_tool", "again")]), Some("c".repeat(2000))),
            "/huge" => tool_page(id, json!([tool("huge_tool", &"x".repeat(20_000))]), Some(format!("c{}", page + 1))),
            _ => redirect(307, &target),
        }
    })
    .await;
    let at = |path: &str| format!("{}{path}", server.base);
    let overrides = [
        ("mcp.servers.plain", json!({ "url": at("/good"), "tools": ["echo"] })),
        ("mcp.servers.endless", json!({ "url": at("/endless"), "tool_prefix": "endless_" })),
        ("mcp.servers.repeat", json!({ "url": at("/repeat"), "tool_prefix": "repeat_" })),
        ("mcp.servers.huge", json!({ "url": at("/huge"), "tool_prefix": "huge_" })),
        ("mcp.servers.long", json!({ "url": at("/long"), "tool_prefix": "long_" })),
        ("mcp.max_response_bytes", json!(65_536)),
    ];
    let app = spawn_app_with(&at("/redirect"), &overrides).await;
    app.store_token("alice", "hostile-list-token").await;

    let url = reqwest::Url::parse_with_params(&format!("{}/v1/tools", app.api), [("user_id", "alice")]).unwrap();
    let answer = reqwest::Client::new().get(url).bearer_auth(crate::support::SERVICE_KEY).send().await.unwrap();
    let catalog: Value = answer.json().await.unwrap();
    assert_eq!(
        catalog["tools"],
        json!([{ "name": "echo", "description": "fine", "inputSchema": { "type": "object" }, "server": "plain" }])
    );
    let reasons: std::collections::BTreeMap<&str, (&str, &str)> = catalog["unavailable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["server"].as_str().unwrap(),
                (u["error"]["code"].as_str().unwrap(), u["error"]["message"].as_str().unwrap()),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 5, "{catalog:#}");
    assert!(reasons.values().all(|(code, _)| *code == "mcp_protocol_error"), "{catalog:#}");
    assert!(reasons["endless"].1.contains("after 100 pages"), "{catalog:#}");
    assert!(reasons["repeat"].1.contains("cursor it had named before"), "{catalog:#}");
    assert!(reasons["huge"].1.contains("larger than mcp.max_response_bytes"), "{catalog:#}");
    assert!(reasons["long"].1.contains("a cursor over 1024 bytes"), "{catalog:#}");
    assert!(reasons["qlik"].1.contains("redirects are not followed"), "{catalog:#}");

    let lists = |path: &str| {
        server.received().into_iter().filter(|r| r.uri.path() == path && r.text().contains("tools/list")).count()
    };
    assert_eq!((lists("/endless"), lists("/repeat"), lists("/huge"), lists("/long")), (100, 2, 4, 1), "bounded");
    assert!(elsewhere.received().is_empty(), "the redirect's target received {:?}", elsewhere.received());
    let redirected: Vec<_> = server.received().into_iter().filter(|r| r.uri.path() == "/redirect").collect();
    assert!(redirected.iter().any(|r| r.text().contains("hostile-list-token") && r.text().contains("tools/list")));
    app.stop().await;
}
