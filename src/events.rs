//! Publishing token events (`token.connected`, `token.disconnected`, `token.reauth_required`) to
//! the events exchange. Best effort: an event that cannot be published is logged, and never
//! undoes or blocks the change it reports.

use chrono::Utc;

use crate::messages::{TokenEvent, TokenEventKind};
use crate::provider::Provider;
use crate::queue::Publisher;

#[derive(Clone)]
pub(crate) struct Events {
    publisher: Publisher,
    exchange: String,
}

impl Events {
    pub(crate) fn new(publisher: Publisher, exchange: String) -> Self {
        Self { publisher, exchange }
    }

    pub(crate) async fn emit(&self, kind: TokenEventKind, provider: Provider, user_id: &str, reason: &str) {
        let event = TokenEvent { user_id: user_id.to_owned(), provider, at: Utc::now(), reason: reason.to_owned() };
        let body = serde_json::to_vec(&event).expect("an event serializes");
        if let Err(e) = self.publisher.event(&self.exchange, kind.routing_key(), &body).await {
            tracing::warn!(error = %e, event = kind.routing_key(), "could not publish a token event");
        }
    }
}
