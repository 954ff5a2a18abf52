//! The background refresher: renews tokens before they expire, so a job never waits on OAuth.
//!
//! Every `refresher.interval_secs` (tokio-cron-scheduler; once at start to catch up) it scans for
//! due tokens on the `expires_at` index, and it also takes per-user requests from the worker
//! (`amqp.refresh_queue`). Each token is renewed under a **fenced lease** so that any number of
//! replicas can run this at once without two of them presenting the same refresh token, which a
//! strict provider treats as theft and answers by revoking the whole grant:
//!
//! 1. claim: `findOneAndUpdate` on the version seen by the scan sets `lease_owner`/`lease_until`
//!    and bumps `version`; only one replica wins;
//! 2. refresh at the provider (paced by a rate limiter, taken *before* the claim so waiting does
//!    not eat the lease);
//! 3. write: only if the document still holds the claimed version, refresh token and owner
//!    (compare-and-swap). The same fence guards marking `reauth_required` after a permanent
//!    failure, which is the "re-read, then mark only if unchanged" rule done atomically.

mod policy;
mod rate;
mod requests;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use policy::{backlog, is_due, retry_at};
use rate::RateLimiter;
pub use requests::{FAILURES_HEADER, RequestLimits, serve_requests};

use crate::events::Events;
use crate::messages::{RefreshRequest, TokenEventKind};
use crate::metrics::Metrics;
use crate::oauth::{FailureKind, OAuthClient};
use crate::queue::{Broker, Consumer};
use crate::store::{DueToken, StoreError, TokenStatus, TokenStore};

#[derive(Debug, Clone)]
pub(crate) struct RefresherConfig {
    pub(crate) interval: Duration,
    pub(crate) lead: Duration,
    pub(crate) lease: Duration,
    pub(crate) concurrency: usize,
    pub(crate) batch: i64,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) rate_per_minute: u32,
    /// Where worker requests come from, and how often one may fail before it is dead-lettered.
    pub(crate) requests: RequestLimits,
}

/// How one refresh attempt ended, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshOutcome {
    Refreshed,
    /// Another replica holds it, or it changed since the scan.
    NotClaimed,
    /// The provider refused the grant; the user must reconnect.
    ReauthRequired,
    /// Will be tried again after a backoff.
    RetryLater,
    /// The document moved on while we held the lease (reconnected, deleted); nothing written.
    Superseded,
}

impl RefreshOutcome {
    /// The outcome's label in the metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Refreshed => "refreshed",
            RefreshOutcome::NotClaimed => "not_claimed",
            RefreshOutcome::ReauthRequired => "reauth_required",
            RefreshOutcome::RetryLater => "retry_later",
            RefreshOutcome::Superseded => "superseded",
        }
    }
}

pub(crate) struct Refresher {
    tokens: TokenStore,
    oauth: Arc<OAuthClient>,
    events: Events,
    config: RefresherConfig,
    owner: String,
    limiter: RateLimiter,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Refresher {
    pub(crate) fn new(
        tokens: TokenStore,
        oauth: Arc<OAuthClient>,
        events: Events,
        config: RefresherConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            limiter: RateLimiter::per_minute(config.rate_per_minute),
            slots: Arc::new(Semaphore::new(config.concurrency)),
            owner: crate::owner::new_owner_id(),
            tokens,
            oauth,
            events,
            config,
        }
    }

    /// Scans on a schedule and serves refresh requests until `shutdown`; refreshes in flight
    /// finish first (each is bounded by the provider request timeout).
    pub(crate) async fn run(
        self: Arc<Self>,
        broker: Broker,
        requests: Consumer,
        shutdown: CancellationToken,
    ) -> Result<(), RefresherError> {
        let scanning = Arc::new(tokio::sync::Mutex::new(()));
        let scheduler = JobScheduler::new().await.map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        let refresher = self.clone();
        let job = Job::new_repeated_async(self.config.interval, move |_, _| {
            let refresher = refresher.clone();
            let scanning = scanning.clone();
            Box::pin(async move {
                // A scan still running (a large backlog) is not joined by a second one.
                let Ok(_guard) = scanning.try_lock() else { return };
                refresher.scan_and_log().await;
            })
        })
        .map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        scheduler.add(job).await.map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        scheduler.start().await.map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        // Catch up at start rather than waiting a whole interval.
        let first = tokio::spawn(self.clone().scan_and_log_owned());

        let handle = |request| {
            let refresher = self.clone();
            async move { refresher.handle_request(request).await }
        };
        serve_requests(&broker, requests, &shutdown, &self.config.requests, handle).await;
        let mut scheduler = scheduler;
        let _ = scheduler.shutdown().await;
        let _ = first.await;
        Ok(())
    }

    async fn scan_and_log_owned(self: Arc<Self>) {
        self.scan_and_log().await;
    }

    async fn scan_and_log(self: &Arc<Self>) {
        match self.scan(Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tokens = n, "refresh scan done"),
            Err(e) => tracing::warn!(error = %e, "refresh scan failed; retrying at the next interval"),
        }
    }

    /// Refreshes every token due at `now`; returns how many were attempted. Counts the backlog
    /// first, for the metrics.
    pub(crate) async fn scan(self: &Arc<Self>, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let until = crate::dates::after(now, self.config.lead);
        match self.tokens.backlog(now, until).await {
            Ok(counts) => self.metrics.backlog(backlog(now, self.config.lead, counts)),
            Err(e) => tracing::warn!(error = %e, "could not count the refresh backlog"),
        }
        let due = self.tokens.due(now, until, self.config.batch).await?;
        let count = due.len();
        let mut running = JoinSet::new();
        for token in due {
            let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
            let refresher = self.clone();
            running.spawn(async move {
                let outcome = refresher.refresh(&token).await;
                drop(slot);
                outcome
            });
        }
        while running.join_next().await.is_some() {}
        Ok(count)
    }

    /// One worker request: refresh the user's token if it is for this refresher's provider.
    async fn handle_request(&self, request: RefreshRequest) {
        if request.provider != self.oauth.provider() {
            tracing::warn!("refresh request for a provider this refresher does not serve");
        } else if let Err(e) = self.refresh_user(&request.user_id, request.needed_until, request.refused).await {
            tracing::warn!(error = %e, "refresh request failed; the scan will retry");
        }
    }

    /// Refreshes one user's token now if it expires before `needed_until`, is due anyway, or was
    /// `refused` by an MCP server.
    pub(crate) async fn refresh_user(
        &self,
        user_id: &str,
        needed_until: DateTime<Utc>,
        refused: bool,
    ) -> Result<Option<RefreshOutcome>, StoreError> {
        let Some(token) = self.tokens.get(user_id).await? else { return Ok(None) };
        let needed =
            refused || token.expires_at < needed_until || is_due(Utc::now(), token.expires_at, self.config.lead);
        if token.status != TokenStatus::Active || !needed {
            return Ok(None);
        }
        let due = DueToken { user_id: token.user_id, version: token.version };
        let _slot = self.slots.acquire().await.expect("the semaphore is never closed");
        Ok(Some(self.refresh(&due).await))
    }

    /// One claim → refresh → fenced write.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn refresh(&self, due: &DueToken) -> RefreshOutcome {
        let outcome = match self.try_refresh(due).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, "refresh could not be completed; the lease will lapse and it is retried");
                RefreshOutcome::RetryLater
            }
        };
        self.metrics.refreshed(outcome.as_str());
        outcome
    }

    async fn try_refresh(&self, due: &DueToken) -> Result<RefreshOutcome, StoreError> {
        self.limiter.acquire().await;
        let now = Utc::now();
        let lease_until = crate::dates::after(now, self.config.lease);
        let Some(claimed) = self.tokens.claim(due, &self.owner, now, lease_until).await? else {
            return Ok(RefreshOutcome::NotClaimed);
        };
        match self.oauth.refresh(&claimed.refresh_token, Utc::now()).await {
            Ok(tokens) => {
                if self.tokens.complete_refresh(&claimed, &tokens, Utc::now()).await? {
                    tracing::debug!("token refreshed");
                    Ok(RefreshOutcome::Refreshed)
                } else {
                    tracing::warn!("the token changed while it was being refreshed; the new tokens are discarded");
                    Ok(RefreshOutcome::Superseded)
                }
            }
            Err(e) => match e.kind {
                FailureKind::Permanent => {
                    if !self.tokens.mark_reauth_required(&claimed, Utc::now()).await? {
                        return Ok(RefreshOutcome::Superseded);
                    }
                    tracing::warn!(error = %e, "the provider refused the grant; the user must reconnect");
                    self.events
                        .emit(TokenEventKind::ReauthRequired, self.oauth.provider(), &claimed.user_id, &e.detail)
                        .await;
                    Ok(RefreshOutcome::ReauthRequired)
                }
                FailureKind::Transient { .. } | FailureKind::Misconfigured | FailureKind::UnusableToken => {
                    let retry_after = match e.kind {
                        FailureKind::Transient { retry_after } => retry_after,
                        _ => None,
                    };
                    let at = retry_at(
                        Utc::now(),
                        claimed.failures,
                        self.config.retry_initial,
                        self.config.retry_max,
                        retry_after,
                        rand::random(),
                    );
                    if e.kind == FailureKind::Misconfigured {
                        tracing::error!(error = %e, "the provider refuses this client: check providers.* settings");
                    } else if e.kind == FailureKind::UnusableToken {
                        tracing::error!(error = %e, retry_at = %at, "the provider answered a refresh with an unusable token; nothing stored");
                    } else {
                        tracing::info!(error = %e, retry_at = %at, "transient refresh failure; retrying later");
                    }
                    self.tokens.release(&claimed, at).await?;
                    Ok(RefreshOutcome::RetryLater)
                }
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefresherError {
    #[error("the refresh scheduler failed: {0}")]
    Scheduler(String),
}
