//! Layered configuration: embedded defaults → `config/{MCP_WORKER_ENV}.toml` → `MCP_WORKER_…` env.
//!
//! [`Settings::load`] merges the layers with figment and calls [`Settings::validate`] once, so the
//! rest of the program can trust every value. Every key is documented in `config/default.toml`,
//! which is compiled into the binary as the bottom layer.
//!
//! This module is a leaf: it knows the shape and the bounds of each setting, never the parts that
//! interpret them. The parts depend on it (`crypto` reads [`EncryptionSettings`], `registry` reads
//! [`McpSettings`]); the checks only a part can make (are the keys base64 of 32 bytes, do two
//! servers route the same tool) run when that part is built, and [`crate::app::check`] builds them
//! all once at start-up.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use crate::provider::Provider;
use crate::secret::Secret;

/// The defaults, compiled in so that a binary without its source tree still starts.
pub(crate) const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The shortest lifetime a token is given, in seconds: below it the refresher would renew it on
/// every scan, and no job could use it (a job needs the call timeout plus the clock skew). The
/// configured lifetimes are bounded by it here, and `oauth::accept` clamps providers' numbers to it.
pub(crate) const MIN_TOKEN_LIFETIME_SECS: u64 = 60;

/// Prefix of the environment variables that override configuration keys.
pub(crate) const ENV_PREFIX: &str = "MCP_WORKER_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} was named by MCP_WORKER_ENV but does not exist")]
    MissingFile(String),
    #[error("invalid configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub telemetry: TelemetrySettings,
    pub amqp: AmqpSettings,
    pub mongodb: MongoSettings,
    pub(crate) worker: WorkerSettings,
    pub mcp: McpSettings,
    pub encryption: EncryptionSettings,
    pub http: HttpSettings,
    pub providers: ProvidersSettings,
    pub(crate) refresher: RefresherSettings,
    pub tokens: TokenSettings,
    pub(crate) catalog: CatalogSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CatalogSettings {
    pub(crate) ttl_secs: u64,
    pub(crate) max_cache_bytes: u64,
    pub(crate) max_cache_entries: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSettings {
    pub active_key: String,
    pub keys: BTreeMap<String, Secret<String>>,
    pub allow_plaintext_tokens: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: std::net::SocketAddr,
    pub(crate) service_key: Secret<String>,
    pub(crate) default_return_to: String,
    pub(crate) return_to_allowlist: Vec<String>,
    pub(crate) state_ttl_secs: u64,
    pub(crate) confirm_connections: bool,
    pub(crate) header_read_timeout_ms: u64,
    pub(crate) body_read_timeout_ms: u64,
    pub(crate) max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersSettings {
    pub qlik: ProviderSettings,
}

impl ProvidersSettings {
    /// The provider's settings when it is configured (has a client id).
    pub fn get(&self, provider: Provider) -> Option<&ProviderSettings> {
        let settings = match provider {
            Provider::Qlik => &self.qlik,
        };
        (!settings.client_id.is_empty()).then_some(settings)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub(crate) client_id: String,
    pub(crate) client_secret: Secret<String>,
    pub authorize_url: String,
    pub(crate) token_url: String,
    pub(crate) revoke_url: String,
    pub(crate) redirect_uri: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) client_auth: ClientAuth,
    pub(crate) default_token_lifetime_secs: u64,
    pub max_token_lifetime_secs: u64,
    pub(crate) rate_limit_per_minute: u32,
    pub(crate) request_timeout_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientAuth {
    ClientSecretPost,
    ClientSecretBasic,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefresherSettings {
    pub(crate) interval_secs: u64,
    pub(crate) lead_secs: u64,
    pub(crate) lease_secs: u64,
    pub(crate) concurrency: usize,
    pub(crate) batch: i64,
    pub(crate) retry_initial_secs: u64,
    pub(crate) retry_max_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    pub(crate) cache_ttl_ms: u64,
    pub(crate) clock_skew_secs: u64,
    pub(crate) max_deferrals: u32,
    pub(crate) defer_ms: u64,
    pub(crate) max_token_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub(crate) format: LogFormat,
    pub(crate) filter: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: Secret<String>,
    /// The cluster's nodes; when not empty it replaces `url` (see [`Self::addresses`]).
    #[serde(default)]
    pub urls: Vec<Secret<String>>,
    pub(crate) reply_resend_window_secs: u64,
    pub jobs_queue: String,
    pub dead_letter_queue: String,
    pub refresh_queue: String,
    pub events_exchange: String,
    pub(crate) prefetch: u16,
    pub delivery_limit: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    pub uri: Secret<String>,
    pub database: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkerSettings {
    pub(crate) concurrency: usize,
    pub(crate) max_job_bytes: usize,
    pub(crate) max_arguments_depth: usize,
    pub(crate) shutdown_grace_secs: u64,
    pub(crate) results_ttl_secs: u64,
    pub(crate) retry_delays_ms: Vec<u64>,
    pub(crate) retry_jitter_percent: u64,
    pub(crate) max_waits: u32,
}

impl WorkerSettings {
    /// For each retry, the delays (ms) it may wait, one of which is picked at random: the
    /// configured delay, and `retry_jitter_percent` less and more.
    pub(crate) fn retry_delays(&self) -> Vec<Vec<u64>> {
        self.retry_delays_ms
            .iter()
            .map(|&ms| {
                let spread = ms * self.retry_jitter_percent / 100;
                let mut delays = vec![ms - spread, ms, ms + spread];
                delays.dedup();
                delays
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSettings {
    pub(crate) call_timeout_ms: u64,
    pub(crate) connect_timeout_ms: u64,
    pub(crate) max_response_bytes: u64,
    pub(crate) response_budget_bytes: u64,
    pub servers: BTreeMap<String, McpServerSettings>,
}

impl AmqpSettings {
    /// The broker addresses to try, in order: `urls` when it lists any, else the one `url`.
    pub fn addresses(&self) -> Vec<Secret<String>> {
        if self.urls.is_empty() { vec![self.url.clone()] } else { self.urls.clone() }
    }

    pub(crate) fn reply_resend_window(&self) -> Duration {
        Duration::from_secs(self.reply_resend_window_secs)
    }

    /// The queue deferred jobs wait in. Its name carries the delay, so changing `tokens.defer_ms`
    /// declares a new queue instead of clashing with the old one's arguments.
    pub(crate) fn delay_queue(&self, defer_ms: u64) -> String {
        format!("{}.delay.{defer_ms}ms", self.jobs_queue)
    }

    /// The queue a job waits in before a retry `delay_ms` later; named like [`Self::delay_queue`].
    pub(crate) fn retry_queue(&self, delay_ms: u64) -> String {
        format!("{}.retry.{delay_ms}ms", self.jobs_queue)
    }
}

impl McpSettings {
    pub(crate) fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerSettings {
    pub url: String,
    pub(crate) tool_prefix: Option<String>,
    pub tools: Option<Vec<String>>,
    pub auth: Option<AuthSettings>,
    /// Whether this server's tool annotations (`readOnlyHint`, `idempotentHint`) may relax a
    /// call's guarantee to at-least-once; off unless the operator says so.
    #[serde(default)]
    pub trust_annotations: bool,
    /// Tools that keep exactly-once whatever their annotations say.
    #[serde(default)]
    pub exactly_once_tools: Vec<String>,
    /// Speak HTTP/2 without TLS (h2c) from the first byte; for an `http://` server known to.
    #[serde(default)]
    pub http2_prior_knowledge: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub provider: Provider,
    #[serde(default = "default_auth_header")]
    pub header: String,
    #[serde(default = "default_auth_value")]
    pub value: String,
}

fn default_auth_header() -> String {
    "X-Qlik-Access-Token".to_owned()
}

fn default_auth_value() -> String {
    "{token}".to_owned()
}

impl Settings {
    /// Merges the three layers and validates the result. `env` is the value of `MCP_WORKER_ENV`;
    /// `config_dir` is where its file lives (the `config/` folder of the working directory).
    pub fn load(env: Option<&str>, config_dir: &Path) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(env, config_dir)?)
    }

    /// The three layers, merged but not yet extracted, so tests can put a layer of their own on top.
    pub fn figment(env: Option<&str>, config_dir: &Path) -> Result<Figment, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(env) = env.filter(|e| !e.is_empty()) {
            let path = config_dir.join(format!("{env}.toml"));
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.display().to_string()));
            }
            figment = figment.merge(Toml::file(path));
        }
        Ok(figment.merge(environment()))
    }

    /// Extracts and validates settings from an already assembled figment (tests build their own).
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The checks serde cannot express that need no other part of the crate. The encryption keys
    /// and the MCP servers are checked by building them, see [`crate::app::check`].
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.telemetry.filter.parse::<tracing_subscriber::EnvFilter>().is_err() {
            return Err(invalid("telemetry.filter", "is not a valid tracing filter"));
        }
        for (key, name) in [
            ("amqp.jobs_queue", &self.amqp.jobs_queue),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.refresh_queue", &self.amqp.refresh_queue),
            ("amqp.events_exchange", &self.amqp.events_exchange),
            ("mongodb.database", &self.mongodb.database),
        ] {
            if name.is_empty() || name.len() > 255 {
                return Err(invalid(key, "must be 1 to 255 characters long"));
            }
        }
        if self.amqp.jobs_queue == self.amqp.dead_letter_queue {
            return Err(invalid("amqp.dead_letter_queue", "must differ from amqp.jobs_queue"));
        }
        let is_amqp =
            |url: &Secret<String>| url.expose().starts_with("amqp://") || url.expose().starts_with("amqps://");
        if !is_amqp(&self.amqp.url) {
            return Err(invalid("amqp.url", "must start with amqp:// or amqps://"));
        }
        if self.amqp.urls.len() > 64 {
            return Err(invalid("amqp.urls", "must list at most 64 addresses"));
        }
        if let Some(i) = self.amqp.urls.iter().position(|url| !is_amqp(url)) {
            return Err(invalid(format!("amqp.urls[{i}]"), "must start with amqp:// or amqps://"));
        }
        if self.amqp.reply_resend_window_secs > 3600 {
            return Err(invalid("amqp.reply_resend_window_secs", "must be at most 3600"));
        }
        if !self.mongodb.uri.expose().starts_with("mongodb://")
            && !self.mongodb.uri.expose().starts_with("mongodb+srv://")
        {
            return Err(invalid("mongodb.uri", "must start with mongodb:// or mongodb+srv://"));
        }
        if self.tokens.defer_ms == 0 {
            return Err(invalid("tokens.defer_ms", "must be at least 1"));
        }
        if self.amqp.prefetch == 0 {
            return Err(invalid("amqp.prefetch", "must be at least 1"));
        }
        if self.amqp.delivery_limit == 0 {
            return Err(invalid("amqp.delivery_limit", "must be at least 1"));
        }
        if self.worker.concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be at least 1"));
        }
        if self.worker.max_arguments_depth == 0 || self.worker.max_arguments_depth > 100 {
            return Err(invalid("worker.max_arguments_depth", "must be between 1 and 100"));
        }
        if self.worker.retry_delays_ms.len() > 10 || self.worker.retry_delays_ms.contains(&0) {
            return Err(invalid("worker.retry_delays_ms", "must hold at most 10 delays of at least 1 ms"));
        }
        if self.worker.retry_jitter_percent > 50 {
            return Err(invalid("worker.retry_jitter_percent", "must be between 0 and 50"));
        }
        if self.worker.max_job_bytes < 256 {
            return Err(invalid("worker.max_job_bytes", "must be at least 256"));
        }
        for (key, value) in [
            ("http.header_read_timeout_ms", self.http.header_read_timeout_ms),
            ("http.body_read_timeout_ms", self.http.body_read_timeout_ms),
            ("http.max_connections", self.http.max_connections as u64),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.mcp.call_timeout_ms == 0 {
            return Err(invalid("mcp.call_timeout_ms", "must be at least 1"));
        }
        if self.mcp.connect_timeout_ms == 0 {
            return Err(invalid("mcp.connect_timeout_ms", "must be at least 1"));
        }
        if self.mcp.max_response_bytes < 1024 {
            return Err(invalid("mcp.max_response_bytes", "must be at least 1024"));
        }
        // The budget is a semaphore of bytes taken in u32 steps; an answer larger than the whole
        // budget could never get its bytes.
        if self.mcp.response_budget_bytes > u64::from(u32::MAX) {
            return Err(invalid("mcp.response_budget_bytes", format!("must be at most {}", u32::MAX)));
        }
        if self.mcp.response_budget_bytes < self.mcp.max_response_bytes {
            return Err(invalid("mcp.response_budget_bytes", "must be at least mcp.max_response_bytes"));
        }
        for (key, value) in [
            ("http.state_ttl_secs", self.http.state_ttl_secs),
            ("worker.results_ttl_secs", self.worker.results_ttl_secs),
            ("refresher.interval_secs", self.refresher.interval_secs),
            ("refresher.lease_secs", self.refresher.lease_secs),
            ("refresher.retry_initial_secs", self.refresher.retry_initial_secs),
            ("providers.qlik.default_token_lifetime_secs", self.providers.qlik.default_token_lifetime_secs),
            ("providers.qlik.request_timeout_secs", self.providers.qlik.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.catalog.ttl_secs > 86_400 {
            return Err(invalid("catalog.ttl_secs", "must be at most 86400 (a day)"));
        }
        if self.catalog.max_cache_bytes == 0 || self.catalog.max_cache_entries == 0 {
            return Err(invalid("catalog.max_cache_bytes", "and catalog.max_cache_entries must be at least 1"));
        }
        if self.refresher.lease_secs <= self.providers.qlik.request_timeout_secs {
            return Err(invalid(
                "refresher.lease_secs",
                "must be longer than providers.qlik.request_timeout_secs, or a lease could lapse mid-refresh",
            ));
        }
        if self.refresher.concurrency == 0 || self.refresher.batch < 1 {
            return Err(invalid("refresher.concurrency", "and refresher.batch must be at least 1"));
        }
        let min_lifetime = MIN_TOKEN_LIFETIME_SECS;
        // A year at most: a longer bound would let a provider's number park a token for ever.
        if !(min_lifetime..=366 * 86_400).contains(&self.providers.qlik.max_token_lifetime_secs) {
            return Err(invalid(
                "providers.qlik.max_token_lifetime_secs",
                format!("must be between {min_lifetime} and 31622400 (a year)"),
            ));
        }
        if !(min_lifetime..=self.providers.qlik.max_token_lifetime_secs)
            .contains(&self.providers.qlik.default_token_lifetime_secs)
        {
            return Err(invalid(
                "providers.qlik.default_token_lifetime_secs",
                format!("must be between {min_lifetime} and providers.qlik.max_token_lifetime_secs"),
            ));
        }
        // Below 64 bytes no real token fits; above 1 MiB a token is no longer a header value any
        // server accepts.
        if !(64..=1 << 20).contains(&self.tokens.max_token_bytes) {
            return Err(invalid("tokens.max_token_bytes", "must be between 64 and 1048576"));
        }
        if self.providers.qlik.rate_limit_per_minute == 0 {
            return Err(invalid("providers.qlik.rate_limit_per_minute", "must be at least 1"));
        }
        if self.providers.get(Provider::Qlik).is_some() {
            for (key, url) in [
                ("providers.qlik.authorize_url", &self.providers.qlik.authorize_url),
                ("providers.qlik.token_url", &self.providers.qlik.token_url),
                ("providers.qlik.revoke_url", &self.providers.qlik.revoke_url),
                ("providers.qlik.redirect_uri", &self.providers.qlik.redirect_uri),
            ] {
                let Ok(parsed) = reqwest::Url::parse(url) else {
                    return Err(invalid(key, "is not a valid URL"));
                };
                // Tokens and client secrets cross these endpoints: TLS is required except on
                // loopback, where the local test server runs.
                let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
                if key != "providers.qlik.redirect_uri" && parsed.scheme() != "https" && !loopback {
                    return Err(invalid(key, "must be an https:// URL (http:// is allowed on loopback only)"));
                }
            }
        }
        for (i, prefix) in self.http.return_to_allowlist.iter().enumerate() {
            if reqwest::Url::parse(prefix).is_err() {
                return Err(invalid(format!("http.return_to_allowlist[{i}]"), "is not a valid URL"));
            }
        }
        Ok(())
    }
}

/// `MCP_WORKER_<SECTION>__<KEY>` variables. Only names with a `__` are configuration keys; that
/// leaves `MCP_WORKER_ENV` and the service scripts' own `MCP_WORKER_SERVICES_*` variables alone.
fn environment() -> Env {
    Env::prefixed(ENV_PREFIX).filter(|key| key.as_str().contains("__")).split("__")
}

#[cfg(test)]
// figment::Jail's closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn with(key: &str, value: impl serde::Serialize) -> Result<Settings, ConfigError> {
        Settings::from_figment(Figment::from(Toml::string(DEFAULT_TOML)).merge(Serialized::default(key, value)))
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let settings = Settings::from_figment(Figment::from(Toml::string(DEFAULT_TOML))).unwrap();
        assert_eq!(settings.amqp.jobs_queue, "mcp.tool_calls");
        let qlik = &settings.mcp.servers["qlik"];
        assert_eq!(qlik.auth.as_ref().unwrap().header, "X-Qlik-Access-Token");
    }

    #[test]
    fn each_retry_may_wait_its_delay_or_the_jittered_ones() {
        let settings = with("worker.retry_delays_ms", [1000, 1]).unwrap();
        assert_eq!(settings.worker.retry_delays(), vec![vec![800, 1000, 1200], vec![1]]);
        assert!(with("worker.retry_jitter_percent", 51).unwrap_err().to_string().contains("retry_jitter_percent"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = with("amqp.prefetch", 0).unwrap_err().to_string();
        assert!(err.contains("amqp.prefetch"), "{err}");
        let err = with("amqp.prefetch", "many").unwrap_err().to_string();
        assert!(err.contains("prefetch"), "{err}");
        let err = with("worker.nonsense", 1).unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn environment_overrides_nested_keys_and_ignores_unrelated_variables() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MCP_WORKER_AMQP__PREFETCH", "7");
            jail.set_env("MCP_WORKER_MCP__SERVERS__QLIK__URL", "http://127.0.0.1:9/mcp");
            jail.set_env("MCP_WORKER_ENV", "");
            jail.set_env("MCP_WORKER_SERVICES_AMQP_PORT", "5673");
            let settings = Settings::load(None, Path::new("config")).unwrap();
            assert_eq!(settings.amqp.prefetch, 7);
            assert_eq!(settings.mcp.servers["qlik"].url, "http://127.0.0.1:9/mcp");
            Ok(())
        });
    }

    #[test]
    fn a_named_environment_file_must_exist_and_is_layered_over_defaults() {
        figment::Jail::expect_with(|jail| {
            let err = Settings::load(Some("staging"), Path::new("config")).unwrap_err();
            assert!(err.to_string().contains("staging.toml"), "{err}");
            jail.create_dir("config")?;
            jail.create_file("config/staging.toml", "[worker]\nconcurrency = 3\n")?;
            let settings = Settings::load(Some("staging"), Path::new("config")).unwrap();
            assert_eq!(settings.worker.concurrency, 3);
            assert_eq!(settings.amqp.prefetch, 64);
            Ok(())
        });
    }

    #[test]
    fn several_broker_addresses_replace_the_one_and_each_is_checked() {
        let one = with("amqp.urls", Vec::<String>::new()).unwrap();
        assert_eq!(one.amqp.addresses().len(), 1);
        let urls = ["amqp://127.0.0.1:5701/%2f", "amqp://127.0.0.1:5702/%2f"];
        let settings = with("amqp.urls", urls).unwrap();
        let addresses: Vec<_> = settings.amqp.addresses().iter().map(|a| a.expose().clone()).collect();
        assert_eq!(addresses, urls);
        let err = with("amqp.urls", ["amqp://127.0.0.1:5701/%2f", "http://x"]).unwrap_err().to_string();
        assert!(err.contains("amqp.urls[1]"), "{err}");
    }

    #[test]
    fn a_list_of_addresses_can_come_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("MCP_WORKER_AMQP__URLS", r#"["amqp://127.0.0.1:5701/%2f","amqp://127.0.0.1:5702/%2f"]"#);
            let settings = Settings::load(None, Path::new("config")).unwrap();
            assert_eq!(settings.amqp.addresses().len(), 2);
            assert_eq!(settings.amqp.addresses()[1].expose(), "amqp://127.0.0.1:5702/%2f");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let settings = with("amqp.url", "amqp://user:s3cr3t-pw@127.0.0.1:5672/%2f").unwrap();
        let printed = format!("{settings:?}");
        assert!(!printed.contains("s3cr3t-pw"), "{printed}");
    }
}
