//! Wiring: builds every part from validated [`Settings`] and runs them until shutdown.
//!
//! [`App::build`] connects to MongoDB and RabbitMQ, declares the topology, starts consuming and
//! binds the HTTP listener, so when it returns the process is ready; [`App::run`] serves until the
//! shutdown token fires or a part fails. Each role (worker, refresher, API) can be switched off
//! so they can scale apart; every process, whatever its roles, serves `/healthz`, `/readyz` and
//! `/metrics` on `http.listen`. Tests use the same two steps with settings of their own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::catalog::{Catalog, CatalogConfig, CatalogPeers};
use crate::config::{ConfigError, Settings};
use crate::crypto::TokenCipher;
use crate::early_refresh::EarlyRefresh;
use crate::events::Events;
use crate::mcp::{McpCallError, McpClients, McpLimits};
use crate::messages::TokenEventKind;
use crate::metrics::Metrics;
use crate::oauth::{OAuthClient, TokenRules};
use crate::provider::Provider;
use crate::queue::{Broker, Consumer, QueueError, QueueMigration, Topology};
use crate::refresher::{Refresher, RefresherConfig, RefresherError, RequestLimits};
use crate::registry::Registry;
use crate::store::{MigrationError, MigrationStatus, Store, StoreError, embedded_migrations};
use crate::token_events::{Follower, UserCache};
use crate::worker::{Worker, WorkerConfig, WorkerPeers};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Mcp(#[from] McpCallError),
    #[error(transparent)]
    Refresher(#[from] RefresherError),
    /// The TLS backend of the outgoing HTTP client could not start.
    #[error("the HTTP client cannot be built: {0}")]
    HttpClient(String),
    #[error("the HTTP API failed: {0}")]
    Api(#[from] std::io::Error),
    /// A part's task panicked (or, for the broker supervisor, ended while the roles still ran).
    #[error("{part} panicked: {message}")]
    Panicked { part: &'static str, message: String },
}

/// The checks of the settings that only the parts they configure can make: the encryption keys
/// decode to a key ring, and the MCP servers (URLs, tool selectors, auth headers, overlaps) build
/// a registry. [`App::build`] builds both anyway; the CLI calls this first so that every command
/// refuses a bad configuration the same way (exit 2), before it touches a service.
pub fn check(settings: &Settings) -> Result<(), ConfigError> {
    crate::crypto::KeyRing::from_settings(&settings.encryption)?;
    Registry::from_settings(&settings.mcp).map(drop)
}

/// A part of the process: its name in logs and errors, and the future that runs it.
type Part = (&'static str, futures::future::BoxFuture<'static, Result<(), AppError>>);

/// Which parts a process runs. The health and metrics endpoints are served whatever the roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub worker: bool,
    pub refresher: bool,
    pub api: bool,
}

impl Roles {
    pub fn all() -> Self {
        Self { worker: true, refresher: true, api: true }
    }
}

pub struct App {
    broker: Broker,
    /// The worker and its jobs.
    worker: Option<(Arc<Worker>, Consumer)>,
    /// The token events, and the caches they keep in step (when any caches).
    followed: Option<Follower>,
    refresher: Option<(Arc<Refresher>, Consumer)>,
    http: (tokio::net::TcpListener, Arc<ApiState>),
    /// Whether the connect, disconnect and status endpoints are served (the `api` role).
    connections: bool,
    /// What one HTTP client may take of the listener.
    http_limits: api::Limits,
    metrics: Arc<Metrics>,
}

impl App {
    pub async fn build(settings: &Settings, roles: Roles) -> Result<Self, AppError> {
        let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
        let registry = Arc::new(Registry::from_settings(&settings.mcp)?);
        let metrics = Arc::new(Metrics::new());
        let store = Store::connect(&settings.mongodb).await?;
        store.ping().await?;
        let broker = Broker::connect(&settings.amqp, "mcp-worker", Some(topology(settings))).await?;
        let publisher = broker.publisher();
        let events = Events::new(publisher.clone(), settings.amqp.events_exchange.clone());
        // The OAuth client's: it carries the client secret, PKCE verifiers and refresh tokens.
        let http = crate::outbound::client_builder().build().map_err(|e| AppError::HttpClient(e.to_string()))?;
        let oauth: HashMap<Provider, Arc<OAuthClient>> = match settings.providers.get(Provider::Qlik) {
            Some(provider) => {
                let rules = TokenRules::from_settings(provider, &settings.tokens);
                [(Provider::Qlik, Arc::new(OAuthClient::new(Provider::Qlik, provider, rules, http.clone())?))].into()
            }
            None => {
                tracing::warn!("providers.qlik is not configured: no connect flow and no token refresh");
                HashMap::new()
            }
        };

        let early_refresh = EarlyRefresh::new(publisher.clone(), settings.amqp.refresh_queue.clone());
        // The MCP clients and the catalog serve the worker (calls, `tools/list` jobs) and the API
        // (`GET /v1/tools`).
        let mcp_and_catalog = if roles.worker || roles.api {
            let limits = McpLimits::from_settings(&settings.mcp, settings.worker.concurrency);
            let mcp = Arc::new(McpClients::new(&registry, &limits, metrics.clone())?);
            let config = CatalogConfig {
                ttl: Duration::from_secs(settings.catalog.ttl_secs),
                max_cache_bytes: settings.catalog.max_cache_bytes,
                max_cache_entries: settings.catalog.max_cache_entries,
                clock_skew: Duration::from_secs(settings.tokens.clock_skew_secs),
            };
            let peers = CatalogPeers {
                registry: registry.clone(),
                mcp: mcp.clone(),
                tokens: store.token_stores(&cipher),
                early_refresh: early_refresh.clone(),
                metrics: metrics.clone(),
            };
            Some((mcp, Arc::new(Catalog::new(config, peers))))
        } else {
            None
        };
        // The caches that follow the token events, which need a subscription.
        let mut caches: Vec<Arc<dyn UserCache>> = Vec::new();
        if let Some((_, catalog)) = &mcp_and_catalog
            && catalog.caches_lists()
        {
            caches.push(catalog.clone());
        }

        let worker = if let (true, Some((mcp, catalog))) = (roles.worker, &mcp_and_catalog) {
            let config = WorkerConfig {
                concurrency: settings.worker.concurrency,
                job_limits: crate::job::Limits {
                    max_bytes: settings.worker.max_job_bytes,
                    max_depth: settings.worker.max_arguments_depth,
                },
                call_timeout: settings.mcp.call_timeout(),
                dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
                delivery_limit: settings.amqp.delivery_limit,
                clock_skew: Duration::from_secs(settings.tokens.clock_skew_secs),
                max_deferrals: settings.tokens.max_deferrals,
                max_waits: settings.worker.max_waits,
                delay_queue: settings.amqp.delay_queue(settings.tokens.defer_ms),
                shutdown_grace: Duration::from_secs(settings.worker.shutdown_grace_secs),
                owner: crate::owner::new_owner_id(),
                // A claim outlives the longest call (timeout plus skew), with room to record it.
                claim_lease: settings.mcp.call_timeout()
                    + Duration::from_secs(settings.tokens.clock_skew_secs)
                    + Duration::from_secs(10),
                results_ttl: Duration::from_secs(settings.worker.results_ttl_secs),
                token_cache_ttl: Duration::from_millis(settings.tokens.cache_ttl_ms),
                retries: settings
                    .worker
                    .retry_delays()
                    .into_iter()
                    .map(|level| {
                        level.into_iter().map(|ms| (settings.amqp.retry_queue(ms), Duration::from_millis(ms))).collect()
                    })
                    .collect(),
            };
            let peers = WorkerPeers {
                registry: registry.clone(),
                store: store.clone(),
                cipher: cipher.clone(),
                mcp: mcp.clone(),
                catalog: catalog.clone(),
                publisher: publisher.clone(),
                early_refresh,
                events: events.clone(),
                metrics: metrics.clone(),
            };
            let worker = Arc::new(Worker::new(config, peers));
            if worker.caches_tokens() {
                caches.push(worker.clone());
            }
            Some(worker)
        } else {
            None
        };
        // Subscribed before the first job is taken, so no event can slip between.
        let followed = if caches.is_empty() {
            None
        } else {
            let keys = TokenEventKind::ALL.map(TokenEventKind::routing_key);
            Some(Follower::new(broker.subscribe(&settings.amqp.events_exchange, &keys).await?, caches))
        };
        let worker = match worker {
            Some(worker) => Some((worker, broker.consume(&settings.amqp.jobs_queue, settings.amqp.prefetch).await?)),
            None => None,
        };

        let refresher = match (roles.refresher, oauth.get(&Provider::Qlik)) {
            (true, Some(client)) => {
                let provider = settings.providers.get(Provider::Qlik).expect("configured, since it has a client");
                let config = RefresherConfig {
                    interval: Duration::from_secs(settings.refresher.interval_secs),
                    lead: Duration::from_secs(settings.refresher.lead_secs),
                    lease: Duration::from_secs(settings.refresher.lease_secs),
                    concurrency: settings.refresher.concurrency,
                    batch: settings.refresher.batch,
                    retry_initial: Duration::from_secs(settings.refresher.retry_initial_secs),
                    retry_max: Duration::from_secs(settings.refresher.retry_max_secs),
                    rate_per_minute: provider.rate_limit_per_minute,
                    requests: RequestLimits {
                        queue: settings.amqp.refresh_queue.clone(),
                        dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
                        delivery_limit: settings.amqp.delivery_limit,
                    },
                };
                let tokens = store.tokens(Provider::Qlik, &cipher);
                let refresher = Refresher::new(tokens, client.clone(), events.clone(), config, metrics.clone());
                let requests = broker.consume(&settings.amqp.refresh_queue, 16).await?;
                Some((Arc::new(refresher), requests))
            }
            _ => None,
        };

        let listener = tokio::net::TcpListener::bind(settings.http.listen).await?;
        let state = ApiState {
            store: store.clone(),
            cipher: cipher.clone(),
            oauth,
            events: events.clone(),
            broker: broker.clone(),
            metrics: metrics.clone(),
            service_key: settings.http.service_key.clone(),
            default_return_to: settings.http.default_return_to.clone(),
            return_to_allowlist: settings
                .http
                .return_to_allowlist
                .iter()
                .filter_map(|u| reqwest::Url::parse(u).ok())
                .collect(),
            state_ttl: Duration::from_secs(settings.http.state_ttl_secs),
            confirm_connections: settings.http.confirm_connections,
            catalog: mcp_and_catalog.map(|(_, catalog)| catalog),
            call_timeout: settings.mcp.call_timeout(),
        };
        tracing::info!(listen = %listener.local_addr()?, connections = roles.api, "HTTP listener ready");
        tracing::info!(worker = worker.is_some(), refresher = refresher.is_some(), api = roles.api, "mcp-worker ready");
        Ok(Self {
            broker,
            worker,
            followed,
            refresher,
            http: (listener, Arc::new(state)),
            connections: roles.api,
            http_limits: api::Limits::from_settings(&settings.http),
            metrics,
        })
    }

    /// Where the HTTP listener is bound (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.0.local_addr().expect("a bound listener has an address")
    }

    /// Runs every role until `shutdown`; if one stops with an error or panics, the others are
    /// stopped too and that error (naming the part) is returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let stop = shutdown.child_token();
        let mut parts: Vec<Part> = Vec::new();
        if let Some((worker, jobs)) = self.worker {
            let (stop, broker) = (stop.clone(), self.broker.clone());
            parts.push((
                "the worker",
                Box::pin(async move {
                    worker.run(broker, jobs, stop).await;
                    Ok(())
                }),
            ));
        }
        if let Some(follower) = self.followed {
            let (stop, broker) = (stop.clone(), self.broker.clone());
            parts.push((
                "the token event follower",
                Box::pin(async move {
                    follower.follow(&broker, &stop).await;
                    Ok(())
                }),
            ));
        }
        if let Some((refresher, requests)) = self.refresher {
            let (stop, broker) = (stop.clone(), self.broker.clone());
            parts.push((
                "the refresher",
                Box::pin(async move { refresher.run(broker, requests, stop).await.map_err(AppError::from) }),
            ));
        }
        // A process left with no role (e.g. `--roles refresher` without a provider) has nothing
        // to report on: it exits at once rather than serving probes for idleness.
        if self.connections && self.http.1.confirm_connections {
            let (state, stop) = (self.http.1.clone(), stop.clone());
            parts.push((
                "the sweeper of unconfirmed connections",
                Box::pin(async move {
                    api::sweep_unconfirmed(state, stop).await;
                    Ok(())
                }),
            ));
        }
        if !parts.is_empty() || self.connections {
            let (listener, state) = self.http;
            let (connections, http_stop, limits) = (self.connections, stop.clone(), self.http_limits);
            parts.push((
                "the HTTP listener",
                Box::pin(async move {
                    api::serve(listener, state, connections, limits, http_stop).await.map_err(AppError::from)
                }),
            ));
        }
        // The supervisor outlives the roles: replies still being published during the grace
        // period may need the connection back.
        let supervision = CancellationToken::new();
        let supervisor = {
            let (broker, supervision, metrics) = (self.broker.clone(), supervision.clone(), self.metrics.clone());
            async move { broker.supervise(supervision, || metrics.reconnected()).await }
        };
        let result = run_parts(parts, supervisor, &supervision, &stop).await;
        self.broker.close().await;
        tracing::info!("mcp-worker stopped");
        result
    }
}

/// Runs `parts` until all have ended, and `supervisor` until then (when `supervision` is
/// cancelled and the supervisor awaited). The first part that fails,
/// panics, or (for the supervisor) ends early fires `stop` for the others, and its error, which
/// names it, is returned. A panic is caught in the part's own task, so it is reported under the
/// part's name rather than as some task's failure.
async fn run_parts(
    parts: Vec<Part>,
    supervisor: impl std::future::Future<Output = ()> + Send + 'static,
    supervision: &CancellationToken,
    stop: &CancellationToken,
) -> Result<(), AppError> {
    let mut running = tokio::task::JoinSet::new();
    for (part, future) in parts {
        running.spawn(async move {
            crate::panics::caught(future)
                .await
                .unwrap_or_else(|panic| Err(AppError::Panicked { part, message: panic.0 }))
        });
    }
    let mut supervisor = tokio::spawn(crate::panics::caught(supervisor));
    let mut supervising = true;
    let mut result = Ok(());
    loop {
        let outcome = tokio::select! {
            joined = running.join_next() => match joined {
                None => break,
                Some(Ok(outcome)) => outcome,
                // Parts are never aborted, and their panics are caught above.
                Some(Err(e)) => Err(AppError::Panicked { part: "a part", message: e.to_string() }),
            },
            ended = &mut supervisor, if supervising => {
                supervising = false;
                let message = match ended {
                    Ok(Err(panic)) => panic.0,
                    Ok(Ok(())) => "it stopped while the roles still ran".to_owned(),
                    Err(e) => e.to_string(),
                };
                Err(AppError::Panicked { part: "the broker supervisor", message })
            }
        };
        if let Err(e) = outcome {
            tracing::error!(error = %e, "a part stopped; stopping the others");
            stop.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    supervision.cancel();
    if supervising {
        let _ = supervisor.await;
    }
    result
}

pub fn topology(settings: &Settings) -> Topology {
    Topology {
        jobs_queue: settings.amqp.jobs_queue.clone(),
        dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
        delivery_limit: settings.amqp.delivery_limit,
        delay_queue: settings.amqp.delay_queue(settings.tokens.defer_ms),
        delay_ms: settings.tokens.defer_ms,
        retry_queues: {
            let mut delays: Vec<u64> = settings.worker.retry_delays().into_iter().flatten().collect();
            delays.sort_unstable();
            delays.dedup();
            delays.into_iter().map(|ms| (settings.amqp.retry_queue(ms), ms)).collect()
        },
        refresh_queue: settings.amqp.refresh_queue.clone(),
        events_exchange: settings.amqp.events_exchange.clone(),
    }
}

/// Applies the embedded migrations.
pub async fn migrate(settings: &Settings) -> Result<Vec<(String, MigrationStatus)>, AppError> {
    let store = Store::connect(&settings.mongodb).await?;
    Ok(store.migrate(&embedded_migrations()?).await?)
}

/// Makes every queue of the topology a quorum queue, keeping the messages of the classic queues
/// an earlier version declared (see `queue::migration`).
pub async fn migrate_queues(settings: &Settings) -> Result<Vec<(String, QueueMigration)>, AppError> {
    let broker = Broker::connect(&settings.amqp, "mcp-worker queues migrate", None).await?;
    let migrated = broker.migrate_queues(&topology(settings)).await;
    broker.close().await;
    Ok(migrated?)
}

/// Reports the embedded migrations as applied or pending, applying nothing.
pub async fn check_migrations(settings: &Settings) -> Result<Vec<(String, MigrationStatus)>, AppError> {
    let store = Store::connect(&settings.mongodb).await?;
    Ok(store.migration_status(&embedded_migrations()?).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A part that runs until `stop`, like the roles do.
    fn until_stopped(stop: &CancellationToken) -> Part {
        let stop = stop.clone();
        (
            "the worker",
            Box::pin(async move {
                stop.cancelled().await;
                Ok(())
            }),
        )
    }

    #[tokio::test]
    async fn a_part_that_panics_is_named_and_stops_the_others() {
        let stop = CancellationToken::new();
        let panicking: Part = ("the refresher", Box::pin(async { panic!("an overflowed date") }));
        let supervision = CancellationToken::new();
        let supervisor = {
            let supervision = supervision.clone();
            async move { supervision.cancelled().await }
        };
        let result = run_parts(vec![until_stopped(&stop), panicking], supervisor, &supervision, &stop).await;
        let error = result.unwrap_err().to_string();
        assert_eq!(error, "the refresher panicked: an overflowed date");
        assert!(stop.is_cancelled() && supervision.is_cancelled());
    }

    #[tokio::test]
    async fn a_supervisor_that_panics_is_named_and_stops_the_parts() {
        let stop = CancellationToken::new();
        let supervisor = async { panic!("lost its link") };
        let result = run_parts(vec![until_stopped(&stop)], supervisor, &CancellationToken::new(), &stop).await;
        assert_eq!(result.unwrap_err().to_string(), "the broker supervisor panicked: lost its link");
    }
}
