//! The tool catalog: which tools one user may call, from every configured MCP server, for the
//! chat backend to show its model (a `tools/list` job, or `GET /v1/tools`).
//!
//! A server that needs the user's token is listed with it, in the same per-request header as
//! calls; its list may differ from user to user (MCP 2026-07-28 says a list "MAY vary by the
//! authorization presented"), so it is kept per user unless the server marks it
//! `cacheScope: public`. Lists are cached ([`cache`]) for the server's `ttlMs` when it sends a
//! shorter one than `catalog.ttl_secs`, and dropped on the user's token events. Each tool is
//! kept only if the registry routes its name to the server that listed it: a server cannot
//! advertise tools it would never be called for, nor claim another server's. A server that
//! cannot be listed for the user is named in the answer with the reason ([`rules`]), so the
//! assistant can use the others and tell the user to connect.
//!
//! The worker reads the annotations of the tool it calls ([`Catalog::hints`]) from the same
//! cache, without listing.

mod cache;
mod rules;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Map, Value};

use crate::early_refresh::EarlyRefresh;
use crate::mcp::McpCallError;
use crate::mcp::McpClients;
use crate::metrics::Metrics;
use crate::once::{OncePer, OncePerWindow};
use crate::provider::Provider;
use crate::registry::{AuthSpec, CredentialHeader, Registry, ServerSpec};
use crate::store::{StoreError, TokenStatus, TokenStores};
use crate::token_events::UserCache;
use crate::worker::policy::CallBudget;
use cache::{Key, ListCache, Listing};
use rules::{TokenSeen, Unlisted};
use wire::{CatalogTool, Unavailable};
pub(crate) use wire::{ToolCatalog, ToolHints};

/// The least time between two requests to renew one user's token.
const REFRESH_ASK_EVERY: Duration = Duration::from_secs(30);

/// The bounds and defaults of the catalog (`[catalog]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CatalogConfig {
    /// How long a list is reused when its server sends no shorter `ttlMs`; zero caches nothing.
    pub(crate) ttl: Duration,
    pub(crate) max_cache_bytes: u64,
    pub(crate) max_cache_entries: u64,
    /// Added to a listing's time: a token must be valid this much longer.
    pub(crate) clock_skew: Duration,
}

/// Which door a catalog request came through, for the metrics.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Via {
    Amqp,
    Http,
}

/// A user who asked to be listed with a token: who, and the header carrying it.
struct Lister<'a> {
    provider: Provider,
    user_id: &'a str,
    credential: CredentialHeader,
}

pub(crate) struct Catalog {
    registry: Arc<Registry>,
    mcp: Arc<McpClients>,
    tokens: TokenStores,
    early_refresh: EarlyRefresh,
    cache: ListCache,
    config: CatalogConfig,
    /// Tools left out that were already logged, by server and name.
    left_out: OncePer,
    /// Users for whom a renewal was asked lately.
    asked: OncePerWindow,
    metrics: Arc<Metrics>,
}

/// What the catalog reads from and writes to.
pub(crate) struct CatalogPeers {
    pub(crate) registry: Arc<Registry>,
    pub(crate) mcp: Arc<McpClients>,
    pub(crate) tokens: TokenStores,
    pub(crate) early_refresh: EarlyRefresh,
    pub(crate) metrics: Arc<Metrics>,
}

impl Catalog {
    pub(crate) fn new(config: CatalogConfig, peers: CatalogPeers) -> Self {
        let CatalogPeers { registry, mcp, tokens, early_refresh, metrics } = peers;
        let cache = ListCache::new(config.max_cache_bytes, config.max_cache_entries);
        let (left_out, asked) = (OncePer::new(10_000), OncePerWindow::new(10_000, REFRESH_ASK_EVERY));
        Self { registry, mcp, tokens, early_refresh, cache, config, left_out, asked, metrics }
    }

    /// Whether per-user lists are kept, and so need the token events (see [`crate::token_events`]).
    pub(crate) fn caches_lists(&self) -> bool {
        !self.config.ttl.is_zero()
    }

    /// The user's catalog: every server listed (from the cache where it may be) at once, each
    /// within `budget`.
    #[tracing::instrument(skip_all, fields(via = ?via))]
    pub(crate) async fn list(&self, user_id: &str, budget: CallBudget, via: Via) -> ToolCatalog {
        let servers = self.registry.servers();
        let listed = futures::future::join_all(servers.iter().map(|server| self.server_tools(server, user_id, budget)));
        let mut catalog = ToolCatalog { tools: Vec::new(), unavailable: Vec::new() };
        for (server, listed) in servers.iter().zip(listed.await) {
            match listed {
                Ok(listing) => catalog.tools.extend(listing.tools.iter().cloned()),
                Err(unlisted) => {
                    catalog
                        .unavailable
                        .push(Unavailable { server: server.name.clone(), error: unlisted.error.clone() });
                }
            }
        }
        self.metrics.catalog_request(via, catalog.unavailable.is_empty());
        catalog
    }

    /// The annotations of `tool` of `server` as the user's cached list has them; `None` when no
    /// list of it is cached. Never lists.
    pub(crate) async fn hints(&self, server: &ServerSpec, user_id: &str, tool: &str) -> Option<ToolHints> {
        let mut listing = self.cache.get(&Key::Shared { server: server.name.clone() }).await;
        if let (None, Some(auth)) = (&listing, &server.auth)
            && let Some(key) = self.cache.user_key(&server.name, auth.provider, user_id)
        {
            listing = self.cache.get(&key).await;
        }
        listing?.tools.iter().find(|t| t.name == tool).map(CatalogTool::hints)
    }

    /// One server's tools for the user, or why there are none.
    async fn server_tools(
        &self,
        server: &ServerSpec,
        user_id: &str,
        budget: CallBudget,
    ) -> Result<Arc<Listing>, Arc<Unlisted>> {
        let shared = Key::Shared { server: server.name.clone() };
        let Some(auth) = &server.auth else { return self.cached(server, shared, None, budget).await };
        // The user's generation is taken before the token is read: a token event in between
        // moves the user on, and the list made with the token read here is then stored under
        // the old key, where nobody looks.
        let key = self.cache.user_key(&server.name, auth.provider, user_id);
        // Read every time, even when a list is cached: whether the user may be listed at all
        // follows their token as it is now, not as it was when the list was made.
        let (seen, credential) = self.read_token(auth, user_id).await;
        let min_remaining = budget.timeout.saturating_add(self.config.clock_skew);
        if let Err(unlisted) = rules::token_use(auth.provider, seen, Utc::now(), min_remaining) {
            self.ask_refresh(auth.provider, user_id, &unlisted);
            return Err(Arc::new(unlisted));
        }
        let credential = credential.expect("a token that may be used can be sent");
        let lister = Lister { provider: auth.provider, user_id, credential };
        if let Some(listing) = self.cache.get(&shared).await {
            self.metrics.catalog_cache(true);
            return Ok(listing);
        }
        match key {
            Some(key) => self.cached(server, key, Some(lister), budget).await,
            // Events may be missed: nothing per user is used or kept until they flow again.
            None => {
                self.metrics.catalog_cache(false);
                self.listed(server, Some(&lister), budget).await.map_err(Arc::new)
            }
        }
    }

    /// The list under `key`, listing it when it is not cached; a list the server marked public
    /// is kept for everyone too.
    async fn cached(
        &self,
        server: &ServerSpec,
        key: Key,
        lister: Option<Lister<'_>>,
        budget: CallBudget,
    ) -> Result<Arc<Listing>, Arc<Unlisted>> {
        let per_user = matches!(key, Key::User { .. });
        let provider = lister.as_ref().map(|lister| lister.provider);
        // Bounded by this request's own budget: joining a listing begun by a request with more
        // time (or a longer deadline) must not keep this one past its own.
        let listing = self.cache.get_or_list(key, self.listed(server, lister.as_ref(), budget));
        let Ok((listed, found)) = tokio::time::timeout(budget.timeout, listing).await else {
            let timeout = McpCallError::Timeout { server: server.name.clone(), after: budget.timeout };
            return Err(Arc::new(rules::unlisted_by(&timeout, provider, budget, Utc::now())));
        };
        self.metrics.catalog_cache(found);
        if let Ok(listing) = &listed
            && per_user
            && listing.shared
            && !found
        {
            self.cache.share(&server.name, listing.clone()).await;
        }
        listed
    }

    /// Lists `server` (with the `lister`'s token when there is one) and keeps what it serves.
    async fn listed(
        &self,
        server: &ServerSpec,
        lister: Option<&Lister<'_>>,
        budget: CallBudget,
    ) -> Result<Arc<Listing>, Unlisted> {
        let client = self.mcp.get(&server.name).expect("every configured server has a client");
        let started = Instant::now();
        let listed = client.list_tools(lister.map(|l| l.credential.clone()), budget.timeout).await;
        let list = match listed {
            Ok(list) => {
                self.metrics.catalog_list(&server.name, "ok", started.elapsed());
                list
            }
            Err(e) => {
                let unlisted = rules::unlisted_by(&e, lister.map(|l| l.provider), budget, Utc::now());
                self.metrics.catalog_list(&server.name, unlisted.error.code.as_str(), started.elapsed());
                tracing::warn!(server = %server.name, error = %e, "could not list the server's tools");
                if let Some(lister) = lister {
                    self.ask_refresh(lister.provider, lister.user_id, &unlisted);
                }
                return Err(unlisted);
            }
        };
        let tools: Vec<CatalogTool> = list.tools.into_iter().filter_map(|tool| self.admit(server, tool)).collect();
        let (ttl, shared) = rules::freshness(list.ttl, list.scope, self.config.ttl, lister.is_some());
        let bytes = tools.iter().map(|tool| serde_json::to_vec(tool).map_or(0, |json| json.len())).sum::<usize>();
        Ok(Arc::new(Listing { tools, ttl, shared, bytes: u32::try_from(bytes).unwrap_or(u32::MAX) }))
    }

    /// The tool as the catalog answers with it, if `server` serves it: the registry routes its
    /// name there, and it has what a tool needs. What is left out is logged once per tool.
    fn admit(&self, server: &ServerSpec, tool: Map<String, Value>) -> Option<CatalogTool> {
        let name = tool.get("name").and_then(Value::as_str).unwrap_or_default();
        let usable = crate::job::usable_id(name);
        let routed = usable && self.registry.route(name).is_some_and(|s| s.name == server.name);
        // A name no job could carry is logged as one, not kept: a server could send many
        // megabytes of it.
        let name = if usable { name.to_owned() } else { "(an unusable name)".to_owned() };
        let reason = match CatalogTool::from_listed(&server.name, tool) {
            Some(tool) if routed => return Some(tool),
            Some(_) => "the registry routes its name to another server or to none",
            None => "it lacks a name or an object inputSchema",
        };
        if self.left_out.first_time(&format!("{}\0{name}", server.name)) {
            tracing::warn!(server = %server.name, tool = %name, reason, "a tool the server lists is left out of the catalog");
        }
        None
    }

    /// The user's token as the rules see it, and the header to list with when it can be sent.
    async fn read_token(&self, auth: &AuthSpec, user_id: &str) -> (TokenSeen, Option<CredentialHeader>) {
        match self.tokens.get(auth.provider).get(user_id).await {
            Ok(None) => (TokenSeen::Missing, None),
            Ok(Some(token)) => {
                let header = auth.credential(&token.access_token).ok();
                let seen = TokenSeen::Found {
                    expires_at: token.expires_at,
                    reauth_required: token.status == TokenStatus::ReauthRequired,
                    sendable: header.is_some(),
                };
                (seen, header)
            }
            Err(StoreError::Unreadable(e)) => {
                tracing::debug!(error = %e, "the user's stored token cannot be read");
                (TokenSeen::Unreadable, None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "token lookup failed");
                (TokenSeen::StoreDown, None)
            }
        }
    }

    /// Asks the refresher for the renewal `unlisted` calls for, in the background (the answer
    /// does not wait for the broker) and at most once per user per [`REFRESH_ASK_EVERY`]: a
    /// server that refuses every token must not turn each catalog request into an OAuth refresh.
    fn ask_refresh(&self, provider: Provider, user_id: &str, unlisted: &Unlisted) {
        let Some(refresh) = unlisted.refresh else { return };
        if !self.asked.first_in_window(&format!("{provider}\0{user_id}"), Instant::now()) {
            return;
        }
        let (early_refresh, user_id) = (self.early_refresh.clone(), user_id.to_owned());
        tokio::spawn(async move { early_refresh.ask(provider, &user_id, refresh.until, refresh.refused).await });
    }
}

impl UserCache for Catalog {
    fn forget(&self, provider: Provider, user_id: &str) {
        self.cache.forget(provider, user_id);
    }

    fn suspend(&self) {
        self.cache.suspend();
    }

    fn resume(&self) {
        self.cache.resume();
    }
}
