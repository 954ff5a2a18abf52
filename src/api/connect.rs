//! The connect flow: authorize (internal) → the provider's login → callback (public).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{ApiState, page, problem};
use crate::messages::TokenEventKind;
use crate::oauth::FailureKind;
use crate::store::PendingConnect;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthorizeBody {
    user_id: String,
    #[serde(default)]
    return_to: Option<String>,
}

#[derive(Serialize)]
pub(super) struct AuthorizeResponse {
    authorize_url: String,
    expires_at: chrono::DateTime<Utc>,
}

/// `POST /v1/connections/{provider}/authorize`: starts a flow for a user.
#[tracing::instrument(skip_all)]
pub(super) async fn authorize(
    State(api): State<Arc<ApiState>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Result<Json<AuthorizeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (provider, client) = match api.internal(&headers, &provider) {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Json(body) = match body {
        Ok(body) => body,
        Err(e) => return problem(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    if body.user_id.trim().is_empty() || body.user_id.len() > crate::job::MAX_ID_LEN {
        return problem(StatusCode::BAD_REQUEST, "`user_id` must be 1 to 255 bytes");
    }
    if let Some(return_to) = &body.return_to
        && !allowed_return_to(&api.return_to_allowlist, return_to)
    {
        return problem(StatusCode::BAD_REQUEST, "`return_to` is not in http.return_to_allowlist");
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let state = URL_SAFE_NO_PAD.encode(bytes);
    let request = client.authorize_url(&state);
    let now = Utc::now();
    let pending = PendingConnect {
        provider,
        user_id: body.user_id,
        pkce_verifier: request.pkce_verifier,
        return_to: body.return_to,
        expires_at: crate::dates::after(now, api.state_ttl),
    };
    if let Err(e) = api.store.states(&api.cipher).save(&state, &pending, now).await {
        tracing::warn!(error = %e, "could not store a connect flow");
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable");
    }
    Json(AuthorizeResponse { authorize_url: request.url, expires_at: pending.expires_at }).into_response()
}

/// A `return_to` is allowed when an allow-list entry has its scheme, host and port and a path
/// that prefixes its path. Comparing parsed URLs, not strings, keeps
/// `https://app.example.com.evil.test/` from passing as `https://app.example.com`.
fn allowed_return_to(allowlist: &[reqwest::Url], candidate: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(candidate) else { return false };
    allowlist.iter().any(|allowed| {
        allowed.scheme() == url.scheme()
            && allowed.host_str() == url.host_str()
            && allowed.port_or_known_default() == url.port_or_known_default()
            && url.path().starts_with(allowed.path())
    })
}

/// `GET /v1/connections/{provider}/callback`: where the provider sends the browser back.
#[tracing::instrument(skip_all)]
pub(super) async fn callback(
    State(api): State<Arc<ApiState>>,
    Path(provider): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (provider, client) = match api.client(&provider) {
        Ok(found) => found,
        Err(_) => return page(StatusCode::NOT_FOUND, "Unknown provider", "This connection does not exist."),
    };
    let Some(state) = query.get("state") else {
        return page(
            StatusCode::BAD_REQUEST,
            "Connection failed",
            "The request has no state. Start again from the chat.",
        );
    };
    let now = Utc::now();
    let pending = match api.store.states(&api.cipher).take(state, provider, now).await {
        Ok(Some(pending)) => pending,
        Ok(None) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Connection failed",
                "This sign-in link is unknown, expired or was already used. Start again from the chat.",
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not read a connect flow");
            return page(StatusCode::SERVICE_UNAVAILABLE, "Connection failed", "Please try again in a moment.");
        }
    };
    if query.contains_key("error") {
        return page(StatusCode::BAD_REQUEST, "Connection cancelled", "Access was not granted. Nothing was stored.");
    }
    let Some(code) = query.get("code") else {
        return page(StatusCode::BAD_REQUEST, "Connection failed", "The provider sent no authorization code.");
    };
    let tokens = match client.exchange_code(code, &pending.pkce_verifier, Utc::now()).await {
        Ok(tokens) => tokens,
        Err(e) if e.kind == FailureKind::UnusableToken => {
            tracing::error!(error = %e, "code exchange answered with an unusable token; nothing stored");
            return page(
                StatusCode::BAD_REQUEST,
                "Connection failed",
                "The provider returned an unusable token. Nothing was stored. Start again from the chat, or ask your administrator.",
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "code exchange failed");
            return page(
                StatusCode::BAD_REQUEST,
                "Connection failed",
                "The provider did not accept the sign-in. Start again from the chat.",
            );
        }
    };
    if let Err(e) = api.store.tokens(provider, &api.cipher).save(&pending.user_id, &tokens, Utc::now()).await {
        tracing::warn!(error = %e, "could not store tokens");
        return page(StatusCode::SERVICE_UNAVAILABLE, "Connection failed", "Please try again in a moment.");
    }
    api.events.emit(TokenEventKind::Connected, provider, &pending.user_id, "connect flow completed").await;
    let target = pending.return_to.unwrap_or_else(|| api.default_return_to.clone());
    let location = match reqwest::Url::parse(&target) {
        Ok(mut url) => {
            url.query_pairs_mut().append_pair("provider", provider.as_str()).append_pair("status", "connected");
            url.to_string()
        }
        Err(_) => target,
    };
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

/// `GET /v1/connected`: the default landing page after a successful connect.
pub(super) async fn landing() -> Response {
    page(StatusCode::OK, "Connected", "You can close this window and go back to the chat.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_must_match_an_allowed_origin_and_path_prefix() {
        let allow = vec![reqwest::Url::parse("https://app.example.com/chat/").unwrap()];
        assert!(allowed_return_to(&allow, "https://app.example.com/chat/done?x=1"));
        assert!(!allowed_return_to(&allow, "https://app.example.com.evil.test/chat/"));
        assert!(!allowed_return_to(&allow, "http://app.example.com/chat/"));
        assert!(!allowed_return_to(&allow, "https://app.example.com:8443/chat/"));
        assert!(!allowed_return_to(&allow, "https://app.example.com/other"));
        assert!(!allowed_return_to(&allow, "not a url"));
        assert!(!allowed_return_to(&[], "https://app.example.com/chat/"));
    }
}
