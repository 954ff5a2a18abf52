//! Keeps the token cache in step with the token events: the API and the refresher publish
//! `token.connected`, `token.disconnected` and `token.reauth_required` after writing the
//! database, and every worker drops that user's cached token on receipt. While the subscription
//! is down, events may be missed, so the cache is suspended until it is back (see
//! [`super::token_cache`]).

use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::messages::TokenEvent;
use crate::queue::{Broker, Consumer, Watched};

impl Worker {
    /// Follows `events` until `shutdown`. Deliveries of a subscription need no ack.
    pub(super) async fn follow_token_events(
        &self,
        broker: &Broker,
        mut events: Consumer,
        shutdown: &CancellationToken,
    ) {
        // The subscription was made before the first job was taken: reads from now on are safe.
        self.tokens.resume(Instant::now());
        while let Some(watched) = broker.watch(&mut events, shutdown).await {
            match watched {
                Watched::Delivery(delivery) => match serde_json::from_slice::<TokenEvent>(&delivery.body) {
                    Ok(event) => self.tokens.forget(event.provider, &event.user_id, Instant::now()),
                    Err(e) => {
                        // Whose tokens changed is unknown: empty the cache rather than guess.
                        tracing::warn!(error = %e, "unreadable token event; emptying the token cache");
                        self.tokens.resume(Instant::now());
                    }
                },
                Watched::Lost => self.tokens.suspend(),
                Watched::Resumed => self.tokens.resume(Instant::now()),
            }
        }
    }
}
