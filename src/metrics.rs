//! Prometheus metrics, named in Prometheus style: `volt_` prefix, units in names, `_total`
//! counters, histograms for durations.

use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    /// `volt_schedule_slots_total{exported_namespace, schedule, outcome}`: what became of
    /// WorkflowSchedule slots (`started`, `too_late`, `forbidden`, `missed`).
    pub schedule_slots: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub runs: IntCounterVec,
    pub runs_active: IntGaugeVec,
    pub steps: IntCounterVec,
    pub step_duration: HistogramVec,
    pub queue_depth: IntGauge,
    pub inprocess_tasks: IntGauge,
    pub api_requests: IntCounterVec,
    /// `volt_kube_api_timeouts_total{verb}`: requests the API server did not answer within
    /// `--api-timeout` ([`crate::api_timeout`]).
    pub api_timeouts: IntCounterVec,
    pub status_writes: IntCounterVec,
    pub status_writes_deferred: IntCounter,
    pub events_dropped: IntCounterVec,
    /// Agent steps: LLM calls and load-balancer picks.
    pub llm: LlmMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    registry.register(Box::new(h.clone())).expect("metric registered once");
    h
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles =
            counter(&registry, "volt_reconciles_total", "Reconciliations, by controller.", &["controller"]);
        let reconcile_errors = counter(
            &registry,
            "volt_reconcile_errors_total",
            "Failed reconciliations, by controller and error.",
            &["controller", "error"],
        );
        let reconcile_duration = histogram(
            &registry,
            "volt_reconcile_duration_seconds",
            "Duration of one reconciliation, by controller.",
            &["controller"],
            vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
        );
        let schedule_slots = counter(
            &registry,
            "volt_schedule_slots_total",
            "WorkflowSchedule slots, by namespace, schedule and outcome (started, too_late, forbidden, missed).",
            &["exported_namespace", "schedule", "outcome"],
        );
        let runs = counter(&registry, "volt_workflow_runs_total", "Runs that reached a phase, by phase.", &["phase"]);
        let runs_active =
            IntGaugeVec::new(Opts::new("volt_workflow_runs", "Runs known to the operator, by phase."), &["phase"])
                .expect("valid metric");
        registry.register(Box::new(runs_active.clone())).expect("metric registered once");
        let steps = counter(&registry, "volt_steps_total", "Step transitions, by kind and phase.", &["kind", "phase"]);
        let step_duration = histogram(
            &registry,
            "volt_step_duration_seconds",
            "Duration of finished step attempts, by kind and phase.",
            &["kind", "phase"],
            vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0],
        );
        let queue_depth =
            IntGauge::new("volt_run_queue_depth", "Runs waiting for a concurrency slot.").expect("valid metric");
        registry.register(Box::new(queue_depth.clone())).expect("metric registered once");
        let inprocess_tasks =
            IntGauge::new("volt_inprocess_tasks", "In-process step tasks running.").expect("valid metric");
        registry.register(Box::new(inprocess_tasks.clone())).expect("metric registered once");
        let api_requests = counter(
            &registry,
            "volt_kube_api_requests_total",
            "Requests the operator sent to the Kubernetes API, by verb.",
            &["verb"],
        );
        let api_timeouts = counter(
            &registry,
            "volt_kube_api_timeouts_total",
            "Requests to the Kubernetes API not answered within --api-timeout, by verb.",
            &["verb"],
        );
        let status_writes =
            counter(&registry, "volt_status_writes_total", "Status writes, by kind of object.", &["kind"]);
        let status_writes_deferred = IntCounter::new(
            "volt_status_writes_deferred_total",
            "Status changes that waited to share a later write (see --status-flush-interval).",
        )
        .expect("valid metric");
        registry.register(Box::new(status_writes_deferred.clone())).expect("metric registered once");
        let llm = LlmMetrics::register(&registry);
        // What is running, and the process's CPU, memory and file descriptors (process_*).
        let build_info = IntGaugeVec::new(
            Opts::new("volt_build_info", "The operator's version (the value is always 1)."),
            &["version"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build_info)).expect("metric registered once");
        #[cfg(target_os = "linux")]
        let _ = registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        let events_dropped = counter(
            &registry,
            "volt_events_dropped_total",
            "Events dropped because a queue was full, by sink.",
            &["sink"],
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            schedule_slots,
            reconcile_duration,
            runs,
            runs_active,
            steps,
            step_duration,
            queue_depth,
            inprocess_tasks,
            api_requests,
            api_timeouts,
            status_writes,
            status_writes_deferred,
            events_dropped,
            llm,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// A measure of one reconciliation; records its duration when dropped.
    pub fn reconcile_timer(&self, controller: &'static str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer { start: Instant::now(), hist: self.reconcile_duration.with_label_values(&[controller]) }
    }
}

pub struct ReconcileTimer {
    start: Instant,
    hist: prometheus::Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// The verb of a Kubernetes API request, as the API server's audit log names it.
/// Whether `uri`'s query sets `flag` (`flag=true` or `flag=1`), as kube writes `watch` and
/// `follow`.
pub fn query_flag(uri: &http::Uri, flag: &str) -> bool {
    let query = uri.query().unwrap_or("");
    query.split('&').filter_map(|kv| kv.split_once('=')).any(|(k, v)| k == flag && matches!(v, "true" | "1"))
}

pub fn verb_of(method: &http::Method, uri: &http::Uri) -> &'static str {
    let watch = query_flag(uri, "watch");
    match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET => {
            // A collection ends with the plural resource; an object path has the name after it.
            "get_or_list"
        }
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// A tower layer that counts the requests a kube client sends, by verb.
#[derive(Clone)]
pub struct ApiCounterLayer {
    pub counter: Arc<IntCounterVec>,
}

impl<S> tower::Layer<S> for ApiCounterLayer {
    type Service = ApiCounter<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiCounter { inner, counter: self.counter.clone() }
    }
}

#[derive(Clone)]
pub struct ApiCounter<S> {
    inner: S,
    counter: Arc<IntCounterVec>,
}

impl<S, B> tower::Service<http::Request<B>> for ApiCounter<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.counter.with_label_values(&[verb_of(req.method(), req.uri())]).inc();
        self.inner.call(req)
    }
}

/// Metrics of agent steps: LLM calls, their latency and tokens per agent and replica, and the
/// load balancer's picks (part of [`Metrics`], as `metrics.llm`).
#[derive(Clone)]
pub struct LlmMetrics {
    /// `volt_llm_calls_total{exported_namespace, agent, replica, outcome}`; outcome is `success`,
    /// `error`, `rate_limited`, `timeout` or `rejected`.
    pub calls: IntCounterVec,
    /// `volt_llm_call_duration_seconds{exported_namespace, agent, replica}`, successful calls.
    pub latency: HistogramVec,
    /// `volt_llm_tokens_total{exported_namespace, agent, replica, kind}`; kind is `prompt` or `completion`.
    pub tokens: IntCounterVec,
    /// `volt_llm_retries_total{exported_namespace, agent, reason}`.
    pub retries: IntCounterVec,
    /// `volt_lb_picks_total{exported_namespace, agent, replica, strategy}`.
    pub picks: IntCounterVec,
    /// `volt_lb_queue_wait_seconds{strategy}`: time calls waited for a free replica.
    pub queue_wait: HistogramVec,
    /// `volt_llm_usage_tokens_total{exported_namespace, workflow, agent, kind}`; kind is `input`
    /// or `output`; `workflow` is empty for runs of an inline Workflow.
    pub usage_tokens: IntCounterVec,
    /// `volt_llm_cost_total{exported_namespace, workflow, agent}`, in the unit of the Agents'
    /// `spec.pricing`.
    pub cost: CounterVec,
    /// `volt_llm_rate_limit_wait_seconds{exported_namespace, agent}`: time calls waited under
    /// the agent's `spec.rateLimit`.
    pub rate_limit_wait: HistogramVec,
    /// `volt_llm_fallbacks_total{exported_namespace, agent, fallback, reason}`.
    pub fallbacks: IntCounterVec,
    /// `volt_budget_refusals_total{exported_namespace, budget}`: calls a Budget refused.
    pub budget_refusals: IntCounterVec,
}

/// Removes the series of `vec` whose `exported_namespace` and `agent` labels are these and
/// whose `replica` is not in `keep` (replicas that are gone).
fn drop_replica_series<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    namespace: &str,
    agent: &str,
    keep: &[&str],
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> =
                m.get_label().iter().map(|l| (l.name(), l.value())).collect();
            let gone = labels.get("exported_namespace") == Some(&namespace)
                && labels.get("agent") == Some(&agent)
                && labels.get("replica").is_some_and(|r| !keep.contains(r));
            if gone {
                let _ = vec.remove(&labels);
            }
        }
    }
}

impl LlmMetrics {
    /// Drops the per-replica series of an Agent's replicas that are gone (all of them when the
    /// Agent is): a scaled-down or rescheduled replica's pod name never comes back.
    pub fn forget_replicas(&self, namespace: &str, agent: &str, keep: &[&str]) {
        drop_replica_series(&self.calls, namespace, agent, keep);
        drop_replica_series(&self.latency, namespace, agent, keep);
        drop_replica_series(&self.tokens, namespace, agent, keep);
        drop_replica_series(&self.picks, namespace, agent, keep);
    }

    /// Registers the metrics in `registry` (a metric already registered there is left as is).
    pub fn register(registry: &Registry) -> Self {
        let replica = &["exported_namespace", "agent", "replica"];
        let new_counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let new_histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
            let _ = registry.register(Box::new(h.clone()));
            h
        };
        Self {
            calls: new_counter(
                "volt_llm_calls_total",
                "LLM call attempts, by agent, replica and outcome.",
                &["exported_namespace", "agent", "replica", "outcome"],
            ),
            latency: new_histogram(
                "volt_llm_call_duration_seconds",
                "Latency of successful LLM calls, by agent and replica.",
                replica,
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
            ),
            tokens: new_counter(
                "volt_llm_tokens_total",
                "Tokens used by LLM calls, by agent, replica and kind (prompt, completion).",
                &["exported_namespace", "agent", "replica", "kind"],
            ),
            retries: new_counter(
                "volt_llm_retries_total",
                "LLM calls retried within a step attempt, by agent and reason.",
                &["exported_namespace", "agent", "reason"],
            ),
            picks: new_counter(
                "volt_lb_picks_total",
                "Replicas picked by the load balancer, by agent, replica and strategy.",
                &["exported_namespace", "agent", "replica", "strategy"],
            ),
            queue_wait: new_histogram(
                "volt_lb_queue_wait_seconds",
                "Time calls waited in the load balancer's queue for a free replica, by strategy.",
                &["strategy"],
                vec![0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            usage_tokens: new_counter(
                "volt_llm_usage_tokens_total",
                "Tokens of answered LLM calls, by namespace, workflow, agent and kind (input, output).",
                &["exported_namespace", "workflow", "agent", "kind"],
            ),
            cost: {
                let c = CounterVec::new(
                    Opts::new(
                        "volt_llm_cost_total",
                        "Cost of answered LLM calls (Agent spec.pricing), by namespace, workflow and agent.",
                    ),
                    &["exported_namespace", "workflow", "agent"],
                )
                .expect("valid metric");
                let _ = registry.register(Box::new(c.clone()));
                c
            },
            rate_limit_wait: new_histogram(
                "volt_llm_rate_limit_wait_seconds",
                "Time LLM calls waited under their agent's spec.rateLimit, by namespace and agent.",
                &["exported_namespace", "agent"],
                vec![0.0005, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            fallbacks: new_counter(
                "volt_llm_fallbacks_total",
                "Agent steps answered by a fallback agent, by namespace, agent, fallback and reason.",
                &["exported_namespace", "agent", "fallback", "reason"],
            ),
            budget_refusals: new_counter(
                "volt_budget_refusals_total",
                "LLM calls a Budget refused, by namespace and budget.",
                &["exported_namespace", "budget"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families(m: &Metrics) -> Vec<prometheus::proto::MetricFamily> {
        m.registry.gather()
    }

    fn replicas_of(m: &Metrics, name: &str) -> Vec<String> {
        let mut out: Vec<String> = families(m)
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .filter_map(|m| m.get_label().iter().find(|l| l.name() == "replica").map(|l| l.value().to_string()))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn series_of_gone_replicas_are_removed_and_the_build_and_process_are_exported() {
        let m = Metrics::new();
        for r in ["r-0", "r-1", "r-2"] {
            m.llm.calls.with_label_values(&["ns", "coder", r, "success"]).inc();
            m.llm.picks.with_label_values(&["ns", "coder", r, "round_robin"]).inc();
        }
        m.llm.calls.with_label_values(&["other", "coder", "r-1", "success"]).inc();
        m.llm.forget_replicas("ns", "coder", &["r-0"]);
        assert_eq!(replicas_of(&m, "volt_llm_calls_total"), ["r-0", "r-1"], "other namespaces keep theirs");
        assert_eq!(replicas_of(&m, "volt_lb_picks_total"), ["r-0"]);
        m.llm.forget_replicas("ns", "coder", &[]);
        assert_eq!(replicas_of(&m, "volt_lb_picks_total"), Vec::<String>::new());

        let names: Vec<String> = families(&m).iter().map(|f| f.name().to_string()).collect();
        assert!(names.iter().any(|n| n == "volt_build_info"), "{names:?}");
        #[cfg(target_os = "linux")]
        assert!(names.iter().any(|n| n == "process_resident_memory_bytes"), "{names:?}");
    }
}
