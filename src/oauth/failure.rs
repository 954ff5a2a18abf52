//! What a failed token request means, decided from the status code and the RFC 6749 error code
//! alone, so it is unit-tested without a server.
//!
//! Marking a user `reauth_required` sends them back through the connect flow, so only answers
//! that are about *this grant* count as permanent. An answer about *our client* (bad secret, bad
//! request) would hit every user alike: it is a configuration problem, retried with backoff and
//! logged loudly, never a reason to disconnect anyone.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The grant is gone (RFC `invalid_grant`, Qlik's 401 for a used or revoked refresh token,
    /// 403 for a disabled user or too many tokens): reconnecting is the only way back.
    Permanent,
    /// Worth trying again later: network trouble, 5xx, 429.
    Transient { retry_after: Option<Duration> },
    /// The provider refuses our client or our request: fix the configuration.
    Misconfigured,
}

/// Classifies a token endpoint failure. `status` is `None` when no HTTP answer came at all.
pub fn classify(status: Option<u16>, error: Option<&str>, retry_after: Option<Duration>) -> FailureKind {
    match (status, error) {
        (None, _) => FailureKind::Transient { retry_after: None },
        (Some(429), _) => FailureKind::Transient { retry_after },
        (Some(s), _) if s >= 500 => FailureKind::Transient { retry_after },
        (Some(_), Some("invalid_grant")) => FailureKind::Permanent,
        (
            Some(_),
            Some(
                "invalid_client"
                | "unauthorized_client"
                | "invalid_request"
                | "unsupported_grant_type"
                | "invalid_scope",
            ),
        ) => FailureKind::Misconfigured,
        // Qlik answers a used or invalid refresh token with a bare 401, and 403 when the user is
        // disabled or has too many tokens: both about the grant.
        (Some(401 | 403), _) => FailureKind::Permanent,
        (Some(_), _) => FailureKind::Misconfigured,
    }
}

/// `Retry-After` in its delay-seconds form; the HTTP-date form is rare on token endpoints and is
/// treated as absent (the caller's own backoff applies).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_failures_are_permanent() {
        assert_eq!(classify(Some(400), Some("invalid_grant"), None), FailureKind::Permanent);
        assert_eq!(classify(Some(401), None, None), FailureKind::Permanent, "Qlik's used refresh token");
        assert_eq!(classify(Some(401), Some("invalid_grant"), None), FailureKind::Permanent);
        assert_eq!(classify(Some(403), None, None), FailureKind::Permanent);
    }

    #[test]
    fn client_failures_never_disconnect_users() {
        assert_eq!(classify(Some(401), Some("invalid_client"), None), FailureKind::Misconfigured);
        assert_eq!(classify(Some(400), Some("invalid_request"), None), FailureKind::Misconfigured);
        assert_eq!(classify(Some(404), None, None), FailureKind::Misconfigured);
    }

    #[test]
    fn outages_and_rate_limits_are_transient() {
        assert_eq!(classify(None, None, None), FailureKind::Transient { retry_after: None });
        assert_eq!(classify(Some(503), None, None), FailureKind::Transient { retry_after: None });
        let wait = Some(Duration::from_secs(7));
        assert_eq!(classify(Some(429), Some("slow_down"), wait), FailureKind::Transient { retry_after: wait });
        assert_eq!(parse_retry_after(" 7 "), wait);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
    }
}
