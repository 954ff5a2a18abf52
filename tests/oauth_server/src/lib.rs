//! A strict OAuth 2.0 authorization server for mcp-worker's tests and local demo.
//!
//! It implements the authorization-code grant (RFC 6749 4.1) with mandatory PKCE S256
//! (RFC 7636), refresh-token rotation with reuse detection (OAuth 2.0 Security BCP,
//! RFC 9700 4.14.2: presenting an already-used refresh token revokes the whole grant),
//! token revocation (RFC 7009) and introspection (RFC 7662). It is deliberately
//! unforgiving, so that client bugs (lost rotations, racing refreshes, retried codes)
//! show up as failures instead of being papered over.
//!
//! Endpoints:
//! - `GET /authorize`: validates the request and answers an HTML login page whose form
//!   POSTs to `/login` with the hidden fields `response_type`, `client_id`,
//!   `redirect_uri`, `scope`, `state`, `code_challenge` and `code_challenge_method`
//!   (copied from the query), a `username` text input, and two submit buttons named
//!   `decision` with values `allow` / `deny`. Tests may POST those fields directly.
//! - `POST /login`: redirects (302) to `redirect_uri?code=..&state=..` or `?error=access_denied`.
//! - `POST /token`, `POST /revoke`, `POST /introspect`: client authentication by
//!   `client_secret_basic` or `client_secret_post`.
//! - `GET /_test/stats`: [`Stats`] as JSON.

mod authorize;
mod error;
mod grants;
mod request;
mod revoke;
mod token;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use grants::State;

/// How the server configures its single confidential client and its behaviour.
#[derive(Clone, Debug)]
pub struct Config {
    pub client_id: String,
    pub client_secret: String,
    /// Exact-match allow-list (RFC 6749 3.1.2.2; no prefix or pattern matching).
    pub redirect_uris: Vec<String>,
    /// `expires_in` of access tokens issued by `/token`.
    pub access_token_ttl: Duration,
    pub code_ttl: Duration,
    pub error_style: ErrorStyle,
    /// Usernames accepted by the login form; empty = any non-empty username.
    pub users: Vec<String>,
    /// How long a successful refresh is answered after the refresh token was rotated: a slow
    /// provider, or a slow network on the way back.
    pub refresh_answer_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            client_id: "mcp-worker".into(),
            client_secret: "test-secret".into(),
            redirect_uris: Vec::new(),
            access_token_ttl: Duration::from_secs(3600),
            code_ttl: Duration::from_secs(60),
            error_style: ErrorStyle::Rfc,
            users: Vec::new(),
            refresh_answer_delay: Duration::ZERO,
        }
    }
}

/// How a rejected refresh token is answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorStyle {
    /// RFC 6749 5.2: HTTP 400 `invalid_grant`.
    #[default]
    Rfc,
    /// Like Qlik Cloud: HTTP 401 (body still `{"error":"invalid_grant",..}`).
    Qlik,
}

/// Counters of what clients did, for assertions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    /// `GET /authorize` requests.
    pub authorize_requests: u64,
    /// `authorization_code` grant requests received, failed ones included.
    pub code_exchanges: u64,
    /// `refresh_token` grant requests received, failed ones (even injected failures) included.
    pub refresh_requests: u64,
    pub refresh_successes: u64,
    /// Already-used refresh tokens presented.
    pub refresh_token_reuse: u64,
    /// Grants revoked, whatever the reason (reuse, code replay, `/revoke`).
    pub grants_revoked: u64,
    /// `/revoke` requests received.
    pub revocation_requests: u64,
    /// `/token` requests answered by [`OAuthServer::fail_next_token_requests`].
    pub failed_by_injection: u64,
    /// Milliseconds since server start of each `refresh_token` grant request.
    pub refresh_request_times_ms: Vec<u64>,
}

/// The first tokens of a grant created by [`OAuthServer::issue_grant`].
#[derive(Clone, Debug)]
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in_secs: u64,
}

/// The server: cheap to clone, all clones share the same state.
#[derive(Clone)]
pub struct OAuthServer {
    config: Arc<Config>,
    state: Arc<Mutex<State>>,
}

impl OAuthServer {
    pub fn new(config: Config) -> Self {
        Self { config: Arc::new(config), state: Arc::new(Mutex::new(State::default())) }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/authorize", get(authorize::authorize))
            .route("/login", post(authorize::login))
            .route("/token", post(token::token))
            .route("/revoke", post(revoke::revoke))
            .route("/introspect", post(revoke::introspect))
            .route("/_test/stats", get(|AxumState(s): AxumState<Self>| async move { Json(s.stats()) }))
            .with_state(self.clone())
    }

    /// Binds 127.0.0.1 on an ephemeral port, serves in a spawned task and returns the
    /// base URL `http://127.0.0.1:PORT`.
    pub async fn spawn(config: Config) -> (Self, String) {
        Self::spawn_on(config, 0).await.expect("bind 127.0.0.1:0 for oauth-test-server")
    }

    /// Like [`Self::spawn`] on a given port (e.g. to restart a server at the same URL).
    pub async fn spawn_on(config: Config, port: u16) -> std::io::Result<(Self, String)> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = Self::new(config);
        tokio::spawn(server.clone().serve(listener));
        Ok((server, url))
    }

    pub async fn serve(self, listener: tokio::net::TcpListener) {
        // axum::serve only returns once the listener is gone; nothing to recover then.
        if let Err(e) = axum::serve(listener, self.router()).await {
            tracing::error!(error = %e, "oauth-test-server stopped");
        }
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// The next `count` requests to `/token` (any grant) fail with `status` and body
    /// `{"error": error}` before any other processing, so they consume no code and
    /// rotate no token. 429 and 503 also carry `Retry-After: 1`.
    pub fn fail_next_token_requests(&self, count: usize, status: u16, error: &str) {
        self.lock().injection =
            (count > 0).then(|| grants::Injection { remaining: count, status, error: error.into() });
    }

    /// Creates a grant for `user` as if they had consented, returning its first tokens.
    /// A refresh token is issued whatever the scope (unlike `/token`, which requires
    /// `offline_access`), since seeding users for the refresher is the point.
    pub fn issue_grant(&self, user: &str, scope: &str, expires_in: Duration) -> IssuedTokens {
        let (_, issued) = self.lock().new_grant(&self.config.client_id, user, scope, true, expires_in);
        IssuedTokens {
            access_token: issued.access_token,
            refresh_token: issued.refresh_token.unwrap_or_default(),
            expires_in_secs: issued.expires_in,
        }
    }

    /// Not expired, not revoked, and its grant not revoked.
    pub fn access_token_active(&self, access_token: &str) -> bool {
        self.lock().access_token_active(access_token)
    }

    /// The grant's current (unused) refresh token, and the grant not revoked.
    pub fn refresh_token_active(&self, refresh_token: &str) -> bool {
        self.lock().refresh_token_active(refresh_token)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A handler never panics while holding the lock, but a poisoned test server
        // should keep answering rather than cascade panics into every later test.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
