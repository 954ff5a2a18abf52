//! Wire formats v1 of the service's other messages: token events for the rest of the product, and
//! the worker's request to the refresher. (Jobs and replies are in [`crate::job`].)

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::provider::Provider;

/// Routing keys of [`TokenEvent`] on the events exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenEventKind {
    Connected,
    Disconnected,
    ReauthRequired,
}

impl TokenEventKind {
    pub fn routing_key(self) -> &'static str {
        match self {
            TokenEventKind::Connected => "token.connected",
            TokenEventKind::Disconnected => "token.disconnected",
            TokenEventKind::ReauthRequired => "token.reauth_required",
        }
    }
}

/// `{"user_id", "provider", "at", "reason"}` on the `mcp.events` topic exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenEvent {
    pub user_id: String,
    pub provider: Provider,
    pub at: DateTime<Utc>,
    pub reason: String,
}

/// The worker's request to renew one user's token now, on `amqp.refresh_queue`: a job needs the
/// token to stay valid until `needed_until`. Requests for a token that already lasts that long
/// (another request renewed it) are dropped, so a burst of jobs causes one refresh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshRequest {
    pub provider: Provider,
    pub user_id: String,
    pub needed_until: DateTime<Utc>,
}
