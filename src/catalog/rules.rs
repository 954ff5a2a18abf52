//! The catalog's decisions as pure functions, with the clock and what was observed passed in:
//! whether a user's token can be listed with, what a failed listing tells the user, and how long
//! and for whom a list may be reused.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::job::{ErrorCode, ReplyError};
use crate::mcp::{ListScope, McpCallError};
use crate::provider::Provider;
use crate::worker::policy::{self, CallBudget, TokenVerdict};

/// What was read of the user's token for a server that needs one: never the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TokenSeen {
    /// The user has not connected the provider.
    Missing,
    /// Stored, but unreadable (a retired key, a damaged value).
    Unreadable,
    /// The database could not be asked.
    StoreDown,
    Found {
        expires_at: DateTime<Utc>,
        reauth_required: bool,
        /// The token can be put in the server's credential header.
        sendable: bool,
    },
}

/// Why a server's tools are missing from a catalog, and whether the refresher should be asked
/// to renew the user's token.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Unlisted {
    pub(super) error: ReplyError,
    pub(super) refresh: Option<Refresh>,
}

/// Ask the refresher to make the token valid `until`, or, when `refused`, to renew it anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refresh {
    pub(super) until: DateTime<Utc>,
    pub(super) refused: bool,
}

impl Unlisted {
    fn new(code: ErrorCode, message: String, provider: Option<Provider>) -> Self {
        Self { error: ReplyError::new(code, message, provider), refresh: None }
    }
}

/// Whether the token can go on a listing that may take `min_remaining` (the call budget plus
/// clock skew). As for calls, the token must outlive the request; unlike a call, a listing never
/// waits for a renewal: a token too short is a reason (with a request for an early refresh), so
/// the chat backend gets the other servers' tools at once.
pub(super) fn token_use(
    provider: Provider,
    seen: TokenSeen,
    now: DateTime<Utc>,
    min_remaining: Duration,
) -> Result<(), Unlisted> {
    let (expires_at, reauth_required, sendable) = match seen {
        TokenSeen::Missing => {
            let message = format!("the user has not connected {provider}; send them through the connect flow");
            return Err(Unlisted::new(ErrorCode::NotConnected, message, Some(provider)));
        }
        TokenSeen::Unreadable => {
            let message =
                format!("the user's stored {provider} token cannot be read; send them through the connect flow");
            return Err(Unlisted::new(ErrorCode::ReauthRequired, message, Some(provider)));
        }
        TokenSeen::StoreDown => {
            let message = "the database could not be reached to read the user's token; try again later".to_owned();
            return Err(Unlisted::new(ErrorCode::Internal, message, Some(provider)));
        }
        TokenSeen::Found { expires_at, reauth_required, sendable } => (expires_at, reauth_required, sendable),
    };
    match policy::token_verdict(now, expires_at, reauth_required, min_remaining) {
        TokenVerdict::Use if sendable => Ok(()),
        TokenVerdict::Use => {
            let message = format!(
                "the user's stored {provider} token cannot be sent in a request header; send them through the connect \
                 flow"
            );
            Err(Unlisted::new(ErrorCode::ReauthRequired, message, Some(provider)))
        }
        TokenVerdict::ReauthRequired => {
            let message = format!(
                "the user's {provider} authorization was revoked or expired; send them through the connect flow"
            );
            Err(Unlisted::new(ErrorCode::ReauthRequired, message, Some(provider)))
        }
        TokenVerdict::Refresh => {
            let message = format!("the user's {provider} token is being renewed; ask again in a few seconds");
            let until = crate::dates::after(now, min_remaining);
            Err(Unlisted {
                error: ReplyError::new(ErrorCode::TokenUnavailable, message, Some(provider)),
                refresh: Some(Refresh { until, refused: false }),
            })
        }
    }
}

/// What a failed listing tells the user. `provider` is set for a server that was sent the
/// user's token: its 401 means the token was refused (renewed in the background, retryable),
/// its 403 that the user's role lacks the permission.
pub(super) fn unlisted_by(
    error: &McpCallError,
    provider: Option<Provider>,
    budget: CallBudget,
    now: DateTime<Utc>,
) -> Unlisted {
    match (error, provider) {
        (McpCallError::Unauthorized { .. }, Some(provider)) => Unlisted {
            error: ReplyError::new(
                ErrorCode::TokenUnavailable,
                format!("the MCP server refused the user's {provider} token; it is being renewed, ask again shortly"),
                Some(provider),
            ),
            refresh: Some(Refresh { until: now, refused: true }),
        },
        (McpCallError::Forbidden { .. }, Some(provider)) => {
            Unlisted::new(ErrorCode::Forbidden, error.to_string(), Some(provider))
        }
        _ => Unlisted::new(policy::error_code(error, budget), error.to_string(), None),
    }
}

/// How long a list may be reused, and whether by every user (`true`) or only by the one it was
/// listed for. The server's `ttlMs` is honoured when it is shorter than the configured TTL (zero
/// means it is stale at once); a list of a server that needs no token is the same for everyone;
/// one listed with a user's token is that user's, unless the server said `cacheScope: public`.
pub(super) fn freshness(
    ttl: Option<Duration>,
    scope: Option<ListScope>,
    configured: Duration,
    listed_with_token: bool,
) -> (Duration, bool) {
    let ttl = ttl.map_or(configured, |ttl| ttl.min(configured));
    (ttl, !listed_with_token || scope == Some(ListScope::Public))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    const NEED: Duration = Duration::from_secs(40);

    fn code(result: Result<(), Unlisted>) -> ErrorCode {
        result.unwrap_err().error.code
    }

    #[test]
    fn a_token_lists_only_if_it_outlives_the_listing() {
        let found =
            |expires, reauth, sendable| TokenSeen::Found { expires_at: at(expires), reauth_required: reauth, sendable };
        assert_eq!(token_use(Provider::Qlik, found(40, false, true), at(0), NEED), Ok(()));
        let short = token_use(Provider::Qlik, found(39, false, true), at(0), NEED).unwrap_err();
        assert_eq!(short.error.code, ErrorCode::TokenUnavailable);
        assert_eq!(short.refresh, Some(Refresh { until: at(40), refused: false }), "the refresher is asked");
        assert!(short.error.retryable);
        assert_eq!(code(token_use(Provider::Qlik, found(999, true, true), at(0), NEED)), ErrorCode::ReauthRequired);
        assert_eq!(code(token_use(Provider::Qlik, found(999, false, false), at(0), NEED)), ErrorCode::ReauthRequired);
    }

    #[test]
    fn a_missing_or_unreadable_token_names_the_provider() {
        for (seen, expected) in [
            (TokenSeen::Missing, ErrorCode::NotConnected),
            (TokenSeen::Unreadable, ErrorCode::ReauthRequired),
            (TokenSeen::StoreDown, ErrorCode::Internal),
        ] {
            let unlisted = token_use(Provider::Qlik, seen, at(0), NEED).unwrap_err();
            assert_eq!(unlisted.error.code, expected);
            assert_eq!(unlisted.error.provider, Some(Provider::Qlik));
            assert_eq!(unlisted.refresh, None, "no renewal helps");
        }
    }

    #[test]
    fn a_refused_token_is_renewed_and_a_refusal_without_a_token_is_the_servers_problem() {
        let budget = CallBudget { timeout: NEED, limited_by_deadline: false };
        let refused = McpCallError::Unauthorized { server: "q".into() };
        let with_token = unlisted_by(&refused, Some(Provider::Qlik), budget, at(0));
        assert_eq!(with_token.error.code, ErrorCode::TokenUnavailable);
        assert_eq!(with_token.refresh, Some(Refresh { until: at(0), refused: true }));
        assert_eq!(unlisted_by(&refused, None, budget, at(0)).error.code, ErrorCode::McpProtocolError);
        let forbidden = McpCallError::Forbidden { server: "q".into(), description: None };
        assert_eq!(unlisted_by(&forbidden, Some(Provider::Qlik), budget, at(0)).error.code, ErrorCode::Forbidden);
        let down = McpCallError::Unavailable { server: "q".into(), detail: "refused".into() };
        let unavailable = unlisted_by(&down, Some(Provider::Qlik), budget, at(0));
        assert_eq!((unavailable.error.code, unavailable.error.provider), (ErrorCode::McpUnavailable, None));
    }

    #[test]
    fn the_shorter_ttl_wins_and_only_public_lists_of_a_token_server_are_shared() {
        let configured = Duration::from_secs(300);
        assert_eq!(freshness(None, None, configured, false), (configured, true));
        assert_eq!(
            freshness(Some(Duration::from_millis(500)), None, configured, true),
            (Duration::from_millis(500), false)
        );
        assert_eq!(freshness(Some(Duration::from_secs(9000)), None, configured, true).0, configured);
        assert_eq!(freshness(Some(Duration::ZERO), None, configured, false).0, Duration::ZERO);
        assert!(freshness(None, Some(ListScope::Public), configured, true).1);
        assert!(!freshness(None, Some(ListScope::Private), configured, true).1);
        assert!(freshness(None, Some(ListScope::Private), configured, false).1, "no token: nothing private in it");
    }
}
