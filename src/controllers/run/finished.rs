//! Finished runs: labelled `volt.dev/finished` once their end is written, then tracked by
//! metadata only; deleted when `ttlSecondsAfterFinished` passes; counted for the gauges. And
//! what the run and pod caches keep of each object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::api::{WorkflowRun, WorkflowRunStatus};
use crate::controllers::Error;
use crate::kube_util::{WatchBackoff, api_for, slim_meta};
use crate::naming;

use super::lock;

/// Finished runs by phase, as a sweeper last counted them.
pub type Counts = Arc<Mutex<HashMap<String, i64>>>;
use super::status_writer::{StatusWriter, mark_finished};

/// A finished run: labelled as such once its end is written (by the status writer, or here
/// for a run that finished before a restart), after which only its metadata is tracked, and
/// [`sweep_finished`] deletes it when its TTL passes.
pub async fn finished(
    client: &Client,
    writer: &StatusWriter,
    run: &WorkflowRun,
    status: &WorkflowRunStatus,
) -> Result<Action, Error> {
    let uid = run.uid().unwrap_or_default();
    // Labelled already: by this object, or by this process's writer (a pass that came with the
    // cache's older object).
    if !run.labels().contains_key(naming::LABEL_FINISHED) && !writer.pending(&uid) && !writer.ended(&uid) {
        let ns = run.namespace().unwrap_or_default();
        match mark_finished(client, &ns, &run.name_any(), status, run.spec.ttl_seconds_after_finished).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

/// Finished runs, by metadata only: deletes those whose TTL passed, and counts them by phase
/// for the gauges.
pub async fn sweep_finished(client: Client, scope: Option<String>, selector: String, counts: Counts) {
    let api: Api<kube::core::PartialObjectMeta<WorkflowRun>> = api_for(&client, &scope);
    let (store, writer) = reflector::store();
    // Paged (quorum reads, each page bounded): finished runs may be many, readiness does not
    // wait for this list, and one unpaged response of all of them would set the process's
    // peak memory.
    let stream = watcher(api, watcher::Config::default().labels(&selector).page_size(500))
        .backoff(WatchBackoff::default())
        .modify(|m| m.metadata.managed_fields = None)
        .reflect(writer)
        .touched_objects()
        .for_each(|_| async {});
    let sweep = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Timestamp::now();
            let mut by_phase: HashMap<String, i64> = HashMap::new();
            for m in store.state() {
                *by_phase.entry(m.labels().get(naming::LABEL_FINISHED).cloned().unwrap_or_default()).or_default() += 1;
                let expired = m
                    .annotations()
                    .get(naming::ANNOTATION_EXPIRES)
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .is_some_and(|t| t <= now);
                if !expired || m.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let ns = m.namespace().unwrap_or_default();
                let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
                let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
                match runs.delete(&m.name_any(), &dp).await {
                    Ok(_) => info!(run = %m.name_any(), namespace = %ns, "deleted after ttlSecondsAfterFinished"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => warn!(run = %m.name_any(), namespace = %ns, error = %e, "deleting an expired run failed"),
                }
            }
            *lock(&counts) = by_phase;
        }
    };
    tokio::select! {
        _ = stream => {}
        _ = sweep => {}
    }
}

/// A cached run: a finished one keeps its phase, times and message (what the TTL, the
/// concurrency limits and the gauges read), not its spec snapshot, steps or inline workflow.
pub fn slim_run(run: &mut WorkflowRun) {
    slim_meta(&mut run.metadata);
    if let Some(status) = run.status.as_mut()
        && status.phase.is_finished()
    {
        status.workflow = None;
        status.steps.clear();
        status.params.clear();
        run.spec.workflow = None;
    }
}

/// A cached pod of a run: its status, labels, owners and deletion are what the controller reads.
pub fn slim_pod(pod: &mut Pod) {
    slim_meta(&mut pod.metadata);
    pod.metadata.annotations = None;
    pod.spec = None;
}
