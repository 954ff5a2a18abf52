//! Which MCP server serves a tool, and how a user's token is presented to it.
//!
//! Built once from `[mcp.servers]`; building it checks that every tool name can route to at most
//! one server (no prefix shadows another, no listed tool falls under a prefix), so routing itself
//! is a plain lookup that cannot be ambiguous.

use std::collections::BTreeSet;

use http::{HeaderName, HeaderValue};

use crate::config::{ConfigError, McpServerSettings, McpSettings};
use crate::provider::Provider;
use crate::secret::Secret;

/// Placeholder in an auth value template that the access token replaces.
const TOKEN_PLACEHOLDER: &str = "{token}";

#[derive(Debug)]
pub struct Registry {
    servers: Vec<ServerSpec>,
}

#[derive(Debug)]
pub(crate) struct ServerSpec {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) tools: ToolSelector,
    pub(crate) auth: Option<AuthSpec>,
    /// Whether the server's tool annotations decide a call's guarantee (`trust_annotations`).
    pub(crate) trust_annotations: bool,
    /// Tools that keep exactly-once whatever their annotations say (`exactly_once_tools`).
    pub(crate) exactly_once: BTreeSet<String>,
    /// Speak HTTP/2 to it without TLS from the first byte (`http2_prior_knowledge`).
    pub(crate) http2_prior_knowledge: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolSelector {
    Prefix(String),
    List(BTreeSet<String>),
}

impl ToolSelector {
    fn matches(&self, tool: &str) -> bool {
        match self {
            ToolSelector::Prefix(prefix) => tool.starts_with(prefix.as_str()),
            ToolSelector::List(tools) => tools.contains(tool),
        }
    }

    /// Whether some tool name would match both selectors.
    fn overlaps(&self, other: &ToolSelector) -> bool {
        use ToolSelector::*;
        match (self, other) {
            (Prefix(a), Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
            (Prefix(p), List(tools)) | (List(tools), Prefix(p)) => tools.iter().any(|t| t.starts_with(p.as_str())),
            (List(a), List(b)) => !a.is_disjoint(b),
        }
    }
}

/// How one server wants the user's token: which provider's, in which header, in which form.
#[derive(Debug)]
pub(crate) struct AuthSpec {
    pub(crate) provider: Provider,
    pub(crate) header: HeaderName,
    /// The value with `{token}` split out: `prefix + token + suffix`.
    prefix: String,
    suffix: String,
}

/// A header ready to go on the wire, marked sensitive so HTTP libraries don't log it.
#[derive(Clone)]
pub struct CredentialHeader {
    pub(crate) name: HeaderName,
    pub(crate) value: HeaderValue,
}

impl std::fmt::Debug for CredentialHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CredentialHeader({}: [redacted])", self.name)
    }
}

/// The token could not be put in a header (it has control characters or non-ASCII bytes).
#[derive(Debug, thiserror::Error)]
#[error("the stored access token contains bytes that are not allowed in an HTTP header")]
pub(crate) struct InvalidTokenBytes;

impl AuthSpec {
    pub(crate) fn credential(&self, token: &Secret<String>) -> Result<CredentialHeader, InvalidTokenBytes> {
        let text = format!("{}{}{}", self.prefix, token.expose(), self.suffix);
        let mut value = HeaderValue::from_str(&text).map_err(|_| InvalidTokenBytes)?;
        value.set_sensitive(true);
        Ok(CredentialHeader { name: self.header.clone(), value })
    }
}

impl Registry {
    pub fn from_settings(settings: &McpSettings) -> Result<Self, ConfigError> {
        let mut servers = Vec::with_capacity(settings.servers.len());
        for (name, server) in &settings.servers {
            servers.push(server_spec(name, server)?);
        }
        for (i, a) in servers.iter().enumerate() {
            for b in &servers[i + 1..] {
                if a.tools.overlaps(&b.tools) {
                    return Err(ConfigError::Invalid {
                        key: format!("mcp.servers.{}", b.name),
                        problem: format!(
                            "serves tools that server `{}` also serves; a tool must route to one server",
                            a.name
                        ),
                    });
                }
            }
        }
        Ok(Self { servers })
    }

    pub(crate) fn route(&self, tool: &str) -> Option<&ServerSpec> {
        self.servers.iter().find(|s| s.tools.matches(tool))
    }

    pub(crate) fn servers(&self) -> &[ServerSpec] {
        &self.servers
    }
}

fn server_spec(name: &str, server: &McpServerSettings) -> Result<ServerSpec, ConfigError> {
    let key = |field: &str| format!("mcp.servers.{name}.{field}");
    let invalid = |field: &str, problem: &str| ConfigError::Invalid { key: key(field), problem: problem.to_owned() };
    let url = reqwest::Url::parse(&server.url).map_err(|_| invalid("url", "is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("url", "must be an http:// or https:// URL"));
    }
    let tools = match (&server.tool_prefix, &server.tools) {
        (Some(prefix), None) if !prefix.is_empty() => ToolSelector::Prefix(prefix.clone()),
        (Some(_), None) => return Err(invalid("tool_prefix", "must not be empty")),
        (None, Some(list)) if !list.is_empty() && list.iter().all(|t| !t.is_empty()) => {
            ToolSelector::List(list.iter().cloned().collect())
        }
        (None, Some(_)) => return Err(invalid("tools", "must list at least one non-empty tool name")),
        _ => return Err(invalid("tool_prefix", "set exactly one of `tool_prefix` and `tools`")),
    };
    let auth = match &server.auth {
        None => None,
        Some(auth) => {
            let header = HeaderName::from_bytes(auth.header.as_bytes())
                .map_err(|_| invalid("auth.header", "is not a valid HTTP header name"))?;
            let (prefix, suffix) = auth
                .value
                .split_once(TOKEN_PLACEHOLDER)
                .filter(|(_, rest)| !rest.contains(TOKEN_PLACEHOLDER))
                .ok_or_else(|| invalid("auth.value", "must contain `{token}` exactly once"))?;
            if HeaderValue::from_str(&format!("{prefix}x{suffix}")).is_err() {
                return Err(invalid("auth.value", "is not a valid HTTP header value"));
            }
            Some(AuthSpec { provider: auth.provider, header, prefix: prefix.to_owned(), suffix: suffix.to_owned() })
        }
    };
    let exactly_once: BTreeSet<String> = server.exactly_once_tools.iter().cloned().collect();
    if let Some(stray) = exactly_once.iter().find(|tool| !tools.matches(tool)) {
        return Err(invalid("exactly_once_tools", &format!("names `{stray}`, a tool this server does not serve")));
    }
    Ok(ServerSpec {
        name: name.to_owned(),
        url: server.url.clone(),
        tools,
        auth,
        trust_annotations: server.trust_annotations,
        exactly_once,
        http2_prior_knowledge: server.http2_prior_knowledge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthSettings;

    fn server(prefix: Option<&str>, tools: Option<&[&str]>) -> McpServerSettings {
        McpServerSettings {
            url: "http://127.0.0.1:1/mcp".into(),
            tool_prefix: prefix.map(Into::into),
            tools: tools.map(|t| t.iter().map(|s| s.to_string()).collect()),
            auth: None,
            trust_annotations: false,
            exactly_once_tools: Vec::new(),
            http2_prior_knowledge: false,
        }
    }

    fn registry(servers: Vec<(&str, McpServerSettings)>) -> Result<Registry, ConfigError> {
        Registry::from_settings(&McpSettings {
            call_timeout_ms: 1,
            connect_timeout_ms: 1,
            max_response_bytes: 1024,
            response_budget_bytes: 1024,
            servers: servers.into_iter().map(|(n, s)| (n.to_owned(), s)).collect(),
        })
    }

    #[test]
    fn routes_by_prefix_and_by_list() {
        let r = registry(vec![("qlik", server(Some("qlik_"), None)), ("misc", server(None, Some(&["echo"])))]).unwrap();
        assert_eq!(r.route("qlik_list_apps").unwrap().name, "qlik");
        assert_eq!(r.route("echo").unwrap().name, "misc");
        assert!(r.route("echo2").is_none());
        assert!(r.route("qlik").is_none());
    }

    #[test]
    fn overlapping_servers_are_rejected_with_the_key() {
        for (a, b) in [
            (server(Some("qlik_"), None), server(Some("qlik_apps_"), None)),
            (server(Some("qlik_"), None), server(None, Some(&["qlik_x"]))),
            (server(None, Some(&["a", "b"])), server(None, Some(&["b"]))),
        ] {
            let err = registry(vec![("one", a), ("two", b)]).unwrap_err().to_string();
            assert!(err.contains("mcp.servers.two"), "{err}");
        }
    }

    #[test]
    fn a_server_needs_exactly_one_tool_selector() {
        assert!(registry(vec![("x", server(None, None))]).is_err());
        assert!(registry(vec![("x", server(Some("a"), Some(&["b"])))]).is_err());
        assert!(registry(vec![("x", server(Some(""), None))]).is_err());
        assert!(registry(vec![("x", server(None, Some(&[])))]).is_err());
    }

    #[test]
    fn the_credential_follows_the_template_and_is_sensitive() {
        let mut s = server(Some("q"), None);
        s.auth = Some(AuthSettings {
            provider: Provider::Qlik,
            header: "Authorization".into(),
            value: "Bearer {token}".into(),
        });
        let r = registry(vec![("q", s)]).unwrap();
        let auth = r.route("q1").unwrap().auth.as_ref().unwrap();
        let header = auth.credential(&Secret::new("abc".to_owned())).unwrap();
        assert_eq!(header.name, "authorization");
        assert_eq!(header.value, "Bearer abc");
        assert!(header.value.is_sensitive());
        assert!(!format!("{header:?}").contains("abc"));
        assert!(auth.credential(&Secret::new("a\nb".to_owned())).is_err());
    }

    #[test]
    fn exactly_once_tools_must_be_the_servers_own() {
        let mut s = server(Some("qlik_"), None);
        s.exactly_once_tools = vec!["qlik_delete".into()];
        let r = registry(vec![("q", s)]).unwrap();
        assert!(r.route("qlik_delete").unwrap().exactly_once.contains("qlik_delete"));
        let mut stray = server(Some("qlik_"), None);
        stray.exactly_once_tools = vec!["echo".into()];
        let err = registry(vec![("q", stray)]).unwrap_err().to_string();
        assert!(err.contains("mcp.servers.q.exactly_once_tools") && err.contains("`echo`"), "{err}");
    }

    #[test]
    fn bad_auth_templates_are_rejected() {
        for value in ["Bearer", "{token}{token}", "x\n{token}"] {
            let mut s = server(Some("q"), None);
            s.auth = Some(AuthSettings { provider: Provider::Qlik, header: "X-T".into(), value: value.into() });
            let err = registry(vec![("q", s)]).unwrap_err().to_string();
            assert!(err.contains("mcp.servers.q.auth.value"), "{value}: {err}");
        }
    }
}
