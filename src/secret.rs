//! A wrapper for values that must never be printed.
//!
//! Tokens, connection strings with passwords and (later) keys all travel as [`Secret`]. Its `Debug`
//! and `Display` print a fixed placeholder, it has no `Serialize`, and the only way to the value is
//! the explicit [`Secret::expose`], so a leak has to be written on purpose and is easy to grep for.

use std::fmt;

use serde::Deserialize;

/// A value that prints as `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

/// Any scalar becomes the secret's text, and a wrong type is refused without quoting the value:
/// config layers parse an all-digit environment value as a number, and serde's usual
/// "invalid type: found 12345…" would print the secret.
impl<'de> Deserialize<'de> for Secret<String> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'v> serde::de::Visitor<'v> for Text {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
                Ok(v.to_owned())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_map<A: serde::de::MapAccess<'v>>(self, _: A) -> Result<String, A::Error> {
                Err(serde::de::Error::custom("a secret must be a string, not a table"))
            }
            fn visit_seq<A: serde::de::SeqAccess<'v>>(self, _: A) -> Result<String, A::Error> {
                Err(serde::de::Error::custom("a secret must be a string, not a list"))
            }
        }
        deserializer.deserialize_any(Text).map(Secret)
    }
}

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The value itself. Call it only where the value leaves the process on purpose: a request
    /// header, a database write, a driver's connection string.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn any_scalar_is_accepted_as_text_and_errors_never_quote_the_value() {
        let number: Secret<String> = serde_json::from_str("1234567").unwrap();
        assert_eq!(number.expose(), "1234567");
        let err = serde_json::from_str::<Secret<String>>(r#"["s3cr3t"]"#).err().unwrap().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
