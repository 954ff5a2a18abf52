//! The shell of the job path: performs, one at a time, the steps that [`decision::next`] (or,
//! for a `tools/list` job, [`decision::next_listing`]) asks for (claim the `job_id`, read the
//! user's token, call the tool, list the catalog), tells it what each observed,
//! and reads the clock once per step. It decides nothing itself; [`super::Worker`] then settles
//! the delivery as the returned [`Disposition`] says.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::Worker;
use super::decision::{self, CallFacts, Disposition, Facts, Route, Step, TokenFacts};
use super::envelope::Envelope;
use super::policy::{self, Guarantee, TokenVerdict};
use crate::catalog::{ToolHints, Via};
use crate::job::{self, Job, Method};
use crate::mcp::{Called, HeldBytes};
use crate::queue::Delivery;
use crate::registry::{AuthSpec, CredentialHeader};
use crate::store::{StoreError, StoredToken, TokenStatus};

/// What the job path came to: the disposition to settle, and what settling needs besides.
pub(super) struct Disposed {
    /// The job, when the delivery decoded to one.
    pub(super) job: Option<Job>,
    pub(super) disposition: Disposition,
    /// How long the MCP call took; zero when none was made.
    pub(super) call_time: Duration,
    /// The answer bytes the result was built from, held from the response budget until the reply
    /// is published (see [`HeldBytes`]).
    pub(super) held: Option<HeldBytes>,
    /// What the catalog knows of the called tool's effects, when it has the user's list.
    pub(super) hints: Option<ToolHints>,
}

impl Worker {
    /// Runs `delivery` through the job path up to the point of settling it.
    pub(super) async fn dispose(&self, delivery: &Delivery) -> Disposed {
        let envelope = Envelope::of(delivery);
        let mut job = match job::decode(&delivery.body, self.config.job_limits) {
            Ok(job) => job,
            Err(invalid) => {
                let disposition = decision::refuse_invalid(&envelope, invalid);
                return Disposed { job: None, disposition, call_time: Duration::ZERO, held: None, hints: None };
            }
        };
        let server = self.registry.route(&job.tool);
        let route = match server.map(|server| server.auth.as_ref()) {
            None => Route::Unknown,
            Some(None) => Route::Public,
            Some(Some(auth)) => Route::Token(auth.provider),
        };
        // A job back from a delay queue presents the claim it held; a new delivery gets a new one.
        let owner = envelope
            .claim
            .clone()
            .unwrap_or_else(|| format!("{}/{}", self.config.owner, uuid::Uuid::new_v4().simple()));
        // Known before the claim: whether there is one depends on what the tool's annotations say.
        let hints = match (job.method, server) {
            (Method::CallTool, Some(server)) => self.catalog.hints(server, &job.user_id, &job.tool).await,
            _ => None,
        };
        let guarantee = server.map_or(Guarantee::ExactlyOnce, |server| {
            policy::guarantee(hints, server.trust_annotations, server.exactly_once.contains(&job.tool))
        });
        let mut facts = Facts {
            call: job.fingerprint(),
            owner,
            envelope,
            route,
            claim: None,
            token: None,
            call_result: None,
            catalog: None,
            guarantee,
        };
        let mut credential = None;
        let mut call_time = Duration::ZERO;
        let mut held = None;
        loop {
            let now = Utc::now();
            let step = match job.method {
                Method::CallTool => decision::next(&job, &mut facts, &self.config, now),
                Method::ListTools => decision::next_listing(&job, &mut facts, &self.config, now),
            };
            match step {
                Step::Claim { lease_until, expires_at } => {
                    let returning = facts.envelope.claim.is_some();
                    let claim = self
                        .results
                        .claim(&job.job_id, &facts.call, &facts.owner, returning, now, lease_until, expires_at)
                        .await;
                    if let Err(e) = &claim {
                        tracing::warn!(error = %e, "claiming the job failed");
                    }
                    facts.claim = Some(claim);
                }
                Step::ReadToken { min_remaining, fresh } => {
                    let auth = server.and_then(|server| server.auth.as_ref());
                    let auth = auth.expect("the rules ask for a token only for a server that needs one");
                    let (seen, header) = self.read_token(auth, &job.user_id, now, min_remaining, fresh).await;
                    facts.token = Some(seen);
                    credential = header;
                }
                Step::List { budget } => {
                    // The listing's time counts as the call's: `added_ms` is what the worker adds.
                    let listed = Instant::now();
                    let catalog = self.catalog.list(&job.user_id, budget, Via::Amqp).await;
                    call_time = listed.elapsed();
                    facts.catalog = Some(serde_json::to_value(catalog).expect("a catalog holds only strings and JSON"));
                }
                Step::Call { budget } => {
                    let server = server.expect("the rules call only a routed tool");
                    let client = self.mcp.get(&server.name).expect("every routed server has a client");
                    let called = Instant::now();
                    // The arguments are not needed after the call: moved, not copied.
                    let arguments = std::mem::take(&mut job.arguments);
                    let answer = client.call_tool(&job.tool, arguments, credential.take(), budget.timeout).await;
                    let outcome = answer.map(|Called { result, held: bytes }| {
                        held = Some(bytes);
                        result
                    });
                    call_time = called.elapsed();
                    let label = match &outcome {
                        Ok(_) => "ok",
                        Err(e) => policy::error_code(e, budget).as_str(),
                    };
                    self.metrics.mcp_call(&server.name, label, call_time);
                    facts.call_result = Some(CallFacts { outcome, budget });
                }
                Step::Settle(disposition) => return Disposed { job: Some(job), disposition, call_time, held, hints },
            }
        }
    }

    /// The user's token as the rules see it, and the credential header to call with. A cached
    /// token serves only if it would serve as freshly read, and not at all when `fresh`.
    async fn read_token(
        &self,
        auth: &AuthSpec,
        user_id: &str,
        now: DateTime<Utc>,
        min_remaining: Duration,
        fresh: bool,
    ) -> (Result<Option<TokenFacts>, StoreError>, Option<CredentialHeader>) {
        let provider = auth.provider;
        let usable = |token: &StoredToken| {
            let reauth = token.status == TokenStatus::ReauthRequired;
            policy::token_verdict(now, token.expires_at, reauth, min_remaining) == TokenVerdict::Use
        };
        let cached = if fresh { None } else { self.tokens.get(provider, user_id, Instant::now()) };
        let read = match cached.filter(usable) {
            Some(token) => Ok(Some(token)),
            None => {
                let read_started = Instant::now();
                let read = self.token_stores.get(provider).get(user_id).await;
                if let Ok(Some(token)) = &read {
                    self.tokens.put(provider, token, read_started);
                }
                read
            }
        };
        match read {
            Ok(Some(token)) => {
                let header = auth.credential(&token.access_token).ok();
                let facts = TokenFacts {
                    version: token.version,
                    expires_at: token.expires_at,
                    reauth_required: token.status == TokenStatus::ReauthRequired,
                    sendable: header.is_some(),
                };
                (Ok(Some(facts)), header)
            }
            Ok(None) => (Ok(None), None),
            Err(e) => {
                match &e {
                    StoreError::Unreadable(_) => {
                        self.metrics.unreadable_token();
                        // Every job of that user hits it; one line per user says enough.
                        if self.unreadable.first_time(user_id) {
                            tracing::warn!(error = %e, "the user's stored token cannot be read; jobs get reauth_required");
                        }
                    }
                    StoreError::Unavailable(_) => tracing::warn!(error = %e, "token lookup failed; the job waits"),
                    StoreError::InvalidUri(_) | StoreError::Rejected(_) => {
                        tracing::error!(error = %e, "the database refused the token lookup");
                    }
                }
                (Err(e), None)
            }
        }
    }
}
