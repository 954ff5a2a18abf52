//! Fault tests: real RabbitMQ, SecantusDB and the Python SDK's MCP server, with faults injected
//! into each while jobs run: a broker restart, a worker killed with SIGKILL, a database failpoint,
//! and MCP servers that fail in the ways networks do. Every scenario runs `mcp-worker` processes
//! at debug log level and ends by checking that no secret reached those logs.
//!
//! A broker restart or a failpoint hits everything connected, so these tests run one at a time
//! (and, being their own test binary, never alongside the integration suite).

#![allow(clippy::await_holding_lock)]

// The integration suite's helpers; this binary uses some of them.
#[allow(dead_code, unused_imports)]
#[path = "../integration/support/mod.rs"]
mod support;

mod cluster;
mod rig;

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};

use rig::Rig;
use support::{Flavor, McpServer, repo, wait_until};

static SERIAL: Mutex<()> = Mutex::new(());

/// Held for a whole test. Each `#[tokio::test]` runs on its own single-threaded runtime, so a
/// std guard held across its awaits blocks only the other tests' threads, which is the point.
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const JOBS: usize = 2000;

/// Settings that make recovery quick: a dead worker's claims lapse within seconds, and jobs that
/// wait come back after half a second.
fn quick() -> Vec<(&'static str, Value)> {
    vec![
        ("mcp.call_timeout_ms", json!(2000)),
        ("tokens.clock_skew_secs", json!(1)),
        ("tokens.defer_ms", json!(500)),
        ("worker.concurrency", json!(16)),
    ]
}

async fn wait_for_executions(rig: &Rig, at_least: usize) {
    wait_until(&format!("{at_least} tools ran"), || async { rig.server.tool_calls().len() >= at_least }).await;
}

/// A rig with one worker busy on `JOBS` jobs, a quarter of them run: the moment to strike.
/// Returns the rig and the worker's index.
async fn rig_under_load() -> (Rig, usize) {
    let mut rig = Rig::new(McpServer::spawn(Flavor::V1Json).await, &quick(), &[]).await;
    let worker = rig.start_worker("worker").await;
    rig.wait_ready(worker).await;
    rig.publish_count_jobs(JOBS).await;
    wait_for_executions(&rig, JOBS / 4).await;
    (rig, worker)
}

#[tokio::test]
async fn a_broker_restart_during_2000_jobs_loses_none_and_runs_each_once() {
    let _serial = serial();
    let (mut rig, worker) = rig_under_load().await;

    let restart = std::process::Command::new(repo().join("scripts/services")).args(["restart-broker", "3"]).status();
    assert!(restart.unwrap().success(), "scripts/services restart-broker failed");
    assert!(rig.server.tool_calls().len() < JOBS, "the restart came after every job had run");

    rig.collect_replies(JOBS, Duration::from_secs(300)).await;
    rig.assert_each_answered_and_run_once(JOBS);
    let duplicates: usize = rig.replies.values().map(|r| r.len() - 1).sum();
    eprintln!("{duplicates} replies were delivered twice (the same recorded reply)");
    assert!(rig.logged(worker, "reconnected to RabbitMQ"), "the worker reconnected rather than restarted");
    let metrics = rig.metrics(worker).await;
    let reconnects = metrics.lines().find_map(|l| l.strip_prefix("mcp_worker_broker_reconnects_total "));
    assert!(reconnects.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n >= 1), "{metrics}");
    rig.finish().await;
}

#[tokio::test]
async fn a_worker_killed_during_2000_jobs_is_replaced_and_no_confirmed_job_runs_again() {
    let _serial = serial();
    let (mut rig, first) = rig_under_load().await;

    rig.kill_worker(first);
    // Every reply in the queue now was confirmed before the kill: the worker cannot publish more.
    rig.read_replies().await.unwrap();
    let confirmed: BTreeSet<String> = rig.replies.keys().cloned().collect();
    assert!(confirmed.len() < JOBS, "the kill came after every job was answered");

    let second = rig.start_worker("worker").await;
    rig.wait_ready(second).await;
    rig.collect_replies(JOBS, Duration::from_secs(300)).await;

    let executions = rig.executions();
    assert_eq!(executions.len(), JOBS, "every job ran");
    for job_id in &confirmed {
        assert_eq!(executions[job_id], 1, "{job_id} was answered before the kill and ran again");
    }
    // Only a job cut off mid-call (its result not yet recorded) may have run a second time, and
    // at most `worker.concurrency` were in flight.
    let again: Vec<_> = executions.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!("{} jobs answered before the kill; {} ran a second time", confirmed.len(), again.len());
    assert!(again.len() <= 16 && again.iter().all(|(_, n)| **n == 2), "ran again: {again:?}");
    for (job_id, replies) in &rig.replies {
        assert!(replies.iter().all(|r| r["status"] == "ok"), "{job_id}: {replies:?}");
    }
    rig.finish().await;
}

#[tokio::test]
async fn a_database_failing_for_10_s_under_load_loses_no_job_and_readiness_says_so() {
    let _serial = serial();
    let app_name = format!("faults-{}", uuid::Uuid::new_v4().simple());
    let settings = support::test_settings("http://127.0.0.1:9/mcp", &[]);
    let uri = format!("{}&appName={app_name}", settings.mongodb.uri.expose());
    let port = McpServer::reserve_port();
    let extra = [("mongodb.uri", json!(uri)), ("http.listen", json!(format!("127.0.0.1:{port}")))];
    let mut rig = Rig::new(McpServer::spawn(Flavor::V1Json).await, &quick(), &extra).await;
    let worker = rig.start_worker("worker,api").await;
    rig.wait_ready(worker).await;
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let ready = || async { reqwest::get(&readyz).await.map(|r| r.status().as_u16()).unwrap_or(0) };
    assert_eq!(ready().await, 200);

    let jobs = 500;
    rig.publish_count_jobs(jobs).await;
    wait_for_executions(&rig, jobs / 5).await;

    // The test's own client has another app name, so only the worker's commands fail.
    let admin = mongodb::Client::with_uri_str(settings.mongodb.uri.expose()).await.unwrap().database("admin");
    let fail = json!({
        "configureFailPoint": "failCommand",
        "mode": "alwaysOn",
        "data": {
            "appName": app_name,
            "errorCode": 91,
            "failCommands": ["find", "findAndModify", "update", "insert", "delete", "aggregate", "ping"],
        },
    });
    admin.run_command(mongodb::bson::to_document(&fail).unwrap()).await.expect("SecantusDB arms the failpoint");
    let armed = tokio::time::Instant::now();
    let ran_before = rig.server.tool_calls().len();
    wait_until("readiness reports the database down", || async { ready().await == 503 }).await;
    tokio::time::sleep_until(armed + Duration::from_secs(10)).await;
    let off = mongodb::bson::doc! { "configureFailPoint": "failCommand", "mode": "off" };
    admin.run_command(off).await.unwrap();
    let ran_during = rig.server.tool_calls().len() - ran_before;
    // Only calls already past their claim (at most `worker.concurrency`) could run meanwhile.
    assert!(ran_during <= 16, "{ran_during} tools ran while the database was failing");
    assert!(rig.server.tool_calls().len() < jobs, "the failpoint came after every job had run");

    rig.collect_replies(jobs, Duration::from_secs(180)).await;
    rig.assert_each_answered_and_run_once(jobs);
    assert_eq!(ready().await, 200);
    rig.finish().await;
}

#[tokio::test]
async fn mcp_faults_are_retried_per_policy_then_answered_with_a_clear_error_before_the_deadline() {
    let _serial = serial();
    let server = McpServer::spawn(Flavor::V1Sse).await;
    let overrides = [
        ("mcp.call_timeout_ms", json!(1000)),
        ("worker.retry_delays_ms", json!([1000, 2000])),
        ("tokens.clock_skew_secs", json!(1)),
        // `flaky` needs the user's token, like a Qlik tool.
        ("mcp.servers.faulty", json!({ "url": server.url(), "tools": ["flaky"], "auth": { "provider": "qlik" } })),
    ];
    let mut rig = Rig::new(server, &overrides, &[]).await;
    rig.connect_user("alice").await;
    let worker = rig.start_worker("worker").await;
    rig.wait_ready(worker).await;

    let modes = ["500", "hang", "drop", "broken_sse"];
    let deadline = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339();
    let near = (chrono::Utc::now() + chrono::Duration::milliseconds(2500)).to_rfc3339();
    let mut jobs = Vec::new();
    for mode in modes {
        // Fails once, then works: the retry answers it.
        jobs.push((format!("{mode}-once"), json!({ "mode": mode, "times": 1 }), Some(deadline.clone())));
        // Always fails: every retry is used, then a retryable error.
        jobs.push((format!("{mode}-always"), json!({ "mode": mode, "times": 1000 }), Some(deadline.clone())));
        // Always fails, with too little time left for every retry.
        jobs.push((format!("{mode}-near"), json!({ "mode": mode, "times": 1000 }), Some(near.clone())));
    }
    rig.publish(jobs.iter().map(|(job_id, args, deadline)| {
        let mut arguments = args.clone();
        arguments["job_id"] = json!(job_id);
        (job_id.clone(), "flaky", arguments, deadline.clone())
    }))
    .await;
    rig.collect_replies(jobs.len(), Duration::from_secs(60)).await;

    let attempts = rig.executions();
    for mode in modes {
        let once = &rig.replies[&format!("{mode}-once")][0];
        assert_eq!(once["status"], "ok", "{mode}: {once}");
        assert_eq!(attempts[&format!("{mode}-once")], 2, "{mode}: one failure, one retry");

        let always = &rig.replies[&format!("{mode}-always")][0];
        assert_eq!(always["status"], "error", "{mode}: {always}");
        assert_eq!(always["error"]["code"], "mcp_unavailable", "{mode}: {always}");
        assert_eq!(always["error"]["retryable"], true, "{mode}: {always}");
        assert_eq!(attempts[&format!("{mode}-always")], 3, "{mode}: the first try and two retries");

        let job_id = format!("{mode}-near");
        let near_reply = &rig.replies[&job_id][0];
        let code = near_reply["error"]["code"].as_str().unwrap_or_default();
        assert!(["deadline_exceeded", "mcp_unavailable"].contains(&code), "{mode}: {near_reply}");
        assert!(attempts[&job_id] < 3, "{mode}: no retry past the deadline");
        // Answered at its deadline, not after: the slack covers the test's polling of the queue.
        let near_deadline = chrono::DateTime::parse_from_rfc3339(&near).unwrap();
        let arrived = rig.arrived[&job_id];
        assert!(arrived < near_deadline + chrono::Duration::seconds(2), "{mode}: answered at {arrived}");
    }
    rig.finish().await;
}

#[tokio::test]
async fn on_a_3_node_cluster_no_fault_of_one_node_loses_a_job_or_runs_one_twice() {
    let _serial = serial();
    cluster::run_all().await;
}
