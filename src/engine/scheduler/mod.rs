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
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use serde_json::Value as Json;

use crate::api::{
    Backoff, CacheSpec, CapabilitySelector, ChatRole, DecisionKind, HttpMethod, OnMax, OnTimeout, RetryPolicy,
    RunPhase, Step, StepDecision, StepKind, StepPhase, StepStatus, Strategy, TokenUsage, WorkflowRunStatus,
    WorkflowSpec,
};
use crate::naming;

use super::dag::{Dag, step_at};
use super::template::{self, Context, StepView, TemplateError};

/// Where a pass runs when it is not the run's own: one iteration of a loop. The engine runs
/// each iteration as a small run of the loop's steps, whose status keys carry `prefix`.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// What the loop's steps see of the workflow's steps (those upstream of the loop).
    pub steps: BTreeMap<String, StepView>,
    /// `loop` in templates: `{iteration, previous}`.
    pub loop_vars: Json,
    /// Prefix of the iteration's status keys (`review.2.`).
    pub prefix: String,
}

/// No decisions (runs that have none).
pub static NO_DECISIONS: BTreeMap<String, StepDecision> = BTreeMap::new();

/// The decision recorded for a decision key, if any. Approval steps wait on their status key;
/// other waiting work may wait on keys of its own (such as `<stepKey>/<tool>`).
pub fn decision_for<'a>(decisions: &'a BTreeMap<String, StepDecision>, key: &str) -> Option<&'a StepDecision> {
    decisions.get(key)
}

/// Identity of the run, readable by templates as `run.*`.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// The Workflows of the runs this one descends from, root first, then this run's own
    /// (child runs of `workflow` steps): how deep it nests, and whether a child would close a
    /// cycle. Empty for a run of an inline spec with no parent.
    pub chain: Vec<String>,
    /// The W3C traceparent the run's trace continues (its `volt.dev/traceparent` annotation;
    /// `TRACEPARENT` in local mode), if any.
    pub traceparent: Option<String>,
    /// The run's `volt.dev/shard` label (with `--shards`), copied to its pods and child runs.
    pub shard: Option<String>,
    /// What its agent calls need of the run: priority, Workflow, `spec.budget`, usage.
    pub meta: RunMeta,
}

/// What a run's agent calls need to know of it, read by the pass from the run it has in hand.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunMeta {
    /// The run's `workflowRef` (none for an inline Workflow): Budget selectors and metrics.
    pub workflow: Option<String>,
    /// `spec.priority`: its calls' place in rate-limit queues.
    pub priority: i32,
    pub budget: Option<crate::api::RunBudget>,
    /// The run's `status.usage` when read (tokens, cost): after a restart, what its budget has
    /// already spent.
    pub used: (u64, f64),
}

impl RunMeta {
    pub fn of(spec: &crate::api::WorkflowRunSpec, status: Option<&crate::api::WorkflowRunStatus>) -> Self {
        let usage = status.and_then(|s| s.usage).unwrap_or_default();
        RunMeta {
            workflow: spec.workflow_ref.as_ref().map(|w| w.name.clone()),
            priority: spec.priority,
            budget: spec.budget.clone(),
            used: (usage.input_tokens + usage.output_tokens, usage.cost),
        }
    }
}

/// Most runs in a chain of `workflow` steps (a run, its child, its grandchild...).
pub const MAX_NESTING: usize = 5;

impl RunInfo {
    /// Why a `workflow` step of this run may not start a run of `workflow`: a cycle of
    /// Workflows calling each other, or nesting deeper than [`MAX_NESTING`].
    pub fn refuse_child(&self, workflow: &str) -> Option<String> {
        let chain = || {
            let mut names: Vec<&str> = self.chain.iter().map(String::as_str).collect();
            names.push(workflow);
            names.join(" -> ")
        };
        if self.chain.iter().any(|w| w == workflow) {
            return Some(format!("Workflows call each other in a cycle: {}", chain()));
        }
        if self.chain.len() >= MAX_NESTING {
            return Some(format!("runs nest deeper than {MAX_NESTING}: {}", chain()));
        }
        None
    }
}

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Retry policy of steps that set none (and whose workflow sets no default).
    pub default_retry: RetryPolicy,
    /// Most items a `forEach` may fan out to.
    pub max_for_each_items: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self { default_retry: RetryPolicy { limit: 0, backoff: None }, max_for_each_items: 10_000 }
    }
}

/// Everything [`advance`] reads besides the status.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub spec: &'a WorkflowSpec,
    pub dag: &'a Dag,
    pub run: &'a RunInfo,
    pub params: &'a BTreeMap<String, Json>,
    pub now: Timestamp,
    pub suspend: bool,
    pub cancel: bool,
    /// When the whole run times out.
    pub deadline: Option<Timestamp>,
    pub settings: &'a Settings,
    /// The run's `spec.decisions`.
    pub decisions: &'a BTreeMap<String, StepDecision>,
    /// `None` for the run itself; set by the engine for the iterations of a loop.
    pub scope: Option<&'a Scope>,
}

/// Facts about a finished attempt, recorded in the step's row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskInfo {
    pub agent: Option<String>,
    pub replica: Option<String>,
    pub tokens: Option<TokenUsage>,
    pub cached: bool,
    /// The attempt's transcript (agent steps), JSON, redacted and bounded; stored apart from
    /// the status (`transcriptRef`).
    pub transcript: Option<std::sync::Arc<String>>,
    /// A failed attempt that stopped to wait for a person: what it waits for, the last part of
    /// its decision key (`<step key>/<tool>` for a tool call in `requireApproval`).
    pub waits_for: Option<Box<String>>,
    /// Which agent answered instead of the step's, and why (agent steps that fell back).
    pub fallback: Option<Box<String>>,
}

/// What just happened to a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The attempt finished with an output.
    Succeeded { key: String, attempt: u32, output: String, info: TaskInfo },
    /// The attempt failed; `retryable: false` fails the step at once.
    Failed { key: String, attempt: u32, message: String, retryable: bool, info: TaskInfo },
    /// The attempt's in-process work was lost (operator restart): run the attempt again.
    Lost { key: String, attempt: u32 },
}

/// Rendered work of a task: what an executor runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    Agent {
        agent: Option<String>,
        selector: Option<CapabilitySelector>,
        strategy: Option<Strategy>,
        prompt: String,
        llm: LlmWork,
    },
    Container {
        image: String,
        command: Vec<String>,
        args: Vec<String>,
        env: Vec<EnvVar>,
        resources: Option<ResourceRequirements>,
        working_dir: Option<String>,
        service_account_name: Option<String>,
        /// Pod settings copied from the step as they are (security context, volumes...).
        pod: Box<crate::api::PodSettings>,
    },
    Http {
        method: HttpMethod,
        url: String,
        headers: BTreeMap<String, String>,
        body: Option<String>,
        success_codes: Vec<u16>,
    },
    /// A child WorkflowRun of `workflow` with `params` (rendered).
    Workflow { workflow: String, params: BTreeMap<String, Json> },
    /// A Kubernetes object to create (rendered), and the conditions over it.
    Resource { manifest: Json, success_when: String, failure_when: Option<String>, output: Option<String> },
}

/// The rendered conversation, output schema and tools of an agent step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmWork {
    /// Rendered messages before the prompt (the prompt, when not empty, is the last user message).
    pub messages: Vec<(ChatRole, String)>,
    pub schema: Option<Json>,
    pub repair_attempts: u32,
    pub tools: Vec<String>,
    pub max_turns: u32,
    /// Decisions on the step's tool calls that need approval, by tool name (from the run's
    /// `spec.decisions` keys `<step key>/<tool>`).
    pub decisions: BTreeMap<String, StepDecision>,
}

/// Model <-> tool round trips of a step that does not say.
pub const DEFAULT_MAX_TURNS: u32 = 8;

impl Work {
    pub fn kind(&self) -> StepKind {
        match self {
            Work::Agent { .. } => StepKind::Agent,
            Work::Container { .. } => StepKind::Container,
            Work::Http { .. } => StepKind::Http,
            Work::Workflow { .. } => StepKind::Workflow,
            Work::Resource { .. } => StepKind::Resource,
        }
    }
}

/// A task to start.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskStart {
    /// Status key: the step id, or `id[index]` for a forEach child.
    pub key: String,
    pub step_id: String,
    pub index: Option<usize>,
    pub attempt: u32,
    pub work: Work,
    pub timeout: Option<Duration>,
    pub cache: Option<CacheSpec>,
}

#[cfg(test)]
impl TaskStart {
    /// Attempt `attempt` of an agent step `ask` (agent `a`, prompt `hi`), for tests of what
    /// starts tasks.
    pub(crate) fn agent_for_tests(attempt: u32) -> TaskStart {
        TaskStart {
            key: "ask".into(),
            step_id: "ask".into(),
            index: None,
            attempt,
            work: Work::Agent {
                agent: Some("a".into()),
                selector: None,
                strategy: None,
                prompt: "hi".into(),
                llm: Default::default(),
            },
            timeout: None,
            cache: None,
        }
    }
}

/// What the caller must do.
// Starts are the common action and there are few actions per pass: boxing would only churn
// the callers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start an attempt (create its pod, or spawn its in-process task). Idempotent by
    /// (key, attempt): starting it twice must not run it twice.
    Start(TaskStart),
    /// Stop an attempt (delete its pod, abort its in-process task).
    Abort { key: String, attempt: u32, step_id: String, reason: String },
}

/// The phase a [`Transition`] enters: the run's or a step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Run(RunPhase),
    Step(StepPhase),
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Run(p) => p.as_str(),
            Phase::Step(p) => p.as_str(),
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase change of a step or the run, for Kubernetes Events and the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Step key, or `None` for the run itself (then `phase` is a [`Phase::Run`]).
    pub key: Option<String>,
    pub phase: Phase,
    pub attempt: u32,
    pub message: String,
}

/// The result of one [`advance`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub transitions: Vec<Transition>,
    /// Call [`advance`] again after this long even if nothing happens (retries, timeouts).
    pub requeue_after: Option<Duration>,
}

pub use crate::naming::child_key;

/// Delay before retry number `retry` (1-based).
pub fn backoff_delay(backoff: Option<&Backoff>, retry: u32) -> Duration {
    let b = backoff.cloned().unwrap_or_default();
    let exp = retry.saturating_sub(1).min(64) as i32;
    let secs = (b.initial_seconds * b.factor.powi(exp)).min(b.max_seconds).max(0.0);
    if secs.is_finite() { Duration::from_secs_f64(secs) } else { Duration::from_secs_f64(b.max_seconds.max(0.0)) }
}

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

    // ---- events ----

    fn apply(&mut self, event: Event) {
        let (key, attempt) = match &event {
            Event::Succeeded { key, attempt, .. }
            | Event::Failed { key, attempt, .. }
            | Event::Lost { key, attempt } => (key.clone(), *attempt),
        };
        if let Some((loop_id, iteration, inner)) = naming::parse_loop_key(&key) {
            // The loop's current iteration takes it; results of earlier iterations are stale.
            let current = self.status.steps.get(loop_id).and_then(|r| r.iterations);
            if current == Some(iteration) {
                let inner = inner.to_string();
                let event = match event {
                    Event::Succeeded { output, info, .. } => Event::Succeeded { key: inner, attempt, output, info },
                    Event::Failed { message, retryable, info, .. } => {
                        Event::Failed { key: inner, attempt, message, retryable, info }
                    }
                    Event::Lost { .. } => Event::Lost { key: inner, attempt },
                };
                self.loop_events.entry(loop_id.to_string()).or_default().push(event);
            }
            return;
        }
        let Some(step) = self.step_of_key(&key).cloned() else { return };
        // The engine itself runs loops, approvals and waits: no runtime reports on them (a
        // runtime that sees a Running loop with nothing behind it must not make it lost).
        if step.loop_.is_some() || step.approval.is_some() || step.wait.is_some() {
            return;
        }
        let Some(row) = self.status.steps.get(&key) else { return };
        // Stale: another attempt, or already settled (an abort raced the result).
        if row.phase != StepPhase::Running || row.attempts != attempt {
            return;
        }
        match event {
            Event::Succeeded { output, info, .. } => {
                let row = self.row(&key);
                record_info(row, &info);
                row.output = Some(output);
                row.output_ref = None;
                let msg = if info.cached { "result from cache" } else { "" };
                self.transition(&key, StepPhase::Succeeded, msg);
            }
            Event::Failed { message, info, .. } if info.waits_for.is_some() => {
                record_info(self.row(&key), &info);
                let decision_key =
                    format!("{}/{}", self.decision_key(&key), info.waits_for.map(|w| *w).unwrap_or_default());
                self.row(&key).decision_key = Some(decision_key);
                self.transition(&key, StepPhase::Waiting, message);
                self.check_waiting(&key, &step);
            }
            Event::Failed { message, retryable, info, .. } => {
                record_info(self.row(&key), &info);
                self.fail_attempt(&key, &step, message, retryable);
            }
            Event::Lost { .. } => {
                let now = self.now();
                let row = self.row(&key);
                row.attempts = row.attempts.saturating_sub(1);
                row.phase = StepPhase::Retrying;
                row.retry_at = Some(MicroTime(now));
                row.message = "in-process work was interrupted; running the attempt again".into();
            }
        }
    }

    fn fail_attempt(&mut self, key: &str, step: &Step, message: String, retryable: bool) {
        let policy = self.retry_policy(step);
        let attempts = self.row(key).attempts;
        if retryable && attempts <= policy.limit {
            let delay = backoff_delay(policy.backoff.as_ref(), attempts);
            let at = self.now() + delay;
            let msg = format!("attempt {attempts} failed: {message}; retrying in {:.1}s", delay.as_secs_f64());
            self.row(key).retry_at = Some(MicroTime(at));
            self.transition(key, StepPhase::Retrying, msg);
            self.requeue(delay);
        } else {
            let msg = if attempts > 1 { format!("failed after {attempts} attempts: {message}") } else { message };
            self.transition(key, StepPhase::Failed, msg);
        }
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
        let run = self.input.run;
        ctx.run.insert("name".into(), run.name.clone());
        ctx.run.insert("namespace".into(), run.namespace.clone());
        ctx.run.insert("uid".into(), run.uid.clone());
        ctx.run.insert("phase".into(), phase.as_str().into());
        ctx
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

    /// What the templates of step `i` see. Only the steps they read are copied in (templates
    /// see no others anyway), so that a pass stays linear in the number of steps.
    fn context(&self, i: usize, finally_outcome: Option<RunPhase>, item: Option<(usize, Json)>) -> Context {
        let mut ctx = Context { params: self.input.params.clone(), item, ..Default::default() };
        if let Some(scope) = self.input.scope {
            ctx.steps = scope.steps.clone();
            ctx.loop_ = Some(scope.loop_vars.clone());
        }
        for &j in self.input.dag.reads(i) {
            let id = self.input.dag.id(j);
            if let Some(row) = self.status.steps.get(id) {
                ctx.steps.insert(id.to_string(), view(row));
            }
        }
        let run = self.input.run;
        ctx.run.insert("name".into(), run.name.clone());
        ctx.run.insert("namespace".into(), run.namespace.clone());
        ctx.run.insert("uid".into(), run.uid.clone());
        ctx.run.insert("phase".into(), finally_outcome.unwrap_or(RunPhase::Running).as_str().into());
        ctx
    }

    fn schedule_step(&mut self, i: usize, finally_outcome: Option<RunPhase>) {
        let dag = self.input.dag;
        let id = dag.id(i).to_string();
        let step = step_at(self.input.spec, i).clone();
        let phase = self.phase_of(i);
        let blocked =
            (self.input.suspend && !self.input.cancel) || (finally_outcome.is_none() && self.stop_reason().is_some());
        match phase {
            StepPhase::Pending => {
                if !dag.deps(i).iter().all(|&d| self.phase_of(d).is_finished()) {
                    return;
                }
                if let Some(&bad) = dag.deps(i).iter().find(|&&d| !self.dep_ok(d)) {
                    let msg =
                        format!("not run: dependency {:?} {}", dag.id(bad), self.phase_of(bad).as_str().to_lowercase());
                    self.transition(&id, StepPhase::Skipped, msg);
                    return;
                }
                if finally_outcome.is_none()
                    && let Some(f) = self.hard_failure
                {
                    let msg = format!("not run: the run is failing (step {:?} failed)", dag.id(f));
                    self.transition(&id, StepPhase::Skipped, msg);
                    return;
                }
                if blocked {
                    return;
                }
                let ctx = self.context(i, finally_outcome, None);
                if let Some(when) = &step.when {
                    match template::eval_condition(when, &ctx) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.transition(&id, StepPhase::Skipped, format!("when {when:?} was false"));
                            return;
                        }
                        Err(e) => {
                            self.transition(&id, StepPhase::Failed, format!("when: {e}"));
                            return;
                        }
                    }
                }
                if let Some(for_each) = &step.for_each {
                    match template::eval_list(for_each, &ctx, self.input.settings.max_for_each_items) {
                        Ok(items) => {
                            let now = self.now();
                            let n = items.len();
                            let row = self.row(&id);
                            row.items = Some(n as u32);
                            row.started_at = Some(MicroTime(now));
                            for c in 0..n {
                                self.status.steps.insert(child_key(&id, c), StepStatus::default());
                            }
                            self.transition(&id, StepPhase::Running, format!("fan-out over {n} items"));
                            self.schedule_children(i, &step, items, finally_outcome, false);
                        }
                        Err(e) => self.transition(&id, StepPhase::Failed, format!("forEach: {e}")),
                    }
                } else {
                    self.start(&id, &step, None, ctx, finally_outcome);
                }
            }
            StepPhase::Running if self.status.steps.get(&id).and_then(|r| r.items).is_some() => {
                // Even when blocked: running children still time out and the step settles.
                let ctx = self.context(i, finally_outcome, None);
                match step
                    .for_each
                    .as_deref()
                    .map(|f| template::eval_list(f, &ctx, self.input.settings.max_for_each_items))
                {
                    Some(Ok(items)) => self.schedule_children(i, &step, items, finally_outcome, blocked),
                    Some(Err(e)) => self.fail_fan_out(&id, format!("forEach: {e}")),
                    None => {}
                }
            }
            StepPhase::Running if step.loop_.is_some() => self.drive_loop(i, &step, None),
            StepPhase::Running => self.check_timeout(&id, &step),
            StepPhase::Waiting => self.check_waiting(&id, &step),
            StepPhase::Retrying if !blocked => {
                self.retry_if_due(&id, &step, None, finally_outcome);
            }
            _ => {}
        }
    }

    /// Times out, starts and retries the children of a fan-out (starting none when `blocked`),
    /// and settles the step when they have all finished.
    fn schedule_children(
        &mut self,
        i: usize,
        step: &Step,
        items: Vec<Json>,
        finally_outcome: Option<RunPhase>,
        blocked: bool,
    ) {
        let id = self.input.dag.id(i).to_string();
        let n = self.status.steps.get(&id).and_then(|r| r.items).unwrap_or(0) as usize;
        if items.len() != n {
            self.fail_fan_out(&id, format!("forEach list changed from {n} to {} items", items.len()));
            return;
        }
        let child_phase =
            |s: &Self, c: usize| s.status.steps.get(&child_key(&id, c)).map(|r| r.phase).unwrap_or_default();
        // Timeouts first, so that the slots they free are used in this same pass.
        for c in 0..n {
            match child_phase(self, c) {
                StepPhase::Running => self.check_timeout(&child_key(&id, c), step),
                // An item waiting for the decision on a tool call.
                StepPhase::Waiting => self.check_waiting(&child_key(&id, c), step),
                _ => {}
            }
        }
        let max_parallel = step.max_parallel.map_or(usize::MAX, |m| m as usize);
        let mut running = (0..n).filter(|&c| child_phase(self, c) == StepPhase::Running).count();
        for (c, item) in items.into_iter().enumerate() {
            let key = child_key(&id, c);
            match child_phase(self, c) {
                StepPhase::Pending if !blocked && running < max_parallel => {
                    let ctx = self.context(i, finally_outcome, Some((c, item)));
                    self.start(&key, step, Some(c), ctx, finally_outcome);
                    if self.status.steps.get(&key).is_some_and(|r| r.phase == StepPhase::Running) {
                        running += 1;
                    }
                }
                StepPhase::Retrying if !blocked && running < max_parallel => {
                    running += usize::from(self.retry_if_due(&key, step, Some((c, item)), finally_outcome));
                }
                _ => {}
            }
        }
        // All children settled: settle the parent.
        let rows: Vec<&StepStatus> = (0..n).filter_map(|c| self.status.steps.get(&child_key(&id, c))).collect();
        if rows.len() == n && rows.iter().all(|r| r.phase.is_finished()) {
            let failed: Vec<usize> = (0..n).filter(|&c| rows[c].phase == StepPhase::Failed).collect();
            let outputs: Vec<Json> =
                rows.iter().map(|r| r.output.clone().map(Json::String).unwrap_or(Json::Null)).collect();
            let cached = !rows.is_empty() && rows.iter().all(|r| r.cached);
            let output = serde_json::to_string(&outputs).unwrap_or_else(|_| "[]".into());
            let first_err = failed.first().map(|&c| rows[c].message.clone());
            let row = self.row(&id);
            row.output = Some(output);
            row.cached = cached;
            match first_err {
                None => self.transition(&id, StepPhase::Succeeded, ""),
                Some(msg) => {
                    let m = format!("{} of {n} items failed; {}: {msg}", failed.len(), child_key(&id, failed[0]));
                    self.transition(&id, StepPhase::Failed, m)
                }
            }
        }
    }

    /// Starts the next attempt when its backoff has passed; true when it started.
    fn retry_if_due(
        &mut self,
        key: &str,
        step: &Step,
        item: Option<(usize, Json)>,
        finally_outcome: Option<RunPhase>,
    ) -> bool {
        let due = self.status.steps.get(key).and_then(|r| r.retry_at.clone()).map(|t| t.0).unwrap_or(self.now());
        if due > self.now() {
            self.requeue(duration_until(self.now(), due));
            return false;
        }
        let index = item.as_ref().map(|(c, _)| *c);
        let Some(i) = self.input.dag.index_of(&step.id) else { return false };
        let ctx = self.context(i, finally_outcome, item);
        self.start(key, step, index, ctx, finally_outcome);
        self.status.steps.get(key).is_some_and(|r| r.phase == StepPhase::Running)
    }

    fn check_timeout(&mut self, key: &str, step: &Step) {
        let Some(timeout) = self.timeout(step) else { return };
        let Some(started) = self.status.steps.get(key).and_then(|r| r.started_at.clone()) else { return };
        let due = started.0 + timeout;
        if self.now() >= due {
            let attempt = self.status.steps.get(key).map(|r| r.attempts).unwrap_or(0);
            let reason = format!("timed out after {}s", timeout.as_secs());
            self.decision.actions.push(Action::Abort {
                key: key.into(),
                attempt,
                step_id: step.id.clone(),
                reason: reason.clone(),
            });
            self.fail_attempt(key, step, reason, true);
        } else {
            self.requeue(duration_until(self.now(), due));
        }
    }

    /// The key of a status row as `spec.decisions` names it (with the loop prefix).
    fn decision_key(&self, key: &str) -> String {
        match self.input.scope {
            Some(scope) => format!("{}{key}", scope.prefix),
            None => key.to_string(),
        }
    }

    /// Settles a waiting step whose decision came or whose time passed; otherwise asks to
    /// come back when its time comes (a decision wakes the run by changing it).
    fn check_waiting(&mut self, key: &str, step: &Step) {
        let now = self.now();
        // An agent step waiting for the decision on a tool call: the decision starts it over.
        if let Some(dk) = self.status.steps.get(key).and_then(|r| r.decision_key.clone()) {
            if let Some(d) = decision_for(self.input.decisions, &dk) {
                let verb = if d.decision == DecisionKind::Approve { "approved" } else { "rejected" };
                let by = d.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
                let row = self.row(key);
                row.decision_key = None;
                row.retry_at = Some(MicroTime(now));
                self.transition(key, StepPhase::Retrying, format!("{dk} {verb}{by}; the step starts over"));
                self.requeue(Duration::ZERO);
            }
            return;
        }
        let due = self.status.steps.get(key).and_then(|r| r.due_at.clone()).map(|t| t.0);
        if step.approval.is_some()
            && let Some(d) = decision_for(self.input.decisions, &self.decision_key(key))
        {
            let by = d.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
            let comment = d.comment.clone().unwrap_or_default();
            match d.decision {
                DecisionKind::Approve => {
                    self.row(key).output = Some(comment);
                    self.transition(key, StepPhase::Succeeded, format!("approved{by}"));
                }
                DecisionKind::Reject => {
                    let why = if comment.is_empty() { String::new() } else { format!(": {comment}") };
                    self.transition(key, StepPhase::Failed, format!("rejected{by}{why}"));
                }
            }
            return;
        }
        let Some(due) = due else { return };
        if now < due {
            self.requeue(duration_until(now, due));
            return;
        }
        match step.approval.as_ref().map(|a| a.on_timeout) {
            Some(OnTimeout::Approve) => {
                self.row(key).output = Some(String::new());
                self.transition(key, StepPhase::Succeeded, "no decision in time: approved (onTimeout: approve)");
            }
            Some(OnTimeout::Reject) => {
                self.transition(key, StepPhase::Failed, "no decision in time: rejected (onTimeout: reject)")
            }
            None => {
                self.row(key).output = Some(due.to_string());
                self.transition(key, StepPhase::Succeeded, "");
            }
        }
    }

    /// What templates see of the steps of one loop iteration (by inner id).
    fn iteration_views(&self, prefix: &str) -> BTreeMap<String, StepView> {
        self.status
            .steps
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('['))
            .map(|(k, r)| (k[prefix.len()..].to_string(), view(r)))
            .collect()
    }

    /// Runs loop step `i`: passes over its current iteration as a small run of the loop's
    /// steps (their rows keyed `loop.iteration.id`), then evaluates `until` and starts the
    /// next iteration, or settles the loop. With `stop`, stops the iteration and cancels it.
    fn drive_loop(&mut self, i: usize, step: &Step, stop: Option<&str>) {
        let id = self.input.dag.id(i).to_string();
        let (Some(body), Some(l)) = (self.input.dag.body(i), step.loop_.as_ref()) else {
            return self.transition(&id, StepPhase::Failed, "loop: no steps");
        };
        let mut events = self.loop_events.remove(&id).unwrap_or_default();
        loop {
            let n = self.status.steps.get(&id).and_then(|r| r.iterations).unwrap_or(1);
            let prefix = naming::loop_prefix(&id, n);
            let outer = self.context(i, None, None);
            let previous = (n > 1).then(|| {
                let views = self.iteration_views(&naming::loop_prefix(&id, n - 1));
                serde_json::json!({"steps": template::steps_value(&views)})
            });
            let scope = Scope {
                steps: outer.steps.clone(),
                loop_vars: serde_json::json!({"iteration": n, "previous": previous}),
                prefix: prefix.clone(),
            };
            let mut sub = WorkflowRunStatus {
                phase: RunPhase::Running,
                started_at: self.status.steps.get(&id).and_then(|r| r.started_at.clone()).map(|t| Time(t.0)),
                ..Default::default()
            };
            sub.steps = self
                .status
                .steps
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, r)| (k[prefix.len()..].to_string(), r.clone()))
                .collect();
            let input = Input {
                spec: &body.spec,
                dag: &body.dag,
                cancel: self.input.cancel || stop.is_some(),
                scope: Some(&scope),
                ..self.input
            };
            let d = advance(input, &mut sub, std::mem::take(&mut events));
            for (k, r) in std::mem::take(&mut sub.steps) {
                self.status.steps.insert(format!("{prefix}{k}"), r);
            }
            for a in d.actions {
                self.decision.actions.push(match a {
                    Action::Start(mut t) => {
                        t.key = format!("{prefix}{}", t.key);
                        Action::Start(t)
                    }
                    Action::Abort { key, attempt, step_id, reason } => {
                        Action::Abort { key: format!("{prefix}{key}"), attempt, step_id, reason }
                    }
                });
            }
            for t in d.transitions {
                if let Some(k) = t.key {
                    self.decision.transitions.push(Transition { key: Some(format!("{prefix}{k}")), ..t });
                }
            }
            if let Some(r) = d.requeue_after {
                self.requeue(r);
            }
            match sub.phase {
                RunPhase::Succeeded => {
                    let mut ctx = outer;
                    ctx.steps.extend(self.iteration_views(&prefix));
                    ctx.loop_ = Some(scope.loop_vars.clone());
                    let output = || {
                        body.spec
                            .steps
                            .iter()
                            .rev()
                            .find_map(|s| self.status.steps.get(&format!("{prefix}{}", s.id))?.output.clone())
                    };
                    match template::eval_condition(&l.until, &ctx) {
                        Ok(true) => {
                            self.row(&id).output = output();
                            let m = format!("until held after {n} iteration{}", if n == 1 { "" } else { "s" });
                            self.transition(&id, StepPhase::Succeeded, m);
                        }
                        Ok(false) if n >= l.max_iterations => {
                            let m = format!("until did not hold in {n} iterations (maxIterations)");
                            if l.on_max == OnMax::Succeed {
                                self.row(&id).output = output();
                                self.transition(&id, StepPhase::Succeeded, m);
                            } else {
                                self.transition(&id, StepPhase::Failed, m);
                            }
                        }
                        Ok(false) => {
                            let row = self.row(&id);
                            row.iterations = Some(n + 1);
                            row.message = format!("iteration {}", n + 1);
                            continue;
                        }
                        Err(e) => self.transition(&id, StepPhase::Failed, format!("loop.until: {e}")),
                    }
                }
                RunPhase::Failed => self.transition(&id, StepPhase::Failed, format!("iteration {n}: {}", sub.message)),
                RunPhase::Cancelled => {
                    self.transition(&id, StepPhase::Cancelled, stop.map_or(sub.message.clone(), str::to_string))
                }
                _ => {}
            }
            return;
        }
    }

    /// Renders and starts an attempt; template steps finish on the spot.
    fn start(&mut self, key: &str, step: &Step, index: Option<usize>, ctx: Context, _finally: Option<RunPhase>) {
        let now = self.now();
        let attempt = {
            let row = self.row(key);
            row.attempts += 1;
            row.started_at = Some(MicroTime(now));
            row.finished_at = None;
            row.retry_at = None;
            row.attempts
        };
        if let Some(a) = &step.approval {
            let message = match a.message.as_deref().map(|m| template::render(m, &ctx)).transpose() {
                Ok(m) => m.unwrap_or_else(|| format!("waiting for a decision on {key}")),
                Err(e) => return self.transition(key, StepPhase::Failed, format!("approval.message: {e}")),
            };
            let due = a.timeout_seconds.map(|s| MicroTime(now + Duration::from_secs(u64::from(s))));
            self.row(key).due_at = due;
            self.transition(key, StepPhase::Waiting, message);
            return self.check_waiting(key, step);
        }
        if let Some(w) = &step.wait {
            let due = match (w.seconds, &w.until) {
                (Some(s), _) => Ok(now + Duration::from_secs(u64::from(s))),
                (None, Some(u)) => template::render(u, &ctx).map_err(|e| format!("wait.until: {e}")).and_then(|t| {
                    t.trim().parse::<Timestamp>().map_err(|e| format!("wait.until: {t:?} is not an RFC 3339 time: {e}"))
                }),
                (None, None) => Err("wait: set seconds or until".to_string()),
            };
            match due {
                Ok(due) => {
                    self.row(key).due_at = Some(MicroTime(due));
                    self.transition(key, StepPhase::Waiting, format!("waiting until {due}"));
                    self.check_waiting(key, step);
                }
                Err(m) => self.transition(key, StepPhase::Failed, m),
            }
            return;
        }
        if step.loop_.is_some() {
            let Some(i) = self.input.dag.index_of(key) else { return };
            self.row(key).iterations = Some(1);
            self.transition(key, StepPhase::Running, "iteration 1");
            return self.drive_loop(i, step, None);
        }
        if let Some(w) = &step.workflow
            && let Some(why) = self.input.run.refuse_child(&w.ref_)
        {
            return self.transition(key, StepPhase::Failed, format!("workflow.ref: {why}"));
        }
        let mut work = match render_work(step, &ctx) {
            Ok(Some(work)) => work,
            Ok(None) => {
                // A template step: its rendering is its work.
                let text = step.template.as_deref().map(|t| template::render(t, &ctx));
                match text {
                    Some(Ok(text)) => {
                        let row = self.row(key);
                        row.output = Some(text);
                        row.phase = StepPhase::Running;
                        self.transition(key, StepPhase::Succeeded, "");
                    }
                    Some(Err(e)) => self.transition(key, StepPhase::Failed, format!("template: {e}")),
                    None => self.transition(key, StepPhase::Failed, "step has no kind"),
                }
                return;
            }
            Err((field, e)) => {
                self.transition(key, StepPhase::Failed, format!("{field}: {e}"));
                return;
            }
        };
        // Decisions on the step's tool calls (`<decision key>/<tool>`).
        if let Work::Agent { llm, .. } = &mut work
            && !llm.tools.is_empty()
        {
            let prefix = format!("{}/", self.decision_key(key));
            llm.decisions = self
                .input
                .decisions
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, d)| (k[prefix.len()..].to_string(), d.clone()))
                .collect();
        }
        let msg = if attempt > 1 { format!("attempt {attempt}") } else { String::new() };
        self.transition(key, StepPhase::Running, msg);
        let timeout = self.timeout(step);
        if let Some(t) = timeout {
            self.requeue(t);
        }
        self.decision.actions.push(Action::Start(TaskStart {
            key: key.to_string(),
            step_id: step.id.clone(),
            index,
            attempt,
            work,
            timeout,
            cache: step.cache.clone().filter(|c| c.enabled),
        }));
    }
}

/// What templates see of a status row.
fn view(row: &StepStatus) -> StepView {
    StepView { phase: row.phase.as_str().into(), output: row.output.clone(), iterations: row.iterations }
}

fn record_info(row: &mut StepStatus, info: &TaskInfo) {
    if info.agent.is_some() {
        row.agent = info.agent.clone();
    }
    if info.replica.is_some() {
        row.replica = info.replica.clone();
    }
    // Every attempt's calls were made and paid for: their tokens and cost add up. A cache hit
    // shows what the stored call used (the run's usage leaves it out).
    match (info.tokens, info.cached) {
        (Some(t), true) => row.tokens = Some(t),
        (Some(t), false) => {
            let before = row.tokens.filter(|_| !row.cached).unwrap_or_default();
            row.tokens = Some(TokenUsage {
                prompt: before.prompt.saturating_add(t.prompt),
                completion: before.completion.saturating_add(t.completion),
                cost: before.cost + t.cost,
            });
        }
        (None, _) => {}
    }
    row.fallback = info.fallback.as_deref().cloned();
    row.cached = info.cached;
    if info.transcript.is_some() {
        row.transcript = info.transcript.clone();
    }
}

fn duration_until(now: Timestamp, then: Timestamp) -> Duration {
    let d = then.as_millisecond() - now.as_millisecond();
    Duration::from_millis(d.max(0) as u64)
}

/// Renders a step's work; `Ok(None)` for template steps (rendered by the caller).
fn render_work(step: &Step, ctx: &Context) -> Result<Option<Work>, (String, TemplateError)> {
    let r = |field: &str, s: &str| template::render(s, ctx).map_err(|e| (field.to_string(), e));
    if let Some(a) = &step.agent {
        return Ok(Some(Work::Agent {
            agent: a.ref_.clone(),
            selector: a.selector.clone(),
            strategy: a.strategy,
            prompt: r("agent.prompt", &a.prompt)?,
            llm: LlmWork {
                messages: a
                    .messages
                    .iter()
                    .enumerate()
                    .map(|(j, m)| Ok((m.role, r(&format!("agent.messages[{j}].content"), &m.content)?)))
                    .collect::<Result<_, _>>()?,
                schema: a.output.as_ref().map(|o| o.schema.clone()),
                repair_attempts: a.output.as_ref().map_or(0, |o| o.repair_attempts),
                tools: a.tools.clone(),
                max_turns: a.max_turns.unwrap_or(DEFAULT_MAX_TURNS),
                decisions: BTreeMap::new(),
            },
        }));
    }
    if let Some(c) = &step.container {
        let command = c
            .command
            .iter()
            .enumerate()
            .map(|(j, s)| r(&format!("container.command[{j}]"), s))
            .collect::<Result<_, _>>()?;
        let args =
            c.args.iter().enumerate().map(|(j, s)| r(&format!("container.args[{j}]"), s)).collect::<Result<_, _>>()?;
        let mut env = c.env.clone();
        for (j, e) in env.iter_mut().enumerate() {
            if let Some(v) = &e.value {
                e.value = Some(r(&format!("container.env[{j}].value"), v)?);
            }
        }
        return Ok(Some(Work::Container {
            image: c.image.clone(),
            command,
            args,
            env,
            resources: c.resources.clone(),
            working_dir: c.working_dir.clone(),
            service_account_name: c.service_account_name.clone(),
            pod: Box::new(c.pod.clone()),
        }));
    }
    if let Some(h) = &step.http {
        let mut headers = BTreeMap::new();
        for (k, v) in &h.headers {
            headers.insert(k.clone(), r(&format!("http.headers.{k}"), v)?);
        }
        return Ok(Some(Work::Http {
            method: h.method,
            url: r("http.url", &h.url)?,
            headers,
            body: h.body.as_deref().map(|b| r("http.body", b)).transpose()?,
            success_codes: h.success_codes.clone(),
        }));
    }
    if let Some(w) = &step.workflow {
        let mut params = w.params.clone();
        for (k, v) in params.iter_mut() {
            render_strings(v, &format!("workflow.params.{k}"), &r)?;
        }
        return Ok(Some(Work::Workflow { workflow: w.ref_.clone(), params }));
    }
    if let Some(res) = &step.resource {
        let mut manifest = res.manifest.clone();
        render_strings(&mut manifest, "resource.manifest", &r)?;
        return Ok(Some(Work::Resource {
            manifest,
            success_when: res.success_when.clone(),
            failure_when: res.failure_when.clone(),
            output: res.output.clone(),
        }));
    }
    Ok(None)
}

/// A field's template rendered, or the field and why not.
type Rendered = Result<String, (String, TemplateError)>;

/// Renders every string in `value` (a JSON tree) as a template; `field` names where it is.
fn render_strings(
    value: &mut Json,
    field: &str,
    r: &dyn Fn(&str, &str) -> Rendered,
) -> Result<(), (String, TemplateError)> {
    match value {
        Json::String(s) => *s = r(field, s)?,
        Json::Array(items) => {
            for (j, v) in items.iter_mut().enumerate() {
                render_strings(v, &format!("{field}[{j}]"), r)?;
            }
        }
        Json::Object(map) => {
            for (k, v) in map.iter_mut() {
                render_strings(v, &format!("{field}.{k}"), r)?;
            }
        }
        _ => {}
    }
    Ok(())
}
