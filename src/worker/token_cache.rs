//! The job path's token cache: a user's token read from MongoDB is reused for the next jobs,
//! for at most `tokens.cache_ttl_ms`, so a busy user costs no database round trip per job.
//!
//! What bounds staleness:
//! - an entry is used only if its token stays valid for the whole call (the same verdict as a
//!   fresh read); anything else is read again, so a renewed token is picked up when the old one
//!   nears its end;
//! - token events (`token.connected`, `token.disconnected`, `token.reauth_required`, which the API
//!   and the refresher publish after their database write) drop the user's entry in every worker
//!   ([`TokenCache::forget`]); a read that began before the event is not cached afterwards;
//! - while this process's event subscription is down, events may be missed, so the cache is
//!   suspended (nothing is used or stored) and starts empty when the subscription is back;
//! - the TTL bounds what remains: an event whose publication failed (the API logs it).
//!
//! Absent users are not cached: a user who just connected is never told `not_connected`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::provider::Provider;
use crate::store::StoredToken;

/// Entries kept at most; past this, expired entries go, and if that is not enough, all of them.
const CAPACITY: usize = 100_000;
/// How long a forgotten user's mark is kept beyond the TTL: longer than any token read takes,
/// so a read begun before the event can still be recognised when it ends.
const FORGET_MARGIN: Duration = Duration::from_secs(120);

type Key = (Provider, String);

pub(crate) struct TokenCache {
    ttl: Duration,
    state: Mutex<State>,
}

struct State {
    /// Whether events are being received, so entries can be trusted.
    live: bool,
    /// Reads begun at or before this instant are not cached (the subscription came back then).
    since: Option<Instant>,
    entries: HashMap<Key, (Instant, StoredToken)>,
    /// When each user's entry was last dropped by an event.
    forgotten: HashMap<Key, Instant>,
}

impl TokenCache {
    /// A cache whose entries live `ttl`; zero turns it off. It starts suspended: see
    /// [`TokenCache::resume`].
    pub(crate) fn new(ttl: Duration) -> Self {
        let state = State { live: false, since: None, entries: HashMap::new(), forgotten: HashMap::new() };
        Self { ttl, state: Mutex::new(state) }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("the cache lock is never poisoned")
    }

    /// The user's cached token, if it was read less than the TTL ago and events are flowing.
    pub(crate) fn get(&self, provider: Provider, user_id: &str, now: Instant) -> Option<StoredToken> {
        let state = self.state();
        if !state.live {
            return None;
        }
        let (read_at, token) = state.entries.get(&(provider, user_id.to_owned()))?;
        is_fresh(*read_at, now, self.ttl).then(|| token.clone())
    }

    /// Remembers a token whose database read began at `read_started`, unless an event or a gap
    /// in the events came since then.
    pub(crate) fn put(&self, provider: Provider, token: &StoredToken, read_started: Instant) {
        if !self.enabled() {
            return;
        }
        let mut state = self.state();
        let key = (provider, token.user_id.clone());
        let stale = |mark: Option<&Instant>| mark.is_some_and(|mark| *mark >= read_started);
        if !state.live || stale(state.since.as_ref()) || stale(state.forgotten.get(&key)) {
            return;
        }
        if state.entries.len() >= CAPACITY {
            let ttl = self.ttl;
            state.entries.retain(|_, (read_at, _)| is_fresh(*read_at, read_started, ttl));
            if state.entries.len() >= CAPACITY {
                state.entries.clear();
            }
        }
        state.entries.insert(key, (read_started, token.clone()));
    }

    /// Drops the user's entry: an event said their tokens changed.
    pub(crate) fn forget(&self, provider: Provider, user_id: &str, now: Instant) {
        let mut state = self.state();
        let key = (provider, user_id.to_owned());
        state.entries.remove(&key);
        let keep = self.ttl + FORGET_MARGIN;
        if state.forgotten.len() >= CAPACITY {
            state.forgotten.retain(|_, at| now.checked_duration_since(*at).is_none_or(|age| age < keep));
        }
        state.forgotten.insert(key, now);
    }

    /// Stops using and storing entries: events may be missed from now on.
    pub(crate) fn suspend(&self) {
        let mut state = self.state();
        state.live = false;
        state.entries.clear();
    }

    /// Events are received again from `now`: start empty, and cache only reads begun after.
    pub(crate) fn resume(&self, now: Instant) {
        let mut state = self.state();
        state.live = true;
        state.since = Some(now);
        state.entries.clear();
    }
}

/// Whether an entry read at `read_at` may still be used at `now`.
fn is_fresh(read_at: Instant, now: Instant, ttl: Duration) -> bool {
    now.checked_duration_since(read_at).is_some_and(|age| age < ttl)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::secret::Secret;
    use crate::store::TokenStatus;

    fn token(user: &str) -> StoredToken {
        StoredToken {
            user_id: user.into(),
            access_token: Secret::new("a".into()),
            refresh_token: Secret::new("r".into()),
            expires_at: Utc::now(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
            status: TokenStatus::Active,
            version: 1,
        }
    }

    const TTL: Duration = Duration::from_secs(5);

    fn live(start: Instant) -> TokenCache {
        let cache = TokenCache::new(TTL);
        cache.resume(start);
        cache
    }

    #[test]
    fn an_entry_is_fresh_for_exactly_the_ttl() {
        let start = Instant::now();
        assert!(is_fresh(start, start, TTL));
        assert!(is_fresh(start, start + Duration::from_millis(4999), TTL));
        assert!(!is_fresh(start, start + TTL, TTL));
        assert!(!is_fresh(start, start, Duration::ZERO), "a zero TTL caches nothing");
    }

    #[test]
    fn nothing_is_cached_until_events_flow() {
        let start = Instant::now();
        let cache = TokenCache::new(TTL);
        cache.put(Provider::Qlik, &token("u"), start + Duration::from_millis(1));
        assert!(cache.get(Provider::Qlik, "u", start + Duration::from_millis(2)).is_none());
        cache.resume(start + Duration::from_millis(3));
        cache.put(Provider::Qlik, &token("u"), start + Duration::from_millis(4));
        assert!(cache.get(Provider::Qlik, "u", start + Duration::from_millis(5)).is_some());
    }

    #[test]
    fn an_event_drops_the_entry_and_a_read_begun_before_it_is_not_cached() {
        let start = Instant::now();
        let cache = live(start);
        let at = |ms| start + Duration::from_millis(ms);
        cache.put(Provider::Qlik, &token("u"), at(1));
        cache.forget(Provider::Qlik, "u", at(5));
        assert!(cache.get(Provider::Qlik, "u", at(6)).is_none(), "the event dropped it");
        // A read that began before the event may have seen the old document.
        cache.put(Provider::Qlik, &token("u"), at(4));
        assert!(cache.get(Provider::Qlik, "u", at(7)).is_none());
        cache.put(Provider::Qlik, &token("u"), at(8));
        assert!(cache.get(Provider::Qlik, "u", at(9)).is_some(), "a read after the event is cached");
        cache.put(Provider::Qlik, &token("other"), at(2));
        assert!(cache.get(Provider::Qlik, "other", at(9)).is_some(), "other users are not affected");
    }

    #[test]
    fn a_gap_in_the_events_empties_the_cache_and_older_reads_stay_out() {
        let start = Instant::now();
        let cache = live(start);
        let at = |ms| start + Duration::from_millis(ms);
        cache.put(Provider::Qlik, &token("u"), at(1));
        cache.suspend();
        assert!(cache.get(Provider::Qlik, "u", at(2)).is_none());
        cache.put(Provider::Qlik, &token("u"), at(3));
        cache.resume(at(10));
        assert!(cache.get(Provider::Qlik, "u", at(11)).is_none(), "it starts empty");
        cache.put(Provider::Qlik, &token("u"), at(9));
        assert!(cache.get(Provider::Qlik, "u", at(11)).is_none(), "a read begun during the gap is not kept");
    }
}
