//! Asking the refresher to renew one user's token now rather than at its next scan: the job path
//! does when a job waits for a token, and the catalog when a token is too short to list with.

use chrono::{DateTime, Utc};

use crate::messages::RefreshRequest;
use crate::provider::Provider;
use crate::queue::Publisher;

#[derive(Clone)]
pub(crate) struct EarlyRefresh {
    publisher: Publisher,
    /// `amqp.refresh_queue`.
    queue: String,
}

impl EarlyRefresh {
    pub(crate) fn new(publisher: Publisher, queue: String) -> Self {
        Self { publisher, queue }
    }

    /// Asks for the user's token to be valid `until`, or, when `refused` (an MCP server refused
    /// it), renewed whatever its expiry. Best effort: if the request is lost, the refresher's
    /// next scan finds the token anyway once it expires within the lead time.
    pub(crate) async fn ask(&self, provider: Provider, user_id: &str, until: DateTime<Utc>, refused: bool) {
        let request = RefreshRequest { provider, user_id: user_id.to_owned(), needed_until: until, refused };
        let body = serde_json::to_vec(&request).expect("a refresh request serializes");
        if let Err(e) = self.publisher.send(&self.queue, &body).await {
            tracing::warn!(error = %e, "could not ask the refresher for an early refresh");
        }
    }
}
