//! The broker's ceiling on this machine: a consumer that does only the AMQP part of a job, the
//! way mcp-worker does it (manual acks, bounded prefetch, the reply published persistent with a
//! publisher confirm awaited before the ack), and nothing else: no database, no HTTP.
//!
//! With `--latencies FILE` it also keeps each job's time from delivery to ack, and on SIGTERM
//! writes them to FILE (milliseconds, one a line) and exits: the broker's own share of the
//! worker's `added_ms`, at whatever rate it is fed.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    #[arg(long)]
    latencies: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let consumer_channel = connection.create_channel().await?;
    // The same kind of queue as mcp-worker's jobs queue.
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    consumer_channel.queue_declare(args.queue.as_str().into(), durable, quorum).await?;
    consumer_channel.basic_qos(args.prefetch, BasicQosOptions::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut deliveries = consumer_channel
        .basic_consume(args.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    // Kept only when asked for, so the throughput run's ceiling pays no lock per job.
    let latencies = args.latencies.as_ref().map(|_| Arc::new(Mutex::new(Vec::<f64>::new())));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    eprintln!("ceiling: consuming {}", args.queue);
    loop {
        let delivery = tokio::select! {
            delivery = deliveries.next() => match delivery {
                Some(delivery) => delivery?,
                None => break,
            },
            _ = terminate.recv() => break,
        };
        let started = Instant::now();
        let (publisher, latencies) = (publisher.clone(), latencies.clone());
        tokio::spawn(async move {
            let Some(reply_to) = delivery.properties.reply_to().clone() else { return };
            let mut properties =
                BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
            if let Some(correlation_id) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(correlation_id.clone());
            }
            let body = br#"{"status":"ok","result":{"content":[{"type":"text","text":"ok"}]}}"#;
            let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
            let published =
                publisher.basic_publish("".into(), reply_to.as_str().into(), options, body, properties).await;
            if let Ok(confirm) = published
                && confirm.await.is_ok()
            {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                if let Some(latencies) = latencies {
                    latencies.lock().expect("never poisoned").push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
        });
    }
    if let (Some(path), Some(latencies)) = (args.latencies, latencies) {
        let lines: String = latencies.lock().expect("never poisoned").iter().map(|ms| format!("{ms}\n")).collect();
        std::fs::write(path, lines)?;
    }
    Ok(())
}
