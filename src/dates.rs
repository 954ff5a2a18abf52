//! Saturating date arithmetic: the one way this crate moves a date by a duration.
//!
//! `DateTime + TimeDelta` panics when the sum leaves chrono's range, and `TimeDelta::from_std`
//! fails for a duration over `i64::MAX` milliseconds. Durations here often come from outside (a
//! provider's `expires_in`, a `Retry-After`, a job's deadline, a CLI flag), so an absurd value
//! must give a date at the edge of the range, never a panic. Callers that must refuse such a
//! value (a token lifetime, say) clamp it first; this module only guarantees the arithmetic ends.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// `duration` as a chrono delta, `TimeDelta::MAX` when it does not fit.
fn delta(duration: Duration) -> TimeDelta {
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

/// `at + duration`, or the latest representable date when that is out of range.
pub fn after(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_add_signed(delta(duration)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `at - duration`, or the earliest representable date when that is out of range.
pub(crate) fn before(at: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    at.checked_sub_signed(delta(duration)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// How long from `from` until `to`; zero when `to` is not after `from`.
pub(crate) fn until(from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    (to - from).to_std().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn ordinary_durations_move_the_date_exactly() {
        assert_eq!(after(at(0), Duration::from_secs(90)), at(90));
        assert_eq!(before(at(0), Duration::from_secs(90)), at(-90));
        assert_eq!(until(at(0), at(90)), Duration::from_secs(90));
        assert_eq!(until(at(90), at(0)), Duration::ZERO);
    }

    #[test]
    fn absurd_durations_saturate_at_the_edge_of_the_range() {
        for huge in [Duration::MAX, Duration::from_secs(u64::MAX), Duration::from_secs(10_000_000_000_000)] {
            assert_eq!(after(at(0), huge), DateTime::<Utc>::MAX_UTC);
            assert_eq!(before(at(0), huge), DateTime::<Utc>::MIN_UTC);
            assert_eq!(after(DateTime::<Utc>::MAX_UTC, huge), DateTime::<Utc>::MAX_UTC);
        }
        assert_eq!(delta(Duration::MAX), TimeDelta::MAX);
        assert!(until(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC) > Duration::ZERO);
    }
}
