//! The queues the worker declares at start.
//!
//! Jobs live in a durable **quorum** queue: replicated, persistent, and with a broker-enforced
//! delivery limit, so a message that keeps failing (or keeps crashing workers) is dead-lettered
//! after `delivery_limit` deliveries instead of looping forever.

use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};

use super::QueueError;

pub struct Topology {
    pub jobs_queue: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
}

impl Topology {
    pub(super) async fn declare(&self, channel: &Channel) -> Result<(), QueueError> {
        let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        let refused = |queue: &str, e: lapin::Error| {
            QueueError::Topology(format!("queue `{queue}` (does it already exist with other arguments?): {e}"))
        };

        let mut dead = FieldTable::default();
        dead.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        channel
            .queue_declare(self.dead_letter_queue.as_str().into(), durable, dead)
            .await
            .map_err(|e| refused(&self.dead_letter_queue, e))?;

        let mut jobs = FieldTable::default();
        jobs.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        jobs.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        jobs.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        jobs.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.dead_letter_queue.as_str().into()));
        channel
            .queue_declare(self.jobs_queue.as_str().into(), durable, jobs)
            .await
            .map_err(|e| refused(&self.jobs_queue, e))?;
        Ok(())
    }
}
