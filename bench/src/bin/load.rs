//! Load for the benchmark: publishes jobs to a queue and collects their replies.
//!
//! Without `--rate` every job is published at once (the queue fills up) and the throughput is
//! taken from the first reply to the last, so it measures the consumer, not the publisher. With
//! `--rate` jobs are published at that pace and the end-to-end latency is what matters. Prints
//! one JSON object: jobs, seconds, jobs_per_s and end-to-end latency percentiles in ms.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp: String,
    /// The jobs queue (it must exist: the consumer under test declares it).
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Jobs go to users `user-0` … `user-<users-1>` in turn.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    #[arg(long, default_value = "qlik_bench")]
    tool: String,
    /// Jobs per second; all at once when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Give up waiting for replies after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let connection = Connection::connect(&args.amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let exclusive = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
    let replies = channel.queue_declare("".into(), exclusive, FieldTable::default()).await?;
    let reply_queue = replies.name().as_str().to_owned();
    let no_ack = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut consumer =
        channel.basic_consume(reply_queue.as_str().into(), "".into(), no_ack, FieldTable::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;

    let run = uuid::Uuid::new_v4().simple().to_string();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let publishing = {
        let (args_jobs, users, tool, rate, queue) =
            (args.jobs, args.users, args.tool.clone(), args.rate, args.queue.clone());
        tokio::spawn(async move {
            let mut confirms = FuturesUnordered::new();
            let started = Instant::now();
            for i in 0..args_jobs {
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let job = json!({ "job_id": format!("{run}-{i}"), "user_id": format!("user-{}", i % users), "tool": tool, "arguments": {} });
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_correlation_id(i.to_string().into())
                    .with_reply_to(reply_queue.as_str().into());
                let body = serde_json::to_vec(&job).expect("a job serializes");
                let _ = sent_tx.send((i, Instant::now()));
                let confirm = publisher
                    .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, properties)
                    .await
                    .expect("the publish is sent");
                confirms.push(confirm);
                // Keep the confirms from piling up without bound.
                while confirms.len() > 2048 {
                    confirms.next().await.expect("not empty").expect("the broker confirms");
                }
            }
            while let Some(confirm) = confirms.next().await {
                confirm.expect("the broker confirms");
            }
        })
    };

    let mut sent: HashMap<usize, Instant> = HashMap::with_capacity(args.jobs);
    let mut latencies = Vec::with_capacity(args.jobs);
    let (mut first, mut last, mut first_sent) = (None, None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut ok = 0usize;
    while latencies.len() < args.jobs {
        let reply = tokio::select! {
            reply = consumer.next() => reply,
            _ = tokio::time::sleep_until(deadline) => anyhow::bail!("only {} of {} replies in {} s", latencies.len(), args.jobs, args.timeout),
        };
        let reply = reply.ok_or_else(|| anyhow::anyhow!("the reply consumer ended"))??;
        let now = Instant::now();
        while let Ok((i, at)) = sent_rx.try_recv() {
            first_sent.get_or_insert(at);
            sent.insert(i, at);
        }
        let index: usize =
            reply.properties.correlation_id().as_ref().and_then(|c| c.as_str().parse().ok()).unwrap_or(usize::MAX);
        if let Some(at) = sent.remove(&index) {
            // Replies are counted whatever they say; how many said "ok" is printed apart.
            let status = serde_json::from_slice::<serde_json::Value>(&reply.data).ok().map(|r| r["status"].clone());
            ok += usize::from(status.is_some_and(|status| status == "ok"));
            latencies.push(now - at);
            first.get_or_insert(now);
            last = Some(now);
        }
    }
    publishing.await?;
    let seconds = match (first, last) {
        (Some(first), Some(last)) if args.rate.is_none() => (last - first).as_secs_f64(),
        (Some(_), Some(last)) => (last - first_sent.unwrap_or(last)).as_secs_f64(),
        _ => 0.0,
    };
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
    let jobs_per_s = if seconds > 0.0 { (args.jobs - 1) as f64 / seconds } else { 0.0 };
    println!(
        "{}",
        json!({
            "jobs": args.jobs, "ok": ok, "seconds": seconds, "jobs_per_s": jobs_per_s, "cpu_ticks": cpu_ticks(),
            "latency_ms": { "p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99), "max": percentile(1.0) },
        })
    );
    Ok(())
}

/// The CPU this process has used, user and system, in clock ticks (`/proc/self/stat`): the load's
/// own share of the machine, which `bench/run` sets beside the consumer's. 0 where unreadable.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses: utime and stime are the 12th
    // and 13th of them.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_name.split_whitespace().skip(11).take(2).filter_map(|n| n.parse::<u64>().ok()).sum()
}
