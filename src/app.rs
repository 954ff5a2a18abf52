//! Wiring: builds every part from validated [`Settings`] and runs them until shutdown.
//!
//! [`App::build`] connects to MongoDB and RabbitMQ, declares the topology and starts consuming, so
//! when it returns the worker is ready; [`App::run`] processes jobs until the shutdown token fires.
//! Tests use the same two steps with settings of their own (a fresh database and queues per test).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::mcp::{McpCallError, McpClients};
use crate::queue::{Broker, Jobs, QueueError, Topology};
use crate::registry::Registry;
use crate::store::{MigrationError, MigrationStatus, Store, StoreError, embedded_migrations};
use crate::worker::{Worker, WorkerConfig, WorkerError};

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
    Worker(#[from] WorkerError),
}

pub struct App {
    broker: Broker,
    worker: Arc<Worker>,
    jobs: Jobs,
}

impl App {
    pub async fn build(settings: &Settings) -> Result<Self, AppError> {
        let registry = Arc::new(Registry::from_settings(&settings.mcp)?);
        let store = Store::connect(&settings.mongodb).await?;
        store.ping().await?;
        let broker = Broker::connect(&settings.amqp.url, "mcp-worker").await?;
        broker.declare(&topology(settings)).await?;
        let publisher = broker.publisher().await?;
        let mcp = Arc::new(McpClients::new(&registry, settings.mcp.connect_timeout(), settings.worker.concurrency)?);
        let config = WorkerConfig {
            concurrency: settings.worker.concurrency,
            max_job_bytes: settings.worker.max_job_bytes,
            call_timeout: settings.mcp.call_timeout(),
            dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
        };
        let worker = Arc::new(Worker::new(config, registry, store, mcp, publisher));
        let jobs = broker.consume(&settings.amqp.jobs_queue, settings.amqp.prefetch).await?;
        tracing::info!(queue = %settings.amqp.jobs_queue, "worker ready");
        Ok(Self { broker, worker, jobs })
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let result = self.worker.run(self.jobs, shutdown).await;
        self.broker.close().await;
        tracing::info!("worker stopped");
        Ok(result?)
    }
}

pub fn topology(settings: &Settings) -> Topology {
    Topology {
        jobs_queue: settings.amqp.jobs_queue.clone(),
        dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
        delivery_limit: settings.amqp.delivery_limit,
    }
}

/// Applies the embedded migrations.
pub async fn migrate(settings: &Settings) -> Result<Vec<(String, MigrationStatus)>, AppError> {
    let store = Store::connect(&settings.mongodb).await?;
    Ok(store.migrate(&embedded_migrations()?).await?)
}
