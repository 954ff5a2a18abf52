//! Request parsing shared by the endpoints: form-encoded parameters (RFC 6749 3.1/3.2:
//! parameters without a value count as omitted, and none may appear twice) and client
//! authentication (RFC 6749 2.3.1: `client_secret_basic`, whose id and secret are
//! form-urlencoded before base64, or `client_secret_post`, but never both at once).

use std::collections::HashMap;

use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::Config;
use crate::error::OAuthError;

/// Parameters of a query string or form body.
#[derive(Debug, Default)]
pub(crate) struct Params {
    values: HashMap<String, String>,
    duplicates: Vec<String>,
}

impl Params {
    pub fn parse(input: &[u8]) -> Self {
        let mut params = Self::default();
        for (name, value) in form_urlencoded::parse(input) {
            if value.is_empty() {
                continue;
            }
            if params.values.contains_key(name.as_ref()) {
                params.duplicates.push(name.into_owned());
            } else {
                params.values.insert(name.into_owned(), value.into_owned());
            }
        }
        params
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn is_duplicated(&self, name: &str) -> bool {
        self.duplicates.iter().any(|d| d == name)
    }

    pub fn reject_duplicates(&self) -> Result<(), String> {
        match self.duplicates.first() {
            Some(name) => Err(format!("parameter {name} is included more than once")),
            None => Ok(()),
        }
    }

    /// A required parameter, or `invalid_request` naming it.
    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name).ok_or_else(|| OAuthError::invalid_request(format!("missing parameter {name}")))
    }
}

/// RFC 6749 3.2 (token endpoint) and RFC 7009 2.1 / RFC 7662 2.1 use form bodies only.
pub(crate) fn is_form_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// Parses a form body and authenticates the client; returns the parameters and client id.
pub(crate) fn authenticated_form(
    config: &Config,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Params, String), OAuthError> {
    if !is_form_content_type(headers) {
        return Err(OAuthError::invalid_request("Content-Type must be application/x-www-form-urlencoded"));
    }
    let params = Params::parse(body);
    params.reject_duplicates().map_err(OAuthError::invalid_request)?;
    let client_id = authenticate_client(config, headers, &params)?;
    Ok((params, client_id))
}

fn authenticate_client(config: &Config, headers: &HeaderMap, params: &Params) -> Result<String, OAuthError> {
    let (id, secret) = match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            // RFC 6749 2.3: a client MUST NOT use more than one authentication method.
            if params.get("client_secret").is_some() {
                return Err(OAuthError::invalid_request(
                    "client authenticated with both HTTP Basic and client_secret in the body",
                ));
            }
            let (id, secret) = parse_basic(value.to_str().unwrap_or_default())
                .ok_or_else(|| OAuthError::invalid_client("malformed HTTP Basic credentials"))?;
            // A body client_id is allowed alongside Basic, but must name the same client.
            if params.get("client_id").is_some_and(|body_id| body_id != id) {
                return Err(OAuthError::invalid_request("client_id in the body differs from HTTP Basic"));
            }
            (id, secret)
        }
        None => match (params.get("client_id"), params.get("client_secret")) {
            (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
            _ => return Err(OAuthError::invalid_client("client authentication required")),
        },
    };
    if id != config.client_id || secret != config.client_secret {
        return Err(OAuthError::invalid_client("unknown client or wrong secret"));
    }
    Ok(id)
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, scheme case-insensitive.
fn parse_basic(value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

fn form_decode(s: &str) -> Option<String> {
    let plus_as_space = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space).decode_utf8().ok().map(|s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_decoded() {
        let header = format!("Basic {}", STANDARD.encode("my+client:s%3Acret%2B"));
        assert_eq!(parse_basic(&header), Some(("my client".into(), "s:cret+".into())));
        assert_eq!(parse_basic("Bearer abc"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
        assert_eq!(parse_basic(&format!("basic {}", STANDARD.encode("nocolon"))), None);
    }

    #[test]
    fn empty_values_are_omitted_and_duplicates_flagged() {
        let params = Params::parse(b"a=1&b=&a=2&c=x");
        assert_eq!(params.get("a"), Some("1"));
        assert_eq!(params.get("b"), None);
        assert!(params.is_duplicated("a"));
        assert!(params.reject_duplicates().is_err());
        assert!(Params::parse(b"a=1&b=2").reject_duplicates().is_ok());
    }
}
