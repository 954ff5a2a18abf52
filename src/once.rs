//! Remembers what a problem was already logged for (a user, a server's tool), so a problem that
//! hits every job of a user is logged once per user rather than once per job. Bounded: past its
//! capacity it forgets everything and starts again, so a flood of names costs a few repeated
//! lines, never unbounded memory.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) struct OncePer {
    seen: Mutex<HashSet<String>>,
    capacity: usize,
}

impl OncePer {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { seen: Mutex::new(HashSet::new()), capacity }
    }

    /// `true` the first time `name` is named (since the set was last cleared).
    pub(crate) fn first_time(&self, name: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(name) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.clear();
        }
        seen.insert(name.to_owned());
        true
    }
}

/// Like [`OncePer`], but a name comes back after `window`: for a request that may be repeated,
/// just not on every occasion (asking the refresher to renew one user's token, say).
pub(crate) struct OncePerWindow {
    seen: Mutex<HashMap<String, Instant>>,
    capacity: usize,
    window: Duration,
}

impl OncePerWindow {
    pub(crate) fn new(capacity: usize, window: Duration) -> Self {
        Self { seen: Mutex::new(HashMap::new()), capacity, window }
    }

    /// `true` when `name` was not named in the `window` before `now`.
    pub(crate) fn first_in_window(&self, name: &str, now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let recent = |at: &Instant| now.checked_duration_since(*at).is_some_and(|age| age < self.window);
        if seen.get(name).is_some_and(recent) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, at| recent(at));
            if seen.len() >= self.capacity {
                seen.clear();
            }
        }
        seen.insert(name.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_comes_back_after_its_window_and_the_table_stays_bounded() {
        let once = OncePerWindow::new(2, Duration::from_secs(10));
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        assert!(once.first_in_window("a", at(0)));
        assert!(!once.first_in_window("a", at(9)));
        assert!(once.first_in_window("a", at(10)), "the window is over");
        assert!(once.first_in_window("b", at(10)));
        assert!(once.first_in_window("c", at(11)), "full: the recent stay only if room is left");
        assert!(once.seen.lock().unwrap().len() <= 2);
    }

    #[test]
    fn each_user_once_and_never_more_than_the_capacity() {
        let once = OncePer::new(2);
        assert!(once.first_time("a"));
        assert!(!once.first_time("a"));
        assert!(once.first_time("b"));
        assert!(once.first_time("c"), "full: forgets everyone, then remembers c");
        assert!(!once.first_time("c"));
        assert!(once.first_time("a"));
        assert!(once.seen.lock().unwrap().len() <= 2);
    }
}
