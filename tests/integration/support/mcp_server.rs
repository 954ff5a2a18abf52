//! The official MCP Python SDK's server (tests/mcp_server/server.py) as a child process, one per
//! test, logging every HTTP request it receives so tests can see exactly what the worker sent.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;

use super::repo;

/// SDK generation and response mode.
#[derive(Clone, Copy, Debug)]
pub enum Flavor {
    /// `mcp<2` FastMCP, stateless, JSON responses.
    V1Json,
    /// `mcp<2` FastMCP, stateless, SSE responses.
    V1Sse,
    /// `mcp>=2` MCPServer (protocol 2026-07-28), stateless, JSON responses.
    V2Json,
    /// `mcp>=2` MCPServer, stateless, SSE responses.
    V2Sse,
}

impl Flavor {
    fn venv(self) -> &'static str {
        match self {
            Flavor::V1Json | Flavor::V1Sse => "mcp1",
            Flavor::V2Json | Flavor::V2Sse => "mcp2",
        }
    }

    fn json_response(self) -> bool {
        matches!(self, Flavor::V1Json | Flavor::V2Json)
    }
}

/// One HTTP request as the server logged it.
#[derive(Debug, Deserialize)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// The URL's query string, empty when there is none.
    #[serde(default)]
    pub query: String,
    pub x_qlik_access_token: Option<String>,
    pub authorization: Option<String>,
    pub accept: Option<String>,
    pub mcp_method: Option<String>,
    pub tool: Option<String>,
    pub arguments: Option<serde_json::Value>,
    /// `params.cursor` of a `tools/list`.
    pub cursor: Option<String>,
}

pub struct McpServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl McpServer {
    pub async fn spawn(flavor: Flavor) -> Self {
        Self::spawn_on(flavor, free_port()).await
    }

    /// A port nothing listens on yet, to start a server on later with [`McpServer::spawn_on`].
    pub fn reserve_port() -> u16 {
        free_port()
    }

    pub async fn spawn_on(flavor: Flavor, port: u16) -> Self {
        Self::spawn_with(flavor, port, &[]).await
    }

    /// A server on `port` started with more of server.py's flags (e.g. `--page-size 3`).
    pub async fn spawn_with(flavor: Flavor, port: u16, flags: &[&str]) -> Self {
        let python = repo().join(".venv").join(flavor.venv()).join("bin/python");
        assert!(python.exists(), "{} is missing: run scripts/python-envs", python.display());
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        let mut command = Command::new(python);
        command
            .arg(repo().join("tests/mcp_server/server.py"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--log"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if flavor.json_response() {
            command.arg("--json-response");
        }
        command.args(flags);
        let child = command.spawn().expect("the MCP test server starts");
        let server = Self { child, port, log, _dir: dir };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the {flavor:?} MCP server did not listen on port {port} within 20 s");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// Every request logged so far.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).expect("log lines are JSON")).collect()
    }

    /// The logged `tools/call` requests.
    pub fn tool_calls(&self) -> Vec<LoggedRequest> {
        self.requests().into_iter().filter(|r| r.mcp_method.as_deref() == Some("tools/call")).collect()
    }

    /// The logged `tools/list` requests.
    pub fn tool_lists(&self) -> Vec<LoggedRequest> {
        self.requests().into_iter().filter(|r| r.mcp_method.as_deref() == Some("tools/list")).collect()
    }
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
