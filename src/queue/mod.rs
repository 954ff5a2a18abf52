//! RabbitMQ: the only module that imports `lapin`.
//!
//! [`Broker`] owns the AMQP connection and gets it back when it is lost. From it come the job
//! stream ([`Jobs`], manual acks, bounded prefetch), subscriptions to the events exchange (a
//! private queue per process, declared again on every link), and the [`Publisher`] (a channel in
//! confirm mode). Everyone else sees [`Delivery`] and plain strings, never an AMQP type.

mod broker;
mod publisher;
mod request;
mod topology;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicRejectOptions};

pub use broker::{Broker, Watched};
pub use publisher::{ATTEMPTS_HEADER, CLAIM_HEADER, DEFERRALS_HEADER, Published, Publisher, REASON_HEADER, Return};
pub use topology::Topology;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(String),
    #[error("RabbitMQ refused to declare the topology: {0}")]
    Topology(String),
    #[error("RabbitMQ channel error: {0}")]
    Channel(String),
    #[error("RabbitMQ did not confirm the publish (nack)")]
    Nacked,
    #[error("the RabbitMQ connection was lost and did not come back in time")]
    Disconnected,
}

impl From<lapin::Error> for QueueError {
    fn from(error: lapin::Error) -> Self {
        QueueError::Channel(error.to_string())
    }
}

/// The stream of job deliveries from one consumer.
pub struct Jobs {
    channel: Channel,
    consumer: lapin::Consumer,
    /// The link it came from, and what it consumes: [`Broker::next`] consumes it again after a loss.
    generation: u64,
    source: Source,
    /// The queue consumed on this link (server-named for a subscription).
    queue: String,
    prefetch: u16,
    /// Its consumer ended; the next [`Broker::watch`] resumes it.
    lost: bool,
}

/// What a consumer reads.
#[derive(Clone, Debug)]
enum Source {
    /// A declared queue, consumed with manual acks.
    Queue(String),
    /// Messages of `exchange` with these routing keys, through a private queue (exclusive,
    /// server-named, gone with the connection) that is declared and bound on each link.
    Subscription { exchange: String, routing_keys: Vec<String> },
}

impl Jobs {
    /// The next delivery; `None` once the consumer is cancelled or the channel is closed. Others
    /// go through [`Broker::next`], which resumes a lost consumer.
    pub(super) async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let delivery = self.consumer.next().await?;
        Some(delivery.map(Delivery::from).map_err(QueueError::from))
    }

    /// Stops new deliveries. Deliveries already handed out can still be acked on this channel.
    pub async fn cancel(&self) -> Result<(), QueueError> {
        self.channel.basic_cancel(self.consumer.tag(), BasicCancelOptions::default()).await?;
        Ok(())
    }
}

/// One job message as the worker sees it.
pub struct Delivery {
    pub body: Vec<u8>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub message_id: Option<String>,
    pub redelivered: bool,
    /// How many times the worker already deferred this job waiting for its token.
    pub deferrals: u32,
    /// How many times the worker already retried this job after a transient MCP failure.
    pub retries: u32,
    /// The job claim this delivery took back from the delay queue, if it held one.
    pub claim: Option<String>,
    /// How many earlier deliveries of this message ended without an ack (the quorum queue's
    /// `x-delivery-count`).
    pub failed_deliveries: u32,
    inner: lapin::message::Delivery,
}

impl From<lapin::message::Delivery> for Delivery {
    fn from(mut inner: lapin::message::Delivery) -> Self {
        let props = &inner.properties;
        let text =
            |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.as_str().to_owned()).filter(|s| !s.is_empty());
        Self {
            reply_to: text(props.reply_to()),
            correlation_id: text(props.correlation_id()),
            message_id: text(props.message_id()),
            redelivered: inner.redelivered,
            deferrals: counter(props, DEFERRALS_HEADER),
            retries: counter(props, ATTEMPTS_HEADER),
            claim: text_header(props, CLAIM_HEADER),
            failed_deliveries: counter(props, "x-delivery-count"),
            body: std::mem::take(&mut inner.data),
            inner,
        }
    }
}

impl Delivery {
    /// Done with: the broker forgets the message.
    pub async fn ack(&self) -> Result<(), QueueError> {
        self.inner.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Not done: the broker delivers it again (counted against the queue's delivery limit).
    pub async fn requeue(&self) -> Result<(), QueueError> {
        self.inner.reject(BasicRejectOptions { requeue: true }).await?;
        Ok(())
    }

    pub(crate) fn properties(&self) -> &lapin::BasicProperties {
        &self.inner.properties
    }
}

/// A text header of ours, `None` when absent or not text.
fn text_header(properties: &lapin::BasicProperties, header: &str) -> Option<String> {
    use lapin::types::AMQPValue;
    match properties.headers().as_ref()?.inner().get(header)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// A counter header, 0 when absent or not a number.
fn counter(properties: &lapin::BasicProperties, header: &str) -> u32 {
    use lapin::types::AMQPValue;
    let value = properties.headers().as_ref().and_then(|h| h.inner().get(header).cloned());
    match value {
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(n).unwrap_or(0),
        Some(AMQPValue::ShortUInt(n)) => u32::from(n),
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(n),
        _ => 0,
    }
}
