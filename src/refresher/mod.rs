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
//!
//! On shutdown it drains (see [`Refresher::run`]): a refresh the provider has answered is always
//! written, since with rotation its answer holds the grant's only live refresh token.

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
use crate::store::{DueToken, Leased, StoreError, TokenStatus, TokenStore, UnreadableToken};

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

    /// Scans on a schedule and serves refresh requests until `shutdown`, then drains: nothing new
    /// is claimed, the refreshes in flight finish and write their results (each is bounded by
    /// the provider request timeout), and only then does this return. A refresh cut off between
    /// the provider's answer and the write would lose the rotated refresh token, and a strict
    /// provider revokes the grant when the old one is presented next.
    ///
    /// tokio-cron-scheduler only rings: its job asks the one scan loop here for a scan, so scans
    /// never overlap (the start-up scan included) and every scan is one this function awaits.
    pub(crate) async fn run(
        self: Arc<Self>,
        broker: Broker,
        requests: Consumer,
        shutdown: CancellationToken,
    ) -> Result<(), RefresherError> {
        // Capacity one: ticks while a scan runs fold into one scan after it.
        let (ring, mut rung) = tokio::sync::mpsc::channel::<()>(1);
        let mut scheduler = JobScheduler::new().await.map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        let job = Job::new_repeated_async(self.config.interval, move |_, _| {
            let _ = ring.try_send(());
            Box::pin(async {})
        })
        .map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        scheduler.add(job).await.map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        scheduler.start().await.map_err(|e| RefresherError::Scheduler(e.to_string()))?;
        let scans = {
            let (refresher, shutdown) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                // The first scan at once, to catch up rather than wait a whole interval.
                loop {
                    refresher.scan_and_log(&shutdown).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        rang = rung.recv() => if rang.is_none() { return },
                    }
                }
            })
        };

        let handle = |request| {
            let (refresher, shutdown) = (self.clone(), shutdown.clone());
            async move { refresher.handle_request(request, &shutdown).await }
        };
        // Returns once `shutdown` fired, after the request in hand is done.
        serve_requests(&broker, requests, &shutdown, &self.config.requests, handle).await;
        let _ = scheduler.shutdown().await;
        if let Err(e) = scans.await {
            tracing::error!(error = %e, "the refresh scan task failed");
        }
        Ok(())
    }

    async fn scan_and_log(self: &Arc<Self>, shutdown: &CancellationToken) {
        match self.scan(Utc::now(), shutdown).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(tokens = n, "refresh scan done"),
            Err(e) => tracing::warn!(error = %e, "refresh scan failed; retrying at the next interval"),
        }
    }

    /// Refreshes every token due at `now`; returns how many were attempted. Counts the backlog
    /// first, for the metrics.
    /// Once `shutdown` fires it starts no more, and returns when those started have finished.
    pub(crate) async fn scan(
        self: &Arc<Self>,
        now: DateTime<Utc>,
        shutdown: &CancellationToken,
    ) -> Result<usize, StoreError> {
        let until = crate::dates::after(now, self.config.lead);
        match self.tokens.backlog(now, until).await {
            Ok(counts) => self.metrics.backlog(backlog(now, self.config.lead, counts)),
            Err(e) => tracing::warn!(error = %e, "could not count the refresh backlog"),
        }
        let due = self.tokens.due(now, until, self.config.batch).await?;
        let count = due.len();
        let mut running = JoinSet::new();
        for token in due {
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                slot = self.slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let (refresher, shutdown) = (self.clone(), shutdown.clone());
            running.spawn(async move {
                let outcome = refresher.refresh(&token, &shutdown).await;
                drop(slot);
                outcome
            });
        }
        while running.join_next().await.is_some() {}
        Ok(count)
    }

    /// One worker request: refresh the user's token if it is for this refresher's provider.
    async fn handle_request(&self, request: RefreshRequest, shutdown: &CancellationToken) {
        if request.provider != self.oauth.provider() {
            tracing::warn!("refresh request for a provider this refresher does not serve");
        } else if let Err(e) =
            self.refresh_user(&request.user_id, request.needed_until, request.refused, shutdown).await
        {
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
        shutdown: &CancellationToken,
    ) -> Result<Option<RefreshOutcome>, StoreError> {
        let Some(token) = self.tokens.get(user_id).await? else { return Ok(None) };
        let needed =
            refused || token.expires_at < needed_until || is_due(Utc::now(), token.expires_at, self.config.lead);
        if token.status != TokenStatus::Active || !needed {
            return Ok(None);
        }
        let due = DueToken { user_id: token.user_id, version: token.version };
        let _slot = self.slots.acquire().await.expect("the semaphore is never closed");
        Ok(self.refresh(&due, shutdown).await)
    }

    /// One claim → refresh → fenced write; `None` when `shutdown` fired before the claim (while
    /// it waited for the rate limiter), so nothing was tried.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn refresh(&self, due: &DueToken, shutdown: &CancellationToken) -> Option<RefreshOutcome> {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = self.limiter.acquire() => {}
        }
        let outcome = match self.try_refresh(due).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(error = %e, "refresh could not be completed; the lease will lapse and it is retried");
                RefreshOutcome::RetryLater
            }
        };
        self.metrics.refreshed(outcome.as_str());
        Some(outcome)
    }

    /// Between the provider's answer and the fenced write there is no await but the write's own:
    /// that is the window in which a killed process loses a rotated refresh token.
    async fn try_refresh(&self, due: &DueToken) -> Result<RefreshOutcome, StoreError> {
        let now = Utc::now();
        let lease_until = crate::dates::after(now, self.config.lease);
        let claimed = match self.tokens.claim(due, &self.owner, now, lease_until).await? {
            None => return Ok(RefreshOutcome::NotClaimed),
            Some(Leased::Unreadable(token)) => return self.retire_unreadable(&token).await,
            Some(Leased::Token(claimed)) => claimed,
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
                    let reason = if claimed.lapsed_lease {
                        // Not necessarily the user's doing: an earlier refresh was cut off after
                        // the provider may have rotated the token (see `ClaimedToken::lapsed_lease`).
                        tracing::warn!(error = %e, lapsed_lease = true, "the provider refused the grant after an earlier refresh of it was cut off (its lease lapsed without a write): the provider may have rotated the token then; the user must reconnect");
                        format!("{} (after an earlier refresh was cut off before its result was stored)", e.detail)
                    } else {
                        tracing::warn!(error = %e, "the provider refused the grant; the user must reconnect");
                        e.detail.clone()
                    };
                    self.events
                        .emit(TokenEventKind::ReauthRequired, self.oauth.provider(), &claimed.user_id, &reason)
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

    /// A token that cannot be read leaves the refresher's queue once, as `reauth_required` with
    /// the event and its reason, instead of being claimed and given up at every lease.
    async fn retire_unreadable(&self, token: &UnreadableToken) -> Result<RefreshOutcome, StoreError> {
        if !self.tokens.retire_unreadable(token, Utc::now()).await? {
            return Ok(RefreshOutcome::Superseded);
        }
        tracing::warn!(problem = %token.problem, "a stored token cannot be read; the user must reconnect");
        let reason = format!("the stored token cannot be read ({}); connect again", token.problem);
        self.events.emit(TokenEventKind::ReauthRequired, self.oauth.provider(), &token.user_id, &reason).await;
        Ok(RefreshOutcome::ReauthRequired)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefresherError {
    #[error("the refresh scheduler failed: {0}")]
    Scheduler(String),
}
