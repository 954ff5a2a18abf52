//! The job consumer: takes deliveries off the jobs queue, runs each on its own task (at most
//! `worker.concurrency` at once), publishes the reply, and acks the job only once the broker has
//! confirmed that reply.
//!
//! The decisions live elsewhere: [`decision`] is the job path's rules as one pure function, with
//! [`policy`] the smaller rules it is built of; [`execute`] performs the steps it asks for up to a
//! [`decision::Disposition`]. This file takes deliveries and settles them as that says.

mod decision;
mod envelope;
mod execute;
pub(crate) mod policy;
mod token_cache;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::crypto::TokenCipher;
use crate::early_refresh::EarlyRefresh;
use crate::events::Events;
use crate::mcp::McpClients;
use crate::messages::TokenEventKind;
use crate::metrics::Metrics;
use crate::once::OncePer;
use crate::provider::Provider;
use crate::queue::{Broker, Consumer, Delivery, Published, Publisher, QueueError};
use crate::registry::Registry;
use crate::store::{ResultStore, Store, TokenStores};
use crate::token_events::UserCache;
use decision::{Disposition, Record, RefreshNeeded, RefusedToken, ReplyTarget};
use envelope::{Carry, Envelope};
use execute::Disposed;
use token_cache::TokenCache;

/// The settings the job path reads, resolved once at start.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) concurrency: usize,
    pub(crate) job_limits: crate::job::Limits,
    pub(crate) call_timeout: Duration,
    pub(crate) dead_letter_queue: String,
    /// Deliveries that may end without an ack before the worker dead-letters the job.
    pub(crate) delivery_limit: u32,
    /// Added to the call's budget: a token must be valid this much longer than the call may take.
    pub(crate) clock_skew: Duration,
    pub(crate) max_deferrals: u32,
    /// Times a job may wait for an unreachable database before it is answered `internal`.
    pub(crate) max_waits: u32,
    pub(crate) delay_queue: String,
    /// How long jobs in flight may take to finish after shutdown was asked for.
    pub(crate) shutdown_grace: Duration,
    /// This process's name, the prefix of its job claims.
    pub(crate) owner: String,
    /// How long a job claim holds (longer than a call may take).
    pub(crate) claim_lease: Duration,
    /// How long a job's result is kept to recognise redeliveries.
    pub(crate) results_ttl: Duration,
    /// How long a token read from the database is reused; zero reads it for every job.
    pub(crate) token_cache_ttl: Duration,
    /// For each retry in turn, the delay queues it may wait in (one is picked at random, for
    /// jitter), with their delays.
    pub(crate) retries: Vec<Vec<(String, Duration)>>,
}

pub(crate) struct Worker {
    config: WorkerConfig,
    registry: Arc<Registry>,
    results: ResultStore,
    /// Where tokens are read on a cache miss (and marked when an MCP server refuses one).
    token_stores: TokenStores,
    cipher: Arc<TokenCipher>,
    mcp: Arc<McpClients>,
    /// Answers `tools/list` jobs, and knows the annotations of the tools called.
    catalog: Arc<Catalog>,
    publisher: Publisher,
    early_refresh: EarlyRefresh,
    events: Events,
    tokens: TokenCache,
    /// Users whose unreadable token was already logged.
    unreadable: OncePer,
    metrics: Arc<Metrics>,
}

/// What a worker reads from and writes to, besides the broker it consumes from.
pub(crate) struct WorkerPeers {
    pub(crate) registry: Arc<Registry>,
    pub(crate) store: Store,
    pub(crate) cipher: Arc<TokenCipher>,
    pub(crate) mcp: Arc<McpClients>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) publisher: Publisher,
    pub(crate) early_refresh: EarlyRefresh,
    pub(crate) events: Events,
    pub(crate) metrics: Arc<Metrics>,
}

impl Worker {
    pub(crate) fn new(config: WorkerConfig, peers: WorkerPeers) -> Self {
        let WorkerPeers { registry, store, cipher, mcp, catalog, publisher, early_refresh, events, metrics } = peers;
        let tokens = TokenCache::new(config.token_cache_ttl);
        let unreadable = OncePer::new(10_000);
        let (results, token_stores) = (store.results(), store.token_stores(&cipher));
        Self {
            config,
            registry,
            results,
            token_stores,
            cipher,
            mcp,
            catalog,
            publisher,
            early_refresh,
            events,
            tokens,
            unreadable,
            metrics,
        }
    }

    /// Whether the token cache is on, and so needs the token events (see [`crate::token_events`]);
    /// without them it stays off.
    pub(crate) fn caches_tokens(&self) -> bool {
        self.tokens.enabled()
    }

    /// Consumes until `shutdown` fires, then stops taking jobs and gives the ones in flight the
    /// grace period. A lost consumer is resumed on the broker's next link; jobs in flight then
    /// finish, but their deliveries can no longer be acked and come back (see [`Broker::next`]).
    pub(crate) async fn run(self: Arc<Self>, broker: Broker, mut jobs: Consumer, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut in_flight = JoinSet::new();
        loop {
            // Hold a slot before taking a delivery, so at most `concurrency` jobs run at once and
            // the rest wait in the broker (within prefetch) rather than in this process.
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let Some(delivery) = broker.next(&mut jobs, &shutdown).await else { break };
            let worker = self.clone();
            in_flight.spawn(async move {
                // A panic requeues the job, so its delivery count grows to `amqp.delivery_limit`.
                delivery.handle_or_requeue(|delivery| worker.handle(delivery)).await;
                drop(slot);
            });
            // Reap finished tasks so the set does not grow with every job ever run.
            while in_flight.try_join_next().is_some() {}
        }
        if let Err(e) = jobs.cancel().await {
            tracing::debug!(error = %e, "cancelling the consumer failed; the channel is already gone");
        }
        // Jobs in flight get the grace period to finish. What is still running then is dropped
        // unacked: the broker delivers it again once this process's channel closes.
        let drained =
            tokio::time::timeout(self.config.shutdown_grace, async { while in_flight.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            tracing::warn!(jobs = in_flight.len(), "grace period over; unfinished jobs are left for redelivery");
            in_flight.abort_all();
            while in_flight.join_next().await.is_some() {}
        }
    }

    /// Runs one delivery to its end: reply published and confirmed, then ack. If the reply cannot
    /// be confirmed the job is requeued, never acked, so it is not lost. Logs one `job done`
    /// line at info, with the user as a keyed pseudonym ([`TokenCipher::pseudonym`]), never the
    /// id itself.
    #[tracing::instrument(skip_all, fields(job_id, tool, user, read_only, destructive))]
    async fn handle(&self, delivery: Delivery) {
        let started = Instant::now();
        let Disposed { job, disposition, call_time, held, hints } = self.dispose(&delivery).await;
        let span = tracing::Span::current();
        if let Some(job) = &job {
            span.record("job_id", job.job_id.as_str());
            let tool = match job.method {
                crate::job::Method::CallTool => job.tool.as_str(),
                crate::job::Method::ListTools => "tools/list",
            };
            span.record("tool", tool);
            span.record("user", self.cipher.pseudonym(&job.user_id));
        }
        // What the tool's annotations say, when the catalog has its list (they decided whether
        // the call was claimed: see `policy::guarantee`).
        if let Some(read_only) = hints.and_then(|h| h.read_only) {
            span.record("read_only", read_only);
        }
        if let Some(destructive) = hints.and_then(|h| h.destructive) {
            span.record("destructive", destructive);
        }
        let outcome = disposition.outcome();
        // Boxed: only the short publish-and-ack needs this state, not the long MCP call before it,
        // which keeps each job's task about 5 KB smaller (measured with 1000 jobs in flight).
        match Box::pin(self.settle(&delivery, &disposition)).await {
            Ok(()) => {
                let duration = started.elapsed();
                // What this process added to the job: everything but the MCP call itself.
                let added_ms = duration.saturating_sub(call_time).as_secs_f64() * 1000.0;
                let duration_ms = duration.as_secs_f64() * 1000.0;
                self.metrics.job_settled(disposition.settled(), duration);
                tracing::info!(outcome, duration_ms, added_ms, redelivered = delivery.redelivered, "job done");
            }
            Err(e) => {
                tracing::error!(error = %e, outcome, "could not settle the job; requeueing it");
                if let Err(e) = delivery.requeue().await {
                    // The channel is gone; the broker requeues every unacked delivery of it.
                    tracing::warn!(error = %e, "requeue failed");
                }
            }
        }
        // Only now, with the reply published (or the job requeued), is the result's memory given
        // back to the response budget: results awaiting publication are bounded by it too.
        drop(held);
    }

    /// Publishes what the disposition asks for, waits for the broker's confirms, then acks.
    async fn settle(&self, delivery: &Delivery, disposition: &Disposition) -> Result<(), QueueError> {
        let envelope = Envelope::of(delivery);
        match disposition {
            Disposition::Reply { to, reply, record } => {
                let body = reply.to_bytes();
                self.record(record.as_ref(), &body).await;
                self.publish_reply(to, &body).await?
            }
            Disposition::Replay { to, body } => self.publish_reply(to, body).await?,
            Disposition::Retry { level, claim } => {
                let choices = &self.config.retries[*level];
                let (queue, _) = &choices[rand::random::<usize>() % choices.len()];
                let carry =
                    Carry { retries: envelope.retries.saturating_add(1), ..Carry::of(&envelope, claim.as_ref()) };
                self.publisher.republish(queue, delivery, &carry.headers()).await?;
            }
            Disposition::Wait { claim, waits } => {
                let carry = Carry { waits: *waits, ..Carry::of(&envelope, claim.as_ref()) };
                self.publisher.republish(&self.config.delay_queue, delivery, &carry.headers()).await?;
            }
            Disposition::Reauth { to, reply, record, token } => {
                self.mark_refused(token).await;
                let body = reply.to_bytes();
                self.record(record.as_ref(), &body).await;
                self.publish_reply(to, &body).await?
            }
            Disposition::DeadLetter { reason, to, reply, record } => {
                tracing::warn!(reason = %reason, "dead-lettering the message");
                if let Some(to) = to {
                    let body = reply.to_bytes();
                    self.record(record.as_ref(), &body).await;
                    self.publish_reply(to, &body).await?;
                }
                self.publisher.dead_letter(&self.config.dead_letter_queue, delivery, reason).await?;
            }
            Disposition::Defer { deferrals, refresh, claim, refused_version } => {
                self.request_refresh(refresh).await;
                let carry = Carry {
                    deferrals: *deferrals,
                    refused_version: *refused_version,
                    ..Carry::of(&envelope, claim.as_ref())
                };
                self.publisher.republish(&self.config.delay_queue, delivery, &carry.headers()).await?;
            }
        }
        delivery.ack().await
    }

    /// Records a reply that ends its job, so a redelivery replays it. A failure is logged and
    /// counted, and the reply still goes out and the job is acked: requeueing instead would run
    /// the tool again once the claim's lease lapsed, while this way only a lost ack can.
    async fn record(&self, record: Option<&Record>, body: &[u8]) {
        let Some(record) = record else { return };
        if let Err(e) = self.results.complete(&record.job_id, &record.call, body, Utc::now(), record.expires_at).await {
            self.metrics.reply_not_recorded();
            tracing::warn!(error = %e, "could not record the job's reply; publishing it anyway");
        }
    }

    /// Marks a token the MCP server refused even after its renewal as `reauth_required`, and
    /// announces it, unless the token changed since (the user reconnected meanwhile). Best
    /// effort: the reply says `reauth_required` either way, and the next job tries again.
    async fn mark_refused(&self, token: &RefusedToken) {
        match self.token_stores.get(token.provider).mark_refused(&token.user_id, token.version, Utc::now()).await {
            Ok(true) => {
                tracing::warn!("the MCP server refused the user's renewed token; the user must reconnect");
                let reason = "the MCP server refused the renewed access token";
                self.events.emit(TokenEventKind::ReauthRequired, token.provider, &token.user_id, reason).await;
            }
            Ok(false) => tracing::info!("the refused token was replaced meanwhile; not marked"),
            Err(e) => tracing::warn!(error = %e, "could not mark the refused token"),
        }
    }

    /// Asks the refresher to renew the user's token now (see [`EarlyRefresh::ask`]).
    async fn request_refresh(&self, needed: &RefreshNeeded) {
        self.early_refresh.ask(needed.provider, &needed.user_id, needed.until, needed.refused).await;
    }

    async fn publish_reply(&self, to: &ReplyTarget, body: &[u8]) -> Result<(), QueueError> {
        match self.publisher.reply(&to.queue, to.correlation_id.as_deref(), body).await? {
            Published::Delivered => {}
            Published::Unroutable => {
                tracing::warn!(reply_to = %to.queue, "the reply queue does not exist; the caller is gone");
            }
        }
        Ok(())
    }
}

/// The token cache follows the token events.
impl UserCache for Worker {
    fn forget(&self, provider: Provider, user_id: &str) {
        self.tokens.forget(provider, user_id, Instant::now());
    }

    fn suspend(&self) {
        self.tokens.suspend();
    }

    fn resume(&self) {
        self.tokens.resume(Instant::now());
    }
}
