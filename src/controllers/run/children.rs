//! `workflow` steps in the cluster: each attempt is a child WorkflowRun, owned by the parent
//! run, named deterministically (a restart never starts it twice), labelled with the parent,
//! annotated with the chain of Workflows above it. The child's end is the step's: its
//! `status.output` is the step's output. The parent's cancel (and a step timeout) cancel the
//! child; the parent's suspend reaches it ([`Children::sync_suspend`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};

use crate::api::{
    RunPhase, StepKind, StepPhase, Workflow, WorkflowRef, WorkflowRun, WorkflowRunSpec, WorkflowRunStatus, WorkflowSpec,
};
use crate::engine::{Dag, Event, RunInfo, TaskStart, Work};
use crate::naming;
use crate::pass::Started;
use crate::telemetry;

use super::lock;

/// How long a created child may be missing from the watch cache before we look for it.
const EXPECTATION: Duration = Duration::from_secs(30);

/// The parent run of a child run (its controlling WorkflowRun owner), by name.
pub fn parent_of(run: &WorkflowRun) -> Option<&str> {
    run.owner_references()
        .iter()
        .find(|o| o.kind == "WorkflowRun" && o.controller == Some(true))
        .map(|o| o.name.as_str())
}

/// The chain of Workflows of a run: those above it (from its annotation), then its own.
pub fn chain_of(run: &WorkflowRun, workflow_name: &str) -> Vec<String> {
    let mut chain = run.annotations().get(naming::ANNOTATION_CHAIN).map(|a| naming::parse_chain(a)).unwrap_or_default();
    if !workflow_name.is_empty() {
        chain.push(workflow_name.to_string());
    }
    chain
}

/// Child runs of `workflow` steps.
pub struct Children {
    client: Client,
    /// Active runs, from the scope's watch (finished ones leave it).
    runs: Store<WorkflowRun>,
    workflows: Store<Workflow>,
    /// Children created recently (name -> when), so a lagging cache is not taken for a deletion.
    expectations: Expectations,
}

/// Children created recently, by name; shared with the watch, which clears a child's entry when
/// the child leaves the cache (it ended), so its parent reads the end from the API at once.
pub type Expectations = Arc<Mutex<HashMap<String, Instant>>>;

impl Children {
    pub fn new(
        client: Client,
        runs: Store<WorkflowRun>,
        workflows: Store<Workflow>,
        expectations: Expectations,
    ) -> Self {
        Self { client, runs, workflows, expectations }
    }

    fn api(&self, ns: &str) -> Api<WorkflowRun> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Creates the child run of an attempt (or finds it created).
    pub async fn start(&self, run: &RunInfo, task: &TaskStart) -> Result<Started, kube::Error> {
        let refused = |message: String| Started::refused(task, message);
        let Work::Workflow { workflow, params } = &task.work else {
            return Ok(refused(format!("step {}: not a workflow step", task.key)));
        };
        let ns = &run.namespace;
        let exists = self.workflows.get(&ObjectRef::new(workflow).within(ns)).is_some()
            || Api::<Workflow>::namespaced(self.client.clone(), ns).get_opt(workflow).await?.is_some();
        if !exists {
            return Ok(refused(format!(
                "workflow.ref: Workflow {workflow:?} not found in namespace {ns:?} (chain: {})",
                run.chain.iter().chain([workflow]).map(String::as_str).collect::<Vec<_>>().join(" -> ")
            )));
        }
        let name = naming::child_run_name(&run.name, &task.key, task.attempt);
        let mut child = WorkflowRun::new(
            &name,
            WorkflowRunSpec {
                workflow_ref: Some(WorkflowRef { name: workflow.clone() }),
                params: params.clone(),
                // Its calls wait in rate-limit queues at its parent's priority.
                priority: run.meta.priority,
                ..Default::default()
            },
        );
        child.metadata.namespace = Some(ns.clone());
        child.metadata.labels = Some(
            [
                (naming::LABEL_MANAGED_BY.to_string(), naming::MANAGED_BY.to_string()),
                (naming::LABEL_PARENT_RUN.to_string(), naming::label_value(&run.name)),
                (naming::LABEL_STEP.to_string(), naming::label_value(&task.step_id)),
            ]
            .into(),
        );
        // A child shares its parent's shard: the replica that waits for it reconciles it.
        if let Some(slot) = &run.shard {
            child.labels_mut().insert(naming::LABEL_SHARD.to_string(), slot.clone());
        }
        child.metadata.annotations = Some(
            [
                (naming::ANNOTATION_STEP_KEY.to_string(), task.key.clone()),
                (naming::ANNOTATION_CHAIN.to_string(), run.chain.join("/")),
                (naming::ANNOTATION_TRACEPARENT.to_string(), telemetry::child_traceparent(run, &task.key)),
            ]
            .into(),
        );
        child.metadata.owner_references = Some(vec![super::pods::run_owner(run)]);
        let object = format!("WorkflowRun.{}.{}/{name}", crate::api::VERSION, crate::api::GROUP);
        match self.api(ns).create(&PostParams::default(), &child).await {
            Ok(_) => {
                lock(&self.expectations).insert(name, Instant::now());
                Ok(Started::RunningAs { object })
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Started::RunningAs { object }),
            Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => {
                Ok(refused(format!("cannot create child run {name}: {}", e.message)))
            }
            Err(e) => Err(e),
        }
    }

    /// Ends of the child runs of running `workflow` steps.
    pub async fn observe(
        &self,
        run: &RunInfo,
        spec: &WorkflowSpec,
        dag: &Dag,
        status: &WorkflowRunStatus,
    ) -> Result<Vec<Event>, kube::Error> {
        let mut events = Vec::new();
        for (key, row) in super::pods::running(spec, dag, status, StepKind::Workflow) {
            let name = naming::child_run_name(&run.name, key, row.attempts);
            let child = match self.runs.get(&ObjectRef::new(&name).within(&run.namespace)) {
                Some(c) if !c.status.as_ref().is_some_and(|s| s.phase.is_finished()) => {
                    lock(&self.expectations).remove(&name);
                    continue;
                }
                Some(c) => Some((*c).clone()),
                None => {
                    if lock(&self.expectations).get(&name).is_some_and(|t| t.elapsed() < EXPECTATION) {
                        continue;
                    }
                    // Finished children leave the cache (they are labelled finished).
                    self.api(&run.namespace).get_opt(&name).await?
                }
            };
            let (key, attempt) = (key.clone(), row.attempts);
            let Some(child) = child else {
                events.push(Event::Failed {
                    key,
                    attempt,
                    message: format!("child run {name} was deleted"),
                    retryable: true,
                    info: Default::default(),
                });
                continue;
            };
            // Only this run's child counts (not one of a deleted run of the same name).
            if !child.owner_references().iter().any(|o| o.uid == run.uid) {
                continue;
            }
            let Some(s) = child.status.as_ref().filter(|s| s.phase.is_finished()) else { continue };
            lock(&self.expectations).remove(&name);
            events.push(match s.phase {
                RunPhase::Succeeded => Event::Succeeded {
                    key,
                    attempt,
                    output: s.output.clone().unwrap_or_default(),
                    info: Default::default(),
                },
                phase => Event::Failed {
                    key,
                    attempt,
                    message: format!("child run {name} {}: {}", phase.as_str().to_lowercase(), s.message),
                    retryable: true,
                    info: Default::default(),
                },
            });
        }
        Ok(events)
    }

    /// Cancels the child run of an attempt (the parent was cancelled, or the step timed out).
    pub async fn cancel(&self, run: &RunInfo, key: &str, attempt: u32) -> Result<(), kube::Error> {
        let name = naming::child_run_name(&run.name, key, attempt);
        let patch = serde_json::json!({"spec": {"cancel": true}});
        match self.api(&run.namespace).patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Gives the running children of `parent` its `spec.suspend`.
    pub async fn sync_suspend(&self, parent: &WorkflowRun, status: &WorkflowRunStatus) -> Result<(), kube::Error> {
        let ns = parent.namespace().unwrap_or_default();
        for (key, row) in &status.steps {
            if row.phase != StepPhase::Running || !row.object.as_deref().is_some_and(|o| o.starts_with("WorkflowRun."))
            {
                continue;
            }
            let name = naming::child_run_name(&parent.name_any(), key, row.attempts);
            let Some(child) = self.runs.get(&ObjectRef::new(&name).within(&ns)) else { continue };
            if child.spec.suspend == parent.spec.suspend || child.status.as_ref().is_some_and(|s| s.phase.is_finished())
            {
                continue;
            }
            let patch = serde_json::json!({"spec": {"suspend": parent.spec.suspend}});
            match self.api(&ns).patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
