//! What the benchmark's binaries share: deleting a run's broker topology when it is done.

use lapin::{Connection, ConnectionProperties};
use mcp_worker::config::Settings;

/// Deletes the worker topology `settings` names (jobs, dead-letter, delay, refresh and retry
/// queues, the events exchange) and the `extra` queues. Without it every run left a dozen durable
/// queues behind, and over many runs the single local RabbitMQ node slowed until its quorum
/// queues stopped answering. Best effort per queue: one that is gone has nothing to clean.
pub async fn delete_topology(settings: &Settings, extra: &[String]) -> anyhow::Result<()> {
    let topology = mcp_worker::app::topology(settings);
    let mut queues =
        vec![topology.jobs_queue, topology.dead_letter_queue, topology.delay_queue, topology.refresh_queue];
    queues.extend(topology.retry_queues.into_iter().map(|(queue, _)| queue));
    queues.extend(extra.iter().cloned());
    let connection = Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for queue in &queues {
        let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    let _ = channel.exchange_delete(topology.events_exchange.as_str().into(), Default::default()).await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(())
}
