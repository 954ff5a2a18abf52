//! The connect flow: authorize (internal) → the provider's login → callback (public) → confirm
//! (internal, unless `http.confirm_connections` is off). See `store::pending` for why a finished
//! flow waits for the chat backend's confirmation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{ApiState, page, problem};
use crate::messages::TokenEventKind;
use crate::oauth::{FailureKind, OAuthClient};
use crate::provider::Provider;
use crate::store::{HeldConnection, PendingConnect};

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
    body: Result<Json<AuthorizeBody>, JsonRejection>,
) -> Response {
    let (provider, client, body) = match internal_body(&api, &headers, &provider, body) {
        Ok(checked) => checked,
        Err(response) => return response,
    };
    if body.user_id.trim().is_empty() || body.user_id.len() > crate::job::MAX_ID_LEN {
        return problem(StatusCode::BAD_REQUEST, "`user_id` must be 1 to 255 bytes");
    }
    if let Some(return_to) = &body.return_to
        && !allowed_return_to(&api.return_to_allowlist, return_to)
    {
        return problem(StatusCode::BAD_REQUEST, "`return_to` is not in http.return_to_allowlist");
    }
    let state = random_token();
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

/// The checks an internal POST with a JSON body starts with: the service key and the provider
/// ([`ApiState::internal`]), then the body, refused with serde's words for what is wrong.
#[allow(clippy::result_large_err)]
fn internal_body<'a, T>(
    api: &'a ApiState,
    headers: &HeaderMap,
    provider: &str,
    body: Result<Json<T>, JsonRejection>,
) -> Result<(Provider, &'a Arc<OAuthClient>, T), Response> {
    let (provider, client) = api.internal(headers, provider)?;
    match body {
        Ok(Json(body)) => Ok((provider, client, body)),
        Err(e) => Err(problem(StatusCode::BAD_REQUEST, &e.body_text())),
    }
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
    let mut landing = vec![("provider", provider.as_str().to_owned())];
    if api.confirm_connections {
        let code = random_token();
        let held = HeldConnection { provider, user_id: pending.user_id, tokens };
        let now = Utc::now();
        let confirm_by = crate::dates::after(now, api.state_ttl);
        if let Err(e) = api.store.pending(&api.cipher).hold(&code, &held, confirm_by, now).await {
            tracing::warn!(error = %e, "could not hold the tokens of a finished flow");
            revoke_unused(client, &held, "the flow could not be held").await;
            return page(StatusCode::SERVICE_UNAVAILABLE, "Connection failed", "Please try again in a moment.");
        }
        landing.extend([("status", "pending".to_owned()), ("connect_code", code)]);
    } else {
        if let Err(e) = api.store.tokens(provider, &api.cipher).save(&pending.user_id, &tokens, Utc::now()).await {
            tracing::warn!(error = %e, "could not store tokens");
            return page(StatusCode::SERVICE_UNAVAILABLE, "Connection failed", "Please try again in a moment.");
        }
        api.events.emit(TokenEventKind::Connected, provider, &pending.user_id, "connect flow completed").await;
        landing.push(("status", "connected".to_owned()));
    }
    let target = pending.return_to.unwrap_or_else(|| api.default_return_to.clone());
    let location = match reqwest::Url::parse(&target) {
        Ok(mut url) => {
            url.query_pairs_mut().extend_pairs(&landing);
            url.to_string()
        }
        Err(_) => target,
    };
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfirmBody {
    user_id: String,
    connect_code: String,
}

/// `POST /v1/connections/{provider}/confirm`: the chat backend, for the user logged in to the
/// session the browser came back to, turns a finished flow into a connection. A code that is
/// unknown, expired or used is refused. A code of a flow started for another user is refused
/// too, and that flow's grant revoked at once: someone else started it and got this user to
/// finish it.
#[tracing::instrument(skip_all)]
pub(super) async fn confirm(
    State(api): State<Arc<ApiState>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ConfirmBody>, JsonRejection>,
) -> Response {
    let (provider, client, body) = match internal_body(&api, &headers, &provider, body) {
        Ok(checked) => checked,
        Err(response) => return response,
    };
    let unknown = "unknown, expired or already used connect_code";
    if !api.confirm_connections {
        return problem(StatusCode::BAD_REQUEST, "connections need no confirmation here (http.confirm_connections)");
    }
    // Bounded before it is hashed and looked up: the codes this service hands out are 43 bytes.
    if body.connect_code.is_empty() || body.connect_code.len() > 128 {
        return problem(StatusCode::BAD_REQUEST, unknown);
    }
    let held = match api.store.pending(&api.cipher).take(&body.connect_code, provider, Utc::now()).await {
        Ok(Some(held)) => held,
        Ok(None) => return problem(StatusCode::BAD_REQUEST, unknown),
        Err(e) => {
            tracing::warn!(error = %e, "could not read a finished flow");
            return problem(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable");
        }
    };
    if held.user_id != body.user_id {
        tracing::warn!("a finished flow was confirmed for another user than it was started for; its grant is revoked");
        revoke_unused(client, &held, "confirmed for another user").await;
        return problem(
            StatusCode::BAD_REQUEST,
            "this connect_code was not issued for this user: the connection is refused and its grant revoked",
        );
    }
    if let Err(e) = api.store.tokens(provider, &api.cipher).save(&held.user_id, &held.tokens, Utc::now()).await {
        tracing::warn!(error = %e, "could not store tokens");
        revoke_unused(client, &held, "the tokens could not be stored").await;
        return problem(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable");
    }
    api.events.emit(TokenEventKind::Connected, provider, &held.user_id, "connect flow confirmed").await;
    StatusCode::NO_CONTENT.into_response()
}

/// Revokes the grant of a finished flow that will not become a connection (best effort: a
/// failure is logged; the provider's own expiry ends the grant eventually).
async fn revoke_unused(client: &OAuthClient, held: &HeldConnection, why: &str) {
    match client.revoke(&held.tokens.refresh_token).await {
        Ok(()) => tracing::info!(why, "the grant of an unconfirmed connect flow was revoked"),
        Err(e) => tracing::warn!(error = %e, why, "could not revoke the grant of an unconfirmed connect flow"),
    }
}

/// Drops finished flows nobody confirmed in time, revoking each one's grant, until `shutdown`.
/// Several API replicas may sweep at once: each flow is taken by one.
pub(crate) async fn sweep_unconfirmed(api: Arc<ApiState>, shutdown: CancellationToken) {
    let every = api.state_ttl.clamp(Duration::from_secs(1), Duration::from_secs(30));
    let pending = api.store.pending(&api.cipher);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            match pending.take_expired(Utc::now()).await {
                Ok(Some(held)) => match api.oauth.get(&held.provider) {
                    Some(client) => revoke_unused(client, &held, "not confirmed in time").await,
                    None => tracing::warn!("an unconfirmed flow's provider is no longer configured; dropped unrevoked"),
                },
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not sweep unconfirmed connect flows; trying again later");
                    break;
                }
            }
        }
    }
}

/// 32 random bytes, URL-safe base64: a state or a connect code.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `GET /v1/connected`: the default landing page after a successful connect. A pending flow is
/// not a connection yet: the chat must confirm it, so the page says to go back there.
pub(super) async fn landing(Query(query): Query<HashMap<String, String>>) -> Response {
    if query.get("status").is_some_and(|status| status == "pending") {
        return page(StatusCode::OK, "Signed in", "Go back to the chat to finish connecting.");
    }
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
