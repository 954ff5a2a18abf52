//! MCP over Streamable HTTP: the only module that speaks JSON-RPC.
//!
//! Built on the official Rust SDK, `rmcp`. There is one long-lived [`McpClient`] per configured
//! server, all sharing one reqwest connection pool; a tool call carries the user's credential
//! header for that one request (see [`credential`]). rmcp negotiates the protocol: it tries the
//! modern `server/discover` (2026-07-28) and falls back to `initialize` for older servers, parses
//! JSON and SSE responses, and re-initializes a stateful server's expired session. The HTTP
//! client follows no redirect, speaks HTTP/2 where the server offers it (ALPN, or h2c when
//! configured), sends a token only to its server's configured origin, and reads
//! every answer within `mcp.max_response_bytes` and the process-wide `mcp.response_budget_bytes`
//! ([`budget`]).

mod budget;
mod client;
mod credential;
mod response;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use client::{Called, HeldBytes, ListScope, McpCallError, McpClient, ToolList};

use crate::config::McpSettings;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// What bounds the MCP clients' connections and answers.
pub struct McpLimits {
    /// Longest first contact with a server (`mcp.connect_timeout_ms`).
    pub connect_timeout: Duration,
    /// Calls one client runs at once.
    pub(crate) max_concurrent_calls: usize,
    /// The largest answer read (`mcp.max_response_bytes`).
    pub(crate) max_response_bytes: usize,
    /// Bytes of answers held at once by the whole process (`mcp.response_budget_bytes`).
    pub(crate) response_budget_bytes: u32,
}

impl McpLimits {
    /// The bounds of `settings` (validated: the budget fits a u32 and the limit fits the budget).
    pub fn from_settings(settings: &McpSettings, max_concurrent_calls: usize) -> Self {
        let budget = u32::try_from(settings.response_budget_bytes).unwrap_or(u32::MAX);
        Self {
            connect_timeout: settings.connect_timeout(),
            max_concurrent_calls,
            max_response_bytes: usize::try_from(settings.max_response_bytes).unwrap_or(usize::MAX).min(budget as usize),
            response_budget_bytes: budget,
        }
    }
}

/// One client per configured server, by server name.
pub struct McpClients {
    clients: HashMap<String, McpClient>,
}

impl McpClients {
    /// Creates the clients; none connects until its first call.
    pub fn new(registry: &Registry, limits: &McpLimits, metrics: Arc<Metrics>) -> Result<Self, McpCallError> {
        // Follows no redirect (see `outbound`): a 3xx is an error, the token stays where it was.
        // HTTP/2 where the server offers it in TLS (ALPN); one without TLS (h2c) only when
        // configured (`http2_prior_knowledge`), on a pool of its own, since prior knowledge is
        // a property of the whole client. Many calls in flight then share one connection
        // instead of holding one each.
        let build = |h2c: bool| {
            let builder = crate::outbound::client_builder().connect_timeout(limits.connect_timeout);
            let builder = if h2c { builder.http2_prior_knowledge() } else { builder };
            builder.build().map_err(|e| McpCallError::Unavailable { server: String::new(), detail: e.to_string() })
        };
        let (http1, h2c) = (build(false)?, build(true)?);
        let budget = budget::ResponseBudget::new(limits.response_budget_bytes, metrics);
        let mut clients = HashMap::new();
        for server in registry.servers() {
            let http = if server.http2_prior_knowledge { &h2c } else { &http1 };
            let url = reqwest::Url::parse(&server.url).map_err(|e| McpCallError::Unavailable {
                server: server.name.clone(),
                detail: format!("the configured URL does not parse: {e}"),
            })?;
            let http = credential::CredentialClient {
                http: http.clone(),
                server: url,
                budget: budget.clone(),
                max_response_bytes: limits.max_response_bytes,
                handshake_wait: limits.connect_timeout,
            };
            let client =
                McpClient::new(&server.name, &server.url, http, limits.connect_timeout, limits.max_concurrent_calls);
            clients.insert(server.name.clone(), client);
        }
        Ok(Self { clients })
    }

    pub fn get(&self, server: &str) -> Option<&McpClient> {
        self.clients.get(server)
    }
}
