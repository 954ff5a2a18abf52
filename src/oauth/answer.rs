//! The token endpoint's answer (RFC 6749 5.1), as `oauth2` parses it for us, but with a lenient
//! `expires_in`.
//!
//! `oauth2`'s `BasicTokenResponse` reads `expires_in` as a `u64`, so a provider answering `-1`,
//! `3600.5` or `"3600"` (all seen in the wild) makes the whole answer unreadable, and the refresh
//! token it carried, already rotated at the provider, is lost. Here `expires_in` is read as any
//! number or numeric string, kept as `f64` seconds for [`super::accept::lifetime`] to clamp;
//! anything else counts as "present but not a number" (NaN), which gets the default lifetime
//! with a warning. A number beyond `f64` (`1e400`) is refused by the JSON parser itself: an
//! unreadable answer, retried like any other.

use std::time::Duration;

use oauth2::basic::BasicTokenType;
use oauth2::{AccessToken, RefreshToken, Scope, TokenResponse};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A token answer. `Debug` is safe: `oauth2`'s token types print redacted.
#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct TokenAnswer {
    access_token: AccessToken,
    #[serde(deserialize_with = "oauth2::helpers::deserialize_untagged_enum_case_insensitive")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "lenient_seconds", skip_serializing_if = "Option::is_none")]
    expires_in: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<RefreshToken>,
}

impl TokenAnswer {
    /// `expires_in` as the provider sent it: `None` when absent or null, NaN when not a number.
    pub(crate) fn expires_in_secs(&self) -> Option<f64> {
        self.expires_in
    }
}

impl TokenResponse for TokenAnswer {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }

    /// Unclamped, for `oauth2`'s trait only; this crate reads [`TokenAnswer::expires_in_secs`].
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.and_then(|s| Duration::try_from_secs_f64(s).ok())
    }

    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}

/// Any JSON value as seconds: numbers as they are, numeric strings parsed, null as absent,
/// anything else NaN.
fn lenient_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    struct Seconds;

    impl<'de> Visitor<'de> for Seconds {
        type Value = Option<f64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a number of seconds")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.trim().parse().unwrap_or(f64::NAN)))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Some(f64::NAN))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Some(f64::NAN))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Some(f64::NAN))
        }
    }

    deserializer.deserialize_any(Seconds)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn expires_in(value: &str) -> Option<f64> {
        let body = format!(r#"{{"access_token":"a","token_type":"Bearer","expires_in":{value}}}"#);
        serde_json::from_str::<TokenAnswer>(&body).unwrap().expires_in_secs()
    }

    #[test]
    fn expires_in_is_read_from_any_json_value() {
        assert_eq!(expires_in("3600"), Some(3600.0));
        assert_eq!(expires_in("10000000000000"), Some(1e13));
        assert_eq!(expires_in("-1"), Some(-1.0));
        assert_eq!(expires_in("3600.5"), Some(3600.5));
        assert_eq!(expires_in("\" 3600 \""), Some(3600.0));
        assert_eq!(expires_in("null"), None);
        for odd in ["\"soon\"", "true", "[1]", "{\"s\":1}"] {
            assert!(expires_in(odd).unwrap().is_nan(), "{odd}");
        }
        let absent: TokenAnswer = serde_json::from_str(r#"{"access_token":"a","token_type":"bearer"}"#).unwrap();
        assert_eq!(absent.expires_in_secs(), None);
    }

    #[test]
    fn debug_output_shows_no_token() {
        let answer: TokenAnswer = serde_json::from_str(
            r#"{"access_token":"access-secret","token_type":"bearer","refresh_token":"refresh-secret"}"#,
        )
        .unwrap();
        let debug = format!("{answer:?}");
        assert!(!debug.contains("access-secret") && !debug.contains("refresh-secret"), "{debug}");
    }

    proptest! {
        /// Whatever `expires_in` holds, reading the answer ends (ok or a parse error) and what it
        /// yields lands within the configured bounds.
        #[test]
        fn any_expires_in_gives_a_bounded_lifetime(value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:e}")),
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            "[0-9eE+.-]{1,40}",
        ]) {
            let body = format!(r#"{{"access_token":"a","token_type":"bearer","expires_in":{value}}}"#);
            if let Ok(answer) = serde_json::from_str::<TokenAnswer>(&body) {
                let rules = super::super::accept::TokenRules {
                    max_lifetime: Duration::from_secs(86_400),
                    default_lifetime: Duration::from_secs(21_600),
                    max_bytes: 16,
                };
                let lifetime = super::super::accept::lifetime(answer.expires_in_secs(), &rules).duration;
                prop_assert!(lifetime >= super::super::accept::MIN_LIFETIME && lifetime <= rules.max_lifetime);
                let _ = answer.expires_in();
            }
        }
    }
}
