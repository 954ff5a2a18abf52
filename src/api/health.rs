//! `GET /healthz` (the process answers) and `GET /readyz` (it can do its work: MongoDB answers a
//! ping and the AMQP connection is up). Public, and they reveal nothing but up or down.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::ApiState;

/// How long readiness waits for MongoDB before calling it unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn alive() -> Response {
    Json(json!({ "status": "alive" })).into_response()
}

pub(super) async fn ready(State(api): State<Arc<ApiState>>) -> Response {
    let database = matches!(tokio::time::timeout(PING_TIMEOUT, api.store.ping()).await, Ok(Ok(())));
    let broker = api.broker.is_connected();
    let status = if database && broker { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": database && broker, "database": database, "broker": broker }))).into_response()
}
