//! Remembers for whom a problem was already logged, so a problem that hits every job of a user is
//! logged once per user rather than once per job. Bounded: past its capacity it forgets everyone
//! and starts again, so a flood of users costs a few repeated lines, never unbounded memory.

use std::collections::HashSet;
use std::sync::Mutex;

pub(super) struct OncePerUser {
    seen: Mutex<HashSet<String>>,
    capacity: usize,
}

impl OncePerUser {
    pub(super) fn new(capacity: usize) -> Self {
        Self { seen: Mutex::new(HashSet::new()), capacity }
    }

    /// `true` the first time `user_id` is named (since the set was last cleared).
    pub(super) fn first_time(&self, user_id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(user_id) {
            return false;
        }
        if seen.len() >= self.capacity {
            seen.clear();
        }
        seen.insert(user_id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_once_and_never_more_than_the_capacity() {
        let once = OncePerUser::new(2);
        assert!(once.first_time("a"));
        assert!(!once.first_time("a"));
        assert!(once.first_time("b"));
        assert!(once.first_time("c"), "full: forgets everyone, then remembers c");
        assert!(!once.first_time("c"));
        assert!(once.first_time("a"));
        assert!(once.seen.lock().unwrap().len() <= 2);
    }
}
