//! The job path's rules as one pure function. Given what the shell has observed of a delivery so
//! far and the time, [`next`] says what to do next: one piece of I/O to perform (claim the
//! `job_id`, read the user's token, call the tool) or how to settle the delivery. The shell
//! ([`super::execute`]) performs the step, adds what it saw to [`Facts`], reads the clock once and
//! asks again. Nothing here does I/O or reads the clock, so every branch is unit-tested below.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::WorkerConfig;
use super::envelope::Envelope;
use super::policy::{self, CallBudget, Guarantee, TokenVerdict};
use crate::dates;
use crate::job::{ErrorCode, InvalidJob, Job, Reply};
use crate::mcp::McpCallError;
use crate::metrics::{Deferral, Settled};
use crate::provider::Provider;
use crate::store::{Claim, StoreError};

/// Where the job's tool is served, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// No configured server serves the tool.
    Unknown,
    /// A server that needs no user's token.
    Public,
    /// A server that needs the user's token from this provider.
    Token(Provider),
}

/// What the shell read of the user's token: never the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenFacts {
    /// The stored document's version: it changes with every renewal.
    pub(crate) version: i64,
    pub(crate) expires_at: DateTime<Utc>,
    pub(crate) reauth_required: bool,
    /// The token can be put in the server's credential header (a value stored by older code may
    /// hold characters no header can carry).
    pub(crate) sendable: bool,
}

/// How the tool call went, and the budget it had.
#[derive(Debug)]
pub(super) struct CallFacts {
    pub(crate) outcome: Result<Value, McpCallError>,
    pub(crate) budget: CallBudget,
}

/// What the shell has observed of one valid job so far.
#[derive(Debug)]
pub(super) struct Facts {
    pub(crate) envelope: Envelope,
    pub(crate) route: Route,
    /// The job's fingerprint ([`Job::fingerprint`]): its `job_id` is claimed for this call only.
    pub(crate) call: String,
    /// The claim this delivery holds or asks for.
    pub(crate) owner: String,
    pub(crate) claim: Option<Result<Claim, StoreError>>,
    /// `Ok(None)`: the user has no stored token.
    pub(crate) token: Option<Result<Option<TokenFacts>, StoreError>>,
    pub(crate) call_result: Option<CallFacts>,
    /// For a `tools/list` job, the catalog once listed (as the reply's `result`).
    pub(crate) catalog: Option<Value>,
    /// Whether the call is claimed and its reply recorded ([`Guarantee::ExactlyOnce`]).
    pub(crate) guarantee: Guarantee,
}

impl Facts {
    /// The claim a delayed copy takes back: this delivery's, when the call is claimed at all.
    fn held_claim(&self) -> Option<String> {
        (self.guarantee == Guarantee::ExactlyOnce).then(|| self.owner.clone())
    }
}

/// The next thing to do with a delivery.
// One `Step` exists at a time per job, on the stack and never in a collection: boxing the large
// variant would only add an allocation per job.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Step {
    /// Claim the `job_id` for `facts.owner` and `facts.call`.
    Claim {
        lease_until: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    },
    /// Read the user's token for the tool's server. A cached one serves only if it stays valid
    /// for `min_remaining`, and never when `fresh` (an MCP server refused the last one seen).
    ReadToken {
        min_remaining: Duration,
        fresh: bool,
    },
    /// Call the tool within `budget`.
    Call {
        budget: CallBudget,
    },
    /// List the user's tool catalog, each server within `budget`.
    List {
        budget: CallBudget,
    },
    Settle(Disposition),
}

/// How a delivery is settled.
#[derive(Debug)]
pub(super) enum Disposition {
    /// Publish `reply`, then ack. With `record`, the reply is first stored as the result of that
    /// job id, so a redelivery gets it again instead of running the tool twice.
    Reply { to: ReplyTarget, reply: Reply, record: Option<Record> },
    /// The job already ran: publish its stored reply again, then ack.
    Replay { to: ReplyTarget, body: Vec<u8> },
    /// The MCP server was unavailable: put the job in the `level`-th retry queue, then ack; it runs
    /// again after that queue's delay, taking back its `claim` (an exactly-once call's).
    Retry { level: usize, claim: Option<String> },
    /// Another consumer is running this job id, or the database is unreachable: put the job in the
    /// delay queue (not counted as a deferral) carrying `waits`, then ack; it comes back later,
    /// with the claim this delivery may hold.
    Wait { claim: Option<String>, waits: u32 },
    /// Publish `reply` if there is a target (recorded first with `record`), copy the message to
    /// the dead-letter queue with `reason`, then ack.
    DeadLetter { reason: String, to: Option<ReplyTarget>, reply: Reply, record: Option<Record> },
    /// Put the job in the delay queue (its `deferrals`-th wait), then ack; it comes back when
    /// the refresher has had time to renew the user's token, and takes back its `claim` (and
    /// `refused_version`, when the MCP server refused that version of the token).
    Defer { deferrals: u32, refresh: RefreshNeeded, claim: Option<String>, refused_version: Option<i64> },
    /// The MCP server refused the user's token again after it was renewed: mark `token`
    /// `reauth_required` (with the event), then publish `reply` (recorded first) and ack.
    Reauth { to: ReplyTarget, reply: Reply, record: Option<Record>, token: RefusedToken },
}

/// The stored token an MCP server refused, to be marked `reauth_required` if unchanged since.
#[derive(Debug, Clone)]
pub(super) struct RefusedToken {
    pub(crate) provider: Provider,
    pub(crate) user_id: String,
    pub(crate) version: i64,
}

/// Which job and call a reply is recorded for.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(crate) job_id: String,
    pub(crate) call: String,
    /// When the recorded reply may be forgotten (`worker.results_ttl_secs` from now).
    pub(crate) expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub(super) struct ReplyTarget {
    pub(crate) queue: String,
    pub(crate) correlation_id: Option<String>,
}

/// A job is waiting for this user's token to be valid until `until`.
#[derive(Debug, Clone)]
pub(super) struct RefreshNeeded {
    pub(crate) provider: Provider,
    pub(crate) user_id: String,
    pub(crate) until: DateTime<Utc>,
    /// The MCP server refused the current token: renew it whatever its expiry.
    pub(crate) refused: bool,
}

impl Disposition {
    /// `ok`, the error code, or what the job waits for: for the job's log line.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            Disposition::Reply { reply, .. }
            | Disposition::DeadLetter { reply, .. }
            | Disposition::Reauth { reply, .. } => reply.outcome(),
            Disposition::Replay { .. } => "duplicate",
            Disposition::Retry { .. } => "retrying",
            Disposition::Wait { .. } => "waiting",
            Disposition::Defer { .. } => "deferred",
        }
    }

    /// How the metrics count this disposition once it is settled.
    pub(super) fn settled(&self) -> Settled {
        match self {
            Disposition::Reply { reply, .. } | Disposition::Reauth { reply, .. } => {
                Settled::Answered { code: reply.error_code().map(ErrorCode::as_str) }
            }
            Disposition::DeadLetter { reply, .. } => Settled::DeadLettered { code: reply.outcome() },
            Disposition::Replay { .. } => Settled::Replayed,
            Disposition::Retry { .. } => Settled::Deferred(Deferral::Retry),
            Disposition::Wait { .. } => Settled::Deferred(Deferral::Wait),
            Disposition::Defer { .. } => Settled::Deferred(Deferral::Token),
        }
    }
}

/// A body that is not a valid job: dead-lettered, answered `invalid_job` where there is a
/// `reply_to`.
pub(super) fn refuse_invalid(envelope: &Envelope, invalid: InvalidJob) -> Disposition {
    let job_id = invalid.job_id.or_else(|| envelope.message_id.clone());
    let reply = Reply::error(job_id.as_deref(), ErrorCode::InvalidJob, invalid.reason.clone());
    let to = envelope
        .reply_to
        .clone()
        .map(|queue| ReplyTarget { queue, correlation_id: envelope.correlation_id.clone().or_else(|| job_id.clone()) });
    Disposition::DeadLetter { reason: invalid.reason, to, reply, record: None }
}

/// Where the reply to `job` goes, if it has a `reply_to`.
fn reply_target(job: &Job, envelope: &Envelope) -> Option<ReplyTarget> {
    let queue = envelope.reply_to.clone()?;
    Some(ReplyTarget { queue, correlation_id: envelope.correlation_id.clone().or_else(|| Some(job.job_id.clone())) })
}

/// A job without a `reply_to`: whatever it asks, nobody could be told.
fn unanswerable(job: &Job) -> Step {
    let reason = "the message has no reply_to property, so no reply could reach the caller".to_owned();
    let reply = Reply::error(Some(&job.job_id), ErrorCode::InvalidJob, reason.clone());
    Step::Settle(Disposition::DeadLetter { reason, to: None, reply, record: None })
}

/// A job whose earlier deliveries all ended without an ack: running it again may crash this
/// worker too. The broker's own limit, one delivery later, is only the backstop.
fn over_delivery_limit(
    job: &Job,
    envelope: &Envelope,
    config: &WorkerConfig,
    to: &ReplyTarget,
    record: Option<Record>,
) -> Option<Step> {
    if envelope.failed_deliveries < config.delivery_limit {
        return None;
    }
    let reason = format!(
        "delivered {} times without being settled (amqp.delivery_limit is {})",
        envelope.failed_deliveries.saturating_add(1),
        config.delivery_limit
    );
    let reply = Reply::error(Some(&job.job_id), ErrorCode::DeliveryLimit, reason.clone());
    Some(Step::Settle(Disposition::DeadLetter { reason, to: Some(to.clone()), reply, record }))
}

/// The next step for a `tools/list` job. A listing changes nothing anywhere, so it is neither
/// claimed nor recorded: a redelivery lists again, and gets the lists as they are then.
pub(super) fn next_listing(job: &Job, facts: &mut Facts, config: &WorkerConfig, now: DateTime<Utc>) -> Step {
    let Some(to) = reply_target(job, &facts.envelope) else { return unanswerable(job) };
    if let Some(settle) = over_delivery_limit(job, &facts.envelope, config, &to, None) {
        return settle;
    }
    let answer = |reply: Reply| Step::Settle(Disposition::Reply { to: to.clone(), reply, record: None });
    if let Some(catalog) = facts.catalog.take() {
        return answer(Reply::ok(&job.job_id, catalog));
    }
    match policy::call_budget(now, job.deadline, config.call_timeout) {
        Ok(budget) => Step::List { budget },
        Err(_) => answer(deadline_exceeded(Some(&job.job_id))),
    }
}

/// The next step for a valid `job`, from the `facts` observed so far, at `now`. When it settles
/// the job with the tool's result, it takes that result out of `facts`.
pub(super) fn next(job: &Job, facts: &mut Facts, config: &WorkerConfig, now: DateTime<Utc>) -> Step {
    let Some(to) = reply_target(job, &facts.envelope) else { return unanswerable(job) };
    // A call that may run again (at least once) is neither claimed nor recorded: it costs no
    // database write, and a redelivery runs it again.
    let exactly_once = facts.guarantee == Guarantee::ExactlyOnce;
    let record = exactly_once.then(|| Record {
        job_id: job.job_id.clone(),
        call: facts.call.clone(),
        expires_at: dates::after(now, config.results_ttl),
    });
    let answer = |reply: Reply| Step::Settle(Disposition::Reply { to: to.clone(), reply, record: record.clone() });
    let id = Some(job.job_id.as_str());

    match &facts.claim {
        None if !exactly_once => {
            if let Some(settle) = over_delivery_limit(job, &facts.envelope, config, &to, None) {
                return settle;
            }
        }
        None => {
            return Step::Claim {
                lease_until: dates::after(now, config.claim_lease),
                expires_at: dates::after(now, config.results_ttl),
            };
        }
        Some(Ok(Claim::Done(body))) => return Step::Settle(Disposition::Replay { to, body: body.clone() }),
        Some(Ok(Claim::Conflict)) => {
            let reason = "job_id reused for a different call: it was first claimed for another user, tool or \
                          arguments"
                .to_owned();
            let reply = Reply::error(id, ErrorCode::InvalidJob, reason.clone());
            return Step::Settle(Disposition::DeadLetter { reason, to: Some(to), reply, record: None });
        }
        // The other consumer holds a lease no longer than a call, after which this one takes
        // over: this wait ends by itself, so it is not counted.
        // Its reply is the holder's to record, not this delivery's.
        Some(Ok(Claim::Busy)) => {
            return match no_more_waiting(job, &facts.envelope, now, false, config.max_waits) {
                Some(reply) => Step::Settle(Disposition::Reply { to, reply, record: None }),
                None => Step::Settle(Disposition::Wait { claim: None, waits: facts.envelope.waits }),
            };
        }
        // The claim may have been written before the error: the job keeps its owner.
        Some(Err(StoreError::Unavailable(_))) => return wait_for_database(job, facts, now, config, answer),
        Some(Err(e)) => return answer(internal(id, e)),
        Some(Ok(Claim::Run)) => {
            if let Some(settle) = over_delivery_limit(job, &facts.envelope, config, &to, record.clone()) {
                return settle;
            }
        }
    }

    let provider = match facts.route {
        Route::Unknown => {
            return answer(Reply::error(
                id,
                ErrorCode::UnknownTool,
                format!("no MCP server serves the tool `{}`", job.tool),
            ));
        }
        Route::Public => None,
        Route::Token(provider) => Some(provider),
    };
    let Ok(budget) = policy::call_budget(now, job.deadline, config.call_timeout) else {
        return answer(deadline_exceeded(id));
    };

    if let Some(provider) = provider {
        let min_remaining = budget.timeout.saturating_add(config.clock_skew);
        let token = match &facts.token {
            None => return Step::ReadToken { min_remaining, fresh: facts.envelope.refused_version.is_some() },
            Some(Ok(None)) => {
                let message = format!("the user has not connected {provider}; send them through the connect flow");
                return answer(Reply::error(id, ErrorCode::NotConnected, message).with_provider(provider));
            }
            Some(Ok(Some(token))) => *token,
            // Sealed under a key no longer configured, damaged, or of the wrong shape: only
            // reconnecting helps, and waiting never ends.
            Some(Err(StoreError::Unreadable(_))) => {
                let message =
                    format!("the user's stored {provider} token cannot be read; send them through the connect flow");
                return answer(Reply::error(id, ErrorCode::ReauthRequired, message).with_provider(provider));
            }
            Some(Err(StoreError::Unavailable(_))) => return wait_for_database(job, facts, now, config, answer),
            Some(Err(e)) => return answer(internal(id, e).with_provider(provider)),
        };
        // Refused by the MCP server earlier, and not renewed since: calling again is pointless.
        let verdict = match policy::token_verdict(now, token.expires_at, token.reauth_required, min_remaining) {
            TokenVerdict::Use if facts.envelope.refused_version == Some(token.version) => TokenVerdict::Refresh,
            verdict => verdict,
        };
        match verdict {
            TokenVerdict::Use if token.sendable => {}
            TokenVerdict::Use => {
                let message = format!(
                    "the user's stored {provider} token cannot be sent in a request header; send them through the \
                     connect flow"
                );
                return answer(Reply::error(id, ErrorCode::ReauthRequired, message).with_provider(provider));
            }
            TokenVerdict::Refresh if facts.envelope.deferrals < config.max_deferrals => {
                let refused = facts.envelope.refused_version;
                return defer(job, facts, provider, dates::after(now, min_remaining), refused);
            }
            TokenVerdict::Refresh => {
                let message = format!("the user's {provider} token could not be renewed in time; try again later");
                return answer(Reply::error(id, ErrorCode::TokenUnavailable, message).with_provider(provider));
            }
            TokenVerdict::ReauthRequired => {
                let message = format!(
                    "the user's {provider} authorization was revoked or expired; send them through the connect flow"
                );
                return answer(Reply::error(id, ErrorCode::ReauthRequired, message).with_provider(provider));
            }
        }
    }

    let Some(call) = facts.call_result.take() else { return Step::Call { budget } };
    if let (Err(McpCallError::Unauthorized { .. }), Route::Token(provider), Some(Ok(Some(token)))) =
        (&call.outcome, facts.route, &facts.token)
    {
        return refused(job, facts, provider, *token, now, config, (to.clone(), record.clone()));
    }
    let reply = match (call.outcome, facts.route) {
        (Ok(result), _) => Reply::ok(&job.job_id, result),
        (Err(e @ McpCallError::Forbidden { .. }), Route::Token(provider)) => {
            Reply::error(id, ErrorCode::Forbidden, e.to_string()).with_provider(provider)
        }
        (Err(e), _) => Reply::error(id, policy::error_code(&e, call.budget), e.to_string()),
    };
    // The longest of a retry's delays decides whether it fits before the deadline.
    let delays = config.retries.iter().map(|level| level.iter().map(|(_, d)| *d).max().unwrap_or_default());
    match policy::retry_level(reply.error_code(), facts.envelope.retries, delays, now, job.deadline) {
        Some(level) => Step::Settle(Disposition::Retry { level, claim: facts.held_claim() }),
        None => answer(reply),
    }
}

/// The MCP server answered 401 to the user's token. The first time, the job waits for the
/// refresher to renew that token (a revoked access token may still have a good refresh token);
/// once a renewed token is refused too, only reconnecting helps: the user is marked
/// `reauth_required`. Without deferrals left, the refusal stays unconfirmed: `token_unavailable`.
fn refused(
    job: &Job,
    facts: &Facts,
    provider: Provider,
    token: TokenFacts,
    now: DateTime<Utc>,
    config: &WorkerConfig,
    (to, record): (ReplyTarget, Option<Record>),
) -> Step {
    let id = Some(job.job_id.as_str());
    if facts.envelope.refused_version.is_some() {
        let message =
            format!("the MCP server refused the user's renewed {provider} token; send them through the connect flow");
        let reply = Reply::error(id, ErrorCode::ReauthRequired, message).with_provider(provider);
        let token = RefusedToken { provider, user_id: job.user_id.clone(), version: token.version };
        return Step::Settle(Disposition::Reauth { to, reply, record, token });
    }
    if facts.envelope.deferrals < config.max_deferrals {
        return defer(job, facts, provider, now, Some(token.version));
    }
    let message = format!("the MCP server refused the user's {provider} token and it could not be renewed in time");
    let reply = Reply::error(id, ErrorCode::TokenUnavailable, message).with_provider(provider);
    Step::Settle(Disposition::Reply { to, reply, record })
}

/// Waits for the refresher to renew the user's token so that it is valid `until` (or, with
/// `refused_version`, to replace the version the MCP server refused).
fn defer(job: &Job, facts: &Facts, provider: Provider, until: DateTime<Utc>, refused_version: Option<i64>) -> Step {
    let refresh = RefreshNeeded { provider, user_id: job.user_id.clone(), until, refused: refused_version.is_some() };
    Step::Settle(Disposition::Defer {
        deferrals: facts.envelope.deferrals.saturating_add(1),
        refresh,
        claim: facts.held_claim(),
        refused_version,
    })
}

/// Why a job that cannot go on yet must be answered now instead of waiting in the delay queue:
/// its deadline has passed (waiting longer is pointless), or, for a wait that is `counted` (the
/// database is unreachable), it has waited `max_waits` times already. `None`: it waits.
fn no_more_waiting(job: &Job, envelope: &Envelope, now: DateTime<Utc>, counted: bool, max_waits: u32) -> Option<Reply> {
    let id = Some(job.job_id.as_str());
    match job.deadline {
        Some(deadline) if deadline <= now => Some(deadline_exceeded(id)),
        _ if counted && envelope.waits >= max_waits => Some(Reply::error(
            id,
            ErrorCode::Internal,
            format!("the database stayed unreachable over {} waits; try again later", envelope.waits),
        )),
        _ => None,
    }
}

/// The database could not be reached: the job waits in the delay queue, keeping its claim, and
/// counts the wait, unless it must be answered now.
fn wait_for_database(
    job: &Job,
    facts: &Facts,
    now: DateTime<Utc>,
    config: &WorkerConfig,
    answer: impl Fn(Reply) -> Step,
) -> Step {
    match no_more_waiting(job, &facts.envelope, now, true, config.max_waits) {
        Some(reply) => answer(reply),
        None => {
            Step::Settle(Disposition::Wait { claim: facts.held_claim(), waits: facts.envelope.waits.saturating_add(1) })
        }
    }
}

fn deadline_exceeded(id: Option<&str>) -> Reply {
    Reply::error(id, ErrorCode::DeadlineExceeded, "the job's deadline passed before the tool could be called")
}

fn internal(id: Option<&str>, error: &StoreError) -> Reply {
    Reply::error(id, ErrorCode::Internal, format!("the worker could not do its part: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Limits;
    use serde_json::json;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn config() -> WorkerConfig {
        WorkerConfig {
            concurrency: 1,
            job_limits: Limits { max_bytes: 1 << 20, max_depth: 8 },
            call_timeout: Duration::from_secs(30),
            dead_letter_queue: "dead".into(),
            delivery_limit: 5,
            clock_skew: Duration::from_secs(30),
            max_deferrals: 2,
            max_waits: 3,
            delay_queue: "delay".into(),
            shutdown_grace: Duration::from_secs(1),
            owner: "test".into(),
            claim_lease: Duration::from_secs(70),
            results_ttl: Duration::from_secs(86_400),
            token_cache_ttl: Duration::ZERO,
            retries: vec![
                vec![("r1a".into(), Duration::from_secs(1)), ("r1b".into(), Duration::from_secs(2))],
                vec![("r5".into(), Duration::from_secs(5))],
            ],
        }
    }

    fn job(deadline: Option<DateTime<Utc>>) -> Job {
        Job {
            job_id: "j1".into(),
            user_id: "alice".into(),
            method: crate::job::Method::CallTool,
            tool: "qlik_apps".into(),
            arguments: json!({"q": 1}).as_object().unwrap().clone(),
            deadline,
        }
    }

    fn facts(route: Route) -> Facts {
        Facts {
            envelope: Envelope { reply_to: Some("replies".into()), ..Envelope::default() },
            route,
            call: "fp".into(),
            owner: "test/1".into(),
            claim: None,
            token: None,
            call_result: None,
            catalog: None,
            guarantee: Guarantee::ExactlyOnce,
        }
    }

    /// Facts for a job that holds its claim and whose token is good for an hour.
    fn ready(route: Route) -> Facts {
        let mut facts = facts(route);
        facts.claim = Some(Ok(Claim::Run));
        facts.token = Some(Ok(Some(token(at(3600)))));
        facts
    }

    const QLIK: Route = Route::Token(Provider::Qlik);

    /// A good token at version 7 that expires at `expires_at`.
    fn token(expires_at: DateTime<Utc>) -> TokenFacts {
        TokenFacts { version: 7, expires_at, reauth_required: false, sendable: true }
    }

    fn settle(step: Step) -> Disposition {
        match step {
            Step::Settle(disposition) => disposition,
            other => panic!("expected to settle, got {other:?}"),
        }
    }

    /// The reply's code and whether it is recorded.
    fn answered(step: Step) -> (&'static str, bool) {
        match settle(step) {
            Disposition::Reply { reply, record, .. } => (reply.outcome(), record.is_some()),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn next_at(job: &Job, facts: &mut Facts, now: i64) -> Step {
        next(job, facts, &config(), at(now))
    }

    #[test]
    fn a_body_that_is_no_job_is_dead_lettered_and_answered_where_possible() {
        let envelope = Envelope { reply_to: Some("r".into()), message_id: Some("m1".into()), ..Envelope::default() };
        let invalid = InvalidJob { job_id: None, reason: "field `tool`: missing".into() };
        match refuse_invalid(&envelope, invalid) {
            Disposition::DeadLetter { to: Some(to), reply, record: None, reason } => {
                assert_eq!(to.correlation_id.as_deref(), Some("m1"), "the message id stands in for the job id");
                assert_eq!(reply.outcome(), "invalid_job");
                assert!(reason.contains("tool"));
            }
            other => panic!("{other:?}"),
        }
        let silent = refuse_invalid(&Envelope::default(), InvalidJob { job_id: None, reason: "x".into() });
        assert!(matches!(silent, Disposition::DeadLetter { to: None, .. }));
    }

    #[test]
    fn a_job_without_reply_to_is_dead_lettered_before_anything_else() {
        let mut facts = facts(QLIK);
        facts.envelope.reply_to = None;
        assert!(matches!(
            settle(next_at(&job(None), &mut facts, 0)),
            Disposition::DeadLetter { to: None, record: None, .. }
        ));
    }

    #[test]
    fn a_listing_is_never_claimed_nor_recorded_and_keeps_to_its_deadline() {
        let listing = Job { method: crate::job::Method::ListTools, tool: String::new(), ..job(Some(at(10))) };
        let mut facts = facts(Route::Unknown);
        match next_listing(&listing, &mut facts, &config(), at(0)) {
            Step::List { budget } => assert_eq!(budget.timeout, Duration::from_secs(10), "cut to the deadline"),
            other => panic!("{other:?}"),
        }
        facts.catalog = Some(json!({"tools": [], "unavailable": []}));
        match settle(next_listing(&listing, &mut facts, &config(), at(1))) {
            Disposition::Reply { reply: Reply::Ok { result, .. }, record: None, .. } => {
                assert_eq!(result["tools"], json!([]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(answered(next_listing(&listing, &mut facts, &config(), at(10))), ("deadline_exceeded", false));
        facts.envelope.failed_deliveries = 5;
        assert!(matches!(
            settle(next_listing(&listing, &mut facts, &config(), at(0))),
            Disposition::DeadLetter { to: Some(_), record: None, .. }
        ));
        facts.envelope.reply_to = None;
        assert!(matches!(
            settle(next_listing(&listing, &mut facts, &config(), at(0))),
            Disposition::DeadLetter { to: None, .. }
        ));
    }

    #[test]
    fn an_at_least_once_call_is_neither_claimed_nor_recorded_nor_carries_a_claim() {
        let mut facts = facts(Route::Public);
        facts.guarantee = Guarantee::AtLeastOnce;
        assert!(matches!(next_at(&job(None), &mut facts, 0), Step::Call { .. }), "no claim step");
        facts.call_result = Some(CallFacts {
            outcome: Ok(json!({"content": []})),
            budget: CallBudget { timeout: Duration::from_secs(30), limited_by_deadline: false },
        });
        assert_eq!(answered(next_at(&job(None), &mut facts, 0)), ("ok", false), "not recorded");
        facts.call_result = Some(CallFacts {
            outcome: Err(McpCallError::Unavailable { server: "s".into(), detail: "down".into() }),
            budget: CallBudget { timeout: Duration::from_secs(30), limited_by_deadline: false },
        });
        assert!(matches!(settle(next_at(&job(None), &mut facts, 0)), Disposition::Retry { claim: None, .. }));
        facts.envelope.failed_deliveries = 5;
        assert!(matches!(
            settle(next_at(&job(None), &mut facts, 0)),
            Disposition::DeadLetter { record: None, to: Some(_), .. }
        ));
    }

    #[test]
    fn the_first_step_is_the_claim_with_its_lease_and_ttl() {
        match next_at(&job(None), &mut facts(QLIK), 0) {
            Step::Claim { lease_until, expires_at } => {
                assert_eq!(lease_until, at(70));
                assert_eq!(expires_at, at(86_400));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_done_job_is_replayed_and_a_reused_job_id_is_refused_without_the_other_reply() {
        let mut done = facts(QLIK);
        done.claim = Some(Ok(Claim::Done(b"recorded".to_vec())));
        assert!(
            matches!(settle(next_at(&job(None), &mut done, 0)), Disposition::Replay { body, .. } if body == b"recorded")
        );
        let mut reused = facts(QLIK);
        reused.claim = Some(Ok(Claim::Conflict));
        match settle(next_at(&job(None), &mut reused, 0)) {
            Disposition::DeadLetter { reply, reason, to: Some(_), record: None } => {
                assert_eq!(reply.outcome(), "invalid_job");
                assert!(reason.contains("job_id reused for a different call"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_busy_job_waits_uncounted_and_without_a_claim_until_its_deadline() {
        let mut busy = facts(QLIK);
        busy.claim = Some(Ok(Claim::Busy));
        busy.envelope.waits = 99;
        assert!(matches!(settle(next_at(&job(None), &mut busy, 0)), Disposition::Wait { claim: None, waits: 99 }));
        assert_eq!(answered(next_at(&job(Some(at(0))), &mut busy, 0)), ("deadline_exceeded", false));
    }

    #[test]
    fn an_unreachable_database_makes_the_job_wait_a_bounded_number_of_times() {
        let down = || StoreError::Unavailable("down".into());
        for step in ["claim", "token"] {
            let mut facts = facts(QLIK);
            if step == "claim" {
                facts.claim = Some(Err(down()));
            } else {
                facts.claim = Some(Ok(Claim::Run));
                facts.token = Some(Err(down()));
            }
            facts.envelope.waits = 2;
            match settle(next_at(&job(None), &mut facts, 0)) {
                Disposition::Wait { claim: Some(claim), waits: 3 } => assert_eq!(claim, "test/1", "{step}"),
                other => panic!("{step}: {other:?}"),
            }
            facts.envelope.waits = 3;
            assert_eq!(answered(next_at(&job(None), &mut facts, 0)), ("internal", true), "{step}: waits used up");
            facts.envelope.waits = 0;
            assert_eq!(answered(next_at(&job(Some(at(0))), &mut facts, 0)), ("deadline_exceeded", true), "{step}");
        }
    }

    #[test]
    fn a_database_that_refuses_is_answered_internal_at_once() {
        let mut claim = facts(QLIK);
        claim.claim = Some(Err(StoreError::Rejected("no".into())));
        assert_eq!(answered(next_at(&job(None), &mut claim, 0)), ("internal", true));
        let mut token = facts(QLIK);
        token.claim = Some(Ok(Claim::Run));
        token.token = Some(Err(StoreError::Rejected("no".into())));
        assert_eq!(answered(next_at(&job(None), &mut token, 0)), ("internal", true));
    }

    #[test]
    fn a_job_delivered_too_often_is_dead_lettered_answered_and_recorded() {
        let mut facts = facts(QLIK);
        facts.claim = Some(Ok(Claim::Run));
        facts.envelope.failed_deliveries = 5;
        match settle(next_at(&job(None), &mut facts, 0)) {
            Disposition::DeadLetter { reply, record: Some(_), to: Some(_), reason } => {
                assert_eq!(reply.outcome(), "delivery_limit");
                assert!(reason.contains("delivered 6 times"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        facts.envelope.failed_deliveries = 4;
        assert!(matches!(next_at(&job(None), &mut facts, 0), Step::ReadToken { .. }));
    }

    #[test]
    fn refusals_that_end_the_job_are_recorded_and_never_call() {
        let mut unknown = facts(Route::Unknown);
        unknown.claim = Some(Ok(Claim::Run));
        assert_eq!(answered(next_at(&job(None), &mut unknown, 0)), ("unknown_tool", true));

        let mut late = facts(QLIK);
        late.claim = Some(Ok(Claim::Run));
        assert_eq!(answered(next_at(&job(Some(at(0))), &mut late, 0)), ("deadline_exceeded", true));

        let cases: [(Result<Option<TokenFacts>, StoreError>, &str); 4] = [
            (Ok(None), "not_connected"),
            (Err(StoreError::Unreadable("wrong shape".into())), "reauth_required"),
            (Ok(Some(TokenFacts { reauth_required: true, ..token(at(3600)) })), "reauth_required"),
            (Ok(Some(TokenFacts { sendable: false, ..token(at(3600)) })), "reauth_required"),
        ];
        for (token, code) in cases {
            let mut facts = facts(QLIK);
            facts.claim = Some(Ok(Claim::Run));
            facts.token = Some(token);
            assert_eq!(answered(next_at(&job(None), &mut facts, 0)), (code, true));
        }
    }

    #[test]
    fn a_token_too_short_for_the_call_defers_then_gives_up_recorded() {
        let mut facts = ready(QLIK);
        // 30 s call + 30 s skew: 59 s left is too little.
        facts.token = Some(Ok(Some(token(at(59)))));
        facts.envelope.deferrals = 1;
        match settle(next_at(&job(None), &mut facts, 0)) {
            Disposition::Defer { deferrals: 2, refresh, claim, refused_version: None } => {
                assert_eq!(refresh.until, at(60));
                assert_eq!(refresh.user_id, "alice");
                assert_eq!(claim.as_deref(), Some("test/1"));
            }
            other => panic!("{other:?}"),
        }
        facts.envelope.deferrals = 2;
        assert_eq!(answered(next_at(&job(None), &mut facts, 0)), ("token_unavailable", true));
    }

    #[test]
    fn the_token_is_read_for_the_call_budget_cut_to_the_deadline() {
        let mut facts = facts(QLIK);
        facts.claim = Some(Ok(Claim::Run));
        match next_at(&job(Some(at(10))), &mut facts, 0) {
            Step::ReadToken { min_remaining, fresh: false } => assert_eq!(min_remaining, Duration::from_secs(40)),
            other => panic!("{other:?}"),
        }
        let mut public = facts_with_claim(Route::Public);
        assert!(matches!(next_at(&job(None), &mut public, 0), Step::Call { .. }), "no token for a public server");
    }

    fn facts_with_claim(route: Route) -> Facts {
        let mut facts = facts(route);
        facts.claim = Some(Ok(Claim::Run));
        facts
    }

    #[test]
    fn the_call_gets_the_budget_measured_at_its_own_step() {
        let mut facts = ready(QLIK);
        match next_at(&job(Some(at(20))), &mut facts, 5) {
            Step::Call { budget } => {
                assert_eq!(budget.timeout, Duration::from_secs(15));
                assert!(budget.limited_by_deadline);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_result_is_answered_and_recorded_and_an_unavailable_server_is_retried_within_the_deadline() {
        let budget = CallBudget { timeout: Duration::from_secs(30), limited_by_deadline: false };
        let mut ok = ready(QLIK);
        ok.call_result = Some(CallFacts { outcome: Ok(json!({"content": []})), budget });
        assert_eq!(answered(next_at(&job(None), &mut ok, 0)), ("ok", true));

        let down = || McpCallError::Unavailable { server: "qlik".into(), detail: "refused".into() };
        let mut retry = ready(QLIK);
        retry.call_result = Some(CallFacts { outcome: Err(down()), budget });
        assert!(matches!(
            settle(next_at(&job(None), &mut retry, 0)),
            Disposition::Retry { level: 0, claim: Some(claim) } if claim == "test/1"
        ));
        // The first level's longest delay (2 s) would end at the deadline: answered instead.
        let mut late = ready(QLIK);
        late.call_result = Some(CallFacts { outcome: Err(down()), budget });
        assert_eq!(answered(next_at(&job(Some(at(2))), &mut late, 0)), ("mcp_unavailable", true));
        let mut used_up = ready(QLIK);
        used_up.envelope.retries = 2;
        used_up.call_result = Some(CallFacts { outcome: Err(down()), budget });
        assert_eq!(answered(next_at(&job(None), &mut used_up, 0)), ("mcp_unavailable", true));
    }

    #[test]
    fn absurd_dates_and_counters_never_panic() {
        let config = WorkerConfig {
            claim_lease: Duration::MAX,
            results_ttl: Duration::MAX,
            call_timeout: Duration::MAX,
            clock_skew: Duration::MAX,
            ..config()
        };
        for deadline in [None, Some(DateTime::<Utc>::MIN_UTC), Some(DateTime::<Utc>::MAX_UTC)] {
            for now in [DateTime::<Utc>::MIN_UTC, at(0), DateTime::<Utc>::MAX_UTC] {
                let mut facts = ready(QLIK);
                facts.envelope = Envelope {
                    reply_to: Some("r".into()),
                    failed_deliveries: u32::MAX - 1,
                    deferrals: u32::MAX,
                    retries: u32::MAX,
                    waits: u32::MAX,
                    ..Envelope::default()
                };
                let _ = next(&job(deadline), &mut facts, &config, now);
                facts.claim = None;
                let _ = next(&job(deadline), &mut facts, &config, now);
            }
        }
    }

    #[test]
    fn a_refused_token_is_renewed_once_and_a_refused_renewal_means_reauth() {
        let budget = CallBudget { timeout: Duration::from_secs(30), limited_by_deadline: false };
        let refused = || McpCallError::Unauthorized { server: "qlik".into() };
        // First 401: wait for a forced renewal of version 7.
        let mut first = ready(QLIK);
        first.call_result = Some(CallFacts { outcome: Err(refused()), budget });
        match settle(next_at(&job(None), &mut first, 0)) {
            Disposition::Defer { refresh, refused_version: Some(7), deferrals: 1, .. } => assert!(refresh.refused),
            other => panic!("{other:?}"),
        }
        // Back, and still version 7: the renewal has not landed; read bypasses the cache, then waits.
        let mut back = facts(QLIK);
        back.claim = Some(Ok(Claim::Run));
        back.envelope.refused_version = Some(7);
        back.envelope.deferrals = 1;
        assert!(matches!(next_at(&job(None), &mut back, 0), Step::ReadToken { fresh: true, .. }));
        back.token = Some(Ok(Some(token(at(3600)))));
        assert!(matches!(
            settle(next_at(&job(None), &mut back, 0)),
            Disposition::Defer { refused_version: Some(7), deferrals: 2, .. }
        ));
        // Renewed (version 8) and called: refused again, so the user must reconnect.
        back.token = Some(Ok(Some(TokenFacts { version: 8, ..token(at(3600)) })));
        assert!(matches!(next_at(&job(None), &mut back, 0), Step::Call { .. }));
        back.call_result = Some(CallFacts { outcome: Err(refused()), budget });
        match settle(next_at(&job(None), &mut back, 0)) {
            Disposition::Reauth { reply, token, record: Some(_), .. } => {
                assert_eq!(reply.outcome(), "reauth_required");
                assert_eq!((token.version, token.user_id.as_str()), (8, "alice"));
            }
            other => panic!("{other:?}"),
        }
        // A 401 with no deferral left stays unconfirmed; a public server's 401 is a protocol error.
        let mut no_time = ready(QLIK);
        no_time.envelope.deferrals = 2;
        no_time.call_result = Some(CallFacts { outcome: Err(refused()), budget });
        assert_eq!(answered(next_at(&job(None), &mut no_time, 0)), ("token_unavailable", true));
        let mut public = facts_with_claim(Route::Public);
        public.call_result = Some(CallFacts { outcome: Err(refused()), budget });
        assert_eq!(answered(next_at(&job(None), &mut public, 0)), ("mcp_protocol_error", true));
    }

    #[test]
    fn a_forbidden_user_is_told_so_with_the_servers_reason_and_a_public_servers_403_is_a_protocol_error() {
        let budget = CallBudget { timeout: Duration::from_secs(30), limited_by_deadline: false };
        let forbidden =
            || McpCallError::Forbidden { server: "qlik".into(), description: Some("lacks Qlik MCP: Allowed".into()) };
        let mut user = ready(QLIK);
        user.call_result = Some(CallFacts { outcome: Err(forbidden()), budget });
        match settle(next_at(&job(None), &mut user, 0)) {
            Disposition::Reply { reply, record: Some(_), .. } => {
                assert_eq!(reply.outcome(), "forbidden");
                let body = serde_json::to_value(&reply).unwrap();
                assert_eq!(body["error"]["provider"], "qlik");
                assert_eq!(body["error"]["retryable"], false);
                assert!(body["error"]["message"].as_str().unwrap().contains("lacks Qlik MCP: Allowed"), "{body}");
            }
            other => panic!("{other:?}"),
        }
        let mut public = facts_with_claim(Route::Public);
        public.call_result = Some(CallFacts { outcome: Err(forbidden()), budget });
        assert_eq!(answered(next_at(&job(None), &mut public, 0)), ("mcp_protocol_error", true));
    }
}
