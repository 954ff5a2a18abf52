//! A hostile OAuth provider (issue 11): redirecting token and revoke endpoints, absurd numbers,
//! unusable tokens, and `tokens import` fed the same. Against the real broker and database; the
//! provider is a `Recorder` scripted per request, and "somewhere else" is a `Recorder` that must
//! receive nothing.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::response::Response;
use chrono::Utc;
use serde_json::{Value, json};

use crate::support::hostile::{HOSTILE_CLIENT_SECRET, Received, Recorder, hostile_provider, json_response};
use crate::support::{
    Flavor, McpServer, TestApp, confirm, no_redirects, spawn_app_with, start_connect, test_settings, wait_until,
    worker_env,
};

const NO_MCP: &str = "http://127.0.0.1:9/mcp";
const REDIRECTS: [u16; 5] = [301, 302, 303, 307, 308];

/// Starts a connect flow for `user` and calls the callback as the provider would send the
/// browser back with `code`, and confirms a finished flow for `user`; returns the callback's
/// status and page.
async fn callback_with_code(app: &TestApp, user: &str, code: &str) -> (u16, String) {
    let http = no_redirects();
    let authorize = reqwest::Url::parse(&start_connect(&http, &app.api, user, None).await).unwrap();
    let state = authorize.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    let mut callback = reqwest::Url::parse(&format!("{}/v1/connections/qlik/callback", app.api)).unwrap();
    callback.query_pairs_mut().append_pair("state", &state).append_pair("code", code);
    let answer = http.get(callback).send().await.unwrap();
    let status = answer.status().as_u16();
    // A finished flow, confirmed for its user as the chat backend would.
    let landed = answer.headers().get("location").and_then(|l| reqwest::Url::parse(l.to_str().ok()?).ok());
    if let Some(code) =
        landed.and_then(|url| url.query_pairs().find(|(k, _)| k == "connect_code").map(|(_, c)| c.into_owned()))
    {
        assert_eq!(confirm(&app.api, user, &code).await.0, 204, "the flow is confirmed");
    }
    (status, answer.text().await.unwrap())
}

/// The redirect status a request asks for by carrying `s<status>x` (in its code or refresh
/// token), if any.
fn redirect_asked(request: &Received) -> Option<u16> {
    let text = request.text();
    REDIRECTS.into_iter().find(|status| text.contains(&format!("s{status}x")))
}

fn stays_put() -> Vec<(&'static str, Value)> {
    vec![("refresher.interval_secs", json!(1)), ("refresher.retry_initial_secs", json!(1))]
}

async fn wait_for_request(provider: &Recorder, what: &str, needle: &str) {
    wait_until(what, || async { provider.received().iter().any(|r| r.text().contains(needle)) }).await;
}

#[tokio::test]
async fn a_redirecting_token_or_revoke_endpoint_sends_nothing_elsewhere_and_disconnects_no_one() {
    let elsewhere = Recorder::elsewhere().await;
    let target = elsewhere.base.clone();
    // Every redirect also says `invalid_grant`, which must not count: a 3xx is never about the grant.
    let (provider, settings) = hostile_provider(move |request| {
        let status = redirect_asked(request).unwrap_or(400);
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        Response::builder()
            .status(status)
            .header("location", format!("{target}{path}"))
            .header("content-type", "application/json")
            .body(Body::from(r#"{"error":"invalid_grant"}"#))
            .unwrap()
    })
    .await;
    let mut overrides = settings;
    overrides.extend(stays_put());
    let app = spawn_app_with(NO_MCP, &overrides).await;

    // The code exchange at the callback: a clear error page, nothing stored.
    for status in REDIRECTS {
        let user = format!("callback-{status}");
        let (answer, page) = callback_with_code(&app, &user, &format!("code-s{status}x")).await;
        assert_eq!(answer, 400, "{status}: {page}");
        assert!(page.contains("did not accept the sign-in"), "{status}: {page}");
        assert!(app.stored(&user).await.is_none(), "{status}: nothing stored");
    }

    // A refresh: the user stays active, with the tokens they had.
    for status in REDIRECTS {
        let user = format!("refresh-{status}");
        let expires_at = Utc::now() + chrono::Duration::seconds(120);
        app.store_tokens(&user, &format!("access-{status}"), &format!("rt-s{status}x"), expires_at).await;
    }
    for status in REDIRECTS {
        let user = format!("refresh-{status}");
        wait_for_request(&provider, "the refresh reached the provider", &format!("refresh_token=rt-s{status}x")).await;
        assert_eq!(app.connection_status(&user).await["status"], "active", "{status}: not reauth_required");
        let stored = app.stored(&user).await.unwrap();
        assert_eq!(stored.access_token.expose(), &format!("access-{status}"), "{status}");
    }

    // A revocation at disconnect (best effort: the user is disconnected all the same).
    for status in REDIRECTS {
        let user = format!("refresh-{status}");
        assert_eq!(app.disconnect(&user).await, 204, "{status}");
        wait_for_request(&provider, "the revocation reached the provider", &format!("token=rt-s{status}x")).await;
    }

    let seen = provider.received();
    assert!(seen.iter().any(|r| r.text().contains(HOSTILE_CLIENT_SECRET)), "the provider got the secret, as it should");
    for status in REDIRECTS {
        assert!(seen.iter().any(|r| r.uri.path() == "/token" && r.text().contains(&format!("code=code-s{status}x"))));
    }
    let leaked = elsewhere.received();
    assert!(
        leaked.is_empty(),
        "the other origin received {} request(s): {:?}",
        leaked.len(),
        leaked.first().map(Received::text)
    );
}

/// Access tokens no MCP request could carry, and one unusable refresh token.
fn bad_answers() -> Vec<(&'static str, Value)> {
    let answer = |access: &str, refresh: &str| json!({ "access_token": access, "token_type": "Bearer", "expires_in": 3600, "refresh_token": refresh });
    vec![
        ("crlf", answer("abc\r\nX-Injected: 1", "good-refresh")),
        ("nul", answer("abc\0def", "good-refresh")),
        ("empty", answer("", "good-refresh")),
        ("one-megabyte", answer(&"a".repeat(1 << 20), "good-refresh")),
        ("refresh-newline", answer("good-access", "rt\nx")),
    ]
}

#[tokio::test]
async fn unusable_tokens_from_the_provider_are_never_stored() {
    let cases = bad_answers();
    let script = cases.clone();
    let (provider, settings) = hostile_provider(move |request| {
        let text = request.text();
        match script.iter().find(|(name, _)| text.contains(&format!("bad-{name}-"))) {
            Some((_, answer)) => json_response(200, answer),
            None => json_response(
                200,
                &json!({ "access_token": "fine-access", "token_type": "bearer", "expires_in": 3600, "refresh_token": "fine-refresh" }),
            ),
        }
    })
    .await;
    let mut overrides = settings;
    overrides.extend(stays_put());
    let app = spawn_app_with(NO_MCP, &overrides).await;
    let events = app.watch_events().await;

    for (name, _) in &cases {
        let user = format!("callback-{name}");
        let (status, page) = callback_with_code(&app, &user, &format!("bad-{name}-code")).await;
        assert_eq!(status, 400, "{name}: {page}");
        assert!(page.contains("unusable token"), "{name}: {page}");
        assert!(app.stored(&user).await.is_none(), "{name}: nothing stored");
    }
    // A good connect after them: its event is the first, so none of the bad ones announced one.
    let (status, _) = callback_with_code(&app, "good", "good-code").await;
    assert_eq!(status, 303);
    let (key, event) = app.next_event(&events).await;
    assert_eq!((key.as_str(), event["user_id"].as_str()), ("token.connected", Some("good")));

    for (name, _) in &cases {
        let user = format!("refresh-{name}");
        let expires_at = Utc::now() + chrono::Duration::seconds(120);
        app.store_tokens(&user, "old-access", &format!("rt-bad-{name}-x"), expires_at).await;
    }
    for (name, _) in &cases {
        let user = format!("refresh-{name}");
        // Twice: the first failure was retried with backoff, and still nothing was stored.
        wait_until("the refresh was tried twice", || async {
            let needle = format!("refresh_token=rt-bad-{name}-x");
            provider.received().iter().filter(|r| r.text().contains(&needle)).count() >= 2
        })
        .await;
        let stored = app.stored(&user).await.unwrap();
        assert_eq!(stored.access_token.expose(), "old-access", "{name}: not stored");
        assert_eq!(stored.refresh_token.expose(), &format!("rt-bad-{name}-x"), "{name}");
        assert_eq!(app.connection_status(&user).await["status"], "active", "{name}: not reauth_required");
    }
}

#[tokio::test]
async fn a_huge_expires_in_answered_to_a_worker_requested_refresh_is_clamped_and_the_job_answered() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let (_provider, settings) = hostile_provider(|_| {
        json_response(
            200,
            &json!({
                "access_token": "renewed-access", "token_type": "Bearer",
                "expires_in": 10_000_000_000_000u64, "refresh_token": "renewed-refresh"
            }),
        )
    })
    .await;
    // The scan sees nothing due (lead 1 s), so only the worker's request causes the refresh.
    let mut overrides = settings;
    overrides.extend([
        ("refresher.interval_secs", json!(3600)),
        ("refresher.lead_secs", json!(1)),
        ("tokens.defer_ms", json!(300)),
    ]);
    let app = spawn_app_with(&server.url(), &overrides).await;
    let before = Utc::now();
    app.store_tokens("alice", "short-access", "short-refresh", before + chrono::Duration::seconds(20)).await;

    app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, _) = app.next_reply().await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["result"]["structuredContent"]["token"], "renewed-access");
    let stored = app.stored("alice").await.unwrap();
    let max = chrono::Duration::seconds(app.settings.providers.qlik.max_token_lifetime_secs as i64);
    assert!(
        stored.expires_at >= before + max && stored.expires_at <= Utc::now() + max,
        "clamped: {}",
        stored.expires_at
    );

    // The process is still serving, and stops cleanly.
    app.call("job-2", "alice", "qlik_whoami", json!({})).await;
    assert_eq!(app.next_reply().await.0["status"], "ok");
    app.stop().await;
}

#[tokio::test]
async fn a_huge_retry_after_is_capped_at_the_refreshers_maximum_backoff() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let (_provider, settings) = hostile_provider(move |_| {
        if counted.fetch_add(1, Ordering::SeqCst) == 0 {
            Response::builder().status(503).header("retry-after", "99999999999999999").body(Body::empty()).unwrap()
        } else {
            json_response(200, &json!({ "access_token": "renewed", "token_type": "bearer", "expires_in": 3600 }))
        }
    })
    .await;
    let mut overrides = settings;
    overrides.extend([
        ("refresher.interval_secs", json!(1)),
        ("refresher.retry_initial_secs", json!(1)),
        ("refresher.retry_max_secs", json!(2)),
    ]);
    let app = spawn_app_with(NO_MCP, &overrides).await;
    app.store_tokens("alice", "old", "refresh", Utc::now() + chrono::Duration::seconds(120)).await;

    wait_until("the token is refreshed after the capped wait", || async {
        app.stored("alice").await.unwrap().access_token.expose() == "renewed"
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one refused, one retried");
}

/// `mcp-worker tokens import` with `env`, `args` and `stdin`.
fn import(env: &[(String, String)], args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-worker"))
        .args(["tokens", "import"])
        .args(args)
        .env_remove("MCP_WORKER_ENV")
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mcp-worker runs");
    // A refused command may exit before reading stdin: a broken pipe is fine then.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn tokens_import_refuses_bad_users_lifetimes_and_tokens_with_exit_2() {
    let settings = test_settings(NO_MCP, &[]);
    let env = worker_env(&settings, &[]);
    let tokens = |access: &str, refresh: &str| json!({ "access_token": access, "refresh_token": refresh }).to_string();
    let good = tokens("imported-access", "imported-refresh");
    let long_user = "u".repeat(256);
    let huge = "a".repeat(1 << 20);
    let cases: Vec<(Vec<&str>, String, &str)> = vec![
        (vec!["--user", ""], good.clone(), "--user"),
        (vec!["--user", "   "], good.clone(), "--user"),
        (vec!["--user", &long_user], good.clone(), "--user"),
        (vec!["--user", "bob", "--expires-in", "9223372036854775807"], good.clone(), "--expires-in"),
        (vec!["--user", "bob", "--expires-in=-1"], good.clone(), "--expires-in"),
        (vec!["--user", "bob", "--expires-in", "59"], good.clone(), "--expires-in"),
        (vec!["--user", "bob"], tokens("secret\r\nvalue", "r"), "access token"),
        (vec!["--user", "bob"], tokens("secret\0value", "r"), "access token"),
        (vec!["--user", "bob"], tokens("", "r"), "access token is empty"),
        (vec!["--user", "bob"], tokens(&huge, "r"), "longer than"),
        (vec!["--user", "bob"], tokens("a", ""), "refresh token is empty"),
    ];
    // Every case is run before failing, so the failure lists all that were let through.
    let mut wrong = Vec::new();
    for (args, stdin, problem) in &cases {
        let output = import(&env, args, stdin);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let refused = output.status.code() == Some(2) && stderr.contains(problem);
        let quiet = !stderr.contains("secret") && !stderr.contains("panicked");
        if !refused || !quiet {
            wrong.push(format!("{args:?} ({} bytes of stdin): exit {:?}: {stderr}", stdin.len(), output.status.code()));
        }
    }
    assert!(wrong.is_empty(), "not refused with exit 2 and a message naming the problem:\n{}", wrong.join("\n"));

    // The same command with good input stores the token.
    let output = import(&env, &["--user", "bob", "--expires-in", "3600"], &good);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let store = mcp_worker::store::Store::connect(&settings.mongodb).await.unwrap();
    let cipher = Arc::new(mcp_worker::crypto::TokenCipher::from_settings(&settings.encryption).unwrap());
    let stored = store.tokens(mcp_worker::provider::Provider::Qlik, &cipher).get("bob").await.unwrap().unwrap();
    assert_eq!(stored.access_token.expose(), "imported-access");
    let left = stored.expires_at - Utc::now();
    assert!(left > chrono::Duration::seconds(3500) && left <= chrono::Duration::seconds(3600), "{left}");
}
