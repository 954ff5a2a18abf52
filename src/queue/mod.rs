//! RabbitMQ: the only module that imports `lapin`.
//!
//! [`Broker`] owns the AMQP connection and gets it back when it is lost. From it come the job
//! stream ([`Consumer`], manual acks, bounded prefetch), subscriptions to the events exchange (a
//! private queue per process, declared again on every link), and the [`Publisher`] (a channel in
//! confirm mode). Everyone else sees [`Delivery`] and plain strings, never an AMQP type.

mod broker;
mod migration;
mod publisher;
mod request;
mod topology;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicRejectOptions};

pub use broker::{Broker, Watched};
pub use migration::QueueMigration;
pub(crate) use publisher::{Published, Publisher};
pub(crate) use topology::Topology;

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
    #[error("RabbitMQ did not confirm the publish within {0} s")]
    Unconfirmed(u64),
    #[error("no queue `{0}` took the message (returned as unroutable); is the topology declared?")]
    Unroutable(String),
    #[error("the RabbitMQ connection was lost and did not come back in time")]
    Disconnected,
}

impl From<lapin::Error> for QueueError {
    fn from(error: lapin::Error) -> Self {
        QueueError::Channel(error.to_string())
    }
}

/// One consumer of a queue or a subscription: the stream of its deliveries, with manual acks.
pub struct Consumer {
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

impl Consumer {
    /// The next delivery; `None` once the consumer is cancelled or the channel is closed. Others
    /// go through [`Broker::next`], which resumes a lost consumer.
    pub(super) async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let delivery = self.consumer.next().await?;
        Some(delivery.map(Delivery::from).map_err(QueueError::from))
    }

    /// Stops new deliveries. Deliveries already handed out can still be acked on this channel.
    pub(crate) async fn cancel(&self) -> Result<(), QueueError> {
        self.channel.basic_cancel(self.consumer.tag(), BasicCancelOptions::default()).await?;
        Ok(())
    }
}

/// One message as a consumer sees it: no AMQP type, headers read through typed accessors.
pub struct Delivery {
    pub(crate) body: Vec<u8>,
    pub(crate) reply_to: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) redelivered: bool,
    /// How many earlier deliveries of this message ended without an ack (the quorum queue's
    /// `x-delivery-count`; 0 on a classic queue, which keeps none).
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
            failed_deliveries: integer_header(props, "x-delivery-count")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            body: std::mem::take(&mut inner.data),
            inner,
        }
    }
}

impl Delivery {
    /// Done with: the broker forgets the message.
    pub(crate) async fn ack(&self) -> Result<(), QueueError> {
        self.inner.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Not done: the broker delivers it again (counted against the queue's delivery limit).
    pub(crate) async fn requeue(&self) -> Result<(), QueueError> {
        self.inner.reject(BasicRejectOptions { requeue: true }).await?;
        Ok(())
    }

    /// Runs `handle` on this delivery. Should it panic, the delivery is requeued at once rather
    /// than left unacked until the channel closes: unacked, it would hold a prefetch slot for good
    /// and its delivery count would never grow, so no delivery limit could stop it. Requeued, it
    /// comes back counted. Settling is single-use, so a delivery the handler had already settled
    /// before panicking is left alone.
    pub async fn handle_or_requeue<F>(self, handle: impl FnOnce(Delivery) -> F)
    where
        F: std::future::Future<Output = ()>,
    {
        let acker = self.inner.acker.clone();
        if let Err(panic) = crate::panics::caught(handle(self)).await {
            tracing::error!(panic = %panic, "handling a message panicked; requeueing it");
            if let Err(e) = acker.reject(BasicRejectOptions { requeue: true }).await {
                // The channel is gone; the broker requeues every unacked delivery of it.
                tracing::warn!(error = %e, "requeue failed");
            }
        }
    }

    /// A counter header (see [`Header::Count`]), 0 when absent or not a count.
    pub(crate) fn count_header(&self, name: &str) -> u32 {
        integer_header(&self.inner.properties, name).and_then(|n| u32::try_from(n).ok()).unwrap_or(0)
    }

    /// An integer header, `None` when absent or not an integer.
    pub(crate) fn integer_header(&self, name: &str) -> Option<i64> {
        integer_header(&self.inner.properties, name)
    }

    /// A text header, `None` when absent or not text.
    pub(crate) fn text_header(&self, name: &str) -> Option<String> {
        text_header(&self.inner.properties, name)
    }

    pub(crate) fn properties(&self) -> &lapin::BasicProperties {
        &self.inner.properties
    }
}

/// A header value a consumer sets on a copy it republishes ([`Publisher::republish`]); what the
/// headers mean is the consumer's business, so no AMQP type leaves this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Header {
    /// A counter: read back with [`Delivery::count_header`].
    Count(u32),
    /// Read back with [`Delivery::integer_header`].
    Integer(i64),
    /// Read back with [`Delivery::text_header`].
    Text(String),
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

/// An integer header, `None` when absent or not an integer.
fn integer_header(properties: &lapin::BasicProperties, header: &str) -> Option<i64> {
    use lapin::types::AMQPValue;
    match properties.headers().as_ref()?.inner().get(header)? {
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}
