//! The authorization endpoint (RFC 6749 4.1.1, 4.1.2) with mandatory PKCE S256
//! (RFC 7636 4.3; `plain` is refused as RFC 9700 2.1.1 recommends).
//!
//! `GET /authorize` answers a login page; its form POSTs the request back to `/login`
//! in the hidden fields `response_type`, `client_id`, `redirect_uri`, `scope`, `state`,
//! `code_challenge`, `code_challenge_method`, plus `username` and `decision`
//! (`allow` | `deny`). `/login` validates everything again, since the form is just
//! client-controlled input. A wrong client or redirect URI is shown as a 400 page and
//! never redirected to (4.1.2.1: that would make the server an open redirector); every
//! other error is redirected to the client as `error=...&state=...`.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use crate::grants::{Code, random_token};
use crate::request::{Params, is_form_content_type};
use crate::{Config, OAuthServer};

/// A validated authorization request.
struct AuthzRequest<'a> {
    client_id: &'a str,
    redirect_uri: &'a str,
    scope: &'a str,
    state: Option<&'a str>,
    code_challenge: &'a str,
}

impl AuthzRequest<'_> {
    /// A 302 to the client's redirect URI carrying `params` and the state.
    fn redirect(&self, params: &[(&str, &str)]) -> Response {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.extend_pairs(params);
        if let Some(state) = self.state {
            query.append_pair("state", state);
        }
        let separator = if self.redirect_uri.contains('?') { '&' } else { '?' };
        let location = format!("{}{separator}{}", self.redirect_uri, query.finish());
        (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
    }

    fn error(&self, error: &str, description: &str) -> Response {
        self.redirect(&[("error", error), ("error_description", description)])
    }
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Authorization error</title></head>\n\
         <body><h1>Authorization error</h1><p id=\"error\">{}</p></body></html>\n",
        escape(message)
    );
    (status, Html(body)).into_response()
}

/// RFC 6749 4.1.1 and RFC 7636 4.3; the `Err` is the complete error response.
#[expect(clippy::result_large_err, reason = "the error is the response itself, built once per request")]
fn validate<'a>(config: &Config, params: &'a Params) -> Result<AuthzRequest<'a>, Response> {
    let bad = |message: &str| Err(error_page(StatusCode::BAD_REQUEST, message));
    let client_id = match params.get("client_id") {
        Some(id) if id == config.client_id && !params.is_duplicated("client_id") => id,
        _ => return bad("missing or unknown client_id"),
    };
    let redirect_uri = match params.get("redirect_uri") {
        Some(uri)
            if config.redirect_uris.iter().any(|allowed| allowed == uri) && !params.is_duplicated("redirect_uri") =>
        {
            uri
        }
        _ => return bad("missing redirect_uri, or not registered for this client"),
    };
    // From here on the redirect URI is trusted, so errors go back to the client.
    let request = AuthzRequest {
        client_id,
        redirect_uri,
        scope: params.get("scope").unwrap_or_default(),
        state: params.get("state"),
        code_challenge: params.get("code_challenge").unwrap_or_default(),
    };
    if let Err(description) = params.reject_duplicates() {
        return Err(request.error("invalid_request", &description));
    }
    match params.get("response_type") {
        Some("code") => {}
        Some(_) => {
            return Err(request.error("unsupported_response_type", "only response_type=code is supported"));
        }
        None => return Err(request.error("invalid_request", "missing parameter response_type")),
    }
    if request.code_challenge.is_empty() {
        return Err(request.error("invalid_request", "PKCE is required: missing code_challenge"));
    }
    if params.get("code_challenge_method") != Some("S256") {
        return Err(request.error("invalid_request", "code_challenge_method must be S256"));
    }
    // An S256 challenge is a base64url-nopad SHA-256: exactly 43 characters.
    let base64url = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    if request.code_challenge.len() != 43 || !request.code_challenge.bytes().all(base64url) {
        return Err(request.error("invalid_request", "code_challenge is not a base64url SHA-256 digest"));
    }
    Ok(request)
}

pub(crate) async fn authorize(State(server): State<OAuthServer>, RawQuery(query): RawQuery) -> Response {
    server.lock().stats.authorize_requests += 1;
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    match validate(&server.config, &params) {
        Ok(request) => login_page(StatusCode::OK, &request, params.get("code_challenge_method"), None),
        Err(response) => response,
    }
}

pub(crate) async fn login(State(server): State<OAuthServer>, headers: HeaderMap, body: Bytes) -> Response {
    if !is_form_content_type(&headers) {
        return error_page(StatusCode::BAD_REQUEST, "the login form must be application/x-www-form-urlencoded");
    }
    let params = Params::parse(&body);
    let request = match validate(&server.config, &params) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let method = params.get("code_challenge_method");
    match params.get("decision") {
        Some("deny") => request.error("access_denied", "the user denied the request"),
        Some("allow") => {
            let users = &server.config.users;
            let user = match params.get("username") {
                None => {
                    return login_page(StatusCode::BAD_REQUEST, &request, method, Some("Enter a username."));
                }
                Some(u) if !users.is_empty() && !users.iter().any(|known| known == u) => {
                    return login_page(StatusCode::UNAUTHORIZED, &request, method, Some("Unknown user."));
                }
                Some(u) => u,
            };
            let code = random_token();
            server.lock().codes.insert(
                code.clone(),
                Code {
                    client_id: request.client_id.into(),
                    redirect_uri: request.redirect_uri.into(),
                    code_challenge: request.code_challenge.into(),
                    scope: request.scope.into(),
                    user: user.into(),
                    expires_at: std::time::Instant::now() + server.config.code_ttl,
                    consumed: false,
                    grant: None,
                },
            );
            request.redirect(&[("code", &code)])
        }
        _ => error_page(StatusCode::BAD_REQUEST, "decision must be allow or deny"),
    }
}

fn login_page(status: StatusCode, request: &AuthzRequest, method: Option<&str>, message: Option<&str>) -> Response {
    let hidden = [
        ("response_type", "code"),
        ("client_id", request.client_id),
        ("redirect_uri", request.redirect_uri),
        ("scope", request.scope),
        ("state", request.state.unwrap_or_default()),
        ("code_challenge", request.code_challenge),
        ("code_challenge_method", method.unwrap_or_default()),
    ];
    let fields: String = hidden
        .iter()
        .map(|(name, value)| format!("<input type=\"hidden\" name=\"{name}\" value=\"{}\">\n", escape(value)))
        .collect();
    let message = message.map(|m| format!("<p id=\"error\">{}</p>\n", escape(m))).unwrap_or_default();
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Sign in</title></head>\n<body>\n\
         <h1>Sign in</h1>\n<p>{client} requests access: <code>{scope}</code></p>\n{message}\
         <form method=\"post\" action=\"/login\">\n{fields}\
         <label>Username <input type=\"text\" name=\"username\" autofocus></label>\n\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\n\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\n\
         </form>\n</body></html>\n",
        client = escape(request.client_id),
        scope = escape(request.scope),
    );
    (status, Html(body)).into_response()
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
