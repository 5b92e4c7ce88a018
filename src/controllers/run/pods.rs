//! The cluster's [`StepRuntime`]: container steps as pods owned by the run, workflow steps as
//! child runs ([`super::children`]), resource steps as the objects they name
//! ([`super::resources`]), agent and http steps on the operator's task pool.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::debug;

use crate::api::{StepKind, StepPhase, StepStatus, WorkflowRun, WorkflowRunStatus, WorkflowSpec};
use crate::engine::{Dag, Event, RunInfo, TaskStart};
use crate::executors::pod::{PodState, build_pod, pod_state};
use crate::executors::pool::TaskPool;
use crate::naming;
use crate::pass::{Started, StepRuntime};

use super::children::Children;
use super::lock;
use super::resources::Resources;

/// How long a created pod may be missing from the watch cache before we look for it.
const POD_EXPECTATION: Duration = Duration::from_secs(30);

/// How long a pod creation refused by RBAC is tried again before the step fails: an apiserver
/// that has just started refuses requests until it has loaded its RBAC objects, and RBAC may be
/// applied together with the first runs.
const RBAC_GRACE: Duration = Duration::from_secs(60);

/// Pods for container steps, the task pool for the rest.
pub struct ClusterRuntime {
    pub client: Client,
    pub pool: TaskPool,
    /// The pods of runs, from the scope's watch.
    pub pods: Store<Pod>,
    /// Pods created recently (name -> when), so a lagging cache is not taken for a deletion.
    expectations: Mutex<HashMap<String, Instant>>,
    /// Pods whose creation RBAC refused (name -> first refusal), tried again for [`RBAC_GRACE`].
    forbidden: Mutex<HashMap<String, Instant>>,
    pub children: Children,
    resources: Resources,
    /// Whether this replica holds a run's shard (by its `volt.dev/shard` label): checked at
    /// every start, the one place every pod, child run, object and in-process task begins.
    fence: super::status_writer::Fence,
}

/// A start refused because the run's shard is no longer this replica's.
#[derive(Debug, thiserror::Error)]
#[error("run {run:?}: its shard (slot {slot}) is not held by this replica now; step {step:?} not started")]
struct Fenced {
    run: String,
    slot: String,
    step: String,
}

fn is_pod(kind: Option<StepKind>) -> bool {
    kind == Some(StepKind::Container)
}

/// The run as the controlling owner of what it makes (pods, child runs, resource objects):
/// deleted with it.
pub(super) fn run_owner(run: &RunInfo) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: WorkflowRun::api_version(&()).into_owned(),
        kind: WorkflowRun::kind(&()).into_owned(),
        name: run.name.clone(),
        uid: run.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The rows of `status` whose attempt runs now, of step kind `kind` (not fan-out parents).
pub(super) fn running<'a>(
    spec: &'a WorkflowSpec,
    dag: &'a Dag,
    status: &'a WorkflowRunStatus,
    kind: StepKind,
) -> impl Iterator<Item = (&'a String, &'a StepStatus)> + 'a {
    status.steps.iter().filter(move |(key, row)| {
        row.phase == StepPhase::Running && row.items.is_none() && dag.kind_of(spec, key) == Some(kind)
    })
}

/// Kinds whose attempts run on the task pool in the cluster.
fn on_pool(kind: Option<StepKind>) -> bool {
    matches!(kind, Some(StepKind::Agent | StepKind::Http))
}

impl ClusterRuntime {
    pub fn new(
        client: Client,
        pool: TaskPool,
        pods: Store<Pod>,
        children: Children,
        resources: Resources,
        fence: super::status_writer::Fence,
    ) -> Self {
        Self {
            client,
            pool,
            pods,
            expectations: Default::default(),
            forbidden: Default::default(),
            children,
            resources,
            fence,
        }
    }

    /// Pod outcomes of running container steps.
    async fn observe_pods(
        &self,
        run: &RunInfo,
        spec: &WorkflowSpec,
        dag: &Dag,
        status: &WorkflowRunStatus,
    ) -> Result<Vec<Event>, kube::Error> {
        let mut events = Vec::new();
        for (key, row) in running(spec, dag, status, StepKind::Container) {
            let pod_name = naming::pod_name(&run.name, key, row.attempts);
            let failed = |message: String| Event::Failed {
                key: key.clone(),
                attempt: row.attempts,
                message,
                retryable: true,
                info: Default::default(),
            };
            let pod = match self.pods.get(&ObjectRef::new(&pod_name).within(&run.namespace)) {
                Some(p) => {
                    // Seen: from now on, missing from the cache means deleted.
                    lock(&self.expectations).remove(&pod_name);
                    Some((*p).clone())
                }
                None => {
                    let recent = lock(&self.expectations).get(&pod_name).is_some_and(|t| t.elapsed() < POD_EXPECTATION);
                    if recent {
                        continue;
                    }
                    Api::<Pod>::namespaced(self.client.clone(), &run.namespace).get_opt(&pod_name).await?
                }
            };
            let Some(pod) = pod else {
                events.push(failed(format!("pod {pod_name} was deleted")));
                continue;
            };
            // Only this run's pod counts (a same-named pod of a deleted, recreated run does not).
            if !pod.owner_references().iter().any(|o| o.uid == run.uid) {
                continue;
            }
            match pod_state(&pod) {
                PodState::Running if pod.metadata.deletion_timestamp.is_some() => {
                    events.push(failed(format!("pod {pod_name} is being deleted")))
                }
                PodState::Running => {}
                PodState::Succeeded { output } => {
                    lock(&self.expectations).remove(&pod_name);
                    events.push(Event::Succeeded {
                        key: key.clone(),
                        attempt: row.attempts,
                        output,
                        info: Default::default(),
                    })
                }
                PodState::Failed { message } => {
                    lock(&self.expectations).remove(&pod_name);
                    events.push(failed(message))
                }
            }
        }
        Ok(events)
    }

    async fn create_pod(&self, run: &RunInfo, task: &TaskStart) -> Result<Started, kube::Error> {
        let refused = |message: String| Started::refused(task, message);
        let owner = run_owner(run);
        let Some(mut pod) = build_pod(&run.name, &run.namespace, owner, task) else {
            return Ok(refused(format!("step {}: cannot build a pod for this work", task.key)));
        };
        if let Some(tp) = crate::telemetry::step_traceparent(run, &task.key) {
            crate::executors::pod::add_env(&mut pod, "TRACEPARENT", &tp);
        }
        if let Some(slot) = &run.shard {
            pod.labels_mut().insert(crate::naming::LABEL_SHARD.to_string(), slot.clone());
        }
        let pod_name = pod.name_any();
        let created =
            Api::<Pod>::namespaced(self.client.clone(), &run.namespace).create(&PostParams::default(), &pod).await;
        // Refused by RBAC: perhaps not for long (see RBAC_GRACE). The pass fails and is tried
        // again; nothing it took is lost.
        let rbac_refused = matches!(&created, Err(kube::Error::Api(e))
            if e.code == 403 && e.message.contains("cannot create resource"));
        let try_again = rbac_refused && {
            let first = *lock(&self.forbidden).entry(pod_name.clone()).or_insert_with(Instant::now);
            first.elapsed() < RBAC_GRACE
        };
        if !try_again {
            lock(&self.forbidden).remove(&pod_name);
        }
        match created {
            Err(e) if try_again => Err(e),
            Ok(_) => {
                lock(&self.expectations).insert(pod_name.clone(), Instant::now());
                Ok(Started::Running { pod: Some(pod_name) })
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Started::Running { pod: Some(pod_name) }),
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 403 || e.code == 400 => {
                Ok(refused(format!("cannot create pod {pod_name}: {}", e.message)))
            }
            Err(e) => Err(e),
        }
    }
}

impl StepRuntime for ClusterRuntime {
    type Error = kube::Error;

    fn take(&self, run: &RunInfo) -> Vec<Event> {
        self.pool.drain(&run.uid)
    }

    fn give_back(&self, run: &RunInfo, events: Vec<Event>) {
        self.pool.restore(&run.uid, events);
    }

    fn observe<'a>(
        &'a self,
        run: &'a RunInfo,
        spec: &'a WorkflowSpec,
        dag: &'a Dag,
        status: &'a WorkflowRunStatus,
    ) -> BoxFuture<'a, Result<Vec<Event>, kube::Error>> {
        Box::pin(async move {
            let mut events = self.observe_pods(run, spec, dag, status).await?;
            events.extend(self.children.observe(run, spec, dag, status).await?);
            events.extend(self.resources.observe(run, spec, dag, status).await?);
            events.extend(self.pool.lost(&run.uid, status, |key| on_pool(dag.kind_of(spec, key))));
            Ok(events)
        })
    }

    fn start<'a>(
        &'a self,
        run: &'a RunInfo,
        task: &'a TaskStart,
        kind: Option<StepKind>,
    ) -> BoxFuture<'a, Result<Started, kube::Error>> {
        Box::pin(async move {
            // The pass checked the fence when it began; it may have taken longer than the grace.
            if !(self.fence)(run.shard.as_deref()) {
                let slot = run.shard.clone().unwrap_or_default();
                let fenced = Fenced { run: run.name.clone(), slot, step: task.key.clone() };
                return Err(kube::Error::Service(Box::new(fenced)));
            }
            match kind {
                Some(StepKind::Container) => return self.create_pod(run, task).await,
                Some(StepKind::Workflow) => return self.children.start(run, task).await,
                Some(StepKind::Resource) => return self.resources.start(run, task).await,
                _ => {}
            }
            self.pool.spawn(run.clone(), task.clone());
            Ok(Started::Running { pod: None })
        })
    }

    fn abort<'a>(
        &'a self,
        run: &'a RunInfo,
        key: &'a str,
        attempt: u32,
        kind: Option<StepKind>,
        row: Option<&'a StepStatus>,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(async move {
            match (kind, row.and_then(|r| r.object.as_deref())) {
                (Some(StepKind::Workflow), _) => return self.children.cancel(run, key, attempt).await,
                (Some(StepKind::Resource), Some(object)) => return self.resources.delete(run, object).await,
                _ => {}
            }
            match row.and_then(|r| r.pod.clone()).filter(|_| is_pod(kind)) {
                Some(pod_name) => {
                    debug!(run = %run.name, pod = %pod_name, "deleting the pod of an aborted attempt");
                    let pods = Api::<Pod>::namespaced(self.client.clone(), &run.namespace);
                    match pods.delete(&pod_name, &DeleteParams::background()).await {
                        Ok(_) => Ok(()),
                        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                None => {
                    self.pool.abort(&run.uid, key, attempt);
                    Ok(())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::executors::{Outcome, TaskExecutor};

    /// An in-process step that never ends.
    struct Forever;
    impl TaskExecutor for Forever {
        fn run<'a>(&'a self, _: &'a RunInfo, _: &'a TaskStart) -> BoxFuture<'a, Outcome> {
            Box::pin(futures::future::pending())
        }
    }

    fn runtime(held: bool) -> ClusterRuntime {
        // Never reached: nothing here sends a request.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let pool = TaskPool::new(4, Arc::new(Forever), Arc::new(|_: &str, _: &str| {}));
        let (runs, _) = kube::runtime::reflector::store();
        let (workflows, _) = kube::runtime::reflector::store();
        let (pods, _) = kube::runtime::reflector::store();
        let children = Children::new(client.clone(), runs, workflows, Default::default());
        let resources = Resources::new(client.clone(), Arc::new(|_: &str, _: &str| {}));
        let fence: super::super::status_writer::Fence = Arc::new(move |slot| held && slot == Some("7"));
        ClusterRuntime::new(client, pool, pods, children, resources, fence)
    }

    #[tokio::test]
    async fn nothing_starts_for_a_run_whose_shard_is_not_held() {
        let run = RunInfo {
            name: "r".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            shard: Some("7".into()),
            ..Default::default()
        };
        let task = TaskStart::agent_for_tests(1);
        let lost = runtime(false);
        let err = lost.start(&run, &task, Some(StepKind::Agent)).await.expect_err("refused");
        assert!(err.to_string().contains("slot 7"), "{err}");
        assert_eq!(lost.pool.running(), 0, "no task started");
        let held = runtime(true);
        held.start(&run, &task, Some(StepKind::Agent)).await.expect("started");
        assert_eq!(held.pool.running(), 1);
    }
}
