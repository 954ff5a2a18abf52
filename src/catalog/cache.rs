//! The catalog's cache of tool lists, on moka: bounded in bytes and in entries, each entry
//! expiring after its own TTL, and concurrent misses for one key served by one listing.
//!
//! A list of a server that needs no token, or one its server marked `cacheScope: public`, is
//! kept once for everyone ([`Key::Shared`]); any other list of a token server is one user's
//! ([`Key::User`]), and reaches no one else: the key names the user.
//!
//! A token event (`token.connected`, `token.disconnected`, `token.reauth_required`) drops the
//! user's lists, because the new token (or none) may see other tools. It does so by moving the
//! user to a new *generation*, which is part of the key: entries of the old one can no longer be
//! found (they age out), and a listing that began before the event stores its list under the old
//! generation, where nobody looks. While the event subscription is down, events may be missed, so
//! per-user lists are neither used nor stored; when it is back, every user moves to a new
//! generation at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use super::rules::Unlisted;
use super::wire::CatalogTool;
use crate::provider::Provider;

/// Users whose generation is remembered; past this, all of them move to a new one together.
const MAX_GENERATIONS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// A list every user may be given.
    Shared { server: String },
    /// One user's list of a server that needs their token, as of the user's `generation`.
    User { server: String, user: String, generation: u64 },
}

/// A server's tools as listed, filtered to what it serves, ready to answer with.
#[derive(Debug)]
pub(super) struct Listing {
    pub(super) tools: Vec<CatalogTool>,
    /// How long it may be reused.
    pub(super) ttl: Duration,
    /// Whether every user may be given it.
    pub(super) shared: bool,
    /// About the memory it holds: its tools as JSON.
    pub(super) bytes: u32,
}

/// Each entry lives its listing's own TTL.
struct ListingTtl;

impl Expiry<Key, Arc<Listing>> for ListingTtl {
    fn expire_after_create(&self, _key: &Key, listing: &Arc<Listing>, _created_at: Instant) -> Option<Duration> {
        Some(listing.ttl)
    }

    /// A list stored again over a live one lives its own TTL, not what is left of the old one's.
    fn expire_after_update(
        &self,
        _key: &Key,
        listing: &Arc<Listing>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(listing.ttl)
    }
}

pub(super) struct ListCache {
    lists: Cache<Key, Arc<Listing>>,
    generations: Mutex<Generations>,
}

struct Generations {
    /// Whether token events are being received, so that per-user lists can be trusted.
    live: bool,
    /// The last generation handed out.
    last: u64,
    /// The generation of every user not in `users`.
    floor: u64,
    users: HashMap<(Provider, String), u64>,
}

impl ListCache {
    /// A cache of at most `max_bytes` of lists, in at most `max_entries` entries (an entry weighs
    /// its bytes, and at least `max_bytes / max_entries`). Per-user lists wait for
    /// [`ListCache::resume`].
    pub(super) fn new(max_bytes: u64, max_entries: u64) -> Self {
        let least = u32::try_from(max_bytes / max_entries.max(1)).unwrap_or(u32::MAX).max(1);
        let lists = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |_key, listing: &Arc<Listing>| listing.bytes.max(least))
            .expire_after(ListingTtl)
            .build();
        let generations = Generations { live: false, last: 0, floor: 0, users: HashMap::new() };
        Self { lists, generations: Mutex::new(generations) }
    }

    fn generations(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.generations.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key of the user's list of `server`, or `None` while events may be missed.
    pub(super) fn user_key(&self, server: &str, provider: Provider, user: &str) -> Option<Key> {
        let generations = self.generations();
        if !generations.live {
            return None;
        }
        let generation = generations.users.get(&(provider, user.to_owned())).copied().unwrap_or(generations.floor);
        Some(Key::User { server: server.to_owned(), user: user.to_owned(), generation })
    }

    pub(super) async fn get(&self, key: &Key) -> Option<Arc<Listing>> {
        self.lists.get(key).await
    }

    /// The list under `key`, or the one `list` makes, stored unless it failed. Callers that miss
    /// the same key at once share one `list`. The `bool` says whether this caller did not list:
    /// the list was cached, or another caller's listing under way served it too.
    pub(super) async fn get_or_list(
        &self,
        key: Key,
        list: impl Future<Output = Result<Arc<Listing>, Unlisted>>,
    ) -> (Result<Arc<Listing>, Arc<Unlisted>>, bool) {
        match self.lists.entry(key).or_try_insert_with(list).await {
            Ok(entry) => {
                let found = !entry.is_fresh();
                (Ok(entry.into_value()), found)
            }
            Err(unlisted) => (Err(unlisted), false),
        }
    }

    /// Keeps `listing` for every user of `server`.
    pub(super) async fn share(&self, server: &str, listing: Arc<Listing>) {
        self.lists.insert(Key::Shared { server: server.to_owned() }, listing).await;
    }

    /// The user's tokens changed: their lists are not found again. An id no user can have (an
    /// event's, from outside) names nobody, and is not kept.
    pub(super) fn forget(&self, provider: Provider, user: &str) {
        if !crate::job::usable_id(user) {
            return;
        }
        let mut generations = self.generations();
        generations.last = generations.last.saturating_add(1);
        let generation = generations.last;
        if generations.users.len() >= MAX_GENERATIONS {
            generations.users.clear();
            generations.floor = generation;
        }
        generations.users.insert((provider, user.to_owned()), generation);
    }

    /// Events may be missed from now on: per-user lists are neither used nor stored.
    pub(super) fn suspend(&self) {
        self.generations().live = false;
    }

    /// Events are received again: every user starts a new generation.
    pub(super) fn resume(&self) {
        let mut generations = self.generations();
        generations.last = generations.last.saturating_add(1);
        generations.floor = generations.last;
        generations.users.clear();
        generations.live = true;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn listing(ttl: Duration) -> Arc<Listing> {
        Arc::new(Listing { tools: Vec::new(), ttl, shared: false, bytes: 10 })
    }

    fn live() -> ListCache {
        let cache = ListCache::new(1 << 20, 100);
        cache.resume();
        cache
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn concurrent_misses_of_one_key_make_one_listing() {
        let cache = live();
        let listings = AtomicUsize::new(0);
        let key = cache.user_key("q", Provider::Qlik, "u").unwrap();
        let list = || async {
            listings.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(listing(LONG))
        };
        let results = futures::future::join_all((0..5).map(|_| cache.get_or_list(key.clone(), list()))).await;
        assert_eq!(listings.load(Ordering::SeqCst), 1);
        assert_eq!(results.iter().filter(|(_, found)| !found).count(), 1, "one listed, the others found it");
        assert!(results.iter().all(|(listed, _)| listed.is_ok()));
    }

    #[tokio::test]
    async fn a_failed_listing_is_not_kept_and_a_zero_ttl_list_is_stale_at_once() {
        let cache = live();
        let key = cache.user_key("q", Provider::Qlik, "u").unwrap();
        let unlisted = Unlisted {
            error: crate::job::ReplyError::new(crate::job::ErrorCode::McpUnavailable, "down", None),
            refresh: None,
        };
        assert!(cache.get_or_list(key.clone(), async { Err(unlisted) }).await.0.is_err());
        assert!(cache.get(&key).await.is_none());
        let (_, found) = cache.get_or_list(key.clone(), async { Ok(listing(Duration::ZERO)) }).await;
        assert!(!found);
        assert!(cache.get(&key).await.is_none(), "ttlMs 0: stale at once");
    }

    #[tokio::test]
    async fn an_event_moves_only_that_user_to_a_new_key() {
        let cache = live();
        let alice = cache.user_key("q", Provider::Qlik, "alice").unwrap();
        let bob = cache.user_key("q", Provider::Qlik, "bob").unwrap();
        assert!(cache.get_or_list(alice.clone(), async { Ok(listing(LONG)) }).await.0.is_ok());
        assert!(cache.get_or_list(bob.clone(), async { Ok(listing(LONG)) }).await.0.is_ok());
        cache.forget(Provider::Qlik, "alice");
        let alice_now = cache.user_key("q", Provider::Qlik, "alice").unwrap();
        assert_ne!(alice_now, alice);
        assert!(cache.get(&alice_now).await.is_none(), "alice lists again");
        assert_eq!(cache.user_key("q", Provider::Qlik, "bob").unwrap(), bob);
        assert!(cache.get(&bob).await.is_some(), "bob's list stays");
    }

    #[tokio::test]
    async fn without_events_no_user_key_is_given_and_after_them_everyone_starts_again() {
        let cache = ListCache::new(1 << 20, 100);
        assert!(cache.user_key("q", Provider::Qlik, "u").is_none(), "suspended until events flow");
        cache.resume();
        let before = cache.user_key("q", Provider::Qlik, "u").unwrap();
        cache.suspend();
        assert!(cache.user_key("q", Provider::Qlik, "u").is_none());
        cache.resume();
        assert_ne!(cache.user_key("q", Provider::Qlik, "u").unwrap(), before);
    }

    #[test]
    fn a_full_table_of_generations_moves_everyone_on() {
        let cache = live();
        let first = cache.user_key("q", Provider::Qlik, "stays").unwrap();
        for i in 0..MAX_GENERATIONS + 1 {
            cache.forget(Provider::Qlik, &i.to_string());
        }
        assert!(cache.generations().users.len() <= MAX_GENERATIONS);
        assert_ne!(cache.user_key("q", Provider::Qlik, "stays").unwrap(), first, "never back to an old key");
        assert_ne!(cache.user_key("q", Provider::Qlik, "0").unwrap(), first);
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_bytes() {
        let cache = ListCache::new(1000, 1000);
        for i in 0..50 {
            let big = Arc::new(Listing { tools: Vec::new(), ttl: LONG, shared: true, bytes: 100 });
            cache.share(&i.to_string(), big).await;
        }
        cache.lists.run_pending_tasks().await;
        assert!(cache.lists.weighted_size() <= 1000, "{}", cache.lists.weighted_size());
        assert!(cache.lists.entry_count() <= 10);
    }
}
