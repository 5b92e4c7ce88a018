//! The system watcher: checks the components on an interval (API server reachable, each
//! controller alive, agents ready) and keeps the figures `/api/v1/stats` reports.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ListParams};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::api::{Agent, condition_status};
use crate::metrics::Metrics;

/// Health of one component.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentHealth {
    pub healthy: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub checked_at: Timestamp,
}

/// What the watcher last saw.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub components: BTreeMap<String, ComponentHealth>,
    pub agents_total: usize,
    pub agents_ready: usize,
    pub replicas_healthy: i64,
    /// Steps that succeeded per second over the last interval.
    pub steps_per_second: f64,
    /// Mean WorkflowRun reconcile time over the last interval, in milliseconds.
    pub reconcile_ms: f64,
}

/// Shared state of the watcher.
#[derive(Default)]
pub struct SystemWatcher {
    snapshot: Mutex<Snapshot>,
}

impl SystemWatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    /// Records a component's health (controllers report themselves here too).
    pub fn set(&self, component: &str, healthy: bool, message: impl Into<String>) {
        let h = ComponentHealth { healthy, message: message.into(), checked_at: Timestamp::now() };
        self.lock().components.insert(component.to_string(), h);
    }

    /// True when every component is healthy.
    pub fn healthy(&self) -> bool {
        self.lock().components.values().all(|c| c.healthy)
    }

    /// Checks the components every `interval` until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        scopes: Vec<Option<String>>,
        metrics: Metrics,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut last = (Instant::now(), succeeded_steps(&metrics), reconcile_totals(&metrics));
        loop {
            match client.apiserver_version().await {
                Ok(v) => self.set("apiserver", true, format!("reachable, version {}.{}", v.major, v.minor)),
                Err(e) => self.set("apiserver", false, format!("unreachable: {e}")),
            }
            let mut total = 0;
            let mut ready = 0;
            let mut replicas = 0;
            let mut agent_error = None;
            for scope in &scopes {
                let api: Api<Agent> = crate::kube_util::api_for(&client, scope);
                match api.list(&ListParams::default()).await {
                    Ok(list) => {
                        for a in list.items {
                            total += 1;
                            let status = a.status.unwrap_or_default();
                            if condition_status(&status.conditions, "Ready").is_some_and(|c| c.status == "True") {
                                ready += 1;
                            }
                            replicas += i64::from(status.replicas.healthy);
                        }
                    }
                    Err(e) => agent_error = Some(e.to_string()),
                }
            }
            match agent_error {
                Some(e) => self.set("agents", false, format!("cannot list agents: {e}")),
                None => self.set("agents", true, format!("{ready} of {total} agents ready")),
            }
            let now = (Instant::now(), succeeded_steps(&metrics), reconcile_totals(&metrics));
            let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            {
                let mut snap = self.lock();
                snap.agents_total = total;
                snap.agents_ready = ready;
                snap.replicas_healthy = replicas;
                snap.steps_per_second = (now.1.saturating_sub(last.1)) as f64 / secs;
                let (sum, count) = (now.2.0 - last.2.0, now.2.1.saturating_sub(last.2.1));
                snap.reconcile_ms = if count == 0 { 0.0 } else { sum / count as f64 * 1000.0 };
            }
            last = now;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

fn succeeded_steps(metrics: &Metrics) -> u64 {
    ["agent", "container", "http", "template"]
        .iter()
        .map(|k| metrics.steps.with_label_values(&[k, "Succeeded"]).get())
        .sum()
}

fn reconcile_totals(metrics: &Metrics) -> (f64, u64) {
    let h = metrics.reconcile_duration.with_label_values(&["workflowrun"]);
    (h.get_sample_sum(), h.get_sample_count())
}
