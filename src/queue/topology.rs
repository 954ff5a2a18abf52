//! The queues and exchange the worker declares at start.
//!
//! Jobs live in a durable **quorum** queue: replicated, persistent, and with a broker-enforced
//! delivery limit, so a message that keeps failing (or keeps crashing workers) is dead-lettered
//! after `delivery_limit` deliveries instead of looping forever. Jobs waiting for a token refresh
//! sit in a delay queue whose message TTL dead-letters them back into the jobs queue. The other
//! queues are durable classic queues: they need no delivery limit, and every quorum queue is a
//! Raft group of its own, which RabbitMQ advises against creating more of than needed.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::QueueError;

pub struct Topology {
    pub jobs_queue: String,
    pub dead_letter_queue: String,
    pub(crate) delivery_limit: u32,
    pub delay_queue: String,
    pub(crate) delay_ms: u64,
    /// Queues a job waits in before a retry, with their delays in milliseconds.
    pub retry_queues: Vec<(String, u64)>,
    pub refresh_queue: String,
    pub events_exchange: String,
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

impl Topology {
    pub(super) async fn declare(&self, channel: &Channel) -> Result<(), QueueError> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let refused = |name: &str, e: lapin::Error| {
            QueueError::Topology(format!("`{name}` (does it already exist with other arguments?): {e}"))
        };
        let declare = |name: &str, args: FieldTable| {
            let name = name.to_owned();
            async move { channel.queue_declare(name.as_str().into(), durable, args).await.map_err(|e| refused(&name, e)) }
        };

        declare(&self.dead_letter_queue, FieldTable::default()).await?;
        declare(&self.refresh_queue, FieldTable::default()).await?;

        let mut jobs = quorum();
        jobs.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        jobs.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        jobs.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.dead_letter_queue.as_str().into()));
        declare(&self.jobs_queue, jobs).await?;

        // Classic queues: with one TTL for all its messages, expiry always happens at the head, so
        // every message goes back on time. One queue per delay, for the same reason.
        let delay = |ms: u64| {
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)));
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.jobs_queue.as_str().into()));
            args
        };
        declare(&self.delay_queue, delay(self.delay_ms)).await?;
        for (queue, ms) in &self.retry_queues {
            declare(queue, delay(*ms)).await?;
        }

        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel
            .exchange_declare(self.events_exchange.as_str().into(), ExchangeKind::Topic, options, FieldTable::default())
            .await
            .map_err(|e| refused(&self.events_exchange, e))?;
        Ok(())
    }
}
