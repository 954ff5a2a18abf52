//! The token endpoint (RFC 6749 3.2): `authorization_code` (4.1.3, with the PKCE
//! check of RFC 7636 4.6) and `refresh_token` (6) grants for an authenticated
//! confidential client. Responses are JSON and never cached (5.1).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::OAuthServer;
use crate::error::{OAuthError, no_store_json};
use crate::grants::TokenResponse;
use crate::request::{Params, authenticated_form};

pub(crate) async fn token(State(server): State<OAuthServer>, headers: HeaderMap, body: Bytes) -> Response {
    let (response, rotated) = answer(&server, &headers, &body);
    // A slow provider's answer comes after it rotated the refresh token: a client that stops
    // waiting (or dies) now has lost the only live refresh token of the grant.
    if rotated && !server.config.refresh_answer_delay.is_zero() {
        tokio::time::sleep(server.config.refresh_answer_delay).await;
    }
    response
}

/// The answer to one token request, and whether it rotated a refresh token.
fn answer(server: &OAuthServer, headers: &HeaderMap, body: &Bytes) -> (Response, bool) {
    let mut state = server.lock();

    // Count refresh attempts before anything can reject them: rate-cap checks are about
    // what the client sent, not about what succeeded.
    let peek = Params::parse(body);
    let grant_type = peek.get("grant_type");
    if grant_type == Some("refresh_token") {
        state.stats.refresh_requests += 1;
        let since_start = state.started.elapsed().as_millis() as u64;
        state.stats.refresh_request_times_ms.push(since_start);
    } else if grant_type == Some("authorization_code") {
        state.stats.code_exchanges += 1;
    }

    if let Some(injection) = state.injection.as_mut() {
        injection.remaining -= 1;
        let status = StatusCode::from_u16(injection.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = no_store_json(status, &json!({ "error": injection.error }));
        if injection.remaining == 0 {
            state.injection = None;
        }
        state.stats.failed_by_injection += 1;
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return (response, false);
    }

    let config = &server.config;
    let result = authenticated_form(config, headers, body).and_then(|(params, client_id)| {
        let issued: TokenResponse = match params.require("grant_type")? {
            "authorization_code" => {
                let code = params.require("code")?;
                let redirect_uri = params.require("redirect_uri")?;
                let verifier = params.require("code_verifier")?;
                state.exchange_code(&client_id, code, redirect_uri, verifier, config.access_token_ttl)?
            }
            "refresh_token" => {
                let refresh_token = params.require("refresh_token")?;
                state.refresh(
                    &client_id,
                    refresh_token,
                    params.get("scope"),
                    config.access_token_ttl,
                    config.error_style,
                )?
            }
            other => {
                return Err(OAuthError::unsupported_grant_type(format!("grant_type {other} is not supported")));
            }
        };
        Ok(issued)
    });
    match result {
        Ok(issued) => (no_store_json(StatusCode::OK, &issued), grant_type == Some("refresh_token")),
        Err(error) => {
            tracing::debug!(error = error.error, description = %error.description, "token request rejected");
            (error.into_response(), false)
        }
    }
}
