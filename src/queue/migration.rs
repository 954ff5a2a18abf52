//! `mcp-worker queues migrate`: moves a broker over from the classic queues of earlier versions.
//!
//! Versions before the cluster work declared the delay, retry, dead-letter and refresh queues as
//! classic queues, which live on one node. A queue's type cannot be changed in place, and the
//! names stay (the jobs queue dead-letters into the dead-letter queue by name, and a quorum
//! queue's arguments cannot change either), so each classic queue is replaced under its own name:
//!
//! 1. its messages are moved into a quorum queue `<name>.migrating`, one at a time, each acked in
//!    the old queue only once the broker confirmed its copy;
//! 2. the old queue is deleted if it is empty (more messages may have come meanwhile: then back to 1);
//! 3. the queue is declared again, now as a quorum queue with the current arguments;
//! 4. the messages move back from `<name>.migrating`, which is then deleted.
//!
//! Nothing is lost if it stops half-way: run again, it goes on from where it stopped (a
//! `.migrating` queue left behind is emptied into its queue). A message is copied before it is
//! acked, so a crash between the two leaves a copy in each: a job then comes back twice, which
//! the worker's job_id claim turns into one run. A moved message waits its delay again from the
//! start. Workers of the older version must be stopped first: they would declare the classic
//! queues again.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection};

use super::topology::{Refusal, declare_queue, quorum};
use super::{Broker, QueueError, Topology};

/// How often one queue's emptying and deletion is tried while messages keep coming into it.
const DELETE_ATTEMPTS: u32 = 5;

/// What the migration did with one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueMigration {
    /// It did not exist; it is declared now.
    Created,
    /// It was a quorum queue already.
    Kept,
    /// It was a classic queue; it is a quorum queue now, with its `moved` messages.
    Converted { moved: u64 },
}

impl std::fmt::Display for QueueMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueMigration::Created => write!(f, "created (quorum)"),
            QueueMigration::Kept => write!(f, "quorum already"),
            QueueMigration::Converted { moved } => {
                write!(f, "converted from classic to quorum, {moved} messages moved")
            }
        }
    }
}

impl Broker {
    /// Makes every queue of `topology` a quorum queue with the current arguments, keeping the
    /// messages of any classic queue it replaces. Safe to repeat.
    #[tracing::instrument(skip_all)]
    pub async fn migrate_queues(&self, topology: &Topology) -> Result<Vec<(String, QueueMigration)>, QueueError> {
        let connection = self.connection();
        let mut done = Vec::new();
        let earlier = topology.earlier_classic_queues();
        for (name, args) in topology.queues() {
            let classic = earlier.iter().find(|(queue, _)| *queue == name).map(|(_, args)| args.clone());
            let outcome = migrate_queue(&connection, &name, args, classic).await?;
            tracing::info!(queue = %name, outcome = %outcome, "queue migrated");
            done.push((name, outcome));
        }
        Ok(done)
    }
}

/// Migrates queue `name` to `args`; `classic` holds the arguments an earlier version declared it
/// with, if it declared it as a classic queue.
async fn migrate_queue(
    connection: &Connection,
    name: &str,
    args: FieldTable,
    classic: Option<FieldTable>,
) -> Result<QueueMigration, QueueError> {
    let holding = format!("{name}.migrating");
    if holding.len() > 255 {
        return Err(QueueError::Topology(format!("queue `{name}` is too long a name to migrate")));
    }
    let existed = exists(connection, name).await?;
    let outcome = match declare_queue(connection, name, args.clone()).await {
        Ok(()) if existed => QueueMigration::Kept,
        Ok(()) => QueueMigration::Created,
        // RabbitMQ names the first argument that differs, which need not be the queue type, so
        // a queue is taken for an earlier version's only if it is exactly what that declared.
        Err(refusal) if is_declared_as(connection, name, classic.as_ref()).await => {
            tracing::info!(queue = name, refusal = ?refusal, "replacing an earlier version's classic queue");
            declare_queue(connection, &holding, quorum()).await.map_err(|r| r.into_error(&holding))?;
            let mut moved = 0;
            let mut attempt = 1;
            loop {
                moved += move_messages(connection, name, &holding).await?;
                match delete_if_empty(connection, name).await {
                    Ok(()) => break,
                    Err(e) if attempt >= DELETE_ATTEMPTS => return Err(e),
                    Err(_) => attempt += 1,
                }
            }
            declare_queue(connection, name, args).await.map_err(|r| r.into_error(name))?;
            QueueMigration::Converted { moved }
        }
        Err(refusal) => return Err(refusal.into_error(name)),
    };
    // Also after an earlier run that stopped between steps 1 and 4.
    if exists(connection, &holding).await? {
        move_messages(connection, &holding, name).await?;
        let channel = connection.create_channel().await?;
        channel.queue_delete(holding.as_str().into(), QueueDeleteOptions::default()).await?;
        let _ = channel.close(200, "migrated".into()).await;
    }
    Ok(outcome)
}

/// Whether a queue of this name exists (a passive declaration, on a channel of its own since a
/// missing queue closes it).
async fn exists(connection: &Connection, name: &str) -> Result<bool, QueueError> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    match channel.queue_declare(name.into(), passive, FieldTable::default()).await {
        Ok(_) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) => match Refusal::of(&e) {
            Refusal::NotFound(_) => Ok(false),
            refusal => Err(refusal.into_error(name)),
        },
    }
}

/// Whether declaring `name` with `args` succeeds, i.e. the queue exists with exactly those.
async fn is_declared_as(connection: &Connection, name: &str, args: Option<&FieldTable>) -> bool {
    let Some(args) = args else { return false };
    declare_queue(connection, name, args.clone()).await.is_ok()
}

/// Moves every message of `from` into `to`: each one is acked in `from` only once the broker
/// confirmed its copy in `to`. Returns how many moved.
async fn move_messages(connection: &Connection, from: &str, to: &str) -> Result<u64, QueueError> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut moved = 0;
    while let Some(message) = channel.basic_get(from.into(), BasicGetOptions { no_ack: false }).await? {
        let delivery = message.delivery;
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let confirm = channel
            .basic_publish("".into(), to.into(), options, &delivery.data, delivery.properties.clone())
            .await?
            .await?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            return Err(QueueError::Topology(format!("the broker did not take a message moved to `{to}`")));
        }
        delivery.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    let _ = channel.close(200, "moved".into()).await;
    Ok(moved)
}

async fn delete_if_empty(connection: &Connection, name: &str) -> Result<(), QueueError> {
    let channel = connection.create_channel().await?;
    let options = QueueDeleteOptions { if_empty: true, ..QueueDeleteOptions::default() };
    channel
        .queue_delete(name.into(), options)
        .await
        .map_err(|e| QueueError::Topology(format!("queue `{name}` was not empty when deleted: {e}")))?;
    let _ = channel.close(200, "deleted".into()).await;
    Ok(())
}
