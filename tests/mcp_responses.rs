//! Property test of the MCP response path: whatever a server answers to `tools/call`, in JSON or
//! SSE framing, the client returns a result or an error within its timeout and nothing panics
//! (not even in a task rmcp spawned, which a plain test would not notice).
//!
//! The server is a few lines of axum that speak just enough MCP (a legacy `initialize`
//! handshake) and then answer each `tools/call` with the response under test. It is its own
//! test binary because it installs a process-wide panic hook.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use figment::providers::Serialized;
use mcp_worker::config::Settings;
use mcp_worker::mcp::{McpCallError, McpClients, McpLimits};
use mcp_worker::registry::Registry;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// One answer to a `tools/call`. `{id}` in the body becomes the request's JSON-RPC id.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Fake {
    next: Mutex<Option<Answer>>,
    tool_calls: AtomicUsize,
}

async fn mcp(State(fake): State<Arc<Fake>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let id = request["id"].clone();
    let reply = |result: Value| axum::Json(json!({ "jsonrpc": "2.0", "id": id, "result": result })).into_response();
    match request["method"].as_str().unwrap_or_default() {
        // A correlated "method not found" marks a legacy server: rmcp falls back to `initialize`.
        "server/discover" => axum::Json(json!({
            "jsonrpc": "2.0", "id": id, "error": { "code": -32601, "message": "Method not found" }
        }))
        .into_response(),
        "initialize" => reply(json!({
            "protocolVersion": "2025-06-18",
            "capabilities": { "tools": {} },
            "serverInfo": { "name": "fake", "version": "0" },
        })),
        "tools/call" => {
            fake.tool_calls.fetch_add(1, Ordering::SeqCst);
            let answer = fake.next.lock().unwrap().clone().expect("an answer is set before each call");
            let body = String::from_utf8_lossy(&answer.body).replace("{id}", &id.to_string());
            let mut response = (StatusCode::from_u16(answer.status).unwrap(), body).into_response();
            match answer.content_type {
                Some(content_type) => {
                    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type))
                }
                None => response.headers_mut().remove(header::CONTENT_TYPE),
            };
            response
        }
        // Notifications (`notifications/initialized`) are accepted without a body.
        _ if request.get("id").is_none() => StatusCode::ACCEPTED.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn spawn_fake() -> (SocketAddr, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    // A GET (a client opening a standalone SSE stream) is not served: 405, as the spec allows.
    let app = axum::Router::new().route("/mcp", post(mcp)).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, fake)
}

fn clients(addr: SocketAddr) -> McpClients {
    let figment = Settings::figment(None, std::path::Path::new("config")).unwrap().merge(Serialized::default(
        "mcp.servers",
        json!({ "fake": { "url": format!("http://{addr}/mcp"), "tools": ["echo"] } }),
    ));
    let settings = Settings::from_figment(figment).unwrap();
    let registry = Registry::from_settings(&settings.mcp).unwrap();
    let mut limits = McpLimits::from_settings(&settings.mcp, 8);
    limits.connect_timeout = Duration::from_secs(2);
    McpClients::new(&registry, &limits, Default::default()).unwrap()
}

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A JSON-RPC message that may or may not be a good answer: a result of any shape (sometimes a
/// CallToolResult's), an error, the right id or another one.
fn envelope() -> impl Strategy<Value = String> {
    let result = prop_oneof![
        json_value(),
        json_value().prop_map(|v| json!({ "content": [{ "type": "text", "text": v.to_string() }], "isError": false })),
        (json_value(), json_value())
            .prop_map(|(content, structured)| json!({ "content": content, "structuredContent": structured })),
    ];
    let id =
        prop_oneof![Just("{id}".to_owned()), Just("\"other\"".to_owned()), any::<i32>().prop_map(|n| n.to_string())];
    prop_oneof![
        (id.clone(), result).prop_map(|(id, result)| format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)),
        (id, any::<i32>(), ".{0,16}", json_value()).prop_map(|(id, code, message, data)| {
            let error = json!({ "code": code, "message": message, "data": data });
            format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{error}}}"#)
        }),
        json_value().prop_map(|v| v.to_string()),
    ]
}

/// SSE framing around messages: comments, event names, ids, retry fields, data split across
/// lines, any line ending, and possibly cut off anywhere.
fn sse() -> impl Strategy<Value = Vec<u8>> {
    let line_end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
    let field = prop_oneof![
        envelope().prop_map(|m| format!("data: {m}")),
        (envelope(), 1usize..6).prop_map(|(m, parts)| {
            let step = m.len().div_ceil(parts).max(1);
            let chars: Vec<char> = m.chars().collect();
            chars.chunks(step).map(|c| format!("data:{}", c.iter().collect::<String>())).collect::<Vec<_>>().join("\n")
        }),
        ".{0,10}".prop_map(|c| format!(": {c}")),
        prop_oneof![Just("message"), Just("ping"), Just("")].prop_map(|e| format!("event: {e}")),
        "[0-9a-z]{0,6}".prop_map(|i| format!("id: {i}")),
        "[0-9x]{0,4}".prop_map(|r| format!("retry: {r}")),
        ".{0,20}",
        Just(String::new()),
    ];
    (prop::collection::vec((field, line_end), 0..8), any::<prop::sample::Index>(), any::<bool>()).prop_map(
        |(lines, cut, truncate)| {
            let mut bytes: Vec<u8> = lines.into_iter().flat_map(|(l, end)| format!("{l}{end}").into_bytes()).collect();
            if truncate && !bytes.is_empty() {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes
        },
    )
}

fn answer() -> impl Strategy<Value = Answer> {
    let status = prop_oneof![
        6 => Just(200u16),
        1 => prop::sample::select(vec![202u16, 204, 400, 401, 403, 404, 406, 429, 500, 502, 503]),
    ];
    let json_body = prop_oneof![envelope().prop_map(String::into_bytes), prop::collection::vec(any::<u8>(), 0..256)];
    prop_oneof![
        (status.clone(), json_body).prop_map(|(status, body)| Answer {
            status,
            content_type: Some("application/json"),
            body
        }),
        (status.clone(), sse()).prop_map(|(status, body)| Answer {
            status,
            content_type: Some("text/event-stream"),
            body
        }),
        (status, prop::collection::vec(any::<u8>(), 0..256), prop::sample::select(vec![None, Some("text/plain")]))
            .prop_map(|(status, body, content_type)| Answer { status, content_type, body }),
    ]
}

const CALL_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn any_answer_to_tools_call_gives_a_result_or_an_error_in_time_and_never_a_panic() {
    let panics = Arc::new(AtomicUsize::new(0));
    let default_hook = std::panic::take_hook();
    let counter = panics.clone();
    std::panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (addr, fake) = runtime.block_on(spawn_fake());
    let clients = clients(addr);
    let client = clients.get("fake").unwrap();
    let call = |answer: Answer| {
        *fake.next.lock().unwrap() = Some(answer);
        runtime.block_on(async {
            // The call's own timeout must end it; this outer one only keeps a broken client from
            // hanging the test.
            tokio::time::timeout(CALL_TIMEOUT * 4, client.call_tool("echo", Default::default(), None, CALL_TIMEOUT))
                .await
                .map(|called| called.map(|called| called.result))
        })
    };

    // First, good answers in both framings work: the fake speaks enough MCP for the cases below
    // to reach the response path.
    let good = r#"{"jsonrpc":"2.0","id":{id},"result":{"content":[{"type":"text","text":"hi"}],"isError":false}}"#;
    let json_answer = Answer { status: 200, content_type: Some("application/json"), body: good.into() };
    let sse_answer = Answer {
        status: 200,
        content_type: Some("text/event-stream"),
        body: format!("event: message\ndata: {good}\n\n").into(),
    };
    for answer in [json_answer, sse_answer] {
        let result = call(answer).expect("the call ends").expect("a good answer is a result");
        assert_eq!(result["content"][0]["text"], "hi");
    }

    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let before = fake.tool_calls.load(Ordering::SeqCst);
    let errors = Mutex::new(std::collections::BTreeMap::<&'static str, usize>::new());
    runner
        .run(&answer(), |answer| {
            let outcome = call(answer);
            prop_assert!(outcome.is_ok(), "the call did not end within its timeout");
            let kind = match outcome.unwrap() {
                Ok(_) => "result",
                Err(McpCallError::Unavailable { .. }) => "unavailable",
                Err(McpCallError::Timeout { .. }) => "timeout",
                Err(McpCallError::Rpc { .. }) => "rpc",
                Err(McpCallError::Unauthorized { .. }) => "unauthorized",
                Err(McpCallError::Forbidden { .. }) => "forbidden",
                Err(McpCallError::Protocol { .. }) => "protocol",
                Err(McpCallError::Redirected { .. }) => "redirected",
                Err(McpCallError::OverBudget { .. }) => "over budget",
            };
            *errors.lock().unwrap().entry(kind).or_default() += 1;
            prop_assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
            Ok(())
        })
        .unwrap();
    let reached = fake.tool_calls.load(Ordering::SeqCst) - before;
    eprintln!("{cases} answers, {reached} reached tools/call: {:?}", errors.lock().unwrap());
    // Most cases must really exercise the response path, not a failed handshake.
    assert!(reached >= cases as usize / 2, "only {reached} of {cases} cases reached tools/call");
}
