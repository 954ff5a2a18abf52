//! A test rig for fault scenarios: worker *processes* (so they can be killed) on the real broker
//! and database, a durable reply queue that survives a broker restart, a client that reconnects
//! to read it, and the logs of every process kept for the secrets check.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Stdio};
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use mcp_worker::config::Settings;
use serde_json::{Value, json};

use crate::support::{McpServer, SERVICE_KEY, TEST_KEY, spawn_worker, terminate, test_settings, worker_env};

/// The access token every rig user has; the secrets check looks for it in the logs.
pub const ACCESS_TOKEN: &str = "fault-rig-access-token-5b1f0c";
pub const REFRESH_TOKEN: &str = "fault-rig-refresh-token-a77e3d";
/// The OAuth client secret the rig's workers are configured with (they never use it: no
/// refresher runs), so that printing the settings anywhere would be caught.
const CLIENT_SECRET: &str = "fault-rig-client-secret-90c2e1";

pub struct Rig {
    pub settings: Settings,
    pub server: McpServer,
    env: Vec<(String, String)>,
    pub reply_queue: String,
    workers: Vec<Child>,
    logs: tempfile::TempDir,
    /// Replies read so far, by job_id.
    pub replies: BTreeMap<String, Vec<Value>>,
    /// When the first reply of each job was read.
    pub arrived: BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    /// The connection replies are read on, replaced when the broker drops it.
    reader: Option<Client>,
}

/// A channel and the connection it lives on (which closes when dropped with it).
struct Client {
    channel: lapin::Channel,
    _connection: Connection,
}

impl Rig {
    /// A rig whose workers use `settings` plus `extra` (dotted keys), logging at debug level.
    pub async fn new(server: McpServer, overrides: &[(&str, Value)], extra: &[(&str, Value)]) -> Self {
        let settings = test_settings(&server.url(), overrides);
        mcp_worker::app::migrate(&settings).await.expect("migrations apply");
        let mut all: Vec<(&str, Value)> = overrides.to_vec();
        all.push(("telemetry.filter", json!("debug")));
        all.push(("providers.qlik.client_id", json!("fault-rig-client")));
        all.push(("providers.qlik.client_secret", json!(CLIENT_SECRET)));
        all.extend(extra.iter().cloned());
        let env = worker_env(&settings, &all);
        let reply_queue = format!("{}.replies", settings.amqp.jobs_queue);
        let rig = Self {
            settings,
            server,
            env,
            reply_queue,
            workers: Vec::new(),
            logs: tempfile::tempdir().unwrap(),
            replies: BTreeMap::new(),
            arrived: BTreeMap::new(),
            reader: None,
        };
        let client = rig.channel().await.expect("RabbitMQ is reachable");
        // A quorum queue: on a cluster, it survives the loss of any one node.
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
        client.channel.queue_declare(rig.reply_queue.as_str().into(), durable, quorum).await.unwrap();
        rig
    }

    /// Starts one more `mcp-worker run --roles <roles>` process; returns its index.
    pub async fn start_worker(&mut self, roles: &str) -> usize {
        let index = self.workers.len();
        let log = std::fs::File::create(self.logs.path().join(format!("worker-{index}.log"))).unwrap();
        self.workers.push(spawn_worker(&["run", "--roles", roles], &self.env, Stdio::from(log)));
        index
    }

    /// Waits until worker `index` says it is ready (connected, topology declared, consuming).
    pub async fn wait_ready(&self, index: usize) {
        crate::support::wait_until("the worker is ready", || async { self.logged(index, "mcp-worker ready") }).await;
    }

    /// Whether worker `index` logged a line containing `text`.
    pub fn logged(&self, index: usize, text: &str) -> bool {
        let log = self.logs.path().join(format!("worker-{index}.log"));
        std::fs::read_to_string(log).is_ok_and(|log| log.contains(text))
    }

    /// Worker `index`'s `/metrics`, from the address its log says the HTTP listener took.
    pub async fn metrics(&self, index: usize) -> String {
        let log = std::fs::read_to_string(self.logs.path().join(format!("worker-{index}.log"))).unwrap();
        let line = log.lines().find(|l| l.contains("HTTP listener ready")).expect("the worker logged its listener");
        let addr = line.split("listen=").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("listen=ADDR");
        reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
    }

    pub fn kill_worker(&mut self, index: usize) {
        let worker = &mut self.workers[index];
        worker.kill().expect("SIGKILL is delivered");
        worker.wait().unwrap();
    }

    /// Stores the rig's token for `user` straight into the database, as the connect flow would.
    pub async fn connect_user(&self, user: &str) {
        self.connect_user_until(user, chrono::Utc::now() + chrono::Duration::hours(6)).await;
    }

    /// Stores the rig's token for `user`, expiring at `expires_at`.
    pub async fn connect_user_until(&self, user: &str, expires_at: chrono::DateTime<chrono::Utc>) {
        let store = mcp_worker::store::Store::connect(&self.settings.mongodb).await.unwrap();
        let cipher =
            std::sync::Arc::new(mcp_worker::crypto::TokenCipher::from_settings(&self.settings.encryption).unwrap());
        let tokens = mcp_worker::store::NewTokens {
            access_token: mcp_worker::secret::Secret::new(ACCESS_TOKEN.to_owned()),
            refresh_token: mcp_worker::secret::Secret::new(REFRESH_TOKEN.to_owned()),
            expires_at,
        };
        let now = chrono::Utc::now();
        store.tokens(mcp_worker::provider::Provider::Qlik, &cipher).save(user, &tokens, now).await.unwrap();
    }

    /// A fresh client connection and a channel on it, on the first broker address that answers.
    async fn channel(&self) -> Result<Client, lapin::Error> {
        let mut failed = None;
        for address in self.settings.amqp.addresses() {
            match Connection::connect(address.expose(), ConnectionProperties::default()).await {
                Ok(connection) => {
                    let channel = connection.create_channel().await?;
                    return Ok(Client { channel, _connection: connection });
                }
                Err(e) => failed = Some(e),
            }
        }
        Err(failed.expect("there is at least one address"))
    }

    /// Publishes one persistent job per `(job_id, tool, arguments)` for alice, each with a
    /// reply_to on the rig's durable reply queue, and waits for every confirm.
    pub async fn publish(&self, jobs: impl IntoIterator<Item = (String, &str, Value, Option<String>)>) {
        self.publish_bodies(jobs.into_iter().map(|(job_id, tool, arguments, deadline)| {
            let mut job = json!({ "job_id": job_id, "user_id": "alice", "tool": tool, "arguments": arguments });
            if let Some(deadline) = deadline {
                job["deadline"] = json!(deadline);
            }
            (job_id, serde_json::to_vec(&job).unwrap())
        }))
        .await;
    }

    /// Publishes each `(job_id, body)` as it is (the job_id also as its message id), with a
    /// reply_to on the rig's reply queue, and waits for every confirm.
    pub async fn publish_bodies(&self, jobs: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let client = self.channel().await.expect("RabbitMQ is reachable");
        let channel = &client.channel;
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let mut confirms = Vec::new();
        for (job_id, body) in jobs {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.as_str().into())
                .with_correlation_id(job_id.as_str().into())
                .with_reply_to(self.reply_queue.as_str().into());
            let confirm = channel
                .basic_publish(
                    "".into(),
                    self.settings.amqp.jobs_queue.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &body,
                    properties,
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(matches!(confirm.await.unwrap(), Confirmation::Ack(None)), "a job was not routed");
        }
    }

    /// `count_job` jobs `job-0` … `job-<n-1>`.
    pub async fn publish_count_jobs(&self, n: usize) {
        self.publish((0..n).map(|i| {
            let job_id = format!("job-{i}");
            let arguments = json!({ "job_id": job_id });
            (job_id, "count_job", arguments, None)
        }))
        .await;
    }

    /// Reads replies until `expected` distinct job ids have one, reconnecting whenever the
    /// broker goes away; fails the test after `within`.
    pub async fn collect_replies(&mut self, expected: usize, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.replies.len() < expected {
            assert!(
                tokio::time::Instant::now() < until,
                "only {} of {expected} jobs answered within {within:?}",
                self.replies.len()
            );
            if self.read_replies().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every line any worker logged that contains `text`, for a failing test to show.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        let mut lines = Vec::new();
        for index in 0..self.workers.len() {
            let log = std::fs::read_to_string(self.logs.path().join(format!("worker-{index}.log"))).unwrap_or_default();
            lines.extend(log.lines().filter(|l| l.contains(text)).map(|l| format!("worker {index}: {l}")));
        }
        lines
    }

    /// Takes every reply waiting now.
    pub async fn read_replies(&mut self) -> Result<(), lapin::Error> {
        let reader = match self.reader.take() {
            Some(reader) => reader,
            None => self.channel().await?,
        };
        let queue = self.reply_queue.as_str();
        while let Some(message) = reader.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await? {
            let reply: Value = serde_json::from_slice(&message.delivery.data).expect("replies are JSON");
            let job_id = reply["job_id"].as_str().expect("replies name their job").to_owned();
            self.arrived.entry(job_id.clone()).or_insert_with(chrono::Utc::now);
            self.replies.entry(job_id).or_default().push(reply);
        }
        // Kept only when it worked: after an error the next call connects afresh.
        self.reader = Some(reader);
        Ok(())
    }

    /// The message ids of the messages in the dead-letter queue now (taken off it).
    pub async fn dead_lettered(&self) -> Vec<String> {
        let client = self.channel().await.expect("RabbitMQ is reachable");
        let queue = self.settings.amqp.dead_letter_queue.as_str();
        let mut ids = Vec::new();
        let get = BasicGetOptions { no_ack: true };
        while let Some(message) = client.channel.basic_get(queue.into(), get).await.unwrap() {
            ids.push(message.delivery.properties.message_id().as_ref().map(|id| id.to_string()).unwrap_or_default());
        }
        ids
    }

    /// How many times the MCP server ran the tool for each job id (from its request log).
    pub fn executions(&self) -> BTreeMap<String, usize> {
        let mut executions = BTreeMap::new();
        for call in self.server.tool_calls() {
            let job_id = call.arguments.as_ref().and_then(|a| a["job_id"].as_str()).unwrap_or_default().to_owned();
            *executions.entry(job_id).or_default() += 1;
        }
        executions
    }

    /// Jobs `job-0` … `job-<n-1>` each got replies, all `ok` and identical, and the tool ran
    /// exactly once for each.
    pub fn assert_each_answered_and_run_once(&self, n: usize) {
        let expected: BTreeSet<String> = (0..n).map(|i| format!("job-{i}")).collect();
        let answered: BTreeSet<String> = self.replies.keys().cloned().collect();
        assert_eq!(answered, expected, "every job answered, no other");
        for (job_id, replies) in &self.replies {
            assert_eq!(replies[0]["status"], "ok", "{job_id}: {}", replies[0]);
            assert!(replies.iter().all(|r| r == &replies[0]), "{job_id}: duplicate replies differ: {replies:?}");
        }
        let executions = self.executions();
        let twice: Vec<_> = executions.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "jobs not run exactly once: {twice:?}");
        assert_eq!(executions.len(), n, "every job ran");
    }

    /// Stops the workers still running (SIGTERM; each must exit 0), then asserts that no secret
    /// appears in anything any worker process logged, nor in any reply.
    pub async fn finish(mut self) {
        for worker in &mut self.workers {
            if worker.try_wait().unwrap().is_none() {
                assert!(terminate(worker), "a worker did not exit 0 on SIGTERM");
            }
        }
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.logs.path()).unwrap() {
            logs.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
        }
        assert!(logs.contains("job done") && logs.contains("DEBUG"), "debug logs were captured");
        let replies = serde_json::to_string(&self.replies).unwrap();
        for (what, value) in [
            ("access token", ACCESS_TOKEN),
            ("refresh token", REFRESH_TOKEN),
            ("client secret", CLIENT_SECRET),
            ("encryption key", TEST_KEY),
            ("service key", SERVICE_KEY),
            ("broker password", "guest:guest"),
        ] {
            assert!(!logs.contains(value), "the {what} appears in the logs");
            assert!(!replies.contains(value), "the {what} appears in a reply");
        }
        if let Ok(client) = self.channel().await {
            let _ = client.channel.queue_delete(self.reply_queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
    }
}

impl Drop for Rig {
    /// When a test fails, the end of each worker's log is the first thing one wants to see.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (index, worker) in self.workers.iter_mut().enumerate() {
            let _ = worker.kill();
            let log = std::fs::read_to_string(self.logs.path().join(format!("worker-{index}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("----- worker {index}, last lines of its log");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
