//! Command line and environment configuration. Every flag also reads an environment variable
//! (`VOLT_*`), and the Helm chart sets them from its values.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser};

use crate::api::Strategy;
use crate::cache::{CacheSettings, CacheStrategy};
pub use crate::executors::http_policy::CidrList;

/// `run` arguments: everything the controllers need.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the HTTP server (/healthz, /readyz, /metrics, /api/v1/...).
    #[arg(long, env = "VOLT_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Elect a leader with a coordination.k8s.io Lease; only the leader reconciles.
    #[arg(long, env = "VOLT_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease (defaults to the pod's namespace, else `default`).
    #[arg(long, env = "VOLT_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Name of the leader-election Lease; replicas with the same Lease share one leader.
    #[arg(long, env = "VOLT_LEASE_NAME", default_value = "volt-operator")]
    pub lease_name: String,

    /// Seconds a leader holds the Lease without renewing it; a follower takes over after that.
    #[arg(long, env = "VOLT_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration: u64,

    /// Seconds before the Lease expires at which the leader renews it (also the clock skew tolerated).
    #[arg(long, env = "VOLT_LEASE_GRACE", default_value_t = 5)]
    pub lease_grace: u64,

    /// Split runs across active replicas into this many shards (1: no sharding). Each replica
    /// holds the Leases of its share of the shards (`<lease-name>-shard-<i>` in the Lease
    /// namespace) and reconciles only their runs; --lease-duration and --lease-grace apply.
    /// At most 64; incompatible with --leader-elect, which it replaces.
    #[arg(long, env = "VOLT_SHARDS", default_value_t = 1)]
    pub shards: u32,

    /// Namespaces to watch, comma-separated; empty watches all namespaces.
    #[arg(long, env = "VOLT_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Interval of agent and component health checks, in seconds.
    #[arg(long, env = "VOLT_HEALTH_CHECK_INTERVAL", default_value = "10", value_parser = parse_secs)]
    pub health_check_interval: Duration,

    /// Interval at which live load and gauges are refreshed, in seconds.
    #[arg(long, env = "VOLT_METRICS_INTERVAL", default_value = "5", value_parser = parse_secs)]
    pub metrics_interval: Duration,

    /// Timeout of a run that sets none, in seconds.
    #[arg(long, env = "VOLT_DEFAULT_WORKFLOW_TIMEOUT", default_value = "3600", value_parser = parse_secs)]
    pub default_workflow_timeout: Duration,

    /// Most runs active at once across the operator (0: no limit); more wait as Queued.
    #[arg(long, env = "VOLT_MAX_CONCURRENT_RUNS", default_value_t = 100)]
    pub max_concurrent_runs: u32,

    /// Most in-process step tasks (agent, http, template) running at once.
    #[arg(long, env = "VOLT_MAX_INPROCESS_TASKS", default_value_t = 256)]
    pub max_inprocess_tasks: usize,

    /// Default load-balancing strategy: round_robin, least_connections, weighted, performance_based.
    #[arg(long, env = "VOLT_LB_STRATEGY", default_value = "round_robin")]
    pub lb_strategy: Strategy,

    /// Default retries of a step that sets no retry policy.
    #[arg(long, env = "VOLT_RETRY_LIMIT", default_value_t = 0)]
    pub retry_limit: u32,

    /// Default initial retry backoff, in seconds.
    #[arg(long, env = "VOLT_RETRY_BACKOFF", default_value = "1", value_parser = parse_secs)]
    pub retry_backoff: Duration,

    /// Longest a run's step progress waits, in seconds, before its status is written, so that
    /// many steps share one write; a run starting or finishing is written at once. Writes never
    /// hold up the next steps. 0 writes on every change.
    #[arg(long, env = "VOLT_STATUS_FLUSH_INTERVAL", default_value = "1", value_parser = parse_secs)]
    pub status_flush_interval: Duration,

    /// Step progress on one object within this many seconds becomes one Kubernetes Event; run
    /// transitions and failures are published at once. (The event log and CloudEvents get
    /// every transition.) 0 publishes one Event per reconcile.
    #[arg(long, env = "VOLT_EVENT_WINDOW", default_value = "5", value_parser = parse_secs)]
    pub event_window: Duration,

    /// Budget usage is written to each Budget's status at most once in this many seconds
    /// (what a crash can lose of it).
    #[arg(long, env = "VOLT_BUDGET_FLUSH_INTERVAL", default_value = "5", value_parser = parse_secs)]
    pub budget_flush_interval: Duration,

    /// Longest wait for the API server to answer a request (and between parts of an answer), in
    /// seconds; a request past it fails and is retried like any API error. Watches are not
    /// bounded by it. 0: no bound (kube's default).
    #[arg(long, env = "VOLT_API_TIMEOUT", default_value = "60", value_parser = parse_secs)]
    pub api_timeout: Duration,

    /// Step outputs larger than this many bytes go to a ConfigMap instead of the run's status.
    #[arg(long, env = "VOLT_INLINE_OUTPUT_LIMIT", default_value_t = 4096)]
    pub inline_output_limit: usize,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Also send every event as a CloudEvent (structured JSON, HTTP POST) to this URL.
    #[arg(long, env = "VOLT_CLOUDEVENTS_URL")]
    pub cloudevents_url: Option<String>,

    /// Export traces (OpenTelemetry, OTLP over HTTP) when the standard OTEL_EXPORTER_OTLP_ENDPOINT
    /// or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT variable names a collector; false turns them off
    /// even then. Metrics are always served on /metrics.
    #[arg(long, env = "VOLT_TELEMETRY", default_value_t = true, action = clap::ArgAction::Set)]
    pub telemetry: bool,

    #[command(flatten)]
    pub http_step: HttpStepArgs,

    /// Serve the web view of runs at /ui on the HTTP port: every request authenticated with
    /// TokenReview and authorized with SubjectAccessReview (docs/web-view.md).
    #[arg(long, env = "VOLT_UI", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub ui: bool,

    /// The cluster API's URL, from the Kubernetes client configuration (not a flag: `run`
    /// fills it in). HTTP steps may not reach its addresses (see [`HttpStepArgs`]).
    #[arg(skip)]
    pub cluster_url: Option<http::Uri>,
}

/// Which addresses HTTP steps may reach (against server-side request forgery). Decided on the
/// addresses a URL's host resolves to, redirects included. Besides these ranges, the cluster
/// API's own addresses are denied unless `--http-step-allow` lists that exact address, and
/// `0.0.0.0`/`::` always are.
#[derive(Debug, Clone, Args)]
pub struct HttpStepArgs {
    /// CIDRs (or addresses) HTTP steps may reach, comma-separated. The cluster API's addresses
    /// stay denied unless listed here exactly (10.96.0.1 or 10.96.0.1/32).
    #[arg(long = "http-step-allow", env = "VOLT_HTTP_STEP_ALLOW", value_name = "CIDRS",
          default_value = "0.0.0.0/0,::/0", value_parser = CidrList::parse)]
    pub allow: CidrList,
    /// CIDRs (or addresses) HTTP steps may not reach, comma-separated; wins over --http-step-allow.
    #[arg(long = "http-step-deny", env = "VOLT_HTTP_STEP_DENY", value_name = "CIDRS",
          default_value = "169.254.0.0/16,fe80::/10", value_parser = CidrList::parse)]
    pub deny: CidrList,
    /// Let HTTP steps, Agent and MCP URLs reach the operator's own HTTP port over loopback
    /// (blocked by default: its JSON API answers with the operator's view of every namespace).
    #[arg(long = "http-step-allow-own-port", env = "VOLT_HTTP_STEP_ALLOW_OWN_PORT", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_own_port: bool,
}

/// Step-result cache settings.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// Eviction strategy of the step cache: lru, lfu or fifo.
    #[arg(long = "cache-strategy", env = "VOLT_CACHE_STRATEGY", default_value = "lru", value_parser = str::parse::<CacheStrategy>)]
    pub strategy: CacheStrategy,
    /// Default time to live of a cached result, in seconds.
    #[arg(long = "cache-ttl", env = "VOLT_CACHE_TTL", default_value = "3600", value_parser = parse_secs)]
    pub ttl: Duration,
    /// Most cached results kept.
    #[arg(long = "cache-max-entries", env = "VOLT_CACHE_MAX_ENTRIES", default_value_t = 10_000)]
    pub max_entries: usize,
    /// Most bytes of cached results kept.
    #[arg(long = "cache-max-bytes", env = "VOLT_CACHE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_bytes: usize,
}

impl CacheArgs {
    /// The cache's settings.
    pub fn settings(&self) -> CacheSettings {
        CacheSettings {
            strategy: self.strategy,
            ttl: self.ttl,
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
        }
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.trim_end_matches('s').parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{s:?} must be a non-negative number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

impl RunArgs {
    /// The bound of API requests, `None` when `--api-timeout 0` turns it off.
    pub fn api_bound(&self) -> Option<Duration> {
        Some(self.api_timeout).filter(|t| !t.is_zero())
    }

    /// Defaults suitable for tests and embedding: everything as with no flags.
    pub fn defaults() -> Self {
        match Self::try_parse_from(["volt-operator"]) {
            Ok(args) => args,
            Err(e) => unreachable!("`run` with no flags always parses: {e}"),
        }
    }

    /// Parses `run`'s flags (the first item is the program name), as the binary does.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }
        Run::try_parse_from(args).map(|r| r.args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_defaults_parse() {
        let cli = RunArgs::try_parse_from([
            "volt-operator",
            "--namespaces",
            "a,b",
            "--lb-strategy",
            "least_connections",
            "--leader-elect",
            "--cache-ttl",
            "30",
        ])
        .expect("parses");
        let args = cli;
        assert_eq!(args.namespaces, vec!["a", "b"]);
        assert_eq!(args.lb_strategy, Strategy::LeastConnections);
        assert!(args.leader_elect);
        assert_eq!(args.cache.ttl, Duration::from_secs(30));
        assert_eq!(RunArgs::defaults().http_addr.port(), 8080);
    }

    #[test]
    fn http_step_ranges_default_to_all_but_link_local() {
        let args = RunArgs::defaults();
        assert_eq!(args.http_step.allow.to_string(), "0.0.0.0/0,::/0");
        assert_eq!(args.http_step.deny.to_string(), "169.254.0.0/16,fe80::/10");
        assert_eq!(args.cluster_url, None);
        let cli = RunArgs::try_parse_from([
            "volt-operator",
            "--http-step-allow",
            "10.0.0.0/8, fd00::/8",
            "--http-step-deny=",
        ])
        .expect("parses");
        let args = cli;
        assert_eq!(args.http_step.allow.to_string(), "10.0.0.0/8,fd00::/8");
        assert_eq!(args.http_step.deny, CidrList::default());
    }

    #[test]
    fn bad_values_name_the_flag() {
        for flag in ["--http-step-allow", "--http-step-deny"] {
            let err = RunArgs::try_parse_from(["volt-operator", flag, "10.0.0.0/8,169.254.0.0/33"]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(flag) && text.contains("\"169.254.0.0/33\" is not a CIDR"), "{text}");
        }
        let err = RunArgs::try_parse_from(["volt-operator", "--lb-strategy", "fastest"]).unwrap_err();
        assert!(err.to_string().contains("--lb-strategy"), "{err}");
        let err = RunArgs::try_parse_from(["volt-operator", "--cache-ttl=-3"]).unwrap_err();
        assert!(err.to_string().contains("--cache-ttl"), "{err}");
    }
}
