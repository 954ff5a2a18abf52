//! The queues and exchange the worker declares at start and on every reconnect.
//!
//! Every queue a job or a copy of it passes through is a durable **quorum** queue: replicated
//! over the cluster's nodes, so the loss of any one node loses none of them, and none lives on
//! one node only (a classic queue does, and with that node down it can neither be declared nor
//! take messages). The jobs queue also has a broker-enforced delivery limit, so a message that
//! keeps failing (or keeps crashing workers) is dead-lettered after `delivery_limit` deliveries
//! instead of looping forever.
//!
//! Jobs that wait (a token refresh, a busy claim, a database away, a retry after an unavailable
//! MCP server) sit in a delay queue whose message TTL dead-letters them back into the jobs
//! queue. With one TTL for all its messages, expiry always happens at the head, so every message
//! goes back on time; one queue per delay for the same reason. Their dead-lettering is
//! **at-least-once** (RabbitMQ ≥ 3.10: `x-dead-letter-strategy` with `x-overflow:
//! reject-publish`): a message leaves the delay queue only once the jobs queue has confirmed it.
//! The jobs queue's own dead-lettering keeps the default, at-most-once, because changing a
//! declared queue's arguments is refused; the worker dead-letters a job itself (a confirmed
//! publish) one delivery before the broker would, so the broker's path is a fallback only.
//!
//! Declaring a queue that exists already is how RabbitMQ checks it is the same queue, so every
//! reconnect declares everything again. That only ever needs a majority of the nodes. What must
//! fail is said plainly: a queue left by an older version as a classic queue asks for
//! `mcp-worker queues migrate`, see [`super::migration`].

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};

use super::QueueError;

/// How often one declaration is tried when the broker's answer says it may work a little later
/// (a quorum queue electing its leader, two nodes declaring it at once), and the first wait.
const DECLARE_ATTEMPTS: u32 = 5;
const DECLARE_FIRST_WAIT: Duration = Duration::from_millis(250);

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

/// The arguments of a plain quorum queue.
pub(super) fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

impl Topology {
    /// Every queue with the arguments it is declared with, in declaration order: a queue that
    /// another one dead-letters into comes first.
    pub(super) fn queues(&self) -> Vec<(String, FieldTable)> {
        let mut jobs = quorum();
        jobs.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        jobs.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        jobs.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.dead_letter_queue.as_str().into()));
        let delay = |ms: u64| {
            let mut args = self.back_to_jobs_after(ms);
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
            args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
            args
        };
        let mut queues = vec![
            (self.dead_letter_queue.clone(), quorum()),
            (self.refresh_queue.clone(), quorum()),
            (self.jobs_queue.clone(), jobs),
            (self.delay_queue.clone(), delay(self.delay_ms)),
        ];
        queues.extend(self.retry_queues.iter().map(|(queue, ms)| (queue.clone(), delay(*ms))));
        queues
    }

    /// The queues versions before the cluster work declared as classic queues, with the
    /// arguments they gave them: how `queues migrate` recognises one to replace.
    pub(super) fn earlier_classic_queues(&self) -> Vec<(String, FieldTable)> {
        let mut queues = vec![
            (self.dead_letter_queue.clone(), FieldTable::default()),
            (self.refresh_queue.clone(), FieldTable::default()),
            (self.delay_queue.clone(), self.back_to_jobs_after(self.delay_ms)),
        ];
        queues.extend(self.retry_queues.iter().map(|(queue, ms)| (queue.clone(), self.back_to_jobs_after(*ms))));
        queues
    }

    /// A delay queue's arguments of every version: its messages expire after `ms` and are
    /// dead-lettered back into the jobs queue.
    fn back_to_jobs_after(&self, ms: u64) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(self.jobs_queue.as_str().into()));
        args
    }

    pub(super) async fn declare(&self, connection: &Connection) -> Result<(), QueueError> {
        for (name, args) in self.queues() {
            declare_queue(connection, &name, args).await.map_err(|refusal| refusal.into_error(&name))?;
        }
        let channel = connection.create_channel().await?;
        let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel
            .exchange_declare(self.events_exchange.as_str().into(), ExchangeKind::Topic, options, FieldTable::default())
            .await
            .map_err(|e| QueueError::Topology(format!("exchange `{}`: {e}", self.events_exchange)))?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }
}

/// Declares one durable queue, each attempt on a channel of its own (a refused declaration
/// closes its channel), trying again while the refusal may be passing.
pub(super) async fn declare_queue(connection: &Connection, name: &str, args: FieldTable) -> Result<(), Refusal> {
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut wait = DECLARE_FIRST_WAIT;
    let mut attempt = 1;
    loop {
        let declared = match connection.create_channel().await {
            Ok(channel) => match channel.queue_declare(name.into(), durable, args.clone()).await {
                Ok(_) => {
                    let _ = channel.close(200, "declared".into()).await;
                    Ok(())
                }
                Err(e) => Err(Refusal::of(&e)),
            },
            Err(e) => Err(Refusal::of(&e)),
        };
        match declared {
            Ok(()) => return Ok(()),
            Err(refusal) if refusal.is_final() || attempt >= DECLARE_ATTEMPTS => return Err(refusal),
            Err(refusal) => {
                tracing::warn!(queue = name, attempt, refusal = ?refusal, "declaring a queue failed; trying again");
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
                attempt += 1;
            }
        }
    }
}

/// Why RabbitMQ refused a declaration, as far as it matters to what we do and say next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The queue exists as a classic queue (an older version of this service made it).
    Classic(String),
    /// No such queue (to a passive declaration).
    NotFound(String),
    /// The queue exists with other arguments.
    OtherArguments(String),
    /// A classic queue whose one node is down.
    HomeNodeDown(String),
    /// Anything else: a node or leader busy, a lost connection. Worth another try.
    Passing(String),
}

impl Refusal {
    pub(super) fn of(error: &lapin::Error) -> Self {
        let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else { return Refusal::Passing(error.to_string()) };
        let text = amqp.get_message().as_str().to_owned();
        Self::from_reply(amqp.kind(), text)
    }

    fn from_reply(kind: &AMQPErrorKind, text: String) -> Self {
        match kind {
            // "inequivalent arg 'x-queue-type' … received the value 'quorum' … but current is none"
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                if text.contains("'x-queue-type'")
                    && (text.contains("current is none") || text.contains("current is the value 'classic'")) =>
            {
                Refusal::Classic(text)
            }
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => Refusal::OtherArguments(text),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) if text.contains("home node") => Refusal::HomeNodeDown(text),
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => Refusal::NotFound(text),
            _ => Refusal::Passing(text),
        }
    }

    fn is_final(&self) -> bool {
        !matches!(self, Refusal::Passing(_))
    }

    pub(super) fn into_error(self, queue: &str) -> QueueError {
        QueueError::Topology(self.explain(queue))
    }

    fn explain(&self, queue: &str) -> String {
        match self {
            Refusal::Classic(text) => format!(
                "queue `{queue}` exists with another queue type, most likely as a classic queue left by \
                 an earlier version; run `mcp-worker queues migrate` once (README, Deploying) ({text})"
            ),
            Refusal::OtherArguments(text) => format!(
                "queue `{queue}` exists with other arguments than this configuration gives it (if an \
                 earlier version declared it, `mcp-worker queues migrate` replaces it; README, \
                 Deploying); the broker says: {text}"
            ),
            Refusal::HomeNodeDown(text) => format!(
                "queue `{queue}` is a classic queue whose only node is down, left by an earlier \
                 version; once that node is back, run `mcp-worker queues migrate` ({text})"
            ),
            Refusal::NotFound(text) => format!("queue `{queue}` does not exist: {text}"),
            Refusal::Passing(text) => format!("queue `{queue}` could not be declared: {text}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology {
            jobs_queue: "jobs".into(),
            dead_letter_queue: "jobs.dead".into(),
            delivery_limit: 5,
            delay_queue: "jobs.delay.2000ms".into(),
            delay_ms: 2000,
            retry_queues: vec![("jobs.retry.1000ms".into(), 1000)],
            refresh_queue: "refresh".into(),
            events_exchange: "events".into(),
        }
    }

    #[test]
    fn every_queue_is_a_quorum_queue_and_every_delay_dead_letters_at_least_once() {
        let queues = topology().queues();
        assert_eq!(queues.len(), 5);
        for (name, args) in &queues {
            let args = args.inner();
            assert_eq!(args.get("x-queue-type"), Some(&AMQPValue::LongString("quorum".into())), "{name}");
            if args.contains_key("x-message-ttl") {
                assert_eq!(args.get("x-dead-letter-strategy"), Some(&AMQPValue::LongString("at-least-once".into())));
                assert_eq!(args.get("x-overflow"), Some(&AMQPValue::LongString("reject-publish".into())));
                assert_eq!(args.get("x-dead-letter-routing-key"), Some(&AMQPValue::LongString("jobs".into())));
            }
        }
        let names: Vec<&str> = queues.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["jobs.dead", "refresh", "jobs", "jobs.delay.2000ms", "jobs.retry.1000ms"]);
    }

    #[test]
    fn a_refusal_says_what_to_do() {
        let precondition = AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED);
        let classic = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': \
                       received the value 'quorum' of type 'longstr' but current is none";
        let refusal = Refusal::from_reply(&precondition, classic.into());
        assert!(refusal.is_final());
        assert!(refusal.explain("q").contains("mcp-worker queues migrate"), "{}", refusal.explain("q"));

        let stream = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': \
                      received the value 'quorum' of type 'longstr' but current is the value 'stream'";
        assert_eq!(Refusal::from_reply(&precondition, stream.into()), Refusal::OtherArguments(stream.into()));

        let ttl = "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q'";
        assert_eq!(Refusal::from_reply(&precondition, ttl.into()), Refusal::OtherArguments(ttl.into()));

        let not_found = AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND);
        let down =
            "NOT_FOUND - home node 'rabbit1@localhost' of durable queue 'q' in vhost '/' is down or inaccessible";
        assert!(Refusal::from_reply(&not_found, down.into()).explain("q").contains("only node is down"));

        let busy = Refusal::from_reply(&AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED), "locked".into());
        assert!(!busy.is_final());
    }
}
