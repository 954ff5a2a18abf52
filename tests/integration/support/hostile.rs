//! Hostile peers for the security tests: an HTTP server that records everything it receives and
//! answers as the test says, so one kind serves as "somewhere else" (a host that must never see a
//! token or secret) and as a misbehaving MCP server or OAuth provider (redirecting, lying).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// The whole request as text (request line, headers, body), for "does it contain X" checks.
    pub fn text(&self) -> String {
        let mut text = format!("{} {}\n", self.method, self.uri);
        for (name, value) in &self.headers {
            text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
        }
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(&self.body));
        text
    }
}

type Respond = Arc<dyn Fn(&Received) -> Response + Send + Sync>;

#[derive(Clone)]
struct Shared {
    received: Arc<Mutex<Vec<Received>>>,
    respond: Respond,
}

/// A recording HTTP server on loopback; stops when dropped.
pub struct Recorder {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Answers every request with `respond(request)`.
    pub async fn spawn(respond: impl Fn(&Received) -> Response + Send + Sync + 'static) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared { received: received.clone(), respond: Arc::new(respond) };
        let app = Router::new().fallback(record).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { base, received, task }
    }

    /// "Somewhere else": a host that answers 200 `{}` to anything and must receive nothing secret.
    pub async fn elsewhere() -> Self {
        Self::spawn(|_| {
            Response::builder().status(200).header("content-type", "application/json").body(Body::from("{}")).unwrap()
        })
        .await
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
    let received = Received { method: parts.method, uri: parts.uri, headers: parts.headers, body };
    let response = (shared.respond)(&received);
    shared.received.lock().unwrap().push(received);
    response
}

/// An OAuth provider answered by `respond`: a [`Recorder`] standing in for the token, revoke and
/// authorize endpoints (`/token`, `/revoke`, `/authorize`), and the settings that make a worker
/// use it as the Qlik provider, with its API on a port chosen here and registered as the callback.
pub async fn hostile_provider(
    respond: impl Fn(&Received) -> Response + Send + Sync + 'static,
) -> (Recorder, Vec<(&'static str, serde_json::Value)>) {
    use serde_json::json;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let provider = Recorder::spawn(respond).await;
    let base = provider.base.clone();
    let settings = vec![
        ("http.listen", json!(format!("127.0.0.1:{port}"))),
        ("providers.qlik.client_id", json!("hostile-client")),
        ("providers.qlik.client_secret", json!(HOSTILE_CLIENT_SECRET)),
        ("providers.qlik.authorize_url", json!(format!("{base}/authorize"))),
        ("providers.qlik.token_url", json!(format!("{base}/token"))),
        ("providers.qlik.revoke_url", json!(format!("{base}/revoke"))),
        ("providers.qlik.redirect_uri", json!(format!("http://127.0.0.1:{port}/v1/connections/qlik/callback"))),
        ("providers.qlik.rate_limit_per_minute", json!(60_000)),
    ];
    (provider, settings)
}

/// The client secret [`hostile_provider`] configures, to look for where it must not be.
pub const HOSTILE_CLIENT_SECRET: &str = "hostile-test-client-secret";

/// A JSON answer.
pub fn json_response(status: u16, body: &serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

impl Recorder {
    /// A hostile MCP server: speaks just enough MCP (a legacy `initialize` handshake, so rmcp
    /// falls back from `server/discover`), and answers each `tools/call` and `tools/list` with
    /// `on_call(request, its JSON-RPC body)`.
    pub async fn mcp(on_call: impl Fn(&Received, &serde_json::Value) -> Response + Send + Sync + 'static) -> Self {
        Self::spawn(move |request| {
            let Ok(message) = serde_json::from_slice::<serde_json::Value>(&request.body) else {
                return Response::builder().status(400).body(Body::empty()).unwrap();
            };
            let id = message["id"].clone();
            let json = |body: serde_json::Value| {
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap()
            };
            match message["method"].as_str().unwrap_or_default() {
                "server/discover" => json(serde_json::json!({
                    "jsonrpc": "2.0", "id": id, "error": { "code": -32601, "message": "Method not found" }
                })),
                "initialize" => json(serde_json::json!({ "jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": { "tools": {} },
                    "serverInfo": { "name": "hostile", "version": "0" },
                }})),
                "tools/call" | "tools/list" => on_call(request, &message),
                _ if message.get("id").is_none() => Response::builder().status(202).body(Body::empty()).unwrap(),
                _ => Response::builder().status(404).body(Body::empty()).unwrap(),
            }
        })
        .await
    }
}

/// A `status` redirect to `to` (an absolute URL).
pub fn redirect(status: u16, to: &str) -> Response {
    Response::builder().status(status).header("location", to).body(Body::empty()).unwrap()
}

/// Whether a response declares its length up front.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Declared,
    Chunked,
}

/// A JSON-RPC result answering the request `id` with one text block of `size` bytes, sent in two
/// halves `pause` apart, so a client holds the first half while it waits for the second; with
/// or without a Content-Length.
pub fn slow_large_result(id: &serde_json::Value, size: usize, pause: std::time::Duration, length: Length) -> Response {
    let body = serde_json::json!({ "jsonrpc": "2.0", "id": id, "result": {
        "content": [{ "type": "text", "text": "x".repeat(size) }],
    }})
    .to_string()
    .into_bytes();
    let total = body.len();
    let second = Bytes::from(body[total / 2..].to_vec());
    let first = Bytes::from(body[..total / 2].to_vec());
    let halves = futures::stream::iter([(first, Duration::ZERO), (second, pause)]).then(|(half, pause)| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::io::Error>(half)
    });
    let mut response = Response::builder().status(200).header("content-type", "application/json");
    if length == Length::Declared {
        response = response.header("content-length", total);
    }
    response.body(Body::from_stream(halves)).unwrap()
}
