//! What a failed token request means, decided from the status code and the RFC 6749 error code
//! alone, so it is unit-tested without a server.
//!
//! Marking a user `reauth_required` sends them back through the connect flow, so only answers
//! that are about *this grant* count as permanent. An answer about *our client* (bad secret, bad
//! request) would hit every user alike: it is a configuration problem, retried with backoff and
//! logged loudly, never a reason to disconnect anyone.

use std::time::Duration;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The grant is gone (RFC `invalid_grant`, Qlik's 401 for a used or revoked refresh token,
    /// 403 for a disabled user or too many tokens): reconnecting is the only way back.
    Permanent,
    /// Worth trying again later: network trouble, 5xx, 429.
    Transient { retry_after: Option<Duration> },
    /// The provider refuses our client or our request, or answers with a redirect (which is
    /// never followed: it would carry the client secret, the verifier or the refresh token to
    /// another host): fix the configuration.
    Misconfigured,
    /// The provider answered with tokens we cannot use (see [`super::accept::check_token`]).
    /// Nothing is stored; like `Misconfigured` it is retried with backoff and logged as an
    /// error, since the fault is the provider's, not the grant's.
    UnusableToken,
}

/// Classifies a token endpoint failure. `status` is `None` when no HTTP answer came at all.
pub(crate) fn classify(status: Option<u16>, error: Option<&str>, retry_after: Option<Duration>) -> FailureKind {
    match (status, error) {
        (None, _) => FailureKind::Transient { retry_after: None },
        // Before the error codes: a redirect that also carries `invalid_grant` is still a
        // redirect, and must not disconnect anyone.
        (Some(s), _) if (300..400).contains(&s) => FailureKind::Misconfigured,
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

/// `Retry-After` as a wait from `now`: delay-seconds of any size (saturating at
/// `Duration::MAX`, for the caller to clamp), or an HTTP date (RFC 9110's IMF-fixdate, which
/// chrono's RFC 2822 parser reads; a date in the past is no wait). Anything else is absent, and
/// the caller's own backoff applies.
pub(crate) fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let date = DateTime::parse_from_rfc2822(value).ok()?;
    Some(crate::dates::until(now, date.with_timezone(&Utc)))
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
    }

    #[test]
    fn redirects_are_misconfiguration_whatever_the_body_says() {
        for status in [301, 302, 303, 307, 308] {
            assert_eq!(classify(Some(status), None, None), FailureKind::Misconfigured);
            assert_eq!(classify(Some(status), Some("invalid_grant"), None), FailureKind::Misconfigured);
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_of_any_size_or_as_a_date() {
        let now = DateTime::parse_from_rfc3339("2026-10-21T07:28:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("99999999999999999999999", now), Some(Duration::MAX));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:30:00 GMT", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2026 07:00:00 GMT", now), Some(Duration::ZERO), "past");
        assert_eq!(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now).map(|d| d > Duration::ZERO), Some(true));
        for junk in ["", "-5", "1.5", "soon", "7 s"] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }
}
