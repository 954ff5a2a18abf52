//! The per-request credential header, carried from a tool call to its HTTP request, and only to
//! the server's own origin.
//!
//! One rmcp client serves every user of a server, so the user's token cannot live in the
//! transport's fixed headers. Instead the call puts a [`CredentialHeader`] into the JSON-RPC
//! request's extensions (in-memory only, never serialized), and [`CredentialClient`], the HTTP
//! client under the transport, copies it onto that one POST. Handshake requests carry no
//! extension and so no user's token.
//!
//! A token may go to the exact origin (scheme, host, port) configured for its server and nowhere
//! else: [`CredentialClient`] refuses a POST to any other origin before it is sent, and the
//! reqwest client under it follows no redirect (a 3xx is a [`Refusal::Redirected`]). The POST is
//! made here rather than by rmcp's reqwest client so that its answer is read within the
//! response budget (see [`super::response`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use http::{HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, JsonRpcMessage};
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse, StreamableHttpResponseLimits,
};
use sse_stream::Sse;

use super::budget::{Account, ResponseBudget};
use super::response::{self, Refusal};
use crate::registry::CredentialHeader;

/// The reqwest client (which follows no redirect) for one server, with the per-request
/// credential header and the response budget.
#[derive(Clone)]
pub(super) struct CredentialClient {
    pub(super) http: reqwest::Client,
    /// The configured URL of the server: requests go to its origin only.
    pub(super) server: reqwest::Url,
    pub(super) budget: Arc<ResponseBudget>,
    /// The largest answer read, in bytes (`mcp.max_response_bytes`).
    pub(super) max_response_bytes: usize,
    /// How long a POST outside a call (a handshake) may wait for budget.
    pub(super) handshake_wait: Duration,
}

fn credential_of(message: &ClientJsonRpcMessage) -> Option<&CredentialHeader> {
    match message {
        JsonRpcMessage::Request(request) => request.request.extensions().get::<CredentialHeader>(),
        _ => None,
    }
}

/// The budget account of the call that sent `message`, if a call did.
fn account_of(message: &ClientJsonRpcMessage) -> Option<Arc<Account>> {
    match message {
        JsonRpcMessage::Request(request) => request.request.extensions().get::<Arc<Account>>().cloned(),
        _ => None,
    }
}

impl CredentialClient {
    /// Whether `uri` is on the server's configured origin (scheme, host and port all equal).
    fn on_server_origin(&self, uri: &str) -> bool {
        reqwest::Url::parse(uri).is_ok_and(|url| url.origin() == self.server.origin())
    }
}

impl StreamableHttpClient for CredentialClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = max_sse_event_size;
        self.post_message_with_response_limits(uri, message, session_id, auth_header, custom_headers, limits).await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        // rmcp's defaults; `mcp.max_response_bytes` bounds the whole answer instead.
        _limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, StreamableHttpError<Self::Error>> {
        // Checked before anything is sent: neither the credential nor the request may leave the
        // configured origin.
        if !self.on_server_origin(&uri) {
            return Err(Refusal::ForeignOrigin.into_http());
        }
        let mut request =
            self.http.post(uri.as_ref()).header(http::header::ACCEPT, "text/event-stream, application/json");
        if let Some(token) = auth_header {
            request = request.bearer_auth(token);
        }
        for (name, value) in custom_headers {
            request = request.header(name, value);
        }
        if let Some(credential) = credential_of(&message) {
            request = request.header(credential.name.clone(), credential.value.clone());
        }
        let session_was_attached = session_id.is_some();
        if let Some(session_id) = session_id {
            request = request.header("mcp-session-id", session_id.as_ref());
        }
        let account = account_of(&message).unwrap_or_else(|| self.budget.account(self.handshake_wait));
        let answer = request.json(&message).send().await?;
        response::read(answer, &message, session_was_attached, account, self.max_response_bytes).await
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), StreamableHttpError<Self::Error>> {
        self.http.delete_session(uri, session_id, auth_header, custom_headers).await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        self.http.get_stream(uri, session_id, last_event_id, auth_header, custom_headers).await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        self.http
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rmcp::model::{ClientRequest, PingRequest, RequestId};

    use super::*;
    use crate::metrics::Metrics;

    /// A request with a user's credential, to a URL outside the server's origin (as a rewritten
    /// URI would be), is refused before any connection: the other origin receives nothing.
    #[tokio::test]
    async fn a_request_to_another_origin_is_not_sent() {
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = format!("http://{}/mcp", elsewhere.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        tokio::spawn({
            let connections = connections.clone();
            async move {
                while elsewhere.accept().await.is_ok() {
                    connections.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let client = CredentialClient {
            http: crate::outbound::client_builder().build().unwrap(),
            // The same host on another port is another origin.
            server: reqwest::Url::parse("http://127.0.0.1:1/mcp").unwrap(),
            budget: ResponseBudget::new(1 << 20, Arc::new(Metrics::new())),
            max_response_bytes: 1 << 20,
            handshake_wait: Duration::from_secs(1),
        };
        let mut message =
            ClientJsonRpcMessage::request(ClientRequest::PingRequest(PingRequest::default()), RequestId::Number(1));
        if let JsonRpcMessage::Request(request) = &mut message {
            let credential = CredentialHeader {
                name: HeaderName::from_static("x-qlik-access-token"),
                value: HeaderValue::from_static("secret-token"),
            };
            request.request.extensions_mut().insert(credential);
        }

        let sent = client.post_message(other.into(), message, None, None, HashMap::new()).await;

        let error = sent.expect_err("a request to another origin is refused");
        assert!(matches!(Refusal::find(&error), Some(Refusal::ForeignOrigin)), "{error}");
        assert_eq!(connections.load(Ordering::SeqCst), 0, "the other origin was contacted");
    }
}
