//! The refresher against the strict in-repo OAuth server: proactive refresh, failures, the
//! worker deferring a job rather than refreshing inline, and several processes sharing tokens.

use std::process::{Child, Stdio};
use std::time::Duration;

use chrono::Utc;
use mcp_worker::config::Settings;
use mcp_worker::crypto::TokenCipher;
use mcp_worker::provider::Provider;
use mcp_worker::secret::Secret;
use mcp_worker::store::{NewTokens, Store, TokenStatus, TokenStore};
use oauth_test_server::{IssuedTokens, OAuthServer};
use serde_json::{Value, json};

use crate::support::{
    Flavor, McpServer, spawn_app_with_oauth, spawn_oauth, spawn_worker, terminate, test_settings, wait_until,
    worker_env,
};

const NO_MCP: &str = "http://127.0.0.1:9/mcp";

fn quick_refresher() -> Vec<(&'static str, Value)> {
    vec![
        ("refresher.interval_secs", json!(1)),
        ("refresher.retry_initial_secs", json!(1)),
        ("refresher.retry_max_secs", json!(2)),
    ]
}

#[tokio::test]
async fn a_token_nearing_expiry_is_refreshed_before_it_expires_without_any_job() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &quick_refresher()).await;
    let issued = fx.oauth.issue_grant("alice", "user_default offline_access", Duration::from_secs(300));
    let expires_at = Utc::now() + chrono::Duration::seconds(300);
    fx.app.store_tokens("alice", &issued.access_token, &issued.refresh_token, expires_at).await;

    wait_until("the token is refreshed", || async {
        fx.app.stored("alice").await.unwrap().access_token.expose() != &issued.access_token
    })
    .await;
    assert!(Utc::now() < expires_at, "refreshed before it expired");
    let stored = fx.app.stored("alice").await.unwrap();
    assert!(fx.oauth.access_token_active(stored.access_token.expose()));
    assert!(fx.oauth.refresh_token_active(stored.refresh_token.expose()), "the rotated refresh token was stored");
    assert!(stored.expires_at > expires_at);
    let stats = fx.oauth.stats();
    assert_eq!((stats.refresh_successes, stats.refresh_token_reuse, stats.grants_revoked), (1, 0, 0), "{stats:?}");
}

#[tokio::test]
async fn a_refused_grant_becomes_reauth_required_with_an_event_and_later_jobs_are_told() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let fx = spawn_app_with_oauth(&server.url(), |_| {}, &quick_refresher()).await;
    let events = fx.app.watch_events().await;
    // A refresh token the provider never issued: invalid_grant.
    fx.app.store_tokens("alice", "some-access", "never-issued", Utc::now() + chrono::Duration::seconds(120)).await;

    let (key, event) = fx.app.next_event(&events).await;
    assert_eq!(key, "token.reauth_required");
    assert_eq!(event["user_id"], "alice");
    assert!(!event["reason"].as_str().unwrap().contains("cut off"), "no earlier refresh was cut off: {event}");
    assert_eq!(fx.app.connection_status("alice").await["status"], "reauth_required");

    fx.app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, _) = fx.app.next_reply().await;
    assert_eq!(reply["error"]["code"], "reauth_required", "{reply}");
    assert_eq!(reply["error"]["retryable"], false);
    assert_eq!(reply["error"]["provider"], "qlik");
    assert!(server.tool_calls().is_empty());
}

#[tokio::test]
async fn a_transient_failure_is_retried_until_the_refresh_succeeds() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &quick_refresher()).await;
    fx.oauth.fail_next_token_requests(2, 503, "temporarily_unavailable");
    let issued = fx.oauth.issue_grant("alice", "offline_access", Duration::from_secs(300));
    fx.app
        .store_tokens("alice", &issued.access_token, &issued.refresh_token, Utc::now() + chrono::Duration::seconds(300))
        .await;

    wait_until("the token is refreshed", || async {
        fx.app.stored("alice").await.unwrap().access_token.expose() != &issued.access_token
    })
    .await;
    let stats = fx.oauth.stats();
    assert_eq!(stats.failed_by_injection, 2, "{stats:?}");
    assert_eq!((stats.refresh_successes, stats.refresh_token_reuse), (1, 0), "{stats:?}");
    assert!(fx.oauth.refresh_token_active(fx.app.stored("alice").await.unwrap().refresh_token.expose()));
}

#[tokio::test]
async fn a_token_too_short_for_the_call_defers_the_job_until_the_refresher_renewed_it() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    // The scan sees nothing due (lead 1 s), so only the worker's request can cause the refresh.
    let overrides =
        [("refresher.interval_secs", json!(3600)), ("refresher.lead_secs", json!(1)), ("tokens.defer_ms", json!(300))];
    let fx = spawn_app_with_oauth(&server.url(), |_| {}, &overrides).await;
    let issued = fx.oauth.issue_grant("alice", "offline_access", Duration::from_secs(20));
    // 20 s left, less than the 10 s call timeout plus 30 s clock skew the call needs.
    fx.app
        .store_tokens("alice", &issued.access_token, &issued.refresh_token, Utc::now() + chrono::Duration::seconds(20))
        .await;

    fx.app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, _) = fx.app.next_reply().await;

    assert_eq!(reply["status"], "ok", "{reply}");
    let renewed = fx.app.stored("alice").await.unwrap();
    assert_ne!(renewed.access_token.expose(), &issued.access_token);
    assert_eq!(reply["result"]["structuredContent"]["token"], renewed.access_token.expose().as_str());
    let seen: Vec<_> = server.tool_calls().into_iter().map(|c| c.x_qlik_access_token).collect();
    assert_eq!(seen, vec![Some(renewed.access_token.expose().clone())], "the old token never reached the server");
    assert_eq!(fx.oauth.stats().refresh_successes, 1);
}

#[tokio::test]
async fn a_job_whose_token_cannot_be_renewed_in_time_gets_token_unavailable() {
    let server = McpServer::spawn(Flavor::V2Json).await;
    let overrides = [
        ("refresher.interval_secs", json!(3600)),
        ("refresher.lead_secs", json!(1)),
        ("refresher.retry_initial_secs", json!(3600)),
        ("tokens.defer_ms", json!(100)),
        ("tokens.max_deferrals", json!(2)),
    ];
    let fx = spawn_app_with_oauth(&server.url(), |_| {}, &overrides).await;
    // The provider is down for longer than the job may wait.
    fx.oauth.fail_next_token_requests(100, 503, "temporarily_unavailable");
    let issued = fx.oauth.issue_grant("alice", "offline_access", Duration::from_secs(20));
    fx.app
        .store_tokens("alice", &issued.access_token, &issued.refresh_token, Utc::now() + chrono::Duration::seconds(20))
        .await;

    fx.app.call("job-1", "alice", "qlik_whoami", json!({})).await;
    let (reply, _) = fx.app.next_reply().await;
    assert_eq!(reply["error"]["code"], "token_unavailable", "{reply}");
    assert_eq!(reply["error"]["retryable"], true);
    assert!(server.tool_calls().is_empty());
}

/// `count` users (`user-0`…) with a grant at `oauth` each, stored as connected and due for
/// refresh (two minutes left, inside the default lead time); the store and the grants' tokens.
async fn connected_users(oauth: &OAuthServer, settings: &Settings, count: usize) -> (TokenStore, Vec<IssuedTokens>) {
    let store = Store::connect(&settings.mongodb).await.unwrap();
    store.migrate(&mcp_worker::store::embedded_migrations().unwrap()).await.unwrap();
    let cipher = std::sync::Arc::new(TokenCipher::from_settings(&settings.encryption).unwrap());
    let tokens = store.tokens(Provider::Qlik, &cipher);
    let mut issued = Vec::new();
    for user in 0..count {
        let grant = oauth.issue_grant(&format!("user-{user}"), "offline_access", Duration::from_secs(120));
        let new = NewTokens {
            access_token: Secret::new(grant.access_token.clone()),
            refresh_token: Secret::new(grant.refresh_token.clone()),
            expires_at: Utc::now() + chrono::Duration::seconds(120),
        };
        tokens.save(&format!("user-{user}"), &new, Utc::now()).await.unwrap();
        issued.push(grant);
    }
    (tokens, issued)
}

#[tokio::test]
async fn three_processes_share_200_tokens_and_never_present_a_used_refresh_token() {
    let (oauth, provider) = spawn_oauth(|_| {}).await;
    let settings = test_settings(NO_MCP, &provider);
    let (tokens, issued) = connected_users(&oauth, &settings, 200).await;

    let mut extra = provider.clone();
    // Three processes on one host: each binds its health and metrics listener on a port of its own.
    extra.extend([
        ("refresher.interval_secs", json!(1)),
        ("telemetry.filter", json!("warn")),
        ("http.listen", json!("127.0.0.1:0")),
    ]);
    let env = worker_env(&settings, &extra);
    let mut processes: Vec<Child> =
        (0..3).map(|_| spawn_worker(&["run", "--roles", "refresher"], &env, Stdio::inherit())).collect();

    wait_until("all 200 tokens are refreshed", || async { oauth.stats().refresh_successes >= 200 }).await;
    // Give any straggler time to (wrongly) refresh again before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for process in &mut processes {
        assert!(terminate(process), "a refresher process exits cleanly on SIGTERM");
    }

    let stats = oauth.stats();
    assert_eq!(stats.refresh_token_reuse, 0, "a used refresh token was presented: {stats:?}");
    assert_eq!(stats.grants_revoked, 0, "{stats:?}");
    assert_eq!(stats.refresh_successes, 200, "each token refreshed exactly once: {stats:?}");
    for (user, grant) in issued.iter().enumerate() {
        let stored = tokens.get(&format!("user-{user}")).await.unwrap().unwrap();
        assert_ne!(stored.refresh_token.expose(), &grant.refresh_token);
        assert!(oauth.refresh_token_active(stored.refresh_token.expose()), "user-{user} holds a live refresh token");
    }
}

/// A rolling deploy SIGTERMs refreshers while refreshes are in flight. A strict provider rotates
/// the refresh token when it answers; a refresher that exits before writing the new one leaves
/// the old one stored, the next refresher presents it, and the provider revokes the grant. So a
/// SIGTERMed refresher claims nothing new but finishes and writes the refreshes in flight, and
/// exits well inside the grace period. Tokens here live 60 s, inside the 600 s lead time, so
/// every scan finds all ten due and every SIGTERM lands among answers the provider takes 1 s to
/// send.
#[tokio::test]
async fn sigterm_during_slow_refreshes_never_costs_a_user_their_grant() {
    const USERS: usize = 10;
    const ROUNDS: usize = 8;
    let grace = Duration::from_secs(30);
    let (oauth, provider) = spawn_oauth(|config| {
        config.refresh_answer_delay = Duration::from_secs(1);
        config.access_token_ttl = Duration::from_secs(60);
    })
    .await;
    let settings = test_settings(NO_MCP, &provider);
    let (tokens, _) = connected_users(&oauth, &settings, USERS).await;
    let mut extra = provider.clone();
    extra.extend([
        ("refresher.interval_secs", json!(1)),
        ("telemetry.filter", json!("warn")),
        ("http.listen", json!("127.0.0.1:0")),
        ("worker.shutdown_grace_secs", json!(grace.as_secs())),
    ]);
    let env = worker_env(&settings, &extra);

    for round in 0..ROUNDS {
        let before = oauth.stats().refresh_requests;
        let mut process = spawn_worker(&["run", "--roles", "refresher"], &env, Stdio::inherit());
        wait_until("a refresh is in flight", || async { oauth.stats().refresh_requests > before }).await;
        let _ = std::process::Command::new("kill").arg(process.id().to_string()).status();
        let exited = tokio::task::spawn_blocking(move || {
            let until = std::time::Instant::now() + grace;
            while std::time::Instant::now() < until {
                if let Some(status) = process.try_wait().unwrap() {
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = process.kill();
            let _ = process.wait();
            None
        })
        .await
        .unwrap();
        let status = exited.unwrap_or_else(|| panic!("round {round}: still running {grace:?} after SIGTERM"));
        assert!(status.success(), "round {round}: {status}");
    }

    let stats = oauth.stats();
    assert!(stats.refresh_successes >= ROUNDS as u64, "refreshes were in flight: {stats:?}");
    assert_eq!(stats.refresh_token_reuse, 0, "a rotated-away refresh token was presented: {stats:?}");
    assert_eq!(stats.grants_revoked, 0, "{stats:?}");
    for user in 0..USERS {
        let stored = tokens.get(&format!("user-{user}")).await.unwrap().unwrap();
        assert_eq!(stored.status, TokenStatus::Active, "user-{user}");
        assert!(oauth.refresh_token_active(stored.refresh_token.expose()), "user-{user} holds the live refresh token");
    }
}

/// A due token the refresher cannot read (a value not sealed by any configured key, a field of
/// the wrong type) is retired once: `reauth_required` in the database, with the event and the
/// reason, and the provider never asked. Before, it was claimed, given up and retried at every
/// lease, by every replica, for ever, and stayed in the backlog gauges.
#[tokio::test]
async fn a_due_token_that_cannot_be_read_is_retired_once_with_the_event() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &quick_refresher()).await;
    let events = fx.app.watch_events().await;
    let collection = fx.app.db.collection::<mongodb::bson::Document>("qlik_tokens");
    let soon = mongodb::bson::DateTime::from_millis((Utc::now() + chrono::Duration::seconds(120)).timestamp_millis());
    let now = mongodb::bson::DateTime::now();
    let unreadable = [
        ("user-seal", mongodb::bson::doc! { "access_token": "not-sealed", "refresh_token": "not-sealed" }),
        ("user-shape", mongodb::bson::doc! { "access_token": 12345_i64, "refresh_token": "r" }),
    ];
    for (user, mut document) in unreadable.clone() {
        document.extend(mongodb::bson::doc! {
            "user_id": user, "expires_at": soon, "created_at": now, "updated_at": now, "version": 1_i64,
        });
        collection.insert_one(document).await.unwrap();
    }

    let mut retired = std::collections::BTreeMap::new();
    for _ in 0..unreadable.len() {
        let (key, event) = fx.app.next_event(&events).await;
        assert_eq!(key, "token.reauth_required", "{event}");
        retired.insert(event["user_id"].as_str().unwrap().to_owned(), event["reason"].as_str().unwrap().to_owned());
    }
    assert!(retired["user-shape"].contains("access_token"), "the reason names the field: {retired:?}");
    assert!(!retired["user-shape"].contains("12345"), "never a stored value: {retired:?}");
    for (user, _) in &unreadable {
        let stored = collection.find_one(mongodb::bson::doc! { "user_id": user }).await.unwrap().unwrap();
        assert_eq!(stored.get_str("status").unwrap(), "reauth_required", "{user}: {stored}");
        assert!(!stored.contains_key("lease_owner"), "{user}: the lease was given back");
    }
    // Several more scans (one a second) find nothing due: retired once, never retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(fx.oauth.stats().refresh_requests, 0, "the provider is never asked");
    let metrics = reqwest::get(format!("{}/metrics", fx.app.api)).await.unwrap().text().await.unwrap();
    let line = |name: &str| metrics.lines().find(|l| l.starts_with(name)).map(str::to_owned);
    assert_eq!(
        line("mcp_worker_token_refreshes_total{outcome=\"reauth_required\"}").as_deref(),
        Some("mcp_worker_token_refreshes_total{outcome=\"reauth_required\"} 2"),
        "{metrics}"
    );
}

/// A refresher killed between the provider's answer and its write leaves the lease to lapse with
/// its owner still on the document, and the stored refresh token was rotated away. The next
/// refresh is refused; its log and event say an earlier refresh was cut off, so operators can
/// tell it from the user revoking access.
#[tokio::test]
async fn a_refusal_after_a_lapsed_lease_says_an_earlier_refresh_was_cut_off() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &quick_refresher()).await;
    let events = fx.app.watch_events().await;
    // What a killed refresher leaves: a refresh token the provider no longer honours, and its
    // lease, lapsed, with its owner.
    fx.app.store_tokens("alice", "some-access", "rotated-away", Utc::now() + chrono::Duration::seconds(120)).await;
    let lapsed = mongodb::bson::DateTime::from_millis((Utc::now() - chrono::Duration::seconds(5)).timestamp_millis());
    let killed = mongodb::bson::doc! { "$set": { "lease_owner": "killed-replica", "lease_until": lapsed } };
    let collection = fx.app.db.collection::<mongodb::bson::Document>("qlik_tokens");
    collection.update_one(mongodb::bson::doc! { "user_id": "alice" }, killed).await.unwrap();

    let (key, event) = fx.app.next_event(&events).await;
    assert_eq!(key, "token.reauth_required");
    assert!(event["reason"].as_str().unwrap().contains("earlier refresh was cut off"), "{event}");
}
