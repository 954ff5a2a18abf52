//! The refresh-request shell: takes the worker's requests off `amqp.refresh_queue` and bounds
//! how often one request may fail.
//!
//! A request whose handler panics, or that was in hand when the process died, would otherwise
//! come back forever, and if it is what kills the process, every restart dies on it again (a
//! crash loop). The shell counts failures itself in [`FAILURES_HEADER`], which works on any
//! queue type (a refresh queue left classic by an earlier version keeps no `x-delivery-count`,
//! and the copy a failed request is put back as starts a new one anyway): a failed request is published again with
//! the count raised and the original acked. A delivery the broker marks `redelivered` was in hand
//! of a consumer that never settled it (a crash, a lost link): it counts as a failure too, and is
//! put back counted before it is run again, so even a crash that unwinds nothing is counted.
//! At `amqp.delivery_limit` failures the request goes to the dead-letter queue with its reason
//! in the `x-mcp-worker-reason` header. Requests are advisory (the scan covers a lost one), so a
//! dead-lettered request costs the user nothing but the early refresh.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::messages::RefreshRequest;
use crate::queue::{Broker, Consumer, Delivery, Header};

/// Counts the failed deliveries of a request: the shell republishes a failed request with this
/// count raised, since the republished copy starts a new `x-delivery-count`.
pub const FAILURES_HEADER: &str = "x-mcp-failures";

/// Where requests come from and where a failing one ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    /// The refresh queue, where a failed request is put back counted.
    pub queue: String,
    pub dead_letter_queue: String,
    /// Failures after which a request is dead-lettered (`amqp.delivery_limit`).
    pub delivery_limit: u32,
}

/// What to do with one delivery of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Handle it.
    Run,
    /// Its previous delivery ended unsettled: put it back with this many failures, unhandled.
    Count(u32),
    /// It failed this many times: dead-letter it.
    DeadLetter(u32),
}

/// The rule: `counted` failures from the header, plus one if the broker redelivered it.
pub(crate) fn attempt(counted: u32, redelivered: bool, limit: u32) -> Attempt {
    let failures = counted.saturating_add(u32::from(redelivered));
    if failures >= limit {
        Attempt::DeadLetter(failures)
    } else if redelivered {
        Attempt::Count(failures)
    } else {
        Attempt::Run
    }
}

/// Takes requests until `shutdown`, running `handle` on each readable one (a lost consumer is
/// resumed on the broker's next link). This is the refresher's loop, and the seam its tests use
/// with a handler that panics.
pub async fn serve_requests<H, F>(
    broker: &Broker,
    mut requests: Consumer,
    shutdown: &CancellationToken,
    limits: &RequestLimits,
    handle: H,
) where
    H: Fn(RefreshRequest) -> F,
    F: Future<Output = ()>,
{
    loop {
        let Some(delivery) = broker.next(&mut requests, shutdown).await else { return };
        let failures = delivery.count_header(FAILURES_HEADER);
        let settled = match attempt(failures, delivery.redelivered, limits.delivery_limit) {
            Attempt::Run => match serde_json::from_slice::<RefreshRequest>(&delivery.body) {
                Ok(request) => match crate::panics::caught(handle(request)).await {
                    Ok(()) => Ok(()),
                    Err(panic) => {
                        tracing::error!(panic = %panic, "handling a refresh request panicked; it is counted and retried");
                        count(broker, limits, &delivery, failures.saturating_add(1)).await
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable refresh request dropped");
                    Ok(())
                }
            },
            Attempt::Count(failures) => count(broker, limits, &delivery, failures).await,
            Attempt::DeadLetter(failures) => {
                let reason = format!("delivery_limit: the refresh request failed {failures} times");
                tracing::warn!(reason = %reason, "dead-lettering the message");
                broker.publisher().dead_letter(&limits.dead_letter_queue, &delivery, &reason).await.map(drop)
            }
        };
        // The copy (counted or dead-lettered) is confirmed: the original can go. An ack that fails
        // on a lost channel is noticed by the next `broker.next`.
        let done = match settled {
            Ok(()) => delivery.ack().await,
            Err(e) => {
                tracing::warn!(error = %e, "could not put a failed refresh request back; requeueing it");
                delivery.requeue().await
            }
        };
        if let Err(e) = done {
            tracing::debug!(error = %e, "could not settle a refresh request");
        }
    }
}

/// Publishes `delivery` again on the refresh queue, counted.
async fn count(
    broker: &Broker,
    limits: &RequestLimits,
    delivery: &Delivery,
    failures: u32,
) -> Result<(), crate::queue::QueueError> {
    let counted = [(FAILURES_HEADER, Some(Header::Count(failures)))];
    broker.publisher().republish(&limits.queue, delivery, &counted).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_request_runs_and_a_redelivered_one_is_counted_first() {
        assert_eq!(attempt(0, false, 5), Attempt::Run);
        assert_eq!(attempt(3, false, 5), Attempt::Run);
        assert_eq!(attempt(0, true, 5), Attempt::Count(1));
        assert_eq!(attempt(3, true, 5), Attempt::Count(4));
    }

    #[test]
    fn a_request_is_dead_lettered_at_the_limit_however_it_failed() {
        assert_eq!(attempt(5, false, 5), Attempt::DeadLetter(5));
        assert_eq!(attempt(4, true, 5), Attempt::DeadLetter(5));
        assert_eq!(attempt(u32::MAX, true, 5), Attempt::DeadLetter(u32::MAX));
        assert_eq!(attempt(0, true, 1), Attempt::DeadLetter(1));
    }
}
