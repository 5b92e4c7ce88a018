//! The scheduler: a pure function from (the run's workflow snapshot, its status, what just
//! happened, the time) to actions. It never does I/O; the controller and local mode carry the
//! actions out and feed results back as [`Event`]s.
//!
//! Status rows are keyed by step id, and by `id[index]` for the children of a `forEach`.
//! Template steps complete inside [`advance`] (rendering is the whole of their work), so a
//! chain of them finishes in one pass and one status write.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

use crate::api::{RetryPolicy, RunPhase, Step, StepPhase, StepStatus, WorkflowRunStatus};

use super::dag::step_at;
use super::template::{self, Context, StepView};

mod events;
mod loops;
mod render;
mod steps;
mod types;
mod waiting;

pub use types::{
    Action, DEFAULT_MAX_TURNS, Decision, Event, Input, LlmWork, MAX_NESTING, NO_DECISIONS, Phase, RunInfo, RunMeta,
    Scope, Settings, TaskInfo, TaskStart, Transition, Work, backoff_delay, decision_for,
};

pub use crate::naming::child_key;

struct Pass<'a, 's> {
    input: Input<'a>,
    status: &'s mut WorkflowRunStatus,
    decision: Decision,
    /// The first DAG step (by index) that failed for good, kept up to date by `transition`
    /// so that fail-fast does not scan every step for every pending step.
    hard_failure: Option<usize>,
    /// Results of attempts inside loops, by loop id, for the loop's iteration pass.
    loop_events: BTreeMap<String, Vec<Event>>,
}

/// Advances a run: applies `events`, then starts, retries, times out, skips and finishes
/// steps and the run, all recorded in `status`. Calling it again with no new events and the
/// same time changes nothing.
pub fn advance(input: Input<'_>, status: &mut WorkflowRunStatus, events: Vec<Event>) -> Decision {
    let mut pass =
        Pass { input, status, decision: Decision::default(), hard_failure: None, loop_events: BTreeMap::new() };
    pass.hard_failure = input.dag.dag_steps().find(|&i| pass.hard_failed(i));
    pass.run();
    for e in events {
        pass.apply(e);
    }
    pass.schedule();
    pass.decision
}

impl Pass<'_, '_> {
    fn now(&self) -> Timestamp {
        self.input.now
    }

    fn run(&mut self) {
        if self.status.phase.is_finished() {
            return;
        }
        if self.status.started_at.is_none() {
            self.status.started_at = Some(Time(self.now()));
        }
    }

    fn set_run_phase(&mut self, phase: RunPhase, message: String) {
        if self.status.phase != phase || self.status.message != message {
            if self.status.phase != phase {
                self.decision.transitions.push(Transition {
                    key: None,
                    phase: Phase::Run(phase),
                    attempt: 0,
                    message: message.clone(),
                });
            }
            self.status.phase = phase;
            self.status.message = message;
        }
    }

    fn row(&mut self, key: &str) -> &mut StepStatus {
        self.status.steps.entry(key.to_string()).or_default()
    }

    fn transition(&mut self, key: &str, phase: StepPhase, message: impl Into<String>) {
        let now = self.now();
        let row = self.row(key);
        let message = message.into();
        row.phase = phase;
        row.message = message.clone();
        if phase.is_finished() {
            row.finished_at = Some(MicroTime(now));
            row.retry_at = None;
        }
        let attempt = row.attempts;
        self.decision.transitions.push(Transition {
            key: Some(key.to_string()),
            phase: Phase::Step(phase),
            attempt,
            message,
        });
        if phase == StepPhase::Failed
            && let Some(i) = self.input.dag.index_of(key)
            && !self.input.dag.is_finally(i)
            && !step_at(self.input.spec, i).continue_on_error
        {
            self.hard_failure = Some(self.hard_failure.map_or(i, |f| f.min(i)));
        }
    }

    fn requeue(&mut self, after: Duration) {
        let r = &mut self.decision.requeue_after;
        *r = Some(r.map_or(after, |cur| cur.min(after)));
    }

    fn retry_policy(&self, step: &Step) -> RetryPolicy {
        step.retry
            .clone()
            .or_else(|| self.input.spec.defaults.as_ref().and_then(|d| d.retry.clone()))
            .unwrap_or_else(|| self.input.settings.default_retry.clone())
    }

    fn timeout(&self, step: &Step) -> Option<Duration> {
        step.timeout_seconds
            .or_else(|| self.input.spec.defaults.as_ref().and_then(|d| d.timeout_seconds))
            .map(|s| Duration::from_secs(u64::from(s)))
    }

    fn step_of_key(&self, key: &str) -> Option<&'_ Step> {
        let id = crate::naming::step_id_of(key);
        self.input.dag.index_of(id).map(|i| step_at(self.input.spec, i))
    }

    // ---- scheduling ----

    fn schedule(&mut self) {
        if self.status.phase.is_finished() {
            return;
        }
        let dag = self.input.dag;
        let now = self.now();
        let stopping = self.stop_reason();

        // Cancellation or timeout: abort what runs, settle what waits.
        if let Some((_, reason)) = &stopping {
            for i in dag.dag_steps() {
                self.stop_step(i, reason);
            }
        }

        let dag_done = dag.dag_steps().all(|i| self.phase_of(i).is_finished());
        if !dag_done {
            let was_failing = self.hard_failure.is_some();
            self.schedule_dag_steps();
            // A step that failed in that loop (a timeout, a fan-out settling) may come after
            // pending steps already looked at: go round once more so they are skipped now.
            if !was_failing && self.hard_failure.is_some() {
                self.schedule_dag_steps();
            }
        }
        let dag_done = dag.dag_steps().all(|i| self.phase_of(i).is_finished());
        if dag_done {
            let outcome = self.dag_outcome(&stopping);
            for &i in dag.topo_order() {
                if dag.is_finally(i) {
                    self.schedule_step(i, Some(outcome.0));
                }
            }
            let all_done = dag.finally_steps().all(|i| self.phase_of(i).is_finished());
            if all_done {
                let (mut phase, mut message) = outcome;
                if phase == RunPhase::Succeeded
                    && let Some(failed) = dag.finally_steps().find(|&i| self.hard_failed(i))
                {
                    phase = RunPhase::Failed;
                    message = format!("finally step {:?} failed", dag.id(failed));
                }
                if phase == RunPhase::Succeeded
                    && self.input.scope.is_none()
                    && let Some(output) = &self.input.spec.output
                {
                    match template::render(output, &self.run_context(phase)) {
                        Ok(text) => self.status.output = Some(text),
                        Err(e) => {
                            phase = RunPhase::Failed;
                            message = format!("output: {e}");
                        }
                    }
                }
                self.status.finished_at = Some(Time(now));
                self.set_run_phase(phase, message);
            } else {
                self.set_phase_running();
            }
        } else {
            self.set_phase_running();
        }
        if let Some(deadline) = self.input.deadline
            && !self.status.phase.is_finished()
            && stopping.is_none()
        {
            self.requeue(duration_until(now, deadline));
        }
        self.update_progress();
    }

    fn schedule_dag_steps(&mut self) {
        let dag = self.input.dag;
        for &i in dag.topo_order() {
            if !dag.is_finally(i) {
                self.schedule_step(i, None);
            }
        }
    }

    fn set_phase_running(&mut self) {
        let dag = self.input.dag;
        let any_running = (0..dag.len()).any(|i| self.phase_of(i) == StepPhase::Running);
        if self.input.suspend && !self.input.cancel {
            let msg = if any_running { "suspended: running steps finish, no new steps start" } else { "suspended" };
            self.set_run_phase(RunPhase::Suspended, msg.into());
        } else {
            let msg = match self.stop_reason() {
                Some((_, reason)) => format!("{reason}; running finally steps"),
                None if self.input.scope.is_none() => self.waiting_message(),
                None => String::new(),
            };
            self.set_run_phase(RunPhase::Running, msg);
        }
    }

    /// What the run waits for, when a step waits for a decision: the run's message, shown by
    /// `kubectl get wfr -o wide`.
    fn waiting_message(&self) -> String {
        let waiting: Vec<&str> = self
            .status
            .steps
            .iter()
            .filter(|(_, r)| r.phase == StepPhase::Waiting)
            .filter_map(|(k, r)| match &r.decision_key {
                Some(dk) => Some(dk.as_str()),
                None => self
                    .input
                    .dag
                    .step_of_key(self.input.spec, k)
                    .is_some_and(|s| s.approval.is_some())
                    .then_some(k.as_str()),
            })
            .collect();
        if waiting.is_empty() { String::new() } else { format!("waiting for approval: {}", waiting.join(", ")) }
    }

    /// What the workflow's `output` sees: every step of the run.
    fn run_context(&self, phase: RunPhase) -> Context {
        let mut ctx = Context { params: self.input.params.clone(), ..Default::default() };
        for i in 0..self.input.dag.len() {
            let id = self.input.dag.id(i);
            if let Some(row) = self.status.steps.get(id) {
                ctx.steps.insert(id.to_string(), view(row));
            }
        }
        self.set_run_vars(&mut ctx, phase);
        ctx
    }

    /// `run.*` in templates: the run's name, namespace, uid and `phase`.
    fn set_run_vars(&self, ctx: &mut Context, phase: RunPhase) {
        let run = self.input.run;
        ctx.run.insert("name".into(), run.name.clone());
        ctx.run.insert("namespace".into(), run.namespace.clone());
        ctx.run.insert("uid".into(), run.uid.clone());
        ctx.run.insert("phase".into(), phase.as_str().into());
    }

    fn update_progress(&mut self) {
        let dag = self.input.dag;
        let done = (0..dag.len()).filter(|&i| self.phase_of(i).is_finished()).count();
        self.status.progress = format!("{done}/{}", dag.len());
    }

    /// Why the DAG is being stopped, if it is: (outcome phase, reason).
    fn stop_reason(&self) -> Option<(RunPhase, String)> {
        if self.input.cancel {
            return Some((RunPhase::Cancelled, "cancelled".into()));
        }
        if let Some(deadline) = self.input.deadline
            && self.now() >= deadline
        {
            return Some((RunPhase::Failed, "run timed out".into()));
        }
        None
    }

    fn dag_outcome(&self, stopping: &Option<(RunPhase, String)>) -> (RunPhase, String) {
        if let Some((phase, reason)) = stopping {
            return (*phase, reason.clone());
        }
        let dag = self.input.dag;
        if let Some(i) = self.hard_failure {
            let msg = self.status.steps.get(dag.id(i)).map(|r| r.message.clone()).unwrap_or_default();
            return (RunPhase::Failed, format!("step {:?} failed: {msg}", dag.id(i)));
        }
        if let Some(i) = dag.dag_steps().find(|&i| self.phase_of(i) == StepPhase::Cancelled) {
            return (RunPhase::Failed, format!("step {:?} was cancelled", dag.id(i)));
        }
        (RunPhase::Succeeded, String::new())
    }

    fn phase_of(&self, i: usize) -> StepPhase {
        self.status.steps.get(self.input.dag.id(i)).map(|r| r.phase).unwrap_or_default()
    }

    fn hard_failed(&self, i: usize) -> bool {
        self.phase_of(i) == StepPhase::Failed && !step_at(self.input.spec, i).continue_on_error
    }

    /// Whether a dependency lets its dependents run.
    fn dep_ok(&self, i: usize) -> bool {
        match self.phase_of(i) {
            StepPhase::Succeeded | StepPhase::Skipped => true,
            StepPhase::Failed => step_at(self.input.spec, i).continue_on_error,
            _ => false,
        }
    }

    fn stop_step(&mut self, i: usize, reason: &str) {
        let id = self.input.dag.id(i).to_string();
        self.stop_children(&id, reason);
        match self.status.steps.get(&id) {
            None => self.transition(&id, StepPhase::Cancelled, format!("not started: {reason}")),
            Some(row) if row.phase == StepPhase::Running && row.items.is_some() => {
                self.transition(&id, StepPhase::Cancelled, reason.to_string())
            }
            Some(row) if row.phase == StepPhase::Running && step_at(self.input.spec, i).loop_.is_some() => {
                let step = step_at(self.input.spec, i).clone();
                self.drive_loop(i, &step, Some(reason));
            }
            Some(_) => self.stop_task(&id, &id, reason),
        }
    }

    /// Stops the unfinished children of a forEach step.
    fn stop_children(&mut self, id: &str, reason: &str) {
        let n = self.status.steps.get(id).and_then(|r| r.items).unwrap_or(0) as usize;
        for c in 0..n {
            self.stop_task(&child_key(id, c), id, reason);
        }
    }

    /// Cancels a task: aborts its attempt if it runs, settles it if it waits.
    fn stop_task(&mut self, key: &str, step_id: &str, reason: &str) {
        let Some(row) = self.status.steps.get(key) else { return };
        match row.phase {
            StepPhase::Running => {
                let attempt = row.attempts;
                self.decision.actions.push(Action::Abort {
                    key: key.to_string(),
                    attempt,
                    step_id: step_id.to_string(),
                    reason: reason.into(),
                });
                self.transition(key, StepPhase::Cancelled, reason.to_string());
            }
            StepPhase::Pending | StepPhase::Retrying => {
                self.transition(key, StepPhase::Cancelled, format!("not started: {reason}"))
            }
            StepPhase::Waiting => self.transition(key, StepPhase::Cancelled, reason.to_string()),
            _ => {}
        }
    }

    /// Fails a fan-out that cannot go on, stopping its unfinished children first so that
    /// none is left running.
    fn fail_fan_out(&mut self, id: &str, message: String) {
        self.stop_children(id, &format!("step {id:?} failed"));
        self.transition(id, StepPhase::Failed, message);
    }
}

/// What templates see of a status row.
fn view(row: &StepStatus) -> StepView {
    StepView { phase: row.phase.as_str().into(), output: row.output.clone(), iterations: row.iterations }
}

fn duration_until(now: Timestamp, then: Timestamp) -> Duration {
    let d = then.as_millisecond() - now.as_millisecond();
    Duration::from_millis(d.max(0) as u64)
}
