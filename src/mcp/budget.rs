//! The process-wide budget of MCP response bytes in flight.
//!
//! Each response is limited on its own (`mcp.max_response_bytes`), but many large answers at once
//! would still add up to more memory than the process has. So every byte of an MCP answer is
//! taken from one budget (`mcp.response_budget_bytes`, a semaphore of bytes) as it arrives, and
//! given back only once the result built from it is gone: a failed call's at once, a good one's
//! when its holder drops the result's `HeldBytes` (the worker, once the reply is published). A reader
//! that finds the budget spent waits for bytes to come back, at most until its call's deadline;
//! then it fails, handing its bytes back so that others can finish.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The budget shared by every MCP client of the process.
pub(crate) struct ResponseBudget {
    bytes: Arc<Semaphore>,
    in_flight: AtomicU64,
    peak: AtomicU64,
    metrics: Arc<Metrics>,
}

/// The budget would not give a response its bytes before the call's deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the answer did not fit in mcp.response_budget_bytes before the call's time ran out")]
pub(crate) struct OverBudget;

impl ResponseBudget {
    pub(crate) fn new(bytes: u32, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            bytes: Arc::new(Semaphore::new(bytes as usize)),
            in_flight: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            metrics,
        })
    }

    /// An account for one call's responses, whose bytes may be waited for until `within` has
    /// passed.
    pub(crate) fn account(self: &Arc<Self>, within: Duration) -> Arc<Account> {
        Arc::new(Account {
            budget: self.clone(),
            deadline: Instant::now() + within,
            held: Mutex::new(None),
            waiting: AtomicBool::new(false),
        })
    }

    /// Counts bytes taken from or given back to the budget, for the gauges. Counted apart from
    /// the semaphore, so the gauges show what was really held, whatever the semaphore allowed.
    fn count(&self, taken: u64, given_back: u64) {
        let in_flight = if taken > 0 {
            self.in_flight.fetch_add(taken, Ordering::SeqCst) + taken
        } else {
            self.in_flight.fetch_sub(given_back, Ordering::SeqCst) - given_back
        };
        let peak = self.peak.fetch_max(in_flight, Ordering::SeqCst).max(in_flight);
        self.metrics.mcp_response_bytes(in_flight, peak);
    }
}

/// The bytes one call holds from the budget; they go back when the last holder drops it (the
/// result's `HeldBytes`, or the call when it failed, and the response reader once it has finished).
pub(crate) struct Account {
    budget: Arc<ResponseBudget>,
    deadline: Instant,
    held: Mutex<Option<OwnedSemaphorePermit>>,
    /// A reader is waiting for bytes right now: if the call's time runs out meanwhile, the
    /// budget, not the server, is why.
    waiting: AtomicBool,
}

impl Account {
    /// Takes `bytes` from the budget, waiting for them until the call's deadline.
    pub(crate) async fn take(&self, bytes: usize) -> Result<(), OverBudget> {
        if bytes == 0 {
            return Ok(());
        }
        let wanted = u32::try_from(bytes).map_err(|_| OverBudget)?;
        let permit = match self.budget.bytes.clone().try_acquire_many_owned(wanted) {
            Ok(permit) => permit,
            Err(_) => {
                self.waiting.store(true, Ordering::SeqCst);
                let waited =
                    tokio::time::timeout_at(self.deadline, self.budget.bytes.clone().acquire_many_owned(wanted)).await;
                self.waiting.store(false, Ordering::SeqCst);
                match waited {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(OverBudget),
                }
            }
        };
        self.budget.count(bytes as u64, 0);
        let mut held = self.held.lock().expect("the account's lock is never poisoned");
        match held.as_mut() {
            Some(all) => all.merge(permit),
            None => *held = Some(permit),
        }
        Ok(())
    }

    /// The bytes this account holds now: every answer it read, for as long as it lives.
    pub(crate) fn held_bytes(&self) -> usize {
        let held = self.held.lock().expect("the account's lock is never poisoned");
        held.as_ref().map_or(0, |permit| permit.num_permits())
    }

    /// Whether a reader of this call is waiting for the budget at this moment.
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let held = self.held.get_mut().map(Option::take).unwrap_or_default();
        if let Some(permit) = held {
            self.budget.count(0, permit.num_permits() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_come_back_when_the_account_is_dropped() {
        let budget = ResponseBudget::new(100, Arc::new(Metrics::new()));
        let first = budget.account(Duration::from_secs(5));
        first.take(60).await.unwrap();
        first.take(40).await.unwrap();
        assert_eq!(budget.bytes.available_permits(), 0);
        drop(first);
        assert_eq!(budget.bytes.available_permits(), 100);
        assert_eq!(budget.in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(budget.peak.load(Ordering::SeqCst), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_waits_for_bytes_until_the_deadline_then_fails() {
        let budget = ResponseBudget::new(100, Arc::new(Metrics::new()));
        let holder = budget.account(Duration::from_secs(60));
        holder.take(100).await.unwrap();
        let starved = budget.account(Duration::from_secs(1));
        assert!(starved.take(1).await.is_err());
        assert!(!starved.is_waiting());

        let patient = budget.account(Duration::from_secs(60));
        let waiting = tokio::spawn({
            let patient = patient.clone();
            async move { patient.take(50).await }
        });
        tokio::task::yield_now().await;
        assert!(patient.is_waiting());
        drop(holder);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(budget.bytes.available_permits(), 50);
    }
}
