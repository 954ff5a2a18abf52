//! Wire format v1 of the tool catalog: the answer to a `tools/list` job (as its reply's
//! `result`) and to `GET /v1/tools`. docs/CONTRACT.md is its prose form and
//! `schemas/catalog.v1.schema.json` its schema; later versions may add fields, never remove or
//! re-type one.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::job::ReplyError;

/// The tools one user may call, and the servers that could not be listed for them.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ToolCatalog {
    /// Server by server in the order of their configured names, each server's tools in the order
    /// it listed them.
    pub(crate) tools: Vec<CatalogTool>,
    /// The servers whose tools are missing above, with the reason, in the codes of a reply's error.
    pub(crate) unavailable: Vec<Unavailable>,
}

/// One tool as its server described it, and which server that is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CatalogTool {
    pub(crate) name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
    pub(crate) input_schema: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) output_schema: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) annotations: Option<Map<String, Value>>,
    /// The configured name of the server that serves it (`mcp.servers.<name>`). Not the
    /// server's: set by the catalog, whatever the server sent.
    #[serde(default)]
    pub(crate) server: String,
}

/// A server that could not be listed for this user.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Unavailable {
    pub(crate) server: String,
    pub(crate) error: ReplyError,
}

/// What a tool's annotations say of its effects. Hints from the server, not guarantees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ToolHints {
    pub(crate) read_only: Option<bool>,
    pub(crate) idempotent: Option<bool>,
    pub(crate) destructive: Option<bool>,
}

impl CatalogTool {
    /// The tool `server` described as `tool` (an MCP `Tool` object), or `None` when it lacks
    /// what the catalog answers with (a name, an object `inputSchema`).
    pub(crate) fn from_listed(server: &str, tool: Map<String, Value>) -> Option<Self> {
        let mut tool: CatalogTool = serde_json::from_value(Value::Object(tool)).ok()?;
        tool.server = server.to_owned();
        Some(tool)
    }

    /// `readOnlyHint`, `idempotentHint` and `destructiveHint`, where they are booleans.
    pub(crate) fn hints(&self) -> ToolHints {
        let hint = |name: &str| self.annotations.as_ref().and_then(|a| a.get(name)).and_then(Value::as_bool);
        ToolHints {
            read_only: hint("readOnlyHint"),
            idempotent: hint("idempotentHint"),
            destructive: hint("destructiveHint"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn listed(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_listed_tool_keeps_its_fields_and_gets_the_configured_server() {
        let tool = CatalogTool::from_listed(
            "qlik",
            listed(json!({
                "name": "qlik_apps", "title": "Apps", "description": "Lists apps",
                "inputSchema": {"type": "object"}, "outputSchema": {"type": "object"},
                "annotations": {"readOnlyHint": true, "destructiveHint": "yes"},
                "server": "elsewhere", "icons": [], "_meta": {"x": 1},
            })),
        )
        .unwrap();
        let wire = serde_json::to_value(&tool).unwrap();
        assert_eq!(wire["server"], "qlik", "the server's own claim is not taken");
        assert_eq!(wire["inputSchema"], json!({"type": "object"}));
        assert_eq!(wire["title"], "Apps");
        assert!(wire.get("icons").is_none() && wire.get("_meta").is_none());
        assert_eq!(tool.hints(), ToolHints { read_only: Some(true), idempotent: None, destructive: None });
    }

    #[test]
    fn a_tool_without_a_name_or_an_object_schema_is_not_taken() {
        assert!(CatalogTool::from_listed("s", listed(json!({"inputSchema": {}}))).is_none());
        assert!(CatalogTool::from_listed("s", listed(json!({"name": "t", "inputSchema": "x"}))).is_none());
        assert!(CatalogTool::from_listed("s", listed(json!({"name": 5, "inputSchema": {}}))).is_none());
        let bare = CatalogTool::from_listed("s", listed(json!({"name": "t", "inputSchema": {}}))).unwrap();
        assert_eq!(serde_json::to_value(&bare).unwrap(), json!({"name": "t", "inputSchema": {}, "server": "s"}));
    }
}
