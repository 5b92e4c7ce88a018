//! Which run an agent call belongs to. The task pool runs each attempt inside [`in_run`], so
//! the caller knows the run (for its priority in rate-limit queues, its Workflow for Budget
//! selectors and metrics, and its `spec.budget`) without the engine passing it along.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::Api;

use crate::api::{RunBudget, WorkflowRun};
use crate::engine::RunInfo;

/// The run and step of the attempt being run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The step's status key.
    pub step: String,
    pub attempt: u32,
    /// The traceparent the run continues ([`RunInfo::traceparent`]).
    pub traceparent: Option<String>,
    /// The run's slot ([`RunInfo::shard`]), with shards.
    pub slot: Option<u32>,
}

tokio::task_local! {
    static CURRENT: RunRef;
}

/// Runs `fut` as attempt `attempt` of step `step` of `run`.
pub fn in_run<F: Future>(run: &RunInfo, step: &str, attempt: u32, fut: F) -> impl Future<Output = F::Output> {
    let r = RunRef {
        namespace: run.namespace.clone(),
        name: run.name.clone(),
        uid: run.uid.clone(),
        step: step.into(),
        attempt,
        traceparent: run.traceparent.clone(),
        slot: run.shard.as_deref().and_then(crate::shards::parse_slot),
    };
    CURRENT.scope(r, fut)
}

/// The run of the attempt this task runs, if any.
pub fn current() -> Option<RunRef> {
    CURRENT.try_with(Clone::clone).ok()
}

/// What the caller needs to know of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunMeta {
    /// The run's `workflowRef` (none for an inline Workflow).
    pub workflow: Option<String>,
    pub priority: i32,
    pub budget: Option<RunBudget>,
    /// The run's `status.usage` when read: tokens and cost.
    pub used: (u64, f64),
}

/// Where run metadata comes from: the API server in the cluster, nothing in local mode.
pub trait RunSource: Send + Sync {
    fn get<'a>(&'a self, run: &'a RunRef) -> BoxFuture<'a, Option<RunMeta>>;
}

/// How long a run's metadata is reused before it is read again (priority and budget edits).
const FRESH_FOR: Duration = Duration::from_secs(30);

/// Reads runs from the API server, once per run every [`FRESH_FOR`] at most.
pub struct KubeRuns {
    client: kube::Client,
    cache: Mutex<HashMap<String, (tokio::time::Instant, RunMeta)>>,
}

impl KubeRuns {
    pub fn new(client: kube::Client) -> Arc<Self> {
        Arc::new(KubeRuns { client, cache: Mutex::default() })
    }
}

impl RunSource for KubeRuns {
    fn get<'a>(&'a self, run: &'a RunRef) -> BoxFuture<'a, Option<RunMeta>> {
        Box::pin(async move {
            let now = tokio::time::Instant::now();
            let cached = {
                let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.get(&run.uid).cloned()
            };
            if let Some((at, meta)) = &cached
                && now.duration_since(*at) < FRESH_FOR
            {
                return Some(meta.clone());
            }
            let api: Api<WorkflowRun> = Api::namespaced(self.client.clone(), &run.namespace);
            let meta = match api.get_opt(&run.name).await {
                Ok(Some(r)) if r.metadata.uid.as_deref() == Some(run.uid.as_str()) => {
                    let usage = r.status.as_ref().and_then(|s| s.usage).unwrap_or_default();
                    RunMeta {
                        workflow: r.spec.workflow_ref.as_ref().map(|w| w.name.clone()),
                        priority: r.spec.priority,
                        budget: r.spec.budget.clone(),
                        used: (usage.input_tokens + usage.output_tokens, usage.cost),
                    }
                }
                Ok(_) => return cached.map(|(_, m)| m),
                Err(e) => {
                    tracing::debug!(run = %run.name, error = %e, "reading the run for its budget and priority");
                    return cached.map(|(_, m)| m);
                }
            };
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 10_000 {
                cache.retain(|_, (at, _)| now.duration_since(*at) < FRESH_FOR);
            }
            // The usage first read is kept: it seeds the run's count once.
            let meta = match cache.get(&run.uid) {
                Some((_, old)) => RunMeta { used: old.used, ..meta },
                None => meta,
            };
            cache.insert(run.uid.clone(), (now, meta.clone()));
            Some(meta)
        })
    }
}

/// Suspends runs with a merge patch of `spec.suspend` (a Budget with `onExceeded: Suspend`).
pub struct KubeSuspender {
    pub client: kube::Client,
}

impl super::budget::Suspender for KubeSuspender {
    fn suspend<'a>(&'a self, namespace: &'a str, run: &'a str, why: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let api: Api<WorkflowRun> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({"spec": {"suspend": true}});
            match api.patch(run, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await {
                Ok(_) => tracing::info!(run, namespace, reason = why, "run suspended by a budget"),
                Err(e) => tracing::warn!(run, namespace, error = %e, "suspending a run for its budget"),
            }
        })
    }
}
