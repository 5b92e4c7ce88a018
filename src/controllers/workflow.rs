//! The Workflow controller: validates each Workflow and reports it in its status.

use std::sync::Arc;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{FIELD_MANAGER, KState, Workflow, WorkflowStatus, own_conditions, set_kstatus};
use crate::engine;
use crate::metrics::Metrics;

use super::{Error, drain, error_requeue};
use crate::kube_util::{ServedFromWatchCache, WatchBackoff, api_for};

struct Ctx {
    client: Client,
    metrics: Metrics,
}

/// The status a Workflow should have (pure).
pub fn desired_status(wf: &Workflow, current: Option<&WorkflowStatus>, now: Timestamp) -> WorkflowStatus {
    let generation = wf.metadata.generation;
    let mut status = WorkflowStatus {
        observed_generation: generation,
        conditions: current.map(|s| s.conditions.clone()).unwrap_or_default(),
        step_count: (wf.spec.steps.len() + wf.spec.finally.len()) as u32,
    };
    match engine::validate(&wf.spec) {
        Ok(_) => set_kstatus(&mut status.conditions, KState::Ready, "Valid", "the workflow is valid", generation, now),
        Err(e) => set_kstatus(&mut status.conditions, KState::Stalled, "InvalidSpec", &e.to_string(), generation, now),
    }
    status
}

async fn reconcile(wf: Arc<Workflow>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("workflow");
    let desired = desired_status(&wf, wf.status.as_ref(), Timestamp::now());
    if wf.status.as_ref() != Some(&desired) {
        let ns = wf.namespace().unwrap_or_default();
        let api: Api<Workflow> = Api::namespaced(ctx.client.clone(), &ns);
        // Other writers' conditions are theirs: send only ours.
        let sent = WorkflowStatus { conditions: own_conditions(&desired.conditions), ..desired.clone() };
        let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "status": sent});
        api.patch_status(&wf.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.metrics.status_writes.with_label_values(&["Workflow"]).inc();
    }
    Ok(Action::await_change())
}

fn error_policy(_wf: Arc<Workflow>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&["workflow", err.metric_label()]).inc();
    error_requeue()
}

/// The Workflow controller for one scope (a namespace, or all).
pub async fn controller(client: Client, scope: Option<String>, metrics: Metrics, shutdown: CancellationToken) {
    let api: Api<Workflow> = api_for(&client, &scope);
    let ctx = Arc::new(Ctx { client, metrics });
    let (store, writer) = kube::runtime::reflector::store();
    let workflows = watcher(api, watcher::Config::default().served_from_watch_cache())
        .backoff(WatchBackoff::default())
        .modify(|w: &mut Workflow| crate::kube_util::slim_meta(&mut w.metadata))
        .reflect(writer)
        .touched_objects();
    // A few at a time: a start with thousands of Workflows writes their status without a
    // burst of requests (and memory).
    let stream = Controller::for_stream(workflows, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(8))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx);
    drain("workflow", stream).await;
}
