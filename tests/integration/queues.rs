//! Moving a broker over from the classic queues of earlier versions (`mcp-worker queues migrate`).

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mcp_worker::app::{App, Roles};
use mcp_worker::queue::QueueMigration;
use serde_json::json;

use crate::support::{Flavor, McpServer, spawn_app_from, test_settings};

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// The arguments an earlier version declared a delay or retry queue with: a classic queue.
fn classic_delay(ms: u64, jobs_queue: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(jobs_queue));
    args
}

async fn declare(channel: &Channel, name: &str, args: FieldTable) {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(name.into(), durable, args).await.unwrap();
}

async fn put(channel: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm = channel.basic_publish("".into(), queue.into(), options, body, properties).await.unwrap().await;
    assert!(matches!(confirm.unwrap(), lapin::Confirmation::Ack(None)));
}

/// How many messages `queue` holds now.
async fn count(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap().message_count()
}

#[tokio::test]
async fn a_broker_with_the_old_classic_queues_is_migrated_keeping_every_message() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // Long delays, so that no waiting message comes back by itself during the test.
    let long = [("tokens.defer_ms", json!(600_000)), ("worker.retry_delays_ms", json!([600_000]))];
    let settings = test_settings(&server.url(), &long);
    let topology = mcp_worker::app::topology(&settings);
    let connection = Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    // The broker as an earlier version left it: a quorum jobs queue, everything else classic.
    let mut jobs = FieldTable::default();
    jobs.insert("x-queue-type".into(), text("quorum"));
    jobs.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(settings.amqp.delivery_limit)));
    jobs.insert("x-dead-letter-exchange".into(), text(""));
    jobs.insert("x-dead-letter-routing-key".into(), text(&topology.dead_letter_queue));
    declare(&channel, &topology.dead_letter_queue, FieldTable::default()).await;
    declare(&channel, &topology.refresh_queue, FieldTable::default()).await;
    declare(&channel, &topology.jobs_queue, jobs).await;
    declare(&channel, &topology.delay_queue, classic_delay(600_000, &topology.jobs_queue)).await;
    for (queue, ms) in &topology.retry_queues {
        declare(&channel, queue, classic_delay(*ms, &topology.jobs_queue)).await;
    }
    let reply_queue = format!("{}.replies", topology.jobs_queue);
    let job = json!({ "job_id": "waited", "user_id": "alice", "tool": "qlik_whoami", "arguments": {} });
    let job_properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_reply_to(reply_queue.as_str().into())
        .with_correlation_id("corr-waited".into());
    put(&channel, &topology.delay_queue, &serde_json::to_vec(&job).unwrap(), job_properties).await;
    put(&channel, &topology.dead_letter_queue, b"{not json", BasicProperties::default().with_delivery_mode(2)).await;
    put(&channel, &topology.refresh_queue, br#"{"v":1}"#, BasicProperties::default().with_delivery_mode(2)).await;
    // What an earlier, interrupted run of the migration left behind.
    let holding = format!("{}.migrating", topology.dead_letter_queue);
    declare(&channel, &holding, {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args
    })
    .await;
    put(&channel, &holding, b"left by an interrupted run", BasicProperties::default()).await;

    // The new version refuses to start on it, and says what to do.
    let refused = App::build(&settings, Roles::all()).await.err().expect("the worker refuses the classic queues");
    assert!(refused.to_string().contains("mcp-worker queues migrate"), "{refused}");

    let migrated = mcp_worker::app::migrate_queues(&settings).await.expect("the migration runs");
    let outcome = |queue: &str| migrated.iter().find(|(name, _)| name == queue).map(|(_, o)| o.clone());
    assert_eq!(outcome(&topology.jobs_queue), Some(QueueMigration::Kept));
    assert_eq!(outcome(&topology.delay_queue), Some(QueueMigration::Converted { moved: 1 }));
    assert_eq!(outcome(&topology.dead_letter_queue), Some(QueueMigration::Converted { moved: 1 }));
    assert_eq!(outcome(&topology.refresh_queue), Some(QueueMigration::Converted { moved: 1 }));
    assert_eq!(count(&connection, &topology.dead_letter_queue).await, 2, "the held message went back too");
    assert_eq!(count(&connection, &topology.refresh_queue).await, 1);
    let gone = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    assert!(gone.queue_declare(holding.as_str().into(), passive, FieldTable::default()).await.is_err());

    // Repeating it changes nothing.
    let again = mcp_worker::app::migrate_queues(&settings).await.unwrap();
    assert!(again.iter().all(|(_, outcome)| *outcome == QueueMigration::Kept), "{again:?}");

    // The job waits on in the new delay queue, as it was.
    let app = spawn_app_from(settings).await;
    let waited = app.get_message(&topology.delay_queue).await.expect("the waiting job was moved");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&waited.delivery.data).unwrap(), job);
    let properties = &waited.delivery.properties;
    assert_eq!(properties.reply_to().as_ref().map(|q| q.as_str()), Some(reply_queue.as_str()));
    assert_eq!(properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-waited"));
    app.stop().await;
}
