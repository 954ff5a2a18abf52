//! Pure decisions of the refresher, with the clock passed in.

use std::time::Duration;

use chrono::{DateTime, Utc};

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
}
