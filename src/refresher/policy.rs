//! Pure decisions of the refresher, with the clock passed in.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::metrics::Backlog;
use crate::store::DueCounts;

/// A token is due for refresh when it expires within `lead` of `now` (already expired included).
pub fn is_due(now: DateTime<Utc>, expires_at: DateTime<Utc>, lead: Duration) -> bool {
    expires_at <= now + chrono::Duration::from_std(lead).unwrap_or(chrono::Duration::MAX)
}

/// When to try a token again after a transient failure: exponential backoff from `initial` (the
/// `failures`-th in a row), at most `max`, never sooner than the provider's `Retry-After`, spread
/// by `jitter` in [0, 1) over the upper half of the delay so replicas do not retry in step.
pub fn retry_at(
    now: DateTime<Utc>,
    failures: u32,
    initial: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> DateTime<Utc> {
    let exponential = initial.saturating_mul(1u32 << failures.min(16)).min(max);
    let spread = exponential.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0);
    let delay = spread.max(retry_after.unwrap_or_default()).max(Duration::from_millis(1));
    now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX)
}

/// The backlog the metrics show, from the counts a scan took at `now`: the lag is how long the
/// earliest due token has been due (its expiry less `lead`), which a healthy refresher keeps
/// below about one scan interval.
pub fn backlog(now: DateTime<Utc>, lead: Duration, counts: DueCounts) -> Backlog {
    let lead = chrono::Duration::from_std(lead).unwrap_or(chrono::Duration::MAX);
    let lag = counts
        .earliest
        .and_then(|earliest| earliest.checked_sub_signed(lead))
        .and_then(|due_since| (now - due_since).to_std().ok())
        .unwrap_or(Duration::ZERO);
    Backlog { due: counts.due, overdue: counts.overdue, lag }
}

#[cfg(test)]
mod tests {
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
