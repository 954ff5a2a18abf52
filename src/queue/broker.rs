//! The AMQP connection, and getting it back when it is lost.
//!
//! A [`Broker`] holds the current *link*: one connection, with the topology declared on it and a
//! channel in confirm mode for publishing. [`Broker::supervise`] watches the link and, when the
//! connection drops (broker restart, network, missed heartbeats), connects again with
//! exponential backoff and jitter, declares the topology again, and bumps the link's generation.
//! Consumers take deliveries through [`Broker::next`], which, when their stream is lost, waits
//! for a newer generation and consumes again; publishers always use the current link.
//!
//! With several broker addresses (a cluster's nodes), each process starts at a random one so
//! replicas spread over the nodes, and every reconnect attempt goes to the next address in turn:
//! a node that died is left at once, and one that never returns is never waited for.
//!
//! Deliveries taken on a lost link cannot be acked any more: the broker has already requeued
//! them, and they come back on the new link. That is what keeps jobs from being lost.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Consumer, Delivery, Publisher, QueueError, Source, Topology};
use crate::config::AmqpSettings;
use crate::secret::Secret;

/// The largest AMQP frame this side proposes, in bytes (see `establish`).
const FRAME_MAX: u32 = 32_768;
/// How often the supervisor looks at the connection's state.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// The first and the largest wait between two connection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// One connection with the topology declared on it.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) connection: Arc<Connection>,
    /// The channel publishes go through, in confirm mode.
    pub(super) publisher: Channel,
    /// Counts links: 0 for the first, +1 per reconnect.
    pub(super) generation: u64,
    /// Which of the broker addresses it is connected to.
    address: usize,
}

impl Link {
    fn is_up(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

pub(super) struct Shared {
    addresses: Vec<Secret<String>>,
    name: String,
    /// How long a reply whose confirm was lost waits for a new link (see `publisher`).
    pub(super) resend_window: Duration,
    topology: Option<Topology>,
    link: RwLock<Link>,
    generation: watch::Sender<u64>,
}

impl Shared {
    pub(super) fn link(&self) -> Link {
        self.link.read().expect("the link lock is never poisoned").clone()
    }

    /// Waits until a link newer than `generation` is up; `false` if none came within `within`.
    pub(super) async fn newer_than(&self, generation: u64, within: Duration) -> bool {
        let mut current = self.generation.subscribe();
        tokio::time::timeout(within, current.wait_for(|g| *g > generation)).await.is_ok_and(|r| r.is_ok())
    }
}

/// What [`Broker::watch`] saw.
// Returned by value and moved once; boxing the common variant would cost an allocation per job
// to shrink two rare ones.
#[allow(clippy::large_enum_variant)]
pub enum Watched {
    Delivery(Delivery),
    /// The consumer is gone (its channel or connection): what is published now is not seen.
    Lost,
    /// Consuming again on a new link.
    Resumed,
}

/// A cheap handle on the shared connection.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

impl Broker {
    /// Connects to one of the configured addresses (each tried once, from a random one),
    /// declares `topology` if there is one, and opens the publishing channel. Fails at once if no
    /// address can be reached: at start a clear error beats waiting.
    #[tracing::instrument(skip_all)]
    pub async fn connect(amqp: &AmqpSettings, name: &str, topology: Option<Topology>) -> Result<Self, QueueError> {
        let addresses = amqp.addresses();
        let start = rand::random::<u32>() as usize % addresses.len();
        let mut failures = Vec::new();
        let mut link = None;
        for attempt in 0..addresses.len() {
            let address = (start + attempt) % addresses.len();
            match establish(&addresses, address, name, topology.as_ref(), 0).await {
                Ok(established) => {
                    link = Some(established);
                    break;
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        let Some(link) = link else { return Err(QueueError::Connect(failures.join("; "))) };
        let shared = Shared {
            addresses,
            name: name.to_owned(),
            resend_window: amqp.reply_resend_window(),
            topology,
            link: RwLock::new(link),
            generation: watch::Sender::new(0),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Starts consuming `queue` on the current link with at most `prefetch` unacknowledged
    /// deliveries.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError> {
        self.open(&Source::Queue(queue.to_owned()), prefetch).await
    }

    /// Subscribes to the messages of `exchange` with these routing keys, through a private queue
    /// of this process. Deliveries need no ack (they are advisory), and none published while no
    /// link is up reach this process: [`Broker::watch`] reports such gaps.
    pub(crate) async fn subscribe(&self, exchange: &str, routing_keys: &[&str]) -> Result<Consumer, QueueError> {
        let source = Source::Subscription {
            exchange: exchange.to_owned(),
            routing_keys: routing_keys.iter().map(|k| (*k).to_owned()).collect(),
        };
        self.open(&source, 256).await
    }

    /// Consumes `source` on a new channel of the current link.
    async fn open(&self, source: &Source, prefetch: u16) -> Result<Consumer, QueueError> {
        let link = self.shared.link();
        let channel = link.connection.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let (queue, no_ack) = match source {
            Source::Queue(queue) => (queue.clone(), false),
            Source::Subscription { exchange, routing_keys } => {
                let private = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
                let queue = channel.queue_declare("".into(), private, FieldTable::default()).await?;
                let queue = queue.name().to_string();
                for key in routing_keys {
                    channel
                        .queue_bind(
                            queue.as_str().into(),
                            exchange.as_str().into(),
                            key.as_str().into(),
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                }
                (queue, true)
            }
        };
        let options = BasicConsumeOptions { no_ack, ..Default::default() };
        let consumer = channel.basic_consume(queue.as_str().into(), "".into(), options, FieldTable::default()).await?;
        Ok(Consumer {
            channel,
            consumer,
            generation: link.generation,
            source: source.clone(),
            queue,
            prefetch,
            lost: false,
        })
    }

    pub(crate) fn publisher(&self) -> Publisher {
        Publisher::new(self.shared.clone())
    }

    /// The next delivery of `consumer`. When it is lost (channel or connection gone), it
    /// waits for the next link and consumes the same queue again. `None` once `shutdown` fires.
    pub(crate) async fn next(&self, consumer: &mut Consumer, shutdown: &CancellationToken) -> Option<Delivery> {
        loop {
            if let Watched::Delivery(delivery) = self.watch(consumer, shutdown).await? {
                return Some(delivery);
            }
        }
    }

    /// Like [`Broker::next`], but also says when the consumer was lost and when it consumes
    /// again, for consumers that must know what they may have missed (a subscription).
    pub(crate) async fn watch(&self, consumer: &mut Consumer, shutdown: &CancellationToken) -> Option<Watched> {
        if consumer.lost {
            *consumer = self.resume(consumer, shutdown).await?;
            tracing::info!(queue = %consumer.queue, "consuming again");
            return Some(Watched::Resumed);
        }
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => return None,
            delivery = consumer.next() => delivery,
        };
        match delivery {
            Some(Ok(delivery)) => Some(Watched::Delivery(delivery)),
            lost => {
                let reason = lost.and_then(Result::err).map_or("the broker cancelled it".into(), |e| e.to_string());
                tracing::warn!(reason, queue = %consumer.queue, "lost a consumer; resuming once RabbitMQ is back");
                consumer.lost = true;
                Some(Watched::Lost)
            }
        }
    }

    /// After `lost` ended: waits for a newer link and consumes the same queue on it. `None` once
    /// `shutdown` fires first.
    async fn resume(&self, lost: &Consumer, shutdown: &CancellationToken) -> Option<Consumer> {
        let mut generation = lost.generation;
        loop {
            let link = self.shared.link();
            if link.generation == generation && link.connection.status().connected() {
                // The connection looks healthy, so only the channel was closed: closing the
                // connection makes the supervisor build everything again, topology included.
                let _ = link.connection.close(200, "a consumer channel was lost; reconnecting".into()).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = self.shared.newer_than(generation, Duration::MAX) => {}
            }
            match self.open(&lost.source, lost.prefetch).await {
                Ok(consumer) => return Some(consumer),
                Err(e) => {
                    tracing::warn!(error = %e, queue = %lost.queue, "cannot consume on the new link yet");
                    generation = self.shared.link().generation;
                }
            }
        }
    }

    /// Keeps the link up until `shutdown`: reconnects, with backoff, whenever it drops, and
    /// calls `reconnected` each time a new link is up (for the metrics).
    pub(crate) async fn supervise(&self, shutdown: CancellationToken, reconnected: impl Fn()) {
        let mut watch = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = watch.tick() => {}
            }
            let lost = self.shared.link();
            if lost.is_up() {
                continue;
            }
            if lost.connection.status().connected() {
                // Only the publishing channel died (the broker closes a channel on some errors):
                // a fresh link is the simplest way to get every channel back in a known state.
                let _ = lost.connection.close(200, "the publishing channel was lost; reconnecting".into()).await;
            }
            tracing::warn!("lost the RabbitMQ connection; reconnecting");
            let mut attempt = 0;
            let link = loop {
                let generation = lost.generation + 1;
                let address = next_address(lost.address, attempt, self.shared.addresses.len());
                let topology = self.shared.topology.as_ref();
                match establish(&self.shared.addresses, address, &self.shared.name, topology, generation).await {
                    Ok(link) => break link,
                    Err(e) => {
                        let delay = reconnect_delay(attempt, rand::random());
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "reconnect failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            };
            let (generation, address) = (link.generation, link.address);
            *self.shared.link.write().expect("the link lock is never poisoned") = link;
            self.shared.generation.send_replace(generation);
            reconnected();
            tracing::info!(generation, node = %node(&self.shared.addresses[address]), "reconnected to RabbitMQ; topology declared again");
        }
    }

    /// Whether the current link is up (and so its topology declared), for readiness.
    pub(crate) fn is_connected(&self) -> bool {
        self.shared.link().is_up()
    }

    pub async fn close(&self) {
        // Closing fails only when the connection is already gone, which is what we want anyway.
        let _ = self.shared.link().connection.close(200, "shutting down".into()).await;
    }

    pub(super) fn connection(&self) -> Arc<Connection> {
        self.shared.link().connection
    }
}

/// Connects to `addresses[address]`. Its errors name the node (host and port), never the URL.
async fn establish(
    addresses: &[Secret<String>],
    address: usize,
    name: &str,
    topology: Option<&Topology>,
    generation: u64,
) -> Result<Link, QueueError> {
    let node = node(&addresses[address]);
    establish_on(&addresses[address], name, topology)
        .await
        .map(|(connection, publisher)| Link { connection: Arc::new(connection), publisher, generation, address })
        .map_err(|e| match e {
            QueueError::Connect(e) => QueueError::Connect(format!("{node}: {e}")),
            QueueError::Topology(e) => QueueError::Topology(format!("on {node}: {e}")),
            other => QueueError::Channel(format!("{node}: {other}")),
        })
}

async fn establish_on(
    url: &Secret<String>,
    name: &str,
    topology: Option<&Topology>,
) -> Result<(Connection, Channel), QueueError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    // The parser's error repeats the whole URL, password included: say only what is wrong.
    let mut uri: lapin::uri::AMQPUri =
        url.expose().parse().map_err(|_| QueueError::Connect("not a valid AMQP URL".into()))?;
    // lapin keeps two I/O buffers of 32 frames each: at RabbitMQ's default 128 KiB frames that is
    // 8 MiB per connection. 32 KiB frames carry any job as well (a larger body spans frames) for a
    // quarter of that. A `frame_max` in the URL still wins.
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    // lapin's error text does not contain the URL, so the password cannot leak through it.
    let connection = Connection::connect_uri(uri, properties).await.map_err(|e| QueueError::Connect(e.to_string()))?;
    if let Some(topology) = topology {
        topology.declare(&connection).await?;
    }
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((connection, publisher))
}

/// The node an address points at, as `host:port`, for logs and errors: the URL itself may
/// carry a password.
fn node(url: &Secret<String>) -> String {
    match url.expose().parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => "an address that is not a valid AMQP URL".into(),
    }
}

/// The address reconnect attempt `attempt` (0-based) goes to after losing address `lost` of
/// `count`: the next one first, then each in turn, so a dead node is left at once.
fn next_address(lost: usize, attempt: u32, count: usize) -> usize {
    (lost + 1 + attempt as usize % count) % count
}

/// The wait before reconnect attempt `attempt` (0-based): exponential from [`BACKOFF_FIRST`],
/// capped at [`BACKOFF_MAX`], with full jitter from `random` so that many workers losing one
/// broker do not all knock at the same instant.
fn reconnect_delay(attempt: u32, random: f64) -> Duration {
    let ceiling = BACKOFF_FIRST.saturating_mul(2u32.saturating_pow(attempt.min(16))).min(BACKOFF_MAX);
    ceiling.mul_f64(random.clamp(0.0, 1.0)).max(Duration::from_millis(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delays_grow_then_stay_capped() {
        assert_eq!(reconnect_delay(0, 1.0), BACKOFF_FIRST);
        assert_eq!(reconnect_delay(1, 1.0), BACKOFF_FIRST * 2);
        assert_eq!(reconnect_delay(30, 1.0), BACKOFF_MAX);
    }

    #[test]
    fn reconnects_go_to_the_next_node_then_each_in_turn() {
        let tried: Vec<usize> = (0..4).map(|attempt| next_address(1, attempt, 3)).collect();
        assert_eq!(tried, [2, 0, 1, 2]);
        assert_eq!(next_address(0, 7, 1), 0);
    }

    #[test]
    fn a_node_is_named_without_its_password() {
        let url = Secret::new("amqp://user:s3cr3t@rabbit-2:5702/%2f".to_owned());
        assert_eq!(node(&url), "rabbit-2:5702");
    }

    #[test]
    fn jitter_spreads_the_delay_but_never_to_zero() {
        assert_eq!(reconnect_delay(10, 0.5), BACKOFF_MAX / 2);
        assert_eq!(reconnect_delay(10, 0.0), Duration::from_millis(50));
    }
}
