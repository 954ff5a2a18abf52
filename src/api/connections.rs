//! A user's connection: its status, and disconnecting it.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiState, problem};
use crate::messages::{ConnectionStatus, TokenEventKind};

/// `GET /v1/connections/{provider}/{user_id}`: never includes a token value.
#[tracing::instrument(skip_all)]
pub(super) async fn status(
    State(api): State<Arc<ApiState>>,
    Path((provider, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (provider, _) = match api.internal(&headers, &provider) {
        Ok(found) => found,
        Err(response) => return response,
    };
    match ConnectionStatus::of(api.store.tokens(provider, &api.cipher).get(&user_id).await) {
        Ok(status) => Json(status).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "could not read a connection");
            problem(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable")
        }
    }
}

/// `DELETE /v1/connections/{provider}/{user_id}`: revokes at the provider (best effort), deletes,
/// and answers 204 whether or not anything was stored.
#[tracing::instrument(skip_all)]
pub(super) async fn disconnect(
    State(api): State<Arc<ApiState>>,
    Path((provider, user_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (provider, client) = match api.internal(&headers, &provider) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let tokens = api.store.tokens(provider, &api.cipher);
    let stored = match tokens.get(&user_id).await {
        Ok(stored) => stored,
        Err(e) => {
            // Unreadable (e.g. a retired key): nothing to revoke with, but still delete.
            tracing::warn!(error = %e, "could not read the tokens to revoke; deleting them anyway");
            None
        }
    };
    if let Some(stored) = &stored
        && let Err(e) = client.revoke(&stored.refresh_token).await
    {
        tracing::warn!(error = %e, revocation_failed = true, "revocation failed; deleting the tokens anyway");
    }
    match tokens.delete(&user_id).await {
        Ok(true) => api.events.emit(TokenEventKind::Disconnected, provider, &user_id, "disconnected").await,
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not delete tokens");
            return problem(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable");
        }
    }
    StatusCode::NO_CONTENT.into_response()
}
