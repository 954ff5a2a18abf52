//! Pure decisions of the refresher, with the clock passed in.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::metrics::Backlog;
use crate::store::DueCounts;

/// A token is due for refresh when it expires within `lead` of `now` (already expired included).
pub(crate) fn is_due(now: DateTime<Utc>, expires_at: DateTime<Utc>, lead: Duration) -> bool {
    expires_at <= crate::dates::after(now, lead)
}

/// When to try a token again after a transient failure: exponential backoff from `initial` (the
/// `failures`-th in a row), at most `max`, never sooner than the provider's `Retry-After`, spread
/// by `jitter` in [0, 1) over the upper half of the delay so replicas do not retry in step.
/// `Retry-After` is honoured only up to `max` too: a provider (or whatever answers in its place)
/// must not be able to park a token until it expires, or forever.
pub(crate) fn retry_at(
    now: DateTime<Utc>,
    failures: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> DateTime<Utc> {
    let exponential = initial.saturating_mul(1u32 << failures.min(16)).min(max);
    // NaN would make `mul_f64` panic; it counts as no jitter.
    let jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) };
    let spread = exponential.mul_f64(0.5 + jitter / 2.0);
    let delay = spread.max(retry_after.unwrap_or_default().min(max)).max(Duration::from_millis(1));
    crate::dates::after(now, delay)
}

/// The backlog the metrics show, from the counts a scan took at `now`: the lag is how long the
/// earliest due token has been due (its expiry less `lead`), which a healthy refresher keeps
/// below about one scan interval.
pub(crate) fn backlog(now: DateTime<Utc>, lead: Duration, counts: DueCounts) -> Backlog {
    let lag = counts
        .earliest
        .map_or(Duration::ZERO, |earliest| crate::dates::until(crate::dates::before(earliest, lead), now));
    Backlog { due: counts.due, overdue: counts.overdue, lag }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn due_within_the_lead_time_or_expired() {
        let lead = Duration::from_secs(600);
        assert!(is_due(at(0), at(600), lead));
        assert!(is_due(at(0), at(-5), lead), "already expired");
        assert!(!is_due(at(0), at(601), lead));
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let (initial, max) = (Duration::from_secs(5), Duration::from_secs(300));
        let secs = |failures, retry_after, jitter| {
            (retry_at(at(0), failures, initial, max, retry_after, jitter) - at(0)).num_milliseconds()
        };
        assert_eq!(secs(0, None, 1.0), 5_000);
        assert_eq!(secs(0, None, 0.0), 2_500, "jitter spreads over the upper half");
        assert_eq!(secs(3, None, 1.0), 40_000);
        assert_eq!(secs(30, None, 1.0), 300_000, "capped");
        assert_eq!(secs(0, Some(Duration::from_secs(60)), 0.0), 60_000, "never before Retry-After");
        assert_eq!(secs(0, Some(Duration::MAX), 0.0), 300_000, "Retry-After is capped too");
    }

    proptest! {
        /// Whatever the failure count, delays, `Retry-After` and jitter, the retry is after `now`
        /// and no later than `max` from it (or the end of time, when `now` is near it).
        #[test]
        fn any_retry_lands_between_now_and_the_maximum(
            now in prop_oneof![Just(DateTime::<Utc>::MAX_UTC), (-10_000_000_000i64..10_000_000_000).prop_map(at)],
            failures in any::<u32>(),
            initial in any::<u64>(),
            max in 1u64..u64::MAX,
            retry_after in proptest::option::of(any::<u64>()),
            jitter in any::<f64>(),
        ) {
            let max = Duration::from_millis(max);
            let retry = retry_at(now, failures, Duration::from_millis(initial), max, retry_after.map(Duration::from_secs), jitter);
            prop_assert!(retry >= now);
            prop_assert!(retry <= crate::dates::after(now, max));
        }
    }

    #[test]
    fn the_lag_is_how_long_the_earliest_due_token_has_been_due() {
        let lead = Duration::from_secs(600);
        let counts = DueCounts { due: 3, overdue: 1, earliest: Some(at(-60)) };
        let backlog = backlog(at(0), lead, counts);
        assert_eq!(backlog.lag, Duration::from_secs(660));
        assert_eq!((backlog.due, backlog.overdue), (3, 1));
        let fresh = DueCounts { due: 1, overdue: 0, earliest: Some(at(590)) };
        assert_eq!(super::backlog(at(0), lead, fresh).lag, Duration::from_secs(10));
        let none = DueCounts { due: 0, overdue: 0, earliest: None };
        assert_eq!(super::backlog(at(0), lead, none).lag, Duration::ZERO);
    }
}
