//! Remembers what a problem was already logged for (a user, a server's tool), so a problem that
//! hits every job of a user is logged once per user rather than once per job. Bounded: past its
//! capacity it forgets everything and starts again, so a flood of names costs a few repeated
//! lines, never unbounded memory.

use std::collections::HashSet;
use std::sync::Mutex;

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

#[cfg(test)]
mod tests {
    use super::*;

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
