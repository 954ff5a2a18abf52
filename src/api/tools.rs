//! `GET /v1/tools?user_id=…`: the user's tool catalog, the same body a `tools/list` job's reply
//! carries as its `result` (see [`crate::catalog`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiState, problem, unauthorized};
use crate::catalog::Via;
use crate::worker::policy::CallBudget;

#[derive(serde::Deserialize)]
pub(super) struct UserQuery {
    user_id: String,
}

/// Answers 200 with the catalog whatever the servers said: a server that could not be listed is
/// named in its `unavailable`, not an HTTP error. Each server is listed within `mcp.call_timeout_ms`.
#[tracing::instrument(skip_all)]
pub(super) async fn list(
    State(api): State<Arc<ApiState>>,
    query: Result<Query<UserQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if !api.authorized(&headers) {
        return unauthorized();
    }
    let Ok(Query(UserQuery { user_id })) = query else {
        return problem(StatusCode::BAD_REQUEST, "the user_id query parameter is required");
    };
    if !crate::job::usable_id(&user_id) {
        return problem(StatusCode::BAD_REQUEST, "user_id must be 1 to 255 bytes and not blank");
    }
    let Some(catalog) = &api.catalog else {
        return problem(StatusCode::NOT_FOUND, "this process serves no tool catalog");
    };
    let budget = CallBudget { timeout: api.call_timeout, limited_by_deadline: false };
    let answer = catalog.list(&user_id, budget, Via::Http).await;
    // One user's tools: no shared cache may keep them.
    ([(header::CACHE_CONTROL, "no-store")], Json(answer)).into_response()
}
