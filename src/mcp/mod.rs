//! MCP over Streamable HTTP: the only module that speaks JSON-RPC.
//!
//! Built on the official Rust SDK, `rmcp`. There is one long-lived [`McpClient`] per configured
//! server, all sharing one reqwest connection pool; a tool call carries the user's credential
//! header for that one request (see [`credential`]). rmcp negotiates the protocol: it tries the
//! modern `server/discover` (2026-07-28) and falls back to `initialize` for older servers, parses
//! JSON and SSE responses, and re-initializes a stateful server's expired session.

mod client;
mod credential;

use std::collections::HashMap;
use std::time::Duration;

pub use client::{McpCallError, McpClient};

use crate::registry::Registry;

/// One client per configured server, by server name.
pub struct McpClients {
    clients: HashMap<String, McpClient>,
}

impl McpClients {
    /// Creates the clients; none connects until its first call.
    pub fn new(
        registry: &Registry,
        connect_timeout: Duration,
        max_concurrent_calls: usize,
    ) -> Result<Self, McpCallError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("mcp-worker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| McpCallError::Unavailable { server: String::new(), detail: e.to_string() })?;
        let clients = registry
            .servers()
            .iter()
            .map(|server| {
                let client =
                    McpClient::new(&server.name, &server.url, http.clone(), connect_timeout, max_concurrent_calls);
                (server.name.clone(), client)
            })
            .collect();
        Ok(Self { clients })
    }

    pub fn get(&self, server: &str) -> Option<&McpClient> {
        self.clients.get(server)
    }
}
