//! Wire format v1 of the jobs this worker consumes and the replies it publishes.
//!
//! The chat backend depends on these shapes; docs/CONTRACT.md is their prose form and later
//! versions may add fields, never remove or re-type one. Decoding is strict about what the worker
//! needs (each problem names its field) and lenient about fields it does not know, so a newer
//! backend can talk to an older worker.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::provider::Provider;

/// Longest `job_id`, `user_id` or `tool` accepted, in bytes. 255 is AMQP's short-string limit: a `job_id` may become a reply's `correlation_id`.
pub const MAX_ID_LEN: usize = 255;

/// What a job asks for: a tool call (the default, and all that v1 jobs knew), or the user's tool
/// catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// `tools/call`: call `tool` with `arguments`.
    CallTool,
    /// `tools/list`: answer with the tools this user may call (see [`crate::catalog`]).
    ListTools,
}

/// A decoded, validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub(crate) job_id: String,
    pub(crate) user_id: String,
    pub(crate) method: Method,
    /// The tool to call; empty for [`Method::ListTools`], which names none.
    pub(crate) tool: String,
    pub(crate) arguments: Map<String, Value>,
    pub(crate) deadline: Option<DateTime<Utc>>,
}

/// The job as it arrives on the wire.
#[derive(Deserialize)]
struct JobV1 {
    job_id: String,
    user_id: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    arguments: Option<Map<String, Value>>,
    #[serde(default)]
    deadline: Option<DateTime<Utc>>,
}

/// Why a message is not a valid job, with whatever job id could still be read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidJob {
    pub(crate) job_id: Option<String>,
    pub(crate) reason: String,
}

impl fmt::Display for InvalidJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Bounds on what a job may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting of `arguments` (an object of scalars is depth 1).
    pub max_depth: usize,
}

/// Decodes a job body. Never panics; every error message names the offending field.
pub fn decode(body: &[u8], limits: Limits) -> Result<Job, InvalidJob> {
    let max_bytes = limits.max_bytes;
    if body.len() > max_bytes {
        return Err(InvalidJob {
            job_id: None,
            reason: format!("job is {} bytes, more than the limit of {max_bytes}", body.len()),
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| InvalidJob {
        job_id: None,
        reason: format!("job is not valid UTF-8 (at byte {})", e.valid_up_to()),
    })?;
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let wire: JobV1 = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let reason = match e.inner().classify() {
            serde_json::error::Category::Data if path != "." => format!("field `{path}`: {}", e.inner()),
            serde_json::error::Category::Data => format!("job is not a JSON object: {}", e.inner()),
            _ => format!("job is not valid JSON: {}", e.inner()),
        };
        InvalidJob { job_id: salvage_job_id(text), reason }
    })?;
    // An id that is itself invalid is not repeated: the reply would carry it, and as the reply's
    // correlation id an AMQP short string (at most 255 bytes) cannot.
    let job_id = Some(wire.job_id.clone()).filter(|id| usable_id(id));
    let fail = |reason: String| InvalidJob { job_id: job_id.clone(), reason };
    let method = match wire.method.as_deref() {
        None | Some("tools/call") => Method::CallTool,
        Some("tools/list") => Method::ListTools,
        Some(_) => return Err(fail("field `method` must be \"tools/call\" or \"tools/list\"".to_owned())),
    };
    // A listing names no tool: whatever `tool` says is not used, so it is not checked either.
    let tool = match (method, wire.tool) {
        (Method::ListTools, _) => String::new(),
        (Method::CallTool, Some(tool)) => tool,
        (Method::CallTool, None) => return Err(fail("missing field `tool`".to_owned())),
    };
    let mut fields = vec![("job_id", &wire.job_id), ("user_id", &wire.user_id)];
    if method == Method::CallTool {
        fields.push(("tool", &tool));
    }
    for (field, value) in fields {
        if value.trim().is_empty() {
            return Err(fail(format!("field `{field}` must not be empty")));
        }
        if value.len() > MAX_ID_LEN {
            return Err(fail(format!("field `{field}` is longer than {MAX_ID_LEN} bytes")));
        }
    }
    let arguments = match method {
        Method::CallTool => wire.arguments.unwrap_or_default(),
        Method::ListTools => Map::new(),
    };
    if depth(&arguments) > limits.max_depth {
        return Err(fail(format!("field `arguments` is nested deeper than {} levels", limits.max_depth)));
    }
    Ok(Job { job_id: wire.job_id, user_id: wire.user_id, method, tool, arguments, deadline: wire.deadline })
}

impl Job {
    /// What this job asks for, as a digest of its user, tool and arguments: a `job_id` is bound
    /// to the call it was first claimed for, and a later delivery with the same id but another
    /// call (another user's, say) must never be answered with that call's reply. Keys are hashed
    /// in sorted order, so the same arguments written in another order are the same call.
    pub(crate) fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        // Each part is JSON-encoded, so no choice of strings makes two calls hash alike.
        for part in [&self.user_id, &self.tool] {
            hasher.update(Value::String(part.clone()).to_string());
            hasher.update(b"\0");
        }
        canonical(&Value::Object(self.arguments.clone()), &mut |bytes| hasher.update(bytes));
        crate::crypto::hex(&hasher.finalize())
    }
}

/// Writes `value` as JSON with every object's keys sorted. Recursive, which is safe: `decode`
/// bounds the nesting at `worker.max_arguments_depth`.
fn canonical(value: &Value, out: &mut dyn FnMut(&[u8])) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out(b"{");
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out(b",");
                }
                out(Value::String(key.clone()).to_string().as_bytes());
                out(b":");
                canonical(&map[key], out);
            }
            out(b"}");
        }
        Value::Array(items) => {
            out(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out(b",");
                }
                canonical(item, out);
            }
            out(b"]");
        }
        scalar => out(scalar.to_string().as_bytes()),
    }
}

/// Nesting depth of an object, without recursion (a hostile document cannot exhaust the stack).
fn depth(arguments: &Map<String, Value>) -> usize {
    let mut deepest = 1;
    let mut pending: Vec<(&Value, usize)> = arguments.values().map(|v| (v, 1)).collect();
    while let Some((value, level)) = pending.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Object(map) => Box::new(map.values()),
            Value::Array(items) => Box::new(items.iter()),
            _ => continue,
        };
        deepest = deepest.max(level + 1);
        pending.extend(children.map(|child| (child, level + 1)));
    }
    deepest
}

/// Reads `job_id` from a body that failed to decode as a whole, so the error reply can still name
/// the job. Only a short, non-empty string counts.
fn salvage_job_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        job_id: String,
    }
    serde_json::from_str::<IdOnly>(text).ok().map(|x| x.job_id).filter(|id| usable_id(id))
}

/// Whether an id (a job's or a user's) is one `decode` accepts: not blank, and at most
/// [`MAX_ID_LEN`] bytes. `tokens import` applies it to the user it stores a token for.
pub fn usable_id(id: &str) -> bool {
    !id.trim().is_empty() && id.len() <= MAX_ID_LEN
}

/// Error codes of a reply. See docs/CONTRACT.md for what each means to the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJob,
    UnknownTool,
    NotConnected,
    ReauthRequired,
    TokenUnavailable,
    McpUnavailable,
    McpProtocolError,
    /// The MCP server refused the user (HTTP 403): their role at the provider does not allow it.
    Forbidden,
    DeadlineExceeded,
    /// The job was delivered `amqp.delivery_limit` times without being settled (it crashed
    /// workers, or its reply could not be published); it was dead-lettered instead of run again.
    DeliveryLimit,
    Internal,
}

impl ErrorCode {
    /// Whether sending the same job again may succeed without anyone changing anything.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::McpUnavailable | ErrorCode::TokenUnavailable | ErrorCode::Internal)
    }
}

/// A reply, v1. Serialized once and published to the job's `reply_to`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        job_id: Option<String>,
        /// The MCP `CallToolResult`, including tool failures (`isError: true`).
        result: Value,
    },
    Error {
        job_id: Option<String>,
        error: ReplyError,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplyError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) retryable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) provider: Option<Provider>,
}

impl ReplyError {
    /// An error with `code`; `provider` when it concerns the user's connection to one.
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>, provider: Option<Provider>) -> Self {
        Self { code, message: message.into(), retryable: code.retryable(), provider }
    }
}

impl Reply {
    pub(crate) fn ok(job_id: &str, result: Value) -> Self {
        Reply::Ok { job_id: Some(job_id.to_owned()), result }
    }

    pub fn error(job_id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::Error { job_id: job_id.map(str::to_owned), error: ReplyError::new(code, message, None) }
    }

    /// Marks the error as concerning a provider (for example, the user has not connected Qlik).
    pub fn with_provider(mut self, provider: Provider) -> Self {
        if let Reply::Error { error, .. } = &mut self {
            error.provider = Some(provider);
        }
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // A Reply holds only strings, bools and serde_json values, which always serialize.
        serde_json::to_vec(self).expect("a reply always serializes")
    }

    /// The error code, for an error reply.
    pub(crate) fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Reply::Ok { .. } => None,
            Reply::Error { error, .. } => Some(error.code),
        }
    }

    /// A short label for logs and metrics: `ok` or the error code.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Reply::Ok { .. } => "ok",
            Reply::Error { error, .. } => error.code.as_str(),
        }
    }
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJob => "invalid_job",
            ErrorCode::UnknownTool => "unknown_tool",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::ReauthRequired => "reauth_required",
            ErrorCode::TokenUnavailable => "token_unavailable",
            ErrorCode::McpUnavailable => "mcp_unavailable",
            ErrorCode::McpProtocolError => "mcp_protocol_error",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::DeliveryLimit => "delivery_limit",
            ErrorCode::Internal => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: Limits = Limits { max_bytes: 1 << 20, max_depth: 8 };

    fn reason(body: &str) -> String {
        decode(body.as_bytes(), MAX).unwrap_err().reason
    }

    #[test]
    fn arguments_nested_too_deep_are_refused() {
        let nested = |levels: usize| {
            format!(
                r#"{{"job_id":"j","user_id":"u","tool":"t","arguments":{}1{}}}"#,
                r#"{"a":"#.repeat(levels),
                "}".repeat(levels)
            )
        };
        assert!(decode(nested(8).as_bytes(), MAX).is_ok());
        let err = decode(nested(9).as_bytes(), MAX).unwrap_err();
        assert!(err.reason.contains("`arguments` is nested deeper than 8"), "{}", err.reason);
        assert_eq!(err.job_id.as_deref(), Some("j"));
        // Far deeper than serde_json's own recursion limit: refused, not a stack overflow.
        assert!(decode(nested(100_000).as_bytes(), Limits { max_bytes: usize::MAX, max_depth: 8 }).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&body, MAX);
        }

        #[test]
        fn decoding_job_shaped_json_never_panics(
            job_id in ".{0,300}", user in proptest::option::of(".{0,40}"), tool in ".{0,40}",
            arguments in "[\\[\\]{}:,\"a-z0-9 ]{0,80}", deadline in ".{0,40}",
        ) {
            let user = user.map_or("null".to_owned(), |u| serde_json::to_string(&u).unwrap());
            let body = format!(
                r#"{{"job_id":{},"user_id":{user},"tool":{},"arguments":{arguments},"deadline":{}}}"#,
                serde_json::to_string(&job_id).unwrap(), serde_json::to_string(&tool).unwrap(), serde_json::to_string(&deadline).unwrap(),
            );
            let _ = decode(body.as_bytes(), MAX);
        }
    }

    #[test]
    fn a_fingerprint_names_the_user_tool_and_arguments_whatever_the_key_order() {
        let job = |body: &str| decode(body.as_bytes(), MAX).unwrap().fingerprint();
        let base = job(r#"{"job_id":"j","user_id":"alice","tool":"t","arguments":{"a":1,"b":{"x":[1,"2"],"y":null}}}"#);
        let reordered =
            job(r#"{"job_id":"other","user_id":"alice","tool":"t","arguments":{"b":{"y":null,"x":[1,"2"]},"a":1}}"#);
        assert_eq!(base, reordered, "the job_id and the key order are not part of the call");
        for other in [
            r#"{"job_id":"j","user_id":"bob","tool":"t","arguments":{"a":1,"b":{"x":[1,"2"],"y":null}}}"#,
            r#"{"job_id":"j","user_id":"alice","tool":"u","arguments":{"a":1,"b":{"x":[1,"2"],"y":null}}}"#,
            r#"{"job_id":"j","user_id":"alice","tool":"t","arguments":{"a":1,"b":{"x":[1,2],"y":null}}}"#,
            r#"{"job_id":"j","user_id":"alice","tool":"t","arguments":{"a":1}}"#,
        ] {
            assert_ne!(job(other), base, "{other}");
        }
        // The parts are delimited: moving characters between user and tool is another call.
        assert_ne!(
            job(r#"{"job_id":"j","user_id":"ab","tool":"c"}"#),
            job(r#"{"job_id":"j","user_id":"a","tool":"bc"}"#)
        );
    }

    #[test]
    fn decodes_a_full_job() {
        let job = decode(
            br#"{"job_id":"j1","user_id":"u1","tool":"qlik_list_apps","arguments":{"a":1},"deadline":"2026-11-26T10:00:00Z","extra":true}"#,
            MAX,
        )
        .unwrap();
        assert_eq!(job.job_id, "j1");
        assert_eq!(job.arguments["a"], 1);
        assert_eq!(job.deadline.unwrap().to_rfc3339(), "2026-11-26T10:00:00+00:00");
    }

    #[test]
    fn a_listing_names_no_tool_and_an_unknown_method_is_refused() {
        let job = decode(br#"{"job_id":"j","user_id":"u","method":"tools/list","arguments":{"a":1}}"#, MAX).unwrap();
        assert_eq!(job.method, Method::ListTools);
        assert!(job.tool.is_empty() && job.arguments.is_empty(), "a listing calls nothing");
        let call = decode(br#"{"job_id":"j","user_id":"u","method":"tools/call","tool":"t"}"#, MAX).unwrap();
        assert_eq!(call.method, Method::CallTool);
        assert_eq!(decode(br#"{"job_id":"j","user_id":"u","tool":"t"}"#, MAX).unwrap().method, Method::CallTool);
        assert!(reason(r#"{"job_id":"j","user_id":"u","method":"tools/list "}"#).starts_with("field `method`"));
        assert!(reason(r#"{"job_id":"j","user_id":"u","method":5,"tool":"t"}"#).starts_with("field `method`"));
        assert!(reason(r#"{"job_id":"j","user_id":"u","method":"tools/call"}"#).contains("`tool`"));
        assert!(
            reason(r#"{"job_id":"j","user_id":" ","method":"tools/list"}"#).contains("`user_id` must not be empty")
        );
    }

    #[test]
    fn arguments_and_deadline_are_optional() {
        let job = decode(br#"{"job_id":"j","user_id":"u","tool":"t","arguments":null}"#, MAX).unwrap();
        assert!(job.arguments.is_empty());
        assert_eq!(job.deadline, None);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(reason(r#"{"job_id":"j","tool":"t"}"#).contains("user_id"));
        assert!(reason(r#"{"job_id":"j","user_id":5,"tool":"t"}"#).starts_with("field `user_id`"));
        assert!(reason(r#"{"job_id":"j","user_id":"u","tool":"t","arguments":[1]}"#).starts_with("field `arguments`"));
        assert!(reason(r#"{"job_id":"j","user_id":"u","tool":"t","deadline":"soon"}"#).starts_with("field `deadline`"));
        assert!(reason(r#"{"job_id":"j","user_id":" ","tool":"t"}"#).contains("`user_id` must not be empty"));
        assert!(reason("not json").contains("not valid JSON"));
        assert!(reason(r#"{"job_id":"j""#).contains("not valid JSON"));
        assert!(reason("[]").contains("not a JSON object"));
    }

    #[test]
    fn the_job_id_is_salvaged_when_another_field_is_wrong() {
        let err = decode(br#"{"job_id":"j9","user_id":1}"#, MAX).unwrap_err();
        assert_eq!(err.job_id.as_deref(), Some("j9"));
        assert_eq!(decode(b"{", MAX).unwrap_err().job_id, None);
    }

    #[test]
    fn an_invalid_job_id_is_not_repeated() {
        // Repeated as the reply's correlation id, 300 bytes would not fit an AMQP short string.
        let long = "j".repeat(300);
        let body = json!({ "job_id": long, "user_id": "u", "tool": "t" }).to_string();
        let err = decode(body.as_bytes(), MAX).unwrap_err();
        assert!(err.reason.contains("job_id"), "{}", err.reason);
        assert_eq!(err.job_id, None);
        let blank = decode(br#"{"job_id":"  ","user_id":"u","tool":"t"}"#, MAX).unwrap_err();
        assert_eq!(blank.job_id, None);
        let wrong_type = format!(r#"{{"job_id":"{long}","user_id":1}}"#);
        assert_eq!(decode(wrong_type.as_bytes(), MAX).unwrap_err().job_id, None);
    }

    #[test]
    fn rejects_oversized_and_non_utf8_bodies() {
        assert!(
            decode(&[b' '; 300], Limits { max_bytes: 256, max_depth: 8 }).unwrap_err().reason.contains("limit of 256")
        );
        assert!(decode(b"{\"job_id\":\"\xff\"}", MAX).unwrap_err().reason.contains("UTF-8"));
    }

    #[test]
    fn replies_have_the_v1_shape() {
        let ok = serde_json::to_value(Reply::ok("j", json!({"content": []}))).unwrap();
        assert_eq!(ok, json!({"status": "ok", "job_id": "j", "result": {"content": []}}));
        let err = Reply::error(Some("j"), ErrorCode::NotConnected, "connect Qlik first").with_provider(Provider::Qlik);
        assert_eq!(
            serde_json::to_value(err).unwrap(),
            json!({"status": "error", "job_id": "j", "error": {
                "code": "not_connected", "message": "connect Qlik first", "retryable": false, "provider": "qlik"}})
        );
        let unknown = serde_json::to_value(Reply::error(None, ErrorCode::McpUnavailable, "down")).unwrap();
        assert_eq!(unknown["job_id"], Value::Null);
        assert_eq!(unknown["error"]["retryable"], true);
        assert!(unknown["error"].get("provider").is_none());
    }
}
