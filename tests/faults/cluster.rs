//! Faults of one node of a real 3-node RabbitMQ cluster (`scripts/services cluster-up`), under
//! 2000 jobs each: jobs that run once, jobs retried after their MCP server failed, jobs that
//! wait in the delay queue for a token (and ask the refresh queue for it), and poison jobs that
//! are dead-lettered. Two worker processes get every node's address.
//!
//! Each fault: every job answered (or dead-lettered with its reason), none run twice, none lost,
//! and a worker whose node died consumes again from another node within 15 s.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::rig::Rig;
use crate::support::{Flavor, McpServer, repo, wait_until};

const COUNTED: usize = 1700;
const FLAKY: usize = 100;
const WAITING: usize = 150;
const POISON: usize = 50;
/// How long a worker whose node died may take to consume again from another.
const RECONNECT_WITHIN: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9 the node leading the jobs queue.
    KillJobsLeader,
    /// kill -9 the node a worker is connected to.
    KillWorkerNode,
    /// `stop_app` a worker's node for 10 s.
    StopAppTenSeconds,
    /// kill -9 the node the first worker declared the topology on, while jobs wait.
    KillFirstDeclarer,
}

fn services(args: &[&str]) -> String {
    let output = Command::new(repo().join("scripts/services")).args(args).output().expect("scripts/services runs");
    assert!(output.status.success(), "scripts/services {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn node_name(node: usize) -> String {
    format!("rabbit{node}@localhost")
}

fn node_of(name: &str) -> usize {
    name.trim_start_matches("rabbit").split('@').next().and_then(|n| n.parse().ok()).expect("a rabbitN@localhost name")
}

/// `rabbitmqctl -n rabbit<via>@localhost <args> --formatter json`, parsed.
fn ctl(via: usize, args: &[&str]) -> Vec<Value> {
    try_ctl(via, args).unwrap_or_else(|error| panic!("rabbitmqctl {args:?}: {error}"))
}

/// [`ctl`], with its failure as a value: while a member is down, a cluster-wide listing can
/// fail on the live node too (RabbitMQ 3.10 answers `{badrpc, nodedown}` for the lost member).
fn try_ctl(via: usize, args: &[&str]) -> Result<Vec<Value>, String> {
    let output = Command::new("rabbitmqctl")
        .args(["-n", &node_name(via), "-q"])
        .args(args)
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl runs");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).unwrap_or_default())
}

/// The node each worker connection is on (one connection per worker process), asked of `via`.
fn worker_nodes(via: usize) -> Vec<usize> {
    try_worker_nodes(via).unwrap_or_else(|error| panic!("listing the worker connections: {error}"))
}

fn try_worker_nodes(via: usize) -> Result<Vec<usize>, String> {
    let connections = try_ctl(via, &["list_connections", "port", "client_properties"])?;
    let mut nodes: Vec<usize> = connections
        .iter()
        .filter(|c| c["client_properties"].to_string().contains("\"mcp-worker\""))
        .filter_map(|c| c["port"].as_u64())
        .map(|port| port as usize - 5700)
        .collect();
    nodes.sort_unstable();
    Ok(nodes)
}

fn leader_of(queue: &str, via: usize) -> usize {
    let queues = ctl(via, &["list_queues", "name", "leader"]);
    let leader = queues.iter().find(|q| q["name"] == queue).and_then(|q| q["leader"].as_str()).expect("a leader");
    node_of(leader)
}

fn other_than(node: usize) -> usize {
    if node == 1 { 2 } else { 1 }
}

/// Stops the cluster when dropped, so a failing fault does not leave three nodes holding the
/// cluster's ports for the next run (which then cannot start its own).
struct ClusterUp;

impl Drop for ClusterUp {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/services")).arg("cluster-down").output();
    }
}

/// Starts the cluster, runs every fault in turn (the struck node is back before the next), and
/// stops the cluster, also when a fault fails.
pub async fn run_all() {
    let _cluster = ClusterUp;
    services(&["cluster-up"]);
    for fault in [Fault::KillJobsLeader, Fault::KillWorkerNode, Fault::StopAppTenSeconds, Fault::KillFirstDeclarer] {
        run(fault).await;
    }
}

/// Waits until two worker connections are up again, none on `dead`; returns how long that took.
/// A listing that fails while `dead` is down counts as "not yet".
async fn workers_back(dead: usize, since: Instant) -> Duration {
    let via = other_than(dead);
    wait_until("both workers connected again, on live nodes", || async {
        let nodes = tokio::task::spawn_blocking(move || try_worker_nodes(via)).await.unwrap();
        nodes.is_ok_and(|nodes| nodes.len() == 2 && !nodes.contains(&dead))
    })
    .await;
    since.elapsed()
}

async fn run(fault: Fault) {
    let ports: Vec<String> = services(&["cluster-ports"]).split_whitespace().map(str::to_owned).collect();
    let urls: Vec<String> = ports.iter().map(|port| format!("amqp://guest:guest@127.0.0.1:{port}/%2f")).collect();
    let server = McpServer::spawn(Flavor::V1Json).await;
    let overrides = [
        ("amqp.url", json!(urls[0])),
        ("amqp.urls", json!(urls)),
        ("mcp.call_timeout_ms", json!(2000)),
        ("tokens.clock_skew_secs", json!(1)),
        ("tokens.defer_ms", json!(500)),
        // Waiting jobs wait about 10 s in all, across the fault.
        ("tokens.max_deferrals", json!(20)),
        // Two workers at 8: the load the single-node fault tests put on the Python MCP server.
        ("worker.concurrency", json!(8)),
        ("worker.retry_delays_ms", json!([500, 1000])),
        ("worker.retry_jitter_percent", json!(0)),
        ("mcp.servers.faulty", json!({ "url": server.url(), "tools": ["flaky"], "auth": { "provider": "qlik" } })),
    ];
    let mut rig = Rig::new(server, &overrides, &[]).await;
    rig.connect_user("alice").await;
    // Bob's token is too close to its end for any call: his jobs wait for a refresh that no
    // refresher makes, then are answered `token_unavailable`.
    rig.connect_user_until("bob", chrono::Utc::now() + chrono::Duration::seconds(1)).await;

    let first = rig.start_worker("worker").await;
    rig.wait_ready(first).await;
    let first_declarer = worker_nodes(1)[0];
    let second = rig.start_worker("worker").await;
    rig.wait_ready(second).await;

    let mut jobs: Vec<(String, Vec<u8>)> = Vec::new();
    let job = |job_id: &str, user: &str, tool: &str, arguments: Value| {
        let body = json!({ "job_id": job_id, "user_id": user, "tool": tool, "arguments": arguments });
        (job_id.to_owned(), serde_json::to_vec(&body).unwrap())
    };
    for i in 0..COUNTED {
        let id = format!("job-{i}");
        jobs.push(job(&id, "alice", "count_job", json!({ "job_id": id })));
        // The other kinds spread among the counted jobs, so each is in flight at the fault.
        if i % (COUNTED / FLAKY) == 0 && i / (COUNTED / FLAKY) < FLAKY {
            let id = format!("flaky-{}", i / (COUNTED / FLAKY));
            jobs.push(job(&id, "alice", "flaky", json!({ "job_id": id, "mode": "500", "times": 1 })));
        }
        if i % (COUNTED / WAITING) == 0 && i / (COUNTED / WAITING) < WAITING {
            let id = format!("waiting-{}", i / (COUNTED / WAITING));
            jobs.push(job(&id, "bob", "qlik_whoami", json!({})));
        }
        if i % (COUNTED / POISON) == 0 && i / (COUNTED / POISON) < POISON {
            jobs.push((format!("poison-{}", i / (COUNTED / POISON)), b"{not json".to_vec()));
        }
    }
    let expected: BTreeSet<String> = jobs.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(expected.len(), COUNTED + FLAKY + WAITING + POISON);
    rig.publish_bodies(jobs).await;
    wait_until("a quarter of the jobs ran", || async { rig.server.tool_calls().len() >= COUNTED / 4 }).await;

    let before = worker_nodes(1);
    let victim = match fault {
        Fault::KillJobsLeader => leader_of(&rig.settings.amqp.jobs_queue, 1),
        Fault::KillWorkerNode | Fault::StopAppTenSeconds => before[0],
        Fault::KillFirstDeclarer => first_declarer,
    };
    eprintln!("{fault:?}: striking rabbit{victim}; worker connections on nodes {before:?}");
    let struck = Instant::now();
    let strike = tokio::task::spawn_blocking(move || match fault {
        Fault::StopAppTenSeconds => services(&["cluster-stop-app", &victim.to_string(), "10"]),
        _ => services(&["cluster-kill", &victim.to_string()]),
    });
    if before.contains(&victim) {
        let back = workers_back(victim, struck).await;
        eprintln!("{fault:?}: both workers consuming again after {back:?}");
        assert!(back <= RECONNECT_WITHIN, "{fault:?}: the workers were consuming again after {back:?}");
    }
    strike.await.unwrap();
    if !matches!(fault, Fault::StopAppTenSeconds) {
        services(&["cluster-start", &victim.to_string()]);
    }

    let until = Instant::now() + Duration::from_secs(240);
    while rig.replies.len() < expected.len() && Instant::now() < until {
        if rig.read_replies().await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing: Vec<&String> = expected.iter().filter(|id| !rig.replies.contains_key(*id)).collect();
    if !missing.is_empty() {
        for id in missing.iter().take(5) {
            eprintln!("{fault:?}: {id} has no reply; the workers logged:");
            for line in rig.log_lines(&format!("\"{id}\"")) {
                eprintln!("  {line}");
            }
        }
        panic!("{fault:?}: {} jobs have no reply: {missing:?}", missing.len());
    }
    let answered: BTreeSet<String> = rig.replies.keys().cloned().collect();
    assert_eq!(answered, expected, "{fault:?}: every job answered, no other");
    let executions = rig.executions();
    for (job_id, replies) in &rig.replies {
        let first = &replies[0];
        assert!(replies.iter().all(|r| r == first), "{fault:?} {job_id}: duplicate replies differ: {replies:?}");
        let ran = executions.get(job_id).copied().unwrap_or(0);
        let (status, code, runs) = match job_id.split('-').next().unwrap() {
            "job" => ("ok", Value::Null, 1),
            "flaky" => ("ok", Value::Null, 2),
            "waiting" => ("error", json!("token_unavailable"), 0),
            _ => ("error", json!("invalid_job"), 0),
        };
        assert_eq!(first["status"], status, "{fault:?} {job_id}: {first}");
        assert_eq!(first["error"]["code"], code, "{fault:?} {job_id}: {first}");
        assert_eq!(ran, runs, "{fault:?} {job_id}: the tool ran {ran} times (a failure and a retry count 2)");
    }
    let dead: BTreeSet<String> = rig.dead_lettered().await.into_iter().collect();
    let poison: BTreeSet<String> = expected.iter().filter(|id| id.starts_with("poison-")).cloned().collect();
    assert_eq!(dead, poison, "{fault:?}: the poison jobs, and only they, are dead-lettered");
    let duplicates: usize = rig.replies.values().map(|r| r.len() - 1).sum();
    eprintln!("{fault:?}: {} jobs answered, {duplicates} duplicate replies", expected.len());
    rig.finish().await;
}
