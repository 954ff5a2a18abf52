//! One MCP server's long-lived client, and what its failures mean.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rmcp::RoleClient;
use rmcp::model::{
    CacheScope, CallToolRequest, CallToolRequestParams, ClientCapabilities, ClientConfig, ClientRequest, GetExtensions,
    Implementation, ListToolsRequest, PaginatedRequestParams, ProtocolVersion, ServerResult,
};
use rmcp::service::{
    ClientInitializeError, ClientLifecycleMode, ClientServiceExt, PeerRequestOptions, RunningService, ServiceError,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{StreamableHttpClientTransportConfig, StreamableHttpError};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::budget::{Account, ResponseBudget};
use super::credential::CredentialClient;
use super::response::Refusal;
use crate::redact;
use crate::registry::CredentialHeader;

/// Why a tool call got no result. The worker decides what each means for the job.
#[derive(Debug, thiserror::Error)]
pub enum McpCallError {
    /// Could not reach the server, or it answered 5xx/429: trying again later may work.
    #[error("MCP server `{server}` is unavailable: {detail}")]
    Unavailable { server: String, detail: String },
    /// No complete answer within the time allowed.
    #[error("MCP server `{server}` did not answer within {after:?}")]
    Timeout { server: String, after: Duration },
    /// The server answered the call with a JSON-RPC error.
    #[error("MCP server `{server}` answered with JSON-RPC error {code}: {message}")]
    Rpc { server: String, code: i32, message: String },
    /// The server refused the credential (HTTP 401): it may be revoked, or expired early.
    #[error("MCP server `{server}` refused the request's credential")]
    Unauthorized { server: String },
    /// The server refused the user although it took the credential (HTTP 403): for Qlik, the
    /// user's role lacks the "Qlik MCP: Allowed" permission. `description` is the server's reason.
    #[error("MCP server `{server}` refused the user (HTTP 403){}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Forbidden { server: String, description: Option<String> },
    /// The server's answer was not valid MCP.
    #[error("MCP server `{server}` answered with something that is not valid MCP: {detail}")]
    Protocol { server: String, detail: String },
    /// The server answered with a redirect, which is never followed: a token goes only to the
    /// configured origin.
    #[error("MCP server `{server}` answered HTTP {status}, a redirect; redirects are not followed")]
    Redirected { server: String, status: u16 },
    /// The answer could not get its bytes from `mcp.response_budget_bytes` in the time allowed:
    /// other large answers held the budget.
    #[error(
        "the answer of MCP server `{server}` did not fit in the response budget (mcp.response_budget_bytes) in time"
    )]
    OverBudget { server: String },
}

type Session = RunningService<RoleClient, ClientConfig>;

/// A tool's result, and the answer bytes it was built from, still held from the response budget.
pub struct Called {
    pub result: Value,
    pub held: HeldBytes,
}

/// Answer bytes held from the response budget (`mcp.response_budget_bytes`); dropping this gives
/// them back. A result lives on after its call, as the job's reply, until the reply is published,
/// and it is about as large as its answer: the caller keeps this until then, so the budget
/// bounds the results waiting to be published as well as the answers being read.
pub struct HeldBytes {
    _account: Arc<Account>,
}

pub struct McpClient {
    server: String,
    url: String,
    http: CredentialClient,
    budget: Arc<ResponseBudget>,
    max_concurrent_calls: usize,
    connect_timeout: Duration,
    /// The live session, created on first use and replaced when its transport closes.
    session: Mutex<Option<Arc<Session>>>,
}

impl McpClient {
    pub(super) fn new(
        server: &str,
        url: &str,
        http: CredentialClient,
        connect_timeout: Duration,
        max_concurrent_calls: usize,
    ) -> Self {
        Self {
            server: server.to_owned(),
            url: url.to_owned(),
            budget: http.budget.clone(),
            http,
            max_concurrent_calls,
            connect_timeout,
            session: Mutex::new(None),
        }
    }

    /// Calls `tool` and returns its `CallToolResult` as JSON, tool failures (`isError: true`)
    /// included. Everything, connecting included, happens within `timeout`. The answer's bytes
    /// are held from the response budget for as long as the caller keeps [`Called::held`]; after
    /// a failure they are given back at once.
    #[tracing::instrument(skip_all, fields(server = %self.server, tool = %tool))]
    pub async fn call_tool(
        &self,
        tool: &str,
        arguments: Map<String, Value>,
        credential: Option<CredentialHeader>,
        timeout: Duration,
    ) -> Result<Called, McpCallError> {
        let account = self.budget.account(timeout);
        let request = CallToolRequest::new(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments));
        let call = self.send(ClientRequest::CallToolRequest(request), credential, &account);
        let result = self.within(timeout, &account, call).await?;
        match result {
            ServerResult::CallToolResult(result) => match serde_json::to_value(result) {
                Ok(result) => Ok(Called { result, held: HeldBytes { _account: account } }),
                Err(e) => Err(McpCallError::Protocol { server: self.server.clone(), detail: e.to_string() }),
            },
            other => Err(self.unexpected("tools/call", &other)),
        }
    }

    /// Lists the server's tools as `credential` may see them: `tools/list`, then every next page
    /// its `nextCursor` names, in order, all within `timeout`. The pages' answers are held from
    /// the response budget until the list is built, and together may not pass
    /// `mcp.max_response_bytes` (checked after each page, so the last may take the listing to
    /// twice that): a list of many pages holds no more of the budget than one large answer.
    /// rmcp's own `list_tools` is not used: its response cache is per session, and one session
    /// serves every user, whose lists may differ. rmcp decodes each page as a whole, so one
    /// tool of the wrong shape makes the page, and the list, a protocol error.
    #[tracing::instrument(skip_all, fields(server = %self.server))]
    pub async fn list_tools(
        &self,
        credential: Option<CredentialHeader>,
        timeout: Duration,
    ) -> Result<ToolList, McpCallError> {
        let account = self.budget.account(timeout);
        let listing = async {
            let mut list = ToolList { tools: Vec::new(), ttl: None, scope: None };
            let (mut cursor, mut seen) = (None, HashSet::new());
            for index in 0..MAX_PAGES {
                let params = PaginatedRequestParams::default().with_cursor(cursor.take());
                let request = ListToolsRequest {
                    method: Default::default(),
                    params: Some(params),
                    extensions: Default::default(),
                };
                let page =
                    match self.send(ClientRequest::ListToolsRequest(request), credential.clone(), &account).await? {
                        ServerResult::ListToolsResult(page) => page,
                        other => return Err(self.unexpected("tools/list", &other)),
                    };
                if account.held_bytes() > self.http.max_response_bytes {
                    return Err(self.protocol(&format!(
                        "the tool list is larger than mcp.max_response_bytes ({} bytes)",
                        self.http.max_response_bytes
                    )));
                }
                list.merge_hints(index, page.ttl_ms, page.cache_scope);
                for tool in page.tools {
                    match serde_json::to_value(tool) {
                        Ok(Value::Object(tool)) => list.tools.push(tool),
                        _ => return Err(self.protocol("a tool of tools/list does not serialize as an object")),
                    }
                }
                match page.next_cursor {
                    None => return Ok(list),
                    Some(next) if next.len() > MAX_CURSOR_BYTES => {
                        return Err(self.protocol(&format!("tools/list named a cursor over {MAX_CURSOR_BYTES} bytes")));
                    }
                    // A cursor seen before would list the same pages again, for ever.
                    Some(next) if !seen.insert(next.clone()) => {
                        return Err(self.protocol("tools/list named a cursor it had named before"));
                    }
                    Some(next) => cursor = Some(next),
                }
            }
            Err(self.protocol(&format!("tools/list named a next page after {MAX_PAGES} pages")))
        };
        self.within(timeout, &account, listing).await
    }

    /// Sends `request` with the user's `credential` (for that one POST) and answer bytes from
    /// `account`, on the live session.
    async fn send(
        &self,
        mut request: ClientRequest,
        credential: Option<CredentialHeader>,
        account: &Arc<Account>,
    ) -> Result<ServerResult, McpCallError> {
        let session = self.session().await?;
        let extensions = request.extensions_mut();
        if let Some(credential) = credential {
            extensions.insert(credential);
        }
        extensions.insert(account.clone());
        let options = PeerRequestOptions::no_options();
        let outcome = match session.peer().send_request_with_option(request, options).await {
            Ok(handle) => handle.await_response().await,
            Err(e) => Err(e),
        };
        if matches!(outcome, Err(ServiceError::TransportClosed)) || session.is_transport_closed() {
            self.forget(&session).await;
        }
        outcome.map_err(|e| self.classify(e))
    }

    /// Runs `work` within `timeout`; running out of time while waiting for budget is
    /// [`McpCallError::OverBudget`], otherwise [`McpCallError::Timeout`].
    ///
    /// Not an `async fn`, for the reason [`crate::panics::caught`] gives: it would hold `work`
    /// twice, and every call in flight would carry 5 KB more.
    fn within<'a, T>(
        &'a self,
        timeout: Duration,
        account: &'a Account,
        work: impl Future<Output = Result<T, McpCallError>> + 'a,
    ) -> impl Future<Output = Result<T, McpCallError>> + 'a {
        tokio::time::timeout(timeout, work).map(move |finished| {
            finished.map_err(|_| match account.is_waiting() {
                true => McpCallError::OverBudget { server: self.server.clone() },
                false => McpCallError::Timeout { server: self.server.clone(), after: timeout },
            })?
        })
    }

    fn protocol(&self, detail: &str) -> McpCallError {
        McpCallError::Protocol { server: self.server.clone(), detail: detail.to_owned() }
    }

    fn unexpected(&self, method: &str, result: &ServerResult) -> McpCallError {
        self.protocol(&format!("{method} answered with an unsupported result kind ({})", result_kind(result)))
    }

    /// The live session, connecting first if there is none. Concurrent callers wait for one
    /// connection attempt rather than each starting their own.
    async fn session(&self) -> Result<Arc<Session>, McpCallError> {
        let mut slot = self.session.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.is_transport_closed()) {
            return Ok(session.clone());
        }
        // Boxed: the handshake's large state is needed once per session, and unboxed it would
        // sit in every call's future (10 KB a call instead of 5 KB, measured).
        let session = Arc::new(Box::pin(self.connect()).await?);
        *slot = Some(session.clone());
        Ok(session)
    }

    async fn forget(&self, session: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|current| Arc::ptr_eq(current, session)) {
            *slot = None;
        }
    }

    #[tracing::instrument(skip_all, fields(server = %self.server))]
    async fn connect(&self) -> Result<Session, McpCallError> {
        let config = StreamableHttpClientTransportConfig::with_uri(self.url.as_str())
            .max_concurrent_requests(self.max_concurrent_calls);
        let transport = StreamableHttpClientTransport::with_client(self.http.clone(), config);
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("mcp-worker", env!("CARGO_PKG_VERSION")),
        );
        let lifecycle =
            ClientLifecycleMode::Auto { preferred_versions: vec![ProtocolVersion::LATEST], legacy_version: None };
        let unavailable = |detail: String| McpCallError::Unavailable { server: self.server.clone(), detail };
        let session = tokio::time::timeout(self.connect_timeout, info.serve_with_lifecycle(transport, lifecycle))
            .await
            .map_err(|_| unavailable(format!("no answer to the handshake within {:?}", self.connect_timeout)))?
            .map_err(|e| {
                let refusal = match &e {
                    ClientInitializeError::TransportError { error, .. } => Refusal::find(error.error.as_ref()),
                    _ => None,
                };
                match refusal {
                    // The handshake carries no user's token, so a 401/403 to it says nothing about
                    // one: like any failed first contact, it may be a server still starting.
                    Some(Refusal::Unauthorized | Refusal::Forbidden { .. }) | None => {
                        unavailable(redact::credentials(&e.to_string()).into_owned())
                    }
                    Some(refusal) => refused(self.server.clone(), refusal),
                }
            })?;
        tracing::info!(url = %redact::credentials(&self.url), "connected to MCP server");
        Ok(session)
    }

    fn classify(&self, error: ServiceError) -> McpCallError {
        let server = self.server.clone();
        match error {
            ServiceError::McpError(e) => McpCallError::Rpc { server, code: e.code.0, message: e.message.into_owned() },
            ServiceError::Timeout { timeout } => McpCallError::Timeout { server, after: timeout },
            ServiceError::TransportClosed => {
                McpCallError::Unavailable { server, detail: "the connection closed".into() }
            }
            ServiceError::TransportSend(e) => match (Refusal::find(e.error.as_ref()), e.error.downcast_ref()) {
                (Some(refusal), _) => refused(server, refusal),
                (None, Some(http)) => classify_http(server, http),
                (None, None) => {
                    McpCallError::Unavailable { server, detail: redact::credentials(&e.error.to_string()).into_owned() }
                }
            },
            other => McpCallError::Protocol { server, detail: redact::credentials(&other.to_string()).into_owned() },
        }
    }
}

/// What our own refusal to send a request or use its answer means for the call.
fn refused(server: String, refusal: &Refusal) -> McpCallError {
    match refusal {
        Refusal::Redirected { status } => McpCallError::Redirected { server, status: *status },
        Refusal::Unauthorized => McpCallError::Unauthorized { server },
        Refusal::Forbidden { description } => McpCallError::Forbidden { server, description: description.clone() },
        Refusal::OverBudget(_) => McpCallError::OverBudget { server },
        Refusal::ForeignOrigin | Refusal::TooLarge { .. } => {
            McpCallError::Protocol { server, detail: refusal.to_string() }
        }
    }
}

/// What a failed HTTP exchange means: reaching the server again may help, or it will not. The
/// detail is the error's text with credentials redacted: reqwest's names the URL.
fn classify_http(server: String, error: &StreamableHttpError<reqwest::Error>) -> McpCallError {
    let detail = || redact::credentials(&error.to_string()).into_owned();
    match error {
        StreamableHttpError::Client(_)
        | StreamableHttpError::Io(_)
        | StreamableHttpError::HttpStatus(_)
        | StreamableHttpError::UnexpectedEndOfStream
        | StreamableHttpError::TransportChannelClosed
        | StreamableHttpError::SessionExpired
        | StreamableHttpError::SessionRecoveryTimeout
        | StreamableHttpError::TokioJoinError(_) => McpCallError::Unavailable { server, detail: detail() },
        StreamableHttpError::AuthRequired(_) => McpCallError::Unauthorized { server },
        // A challenge for more scope than the configured grant has: the user cannot fix it by
        // reconnecting, as for any other 403.
        StreamableHttpError::InsufficientScope(_) => McpCallError::Forbidden { server, description: None },
        _ => McpCallError::Protocol { server, detail: detail() },
    }
}

fn result_kind(result: &ServerResult) -> &'static str {
    match result {
        ServerResult::InputRequiredResult(_) => "input required",
        ServerResult::CreateTaskResult(_) => "task created",
        ServerResult::CallToolResult(_) => "a CallToolResult",
        ServerResult::ListToolsResult(_) => "a ListToolsResult",
        _ => "another kind",
    }
}

/// The most pages of one tool list followed: more is a server that never ends its list.
const MAX_PAGES: usize = 100;

/// The longest cursor followed: an opaque position, not a payload (the ones seen are kept).
const MAX_CURSOR_BYTES: usize = 1024;

/// Who may reuse a tool list, as the server said (`cacheScope`, protocol 2026-07-28).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListScope {
    /// Any authorization context: every user may be given the same list.
    Public,
    /// Only the authorization context that listed it.
    Private,
}

/// One server's tools as listed: every page, in order, each tool as the server described it
/// (an MCP `Tool` object), with the server's caching hints.
#[derive(Debug)]
pub struct ToolList {
    pub tools: Vec<Map<String, Value>>,
    /// The shortest `ttlMs` of its pages, when any page carried one.
    pub ttl: Option<Duration>,
    /// `Public` only when every page said public; `None` when none said anything.
    pub scope: Option<ListScope>,
}

impl ToolList {
    /// Folds page `index`'s hints in: the list is as fresh as its stalest page, and public only
    /// if every page says so (a page that says nothing is not a page that said public).
    fn merge_hints(&mut self, index: usize, ttl_ms: Option<u64>, scope: Option<CacheScope>) {
        if let Some(ms) = ttl_ms {
            let ttl = Duration::from_millis(ms);
            self.ttl = Some(self.ttl.map_or(ttl, |known| known.min(ttl)));
        }
        let public = matches!(scope, Some(CacheScope::Public));
        self.scope = match (index, self.scope, scope) {
            (0, _, None) | (_, None, None) => None,
            (0, _, Some(_)) if public => Some(ListScope::Public),
            (_, Some(ListScope::Public), _) if public => Some(ListScope::Public),
            _ => Some(ListScope::Private),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(pages: &[Option<CacheScope>]) -> Option<ListScope> {
        let mut list = ToolList { tools: Vec::new(), ttl: None, scope: None };
        for (index, scope) in pages.iter().enumerate() {
            list.merge_hints(index, Some(1000 - index as u64), *scope);
        }
        assert_eq!(list.ttl, Some(Duration::from_millis(1001 - pages.len() as u64)), "the shortest ttlMs");
        list.scope
    }

    #[test]
    fn a_list_is_public_only_if_every_page_says_so() {
        use CacheScope::{Private, Public};
        assert_eq!(folded(&[Some(Public), Some(Public)]), Some(ListScope::Public));
        assert_eq!(folded(&[Some(Public), None]), Some(ListScope::Private), "a silent page vetoes");
        assert_eq!(folded(&[None, Some(Public)]), Some(ListScope::Private));
        assert_eq!(folded(&[Some(Public), Some(Private)]), Some(ListScope::Private));
        assert_eq!(folded(&[Some(Private), Some(Public)]), Some(ListScope::Private));
        assert_eq!(folded(&[None, None]), None, "nothing said: the worker's own rule");
    }
}
