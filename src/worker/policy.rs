//! Pure decisions of the job path, with the clock passed in: how long a call may take, and what a
//! failed call means for the job. No I/O here, so every rule is unit-tested.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::catalog::ToolHints;
use crate::job::ErrorCode;
use crate::mcp::McpCallError;

/// How long the MCP call of a job may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallBudget {
    pub(crate) timeout: Duration,
    /// The job's deadline, not the configured call timeout, set the limit: running out of time
    /// then means the deadline passed.
    pub(crate) limited_by_deadline: bool,
}

/// The deadline has passed; the job must not reach the MCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeadlinePassed;

/// The time a call may take: the configured timeout, cut to what is left before the deadline.
pub(crate) fn call_budget(
    now: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
    call_timeout: Duration,
) -> Result<CallBudget, DeadlinePassed> {
    let Some(deadline) = deadline else {
        return Ok(CallBudget { timeout: call_timeout, limited_by_deadline: false });
    };
    let left = (deadline - now).to_std().map_err(|_| DeadlinePassed)?;
    if left.is_zero() {
        return Err(DeadlinePassed);
    }
    Ok(if left < call_timeout {
        CallBudget { timeout: left, limited_by_deadline: true }
    } else {
        CallBudget { timeout: call_timeout, limited_by_deadline: false }
    })
}

/// Whether a stored token can go on this job's call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenVerdict {
    Use,
    /// Expired or about to: the refresher must renew it first; the job waits.
    Refresh,
    /// The provider refused the grant; only the user reconnecting helps.
    ReauthRequired,
}

/// A token is usable when it stays valid for the whole call: at least `min_remaining` (the call's
/// budget plus clock skew) must be left of it.
pub(crate) fn token_verdict(
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    reauth_required: bool,
    min_remaining: Duration,
) -> TokenVerdict {
    if reauth_required {
        return TokenVerdict::ReauthRequired;
    }
    match (expires_at - now).to_std() {
        Ok(left) if left >= min_remaining => TokenVerdict::Use,
        _ => TokenVerdict::Refresh,
    }
}

/// Whether a reply should instead become a retry, and after which of the `delays`: only
/// `mcp_unavailable` is retried, at most once per delay, and never past the job's deadline.
pub(crate) fn retry_level(
    code: Option<ErrorCode>,
    retries: u32,
    delays: impl IntoIterator<Item = Duration>,
    now: DateTime<Utc>,
    deadline: Option<DateTime<Utc>>,
) -> Option<usize> {
    if code != Some(ErrorCode::McpUnavailable) {
        return None;
    }
    let level = usize::try_from(retries).ok()?;
    let delay = delays.into_iter().nth(level)?;
    match deadline {
        Some(deadline) if crate::dates::after(now, delay) >= deadline => None,
        _ => Some(level),
    }
}

/// What a tool call promises about running twice for one `job_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guarantee {
    /// Claimed before the call and its reply recorded: the tool runs once per `job_id`, whatever
    /// the redeliveries, and a repeat gets the recorded reply.
    ExactlyOnce,
    /// Neither claimed nor recorded, so it costs no database write: a redelivered job runs the
    /// tool again, and is answered again.
    AtLeastOnce,
}

/// A call runs at least once only when the operator trusts its server's annotations
/// (`trusted`), has not named the tool for exactly-once (`forced`), and the user's catalog says
/// the tool is read-only or idempotent, so that running it again changes nothing. Annotations
/// not known yet (no catalog cached) keep exactly-once.
pub(crate) fn guarantee(hints: Option<ToolHints>, trusted: bool, forced: bool) -> Guarantee {
    let harmless = hints.is_some_and(|h| h.read_only == Some(true) || h.idempotent == Some(true));
    if trusted && !forced && harmless { Guarantee::AtLeastOnce } else { Guarantee::ExactlyOnce }
}

/// The reply's error code for a failed call.
pub(crate) fn error_code(error: &McpCallError, budget: CallBudget) -> ErrorCode {
    match error {
        McpCallError::Timeout { .. } if budget.limited_by_deadline => ErrorCode::DeadlineExceeded,
        McpCallError::Timeout { .. } | McpCallError::Unavailable { .. } | McpCallError::OverBudget { .. } => {
            ErrorCode::McpUnavailable
        }
        // A redirect is a misconfiguration or an attack: trying again would meet it again. A 401
        // or 403 here is about a server's fixed credential: the worker answers a refusal of a
        // user's token itself (renewal, `reauth_required`, `forbidden`).
        McpCallError::Rpc { .. }
        | McpCallError::Unauthorized { .. }
        | McpCallError::Forbidden { .. }
        | McpCallError::Protocol { .. }
        | McpCallError::Redirected { .. } => ErrorCode::McpProtocolError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    const TIMEOUT: Duration = Duration::from_secs(30);

    #[test]
    fn without_a_deadline_the_call_timeout_applies() {
        assert_eq!(call_budget(at(0), None, TIMEOUT), Ok(CallBudget { timeout: TIMEOUT, limited_by_deadline: false }));
    }

    #[test]
    fn a_near_deadline_shortens_the_call() {
        let budget = call_budget(at(0), Some(at(5)), TIMEOUT).unwrap();
        assert_eq!(budget, CallBudget { timeout: Duration::from_secs(5), limited_by_deadline: true });
        let far = call_budget(at(0), Some(at(500)), TIMEOUT).unwrap();
        assert_eq!(far, CallBudget { timeout: TIMEOUT, limited_by_deadline: false });
    }

    #[test]
    fn a_passed_or_current_deadline_stops_the_job() {
        assert_eq!(call_budget(at(10), Some(at(5)), TIMEOUT), Err(DeadlinePassed));
        assert_eq!(call_budget(at(5), Some(at(5)), TIMEOUT), Err(DeadlinePassed));
    }

    #[test]
    fn a_token_must_outlive_the_call() {
        let need = Duration::from_secs(60);
        assert_eq!(token_verdict(at(0), at(61), false, need), TokenVerdict::Use);
        assert_eq!(token_verdict(at(0), at(60), false, need), TokenVerdict::Use);
        assert_eq!(token_verdict(at(0), at(59), false, need), TokenVerdict::Refresh);
        assert_eq!(token_verdict(at(100), at(0), false, need), TokenVerdict::Refresh, "expired");
        assert_eq!(token_verdict(at(0), at(9999), true, need), TokenVerdict::ReauthRequired);
    }

    #[test]
    fn only_unavailable_servers_are_retried_once_per_delay_and_never_past_the_deadline() {
        let delays = [Duration::from_secs(1), Duration::from_secs(5)];
        let unavailable = Some(ErrorCode::McpUnavailable);
        assert_eq!(retry_level(unavailable, 0, delays, at(0), None), Some(0));
        assert_eq!(retry_level(unavailable, 1, delays, at(0), None), Some(1));
        assert_eq!(retry_level(unavailable, 2, delays, at(0), None), None, "delays used up");
        assert_eq!(retry_level(unavailable, 1, delays, at(0), Some(at(5))), None, "would end at the deadline");
        assert_eq!(retry_level(unavailable, 1, delays, at(0), Some(at(6))), Some(1));
        assert_eq!(retry_level(Some(ErrorCode::McpProtocolError), 0, delays, at(0), None), None);
        assert_eq!(retry_level(None, 0, delays, at(0), None), None);
        assert_eq!(retry_level(unavailable, 0, [], at(0), None), None);
    }

    #[test]
    fn only_a_trusted_read_only_or_idempotent_tool_not_forced_runs_at_least_once() {
        let hints = |read_only, idempotent| Some(ToolHints { read_only, idempotent, destructive: None });
        use Guarantee::*;
        assert_eq!(guarantee(hints(Some(true), None), true, false), AtLeastOnce);
        assert_eq!(guarantee(hints(Some(false), Some(true)), true, false), AtLeastOnce);
        assert_eq!(guarantee(hints(Some(true), None), false, false), ExactlyOnce, "annotations not trusted");
        assert_eq!(guarantee(hints(Some(true), None), true, true), ExactlyOnce, "forced");
        assert_eq!(guarantee(hints(Some(false), Some(false)), true, false), ExactlyOnce);
        assert_eq!(guarantee(hints(None, None), true, false), ExactlyOnce, "nothing said");
        assert_eq!(guarantee(None, true, false), ExactlyOnce, "no catalog cached");
    }

    #[test]
    fn errors_map_to_codes() {
        let timeout = McpCallError::Timeout { server: "s".into(), after: TIMEOUT };
        let by_deadline = CallBudget { timeout: TIMEOUT, limited_by_deadline: true };
        let by_config = CallBudget { timeout: TIMEOUT, limited_by_deadline: false };
        assert_eq!(error_code(&timeout, by_deadline), ErrorCode::DeadlineExceeded);
        assert_eq!(error_code(&timeout, by_config), ErrorCode::McpUnavailable);
        let down = McpCallError::Unavailable { server: "s".into(), detail: "refused".into() };
        assert_eq!(error_code(&down, by_config), ErrorCode::McpUnavailable);
        let rpc = McpCallError::Rpc { server: "s".into(), code: -32602, message: "unknown tool".into() };
        assert_eq!(error_code(&rpc, by_config), ErrorCode::McpProtocolError);
        assert_eq!(
            error_code(&McpCallError::Unauthorized { server: "s".into() }, by_config),
            ErrorCode::McpProtocolError
        );
    }
}
