//! Token revocation (RFC 7009) and introspection (RFC 7662), both for the
//! authenticated client. Revoking a refresh token revokes its whole grant (RFC 7009
//! 2.1 allows it, and it is what a disconnect means); revoking an unknown or already
//! revoked token succeeds (2.2), so clients may retry revocation blindly.
//! `token_type_hint` is accepted and ignored: both token kinds are searched anyway.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::OAuthServer;
use crate::error::no_store_json;
use crate::request::authenticated_form;

pub(crate) async fn revoke(State(server): State<OAuthServer>, headers: HeaderMap, body: Bytes) -> Response {
    let mut state = server.lock();
    state.stats.revocation_requests += 1;
    let result = authenticated_form(&server.config, &headers, &body)
        .and_then(|(params, _client)| params.require("token").map(|token| state.revoke_token(token)));
    match result {
        Ok(()) => StatusCode::OK.into_response(),
        Err(error) => error.into_response(),
    }
}

pub(crate) async fn introspect(State(server): State<OAuthServer>, headers: HeaderMap, body: Bytes) -> Response {
    let state = server.lock();
    let result = authenticated_form(&server.config, &headers, &body)
        .and_then(|(params, _client)| params.require("token").map(|token| state.introspect(token)));
    match result {
        Ok(introspection) => no_store_json(StatusCode::OK, &introspection),
        Err(error) => error.into_response(),
    }
}
