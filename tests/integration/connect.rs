//! The connect flow, disconnect and connection status over HTTP, against the strict in-repo
//! OAuth server, driven as a browser would.

use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

use crate::support::{SERVICE_KEY, confirm, connect_as_browser, no_redirects, spawn_app_with_oauth, walk_flow};

const NO_MCP: &str = "http://127.0.0.1:9/mcp";

#[tokio::test]
async fn connecting_stores_the_tokens_encrypted_and_announces_it() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let events = fx.app.watch_events().await;

    let outcome = connect_as_browser(&fx.app, "alice", "allow").await;
    assert_eq!(outcome.status, 303, "the callback redirects the browser");
    let location = outcome.location.unwrap();
    assert!(location.starts_with("http://127.0.0.1:9/done?from=test"), "{location}");
    assert!(location.contains("status=pending") && location.contains("provider=qlik"), "{location}");
    assert!(outcome.connect_code.is_some(), "the browser brings a connect_code back to the chat: {location}");

    let stored = fx.app.stored("alice").await.expect("tokens stored");
    assert!(fx.oauth.access_token_active(stored.access_token.expose()), "the stored access token is the issued one");
    assert!(fx.oauth.refresh_token_active(stored.refresh_token.expose()));
    let raw = fx.app.db.collection::<Document>("qlik_tokens");
    let document: Document = raw.find_one(doc! { "user_id": "alice" }).await.unwrap().unwrap();
    let text = format!("{document:?}");
    assert!(!text.contains(stored.access_token.expose().as_str()), "plaintext access token in the document");
    assert!(!text.contains(stored.refresh_token.expose().as_str()), "plaintext refresh token in the document");
    assert_eq!(fx.oauth.stats().code_exchanges, 1);

    let (key, event) = fx.app.next_event(&events).await;
    assert_eq!(key, "token.connected");
    assert_eq!(event["user_id"], "alice");
    assert_eq!(event["provider"], "qlik");
}

#[tokio::test]
async fn a_state_works_once_and_unknown_or_denied_flows_store_nothing() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let http = no_redirects();

    let outcome = connect_as_browser(&fx.app, "alice", "allow").await;
    assert_eq!(outcome.status, 303);
    let replay = http.get(&outcome.callback).send().await.unwrap();
    assert_eq!(replay.status(), 400, "a state is single-use");
    assert!(replay.text().await.unwrap().contains("already used"));

    let unknown = http
        .get(format!("{}/v1/connections/qlik/callback?code=x&state=never-issued", fx.app.api))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 400);

    let denied = connect_as_browser(&fx.app, "bob", "deny").await;
    assert_eq!(denied.status, 400);
    assert!(fx.app.stored("bob").await.is_none(), "nothing stored for a denied flow");
}

#[tokio::test]
async fn internal_endpoints_refuse_a_missing_or_wrong_service_key() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let http = reqwest::Client::new();
    let api = &fx.app.api;
    let requests = [
        http.post(format!("{api}/v1/connections/qlik/authorize")).json(&json!({ "user_id": "alice" })),
        http.get(format!("{api}/v1/connections/qlik/alice")),
        http.delete(format!("{api}/v1/connections/qlik/alice")),
    ];
    for request in requests {
        let without = request.try_clone().unwrap().send().await.unwrap();
        assert_eq!(without.status(), 401);
        let wrong = request.try_clone().unwrap().bearer_auth("not-the-key").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let prefix = request.bearer_auth(&SERVICE_KEY[..SERVICE_KEY.len() - 1]).send().await.unwrap();
        assert_eq!(prefix.status(), 401, "a prefix of the key is not the key");
    }
}

#[tokio::test]
async fn authorize_checks_return_to_against_the_allow_list() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/connections/qlik/authorize", fx.app.api))
        .bearer_auth(SERVICE_KEY)
        .json(&json!({ "user_id": "alice", "return_to": "https://evil.test/" }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
}

#[tokio::test]
async fn disconnect_revokes_at_the_provider_deletes_and_repeats_as_204() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let events = fx.app.watch_events().await;
    assert_eq!(connect_as_browser(&fx.app, "alice", "allow").await.status, 303);
    let stored = fx.app.stored("alice").await.unwrap();
    let status = fx.app.connection_status("alice").await;
    assert_eq!(status["connected"], true);
    assert_eq!(status["status"], "active");
    assert!(!status.to_string().contains(stored.access_token.expose().as_str()), "no token in the status");

    assert_eq!(fx.app.disconnect("alice").await, 204);
    assert_eq!(fx.oauth.stats().revocation_requests, 1);
    assert!(!fx.oauth.refresh_token_active(stored.refresh_token.expose()), "the grant is revoked at the provider");
    assert!(fx.app.stored("alice").await.is_none());
    assert_eq!(fx.app.disconnect("alice").await, 204, "repeating is fine");
    assert_eq!(fx.app.connection_status("alice").await, json!({ "connected": false }));

    assert_eq!(fx.app.next_event(&events).await.0, "token.connected");
    assert_eq!(fx.app.next_event(&events).await.0, "token.disconnected");
}

#[tokio::test]
async fn health_and_readiness_answer_without_a_service_key() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let http = reqwest::Client::new();
    let alive = http.get(format!("{}/healthz", fx.app.api)).send().await.unwrap();
    assert_eq!(alive.status(), 200);
    let ready = http.get(format!("{}/readyz", fx.app.api)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body, json!({ "ready": true, "database": true, "broker": true }));
}

#[tokio::test]
async fn the_status_of_a_token_sealed_under_a_retired_key_is_reauth_required() {
    use mcp_worker::config::EncryptionSettings;
    use mcp_worker::crypto::TokenCipher;
    use mcp_worker::secret::Secret;
    use mcp_worker::store::NewTokens;

    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    // Sealed under a key this worker does not have (as after removing a retired key).
    let retired = EncryptionSettings {
        active_key: "old".into(),
        keys: [("old".to_string(), Secret::new("b2xkLWtleS1vbGQta2V5LW9sZC1rZXktb2xkLWtleTE=".to_string()))].into(),
        allow_plaintext_tokens: false,
    };
    let cipher = std::sync::Arc::new(TokenCipher::from_settings(&retired).unwrap());
    let tokens = NewTokens {
        access_token: Secret::new("a".into()),
        refresh_token: Secret::new("r".into()),
        expires_at: chrono::Utc::now() + chrono::Duration::hours(1),
    };
    fx.app
        .store
        .tokens(mcp_worker::provider::Provider::Qlik, &cipher)
        .save("alice", &tokens, chrono::Utc::now())
        .await
        .unwrap();

    assert_eq!(fx.app.connection_status("alice").await, json!({ "connected": true, "status": "reauth_required" }));
}

/// Every valid user id can be asked about and disconnected, the route words, dot-segments and
/// reserved characters included, through `/v1/connections/{provider}?user_id=…`; v1's
/// `/v1/connections/{provider}/{user_id}` keeps working for other ids; a blank id is a 400.
#[tokio::test]
async fn every_user_id_is_reachable_for_status_and_disconnect() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[]).await;
    let http = reqwest::Client::new();
    for user in ["callback", "authorize", "confirm", "users", "a/b c?d#e%f", "élan", "..", "x%2Fy"] {
        fx.app.store_token(user, "t").await;
        let status = fx.app.connection_status(user).await;
        assert_eq!(status["connected"], true, "{user}: {status}");
        assert_eq!(fx.app.disconnect(user).await, 204, "{user}");
        assert!(fx.app.stored(user).await.is_none(), "{user}: deleted");
        assert_eq!(fx.app.connection_status(user).await["connected"], false, "{user}");
    }

    fx.app.store_token("alice", "t").await;
    let v1 = format!("{}/v1/connections/qlik/alice", fx.app.api);
    let status: Value = http.get(&v1).bearer_auth(SERVICE_KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(http.delete(&v1).bearer_auth(SERVICE_KEY).send().await.unwrap().status(), 204);
    assert!(fx.app.stored("alice").await.is_none());
    for blank in ["", "  "] {
        let answer = http.get(fx.app.user_url(blank)).bearer_auth(SERVICE_KEY).send().await.unwrap();
        assert_eq!(answer.status(), 400, "{blank:?}");
    }
    let answer = http.get(format!("{}/v1/connections/qlik", fx.app.api)).bearer_auth(SERVICE_KEY).send().await;
    assert_eq!(answer.unwrap().status(), 400, "no user_id");
}

/// Login CSRF: Mallory starts a flow for her own chat user and gets Alice to finish it signed in
/// as herself at the provider. The callback alone connects no one: the browser comes back to the
/// chat with a connect_code, and Alice's chat session, confirming for Alice, is refused (a flow
/// started for another user), which revokes Alice's grant at once. A flow nobody confirms is
/// dropped when its time is up, and its grant revoked too. Alice's own flow, confirmed for her,
/// works once; a wrong or reused code is refused.
#[tokio::test]
async fn a_flow_is_a_connection_only_once_the_chat_session_that_started_it_confirms_it() {
    let fx = spawn_app_with_oauth(NO_MCP, |_| {}, &[("http.state_ttl_secs", json!(2))]).await;
    let api = fx.app.api.clone();

    // Started for mallory, finished by alice's browser, confirmed by alice's session.
    let lured = walk_flow(&api, "mallory", "alice", "allow").await;
    assert_eq!(lured.status, 303);
    let code = lured.connect_code.expect("a connect_code");
    assert!(fx.app.stored("mallory").await.is_none(), "the callback alone stores nothing");
    assert_eq!(fx.app.connection_status("mallory").await["connected"], false);
    let (status, body) = confirm(&api, "alice", &code).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not issued for this user"), "{body}");
    assert!(fx.app.stored("alice").await.is_none() && fx.app.stored("mallory").await.is_none());
    assert_eq!(fx.oauth.stats().grants_revoked, 1, "alice's grant is revoked at once");
    assert_eq!(confirm(&api, "mallory", &code).await.0, 400, "and the code is spent");

    // Never confirmed: dropped once the state TTL has passed, its grant revoked.
    let abandoned = walk_flow(&api, "mallory", "alice", "allow").await;
    assert!(abandoned.connect_code.is_some());
    crate::support::wait_until("the unconfirmed flow's grant is revoked", || async {
        fx.oauth.stats().grants_revoked == 2
    })
    .await;
    assert_eq!(confirm(&api, "mallory", &abandoned.connect_code.unwrap()).await.0, 400, "too late");
    assert!(fx.app.stored("mallory").await.is_none());

    // Alice's own flow, confirmed for her: connected, once.
    let own = walk_flow(&api, "alice", "alice", "allow").await;
    let code = own.connect_code.unwrap();
    assert_eq!(confirm(&api, "alice", "not-a-code").await.0, 400, "a wrong code");
    assert_eq!(confirm(&api, "alice", &code).await.0, 204);
    let stored = fx.app.stored("alice").await.expect("alice is connected");
    assert!(fx.oauth.refresh_token_active(stored.refresh_token.expose()));
    assert_eq!(confirm(&api, "alice", &code).await.0, 400, "a code works once");
    assert_eq!(fx.oauth.stats().grants_revoked, 2, "alice's own grant stays");
}
