//! `workflow` steps in local mode: the child run runs in this process, from the Workflows in
//! the files given, with the parent's executors and cache. Its end is the step's; its
//! `status.output` is the step's output. Aborting the step (cancel, timeout) drops the child's
//! loop, which stops its tasks.

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::api::{RunPhase, WorkflowRunStatus};
use crate::engine::{self, RunInfo, TaskStart, Transition, Work};
use crate::executors::{ChildRunner, Failure, Outcome, Output};
use crate::naming;

use super::runner::{self, Executors, Observer, Plan};

/// Runs child runs of a local run.
pub struct LocalChildren {
    /// The parent's plan: its Workflows, Agents, timeout.
    pub plan: Plan,
    pub exec: Executors,
}

/// Child runs are not drawn; their end is their step's.
struct Unseen;

impl Observer for Unseen {
    fn update(&mut self, _: &[Transition], _: &WorkflowRunStatus) {}
}

impl LocalChildren {
    fn child_plan(&self, parent: &RunInfo, task: &TaskStart) -> Result<Plan, Failure> {
        let Work::Workflow { workflow, params } = &task.work else {
            return Err(Failure::permanent(format!("step {}: not a workflow step", task.key)));
        };
        let mut chain = parent.chain.clone();
        chain.push(workflow.clone());
        let Some(spec) = self.plan.workflows.get(workflow) else {
            let known: Vec<&str> = self.plan.workflows.keys().map(String::as_str).collect();
            return Err(Failure::permanent(format!(
                "workflow.ref: Workflow {workflow:?} is not in the files (they have: {}; chain: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
                chain.join(" -> ")
            )));
        };
        let dag = engine::validate(spec)
            .map_err(|e| Failure::permanent(format!("workflow.ref: Workflow {workflow:?} is invalid: {e}")))?;
        let params = engine::params::resolve(spec, params)
            .map_err(|e| Failure::permanent(format!("workflow.params (Workflow {workflow:?}): {e}")))?;
        Ok(Plan {
            spec: spec.clone(),
            dag,
            workflow_name: workflow.clone(),
            params,
            run: RunInfo {
                name: naming::child_run_name(&parent.name, &task.key, task.attempt),
                namespace: parent.namespace.clone(),
                uid: format!("{}/{}#{}", parent.uid, task.key, task.attempt),
                chain,
                traceparent: Some(crate::telemetry::child_traceparent(parent, &task.key)),
                shard: None,
                // As in the cluster: the child runs at its parent's priority, under Budgets
                // that select its Workflow.
                meta: crate::engine::RunMeta {
                    workflow: Some(workflow.clone()),
                    priority: parent.meta.priority,
                    ..Default::default()
                },
            },
            timeout: self.plan.timeout,
            agents: self.plan.agents.clone(),
            budgets: self.plan.budgets.clone(),
            decisions: Default::default(),
            workflows: self.plan.workflows.clone(),
        })
    }
}

impl ChildRunner for LocalChildren {
    fn run<'a>(&'a self, parent: &'a RunInfo, task: &'a TaskStart) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let plan = self.child_plan(parent, task)?;
            // Its approvals are asked as `<child run>/<key>`.
            let mut exec = self.exec.clone();
            if let Some(ask) = exec.ask.take() {
                let name = plan.run.name.clone();
                exec.ask = Some(std::sync::Arc::new(move |key, message| ask(format!("{name}/{key}"), message)));
            }
            let (status, _) = runner::run(&plan, &exec, &mut Unseen, CancellationToken::new()).await;
            match status.phase {
                RunPhase::Succeeded => {
                    Ok(Output { text: status.output.clone().unwrap_or_default(), info: Default::default() })
                }
                phase => Err(Failure::retryable(format!(
                    "child run {} {}: {}",
                    plan.run.name,
                    phase.as_str().to_lowercase(),
                    status.message
                ))),
            }
        })
    }
}
