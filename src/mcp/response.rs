//! What an MCP server's answer to a POST means, read within the response limits and budget.
//!
//! rmcp's reqwest client reads answers itself, so it could neither refuse a redirect clearly nor
//! count bytes against a process-wide budget as they arrive. This is its logic, kept to the same
//! meaning (202/204 accepted, 401/403 challenges, 404 an expired session, 429/5xx with their
//! status, JSON-RPC errors in error bodies, a legacy server's refusal of `server/discover`, JSON or
//! SSE by Content-Type), with three differences: a 3xx is a [`Refusal::Redirected`] (the client
//! follows no redirect); a 401 or 403 without a challenge is [`Refusal::Unauthorized`] or
//! [`Refusal::Forbidden`] whatever its body says, because the worker answers the two differently
//! (renew the token, or tell the user their role lacks the permission); and every byte of the
//! body is taken from the call's budget [`Account`] before it is kept, up to `max_bytes` for the
//! whole response.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::StatusCode;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, ErrorData, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_client::{
    AuthRequiredError, HttpStatusError, InsufficientScopeError, StreamableHttpError, StreamableHttpPostResponse,
};
use sse_stream::SseStream;

use super::budget::{Account, OverBudget};

type HttpError = StreamableHttpError<reqwest::Error>;

/// Why the client would not send a request or use its answer, or why the server would not
/// serve it. It travels inside rmcp's error as an `io::Error` (the error type is fixed by the
/// reqwest client GET and DELETE still use), and [`Refusal::find`] gets it back out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("the server answered HTTP {status}, a redirect, and redirects are not followed")]
    Redirected { status: u16 },
    #[error("the server answered HTTP 401: it refused the request's credential")]
    Unauthorized,
    /// `description` is the server's own reason, made safe to pass on ([`description`]).
    #[error("the server answered HTTP 403: it refused the user")]
    Forbidden { description: Option<String> },
    #[error("the request's URL is not on the origin configured for the server")]
    ForeignOrigin,
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    #[error("the answer is larger than mcp.max_response_bytes ({max} bytes)")]
    TooLarge { max: usize },
}

impl Refusal {
    pub(super) fn into_http(self) -> HttpError {
        StreamableHttpError::Io(std::io::Error::other(self))
    }

    /// The refusal somewhere in `error`'s chain of sources, if there is one.
    pub(crate) fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
        let mut next = Some(error);
        while let Some(error) = next {
            let inner =
                error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|e| e as &dyn std::error::Error);
            if let Some(refusal) = inner.unwrap_or(error).downcast_ref::<Refusal>() {
                return Some(refusal);
            }
            next = error.source();
        }
        None
    }
}

/// The longest diagnostic kept from an error body, as in rmcp.
const MAX_DIAGNOSTIC_BYTES: usize = 64 * 1024;

/// Reads `response`, the answer to `message`, into what the transport expects.
pub(super) async fn read(
    response: reqwest::Response,
    message: &ClientJsonRpcMessage,
    session_was_attached: bool,
    account: Arc<Account>,
    max_bytes: usize,
) -> Result<StreamableHttpPostResponse, HttpError> {
    let status = response.status();
    if status.is_redirection() {
        return Err(Refusal::Redirected { status: status.as_u16() }.into_http());
    }
    if let Some(challenge) = challenge(&response)? {
        return Err(challenge);
    }
    if matches!(status, StatusCode::ACCEPTED | StatusCode::NO_CONTENT) {
        return Ok(StreamableHttpPostResponse::Accepted);
    }
    if status == StatusCode::NOT_FOUND && session_was_attached {
        return Err(StreamableHttpError::SessionExpired);
    }
    let content_type = response.headers().get(CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is = |expected: &str| content_type.as_deref().is_some_and(|ct| media_type_is(ct, expected));
    let (is_json, is_sse) = (is("application/json"), is("text/event-stream"));
    let session_id = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let awaits_no_response =
        matches!(message, JsonRpcMessage::Notification(_) | JsonRpcMessage::Response(_) | JsonRpcMessage::Error(_));
    if status.is_success() && response.content_length() == Some(0) && awaits_no_response {
        return Ok(StreamableHttpPostResponse::Accepted);
    }
    if !status.is_success() {
        return failure(response, message, session_was_attached, is_json, session_id, account, max_bytes).await;
    }
    if is_sse {
        let events = SseStream::from_bytes_stream(metered(response, account, max_bytes)).boxed();
        return Ok(StreamableHttpPostResponse::Sse(events, session_id));
    }
    if is_json {
        let body = read_body(response, &account, max_bytes).await?;
        return match serde_json::from_slice::<ServerJsonRpcMessage>(&body) {
            Ok(parsed) => Ok(StreamableHttpPostResponse::Json(parsed, session_id)),
            Err(_) if awaits_no_response => Ok(StreamableHttpPostResponse::Accepted),
            Err(e) => Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(format!(
                "could not parse JSON response as ServerJsonRpcMessage: {e}"
            )))),
        };
    }
    if awaits_no_response {
        return Ok(StreamableHttpPostResponse::Accepted);
    }
    Err(StreamableHttpError::UnexpectedContentType(content_type))
}

/// A 401 or 403 carrying a `WWW-Authenticate` challenge.
fn challenge(response: &reqwest::Response) -> Result<Option<HttpError>, HttpError> {
    let status = response.status();
    let Some(header) = response.headers().get(WWW_AUTHENTICATE) else { return Ok(None) };
    let header = || {
        header.to_str().map(str::to_owned).map_err(|_| {
            StreamableHttpError::UnexpectedServerResponse(Cow::from("invalid www-authenticate header value"))
        })
    };
    Ok(match status {
        StatusCode::UNAUTHORIZED => Some(StreamableHttpError::AuthRequired(AuthRequiredError::new(header()?))),
        StatusCode::FORBIDDEN => {
            Some(StreamableHttpError::InsufficientScope(InsufficientScopeError::new(header()?, None)))
        }
        _ => None,
    })
}

/// A non-success answer: its JSON-RPC error if it carries one, else its status and a diagnostic.
async fn failure(
    response: reqwest::Response,
    message: &ClientJsonRpcMessage,
    session_was_attached: bool,
    is_json: bool,
    session_id: Option<String>,
    account: Arc<Account>,
    max_bytes: usize,
) -> Result<StreamableHttpPostResponse, HttpError> {
    let status = response.status();
    let status_error = (status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()).then(|| {
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        HttpStatusError::new(status.as_u16(), retry_after)
    });
    let auth_failure = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    let body = match status_error {
        Some(error) if !is_json || status == StatusCode::TOO_MANY_REQUESTS => return Err(error.into()),
        _ if is_json && !auth_failure => match read_body(response, &account, max_bytes).await {
            Ok(body) => body,
            Err(StreamableHttpError::Client(_)) => b"<failed to read response body>".to_vec(),
            Err(error) => return Err(status_error.map_or(error, Into::into)),
        },
        _ => read_body(response, &account, MAX_DIAGNOSTIC_BYTES).await.unwrap_or_default(),
    };
    let body = String::from_utf8_lossy(&body);
    let rpc_error = match serde_json::from_str::<ServerJsonRpcMessage>(&body) {
        Ok(JsonRpcMessage::Error(error)) => Some(error),
        _ => None,
    };
    if let Some(answer) = legacy_discover(message, session_was_attached, status, rpc_error.as_ref(), &body) {
        return Ok(answer);
    }
    match status {
        StatusCode::UNAUTHORIZED => return Err(Refusal::Unauthorized.into_http()),
        StatusCode::FORBIDDEN => return Err(Refusal::Forbidden { description: description(&body) }.into_http()),
        _ => {}
    }
    if let Some(error) = rpc_error {
        return Ok(StreamableHttpPostResponse::Json(JsonRpcMessage::Error(error), session_id));
    }
    if let Some(error) = status_error {
        return Err(error.into());
    }
    let diagnostic: String = body.chars().take(MAX_DIAGNOSTIC_BYTES).collect();
    Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(format!("HTTP {status}: {diagnostic}"))))
}

/// A server of an older protocol refusing `server/discover` with a 4xx: answered as the JSON-RPC
/// error the lifecycle needs to fall back to `initialize`, correlated with the request's id.
fn legacy_discover(
    message: &ClientJsonRpcMessage,
    session_was_attached: bool,
    status: StatusCode,
    rpc_error: Option<&rmcp::model::JsonRpcError>,
    body: &str,
) -> Option<StreamableHttpPostResponse> {
    if session_was_attached
        || !status.is_client_error()
        || matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
    {
        return None;
    }
    let JsonRpcMessage::Request(request) = message else { return None };
    if !matches!(request.request, ClientRequest::DiscoverRequest(_)) {
        return None;
    }
    let error = rpc_error.map(|e| e.error.clone()).unwrap_or_else(|| {
        ErrorData::invalid_request(format!("server/discover rejected with HTTP {status}: {body}"), None)
    });
    Some(StreamableHttpPostResponse::Json(ServerJsonRpcMessage::error(error, Some(request.id.clone())), None))
}

/// The longest reason of a server's refusal passed on to the caller.
pub(crate) const MAX_DESCRIPTION_CHARS: usize = 300;

/// The reason a JSON error body gives (`error_description` as in RFC 6750, or a JSON-RPC error's
/// `message`), without control characters (a reply's message may end up in a log or a chat
/// window) and at most [`MAX_DESCRIPTION_CHARS`] long. Any other body gives none: an HTML error
/// page is no reason to show a user.
fn description(body: &str) -> Option<String> {
    let value = serde_json::from_str::<serde_json::Value>(body).ok()?;
    let text = [&value["error_description"], &value["error"]["message"], &value["message"]]
        .into_iter()
        .find_map(serde_json::Value::as_str)?;
    let clean: String =
        text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(MAX_DESCRIPTION_CHARS).collect();
    let clean = clean.trim();
    (!clean.is_empty()).then(|| clean.to_owned())
}

/// What a body still owes the budget. A declared length is taken at once, before the first byte
/// is read: a reader that held part of its answer while it waited for the rest would, with many
/// large answers at once, leave every reader waiting for bytes the others hold until their
/// timeouts ended them all (measured with `bench/rss`: PERFORMANCE.md). Without a length (chunked
/// JSON, SSE) each chunk is taken as it arrives, and only bytes beyond the declared ones are.
struct Meter {
    prepaid: usize,
}

impl Meter {
    async fn start(response: &reqwest::Response, account: &Account, max_bytes: usize) -> Result<Self, Refusal> {
        let declared = match response.content_length() {
            Some(length) if length > max_bytes as u64 => return Err(Refusal::TooLarge { max: max_bytes }),
            Some(length) => length as usize,
            None => 0,
        };
        account.take(declared).await?;
        Ok(Self { prepaid: declared })
    }

    async fn take(&mut self, account: &Account, bytes: usize) -> Result<(), Refusal> {
        let owed = bytes.saturating_sub(self.prepaid);
        self.prepaid = self.prepaid.saturating_sub(bytes);
        Ok(account.take(owed).await?)
    }
}

/// The whole body, each byte taken from the budget before it is kept (see [`Meter`]).
async fn read_body(mut response: reqwest::Response, account: &Account, max_bytes: usize) -> Result<Vec<u8>, HttpError> {
    let mut meter = Meter::start(&response, account, max_bytes).await.map_err(Refusal::into_http)?;
    // Sized once for a declared length (taken from the budget already): growing a large body by
    // doubling would hold two copies at each step.
    let mut body = Vec::with_capacity(meter.prepaid);
    while let Some(chunk) = response.chunk().await? {
        if chunk.len() > max_bytes - body.len() {
            return Err(Refusal::TooLarge { max: max_bytes }.into_http());
        }
        meter.take(account, chunk.len()).await.map_err(Refusal::into_http)?;
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The body as a stream of chunks, each taken from the budget before it is passed on (see
/// [`Meter`]); the stream keeps the account (and so the bytes) until it is dropped.
fn metered(
    response: reqwest::Response,
    account: Arc<Account>,
    max_bytes: usize,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let state = (response, account, None::<Meter>, 0usize);
    futures::stream::try_unfold(state, move |(mut response, account, meter, read)| async move {
        let mut meter = match meter {
            Some(meter) => meter,
            None => Meter::start(&response, &account, max_bytes).await.map_err(std::io::Error::other)?,
        };
        let Some(chunk) = response.chunk().await.map_err(std::io::Error::other)? else { return Ok(None) };
        if chunk.len() > max_bytes - read {
            return Err(std::io::Error::other(Refusal::TooLarge { max: max_bytes }));
        }
        meter.take(&account, chunk.len()).await.map_err(std::io::Error::other)?;
        let read = read + chunk.len();
        Ok(Some((chunk, (response, account, Some(meter), read))))
    })
}

/// Whether a Content-Type's media type (parameters aside, any case) is `expected`.
fn media_type_is(value: &str, expected: &str) -> bool {
    value.split(';').next().is_some_and(|essence| essence.trim().eq_ignore_ascii_case(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusals_description_is_its_json_reason_without_control_characters_and_bounded() {
        let oauth = r#"{"error":"forbidden","error_description":"role lacks \"Qlik MCP: Allowed\"\r\nX-Forged: 1"}"#;
        assert_eq!(description(oauth).as_deref(), Some(r#"role lacks "Qlik MCP: Allowed"  X-Forged: 1"#));
        let rpc = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"not allowed"}}"#;
        assert_eq!(description(rpc).as_deref(), Some("not allowed"));
        let long = serde_json::json!({ "message": "é".repeat(1000) }).to_string();
        assert_eq!(description(&long).unwrap().chars().count(), MAX_DESCRIPTION_CHARS);
        for none in ["<html>Forbidden</html>", "", r#"{"error_description":"  \u0000 "}"#, r#"{"message":5}"#] {
            assert_eq!(description(none), None, "{none}");
        }
    }
}
