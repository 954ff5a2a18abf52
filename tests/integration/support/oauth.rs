//! The OAuth side of tests: the strict in-repo authorization server (`oauth-test-server`) in
//! process, a worker configured against it, and a browser-like walk through the connect flow.

use std::net::TcpListener;

use oauth_test_server::{Config, OAuthServer};
use serde_json::{Value, json};

use super::{SERVICE_KEY, TestApp, spawn_app_with};

/// A worker whose Qlik provider is the in-repo OAuth server.
pub struct OAuthFixture {
    pub app: TestApp,
    pub oauth: OAuthServer,
}

/// Where test callbacks may send the browser afterwards (nothing listens there).
pub const RETURN_TO: &str = "http://127.0.0.1:9/done";

/// Starts an OAuth server (`configure` adjusts its config) and a worker using it as provider.
pub async fn spawn_app_with_oauth(
    mcp_url: &str,
    configure: impl FnOnce(&mut Config),
    overrides: &[(&str, Value)],
) -> OAuthFixture {
    let (oauth, mut all) = spawn_oauth(configure).await;
    all.extend(overrides.iter().cloned());
    OAuthFixture { app: spawn_app_with(mcp_url, &all).await, oauth }
}

/// Starts an OAuth server and returns the settings that make a worker use it as the Qlik
/// provider, its API on a port chosen here and registered as the callback.
pub async fn spawn_oauth(configure: impl FnOnce(&mut Config)) -> (OAuthServer, Vec<(&'static str, Value)>) {
    // The callback URL must be registered before either side starts, so the API's port is
    // chosen first.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let callback = format!("http://127.0.0.1:{port}/v1/connections/qlik/callback");
    let mut config = Config { redirect_uris: vec![callback.clone()], ..Config::default() };
    configure(&mut config);
    let (oauth, base) = OAuthServer::spawn(config.clone()).await;
    let settings = vec![
        ("http.listen", json!(format!("127.0.0.1:{port}"))),
        ("http.return_to_allowlist", json!(["http://127.0.0.1:9/"])),
        ("providers.qlik.client_id", json!(config.client_id)),
        ("providers.qlik.client_secret", json!(config.client_secret)),
        ("providers.qlik.authorize_url", json!(format!("{base}/authorize"))),
        ("providers.qlik.token_url", json!(format!("{base}/token"))),
        ("providers.qlik.revoke_url", json!(format!("{base}/revoke"))),
        ("providers.qlik.redirect_uri", json!(callback)),
        ("providers.qlik.rate_limit_per_minute", json!(60_000)),
    ];
    (oauth, settings)
}

/// What the browser saw at the end of a connect flow.
pub struct BrowserOutcome {
    /// The status of the API's callback answer.
    pub status: u16,
    /// Where the callback sent the browser, if it redirected.
    pub location: Option<String>,
    /// The `connect_code` in that location, when the flow awaits confirmation.
    pub connect_code: Option<String>,
    /// The callback URL the provider sent the browser to (to replay it).
    pub callback: String,
}

/// An HTTP client that follows no redirect, so a test sees each one the service answers.
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Starts a connect flow for `user` through the API at `api` (with `return_to`, if given);
/// returns the provider's authorize URL it answered.
pub async fn start_connect(http: &reqwest::Client, api: &str, user: &str, return_to: Option<&str>) -> String {
    let mut body = json!({ "user_id": user });
    if let Some(return_to) = return_to {
        body["return_to"] = json!(return_to);
    }
    let started: Value = http
        .post(format!("{api}/v1/connections/qlik/authorize"))
        .bearer_auth(SERVICE_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    started["authorize_url"].as_str().unwrap().to_owned()
}

/// Starts a connect flow for `user` through the API, walks it as that user's browser
/// ([`walk_flow`]) and, as the chat backend would for the user logged in, confirms it.
pub async fn connect_as_browser(app: &TestApp, user: &str, decision: &str) -> BrowserOutcome {
    connect_through(&app.api, user, decision).await
}

/// [`connect_as_browser`] against the API at `api` (a base URL).
pub async fn connect_through(api: &str, user: &str, decision: &str) -> BrowserOutcome {
    let outcome = walk_flow(api, user, user, decision).await;
    if let Some(code) = &outcome.connect_code {
        let (status, body) = confirm(api, user, code).await;
        assert_eq!(status, 204, "the chat backend confirms the user's own flow: {body}");
    }
    outcome
}

/// Starts a connect flow for `started_for`, then does what a browser does: opens the authorize
/// URL, signs in at the provider as `signs_in_as` with `decision` (`allow`/`deny`), follows the
/// provider's redirect to the callback. Returns what the callback answered; confirms nothing.
pub async fn walk_flow(api: &str, started_for: &str, signs_in_as: &str, decision: &str) -> BrowserOutcome {
    let http = no_redirects();
    let authorize_url = start_connect(&http, api, started_for, Some(&format!("{RETURN_TO}?from=test"))).await;
    let authorize_url = authorize_url.as_str();
    let login_page = http.get(authorize_url).send().await.unwrap();
    assert_eq!(login_page.status(), 200, "the provider shows its login page");
    let html = login_page.text().await.unwrap();
    let mut form = hidden_inputs(&html);
    form.push(("username".into(), signs_in_as.into()));
    form.push(("decision".into(), decision.into()));
    let base = authorize_url.split("/authorize").next().unwrap();
    let redirect = http.post(format!("{base}/login")).form(&form).send().await.unwrap();
    assert_eq!(redirect.status(), 302, "the provider redirects back");
    let callback = redirect.headers()["location"].to_str().unwrap().to_owned();
    let answer = http.get(&callback).send().await.unwrap();
    let location = answer.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
    let connect_code = location
        .as_deref()
        .and_then(|l| reqwest::Url::parse(l).ok())
        .and_then(|url| url.query_pairs().find(|(name, _)| name == "connect_code").map(|(_, code)| code.into_owned()));
    BrowserOutcome { status: answer.status().as_u16(), location, connect_code, callback }
}

/// `POST /v1/connections/qlik/confirm` for `user` and `code`, as the chat backend; the status
/// and the JSON body (null when there is none).
pub async fn confirm(api: &str, user: &str, code: &str) -> (u16, Value) {
    let answer = reqwest::Client::new()
        .post(format!("{api}/v1/connections/qlik/confirm"))
        .bearer_auth(SERVICE_KEY)
        .json(&json!({ "user_id": user, "connect_code": code }))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// `(name, value)` of every `<input type="hidden" name=… value=…>` in a page.
fn hidden_inputs(html: &str) -> Vec<(String, String)> {
    html.split("<input type=\"hidden\"")
        .skip(1)
        .filter_map(|tag| {
            let name = tag.split("name=\"").nth(1)?.split('"').next()?;
            let value = tag.split("value=\"").nth(1)?.split('"').next()?;
            Some((unescape(name), unescape(value)))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"").replace("&#39;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
}
