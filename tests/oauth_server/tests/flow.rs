//! End-to-end behaviour of the server over HTTP, as mcp-worker's client sees it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use oauth_test_server::{Config, ErrorStyle, OAuthServer};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const ID: &str = "mcp-worker";
const SECRET: &str = "test-secret";

struct Harness {
    server: OAuthServer,
    base: String,
    http: reqwest::Client,
}

fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(&verifier));
    (verifier, challenge)
}

fn query(location: &str) -> std::collections::HashMap<String, String> {
    reqwest::Url::parse(location).unwrap().query_pairs().into_owned().collect()
}

impl Harness {
    async fn new(config: Config) -> Self {
        let (server, base) = OAuthServer::spawn(Config { redirect_uris: vec![REDIRECT.into()], ..config }).await;
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { server, base, http }
    }

    async fn default() -> Self {
        Self::new(Config::default()).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The login form's fields, as the browser would POST them.
    fn login_form<'a>(&self, challenge: &'a str, scope: &'a str, decision: &'a str) -> Vec<(&'static str, &'a str)> {
        vec![
            ("response_type", "code"),
            ("client_id", ID),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", "xyz"),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
            ("username", "alice"),
            ("decision", decision),
        ]
    }

    /// Runs /authorize and /login; returns the code.
    async fn code(&self, challenge: &str, scope: &str) -> String {
        let page = self
            .http
            .get(self.url("/authorize"))
            .query(&[
                ("response_type", "code"),
                ("client_id", ID),
                ("redirect_uri", REDIRECT),
                ("scope", scope),
                ("state", "xyz"),
                ("code_challenge", challenge),
                ("code_challenge_method", "S256"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        let html = page.text().await.unwrap();
        for field in
            ["response_type", "client_id", "redirect_uri", "scope", "state", "code_challenge", "code_challenge_method"]
        {
            assert!(html.contains(&format!("type=\"hidden\" name=\"{field}\"")), "{field} missing from {html}");
        }
        let response =
            self.http.post(self.url("/login")).form(&self.login_form(challenge, scope, "allow")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::FOUND);
        let location = response.headers()["location"].to_str().unwrap();
        assert!(location.starts_with(REDIRECT), "{location}");
        let params = query(location);
        assert_eq!(params["state"], "xyz");
        params["code"].clone()
    }

    /// POSTs to /token with client_secret_basic.
    async fn token(&self, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = self.http.post(self.url("/token")).basic_auth(ID, Some(SECRET)).form(form).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn exchange(&self, code: &str, verifier: &str) -> (StatusCode, Value) {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ])
        .await
    }

    async fn refresh(&self, refresh_token: &str) -> (StatusCode, Value) {
        self.token(&[("grant_type", "refresh_token"), ("refresh_token", refresh_token)]).await
    }

    /// A fresh grant through the browser flow: (access_token, refresh_token).
    async fn connect(&self) -> (String, String) {
        let (verifier, challenge) = pkce();
        let code = self.code(&challenge, "user_default offline_access").await;
        let (status, body) = self.exchange(&code, &verifier).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["access_token"].as_str().unwrap().into(), body["refresh_token"].as_str().unwrap().into())
    }
}

#[tokio::test]
async fn code_pkce_flow_issues_tokens() {
    let h = Harness::default().await;
    let (verifier, challenge) = pkce();
    let code = h.code(&challenge, "user_default offline_access").await;
    assert!(URL_SAFE_NO_PAD.decode(&code).unwrap().len() >= 16);

    let response = h
        .http
        .post(h.url("/token"))
        .basic_auth(ID, Some(SECRET))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert_eq!(response.headers()["pragma"], "no-cache");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "user_default offline_access");
    let access_token = body["access_token"].as_str().unwrap();
    assert!(h.server.access_token_active(access_token));
    assert!(h.server.refresh_token_active(body["refresh_token"].as_str().unwrap()));

    let introspection: Value = h
        .http
        .post(h.url("/introspect"))
        .form(&[("token", access_token), ("client_id", ID), ("client_secret", SECRET)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(introspection["active"], true);
    assert_eq!(introspection["username"], "alice");
    assert_eq!(introspection["scope"], "user_default offline_access");

    let stats = h.server.stats();
    assert_eq!((stats.authorize_requests, stats.code_exchanges), (1, 1));
}

#[tokio::test]
async fn no_refresh_token_without_offline_access() {
    let h = Harness::default().await;
    let (verifier, challenge) = pkce();
    let code = h.code(&challenge, "user_default").await;
    let (status, body) = h.exchange(&code, &verifier).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none(), "{body}");
}

#[tokio::test]
async fn wrong_verifier_is_invalid_grant() {
    let h = Harness::default().await;
    let (_, challenge) = pkce();
    let (other_verifier, _) = pkce();
    let code = h.code(&challenge, "offline_access").await;
    let (status, body) = h.exchange(&code, &other_verifier).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
}

#[tokio::test]
async fn redirect_uri_must_match_the_authorization_request() {
    let h = Harness::default().await;
    let (verifier, challenge) = pkce();
    let code = h.code(&challenge, "offline_access").await;
    let (status, body) = h
        .token(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "http://127.0.0.1:9/other"),
            ("code_verifier", &verifier),
        ])
        .await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
}

#[tokio::test]
async fn code_reuse_is_rejected_and_revokes_the_grant() {
    let h = Harness::default().await;
    let (verifier, challenge) = pkce();
    let code = h.code(&challenge, "offline_access").await;
    let (status, first) = h.exchange(&code, &verifier).await;
    assert_eq!(status, StatusCode::OK);
    let (status, second) = h.exchange(&code, &verifier).await;
    assert_eq!((status, second["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert!(!h.server.access_token_active(first["access_token"].as_str().unwrap()));
    assert!(!h.server.refresh_token_active(first["refresh_token"].as_str().unwrap()));
    assert_eq!(h.server.stats().grants_revoked, 1);
}

#[tokio::test]
async fn refresh_rotates_the_refresh_token() {
    let h = Harness::default().await;
    let (access_token, refresh_token) = h.connect().await;
    let (status, body) = h.refresh(&refresh_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let new_refresh = body["refresh_token"].as_str().unwrap();
    let new_access = body["access_token"].as_str().unwrap();
    assert_ne!(new_refresh, refresh_token);
    assert!(h.server.refresh_token_active(new_refresh));
    assert!(!h.server.refresh_token_active(&refresh_token));
    // Rotation does not cut short access tokens already handed out.
    assert!(h.server.access_token_active(&access_token));
    assert!(h.server.access_token_active(new_access));
    let stats = h.server.stats();
    assert_eq!((stats.refresh_requests, stats.refresh_successes, stats.refresh_request_times_ms.len()), (1, 1, 1));
}

#[tokio::test]
async fn used_refresh_token_revokes_the_grant() {
    let h = Harness::default().await;
    let (_, old_refresh) = h.connect().await;
    let (_, rotated) = h.refresh(&old_refresh).await;
    let (newest_access, newest_refresh) =
        (rotated["access_token"].as_str().unwrap(), rotated["refresh_token"].as_str().unwrap());

    let (status, body) = h.refresh(&old_refresh).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert!(!h.server.access_token_active(newest_access));
    assert!(!h.server.refresh_token_active(newest_refresh));
    let (status, _) = h.refresh(newest_refresh).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let stats = h.server.stats();
    assert_eq!((stats.refresh_token_reuse, stats.grants_revoked), (1, 1));
    assert_eq!((stats.refresh_requests, stats.refresh_successes), (3, 1));
}

#[tokio::test]
async fn qlik_style_answers_bad_refresh_tokens_with_401() {
    let h = Harness::new(Config { error_style: ErrorStyle::Qlik, ..Config::default() }).await;
    let issued = h.server.issue_grant("bob", "user_default offline_access", Duration::from_secs(60));
    let (status, _) = h.refresh(&issued.refresh_token).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = h.refresh(&issued.refresh_token).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_grant")));
    let (status, _) = h.refresh("garbage").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn client_authentication_methods() {
    let h = Harness::default().await;
    let issued = h.server.issue_grant("carol", "offline_access", Duration::from_secs(60));
    let send = |form: Vec<(&'static str, String)>, basic: Option<(&'static str, &'static str)>| {
        let mut request = h.http.post(h.url("/token")).form(&form);
        if let Some((id, secret)) = basic {
            request = request.basic_auth(id, Some(secret));
        }
        request.send()
    };
    let refresh = |rt: &str| vec![("grant_type", String::from("refresh_token")), ("refresh_token", String::from(rt))];
    let post_credentials = [("client_id", ID.to_owned()), ("client_secret", SECRET.to_owned())];

    // client_secret_basic
    let response = send(refresh(&issued.refresh_token), Some((ID, SECRET))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let rt = response.json::<Value>().await.unwrap()["refresh_token"].as_str().unwrap().to_owned();

    // client_secret_post
    let response = send([refresh(&rt), post_credentials.to_vec()].concat(), None).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let rt = response.json::<Value>().await.unwrap()["refresh_token"].as_str().unwrap().to_owned();

    // Both at once.
    let response = send([refresh(&rt), post_credentials.to_vec()].concat(), Some((ID, SECRET))).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "invalid_request");

    // Wrong secret, and no credentials at all.
    for basic in [Some((ID, "wrong")), None] {
        let response = send(refresh(&rt), basic).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], r#"Basic realm="oauth-test-server""#);
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "invalid_client");
    }
    // None of the rejected requests rotated the token.
    assert!(h.server.refresh_token_active(&rt));
}

#[tokio::test]
async fn malformed_token_requests() {
    let h = Harness::default().await;
    let response = h
        .http
        .post(h.url("/token"))
        .basic_auth(ID, Some(SECRET))
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"refresh_token"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "invalid_request");

    let (status, body) = h.token(&[("grant_type", "password")]).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("unsupported_grant_type")));
    let (status, body) = h.token(&[("grant_type", "refresh_token")]).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    assert!(body["error_description"].as_str().unwrap().contains("refresh_token"));
    let (status, body) =
        h.token(&[("grant_type", "refresh_token"), ("refresh_token", "a"), ("refresh_token", "b")]).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
}

#[tokio::test]
async fn revoking_the_refresh_token_kills_the_grant() {
    let h = Harness::default().await;
    let (access_token, refresh_token) = h.connect().await;
    let response = h
        .http
        .post(h.url("/revoke"))
        .basic_auth(ID, Some(SECRET))
        .form(&[("token", refresh_token.as_str()), ("token_type_hint", "refresh_token")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().is_empty());
    assert!(!h.server.access_token_active(&access_token));
    assert!(!h.server.refresh_token_active(&refresh_token));
    let (status, _) = h.refresh(&refresh_token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let response = h
        .http
        .post(h.url("/revoke"))
        .basic_auth(ID, Some(SECRET))
        .form(&[("token", "never-issued")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = h.http.post(h.url("/revoke")).form(&[("token", "never-issued")]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let stats = h.server.stats();
    assert_eq!((stats.revocation_requests, stats.grants_revoked, stats.refresh_token_reuse), (3, 1, 0));
}

#[tokio::test]
async fn revoking_an_access_token_leaves_the_grant() {
    let h = Harness::default().await;
    let issued = h.server.issue_grant("dave", "offline_access", Duration::from_secs(60));
    let response = h
        .http
        .post(h.url("/revoke"))
        .basic_auth(ID, Some(SECRET))
        .form(&[("token", issued.access_token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!h.server.access_token_active(&issued.access_token));
    assert!(h.server.refresh_token_active(&issued.refresh_token));
}

#[tokio::test]
async fn injected_failures_consume_nothing() {
    let h = Harness::default().await;
    let (verifier, challenge) = pkce();
    let code = h.code(&challenge, "offline_access").await;
    h.server.fail_next_token_requests(2, 503, "temporarily_unavailable");
    for _ in 0..2 {
        let response = h
            .http
            .post(h.url("/token"))
            .basic_auth(ID, Some(SECRET))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "temporarily_unavailable");
    }
    let (status, body) = h.exchange(&code, &verifier).await;
    assert_eq!(status, StatusCode::OK);

    h.server.fail_next_token_requests(1, 429, "slow_down");
    let rt = body["refresh_token"].as_str().unwrap();
    let (status, _) = h.refresh(rt).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(h.server.refresh_token_active(rt));
    let (status, _) = h.refresh(rt).await;
    assert_eq!(status, StatusCode::OK);

    let stats = h.server.stats();
    assert_eq!((stats.failed_by_injection, stats.refresh_requests, stats.refresh_token_reuse), (3, 2, 0));
}

#[tokio::test]
async fn authorization_errors() {
    let h = Harness::default().await;
    let (_, challenge) = pkce();
    let authorize = |params: Vec<(&'static str, &str)>| h.http.get(h.url("/authorize")).query(&params).send();
    let base = || vec![("response_type", "code"), ("client_id", ID), ("redirect_uri", REDIRECT), ("state", "s1")];

    // Missing PKCE, or plain PKCE: redirected back with invalid_request.
    let plain = [("code_challenge", challenge.as_str()), ("code_challenge_method", "plain")];
    for extra in [vec![], plain.to_vec()] {
        let response = authorize([base(), extra].concat()).await.unwrap();
        assert_eq!(response.status(), StatusCode::FOUND);
        let params = query(response.headers()["location"].to_str().unwrap());
        assert_eq!((params["error"].as_str(), params["state"].as_str()), ("invalid_request", "s1"));
    }

    // Unknown client or unregistered redirect URI: an error page, never a redirect.
    let s256 = [("code_challenge", challenge.as_str()), ("code_challenge_method", "S256")];
    let bad_client = vec![("response_type", "code"), ("client_id", "evil"), ("redirect_uri", REDIRECT)];
    let bad_redirect =
        vec![("response_type", "code"), ("client_id", ID), ("redirect_uri", "http://127.0.0.1:9/callbackx")];
    for params in [bad_client, bad_redirect] {
        let response = authorize([params, s256.to_vec()].concat()).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().get("location").is_none());
    }

    // The user says no.
    let response = h.http.post(h.url("/login")).form(&h.login_form(&challenge, "", "deny")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    let params = query(response.headers()["location"].to_str().unwrap());
    assert_eq!((params["error"].as_str(), params["state"].as_str()), ("access_denied", "xyz"));
}

#[tokio::test]
async fn login_only_accepts_known_users() {
    let h = Harness::new(Config { users: vec!["bob".into()], ..Config::default() }).await;
    let (_, challenge) = pkce();
    let response = h.http.post(h.url("/login")).form(&h.login_form(&challenge, "", "allow")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(h.server.stats().code_exchanges == 0);
}

#[tokio::test]
async fn stats_endpoint() {
    let h = Harness::default().await;
    h.connect().await;
    let stats: Value = h.http.get(h.url("/_test/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["authorize_requests"], 1);
    assert_eq!(stats["code_exchanges"], 1);
}
