//! Test helpers: a worker per test on the real broker and database, with its own database and
//! queues so tests can run in parallel, and the official Python SDK's MCP servers as peers.
//!
//! The services must be running (`scripts/services up`, which `scripts/test` does). A missing
//! service fails the test with a message saying so; nothing is skipped.

pub mod hostile;
mod mcp_server;
mod oauth;
mod process;

use std::time::Duration;

use figment::providers::Serialized;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::sync::Arc;

use mcp_worker::app::{App, Roles};
use mcp_worker::config::Settings;
use mcp_worker::crypto::TokenCipher;
use mcp_worker::provider::Provider;
use mcp_worker::secret::Secret;
use mcp_worker::store::{NewTokens, Store};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub use mcp_server::{Flavor, McpServer};
pub use oauth::{
    OAuthFixture, confirm, connect_as_browser, connect_through, no_redirects, spawn_app_with_oauth, spawn_oauth,
    start_connect, walk_flow,
};
pub use process::{spawn_worker, terminate, worker_env};

/// The encryption key of every test (base64 of 32 bytes).
pub const TEST_KEY: &str = "dGVzdC1rZXktdGVzdC1rZXktdGVzdC1rZXktMzJieXQ=";

/// The service key internal endpoints expect in tests.
pub const SERVICE_KEY: &str = "test-service-key";

/// How long a test waits for a reply before failing.
pub const REPLY_WAIT: Duration = Duration::from_secs(30);

/// Polls `check` every 100 ms until it holds, failing the test after 60 s with `what`.
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The repository's root, for its files and scripts.
pub fn repo() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/corpus/bad_jobs`: every file is a body the worker must refuse, as (file name, body),
/// sorted by name.
pub fn bad_job_corpus() -> Vec<(String, Vec<u8>)> {
    let corpus = repo().join("tests/corpus/bad_jobs");
    let mut cases: Vec<(String, Vec<u8>)> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap()))
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "the corpus is there");
    cases
}

/// Settings for one test: the usual layers (so `MCP_WORKER_*` can point at other services), then
/// a fresh database and queue names, then the test's own overrides.
pub fn test_settings(mcp_url: &str, overrides: &[(&str, Value)]) -> Settings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut figment = Settings::figment(None, std::path::Path::new("config"))
        .expect("the default layers load")
        .merge(Serialized::default("mongodb.database", format!("t_{}", &id[..16])))
        .merge(Serialized::default("amqp.jobs_queue", format!("t.{id}.tool_calls")))
        .merge(Serialized::default("amqp.dead_letter_queue", format!("t.{id}.dead")))
        .merge(Serialized::default("amqp.refresh_queue", format!("t.{id}.refresh")))
        .merge(Serialized::default("amqp.events_exchange", format!("t.{id}.events")))
        .merge(Serialized::default("mcp.call_timeout_ms", 10_000))
        .merge(Serialized::default("mcp.servers.qlik.url", mcp_url))
        .merge(Serialized::default(
            "mcp.servers.plain",
            json!({ "url": mcp_url, "tools": ["echo", "sleep", "count_job"] }),
        ))
        .merge(Serialized::default("encryption.active_key", "test1"))
        .merge(Serialized::default("encryption.keys", json!({ "test1": TEST_KEY })))
        .merge(Serialized::default("http.listen", "127.0.0.1:0"))
        .merge(Serialized::default("http.service_key", SERVICE_KEY));
    for (key, value) in overrides {
        figment = figment.merge(Serialized::default(key, value.clone()));
    }
    Settings::from_figment(figment).expect("test settings are valid")
}

/// A running worker with its own database and queues, and a client side to talk to it.
pub struct TestApp {
    pub settings: Settings,
    pub store: Store,
    pub cipher: Arc<TokenCipher>,
    /// The test's database, for reading documents as stored.
    pub db: mongodb::Database,
    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:41234`.
    pub api: String,
    pub channel: Channel,
    pub reply_queue: String,
    shutdown: CancellationToken,
    worker: Option<tokio::task::JoinHandle<Result<(), mcp_worker::app::AppError>>>,
    /// Leave the queues on the broker when dropped (the test reads them after the worker stops).
    keep_topology: bool,
    _connection: Connection,
}

pub async fn spawn_app(mcp_url: &str) -> TestApp {
    spawn_app_with(mcp_url, &[]).await
}

/// Logs of the code under test go to the test's captured output (shown when a test fails);
/// `RUST_LOG` picks the level, warnings by default.
fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
        tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().init();
    });
}

pub async fn spawn_app_with(mcp_url: &str, overrides: &[(&str, Value)]) -> TestApp {
    spawn_app_from(test_settings(mcp_url, overrides)).await
}

/// A worker on `settings` (from [`test_settings`]), for tests that prepare its queues first.
pub async fn spawn_app_from(settings: Settings) -> TestApp {
    init_tracing();
    let store = Store::connect(&settings.mongodb).await.unwrap();
    store.ping().await.expect("MongoDB (SecantusDB) is not reachable: run scripts/services up");
    mcp_worker::app::migrate(&settings).await.expect("migrations apply");
    let app =
        App::build(&settings, Roles::all()).await.expect("the worker starts (is RabbitMQ up? run scripts/services up)");
    let api = format!("http://{}", app.http_addr());
    let cipher = Arc::new(TokenCipher::from_settings(&settings.encryption).unwrap());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(app.run(shutdown.clone()));

    let connection = Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ is reachable");
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
    declare_queue(&channel, &reply_queue, FieldTable::default()).await;
    let db = mongodb::Client::with_uri_str(settings.mongodb.uri.expose())
        .await
        .unwrap()
        .database(&settings.mongodb.database);
    TestApp {
        settings,
        store,
        cipher,
        db,
        api,
        channel,
        reply_queue,
        shutdown,
        worker: Some(worker),
        keep_topology: false,
        _connection: connection,
    }
}

/// Declares a non-durable queue that goes away with the connection.
pub async fn declare_queue(channel: &Channel, name: &str, arguments: FieldTable) {
    let options = QueueDeclareOptions { exclusive: true, ..Default::default() };
    channel.queue_declare(name.into(), options, arguments).await.unwrap();
}

impl TestApp {
    /// Publishes a job body with `reply_to` set to this test's reply queue.
    pub async fn publish(&self, body: &[u8], correlation_id: Option<&str>) {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(self.reply_queue.as_str().into());
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(id.into());
        }
        self.publish_with(body, properties).await;
    }

    pub async fn publish_with(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.settings.amqp.jobs_queue.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, Confirmation::Ack(None)), "the job was not routed: {confirm:?}");
    }

    /// Publishes a well-formed job for `user` calling `tool`.
    pub async fn call(&self, job_id: &str, user: &str, tool: &str, arguments: Value) {
        let job = json!({ "job_id": job_id, "user_id": user, "tool": tool, "arguments": arguments });
        self.publish(&serde_json::to_vec(&job).unwrap(), Some(&format!("corr-{job_id}"))).await;
    }

    /// The next reply on this test's reply queue, with its correlation id.
    pub async fn next_reply(&self) -> (Value, Option<String>) {
        let delivery = self.next_message(&self.reply_queue).await.expect("a reply arrives in time");
        let correlation = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
        (serde_json::from_slice(&delivery.data).expect("replies are JSON"), correlation)
    }

    /// The next message on `queue`, or `None` after [`REPLY_WAIT`]. It polls with `basic.get`,
    /// which takes exactly one message, where a consumer could be pushed more than it reads.
    pub async fn next_message(&self, queue: &str) -> Option<lapin::message::Delivery> {
        let until = tokio::time::Instant::now() + REPLY_WAIT;
        while tokio::time::Instant::now() < until {
            if let Some(message) = self.get_message(queue).await {
                return Some(message.delivery);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// A message from `queue` if one is there now.
    pub async fn get_message(&self, queue: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap()
    }

    /// Stores tokens as they are, e.g. ones issued by the OAuth test server.
    pub async fn store_tokens(
        &self,
        user: &str,
        access_token: &str,
        refresh_token: &str,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) {
        let tokens = NewTokens {
            access_token: Secret::new(access_token.to_owned()),
            refresh_token: Secret::new(refresh_token.to_owned()),
            expires_at,
        };
        self.store.tokens(Provider::Qlik, &self.cipher).save(user, &tokens, chrono::Utc::now()).await.unwrap();
    }

    /// `GET /v1/connections/qlik?user_id={user}` with the service key: the user's connection status.
    pub async fn connection_status(&self, user: &str) -> Value {
        let answer = reqwest::Client::new().get(self.user_url(user)).bearer_auth(SERVICE_KEY).send().await.unwrap();
        answer.json().await.unwrap()
    }

    /// `DELETE /v1/connections/qlik?user_id={user}` with the service key; returns the HTTP status.
    pub async fn disconnect(&self, user: &str) -> u16 {
        let answer = reqwest::Client::new().delete(self.user_url(user)).bearer_auth(SERVICE_KEY).send().await;
        answer.unwrap().status().as_u16()
    }

    /// `/v1/connections/qlik?user_id={user}`, the id percent-encoded.
    pub fn user_url(&self, user: &str) -> reqwest::Url {
        reqwest::Url::parse_with_params(&format!("{}/v1/connections/qlik", self.api), [("user_id", user)]).unwrap()
    }

    /// The user's stored tokens, decrypted.
    pub async fn stored(&self, user: &str) -> Option<mcp_worker::store::StoredToken> {
        self.store.tokens(Provider::Qlik, &self.cipher).get(user).await.unwrap()
    }

    /// Declares a queue bound to the events exchange for every token event, for reading them.
    pub async fn watch_events(&self) -> String {
        let queue = format!("{}.events-seen", self.settings.amqp.jobs_queue);
        declare_queue(&self.channel, &queue, FieldTable::default()).await;
        self.channel
            .queue_bind(
                queue.as_str().into(),
                self.settings.amqp.events_exchange.as_str().into(),
                "token.#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        queue
    }

    /// The next token event: its routing key and body.
    pub async fn next_event(&self, queue: &str) -> (String, Value) {
        let delivery = self.next_message(queue).await.expect("an event arrives in time");
        (delivery.routing_key.as_str().to_owned(), serde_json::from_slice(&delivery.data).unwrap())
    }

    pub async fn store_token(&self, user: &str, access_token: &str) {
        let now = chrono::Utc::now();
        let tokens = NewTokens {
            access_token: Secret::new(access_token.to_owned()),
            refresh_token: Secret::new(format!("refresh-{access_token}")),
            expires_at: now + chrono::Duration::hours(6),
        };
        self.store.tokens(Provider::Qlik, &self.cipher).save(user, &tokens, now).await.unwrap();
    }

    /// Stops the worker and waits for it, failing the test if it ended with an error.
    /// Stops the worker and deletes the test's queues.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let worker = self.worker.take().unwrap();
        worker.await.unwrap().expect("the worker stops cleanly");
    }

    /// Stops the worker but leaves the queues, for a test that reads them afterwards.
    pub async fn stop_keeping_queues(mut self) {
        self.keep_topology = true;
        self.stop().await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if !self.keep_topology {
            delete_topology(&self.settings);
        }
    }
}

/// Deletes a test's queues and events exchange, so that runs of the suite do not pile up
/// thousands of queues on the shared broker (RabbitMQ stops accepting connections after a few
/// runs' worth). Runs on a thread of its own: `Drop` cannot await, and the test's runtime may be
/// single-threaded. Best effort: a broker that is gone has nothing to clean.
fn delete_topology(settings: &Settings) {
    let topology = mcp_worker::app::topology(settings);
    let url = settings.amqp.url.expose().clone();
    let mut queues =
        vec![topology.jobs_queue, topology.dead_letter_queue, topology.delay_queue, topology.refresh_queue];
    queues.extend(topology.retry_queues.into_iter().map(|(queue, _)| queue));
    let exchange = topology.events_exchange;
    let cleaner = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let Ok(connection) = Connection::connect(&url, ConnectionProperties::default()).await else { return };
            if let Ok(channel) = connection.create_channel().await {
                for queue in &queues {
                    let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
                }
                let _ = channel.exchange_delete(exchange.as_str().into(), Default::default()).await;
            }
            let _ = connection.close(200, "test done".into()).await;
        });
    });
    let _ = cleaner.join();
}

/// The value of a string header of a message.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}
