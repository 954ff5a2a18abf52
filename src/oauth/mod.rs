//! OAuth 2.0 with a provider: the only module that speaks OAuth, on the `oauth2` crate.
//!
//! [`OAuthClient`] builds authorization URLs (PKCE S256, RFC 7636), exchanges codes and refresh
//! tokens (RFC 6749) and revokes refresh tokens (RFC 7009). HTTP goes through the service's own
//! reqwest client, which must not follow redirects (see `App::build`); the status code of a failed
//! request is kept so [`failure::classify`] can tell a dead grant from an outage. What a token
//! answer may contain is decided by [`accept`] before anything is returned to be stored.

pub mod accept;
mod answer;
pub(crate) mod failure;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::basic::{BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet, HttpRequest,
    HttpResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, TokenResponse, TokenUrl,
};

pub use accept::{TokenRules, UnusableToken};
use answer::TokenAnswer;
pub(crate) use failure::FailureKind;

use crate::config::{ClientAuth, ConfigError, ProviderSettings};
use crate::provider::Provider;
use crate::secret::Secret;
use crate::store::NewTokens;

/// `oauth2`'s basic client, but reading token answers as [`TokenAnswer`] (lenient `expires_in`).
type Client = oauth2::Client<
    BasicErrorResponse,
    TokenAnswer,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

#[derive(Debug, thiserror::Error)]
#[error("{provider} token endpoint: {detail}")]
pub(crate) struct OAuthError {
    pub(crate) provider: Provider,
    pub(crate) kind: FailureKind,
    /// For logs: the status and the RFC error code, never a token or the response body.
    pub(crate) detail: String,
}

/// An authorization URL and the PKCE verifier to keep until the callback.
pub(crate) struct AuthorizeRequest {
    pub(crate) url: String,
    pub(crate) pkce_verifier: Secret<String>,
}

pub(crate) struct OAuthClient {
    provider: Provider,
    client: Client,
    client_id: String,
    client_secret: Secret<String>,
    client_auth: ClientAuth,
    revoke_url: String,
    http: reqwest::Client,
    scopes: Vec<String>,
    rules: TokenRules,
    timeout: Duration,
}

/// What the HTTP layer saw of the last answer, for classification.
#[derive(Default, Clone)]
struct Observed {
    status: Option<u16>,
    retry_after: Option<Duration>,
}

impl OAuthClient {
    /// `http` must not follow redirects: a 3xx answer is then a failure ([`FailureKind::Misconfigured`])
    /// and the client secret, PKCE verifier and refresh token reach only the configured endpoints.
    pub(crate) fn new(
        provider: Provider,
        settings: &ProviderSettings,
        rules: TokenRules,
        http: reqwest::Client,
    ) -> Result<Self, ConfigError> {
        let url = |key: &str, value: &str| {
            oauth2::url::Url::parse(value).map_err(|_| ConfigError::Invalid {
                key: format!("providers.{provider}.{key}"),
                problem: "is not a valid URL".into(),
            })
        };
        let client: Client = oauth2::Client::new(ClientId::new(settings.client_id.clone()))
            .set_client_secret(ClientSecret::new(settings.client_secret.expose().clone()))
            .set_auth_uri(AuthUrl::from_url(url("authorize_url", &settings.authorize_url)?))
            .set_token_uri(TokenUrl::from_url(url("token_url", &settings.token_url)?))
            .set_redirect_uri(RedirectUrl::from_url(url("redirect_uri", &settings.redirect_uri)?))
            .set_auth_type(match settings.client_auth {
                ClientAuth::ClientSecretBasic => AuthType::BasicAuth,
                ClientAuth::ClientSecretPost => AuthType::RequestBody,
            });
        Ok(Self {
            provider,
            client,
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.clone(),
            client_auth: settings.client_auth,
            revoke_url: settings.revoke_url.clone(),
            http,
            scopes: settings.scopes.clone(),
            rules,
            timeout: Duration::from_secs(settings.request_timeout_secs),
        })
    }

    pub(crate) fn provider(&self) -> Provider {
        self.provider
    }

    /// The URL to send the user's browser to, carrying `state` and a fresh PKCE S256 challenge.
    pub(crate) fn authorize_url(&self, state: &str) -> AuthorizeRequest {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = state.to_owned();
        let (url, _) = self
            .client
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(self.scopes.iter().cloned().map(Scope::new))
            .set_pkce_challenge(challenge)
            .url();
        AuthorizeRequest { url: url.to_string(), pkce_verifier: Secret::new(verifier.secret().clone()) }
    }

    #[tracing::instrument(skip_all, fields(provider = %self.provider))]
    pub(crate) async fn exchange_code(
        &self,
        code: &str,
        verifier: &Secret<String>,
        now: DateTime<Utc>,
    ) -> Result<NewTokens, OAuthError> {
        let observed = Arc::new(Mutex::new(Observed::default()));
        let response = self
            .client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().clone()))
            .request_async(&self.sender(&observed))
            .await
            .map_err(|e| self.failure(e, &observed))?;
        let refresh_token = response.refresh_token().ok_or_else(|| OAuthError {
            provider: self.provider,
            kind: FailureKind::Misconfigured,
            detail: "the token response has no refresh token; is `offline_access` among the scopes?".into(),
        })?;
        self.tokens(&response, Secret::new(refresh_token.secret().clone()), now)
    }

    /// Exchanges a refresh token. A response without a new refresh token keeps the old one.
    #[tracing::instrument(skip_all, fields(provider = %self.provider))]
    pub(crate) async fn refresh(
        &self,
        refresh_token: &Secret<String>,
        now: DateTime<Utc>,
    ) -> Result<NewTokens, OAuthError> {
        let observed = Arc::new(Mutex::new(Observed::default()));
        let response = self
            .client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.expose().clone()))
            .request_async(&self.sender(&observed))
            .await
            .map_err(|e| self.failure(e, &observed))?;
        let next = response.refresh_token().map_or_else(|| refresh_token.clone(), |t| Secret::new(t.secret().clone()));
        self.tokens(&response, next, now)
    }

    /// Revokes a refresh token (RFC 7009), which ends the grant.
    ///
    /// Sent by hand rather than through `oauth2`, which refuses a revocation endpoint that is not
    /// HTTPS: right for production (where the provider's endpoint is HTTPS anyway, and config
    /// validation insists on it off loopback) but it would rule out the loopback test server.
    #[tracing::instrument(skip_all, fields(provider = %self.provider))]
    pub(crate) async fn revoke(&self, refresh_token: &Secret<String>) -> Result<(), OAuthError> {
        let mut form = vec![("token", refresh_token.expose().as_str()), ("token_type_hint", "refresh_token")];
        let mut request = self.http.post(&self.revoke_url).timeout(self.timeout);
        match self.client_auth {
            // RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
            ClientAuth::ClientSecretBasic => {
                let encode = |s: &str| oauth2::url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                request = request.basic_auth(encode(&self.client_id), Some(encode(self.client_secret.expose())));
            }
            ClientAuth::ClientSecretPost => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", self.client_secret.expose()));
            }
        }
        let failed = |status: Option<u16>, detail: String| OAuthError {
            provider: self.provider,
            kind: failure::classify(status, None, None),
            detail,
        };
        let response =
            request.form(&form).send().await.map_err(|e| failed(None, format!("revocation request failed: {e}")))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(failed(Some(status.as_u16()), format!("revocation answered HTTP {status}")))
        }
    }

    /// The tokens of an answer, once [`accept`] finds them usable, with a bounded lifetime.
    fn tokens(
        &self,
        response: &TokenAnswer,
        refresh_token: Secret<String>,
        now: DateTime<Utc>,
    ) -> Result<NewTokens, OAuthError> {
        let access_token = response.access_token().secret();
        accept::check_tokens(access_token, refresh_token.expose(), &self.rules).map_err(|problem| OAuthError {
            provider: self.provider,
            kind: FailureKind::UnusableToken,
            detail: format!("the provider returned an unusable token: {problem}"),
        })?;
        let lifetime = accept::lifetime(response.expires_in_secs(), &self.rules);
        if lifetime.clamped {
            tracing::warn!(
                provider = %self.provider,
                expires_in = ?response.expires_in_secs(),
                lifetime_secs = lifetime.duration.as_secs(),
                "the token answer's expires_in is out of bounds; the token's lifetime is clamped"
            );
        }
        Ok(NewTokens {
            access_token: Secret::new(access_token.clone()),
            refresh_token,
            expires_at: crate::dates::after(now, lifetime.duration),
        })
    }

    /// The HTTP client handed to `oauth2`, recording what it saw of the answer into `observed`.
    fn sender(&self, observed: &Arc<Mutex<Observed>>) -> Sender {
        Sender { http: self.http.clone(), timeout: self.timeout, observed: observed.clone() }
    }

    fn failure(
        &self,
        error: RequestTokenError<reqwest::Error, BasicErrorResponse>,
        observed: &Arc<Mutex<Observed>>,
    ) -> OAuthError {
        let seen = observed.lock().expect("not poisoned").clone();
        let (code, detail) = match &error {
            RequestTokenError::ServerResponse(response) => {
                let code = response.error().to_string();
                (Some(code.clone()), format!("HTTP {:?}, error `{code}`", seen.status))
            }
            RequestTokenError::Request(e) => (None, format!("request failed: {e}")),
            RequestTokenError::Parse(_, _) => (None, format!("HTTP {:?}, unreadable response", seen.status)),
            RequestTokenError::Other(message) => (None, format!("HTTP {:?}: {message}", seen.status)),
        };
        // A request that never got an answer has no status; one that got an answer it could not
        // parse is classified by its status alone.
        let status = if matches!(error, RequestTokenError::Request(_)) { None } else { seen.status };
        OAuthError {
            provider: self.provider,
            kind: failure::classify(status, code.as_deref(), seen.retry_after),
            detail,
        }
    }
}

/// Our reqwest client as `oauth2`'s HTTP client, with a timeout, keeping the status code and
/// `Retry-After` of the answer that `oauth2` itself does not report.
struct Sender {
    http: reqwest::Client,
    timeout: Duration,
    observed: Arc<Mutex<Observed>>,
}

impl<'c> oauth2::AsyncHttpClient<'c> for Sender {
    type Error = reqwest::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, reqwest::Error>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let response = self
                .http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .timeout(self.timeout)
                .send()
                .await?;
            let status = response.status();
            let headers = response.headers().clone();
            *self.observed.lock().expect("not poisoned") = Observed {
                status: Some(status.as_u16()),
                retry_after: headers
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| failure::parse_retry_after(v, Utc::now())),
            };
            let body = response.bytes().await?.to_vec();
            let mut out = http::Response::builder().status(status);
            if let Some(h) = out.headers_mut() {
                *h = headers;
            }
            Ok(out.body(body).expect("a status and headers from a real response are valid"))
        })
    }
}
