//! The job path's token cache: a user's token read from MongoDB is reused for the next jobs,
//! for at most `tokens.cache_ttl_ms`, so a busy user costs no database round trip per job.
//!
//! What bounds staleness: an entry is used only while it is younger than the TTL, and only if
//! its token stays valid for the whole call (the same verdict as a fresh read); anything else is
//! read again. So a token renewed by the refresher is picked up when the old one nears its end
//! or the entry expires, and a disconnect or `reauth_required` reaches this process within the
//! TTL. Absent users are not cached: a user who just connected is never told `not_connected`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::provider::Provider;
use crate::store::StoredToken;

/// Entries kept at most; past this, expired entries go, and if that is not enough, all of them.
const CAPACITY: usize = 100_000;

pub struct TokenCache {
    ttl: Duration,
    entries: Mutex<HashMap<(Provider, String), (Instant, StoredToken)>>,
}

impl TokenCache {
    /// A cache whose entries live `ttl`; zero turns it off.
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, entries: Mutex::new(HashMap::new()) }
    }

    /// The user's cached token, if it was read less than the TTL ago.
    pub fn get(&self, provider: Provider, user_id: &str, now: Instant) -> Option<StoredToken> {
        let entries = self.entries.lock().expect("the cache lock is never poisoned");
        let (read_at, token) = entries.get(&(provider, user_id.to_owned()))?;
        is_fresh(*read_at, now, self.ttl).then(|| token.clone())
    }

    /// Remembers a token just read from the database.
    pub fn put(&self, provider: Provider, token: &StoredToken, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().expect("the cache lock is never poisoned");
        if entries.len() >= CAPACITY {
            entries.retain(|_, (read_at, _)| is_fresh(*read_at, now, self.ttl));
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert((provider, token.user_id.clone()), (now, token.clone()));
    }
}

/// Whether an entry read at `read_at` may still be used at `now`.
fn is_fresh(read_at: Instant, now: Instant, ttl: Duration) -> bool {
    now.checked_duration_since(read_at).is_some_and(|age| age < ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_fresh_for_exactly_the_ttl() {
        let start = Instant::now();
        let ttl = Duration::from_secs(5);
        assert!(is_fresh(start, start, ttl));
        assert!(is_fresh(start, start + Duration::from_millis(4999), ttl));
        assert!(!is_fresh(start, start + ttl, ttl));
        assert!(!is_fresh(start, start, Duration::ZERO), "a zero TTL caches nothing");
    }
}
