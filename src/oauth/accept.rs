//! What we accept of tokens from outside (a provider's token answer, `tokens import`): values
//! usable where they go, and a lifetime inside configured bounds. Pure, so it is unit- and
//! property-tested without a server.
//!
//! An access token travels in an HTTP header of every MCP request. One that cannot be put there
//! (a control character, empty, absurdly long) would be stored, the user reported connected, and
//! every job would then fail with a retryable error forever; refused here, the user is told at
//! once (callback) or the refresher retries and logs it (refresh). A refresh token goes into a
//! form body, where anything is encodable, but the same bound keeps a hostile provider from
//! filling the database, and a control character in one is as sure a sign of a broken answer.
//!
//! A lifetime comes from a number the provider chose. Beyond the date arithmetic (saturating, in
//! `dates`), an absurd one would park a token unrefreshed for years (too long) or make the
//! refresher hammer the provider (too short), so it is clamped to [`MIN_LIFETIME`, the configured
//! maximum], and the caller logs that it was.

use std::time::Duration;

use crate::config::{ProviderSettings, TokenSettings};

/// The shortest lifetime a token is given (see [`crate::config::MIN_TOKEN_LIFETIME_SECS`]).
pub const MIN_LIFETIME: Duration = Duration::from_secs(crate::config::MIN_TOKEN_LIFETIME_SECS);

/// The bounds of [`check_token`] and [`lifetime`], from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRules {
    /// The longest lifetime a token is given (`providers.<name>.max_token_lifetime_secs`).
    pub max_lifetime: Duration,
    /// Lifetime of a token whose answer has no usable `expires_in`.
    pub(crate) default_lifetime: Duration,
    /// The longest access or refresh token accepted, in bytes (`tokens.max_token_bytes`).
    pub(crate) max_bytes: usize,
}

impl TokenRules {
    pub fn from_settings(provider: &ProviderSettings, tokens: &TokenSettings) -> Self {
        Self {
            max_lifetime: Duration::from_secs(provider.max_token_lifetime_secs),
            default_lifetime: Duration::from_secs(provider.default_token_lifetime_secs),
            max_bytes: tokens.max_token_bytes,
        }
    }
}

/// Why a token value was refused. Names the problem, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnusableToken {
    #[error("the {0} is empty")]
    Empty(&'static str),
    #[error("the {0} is longer than {1} bytes")]
    TooLong(&'static str, usize),
    #[error("the {0} holds a character not allowed in an HTTP header (a control character, space or non-ASCII)")]
    BadCharacter(&'static str),
}

/// Accepts a token value that is not empty, at most `max_bytes` long and only visible ASCII
/// (`0x21..=0x7E`): every RFC 6750 `b64token` is, and every such value is a valid HTTP header
/// value and survives a form body unchanged. `what` names the token in the error.
pub(crate) fn check_token(what: &'static str, value: &str, max_bytes: usize) -> Result<(), UnusableToken> {
    if value.is_empty() {
        return Err(UnusableToken::Empty(what));
    }
    if value.len() > max_bytes {
        return Err(UnusableToken::TooLong(what, max_bytes));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UnusableToken::BadCharacter(what));
    }
    Ok(())
}

/// Checks both tokens of an answer or an import.
pub fn check_tokens(access_token: &str, refresh_token: &str, rules: &TokenRules) -> Result<(), UnusableToken> {
    check_token("access token", access_token, rules.max_bytes)?;
    check_token("refresh token", refresh_token, rules.max_bytes)
}

/// A token's lifetime, and whether the number it came from had to be changed to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lifetime {
    pub(crate) duration: Duration,
    /// The number was out of bounds or not a number of seconds: worth a warning.
    pub(crate) clamped: bool,
}

/// The lifetime of a token given `expires_in` seconds (`None` when absent): the rules' default
/// when absent, otherwise the number clamped to [`MIN_LIFETIME`, `max_lifetime`]. A value that is
/// not a number (NaN) also gets the default, marked clamped. Never panics, for any input.
pub(crate) fn lifetime(expires_in: Option<f64>, rules: &TokenRules) -> Lifetime {
    let max = rules.max_lifetime.max(MIN_LIFETIME);
    let bounded = |d: Duration| d.clamp(MIN_LIFETIME, max);
    match expires_in {
        None => Lifetime { duration: bounded(rules.default_lifetime), clamped: false },
        Some(seconds) if seconds.is_nan() => Lifetime { duration: bounded(rules.default_lifetime), clamped: true },
        // Compared as floats, converted only strictly inside the bounds: `from_secs_f64` of a
        // bound itself can round past `u64::MAX` seconds.
        Some(seconds) if seconds <= MIN_LIFETIME.as_secs_f64() => {
            Lifetime { duration: MIN_LIFETIME, clamped: seconds < MIN_LIFETIME.as_secs_f64() }
        }
        Some(seconds) if seconds >= max.as_secs_f64() => {
            Lifetime { duration: max, clamped: seconds > max.as_secs_f64() }
        }
        Some(seconds) => Lifetime { duration: Duration::try_from_secs_f64(seconds).unwrap_or(max), clamped: false },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const RULES: TokenRules = TokenRules {
        max_lifetime: Duration::from_secs(86_400),
        default_lifetime: Duration::from_secs(21_600),
        max_bytes: 16_384,
    };

    #[test]
    fn header_safe_bounded_tokens_are_accepted() {
        assert_eq!(check_token("access token", "eyJhbGciOi.J9-_~+/=", 19), Ok(()));
        assert_eq!(check_tokens("a", "r", &RULES), Ok(()));
    }

    #[test]
    fn empty_long_and_unsafe_tokens_are_refused_naming_the_problem() {
        assert_eq!(check_token("access token", "", 16), Err(UnusableToken::Empty("access token")));
        assert_eq!(check_token("access token", &"a".repeat(17), 16), Err(UnusableToken::TooLong("access token", 16)));
        for bad in ["a\r\nX-Evil: 1", "a\0b", "a b", "a\tb", "caf\u{e9}", "a\u{7f}"] {
            assert_eq!(
                check_token("access token", bad, 16),
                Err(UnusableToken::BadCharacter("access token")),
                "{bad:?}"
            );
        }
        assert_eq!(check_tokens("ok", "", &RULES), Err(UnusableToken::Empty("refresh token")));
        let message = check_token("access token", "secret\nvalue", 64).unwrap_err().to_string();
        assert!(!message.contains("secret"), "the error never carries the value: {message}");
    }

    #[test]
    fn lifetimes_are_clamped_into_the_bounds() {
        let secs = |expires_in| lifetime(expires_in, &RULES);
        assert_eq!(secs(None), Lifetime { duration: Duration::from_secs(21_600), clamped: false });
        assert_eq!(secs(Some(3600.0)), Lifetime { duration: Duration::from_secs(3600), clamped: false });
        assert_eq!(secs(Some(1e13)), Lifetime { duration: Duration::from_secs(86_400), clamped: true });
        assert_eq!(secs(Some(-5.0)), Lifetime { duration: MIN_LIFETIME, clamped: true });
        assert_eq!(secs(Some(f64::INFINITY)), Lifetime { duration: Duration::from_secs(86_400), clamped: true });
        assert_eq!(secs(Some(f64::NAN)), Lifetime { duration: Duration::from_secs(21_600), clamped: true });
    }

    proptest! {
        #[test]
        fn any_lifetime_lands_within_the_bounds(seconds in proptest::option::of(any::<f64>()), max in 0u64..u64::MAX, default in any::<u64>()) {
            let rules = TokenRules { max_lifetime: Duration::from_secs(max), default_lifetime: Duration::from_secs(default), max_bytes: 1 };
            let got = lifetime(seconds, &rules).duration;
            prop_assert!(got >= MIN_LIFETIME && got <= Duration::from_secs(max).max(MIN_LIFETIME));
        }

        #[test]
        fn any_string_is_accepted_only_if_header_safe(value in any::<String>(), max in 0usize..64) {
            if check_token("access token", &value, max).is_ok() {
                prop_assert!(!value.is_empty() && value.len() <= max);
                prop_assert!(http::HeaderValue::from_str(&value).is_ok());
            }
        }
    }
}
