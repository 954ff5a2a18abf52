//! RabbitMQ: the only module that imports `lapin`.
//!
//! [`Broker`] owns one AMQP connection. From it come the job stream ([`Jobs`], manual acks,
//! bounded prefetch) and the [`Publisher`] (a channel in confirm mode). Everyone else sees
//! [`Delivery`] and plain strings, never an AMQP type.

mod publisher;
mod request;
mod topology;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

pub use publisher::{ATTEMPTS_HEADER, DEFERRALS_HEADER, Published, Publisher, REASON_HEADER};
pub use topology::Topology;

use crate::secret::Secret;

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
}

impl From<lapin::Error> for QueueError {
    fn from(error: lapin::Error) -> Self {
        QueueError::Channel(error.to_string())
    }
}

pub struct Broker {
    connection: Connection,
}

impl Broker {
    #[tracing::instrument(skip_all)]
    pub async fn connect(url: &Secret<String>, name: &str) -> Result<Self, QueueError> {
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        // lapin's error text does not contain the URL, so the password cannot leak through it.
        let connection =
            Connection::connect(url.expose(), properties).await.map_err(|e| QueueError::Connect(e.to_string()))?;
        Ok(Self { connection })
    }

    /// Declares the queues the worker needs; safe to repeat, fails if they exist with other settings.
    pub async fn declare(&self, topology: &Topology) -> Result<(), QueueError> {
        let channel = self.connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel.close(200, "declared".into()).await?;
        Ok(())
    }

    /// Starts consuming `queue` with at most `prefetch` unacknowledged deliveries.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Jobs, QueueError> {
        let channel = self.connection.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok(Jobs { channel, consumer })
    }

    pub async fn publisher(&self) -> Result<Publisher, QueueError> {
        Publisher::open(&self.connection).await
    }

    /// Whether the AMQP connection is up, for readiness.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    pub async fn close(&self) {
        // Closing fails only when the connection is already gone, which is what we want anyway.
        let _ = self.connection.close(200, "shutting down".into()).await;
    }
}

/// The stream of job deliveries from one consumer.
pub struct Jobs {
    channel: Channel,
    consumer: lapin::Consumer,
}

impl Jobs {
    /// The next delivery; `None` once the consumer is cancelled or the channel is closed.
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
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

/// A counter header of ours, 0 when absent or not a number.
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
