//! The shard labeller (with `--shards`): gives each WorkflowRun without a `volt.dev/shard`
//! label its slot, once. Every replica watches the unlabelled runs (few: a run is labelled
//! moments after it is created) and labels those whose shard it holds, so each run is labelled
//! by one replica, the one that will reconcile it.
//!
//! - The slot is a hash of the run UID. A run of a Workflow with `concurrency` gets the
//!   Workflow's slot instead: all its runs share a shard, so `maxRuns` holds across replicas.
//! - A child run created by the operator already has its parent's label; one that lacks it (a
//!   run from before sharding) gets its parent's slot, from its owner reference.
//! - A run that had started before sharding was turned on has pods without the label: they
//!   are labelled too, so the shard's controller finds them.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Error, drain, error_requeue};
use crate::api::{Workflow, WorkflowRun};
use crate::kube_util::{WatchBackoff, api_for};
use crate::naming;
use crate::shards::{Ownership, slot_of_uid};

/// Runs labelled at once.
const LABEL_CONCURRENCY: u16 = 16;

/// How soon a run whose shard this replica does not hold is looked at again (no request).
const RECHECK: Duration = Duration::from_secs(1);

struct Ctx {
    client: Client,
    ownership: Arc<Ownership>,
    workflows: Store<Workflow>,
}

/// The slot of a run: its Workflow's with `concurrency`, its parent's for a child, else its own.
fn slot_for(run: &WorkflowRun, workflows: &Store<Workflow>) -> u32 {
    let ns = run.namespace().unwrap_or_default();
    if let Some(r) = &run.spec.workflow_ref
        && workflows.get(&ObjectRef::new(&r.name).within(&ns)).is_some_and(|w| w.spec.concurrency.is_some())
    {
        return slot_of_uid(&format!("{ns}/{}", r.name));
    }
    let parent = run
        .owner_references()
        .iter()
        .find(|o| o.kind == WorkflowRun::kind(&()) && o.api_version == WorkflowRun::api_version(&()));
    slot_of_uid(&parent.map_or_else(|| run.uid().unwrap_or_default(), |p| p.uid.clone()))
}

async fn reconcile(run: Arc<WorkflowRun>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if run.labels().contains_key(naming::LABEL_SHARD) || run.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let slot = slot_for(&run, &ctx.workflows);
    if !ctx.ownership.holds(ctx.ownership.shard_of_slot(slot)) {
        return Ok(Action::requeue(RECHECK));
    }
    let (ns, name) = (run.namespace().unwrap_or_default(), run.name_any());
    let label = json!({"metadata": {"labels": {naming::LABEL_SHARD: slot.to_string()}}});
    // A run that started before sharding: its pods first, so that the shard's controller, which
    // sees the run once it is labelled, finds them.
    if run.status.as_ref().is_some_and(|s| s.started_at.is_some()) {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let selector = format!("{}={}", naming::LABEL_RUN, naming::label_value(&name));
        for pod in pods.list_metadata(&ListParams::default().labels(&selector)).await? {
            pods.patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&label)).await?;
        }
    }
    let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ns);
    match runs.patch(&name, &PatchParams::default(), &Patch::Merge(&label)).await {
        Ok(_) => info!(run = %name, namespace = %ns, slot, "labelled a run with its shard slot"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

fn error_policy(_run: Arc<WorkflowRun>, _err: &Error, _ctx: Arc<Ctx>) -> Action {
    error_requeue()
}

/// The labeller for one scope, until `shutdown`.
pub async fn controller(
    client: Client,
    scope: Option<String>,
    workflows: Store<Workflow>,
    ownership: Arc<Ownership>,
    shutdown: CancellationToken,
) {
    let unlabelled = format!("!{}", naming::LABEL_SHARD);
    let (runs, run_writer) = reflector::store();
    let run_stream = watcher(api_for::<WorkflowRun>(&client, &scope), watcher::Config::default().labels(&unlabelled))
        .backoff(WatchBackoff::default())
        .modify(|r: &mut WorkflowRun| {
            r.metadata.managed_fields = None;
            r.spec.workflow = None;
        })
        .reflect(run_writer)
        .touched_objects();
    crate::kube_util::wait_ready(&workflows).await;
    let ctx = Arc::new(Ctx { client, ownership, workflows });
    // Bounded: a burst of new runs is labelled a few at a time, not with thousands of requests
    // (and connections) at once, which slowed the API server past the Lease renewals.
    let stream = Controller::for_stream(run_stream, runs)
        .with_config(kube::runtime::controller::Config::default().concurrency(LABEL_CONCURRENCY))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx);
    drain("shard-labeller", stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn run(uid: &str, workflow: Option<&str>) -> WorkflowRun {
        let mut r: WorkflowRun = serde_json::from_value(json!({
            "apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": uid},
            "spec": {}
        }))
        .expect("a run");
        r.spec.workflow_ref = workflow.map(|w| serde_json::from_value(json!({"name": w})).expect("a ref"));
        r
    }

    #[test]
    fn runs_hash_by_uid_children_by_parent_and_limited_workflows_share_a_slot() {
        let (store, mut writer) = reflector::store::<Workflow>();
        let limited: Workflow = serde_json::from_value(json!({
            "apiVersion": "volt.dev/v1alpha1", "kind": "Workflow",
            "metadata": {"name": "limited", "namespace": "ns"},
            "spec": {"concurrency": {"maxRuns": 1}, "steps": []}
        }))
        .expect("a workflow");
        writer.apply_watcher_event(&watcher::Event::Apply(limited));
        assert_eq!(slot_for(&run("u1", None), &store), slot_of_uid("u1"));
        assert_eq!(slot_for(&run("u1", Some("other")), &store), slot_of_uid("u1"));
        assert_eq!(slot_for(&run("u1", Some("limited")), &store), slot_for(&run("u2", Some("limited")), &store));
        assert_eq!(slot_for(&run("u1", Some("limited")), &store), slot_of_uid("ns/limited"));
        let mut child = run("c1", None);
        child.metadata.owner_references = Some(vec![OwnerReference {
            api_version: WorkflowRun::api_version(&()).to_string(),
            kind: "WorkflowRun".into(),
            name: "parent".into(),
            uid: "p1".into(),
            ..Default::default()
        }]);
        assert_eq!(slot_for(&child, &store), slot_of_uid("p1"));
    }
}
