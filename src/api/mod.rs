//! The HTTP API (axum): the OAuth connect flow, disconnect, connection status and the users' tool
//! catalogs (the `api` role), and on every process health, readiness and the Prometheus metrics.
//!
//! Internal endpoints (called by the chat backend) require `Authorization: Bearer <http.service_key>`,
//! compared in constant time; the callback is public because the user's browser lands on it.

mod connect;
mod connections;
mod health;
mod listener;
mod metrics;
mod tools;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::crypto::TokenCipher;
use crate::events::Events;
use crate::oauth::OAuthClient;
use crate::provider::Provider;
use crate::queue::Broker;
use crate::secret::Secret;
use crate::store::Store;
pub(crate) use connect::sweep_unconfirmed;
pub(crate) use listener::Limits;

/// What the handlers share.
pub(crate) struct ApiState {
    pub(crate) store: Store,
    pub(crate) cipher: Arc<TokenCipher>,
    pub(crate) oauth: HashMap<Provider, Arc<OAuthClient>>,
    pub(crate) events: Events,
    pub(crate) broker: Broker,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) service_key: Secret<String>,
    pub(crate) default_return_to: String,
    pub(crate) return_to_allowlist: Vec<reqwest::Url>,
    pub(crate) state_ttl: std::time::Duration,
    /// Whether a finished flow waits for the chat backend's confirmation (`http.confirm_connections`).
    pub(crate) confirm_connections: bool,
    /// The tool catalog, on a process that runs the worker or the API role.
    pub(crate) catalog: Option<Arc<Catalog>>,
    /// How long one server's listing may take (`mcp.call_timeout_ms`).
    pub(crate) call_timeout: std::time::Duration,
}

/// The routes: health, readiness and metrics always; the connection endpoints when
/// `connections` (the `api` role).
pub(crate) fn router(state: Arc<ApiState>, connections: bool) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(health::alive))
        .route("/readyz", get(health::ready))
        .route("/metrics", get(metrics::render));
    if connections {
        router = router
            .route("/v1/connections/{provider}/authorize", post(connect::authorize))
            .route("/v1/connections/{provider}/callback", get(connect::callback))
            .route("/v1/connections/{provider}/confirm", post(connect::confirm))
            // The user in the query reaches every id; the path form stays for v1 callers (see
            // `connections::Named` for the ids it cannot reach).
            .route("/v1/connections/{provider}", get(connections::status).delete(connections::disconnect))
            .route("/v1/connections/{provider}/{user_id}", get(connections::status).delete(connections::disconnect))
            .route("/v1/connected", get(connect::landing))
            .route("/v1/tools", get(tools::list));
    }
    router.with_state(state)
}

/// Serves the routes on `listener` within `limits` until `shutdown`; see [`listener`].
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    connections: bool,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    listener::serve(listener, router(state, connections), limits, shutdown).await
}

impl ApiState {
    /// Whether the request carries the service key. An empty configured key admits nobody.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let expected = self.service_key.expose().as_bytes();
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::as_bytes);
        match presented {
            Some(presented) if !expected.is_empty() => bool::from(presented.ct_eq(expected)),
            _ => false,
        }
    }

    /// The checks every internal endpoint starts with: the service key, then the provider named in
    /// the path. Returns the provider and its client, or the response that refuses the request.
    #[allow(clippy::result_large_err)]
    fn internal(&self, headers: &HeaderMap, provider: &str) -> Result<(Provider, &Arc<OAuthClient>), Response> {
        if !self.authorized(headers) {
            return Err(unauthorized());
        }
        self.client(provider)
    }

    /// The provider named in the path and its client, or the response that refuses the request.
    // The error is a finished HTTP response, built at most once per request: its size is moot.
    #[allow(clippy::result_large_err)]
    fn client(&self, provider: &str) -> Result<(Provider, &Arc<OAuthClient>), Response> {
        let provider = match provider {
            "qlik" => Provider::Qlik,
            _ => return Err(problem(StatusCode::NOT_FOUND, "unknown provider")),
        };
        self.oauth
            .get(&provider)
            .map(|client| (provider, client))
            .ok_or_else(|| problem(StatusCode::NOT_FOUND, "this provider is not configured"))
    }
}

/// A JSON error body for the internal endpoints: `{"error": "..."}`.
fn problem(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({ "error": "missing or wrong service key" })),
    )
        .into_response()
}

/// A small HTML page for the browser-facing endpoints. `message` is one of our own fixed texts.
fn page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{message}</p></body></html>"
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(body)).into_response()
}
