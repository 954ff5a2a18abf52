//! Spaces token requests evenly so that no window of a minute holds more than the provider's
//! limit: each request gets the next free slot, `60 s / limit` after the previous one.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

pub(crate) struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub(crate) fn per_minute(limit: u32) -> Self {
        Self { interval: Duration::from_secs(60) / limit.max(1), next: Mutex::new(None) }
    }

    /// Waits for this caller's slot.
    pub(crate) async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.interval);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_by_the_interval() {
        let limiter = RateLimiter::per_minute(120);
        let start = Instant::now();
        for expected_ms in [0, 500, 1000, 1500] {
            limiter.acquire().await;
            assert_eq!(start.elapsed().as_millis(), expected_ms);
        }
    }
}
