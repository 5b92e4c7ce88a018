//! The local run loop: a wait loop around the run pass ([`crate::pass`]) that the
//! WorkflowRun controller also uses. Attempts run on a [`TaskPool`] (container steps as local
//! processes); each pass is followed by a wait for a result, a retry or timeout due, or
//! Ctrl-C. State lives in memory, in the same `WorkflowRunStatus` the cluster writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value as Json;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::api::{Agent, StepDecision, StepPhase, WorkflowRunStatus, WorkflowSpec};
use crate::cache::StepCache;
use crate::engine::{self, Dag, RunInfo, Settings, Transition};
use crate::executors::http::HttpExecutor;
use crate::executors::pool::TaskPool;
use crate::executors::{AgentCaller, InProcessRunner};
use crate::pass::{self, Pass, PendingCache};

use super::process::{self, ProcessContext};

/// Everything about the run to make, checked and resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: WorkflowSpec,
    pub dag: Dag,
    /// Name of the Workflow (empty for an inline spec).
    pub workflow_name: String,
    /// Parameters after defaults.
    pub params: BTreeMap<String, Json>,
    pub run: RunInfo,
    /// Timeout of the whole run.
    pub timeout: Duration,
    /// The Agents of the run (for the cache keys of agent steps).
    pub agents: Vec<Agent>,
    /// The Budgets in the files, in the run's namespace: its agent calls count against them.
    pub budgets: Vec<crate::api::Budget>,
    /// Decisions given on the command line (`--approve STEP`, `--reject STEP`).
    pub decisions: BTreeMap<String, crate::api::StepDecision>,
    /// The Workflows in the files, by name: what `workflow` steps run.
    pub workflows: Arc<BTreeMap<String, WorkflowSpec>>,
}

/// How steps run.
#[derive(Clone)]
pub struct Executors {
    pub http: HttpExecutor,
    pub agents: Option<Arc<dyn AgentCaller>>,
    /// Why agent steps fail when `agents` is `None`.
    pub agents_unavailable: String,
    pub cache: Arc<dyn StepCache>,
    /// Where container steps' termination-log files are made.
    pub scratch: PathBuf,
    /// Most steps running at once (0: only the workflow's own limits, `maxParallel`).
    pub parallelism: usize,
    pub settings: Settings,
    /// Asks a person for the decision on a waiting approval (key, message): the terminal, when
    /// there is one. `None`: approvals wait for `--approve`/`--reject` or their timeout.
    pub ask: Option<Ask>,
}

/// Asks for a decision on approval `key` (its message given); `None` when none comes.
pub type Ask = Arc<dyn Fn(String, String) -> BoxFuture<'static, Option<StepDecision>> + Send + Sync>;

/// What the live view is told.
pub trait Observer: Send {
    /// After each pass that changed something.
    fn update(&mut self, transitions: &[Transition], status: &WorkflowRunStatus);
    /// Cancellation was asked for (Ctrl-C).
    fn cancelling(&mut self) {}
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_stores: u64,
    pub passes: u64,
}

/// Longest wait between passes when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(300);

/// Runs a plan to its end; `cancel` cancels the run as `spec.cancel` does (running steps are
/// stopped, `finally` steps still run).
pub async fn run(
    plan: &Plan,
    exec: &Executors,
    observer: &mut dyn Observer,
    cancel: CancellationToken,
) -> (WorkflowRunStatus, Stats) {
    let processes =
        ProcessContext { run: plan.run.name.clone(), namespace: plan.run.namespace.clone(), dir: exec.scratch.clone() };
    let runner = match &exec.agents {
        Some(agents) => InProcessRunner::new(exec.http.clone(), Some(agents.clone())),
        None => InProcessRunner::without_agents(exec.http.clone(), exec.agents_unavailable.clone()),
    }
    .with_containers(Arc::new(processes))
    .with_children(Arc::new(super::child::LocalChildren { plan: plan.clone(), exec: exec.clone() }));
    let woken = Arc::new(Notify::new());
    let wake = woken.clone();
    let pool = TaskPool::new(exec.parallelism, Arc::new(runner), Arc::new(move |_: &str, _: &str| wake.notify_one()));
    let agents: Vec<Arc<Agent>> = plan.agents.iter().cloned().map(Arc::new).collect();
    let agents = move || agents.clone();
    let pending = PendingCache::default();
    // A run dropped before its end (the child run of a step that was aborted) stops its tasks.
    let _stop = ForgetOnDrop(&pool, plan.run.uid.clone());
    let pass = Pass { runtime: &pool, cache: &*exec.cache, pending: &pending, agents: &agents };
    let mut status = WorkflowRunStatus {
        workflow_name: plan.workflow_name.clone(),
        workflow_spec_hash: pass::hash_spec(&plan.spec),
        workflow: Some(plan.spec.clone()),
        params: plan.params.clone(),
        ..Default::default()
    };
    let (started, mut cancelled, mut stats) = (Timestamp::now(), false, Stats::default());
    let mut decisions = plan.decisions.clone();
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<(String, Option<StepDecision>)>();
    let mut asked: BTreeSet<String> = BTreeSet::new();
    loop {
        let input = engine::Input {
            spec: &plan.spec,
            dag: &plan.dag,
            run: &plan.run,
            params: &plan.params,
            now: Timestamp::now(),
            suspend: false,
            cancel: cancelled,
            deadline: started.checked_add(plan.timeout).ok(),
            settings: &exec.settings,
            decisions: &decisions,
            scope: None,
        };
        let outcome = match pass.run(input, &mut status).await {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        };
        stats.passes += 1;
        stats.cache_hits += outcome.cache.hits;
        stats.cache_misses += outcome.cache.misses;
        stats.cache_stores += outcome.cache.stores;
        if !outcome.transitions.is_empty() {
            observer.update(&outcome.transitions, &status);
            crate::telemetry::record(&plan.run, |key| plan.dag.kind_of(&plan.spec, key), &outcome.transitions, &status);
        }
        let wait = outcome.requeue_after.unwrap_or(IDLE_WAIT).max(Duration::from_millis(5));
        outcome.recorded();
        if status.phase.is_finished() {
            break;
        }
        if let Some(ask) = &exec.ask {
            for (key, message) in waiting_approvals(plan, &status, &decisions) {
                if asked.insert(key.clone()) {
                    let (ask, tx) = (ask.clone(), answers_tx.clone());
                    tokio::spawn(async move {
                        let answer = ask(key.clone(), message).await;
                        let _ = tx.send((key, answer));
                    });
                }
            }
        }
        tokio::select! {
            _ = woken.notified() => {}
            Some((key, answer)) = answers.recv() => {
                if let Some(d) = answer {
                    decisions.insert(key, d);
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                observer.cancelling();
            }
        }
    }
    finish_status(plan, &mut status);
    (status, stats)
}

/// Approvals waiting for a decision nobody gave yet: (status key, message).
fn waiting_approvals(
    plan: &Plan,
    status: &WorkflowRunStatus,
    decisions: &BTreeMap<String, StepDecision>,
) -> Vec<(String, String)> {
    status
        .steps
        .iter()
        .filter(|(_, row)| row.phase == StepPhase::Waiting)
        .filter_map(|(key, row)| match &row.decision_key {
            // A tool call waiting for approval.
            Some(dk) => Some(dk.clone()),
            None => plan.dag.step_of_key(&plan.spec, key).is_some_and(|s| s.approval.is_some()).then(|| key.clone()),
        })
        .filter(|key| !decisions.contains_key(key))
        .map(|key| {
            let message = status.steps.iter().find(|(k, r)| *k == &key || r.decision_key.as_ref() == Some(&key));
            (key, message.map(|(_, r)| r.message.clone()).unwrap_or_default())
        })
        .collect()
}

/// Aborts a run's tasks when its loop ends, however it ends.
struct ForgetOnDrop<'a>(&'a TaskPool, String);

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.forget_run(&self.1);
    }
}

/// Conditions as the controller writes them, and the note on container steps that ran as
/// local processes.
fn finish_status(plan: &Plan, status: &mut WorkflowRunStatus) {
    let now = Timestamp::now();
    status.finished_at.get_or_insert(Time(now));
    pass::set_conditions(status, None, now);
    status.usage = engine::usage::totals(&status.steps);
    for (key, row) in status.steps.iter_mut() {
        let Some(i) = plan.dag.index_of(crate::naming::step_id_of(key)) else { continue };
        if let Some(c) = &engine::dag::step_at(&plan.spec, i).container
            && row.phase == StepPhase::Succeeded
            && row.message.is_empty()
            && row.items.is_none()
        {
            row.message = process::image_note(&c.image);
        }
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
