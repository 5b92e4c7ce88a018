//! The types the engine exchanges with its drivers: what [`advance`](super::advance) reads, the events fed to it,
//! the work and actions it hands back, and the settings and run facts it is given.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use serde_json::Value as Json;

use crate::api::{
    Backoff, CacheSpec, CapabilitySelector, ChatRole, HttpMethod, RetryPolicy, RunPhase, StepDecision, StepKind,
    StepPhase, Strategy, TokenUsage, WorkflowSpec,
};

use crate::engine::dag::Dag;
use crate::engine::template::StepView;

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

/// Everything [`advance`](super::advance) reads besides the status.
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

/// The result of one [`advance`](super::advance).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub actions: Vec<Action>,
    pub transitions: Vec<Transition>,
    /// Call [`advance`](super::advance) again after this long even if nothing happens (retries, timeouts).
    pub requeue_after: Option<Duration>,
}

/// Delay before retry number `retry` (1-based).
pub fn backoff_delay(backoff: Option<&Backoff>, retry: u32) -> Duration {
    let b = backoff.cloned().unwrap_or_default();
    let exp = retry.saturating_sub(1).min(64) as i32;
    let secs = (b.initial_seconds * b.factor.powi(exp)).min(b.max_seconds).max(0.0);
    if secs.is_finite() { Duration::from_secs_f64(secs) } else { Duration::from_secs_f64(b.max_seconds.max(0.0)) }
}
