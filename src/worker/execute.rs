//! From a delivered message to what should happen to it: which reply goes where, whether the
//! message is dead-lettered, or whether it waits for its user's token. Nothing here acks or
//! publishes replies; [`super::Worker`] does that.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Worker;
use super::policy::{self, DeadlinePassed, TokenVerdict};
use crate::job::{self, ErrorCode, InvalidJob, Job, Reply};
use crate::metrics::{Deferral, Settled};
use crate::provider::Provider;
use crate::queue::Delivery;
use crate::registry::{CredentialHeader, ServerSpec};
use crate::store::{Claim, StoreError, StoredToken, TokenStatus};

/// What to do with one delivery.
#[derive(Debug)]
pub(super) enum Disposition {
    /// Publish `reply`, then ack. With `record`, the reply is first stored as the result of that
    /// job id, so a redelivery gets it again instead of running the tool twice.
    Reply { to: ReplyTarget, reply: Reply, record: Option<Record> },
    /// The job already ran: publish its stored reply again, then ack.
    Replay { to: ReplyTarget, body: Vec<u8> },
    /// The MCP server was unavailable: put the job in the `level`-th retry queue, then ack; it runs
    /// again after that queue's delay, taking back its `claim`.
    Retry { level: usize, claim: String },
    /// Another consumer is running this job id, or the database is unreachable: put the job in the
    /// delay queue (not counted as a deferral), then ack; it comes back later, with the claim this
    /// delivery may hold.
    Wait { claim: Option<String> },
    /// Publish `reply` if there is a target, copy the message to the dead-letter queue with
    /// `reason`, then ack.
    DeadLetter { reason: String, to: Option<ReplyTarget>, reply: Reply },
    /// Put the job in the delay queue (its `deferrals`-th wait), then ack; it comes back when
    /// the refresher has had time to renew the user's token, and takes back its `claim`.
    Defer { deferrals: u32, refresh: RefreshNeeded, claim: String },
}

/// Which job a reply is recorded for.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub job_id: String,
    /// When the recorded reply may be forgotten (`worker.results_ttl_secs` from now).
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub(super) struct ReplyTarget {
    pub queue: String,
    pub correlation_id: Option<String>,
}

impl Disposition {
    /// `ok`, the error code, or `deferred`: for the job's log line.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            Disposition::Reply { reply, .. } | Disposition::DeadLetter { reply, .. } => reply.outcome(),
            Disposition::Replay { .. } => "duplicate",
            Disposition::Retry { .. } => "retrying",
            Disposition::Wait { .. } => "waiting",
            Disposition::Defer { .. } => "deferred",
        }
    }

    /// How the metrics count this disposition once it is settled.
    pub(super) fn settled(&self) -> Settled {
        match self {
            Disposition::Reply { reply, .. } => Settled::Answered { code: reply.error_code().map(ErrorCode::as_str) },
            Disposition::DeadLetter { reply, .. } => Settled::DeadLettered { code: reply.outcome() },
            Disposition::Replay { .. } => Settled::Replayed,
            Disposition::Retry { .. } => Settled::Deferred(Deferral::Retry),
            Disposition::Wait { .. } => Settled::Deferred(Deferral::Wait),
            Disposition::Defer { .. } => Settled::Deferred(Deferral::Token),
        }
    }
}

/// A job is waiting for this user's token to be valid until `until`.
#[derive(Debug, Clone)]
pub(super) struct RefreshNeeded {
    pub provider: Provider,
    pub user_id: String,
    pub until: DateTime<Utc>,
}

/// The token lookup's result.
enum Credential {
    Header(Option<CredentialHeader>),
    Refresh(RefreshNeeded),
    Refused(Reply),
    /// The token store could not be reached.
    Unavailable,
}

/// How running a valid job went.
enum Ran {
    Reply(Reply),
    /// It must wait for the user's token to be refreshed.
    Refresh(RefreshNeeded),
    /// The token store could not be reached; nothing was called.
    StoreUnavailable,
}

impl Worker {
    /// Decides what to do with `delivery`; also says how long the MCP call took, if one was made.
    pub(super) async fn dispose(
        &self,
        delivery: &Delivery,
        now: DateTime<Utc>,
    ) -> (Option<Job>, Disposition, Duration) {
        let job = match job::decode(&delivery.body, self.config.job_limits) {
            Ok(job) => job,
            Err(invalid) => return (None, invalid_job(delivery, invalid), Duration::ZERO),
        };
        let Some(queue) = delivery.reply_to.clone() else {
            let reason = "the message has no reply_to property, so no reply could reach the caller".to_owned();
            let reply = Reply::error(Some(&job.job_id), ErrorCode::InvalidJob, reason.clone());
            return (Some(job), Disposition::DeadLetter { reason, to: None, reply }, Duration::ZERO);
        };
        let to =
            ReplyTarget { queue, correlation_id: delivery.correlation_id.clone().or_else(|| Some(job.job_id.clone())) };
        let results = self.store.results();
        // A job back from a delay queue presents the claim it held; a new delivery gets a new one.
        let owner = delivery
            .claim
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.config.owner, uuid::Uuid::new_v4().simple()));
        let lease_until = now + chrono::Duration::from_std(self.config.claim_lease).unwrap_or(chrono::Duration::MAX);
        let expires_at = now + chrono::Duration::from_std(self.config.results_ttl).unwrap_or(chrono::Duration::MAX);
        let mut call_time = Duration::ZERO;
        let disposition = match results
            .claim(&job.job_id, &owner, delivery.claim.is_some(), now, lease_until, expires_at)
            .await
        {
            Ok(Claim::Done(body)) => Disposition::Replay { to, body },
            Ok(Claim::Busy) => wait_unless_late(&job, to, now, None),
            // Its earlier deliveries all ended without an ack: running it again may crash this
            // worker too. The broker's own limit, one delivery later, is only the backstop.
            Ok(Claim::Run) if delivery.failed_deliveries >= self.config.delivery_limit => {
                let reason = format!(
                    "delivered {} times without being settled (amqp.delivery_limit is {})",
                    delivery.failed_deliveries + 1,
                    self.config.delivery_limit
                );
                let reply = Reply::error(Some(&job.job_id), ErrorCode::DeliveryLimit, reason.clone());
                Disposition::DeadLetter { reason, to: Some(to), reply }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the result store is unreachable; the job waits");
                // The claim may have been written before the error: the job keeps its owner.
                wait_unless_late(&job, to, now, Some(owner))
            }
            Ok(Claim::Run) => match self.execute(&job, now, &mut call_time).await {
                Ran::Reply(reply) => {
                    // The longest of a retry's delays decides whether it fits before the deadline.
                    let delays =
                        self.config.retries.iter().map(|level| level.iter().map(|(_, d)| *d).max().unwrap_or_default());
                    match policy::retry_level(reply.error_code(), delivery.retries, delays, Utc::now(), job.deadline) {
                        Some(level) => {
                            tracing::info!(
                                retry = delivery.retries + 1,
                                "the MCP server is unavailable; retrying later"
                            );
                            Disposition::Retry { level, claim: owner }
                        }
                        None => Disposition::Reply {
                            to,
                            reply,
                            record: Some(Record { job_id: job.job_id.clone(), expires_at }),
                        },
                    }
                }
                Ran::StoreUnavailable => wait_unless_late(&job, to, Utc::now(), Some(owner)),
                Ran::Refresh(refresh) => {
                    if delivery.deferrals < self.config.max_deferrals {
                        Disposition::Defer { deferrals: delivery.deferrals + 1, refresh, claim: owner }
                    } else {
                        let provider = refresh.provider;
                        let message =
                            format!("the user's {provider} token could not be renewed in time; try again later");
                        let reply = Reply::error(Some(&job.job_id), ErrorCode::TokenUnavailable, message)
                            .with_provider(provider);
                        Disposition::Reply { to, reply, record: None }
                    }
                }
            },
        };
        (Some(job), disposition, call_time)
    }

    /// Runs a valid job; `call_time` gets how long the MCP call took.
    async fn execute(&self, job: &Job, now: DateTime<Utc>, call_time: &mut Duration) -> Ran {
        let id = Some(job.job_id.as_str());
        let Some(server) = self.registry.route(&job.tool) else {
            let message = format!("no MCP server serves the tool `{}`", job.tool);
            return Ran::Reply(Reply::error(id, ErrorCode::UnknownTool, message));
        };
        let Ok(budget) = policy::call_budget(now, job.deadline, self.config.call_timeout) else {
            return Ran::Reply(deadline_exceeded(job));
        };
        let credential = match self.credential(server, job, now, budget.timeout).await {
            Credential::Header(header) => header,
            Credential::Refresh(needed) => return Ran::Refresh(needed),
            Credential::Refused(reply) => return Ran::Reply(reply),
            Credential::Unavailable => return Ran::StoreUnavailable,
        };
        // The token lookup took time; what is left of the deadline is measured again.
        let budget = match policy::call_budget(Utc::now(), job.deadline, self.config.call_timeout) {
            Ok(budget) => budget,
            Err(DeadlinePassed) => return Ran::Reply(deadline_exceeded(job)),
        };
        let client = self.mcp.get(&server.name).expect("every routed server has a client");
        let called = std::time::Instant::now();
        let outcome = client.call_tool(&job.tool, job.arguments.clone(), credential, budget.timeout).await;
        *call_time = called.elapsed();
        let reply = match outcome {
            Ok(result) => Reply::ok(&job.job_id, result),
            Err(e) => Reply::error(id, policy::error_code(&e, budget), e.to_string()),
        };
        self.metrics.mcp_call(&server.name, reply.outcome(), *call_time);
        Ran::Reply(reply)
    }

    /// The header carrying the user's token, if the server needs one. Never waits on OAuth: a
    /// token that would expire during the call is left to the refresher.
    async fn credential(&self, server: &ServerSpec, job: &Job, now: DateTime<Utc>, call: Duration) -> Credential {
        let Some(auth) = &server.auth else { return Credential::Header(None) };
        let id = Some(job.job_id.as_str());
        let provider = auth.provider;
        let min_remaining = call + self.config.clock_skew;
        let usable = |token: &StoredToken| {
            let reauth = token.status == TokenStatus::ReauthRequired;
            policy::token_verdict(now, token.expires_at, reauth, min_remaining)
        };
        // A cached token serves only if it would serve as freshly read; otherwise read again.
        let cached = self.tokens.get(provider, &job.user_id, std::time::Instant::now());
        let token = match cached.filter(|token| usable(token) == TokenVerdict::Use) {
            Some(token) => Ok(Some(token)),
            None => {
                let read_started = std::time::Instant::now();
                let read = self.store.tokens(provider, &self.cipher).get(&job.user_id).await;
                if let Ok(Some(token)) = &read {
                    self.tokens.put(provider, token, read_started);
                }
                read
            }
        };
        let token = match token {
            Ok(Some(token)) => token,
            Ok(None) => {
                let message = format!("the user has not connected {provider}; send them through the connect flow");
                return Credential::Refused(Reply::error(id, ErrorCode::NotConnected, message).with_provider(provider));
            }
            // Sealed under a key no longer configured (or damaged): only reconnecting helps.
            Err(StoreError::Unreadable(e)) => {
                tracing::warn!(error = %e, "the stored token cannot be read");
                let message =
                    format!("the user's stored {provider} token cannot be read; send them through the connect flow");
                return Credential::Refused(
                    Reply::error(id, ErrorCode::ReauthRequired, message).with_provider(provider),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "token lookup failed; the job waits");
                return Credential::Unavailable;
            }
        };
        match usable(&token) {
            TokenVerdict::Use => match auth.credential(&token.access_token) {
                Ok(header) => Credential::Header(Some(header)),
                Err(e) => {
                    Credential::Refused(Reply::error(id, ErrorCode::Internal, e.to_string()).with_provider(provider))
                }
            },
            TokenVerdict::Refresh => Credential::Refresh(RefreshNeeded {
                provider,
                user_id: job.user_id.clone(),
                until: now + chrono::Duration::from_std(min_remaining).unwrap_or(chrono::Duration::MAX),
            }),
            TokenVerdict::ReauthRequired => {
                let message = format!(
                    "the user's {provider} authorization was revoked or expired; send them through the connect flow"
                );
                Credential::Refused(Reply::error(id, ErrorCode::ReauthRequired, message).with_provider(provider))
            }
        }
    }
}

/// A job that cannot go on yet waits in the delay queue, unless its deadline has passed: then
/// waiting longer is pointless and it is answered `deadline_exceeded` at once.
fn wait_unless_late(job: &Job, to: ReplyTarget, now: DateTime<Utc>, claim: Option<String>) -> Disposition {
    match job.deadline {
        Some(deadline) if deadline <= now => Disposition::Reply { to, reply: deadline_exceeded(job), record: None },
        _ => Disposition::Wait { claim },
    }
}

fn deadline_exceeded(job: &Job) -> Reply {
    Reply::error(
        Some(&job.job_id),
        ErrorCode::DeadlineExceeded,
        "the job's deadline passed before the tool could be called",
    )
}

fn invalid_job(delivery: &Delivery, invalid: InvalidJob) -> Disposition {
    let job_id = invalid.job_id.or_else(|| delivery.message_id.clone());
    let reply = Reply::error(job_id.as_deref(), ErrorCode::InvalidJob, invalid.reason.clone());
    let to = delivery
        .reply_to
        .clone()
        .map(|queue| ReplyTarget { queue, correlation_id: delivery.correlation_id.clone().or_else(|| job_id.clone()) });
    Disposition::DeadLetter { reason: invalid.reason, to, reply }
}
