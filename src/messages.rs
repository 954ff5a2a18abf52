//! Wire formats v1 of the service's other messages: token events for the rest of the product, the
//! worker's request to the refresher, and a user's connection status (the HTTP API's and
//! `mcp-worker tokens status`'s answer). (Jobs and replies are in [`crate::job`].)

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::provider::Provider;
use crate::store::{StoreError, StoredToken, TokenStatus};

/// Routing keys of [`TokenEvent`] on the events exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenEventKind {
    Connected,
    Disconnected,
    ReauthRequired,
}

impl TokenEventKind {
    pub(crate) const ALL: [TokenEventKind; 3] =
        [TokenEventKind::Connected, TokenEventKind::Disconnected, TokenEventKind::ReauthRequired];

    pub(crate) fn routing_key(self) -> &'static str {
        match self {
            TokenEventKind::Connected => "token.connected",
            TokenEventKind::Disconnected => "token.disconnected",
            TokenEventKind::ReauthRequired => "token.reauth_required",
        }
    }
}

/// `{"user_id", "provider", "at", "reason"}` on the `mcp.events` topic exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TokenEvent {
    pub(crate) user_id: String,
    pub(crate) provider: Provider,
    pub(crate) at: DateTime<Utc>,
    pub(crate) reason: String,
}

/// The worker's request to renew one user's token now, on `amqp.refresh_queue`: a job needs the
/// token to stay valid until `needed_until`. Requests for a token that already lasts that long
/// (another request renewed it) are dropped, so a burst of jobs causes one refresh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshRequest {
    pub(crate) provider: Provider,
    pub(crate) user_id: String,
    pub(crate) needed_until: DateTime<Utc>,
    /// The MCP server refused the user's current token (HTTP 401): renew it whatever its expiry.
    /// Absent in requests from older workers.
    #[serde(default)]
    pub(crate) refused: bool,
}

/// A user's connection as the chat backend sees it: never a token value.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionStatus {
    pub(crate) connected: bool,
    /// `active` or `reauth_required`, when connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) expires_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) updated_at: Option<DateTime<Utc>>,
}

impl ConnectionStatus {
    /// The status a token lookup gives. A stored token that cannot be opened (its encryption key
    /// was retired, or it is damaged) reads as `reauth_required`, as on the job path: only a new
    /// connect flow helps. Other errors (the database) are passed on.
    pub fn of(lookup: Result<Option<StoredToken>, StoreError>) -> Result<Self, StoreError> {
        match lookup {
            Ok(token) => Ok(Self {
                connected: token.is_some(),
                status: token.as_ref().map(|t| t.status.as_str()),
                expires_at: token.as_ref().map(|t| t.expires_at),
                updated_at: token.as_ref().map(|t| t.updated_at),
            }),
            Err(StoreError::Unreadable(e)) => {
                tracing::warn!(error = %e, "a stored token cannot be read; reporting reauth_required");
                Ok(Self {
                    connected: true,
                    status: Some(TokenStatus::ReauthRequired.as_str()),
                    expires_at: None,
                    updated_at: None,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Whether jobs for this user can get a token: connected and not waiting for reauthorization.
    pub fn usable(&self) -> bool {
        self.status == Some(TokenStatus::Active.as_str())
    }
}
