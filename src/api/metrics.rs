//! `GET /metrics`: the process's Prometheus metrics (see [`crate::metrics`]). Public like the
//! probes, since a scraper sits beside them; the metrics carry counts, never user ids or tokens.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::ApiState;

pub(super) async fn render(State(api): State<Arc<ApiState>>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], api.metrics.render()).into_response()
}
