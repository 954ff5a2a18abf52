//! Process hardening against hostile input and peers (issue 11): a panic is never a crash loop,
//! slow clients cannot hold the HTTP listener, logs cannot be forged, and URLs print without
//! their credentials. Against the real broker and database.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use mcp_worker::app::{App, Roles};
use mcp_worker::queue::{Broker, Delivery};
use mcp_worker::refresher::{FAILURES_HEADER, RequestLimits, serve_requests};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::support::{
    Flavor, McpServer, TestApp, header, spawn_app, spawn_app_from, spawn_app_with, spawn_worker, terminate,
    test_settings, wait_until, worker_env,
};

/// How long a test waits for something that must happen (a failure bound, not a measurement).
const BOUND: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_refresh_request_whose_handler_panics_is_dead_lettered_after_the_limit_and_jobs_are_still_answered() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // No provider is configured, so the app runs no refresher: the test runs the refresh-request
    // shell itself, with a handler that panics every time.
    let app = spawn_app(&server.url()).await;
    let settings = &app.settings;
    let broker = Broker::connect(&settings.amqp, "test refresher", None).await.unwrap();
    let requests = broker.consume(&settings.amqp.refresh_queue, 4).await.unwrap();
    let limits = RequestLimits {
        queue: settings.amqp.refresh_queue.clone(),
        dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
        delivery_limit: settings.amqp.delivery_limit,
    };
    let (calls, stop) = (Arc::new(AtomicU32::new(0)), CancellationToken::new());
    let shell = tokio::spawn({
        let (broker, calls, stop) = (broker.clone(), calls.clone(), stop.clone());
        async move {
            let handle = |_request| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { panic!("a refresh handler that always panics") }
            };
            serve_requests(&broker, requests, &stop, &limits, handle).await;
        }
    });

    let request = json!({ "v": 1, "provider": "qlik", "user_id": "alice", "needed_until": "2030-01-01T00:00:00Z" });
    let body = serde_json::to_vec(&request).unwrap();
    app.channel
        .basic_publish(
            "".into(),
            settings.amqp.refresh_queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let dead = app.next_message(&settings.amqp.dead_letter_queue).await.expect("the request is dead-lettered");
    let reason = header(&dead.properties, "x-mcp-worker-reason").expect("with its reason");
    assert!(reason.starts_with("delivery_limit"), "{reason}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&dead.data).unwrap(), request);
    assert_eq!(calls.load(Ordering::SeqCst), settings.amqp.delivery_limit, "run once per allowed delivery");

    // The shell and the process are still there: jobs are answered.
    app.call("job-after-panics", "alice", "echo", json!({ "text": "still here" })).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert!(!shell.is_finished(), "the refresh-request shell still serves");
    stop.cancel();
    shell.await.unwrap();
    broker.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_refresh_request_left_unsettled_by_a_dead_consumer_is_counted_before_it_runs_again() {
    let settings = test_settings("http://127.0.0.1:9/mcp", &[("amqp.delivery_limit", json!(2))]);
    let none = Roles { worker: false, refresher: false, api: false };
    App::build(&settings, none).await.unwrap().run(CancellationToken::new()).await.unwrap();
    let queue = settings.amqp.refresh_queue.clone();
    let connection = lapin::Connection::connect(settings.amqp.url.expose(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    // The request as the shell put it back after it killed one process already (one failure
    // counted): a put-back copy starts a new delivery count, so this header is all there is.
    let request = json!({ "v": 1, "provider": "qlik", "user_id": "alice", "needed_until": "2030-01-01T00:00:00Z" });
    let body = serde_json::to_vec(&request).unwrap();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(FAILURES_HEADER.into(), lapin::types::AMQPValue::LongUInt(1));
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    // It kills the next consumer too, without unwinding anything: the channel closes with the
    // delivery unacked, and the broker marks it redelivered.
    let dying = connection.create_channel().await.unwrap();
    let taken = loop {
        match dying.basic_get(queue.as_str().into(), Default::default()).await.unwrap() {
            Some(message) => break message,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    drop(taken);
    dying.close(200, "crashed".into()).await.unwrap();

    let broker = Broker::connect(&settings.amqp, "test refresher", None).await.unwrap();
    let requests = broker.consume(&queue, 4).await.unwrap();
    let limits = RequestLimits {
        queue: queue.clone(),
        dead_letter_queue: settings.amqp.dead_letter_queue.clone(),
        delivery_limit: 2,
    };
    let (calls, stop) = (Arc::new(AtomicU32::new(0)), CancellationToken::new());
    let shell = tokio::spawn({
        let (broker, calls, stop) = (broker.clone(), calls.clone(), stop.clone());
        async move {
            let handle = |_request| {
                calls.fetch_add(1, Ordering::SeqCst);
                async {}
            };
            serve_requests(&broker, requests, &stop, &limits, handle).await;
        }
    });
    // Either it is dead-lettered (the redelivery counted as the second failure) or, without that
    // rule, the shell runs it a third time: stop at whichever comes first.
    let until = tokio::time::Instant::now() + BOUND;
    let dead = loop {
        assert_eq!(calls.load(Ordering::SeqCst), 0, "a request that killed its consumers ran again");
        let got = channel.basic_get(settings.amqp.dead_letter_queue.as_str().into(), Default::default()).await;
        if let Some(message) = got.unwrap() {
            break message;
        }
        assert!(tokio::time::Instant::now() < until, "the request was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = header(&dead.delivery.properties, "x-mcp-worker-reason").unwrap();
    assert!(reason.starts_with("delivery_limit: the refresh request failed 2 times"), "{reason}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "a request that killed its consumers is not run again");
    stop.cancel();
    shell.await.unwrap();
    broker.close().await;
    let app = spawn_app_from(settings).await;
    app.stop().await;
}

#[tokio::test]
async fn a_job_whose_handler_panics_is_requeued_counted_and_dead_lettered_at_the_limit() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let settings = test_settings(&server.url(), &[("amqp.delivery_limit", json!(3))]);
    let none = Roles { worker: false, refresher: false, api: false };
    App::build(&settings, none).await.unwrap().run(CancellationToken::new()).await.unwrap();
    let connection = lapin::Connection::connect(settings.amqp.url.expose(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let jobs = settings.amqp.jobs_queue.clone();
    let replies = format!("{jobs}.panic-replies");
    channel.queue_declare(replies.as_str().into(), Default::default(), Default::default()).await.unwrap();
    let job = json!({ "job_id": "job-1", "user_id": "alice", "tool": "count_job", "arguments": { "job_id": "job-1" } });
    let properties = BasicProperties::default().with_reply_to(replies.as_str().into()).with_delivery_mode(2);
    let body = serde_json::to_vec(&job).unwrap();
    channel
        .basic_publish("".into(), jobs.as_str().into(), BasicPublishOptions::default(), &body, properties)
        .await
        .unwrap();

    // The worker loop's settling with a handler that panics. Fetched one at a time: a consumer
    // would be handed the requeued job again at once, and its cancel would count one more.
    for delivered in 0..3 {
        let delivery = tokio::time::timeout(BOUND, async {
            loop {
                match channel.basic_get(jobs.as_str().into(), Default::default()).await.unwrap() {
                    Some(message) => break Delivery::from(message.delivery),
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await
        .expect("the job comes back: the panic requeued it");
        assert_eq!(delivery.failed_deliveries, delivered, "each panic counts as a failed delivery");
        delivery.handle_or_requeue(|_| async { panic!("a job handler that always panics") }).await;
    }

    // The real worker takes it next, at the limit: dead-lettered with its reason, answered.
    let app = spawn_app_from(settings).await;
    let reply = app.next_message(&replies).await.expect("a reply arrives in time");
    let reply: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(reply["error"]["code"], "delivery_limit", "{reply}");
    let dead = app.next_message(&app.settings.amqp.dead_letter_queue).await.expect("the job is dead-lettered");
    let reason = header(&dead.properties, "x-mcp-worker-reason").expect("with the worker's reason");
    assert!(reason.contains("delivered 4 times"), "{reason}");
    assert!(server.tool_calls().is_empty(), "the job was not run");
    channel.queue_delete(replies.as_str().into(), Default::default()).await.unwrap();
    app.stop().await;
}

/// A running app with `overrides` for its HTTP listener, and the listener's `host:port`, for
/// tests that speak raw TCP to it. The MCP server only has to exist; keep it alive.
async fn app_for_the_listener(overrides: &[(&str, serde_json::Value)]) -> (McpServer, TestApp, String) {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let app = spawn_app_with(&server.url(), overrides).await;
    let addr = app.api.trim_start_matches("http://").to_owned();
    (server, app, addr)
}

/// Reads until the peer closes the connection (end of stream or reset); returns what came.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout(BOUND, stream.read(&mut buffer)).await.expect("the listener closes it") {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test]
async fn two_hundred_half_sent_requests_are_closed_by_the_listener_and_it_still_answers() {
    let overrides = [("http.header_read_timeout_ms", json!(500)), ("http.body_read_timeout_ms", json!(500))];
    let (_server, app, addr) = app_for_the_listener(&overrides).await;
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        match i % 3 {
            // Half a request head.
            0 => stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap(),
            // A complete head and part of the body it announced.
            1 => stream
                .write_all(
                    b"POST /v1/connections/qlik/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"user",
                )
                .await
                .unwrap(),
            // Nothing at all.
            _ => {}
        }
        slow.push((i, stream));
    }
    for (i, stream) in &mut slow {
        let received = read_until_closed(stream).await;
        let text = String::from_utf8_lossy(&received);
        if *i % 3 == 1 {
            assert!(text.starts_with("HTTP/1.1 408"), "a body that does not arrive is answered 408: {text}");
        } else {
            assert!(!text.contains(" 200 "), "{text}");
        }
    }
    let health = reqwest::get(format!("{}/healthz", app.api)).await.unwrap();
    assert_eq!(health.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_served_again_once_one_is_free() {
    let overrides = [("http.max_connections", json!(10)), ("http.header_read_timeout_ms", json!(600_000))];
    let (_server, app, addr) = app_for_the_listener(&overrides).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(stream);
    }
    // Accepted in order: these come after the ten held ones, so they find the limit reached.
    for _ in 0..5 {
        let mut extra = TcpStream::connect(&addr).await.unwrap();
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let received = read_until_closed(&mut extra).await;
        assert!(received.is_empty(), "closed unanswered: {}", String::from_utf8_lossy(&received));
    }
    drop(held.pop());
    wait_until("a connection is served again once one is free", || async {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        String::from_utf8_lossy(&read_until_closed(&mut stream).await).starts_with("HTTP/1.1 200")
    })
    .await;
    drop(held);
    app.stop().await;
}

#[tokio::test]
async fn a_newline_in_reply_to_or_tool_does_not_start_a_log_line_in_the_human_format() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let settings = test_settings(&server.url(), &[]);
    let none = Roles { worker: false, refresher: false, api: false };
    App::build(&settings, none).await.unwrap().run(CancellationToken::new()).await.unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let env = worker_env(&settings, &[("telemetry.format", json!("human")), ("telemetry.filter", json!("info"))]);
    let mut worker = spawn_worker(&["run", "--roles", "worker"], &env, Stdio::from(log.reopen().unwrap()));

    let connection = lapin::Connection::connect(settings.amqp.url.expose(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let forged = "2026-01-01T00:00:00.000000Z  INFO FORGED";
    let job = json!({ "job_id": "job-1", "user_id": "alice", "tool": format!("nope\n{forged} tool"), "arguments": {} });
    let reply_to = format!("gone\n{forged} reply_to");
    let properties = BasicProperties::default().with_reply_to(reply_to.as_str().into());
    channel
        .basic_publish(
            "".into(),
            settings.amqp.jobs_queue.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&job).unwrap(),
            properties,
        )
        .await
        .unwrap();
    let path = log.path().to_owned();
    wait_until("the job is logged as done", || {
        let path = path.clone();
        async move { std::fs::read_to_string(path).unwrap_or_default().contains("job done") }
    })
    .await;
    assert!(terminate(&mut worker), "the worker stops cleanly");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    // Escaped as `\n`, in a span's quoted field or an event's bare one.
    assert!(logged.contains("gone\\n2026"), "the reply_to is logged, escaped:\n{logged}");
    assert!(logged.contains("nope\\n2026"), "the tool is logged, escaped:\n{logged}");
    for line in logged.lines() {
        assert!(!line.contains("INFO FORGED") || line.contains("\\n2026"), "a forged line: {line}\n{logged}");
        assert!(!line.starts_with("2026-01-01"), "a forged line: {line}");
    }
    // Its queues go with a test app.
    spawn_app_from(settings).await.stop().await;
}

#[tokio::test]
async fn a_password_in_an_mcp_server_url_is_never_printed_by_config_check_or_the_connect_log() {
    let password = "hunter2-in-the-url";
    let server = McpServer::spawn(Flavor::V2Json).await;
    let with_password = server.url().replacen("http://", &format!("http://mcp-user:{password}@"), 1);
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-worker"))
        .args(["config", "check"])
        .env_remove("MCP_WORKER_ENV")
        .env("MCP_WORKER_MCP__SERVERS__QLIK__URL", &with_password)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(printed.contains("http://[redacted]@127.0.0.1"), "the URL is shown, its userinfo redacted:\n{printed}");
    assert!(!printed.contains(password) && !printed.contains("mcp-user"), "{printed}");

    // A worker process calling that server (and one that cannot be reached): its logs at debug
    // level and the replies never show the password.
    let unreachable = format!("http://mcp-user:{password}@127.0.0.1:9/mcp");
    let settings = test_settings(
        &with_password,
        &[
            ("mcp.servers.plain.url", json!(with_password)),
            ("mcp.servers.down", json!({ "url": unreachable, "tools": ["unreached"] })),
            ("worker.retry_delays_ms", json!([10])),
        ],
    );
    let none = Roles { worker: false, refresher: false, api: false };
    App::build(&settings, none).await.unwrap().run(CancellationToken::new()).await.unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    // worker_env passes the queues, keys and servers of `settings`, not its other overrides.
    let extra = [("telemetry.filter", json!("debug")), ("worker.retry_delays_ms", json!([10]))];
    let env = worker_env(&settings, &extra);
    let mut worker = spawn_worker(&["run", "--roles", "worker"], &env, Stdio::from(log.reopen().unwrap()));
    let connection = lapin::Connection::connect(settings.amqp.url.expose(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let replies = format!("{}.password-replies", settings.amqp.jobs_queue);
    channel.queue_declare(replies.as_str().into(), Default::default(), Default::default()).await.unwrap();
    for (job_id, tool) in [("job-1", "qlik_list_apps"), ("job-2", "echo"), ("job-3", "unreached")] {
        let job = json!({ "job_id": job_id, "user_id": "alice", "tool": tool, "arguments": {} });
        let properties = BasicProperties::default().with_reply_to(replies.as_str().into());
        let body = serde_json::to_vec(&job).unwrap();
        let jobs = settings.amqp.jobs_queue.as_str();
        channel.basic_publish("".into(), jobs.into(), BasicPublishOptions::default(), &body, properties).await.unwrap();
    }
    let mut answered = Vec::new();
    let until = tokio::time::Instant::now() + BOUND;
    while answered.len() < 3 {
        assert!(tokio::time::Instant::now() < until, "every job is answered in time");
        match channel.basic_get(replies.as_str().into(), Default::default()).await.unwrap() {
            Some(message) => answered.push(String::from_utf8_lossy(&message.delivery.data).into_owned()),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(terminate(&mut worker));
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(logged.contains("connected to MCP server"), "{logged}");
    assert!(logged.contains("[redacted]@127.0.0.1"), "the URL is logged, its userinfo redacted:\n{logged}");
    assert!(!logged.contains(password), "the password was logged:\n{logged}");
    for reply in &answered {
        assert!(!reply.contains(password), "the password is in a reply: {reply}");
    }
    channel.queue_delete(replies.as_str().into(), Default::default()).await.unwrap();
    // Its queues go with a test app.
    spawn_app_from(settings).await.stop().await;
}
