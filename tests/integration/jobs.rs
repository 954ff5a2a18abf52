//! The job path's rules: errors before the MCP call, dead-lettering, and ack-after-confirm.

use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::support::{
    Flavor, McpServer, declare_queue, header, spawn_app, spawn_app_from, spawn_app_with, test_settings,
};

#[tokio::test]
async fn a_user_without_a_token_gets_not_connected_and_the_server_is_not_called() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;

    app.call("job-1", "nobody", "qlik_whoami", json!({})).await;
    let (reply, correlation) = app.next_reply().await;

    assert_eq!(reply["status"], "error");
    assert_eq!(reply["job_id"], "job-1");
    assert_eq!(correlation.as_deref(), Some("corr-job-1"));
    assert_eq!(reply["error"]["code"], "not_connected");
    assert_eq!(reply["error"]["provider"], "qlik");
    assert_eq!(reply["error"]["retryable"], false);
    assert!(server.requests().is_empty(), "the MCP server was contacted: {:?}", server.requests());
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_tool_gets_unknown_tool() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "t").await;

    app.call("job-1", "alice", "salesforce_query", json!({})).await;
    let (reply, _) = app.next_reply().await;

    assert_eq!(reply["error"]["code"], "unknown_tool", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("salesforce_query"));
    assert!(server.requests().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn malformed_json_gets_an_invalid_job_reply_and_is_dead_lettered_with_the_reason() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;

    app.publish(b"{not json", Some("corr-bad")).await;
    let (reply, correlation) = app.next_reply().await;
    assert_eq!(reply["status"], "error");
    assert_eq!(reply["error"]["code"], "invalid_job");
    assert_eq!(reply["error"]["retryable"], false);
    assert_eq!(reply["job_id"], serde_json::Value::Null);
    assert_eq!(correlation.as_deref(), Some("corr-bad"));

    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("the job is dead-lettered");
    assert_eq!(dead.data, b"{not json");
    let reason = header(&dead.properties, "x-mcp-worker-reason").expect("a reason header");
    assert!(reason.contains("not valid JSON"), "{reason}");
    assert!(app.get_message(&app.settings.amqp.jobs_queue).await.is_none(), "the job was left in the queue");
    assert!(server.requests().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_wrongly_typed_field_is_named_and_the_job_id_kept() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;

    app.publish(br#"{"job_id":"job-7","user_id":42,"tool":"qlik_whoami"}"#, None).await;
    let (reply, correlation) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "invalid_job");
    assert_eq!(reply["job_id"], "job-7");
    assert_eq!(correlation.as_deref(), Some("job-7"), "the correlation id falls back to the job id");
    assert!(reply["error"]["message"].as_str().unwrap().contains("user_id"), "{reply}");
    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("the job is dead-lettered");
    assert!(header(&dead.properties, "x-mcp-worker-reason").unwrap().contains("user_id"));
    app.stop().await;
}

#[tokio::test]
async fn a_job_without_reply_to_is_dead_lettered_and_not_run() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "t").await;

    let job = json!({ "job_id": "job-1", "user_id": "alice", "tool": "qlik_whoami" });
    app.publish_with(&serde_json::to_vec(&job).unwrap(), lapin::BasicProperties::default()).await;
    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("the job is dead-lettered");
    assert!(header(&dead.properties, "x-mcp-worker-reason").unwrap().contains("reply_to"));
    assert!(server.tool_calls().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_tool_failure_is_an_ok_reply_with_is_error() {
    let server = McpServer::spawn(Flavor::V1Sse).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "t").await;

    app.call("job-1", "alice", "qlik_fail", json!({})).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["isError"], true, "{reply}");
    app.stop().await;
}

#[tokio::test]
async fn a_server_without_auth_gets_no_token_even_when_the_user_has_one() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "secret-token").await;

    app.call("job-1", "alice", "echo", json!({ "text": "hello" })).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["content"][0]["text"], "hello");
    let calls = server.tool_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].tool.as_deref(), Some("echo"));
    assert_eq!(calls[0].x_qlik_access_token, None);
    assert_eq!(calls[0].arguments, Some(json!({ "text": "hello" })));
    app.stop().await;
}

#[tokio::test]
async fn a_passed_deadline_is_answered_without_calling_the_server() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;
    app.store_token("alice", "t").await;

    let job =
        json!({ "job_id": "job-1", "user_id": "alice", "tool": "qlik_whoami", "deadline": "2020-01-01T00:00:00Z" });
    app.publish(&serde_json::to_vec(&job).unwrap(), None).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "deadline_exceeded", "{reply}");
    assert!(server.requests().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_server_gives_a_retryable_mcp_unavailable_once_retries_are_used_up() {
    // Nothing listens on port 9 (discard) on these machines.
    let app = spawn_app_with("http://127.0.0.1:9/mcp", &[("worker.retry_delays_ms", json!([100, 200]))]).await;
    app.store_token("alice", "t").await;

    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "mcp_unavailable", "{reply}");
    assert_eq!(reply["error"]["retryable"], true);
    app.stop().await;
}

#[tokio::test]
async fn a_copy_no_queue_takes_leaves_its_job_requeued_never_acked() {
    let overrides = [
        ("worker.retry_delays_ms", json!([100])),
        ("worker.retry_jitter_percent", json!(0)),
        // A short claim lease (call timeout + skew + 10 s), so the requeued job is taken over soon.
        ("mcp.call_timeout_ms", json!(1000)),
        ("tokens.clock_skew_secs", json!(1)),
        ("tokens.defer_ms", json!(500)),
    ];
    let app = spawn_app_with("http://127.0.0.1:9/mcp", &overrides).await;
    app.store_token("alice", "t").await;
    // The retry queue goes away (a node lost it, an operator deleted it): the broker returns the
    // job's copy as unroutable.
    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    let retry_queue = format!("{jobs_queue}.retry.100ms");
    app.channel.queue_delete(retry_queue.as_str().into(), Default::default()).await.unwrap();

    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    // The queue is back. The job was requeued, not acked: it comes back, waits for its own claim
    // to lapse, runs again, and is answered once its retry is used up. Acked, it would be gone.
    let mut args = FieldTable::default();
    for (key, value) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", jobs_queue.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(100));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    app.channel.queue_declare(retry_queue.as_str().into(), durable, args).await.unwrap();
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["job_id"], "job-1", "{reply}");
    assert_eq!(reply["error"]["code"], "mcp_unavailable", "{reply}");
    app.stop().await;
}

#[tokio::test]
async fn a_call_that_outlives_the_call_timeout_gives_a_retryable_mcp_unavailable() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let overrides = [("mcp.call_timeout_ms", json!(300)), ("worker.retry_delays_ms", json!([]))];
    let app = spawn_app_with(&server.url(), &overrides).await;

    app.call("job-1", "alice", "sleep", json!({ "seconds": 5 })).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "mcp_unavailable", "{reply}");
    assert_eq!(reply["error"]["retryable"], true);
    assert!(reply["error"]["message"].as_str().unwrap().contains("did not answer"), "{reply}");
    app.stop().await;
}

#[tokio::test]
async fn a_deadline_during_the_call_gives_deadline_exceeded() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = spawn_app(&server.url()).await;

    // Far enough that the call starts even on a loaded broker (1.5 s once was not, in CI, with
    // the suite's quorum queues being created around it), well before the 10 s the tool sleeps.
    let deadline = (chrono::Utc::now() + chrono::Duration::milliseconds(4000)).to_rfc3339();
    let job = json!({ "job_id": "job-1", "user_id": "alice", "tool": "sleep", "arguments": { "seconds": 10 }, "deadline": deadline });
    app.publish(&serde_json::to_vec(&job).unwrap(), None).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "deadline_exceeded", "{reply}");
    assert_eq!(server.tool_calls().len(), 1, "the call was made, and cut short by the deadline");
    app.stop().await;
}

#[tokio::test]
async fn a_job_is_not_acked_while_the_broker_refuses_its_reply() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app_with(&server.url(), &[("amqp.delivery_limit", json!(1))]).await;
    app.store_token("alice", "t").await;
    // A reply queue that can hold nothing and answers publishes with a nack.
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let full = format!("{}.full", app.reply_queue);
    declare_queue(&app.channel, &full, arguments).await;

    let job = json!({ "job_id": "job-1", "user_id": "alice", "tool": "qlik_whoami" });
    let properties = lapin::BasicProperties::default().with_reply_to(full.as_str().into());
    app.publish_with(&serde_json::to_vec(&job).unwrap(), properties).await;

    // Had the job been acked despite the nack, it would be gone after one run. Instead the broker
    // delivers it again until the delivery limit, then dead-letters it itself (no worker reason).
    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("the broker dead-letters the job");
    assert_eq!(header(&dead.properties, "x-mcp-worker-reason"), None);
    // The tool ran once: the redeliveries replayed its recorded reply (also refused by the broker).
    assert_eq!(server.tool_calls().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_job_whose_deliveries_keep_failing_is_dead_lettered_with_its_reason_and_answered() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
    let server = McpServer::spawn(Flavor::V2Json).await;
    let settings = test_settings(&server.url(), &[("amqp.delivery_limit", json!(2))]);
    // The queues first, without a worker: the test plays two workers that crashed on the job.
    let none = mcp_worker::app::Roles { worker: false, refresher: false, api: false };
    let declared = mcp_worker::app::App::build(&settings, none).await.unwrap();
    declared.run(tokio_util::sync::CancellationToken::new()).await.unwrap();
    let connection = lapin::Connection::connect(settings.amqp.url.expose(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let jobs = settings.amqp.jobs_queue.clone();
    let job = json!({ "job_id": "job-1", "user_id": "alice", "tool": "count_job", "arguments": { "job_id": "job-1" } });
    // Its own reply queue, there before the worker starts (which answers at once).
    let replies = format!("{jobs}.poison-replies");
    channel.queue_declare(replies.as_str().into(), Default::default(), Default::default()).await.unwrap();
    let properties = lapin::BasicProperties::default().with_reply_to(replies.as_str().into()).with_delivery_mode(2);
    let body = serde_json::to_vec(&job).unwrap();
    channel
        .basic_publish("".into(), jobs.as_str().into(), BasicPublishOptions::default(), &body, properties)
        .await
        .unwrap();
    for _ in 0..2 {
        let delivery = loop {
            match channel.basic_get(jobs.as_str().into(), BasicGetOptions::default()).await.unwrap() {
                Some(message) => break message.delivery,
                None => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        delivery.reject(BasicRejectOptions { requeue: true }).await.unwrap();
    }

    let app = spawn_app_from(settings).await;
    let reply = app.next_message(&replies).await.expect("a reply arrives in time");
    let reply: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(reply["error"]["code"], "delivery_limit", "{reply}");
    assert_eq!(reply["error"]["retryable"], false);
    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("the job is dead-lettered");
    let reason = header(&dead.properties, "x-mcp-worker-reason").expect("with the worker's reason");
    assert!(reason.contains("delivered 3 times"), "{reason}");
    assert!(server.tool_calls().is_empty(), "the job was not run again");
    channel.queue_delete(replies.as_str().into(), Default::default()).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn shutdown_waits_the_grace_period_then_leaves_unfinished_jobs_for_redelivery() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let overrides = [("worker.shutdown_grace_secs", json!(1)), ("mcp.call_timeout_ms", json!(60_000))];
    let app = spawn_app_with(&server.url(), &overrides).await;

    app.call("job-slow", "alice", "sleep", json!({ "seconds": 30 })).await;
    crate::support::wait_until("the slow call reached the server", || async { !server.tool_calls().is_empty() }).await;
    let jobs_queue = app.settings.amqp.jobs_queue.clone();
    let reply_queue = app.reply_queue.clone();
    let channel = app.channel.clone();
    app.stop_keeping_queues().await;

    let get = lapin::options::BasicGetOptions { no_ack: true };
    assert!(
        channel.basic_get(reply_queue.as_str().into(), get).await.unwrap().is_none(),
        "no reply for an unfinished job"
    );
    let mut back = None;
    for _ in 0..300 {
        back = channel.basic_get(jobs_queue.as_str().into(), get).await.unwrap();
        if back.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let back = back.expect("the unfinished job is back in the queue");
    assert!(back.delivery.redelivered, "the broker marks it as delivered before");
    assert!(String::from_utf8_lossy(&back.delivery.data).contains("job-slow"));
}

#[tokio::test]
async fn a_republished_job_gets_its_recorded_reply_and_the_tool_runs_once() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app(&server.url()).await;

    app.call("job-1", "alice", "count_job", json!({ "job_id": "job-1" })).await;
    let (first, _) = app.next_reply().await;
    assert_eq!(first["status"], "ok", "{first}");
    app.call("job-1", "alice", "count_job", json!({ "job_id": "job-1" })).await;
    let (second, correlation) = app.next_reply().await;

    assert_eq!(second, first, "the same reply again");
    assert_eq!(correlation.as_deref(), Some("corr-job-1"));
    assert_eq!(server.tool_calls().len(), 1, "the tool ran once");
    app.call("job-2", "alice", "count_job", json!({ "job_id": "job-2" })).await;
    app.next_reply().await;
    assert_eq!(server.tool_calls().len(), 2, "another job id runs");
}

#[tokio::test]
async fn two_deliveries_of_one_job_at_the_same_time_run_it_once() {
    let server = McpServer::spawn(Flavor::V1Json).await;
    let app = spawn_app_with(&server.url(), &[("tokens.defer_ms", json!(200))]).await;

    // The first delivery is still running the tool when the second arrives: the second waits
    // (delay queue) and then gets the first one's recorded reply.
    app.call("job-1", "alice", "sleep", json!({ "seconds": 1 })).await;
    app.call("job-1", "alice", "sleep", json!({ "seconds": 1 })).await;
    let (first, _) = app.next_reply().await;
    let (second, _) = app.next_reply().await;

    assert_eq!(first["status"], "ok", "{first}");
    assert_eq!(second, first);
    assert_eq!(server.tool_calls().len(), 1, "the tool ran once");
}

#[tokio::test]
async fn every_job_of_the_malformed_corpus_is_refused_and_dead_lettered_with_a_reason() {
    let app = spawn_app("http://127.0.0.1:9/mcp").await;
    let cases = crate::support::bad_job_corpus();
    for (name, body) in &cases {
        app.publish(body, Some(name)).await;
    }

    let mut replied = std::collections::BTreeMap::new();
    for _ in &cases {
        let (reply, correlation) = app.next_reply().await;
        replied.insert(correlation.expect("replies carry the correlation id"), reply);
    }
    let mut dead = std::collections::BTreeMap::new();
    for _ in &cases {
        let message = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("dead-lettered");
        let correlation = message.properties.correlation_id().as_ref().unwrap().as_str().to_owned();
        dead.insert(correlation, (message.data.clone(), header(&message.properties, "x-mcp-worker-reason")));
    }
    for (name, body) in &cases {
        let reply = &replied[name];
        assert_eq!(reply["status"], "error", "{name}: {reply}");
        assert_eq!(reply["error"]["code"], "invalid_job", "{name}: {reply}");
        let (dead_body, reason) = &dead[name];
        assert_eq!(dead_body, body, "{name}: the dead letter keeps the original body");
        let reason = reason.as_deref().unwrap_or_default();
        assert!(!reason.is_empty(), "{name}: a reason header");
        assert_eq!(reply["error"]["message"], reason, "{name}: the reply and the dead letter say the same");
    }
}

#[tokio::test]
async fn a_job_is_retried_until_its_unavailable_server_answers() {
    let port = McpServer::reserve_port();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let app = spawn_app_with(&url, &[("worker.retry_delays_ms", json!([300, 600, 1200, 2400, 4800, 9600]))]).await;
    app.store_token("alice", "t").await;

    // The server is down when the job arrives, and comes up while the job waits to be retried.
    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let server = McpServer::spawn_on(Flavor::V2Json, port).await;
    let (reply, _) = app.next_reply().await;

    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(server.tool_calls().len(), 1);
}

#[tokio::test]
async fn two_worker_processes_given_every_job_twice_run_each_job_once() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // The test's own in-process worker takes part too, one job at a time: three consumers in all.
    let app = spawn_app_with(&server.url(), &[("worker.concurrency", json!(1)), ("tokens.defer_ms", json!(200))]).await;
    let env = crate::support::worker_env(
        &app.settings,
        &[("tokens.defer_ms", json!(200)), ("telemetry.filter", json!("warn"))],
    );
    let mut workers: Vec<_> = (0..2)
        .map(|_| crate::support::spawn_worker(&["run", "--roles", "worker"], &env, std::process::Stdio::inherit()))
        .collect();

    // Every job is published twice, so deliveries of the same job_id race between processes.
    for job in 0..50 {
        let job_id = format!("job-{job}");
        for _ in 0..2 {
            app.call(&job_id, "alice", "count_job", json!({ "job_id": job_id })).await;
        }
    }
    let mut replies = std::collections::BTreeMap::<String, Vec<serde_json::Value>>::new();
    for _ in 0..100 {
        let (reply, _) = app.next_reply().await;
        replies.entry(reply["job_id"].as_str().unwrap().to_owned()).or_default().push(reply);
    }
    for worker in &mut workers {
        assert!(crate::support::terminate(worker));
    }

    assert_eq!(replies.len(), 50, "every job answered");
    for (job_id, answers) in &replies {
        assert_eq!(answers.len(), 2, "{job_id}: one reply per delivery");
        assert_eq!(answers[0], answers[1], "{job_id}: the same reply both times");
        assert_eq!(answers[0]["status"], "ok", "{job_id}: {}", answers[0]);
    }
    let mut executions = std::collections::BTreeMap::<String, usize>::new();
    for call in server.tool_calls() {
        let job_id = call.arguments.unwrap()["job_id"].as_str().unwrap().to_owned();
        *executions.entry(job_id).or_default() += 1;
    }
    assert_eq!(executions.len(), 50);
    assert!(executions.values().all(|&n| n == 1), "a job ran twice: {executions:?}");
}

#[tokio::test]
async fn with_the_token_cache_on_a_replaced_token_is_used_once_the_entry_expires() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app_with(&server.url(), &[("tokens.cache_ttl_ms", json!(3000))]).await;
    app.store_token("alice", "first").await;
    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    app.next_reply().await;
    // Replaced in the store (as a refresh would): the cached entry still serves for its TTL.
    app.store_token("alice", "second").await;
    app.call("job-2", "alice", "qlik_whoami", json!({})).await;
    app.next_reply().await;
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    app.call("job-3", "alice", "qlik_whoami", json!({})).await;
    app.next_reply().await;

    let sent: Vec<_> = server.tool_calls().into_iter().map(|c| c.x_qlik_access_token.unwrap_or_default()).collect();
    assert_eq!(sent, ["first", "first", "second"], "job-2 from the cache, job-3 read again");
    app.stop().await;
}

#[tokio::test]
async fn with_the_token_cache_on_a_disconnect_reaches_the_worker_by_event_not_by_expiry() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // An entry would live ten minutes: only the token.disconnected event can drop it in time.
    let fx =
        crate::support::spawn_app_with_oauth(&server.url(), |_| {}, &[("tokens.cache_ttl_ms", json!(600_000))]).await;
    let app = &fx.app;
    app.store_token("alice", "cached-token").await;
    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    assert_eq!(app.next_reply().await.0["status"], "ok");

    assert_eq!(app.disconnect("alice").await, 204);
    // The event travels on another queue than the jobs, so a job published right after the
    // disconnect may still be served from the cache; the next ones must not be.
    let mut n = 0;
    crate::support::wait_until("a job after the disconnect is told not_connected", || {
        n += 1;
        let job_id = format!("job-after-{n}");
        async move {
            app.call(&job_id, "alice", "qlik_whoami", json!({})).await;
            let (reply, _) = app.next_reply().await;
            reply["status"] == "error" && reply["error"]["code"] == "not_connected"
        }
    })
    .await;
    let served_after = server.tool_calls().len() - 1;
    assert!(served_after <= 1, "{served_after} jobs used the disconnected user's cached token");
}

#[tokio::test]
async fn a_job_id_too_long_to_be_a_correlation_id_is_answered_invalid_job() {
    let app = spawn_app("http://127.0.0.1:9/mcp").await;
    // No correlation id: the worker would fall back to the job id, which AMQP cannot carry.
    let body = json!({ "job_id": "j".repeat(300), "user_id": "alice", "tool": "qlik_whoami" });
    app.publish(body.to_string().as_bytes(), None).await;
    let (reply, correlation) = app.next_reply().await;
    assert_eq!(reply["error"]["code"], "invalid_job", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("job_id"), "{reply}");
    assert_eq!(reply["job_id"], serde_json::Value::Null, "an invalid id is not repeated");
    assert_eq!(correlation, None);
    app.stop().await;
}
