//! Publishing with publisher confirms: a publish is done when the broker says it has the message.
//!
//! Every publish goes through the broker's current link. A reply whose confirm was lost with
//! the connection is published again once the link is back (within `amqp.reply_resend_window_secs`):
//! the caller may then get the same reply twice, never none. Other messages are not resent: the
//! job they were derived from cannot be acked on a lost link, so it comes back anyway.
//!
//! Every publish to a named queue is mandatory, and a copy of a job that no queue took (a
//! delay, retry or dead-letter queue that is not there) is an error, never a success: the job
//! is then requeued rather than acked. A confirm is awaited at most [`CONFIRM_TIMEOUT`]: a
//! quorum queue without a majority holds its confirms, and no job waits on that forever. A
//! nack is tried again, with backoff, for about 8 s: that is how a quorum queue answers while it
//! elects a new leader.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Confirmation};

use super::broker::Shared;
use super::{Delivery, Header, QueueError};

/// The longest wait for the broker's confirm of one publish.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a nacked publish is sent, and the first wait between two tries (it doubles):
/// 0.25 + 0.5 + … + 4 s, about 8 s in all, covers a quorum queue's leader election.
const NACK_ATTEMPTS: u32 = 6;
const NACK_FIRST_WAIT: Duration = Duration::from_millis(250);

/// Header naming why the worker dead-lettered a message.
pub(crate) const REASON_HEADER: &str = "x-mcp-worker-reason";

/// RabbitMQ's direct reply-to pseudo-queue; the reply-to names it hands out start with it.
pub(super) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Persistent delivery mode: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// The properties every message this service creates starts from: JSON, written to disk.
pub(super) fn persistent_json() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(PERSISTENT)
}

/// What the broker did with a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Published {
    /// Routed to a queue and confirmed.
    Delivered,
    /// Confirmed, but no queue has that name (the requester's reply queue is gone).
    Unroutable,
}

/// Whether a publish whose connection was lost is tried again on the next link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    Yes,
    No,
}

#[derive(Clone)]
pub(crate) struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Publishes a reply to `queue` through the default exchange and waits for the confirm.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn reply(
        &self,
        queue: &str,
        correlation_id: Option<&str>,
        body: &[u8],
    ) -> Result<Published, QueueError> {
        let mut properties = persistent_json();
        if let Some(correlation_id) = correlation_id {
            properties = properties.with_correlation_id(correlation_id.into());
        }
        self.publish(queue, body, properties, Resend::Yes).await
    }

    /// Publishes a copy of `delivery` to `queue` with the reason in [`REASON_HEADER`], and waits
    /// for the confirm. The original keeps its properties so it can be inspected or replayed.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn dead_letter(&self, queue: &str, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let original = delivery.properties();
        let mut headers = original.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        let properties = original.clone().with_headers(headers).with_delivery_mode(PERSISTENT);
        self.publish_to_own(queue, &delivery.body, properties).await
    }

    /// Publishes a copy of `delivery` to `queue` with its headers changed as `changes` says (a
    /// value sets a header, `None` removes it), and waits for the confirm. This is how a job goes
    /// to a delay queue with what it carries back, and how a failed request is put back counted.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn republish(
        &self,
        queue: &str,
        delivery: &Delivery,
        changes: &[(&str, Option<Header>)],
    ) -> Result<(), QueueError> {
        let original = delivery.properties();
        let mut headers = original.headers().as_ref().map(|h| h.inner().clone()).unwrap_or_default();
        for (name, change) in changes {
            match change {
                Some(Header::Count(n)) => headers.insert((*name).into(), AMQPValue::LongUInt(*n)),
                Some(Header::Integer(n)) => headers.insert((*name).into(), AMQPValue::LongLongInt(*n)),
                Some(Header::Text(text)) => headers.insert((*name).into(), AMQPValue::LongString(text.as_str().into())),
                None => headers.remove(*name),
            };
        }
        let properties = original.clone().with_headers(headers.into()).with_delivery_mode(PERSISTENT);
        self.publish_to_own(queue, &delivery.body, properties).await
    }

    /// Publishes a persistent JSON message to `queue`, one of ours, and waits for the confirm.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn send(&self, queue: &str, body: &[u8]) -> Result<(), QueueError> {
        self.publish_to_own(queue, body, persistent_json()).await
    }

    /// Publishes to a queue of the worker's own topology: there, a message no queue took is lost,
    /// so it is an error.
    async fn publish_to_own(&self, queue: &str, body: &[u8], properties: BasicProperties) -> Result<(), QueueError> {
        match self.publish(queue, body, properties, Resend::No).await? {
            Published::Delivered => Ok(()),
            Published::Unroutable => Err(QueueError::Unroutable(queue.to_owned())),
        }
    }

    /// Publishes a persistent JSON event to a topic exchange and waits for the confirm. An event
    /// nobody subscribed to is dropped by the broker, which is fine for events.
    #[tracing::instrument(skip_all)]
    pub(crate) async fn event(&self, exchange: &str, routing_key: &str, body: &[u8]) -> Result<(), QueueError> {
        let properties = persistent_json();
        let channel = self.shared.link().publisher;
        let confirm = channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, properties)
            .await?;
        match confirmed(confirm).await? {
            Confirmation::Ack(_) => Ok(()),
            _ => Err(QueueError::Nacked),
        }
    }

    async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        resend: Resend,
    ) -> Result<Published, QueueError> {
        let link = self.shared.link();
        // Only a publish that may be sent again keeps a copy of its properties.
        let again = (resend == Resend::Yes).then(|| properties.clone());
        match (self.publish_on(&link.publisher, queue, body, properties).await, again) {
            (Err(QueueError::Channel(e)), Some(properties)) => {
                tracing::warn!(error = %e, "publish not confirmed; sending it again once reconnected");
                if !self.shared.newer_than(link.generation, self.shared.resend_window).await {
                    return Err(QueueError::Disconnected);
                }
                self.publish_on(&self.shared.link().publisher, queue, body, properties).await
            }
            (outcome, _) => outcome,
        }
    }

    /// Publishes on `channel`, again after a nack: a quorum queue nacks while it elects a new
    /// leader (its old one's node died), which takes seconds, and a job requeued at once for
    /// every nack would spend its whole delivery limit in that time. A message the broker nacked
    /// may still have been taken; a copy too many is what a job's claim makes harmless.
    async fn publish_on(
        &self,
        channel: &lapin::Channel,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Published, QueueError> {
        let mut wait = NACK_FIRST_WAIT;
        for _ in 1..NACK_ATTEMPTS {
            match self.publish_once(channel, queue, body, properties.clone()).await {
                Err(QueueError::Nacked) => {
                    tracing::debug!(retry_in_ms = wait.as_millis() as u64, "publish nacked; sending it again");
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                outcome => return outcome,
            }
        }
        self.publish_once(channel, queue, body, properties).await
    }

    async fn publish_once(
        &self,
        channel: &lapin::Channel,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Published, QueueError> {
        // `mandatory` makes the broker return a message no queue takes, so a vanished reply queue
        // is noticed. Direct reply-to names are not queues: the broker returns those as
        // unroutable even when it delivers them, so they are published without it.
        let mandatory = !queue.starts_with(DIRECT_REPLY_TO);
        let options = BasicPublishOptions { mandatory, ..BasicPublishOptions::default() };
        let confirm = channel.basic_publish("".into(), queue.into(), options, body, properties).await?;
        match confirmed(confirm).await? {
            Confirmation::Ack(None) => Ok(Published::Delivered),
            Confirmation::Ack(Some(_returned)) => Ok(Published::Unroutable),
            Confirmation::Nack(_) => Err(QueueError::Nacked),
            // confirm_select ran when the channel opened, so this would be a lapin bug.
            Confirmation::NotRequested => Err(QueueError::Channel("publisher confirms are not enabled".into())),
        }
    }
}

/// The broker's answer to a publish, waited for at most [`CONFIRM_TIMEOUT`].
async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<Confirmation, QueueError> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(confirmation) => Ok(confirmation?),
        Err(_) => Err(QueueError::Unconfirmed(CONFIRM_TIMEOUT.as_secs())),
    }
}
