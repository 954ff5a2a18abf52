//! From a delivered message to what should happen to it: which reply goes where, and whether the
//! message is also dead-lettered. Nothing here acks or publishes; [`super::Worker`] does that.

use chrono::{DateTime, Utc};

use super::Worker;
use super::policy::{self, DeadlinePassed};
use crate::job::{self, ErrorCode, InvalidJob, Job, Reply};
use crate::queue::Delivery;

/// What to do with one delivery.
#[derive(Debug)]
pub(super) enum Disposition {
    /// Publish `reply`, then ack.
    Reply { to: ReplyTarget, reply: Reply },
    /// Publish `reply` if there is a target, copy the message to the dead-letter queue with
    /// `reason`, then ack.
    DeadLetter { reason: String, to: Option<ReplyTarget>, reply: Reply },
}

#[derive(Debug, Clone)]
pub(super) struct ReplyTarget {
    pub queue: String,
    pub correlation_id: Option<String>,
}

impl Disposition {
    pub(super) fn reply(&self) -> &Reply {
        match self {
            Disposition::Reply { reply, .. } | Disposition::DeadLetter { reply, .. } => reply,
        }
    }
}

impl Worker {
    pub(super) async fn dispose(&self, delivery: &Delivery, now: DateTime<Utc>) -> (Option<Job>, Disposition) {
        let job = match job::decode(&delivery.body, self.config.max_job_bytes) {
            Ok(job) => job,
            Err(invalid) => return (None, invalid_job(delivery, invalid)),
        };
        let Some(queue) = delivery.reply_to.clone() else {
            let reason = "the message has no reply_to property, so no reply could reach the caller".to_owned();
            let reply = Reply::error(Some(&job.job_id), ErrorCode::InvalidJob, reason.clone());
            return (Some(job), Disposition::DeadLetter { reason, to: None, reply });
        };
        let correlation_id = delivery.correlation_id.clone().or_else(|| Some(job.job_id.clone()));
        let reply = self.execute(&job, now).await;
        (Some(job), Disposition::Reply { to: ReplyTarget { queue, correlation_id }, reply })
    }

    /// Runs a valid job and says how it went. Never fails: every failure is an error reply.
    async fn execute(&self, job: &Job, now: DateTime<Utc>) -> Reply {
        let id = Some(job.job_id.as_str());
        let Some(server) = self.registry.route(&job.tool) else {
            return Reply::error(id, ErrorCode::UnknownTool, format!("no MCP server serves the tool `{}`", job.tool));
        };
        if policy::call_budget(now, job.deadline, self.config.call_timeout).is_err() {
            return deadline_exceeded(job);
        }
        let credential = match &server.auth {
            None => None,
            Some(auth) => match self.store.tokens(auth.provider).get(&job.user_id).await {
                Ok(Some(token)) => match auth.credential(&token.access_token) {
                    Ok(credential) => Some(credential),
                    Err(e) => return Reply::error(id, ErrorCode::Internal, e.to_string()).with_provider(auth.provider),
                },
                Ok(None) => {
                    let message = format!("the user has not connected {}; send them through the connect flow", auth.provider);
                    return Reply::error(id, ErrorCode::NotConnected, message).with_provider(auth.provider);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token lookup failed");
                    return Reply::error(id, ErrorCode::Internal, "the token store is unavailable");
                }
            },
        };
        // The token lookup took time; what is left of the deadline is measured again.
        let budget = match policy::call_budget(Utc::now(), job.deadline, self.config.call_timeout) {
            Ok(budget) => budget,
            Err(DeadlinePassed) => return deadline_exceeded(job),
        };
        let client = self.mcp.get(&server.name).expect("every routed server has a client");
        match client.call_tool(&job.tool, job.arguments.clone(), credential, budget.timeout).await {
            Ok(result) => Reply::ok(&job.job_id, result),
            Err(e) => Reply::error(id, policy::error_code(&e, budget), e.to_string()),
        }
    }
}

fn deadline_exceeded(job: &Job) -> Reply {
    Reply::error(Some(&job.job_id), ErrorCode::DeadlineExceeded, "the job's deadline passed before the tool could be called")
}

fn invalid_job(delivery: &Delivery, invalid: InvalidJob) -> Disposition {
    let job_id = invalid.job_id.or_else(|| delivery.message_id.clone());
    let reply = Reply::error(job_id.as_deref(), ErrorCode::InvalidJob, invalid.reason.clone());
    let to = delivery.reply_to.clone().map(|queue| ReplyTarget {
        queue,
        correlation_id: delivery.correlation_id.clone().or_else(|| job_id.clone()),
    });
    Disposition::DeadLetter { reason: invalid.reason, to, reply }
}
