//! Codes, grants and tokens.
//!
//! A grant is what one user's consent produced. Authorization codes are single-use
//! (RFC 6749 4.1.2): any attempt consumes the code, and replaying a consumed code
//! revokes the grant issued from it. Refresh tokens rotate on every use (RFC 9700
//! 4.14.2): a grant has exactly one current refresh token, and presenting one it
//! replaced means two parties hold it, so the whole grant is revoked and every access
//! and refresh token of it stops working. Access tokens stay valid across rotations
//! until they expire, are revoked, or their grant is.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::OAuthError;
use crate::{ErrorStyle, Stats};

type GrantId = u64;

/// 256 random bits, base64url: opaque tokens and codes.
pub(crate) fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// What an authorization code is bound to.
pub(crate) struct Code {
    pub client_id: String,
    pub redirect_uri: String,
    pub code_challenge: String,
    pub scope: String,
    pub user: String,
    pub expires_at: Instant,
    pub consumed: bool,
    /// The grant issued from this code, revoked if the code is replayed.
    pub grant: Option<GrantId>,
}

struct Grant {
    client_id: String,
    user: String,
    scope: String,
    revoked: bool,
    /// Every other refresh token of this grant is a used one.
    current_refresh_token: Option<String>,
}

struct AccessToken {
    grant: GrantId,
    scope: String,
    expires_at: Instant,
    exp_unix: u64,
    revoked: bool,
}

pub(crate) struct Injection {
    pub remaining: usize,
    pub status: u16,
    pub error: String,
}

/// A successful token response (RFC 6749 5.1).
#[derive(Debug, Serialize)]
pub(crate) struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    pub scope: String,
}

/// An introspection response (RFC 7662 2.2): inactive tokens reveal nothing else.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Introspection {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_type: Option<&'static str>,
}

pub(crate) struct State {
    pub started: Instant,
    pub stats: Stats,
    pub injection: Option<Injection>,
    pub codes: HashMap<String, Code>,
    grants: HashMap<GrantId, Grant>,
    access_tokens: HashMap<String, AccessToken>,
    /// Every refresh token ever issued, current or used, to tell reuse from garbage.
    refresh_tokens: HashMap<String, GrantId>,
    next_grant: GrantId,
}

impl Default for State {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            stats: Stats::default(),
            injection: None,
            codes: HashMap::new(),
            grants: HashMap::new(),
            access_tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            next_grant: 0,
        }
    }
}

fn has_scope(scope: &str, wanted: &str) -> bool {
    scope.split_whitespace().any(|s| s == wanted)
}

/// RFC 7636 4.1 syntax, then 4.6: BASE64URL-NOPAD(SHA256(verifier)) == challenge.
fn verifier_matches(verifier: &str, challenge: &str) -> Result<(), &'static str> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    if !(43..=128).contains(&verifier.len()) || !verifier.bytes().all(unreserved) {
        return Err("code_verifier must be 43-128 characters of [A-Za-z0-9-._~]");
    }
    if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier)) != challenge {
        return Err("code_verifier does not match the code_challenge");
    }
    Ok(())
}

impl State {
    pub fn new_grant(
        &mut self,
        client_id: &str,
        user: &str,
        scope: &str,
        with_refresh_token: bool,
        access_ttl: Duration,
    ) -> (GrantId, TokenResponse) {
        let id = self.next_grant;
        self.next_grant += 1;
        let refresh_token = with_refresh_token.then(random_token);
        if let Some(rt) = &refresh_token {
            self.refresh_tokens.insert(rt.clone(), id);
        }
        self.grants.insert(
            id,
            Grant {
                client_id: client_id.into(),
                user: user.into(),
                scope: scope.into(),
                revoked: false,
                current_refresh_token: refresh_token.clone(),
            },
        );
        let (access_token, expires_in) = self.new_access_token(id, scope, access_ttl);
        (id, TokenResponse { access_token, token_type: "Bearer", expires_in, refresh_token, scope: scope.into() })
    }

    fn new_access_token(&mut self, grant: GrantId, scope: &str, ttl: Duration) -> (String, u64) {
        let token = random_token();
        let exp_unix = (SystemTime::now() + ttl).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let expires_at = Instant::now() + ttl;
        self.access_tokens
            .insert(token.clone(), AccessToken { grant, scope: scope.into(), expires_at, exp_unix, revoked: false });
        (token, ttl.as_secs())
    }

    /// RFC 6749 4.1.3 + RFC 7636 4.6.
    pub fn exchange_code(
        &mut self,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
        access_ttl: Duration,
    ) -> Result<TokenResponse, OAuthError> {
        let Some(entry) = self.codes.get_mut(code) else {
            return Err(OAuthError::invalid_grant("unknown authorization code"));
        };
        if entry.consumed {
            if let Some(grant) = entry.grant {
                tracing::warn!(grant, "authorization code replayed: revoking its grant");
                self.revoke_grant(grant);
            }
            return Err(OAuthError::invalid_grant("authorization code was already used"));
        }
        // Single use means single attempt: a failed exchange burns the code too.
        entry.consumed = true;
        if Instant::now() >= entry.expires_at {
            return Err(OAuthError::invalid_grant("authorization code expired"));
        }
        if entry.client_id != client_id {
            return Err(OAuthError::invalid_grant("authorization code was issued to another client"));
        }
        if entry.redirect_uri != redirect_uri {
            return Err(OAuthError::invalid_grant("redirect_uri differs from the authorization request"));
        }
        verifier_matches(verifier, &entry.code_challenge).map_err(OAuthError::invalid_grant)?;
        let (user, scope) = (entry.user.clone(), entry.scope.clone());
        // Like Qlik Cloud: refresh tokens only for offline access.
        let (grant, response) =
            self.new_grant(client_id, &user, &scope, has_scope(&scope, "offline_access"), access_ttl);
        if let Some(entry) = self.codes.get_mut(code) {
            entry.grant = Some(grant);
        }
        Ok(response)
    }

    /// RFC 6749 6 with rotation and reuse detection.
    pub fn refresh(
        &mut self,
        client_id: &str,
        refresh_token: &str,
        scope: Option<&str>,
        access_ttl: Duration,
        style: ErrorStyle,
    ) -> Result<TokenResponse, OAuthError> {
        let rejected = |description: &str| {
            let mut error = OAuthError::invalid_grant(description);
            if style == ErrorStyle::Qlik {
                error.status = StatusCode::UNAUTHORIZED;
            }
            error
        };
        let Some(&id) = self.refresh_tokens.get(refresh_token) else {
            return Err(rejected("unknown refresh token"));
        };
        let grant = &self.grants[&id];
        if grant.current_refresh_token.as_deref() != Some(refresh_token) {
            self.stats.refresh_token_reuse += 1;
            tracing::warn!(grant = id, user = %grant.user, "used refresh token presented: revoking its grant");
            self.revoke_grant(id);
            return Err(rejected("refresh token was already used; the grant is revoked"));
        }
        if grant.revoked {
            return Err(rejected("refresh token revoked"));
        }
        if grant.client_id != client_id {
            return Err(rejected("refresh token was issued to another client"));
        }
        // RFC 6749 6: the requested scope must not include any scope not originally granted.
        let scope = match scope {
            Some(requested) => {
                if let Some(extra) = requested.split_whitespace().find(|s| !has_scope(&grant.scope, s)) {
                    return Err(OAuthError::invalid_scope(format!("scope {extra} was not granted")));
                }
                requested.to_owned()
            }
            None => grant.scope.clone(),
        };
        let new_refresh_token = random_token();
        self.refresh_tokens.insert(new_refresh_token.clone(), id);
        if let Some(grant) = self.grants.get_mut(&id) {
            grant.current_refresh_token = Some(new_refresh_token.clone());
        }
        let (access_token, expires_in) = self.new_access_token(id, &scope, access_ttl);
        self.stats.refresh_successes += 1;
        Ok(TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in,
            refresh_token: Some(new_refresh_token),
            scope,
        })
    }

    fn revoke_grant(&mut self, id: GrantId) {
        if let Some(grant) = self.grants.get_mut(&id).filter(|g| !g.revoked) {
            grant.revoked = true;
            self.stats.grants_revoked += 1;
        }
    }

    /// RFC 7009 2.1: a refresh token takes its grant with it; an access token goes alone.
    /// Unknown tokens are ignored (2.2).
    pub fn revoke_token(&mut self, token: &str) {
        if let Some(&id) = self.refresh_tokens.get(token) {
            self.revoke_grant(id);
        } else if let Some(at) = self.access_tokens.get_mut(token) {
            at.revoked = true;
        }
    }

    fn grant_live(&self, id: GrantId) -> bool {
        self.grants.get(&id).is_some_and(|g| !g.revoked)
    }

    pub fn access_token_active(&self, token: &str) -> bool {
        self.access_tokens
            .get(token)
            .is_some_and(|at| !at.revoked && Instant::now() < at.expires_at && self.grant_live(at.grant))
    }

    pub fn refresh_token_active(&self, token: &str) -> bool {
        self.refresh_tokens
            .get(token)
            .is_some_and(|id| self.grant_live(*id) && self.grants[id].current_refresh_token.as_deref() == Some(token))
    }

    pub fn introspect(&self, token: &str) -> Introspection {
        if self.access_token_active(token) {
            let at = &self.access_tokens[token];
            let grant = &self.grants[&at.grant];
            return Introspection {
                active: true,
                username: Some(grant.user.clone()),
                exp: Some(at.exp_unix),
                scope: Some(at.scope.clone()),
                client_id: Some(grant.client_id.clone()),
                token_type: Some("access_token"),
            };
        }
        if self.refresh_token_active(token) {
            let grant = &self.grants[&self.refresh_tokens[token]];
            return Introspection {
                active: true,
                username: Some(grant.user.clone()),
                exp: None, // refresh tokens live as long as their grant
                scope: Some(grant.scope.clone()),
                client_id: Some(grant.client_id.clone()),
                token_type: Some("refresh_token"),
            };
        }
        Introspection::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7636_appendix_b_example() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(verifier_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"), Ok(()));
        assert!(verifier_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN").is_err());
        assert!(verifier_matches("short", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM").is_err());
    }

    #[test]
    fn zero_ttl_access_token_is_born_expired() {
        let mut state = State::default();
        let (_, issued) = state.new_grant("c", "u", "offline_access", true, Duration::ZERO);
        assert_eq!(issued.expires_in, 0);
        assert!(!state.access_token_active(&issued.access_token));
        assert!(state.refresh_token_active(issued.refresh_token.as_deref().unwrap()));
    }

    #[test]
    fn scope_cannot_widen_on_refresh() {
        let mut state = State::default();
        let (_, issued) = state.new_grant("c", "u", "user_default offline_access", true, Duration::from_secs(60));
        let rt = issued.refresh_token.unwrap();
        let err = state.refresh("c", &rt, Some("admin"), Duration::from_secs(60), ErrorStyle::Rfc).unwrap_err();
        assert_eq!(err.error, "invalid_scope");
        // The rejected request did not rotate the token.
        let narrowed = state.refresh("c", &rt, Some("user_default"), Duration::from_secs(60), ErrorStyle::Rfc).unwrap();
        assert_eq!(narrowed.scope, "user_default");
    }
}
