//! The process's Prometheus metrics, served at `GET /metrics` (OpenMetrics text format).
//!
//! One [`Metrics`] is built per process and shared by the parts that count: the worker (jobs,
//! MCP calls, deferrals, dead letters), the refresher (refresh outcomes, the due/overdue backlog)
//! and the broker link (reconnects). Every label takes its value from a small closed set (an
//! outcome, an error code, a configured server name), never from a user id or job id, so the
//! number of series stays bounded whatever the traffic.
//!
//! What each metric means for an operator is in the README's Operations section; keep the two
//! in step.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    /// `ok`, `error`, `replayed` or `dead_lettered`.
    outcome: &'static str,
    /// The reply's error code, or `none`.
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct McpLabels {
    /// The server's name from `mcp.servers`.
    server: String,
    /// `ok`, or the error code the failure maps to.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CatalogLabels {
    /// `amqp` (a `tools/list` job) or `http` (`GET /v1/tools`).
    via: &'static str,
    /// `complete` (every server listed) or `partial` (some named in `unavailable`).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    /// `hit` or `miss`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// How one delivery of a job was settled, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// A reply was published: `code` is `None` for `ok`.
    Answered { code: Option<&'static str> },
    /// The job had already run; its recorded reply was published again.
    Replayed,
    /// Copied to the dead-letter queue (with a reply when there was somewhere to send it).
    DeadLettered { code: &'static str },
    /// Put in a delay queue to come back later.
    Deferred(Deferral),
}

/// Why a job was put in a delay queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deferral {
    /// Its user's token must be renewed first.
    Token,
    /// The MCP server was unavailable; it is retried.
    Retry,
    /// Another consumer holds it, or the database is unreachable.
    Wait,
}

impl Deferral {
    fn as_str(self) -> &'static str {
        match self {
            Deferral::Token => "token",
            Deferral::Retry => "retry",
            Deferral::Wait => "wait",
        }
    }
}

/// The refresher's view of the tokens it must renew, taken at each scan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backlog {
    /// Active tokens expiring within the lead time (including those already expired).
    pub(crate) due: u64,
    /// Active tokens already expired.
    pub(crate) overdue: u64,
    /// How long ago the most overdue token should have been renewed (its expiry minus the lead
    /// time); zero when nothing is due.
    pub(crate) lag: Duration,
}

pub struct Metrics {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    job_duration: HistogramFamily<OutcomeLabels>,
    mcp_call_duration: HistogramFamily<McpLabels>,
    catalog_requests: Family<CatalogLabels, Counter>,
    catalog_cache: Family<CacheLabels, Counter>,
    mcp_list_duration: HistogramFamily<McpLabels>,
    deferrals: Family<ReasonLabels, Counter>,
    dead_letters: Family<ReasonLabels, Counter>,
    refreshes: Family<OutcomeLabels, Counter>,
    tokens_due: Gauge,
    tokens_overdue: Gauge,
    refresh_lag: Gauge<f64, AtomicU64>,
    reconnects: Counter,
    unreadable_tokens: Counter,
    replies_not_recorded: Counter,
    mcp_response_bytes: Gauge,
    mcp_response_bytes_peak: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        // 1 ms to about 65 s: from a cached token and a fast server up to the longest calls.
        fn latency() -> Histogram {
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        }
        let mut registry = Registry::with_prefix("mcp_worker");
        let metrics = Self {
            jobs: Family::default(),
            job_duration: Family::new_with_constructor(latency as fn() -> Histogram),
            mcp_call_duration: Family::new_with_constructor(latency as fn() -> Histogram),
            catalog_requests: Family::default(),
            catalog_cache: Family::default(),
            mcp_list_duration: Family::new_with_constructor(latency as fn() -> Histogram),
            deferrals: Family::default(),
            dead_letters: Family::default(),
            refreshes: Family::default(),
            tokens_due: Gauge::default(),
            tokens_overdue: Gauge::default(),
            refresh_lag: Gauge::default(),
            reconnects: Counter::default(),
            unreadable_tokens: Counter::default(),
            replies_not_recorded: Counter::default(),
            mcp_response_bytes: Gauge::default(),
            mcp_response_bytes_peak: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "jobs",
            "Job deliveries answered or dead-lettered, by outcome (ok, error, replayed, dead_lettered) and error code",
            metrics.jobs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "From a job's delivery to its ack, for deliveries that were answered or dead-lettered",
            metrics.job_duration.clone(),
        );
        registry.register(
            "mcp_call_duration_seconds",
            "tools/call round trips, by MCP server and outcome (ok or the error code)",
            metrics.mcp_call_duration.clone(),
        );
        registry.register(
            "catalog_requests",
            "Tool catalogs answered, by door (amqp, http) and outcome (complete, or partial: some server named in unavailable)",
            metrics.catalog_requests.clone(),
        );
        registry.register(
            "catalog_cache",
            "Tool lists a catalog request needed, by result (hit: served from the cache, or by a listing another request had under way; miss: listed)",
            metrics.catalog_cache.clone(),
        );
        registry.register(
            "mcp_list_duration_seconds",
            "tools/list round trips (every page of one list), by MCP server and outcome (ok or the error code)",
            metrics.mcp_list_duration.clone(),
        );
        registry.register(
            "job_deferrals",
            "Jobs put in a delay queue, by reason (token: waiting for a refresh; retry: MCP server unavailable; wait: claimed elsewhere or database unreachable)",
            metrics.deferrals.clone(),
        );
        registry.register(
            "dead_letters",
            "Jobs copied to the dead-letter queue, by reason (the reply's error code)",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "token_refreshes",
            "Refresh attempts, by outcome (refreshed, reauth_required, retry_later, not_claimed, superseded)",
            metrics.refreshes.clone(),
        );
        registry.register(
            "tokens_due",
            "Active tokens expiring within refresher.lead_secs, at the last scan",
            metrics.tokens_due.clone(),
        );
        registry.register(
            "tokens_overdue",
            "Active tokens already expired, at the last scan",
            metrics.tokens_overdue.clone(),
        );
        registry.register(
            "refresh_lag_seconds",
            "How long ago the most overdue due token should have been renewed, at the last scan",
            metrics.refresh_lag.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Times the broker connection was lost and established again",
            metrics.reconnects.clone(),
        );
        registry.register(
            "unreadable_tokens",
            "Jobs answered reauth_required because their user's stored token could not be read (retired key, damaged value, a document of the wrong shape)",
            metrics.unreadable_tokens.clone(),
        );
        registry.register(
            "replies_not_recorded",
            "Replies published although recording them for redeliveries failed (a redelivery may then run the job again)",
            metrics.replies_not_recorded.clone(),
        );
        registry.register(
            "mcp_response_bytes",
            "Bytes of MCP answers held now, out of mcp.response_budget_bytes",
            metrics.mcp_response_bytes.clone(),
        );
        registry.register(
            "mcp_response_bytes_peak",
            "The most bytes of MCP answers held at once since the process started",
            metrics.mcp_response_bytes_peak.clone(),
        );
        Self { registry, ..metrics }
    }

    /// Counts one settled job delivery that took `duration` from delivery to ack.
    pub(crate) fn job_settled(&self, settled: Settled, duration: Duration) {
        let (outcome, code) = match settled {
            Settled::Answered { code: None } => ("ok", "none"),
            Settled::Answered { code: Some(code) } => ("error", code),
            Settled::Replayed => ("replayed", "none"),
            Settled::DeadLettered { code } => {
                self.dead_letters.get_or_create(&ReasonLabels { reason: code }).inc();
                ("dead_lettered", code)
            }
            Settled::Deferred(reason) => {
                self.deferrals.get_or_create(&ReasonLabels { reason: reason.as_str() }).inc();
                return;
            }
        };
        self.jobs.get_or_create(&JobLabels { outcome, code }).inc();
        self.job_duration.get_or_create(&OutcomeLabels { outcome }).observe(duration.as_secs_f64());
    }

    /// Records one `tools/call` to `server`: `outcome` is `ok` or the error code it maps to.
    pub(crate) fn mcp_call(&self, server: &str, outcome: &'static str, duration: Duration) {
        self.mcp_call_duration
            .get_or_create(&McpLabels { server: server.to_owned(), outcome })
            .observe(duration.as_secs_f64());
    }

    /// Counts one tool catalog answered through `via`; `complete` when every server was listed.
    pub(crate) fn catalog_request(&self, via: crate::catalog::Via, complete: bool) {
        let via = match via {
            crate::catalog::Via::Amqp => "amqp",
            crate::catalog::Via::Http => "http",
        };
        let outcome = if complete { "complete" } else { "partial" };
        self.catalog_requests.get_or_create(&CatalogLabels { via, outcome }).inc();
    }

    /// Counts one server's list a catalog needed: `found` in the cache, or not.
    pub(crate) fn catalog_cache(&self, found: bool) {
        self.catalog_cache.get_or_create(&CacheLabels { result: if found { "hit" } else { "miss" } }).inc();
    }

    /// Records one listing of `server`'s tools (all its pages): `outcome` is `ok` or the error code.
    pub(crate) fn catalog_list(&self, server: &str, outcome: &'static str, duration: Duration) {
        self.mcp_list_duration
            .get_or_create(&McpLabels { server: server.to_owned(), outcome })
            .observe(duration.as_secs_f64());
    }

    /// Counts one refresh attempt's outcome.
    pub(crate) fn refreshed(&self, outcome: &'static str) {
        self.refreshes.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Sets the backlog gauges from a scan.
    pub(crate) fn backlog(&self, backlog: Backlog) {
        self.tokens_due.set(i64::try_from(backlog.due).unwrap_or(i64::MAX));
        self.tokens_overdue.set(i64::try_from(backlog.overdue).unwrap_or(i64::MAX));
        self.refresh_lag.set(backlog.lag.as_secs_f64());
    }

    /// Counts a broker link established again after a loss.
    pub(crate) fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Counts a job refused because its user's stored token could not be read.
    pub(crate) fn unreadable_token(&self) {
        self.unreadable_tokens.inc();
    }

    /// Counts a reply that was published without being recorded.
    pub(crate) fn reply_not_recorded(&self) {
        self.replies_not_recorded.inc();
    }

    /// Sets the MCP response budget's gauges: bytes held now, and the most held at once.
    pub(crate) fn mcp_response_bytes(&self, in_flight: u64, peak: u64) {
        self.mcp_response_bytes.set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        self.mcp_response_bytes_peak.set(i64::try_from(peak).unwrap_or(i64::MAX));
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn an_answered_job_is_counted_by_outcome_and_code_with_its_duration() {
        let metrics = Metrics::new();
        metrics.job_settled(Settled::Answered { code: None }, Duration::from_millis(3));
        metrics.job_settled(Settled::Answered { code: Some("not_connected") }, Duration::from_millis(2));
        metrics.job_settled(Settled::Answered { code: Some("not_connected") }, Duration::from_millis(2));
        let text = metrics.render();
        assert_eq!(
            line(&text, r#"mcp_worker_jobs_total{outcome="ok",code="none"}"#).unwrap().split(' ').nth(1),
            Some("1")
        );
        assert_eq!(
            line(&text, r#"mcp_worker_jobs_total{outcome="error",code="not_connected"}"#).unwrap().split(' ').nth(1),
            Some("2")
        );
        assert_eq!(
            line(&text, r#"mcp_worker_job_duration_seconds_count{outcome="error"}"#).unwrap().split(' ').nth(1),
            Some("2")
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn deferrals_and_dead_letters_have_their_own_counters() {
        let metrics = Metrics::new();
        metrics.job_settled(Settled::Deferred(Deferral::Retry), Duration::ZERO);
        metrics.job_settled(Settled::DeadLettered { code: "invalid_job" }, Duration::ZERO);
        let text = metrics.render();
        assert!(line(&text, r#"mcp_worker_job_deferrals_total{reason="retry"} 1"#).is_some(), "{text}");
        assert!(line(&text, r#"mcp_worker_dead_letters_total{reason="invalid_job"} 1"#).is_some(), "{text}");
        assert!(line(&text, r#"mcp_worker_jobs_total{outcome="dead_lettered",code="invalid_job"} 1"#).is_some());
        // A deferral is not an answer: it is not among the jobs.
        assert!(line(&text, r#"mcp_worker_jobs_total{outcome="ok""#).is_none());
    }

    #[test]
    fn the_backlog_sets_the_gauges() {
        let metrics = Metrics::new();
        metrics.backlog(Backlog { due: 7, overdue: 2, lag: Duration::from_millis(1500) });
        let text = metrics.render();
        assert!(line(&text, "mcp_worker_tokens_due 7").is_some(), "{text}");
        assert!(line(&text, "mcp_worker_tokens_overdue 2").is_some(), "{text}");
        assert!(line(&text, "mcp_worker_refresh_lag_seconds 1.5").is_some(), "{text}");
    }
}
