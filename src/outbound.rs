//! Outgoing HTTP clients, configured in one place so that what follows holds for every peer: the
//! MCP servers and the OAuth providers' token and revoke endpoints.
//!
//! No redirect is ever followed, to any origin. reqwest would re-send a request to wherever a 3xx
//! points, with its headers (it strips only `Authorization` across hosts) and, for a 307 or 308,
//! its body: an MCP server could have the user's token sent to another host, a provider the
//! client secret, a PKCE verifier or a refresh token. A 3xx is an answer instead, which each
//! caller turns into an error of its own. Tested by `hostile_mcp::` and `hostile_oauth::`.

/// A client builder with our user agent and redirects off; callers add their timeouts.
pub(crate) fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("mcp-worker/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
}
