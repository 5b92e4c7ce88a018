//! The operator, run in-process for a test: its controllers watch only the test's namespace,
//! so tests running side by side do not see each other's objects. For the built binary as an
//! OS process, see [`super::process`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use volt_operator::config::RunArgs;
use volt_operator::controllers::{self, Health};
use volt_operator::metrics::Metrics;

use super::control_plane;

/// The controllers of `volt_operator::controllers::run` on a tokio task of the test's runtime,
/// as the leader, with the test's `RunArgs`; stopped (as a crash would) when dropped.
pub struct Operator {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    token: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Operator {
    /// Starts the controllers for namespace `ns` with default settings.
    pub async fn start(ns: &str) -> Self {
        Self::start_with(ns, |_| {}).await
    }

    /// Starts the controllers for namespace `ns`, after `tune` adjusts the settings.
    pub async fn start_with(ns: &str, tune: impl FnOnce(&mut RunArgs)) -> Self {
        let config = control_plane::kube_config(control_plane::shared().kubeconfig_path()).await;
        let metrics = Metrics::new();
        let client = volt_operator::kube_util::client_with_metrics(config, &metrics, RunArgs::defaults().api_bound())
            .await
            .expect("operator client");
        Self::start_on(ns, client, metrics, tune).await
    }

    /// Starts the controllers for namespace `ns` with the chart's rights there and nothing more
    /// (the operator user, granted the chart's rules in `ns` by [`super::grant_operator`]).
    pub async fn start_with_chart_rights(admin: &kube::Client, ns: &str) -> Self {
        super::grant_operator(admin, ns).await;
        let config = control_plane::kube_config(control_plane::shared().operator_kubeconfig_path()).await;
        let metrics = Metrics::new();
        let client = volt_operator::kube_util::client_with_metrics(config, &metrics, RunArgs::defaults().api_bound())
            .await
            .expect("operator client");
        Self::start_on(ns, client, metrics, |_| {}).await
    }

    /// Starts the controllers for namespace `ns` on `client` (one a test built, say with another
    /// identity or its own tower layer) reporting to `metrics`, after `tune` adjusts the settings.
    pub async fn start_on(ns: &str, client: kube::Client, metrics: Metrics, tune: impl FnOnce(&mut RunArgs)) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("VOLT_TEST_LOG"))
            .with_test_writer()
            .try_init();
        let mut args = RunArgs::defaults();
        args.namespaces = vec![ns.to_string()];
        args.health_check_interval = Duration::from_secs(1);
        tune(&mut args);
        let health = Arc::new(Health::default());
        health.leader.store(true, Ordering::Relaxed);
        // The HTTP API checks callers with this client, as `volt-operator run` does.
        let _ = health.access.set(Arc::new(volt_operator::auth::Access::kube(client.clone())));
        let token = CancellationToken::new();
        let ownership = volt_operator::shards::Ownership::single(None);
        let handle =
            tokio::spawn(controllers::run(client, args, metrics.clone(), health.clone(), ownership, token.clone()));
        let op = Self { metrics, health, token, handle: Some(handle) };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !op.health.synced.load(Ordering::Relaxed) {
            assert!(tokio::time::Instant::now() < deadline, "operator caches did not sync in 30s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        op
    }

    /// Stops the controllers, as a crash would (no cleanup beyond dropping tasks).
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
    }

    /// API requests the operator sent, by verb.
    pub fn api_requests(&self, verb: &str) -> u64 {
        self.metrics.api_requests.with_label_values(&[verb]).get()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}
