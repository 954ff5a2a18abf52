//! A user's connection: its status, and disconnecting it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiState, problem};
use crate::messages::{ConnectionStatus, TokenEventKind};

/// The connection a request names: the provider from the path, the user from the `user_id`
/// query parameter (`/v1/connections/{provider}?user_id=…`, which any id fits), or, for v1
/// callers, from the path (`/v1/connections/{provider}/{user_id}`, where an id that is a route
/// word, `callback` or `authorize`, reaches that route instead, and `.` or `..` no route at all:
/// URL parsers resolve them as dot-segments, even percent-encoded).
pub(super) struct Named {
    provider: String,
    user_id: String,
}

#[derive(serde::Deserialize)]
struct UserQuery {
    user_id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Named {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let Path(mut params) = Path::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let provider = params.remove("provider").unwrap_or_default();
        let user_id = match params.remove("user_id") {
            Some(user_id) => user_id,
            None => match Query::<UserQuery>::from_request_parts(parts, state).await {
                Ok(Query(query)) => query.user_id,
                Err(_) => return Err(problem(StatusCode::BAD_REQUEST, "the user_id query parameter is required")),
            },
        };
        if !crate::job::usable_id(&user_id) {
            return Err(problem(StatusCode::BAD_REQUEST, "user_id must be 1 to 255 bytes and not blank"));
        }
        Ok(Self { provider, user_id })
    }
}

/// `GET /v1/connections/{provider}?user_id=…` (or v1's `/{provider}/{user_id}`): never includes a
/// token value.
#[tracing::instrument(skip_all)]
pub(super) async fn status(
    State(api): State<Arc<ApiState>>,
    Named { provider, user_id }: Named,
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

/// `DELETE /v1/connections/{provider}?user_id=…` (or v1's `/{provider}/{user_id}`): revokes at the
/// provider (best effort), deletes, and answers 204 whether or not anything was stored.
#[tracing::instrument(skip_all)]
pub(super) async fn disconnect(
    State(api): State<Arc<ApiState>>,
    Named { provider, user_id }: Named,
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
