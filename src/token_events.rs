//! Keeps the per-user caches in step with the token events: the API and the refresher publish
//! `token.connected`, `token.disconnected` and `token.reauth_required` after writing the
//! database, and each process drops that user's entries on receipt, from the worker's token
//! cache and from the catalog's tool lists. While the subscription is down, events may be
//! missed, so the caches are suspended until it is back.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::messages::TokenEvent;
use crate::provider::Provider;
use crate::queue::{Broker, Consumer, Watched};

/// A cache of what a user's tokens give, which a token event makes stale.
pub(crate) trait UserCache: Send + Sync {
    /// The user's tokens at `provider` changed: drop what was cached of them.
    fn forget(&self, provider: Provider, user_id: &str);
    /// Events may be missed from now on: use and store nothing per user.
    fn suspend(&self);
    /// Events are received again from now: start empty.
    fn resume(&self);
}

/// A subscription to the token events and the caches it keeps in step.
pub(crate) struct Follower {
    events: Consumer,
    caches: Vec<Arc<dyn UserCache>>,
}

impl Follower {
    /// `events` is a subscription made just now, before the first job is taken: no event can
    /// slip between, so the caches may be used from now on.
    pub(crate) fn new(events: Consumer, caches: Vec<Arc<dyn UserCache>>) -> Self {
        let follower = Self { events, caches };
        follower.each(|cache| cache.resume());
        follower
    }

    fn each(&self, f: impl Fn(&dyn UserCache)) {
        self.caches.iter().for_each(|cache| f(cache.as_ref()));
    }

    /// Follows the events until `shutdown`, telling every cache. Deliveries of a subscription
    /// need no ack.
    pub(crate) async fn follow(mut self, broker: &Broker, shutdown: &CancellationToken) {
        while let Some(watched) = broker.watch(&mut self.events, shutdown).await {
            match watched {
                Watched::Delivery(delivery) => match serde_json::from_slice::<TokenEvent>(&delivery.body) {
                    Ok(event) => self.each(|cache| cache.forget(event.provider, &event.user_id)),
                    Err(e) => {
                        // Whose tokens changed is unknown: empty the caches rather than guess.
                        tracing::warn!(error = %e, "unreadable token event; emptying the per-user caches");
                        self.each(|cache| cache.resume());
                    }
                },
                Watched::Lost => self.each(|cache| cache.suspend()),
                Watched::Resumed => self.each(|cache| cache.resume()),
            }
        }
    }
}
