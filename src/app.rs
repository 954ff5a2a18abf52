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
use crate::config::{ConfigError, Settings};
use crate::crypto::TokenCipher;
use crate::events::Events;
use crate::mcp::{McpCallError, McpClients};
use crate::messages::TokenEventKind;
use crate::metrics::Metrics;
use crate::oauth::OAuthClient;
use crate::provider::Provider;
use crate::queue::{Broker, Jobs, QueueError, Topology};
use crate::refresher::{Refresher, RefresherConfig, RefresherError};
use crate::registry::Registry;
use crate::store::{MigrationError, MigrationStatus, Store, StoreError, embedded_migrations};
use crate::worker::{Worker, WorkerConfig};

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
    #[error("the HTTP API failed: {0}")]
    Api(#[from] std::io::Error),
}

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
    /// The worker, its jobs, and the token events that keep its cache in step (when it caches).
    worker: Option<(Arc<Worker>, Jobs, Option<Jobs>)>,
    refresher: Option<(Arc<Refresher>, Jobs)>,
    http: (tokio::net::TcpListener, Arc<ApiState>),
    /// Whether the connect, disconnect and status endpoints are served (the `api` role).
    connections: bool,
    metrics: Arc<Metrics>,
}

impl App {
    pub async fn build(settings: &Settings, roles: Roles) -> Result<Self, AppError> {
        let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption)?);
        let registry = Arc::new(Registry::from_settings(&settings.mcp)?);
        let metrics = Arc::new(Metrics::new());
        let store = Store::connect(&settings.mongodb).await?;
        store.ping().await?;
        let broker = Broker::connect(&settings.amqp.url, "mcp-worker", Some(topology(settings))).await?;
        let publisher = broker.publisher();
        let events = Events::new(publisher.clone(), settings.amqp.events_exchange.clone());
        let http = reqwest::Client::builder()
            .user_agent(concat!("mcp-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| QueueError::Connect(e.to_string()))?;
        let oauth: HashMap<Provider, Arc<OAuthClient>> = match settings.providers.get(Provider::Qlik) {
            Some(provider) => {
                [(Provider::Qlik, Arc::new(OAuthClient::new(Provider::Qlik, provider, http.clone())?))].into()
            }
            None => {
                tracing::warn!("providers.qlik is not configured: no connect flow and no token refresh");
                HashMap::new()
            }
        };

        let worker = if roles.worker {
            let mcp =
                Arc::new(McpClients::new(&registry, settings.mcp.connect_timeout(), settings.worker.concurrency)?);
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
                delay_queue: settings.amqp.delay_queue(settings.tokens.defer_ms),
                refresh_queue: settings.amqp.refresh_queue.clone(),
                shutdown_grace: Duration::from_secs(settings.worker.shutdown_grace_secs),
                owner: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
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
            let worker = Worker::new(
                config,
                registry.clone(),
                store.clone(),
                cipher.clone(),
                mcp,
                publisher.clone(),
                metrics.clone(),
            );
            // Subscribed before the first job is taken, so no event can slip between.
            let events = if worker.caches_tokens() {
                let keys = TokenEventKind::ALL.map(TokenEventKind::routing_key);
                Some(broker.subscribe(&settings.amqp.events_exchange, &keys).await?)
            } else {
                None
            };
            let jobs = broker.consume(&settings.amqp.jobs_queue, settings.amqp.prefetch).await?;
            Some((Arc::new(worker), jobs, events))
        } else {
            None
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
            state_ttl: chrono::Duration::seconds(i64::try_from(settings.http.state_ttl_secs).unwrap_or(i64::MAX)),
        };
        tracing::info!(listen = %listener.local_addr()?, connections = roles.api, "HTTP listener ready");
        tracing::info!(worker = worker.is_some(), refresher = refresher.is_some(), api = roles.api, "mcp-worker ready");
        Ok(Self { broker, worker, refresher, http: (listener, Arc::new(state)), connections: roles.api, metrics })
    }

    /// Where the HTTP listener is bound (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.0.local_addr().expect("a bound listener has an address")
    }

    /// Runs every role until `shutdown`; if one stops with an error, the others are stopped too
    /// and that error is returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let stop = shutdown.child_token();
        let mut parts = tokio::task::JoinSet::new();
        // The supervisor outlives the roles: replies still being published during the grace
        // period may need the connection back.
        let supervision = CancellationToken::new();
        let supervisor = tokio::spawn({
            let (broker, supervision, metrics) = (self.broker.clone(), supervision.clone(), self.metrics.clone());
            async move { broker.supervise(supervision, || metrics.reconnected()).await }
        });
        if let Some((worker, jobs, events)) = self.worker {
            let (stop, broker) = (stop.clone(), self.broker.clone());
            parts.spawn(async move {
                worker.run(broker, jobs, events, stop).await;
                Ok(())
            });
        }
        if let Some((refresher, requests)) = self.refresher {
            let (stop, broker) = (stop.clone(), self.broker.clone());
            parts.spawn(async move { refresher.run(broker, requests, stop).await.map_err(AppError::from) });
        }
        // A process left with no role (e.g. `--roles refresher` without a provider) has nothing
        // to report on: it exits at once rather than serving probes for idleness.
        if !parts.is_empty() || self.connections {
            let (listener, state) = self.http;
            let (connections, http_stop) = (self.connections, stop.clone());
            parts.spawn(
                async move { api::serve(listener, state, connections, http_stop).await.map_err(AppError::from) },
            );
        }
        let mut result = Ok(());
        while let Some(joined) = parts.join_next().await {
            let outcome = joined.unwrap_or_else(|e| Err(AppError::Api(std::io::Error::other(e.to_string()))));
            if let Err(e) = outcome {
                tracing::error!(error = %e, "a part stopped; stopping the others");
                stop.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        supervision.cancel();
        let _ = supervisor.await;
        self.broker.close().await;
        tracing::info!("mcp-worker stopped");
        result
    }
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

/// Reports the embedded migrations as applied or pending, applying nothing.
pub async fn check_migrations(settings: &Settings) -> Result<Vec<(String, MigrationStatus)>, AppError> {
    let store = Store::connect(&settings.mongodb).await?;
    Ok(store.migration_status(&embedded_migrations()?).await?)
}
