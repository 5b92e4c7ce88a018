use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::conditions_schema;
use super::workflow::WorkflowSpec;

/// A WorkflowRun: one execution of a Workflow with its parameters.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "volt.dev",
    version = "v1alpha1",
    kind = "WorkflowRun",
    namespaced,
    doc = "A WorkflowRun: one execution of a Workflow.",
    status = "WorkflowRunStatus",
    shortname = "wfr",
    category = "volt",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".status.workflowName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Started","type":"date","jsonPath":".status.startedAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Cost","type":"number","priority":1,"jsonPath":".status.usage.cost"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.message"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["workflowRef"]},
    {"required": ["workflow"]}
]))]
pub struct WorkflowRunSpec {
    /// The Workflow to run, in the run's namespace. Exactly one of `workflowRef` and `workflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_ref: Option<WorkflowRef>,

    /// An inline Workflow spec. Exactly one of `workflowRef` and `workflow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowSpec>,

    /// Parameter values (any JSON values), read by templates as `params.<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::any_json_map")]
    pub params: BTreeMap<String, serde_json::Value>,

    /// Queued runs with a higher priority start first.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,

    /// Timeout of the whole run, in seconds (defaults to the operator's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub timeout_seconds: Option<u32>,

    /// True pauses the scheduling of new steps; running steps finish. False resumes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,

    /// True cancels the run: running pods are deleted, in-process calls aborted, `finally`
    /// steps still run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,

    /// Seconds after the run finishes when it is deleted, with its pods and ConfigMaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<u32>,

    /// Decisions of people, by key: the status key of an approval step (`sign-off`,
    /// `review.2.sign-off` inside a loop), or a key another waiting step names. The operator
    /// reads them and never writes them; RBAC on `workflowruns` decides who may patch them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub decisions: BTreeMap<String, StepDecision>,

    /// Limits on the tokens and cost of this run's agent steps, checked before every call
    /// (reserving its worst case); a call that would go over fails its step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RunBudget>,
}

/// A person's decision on a waiting step.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepDecision {
    /// Approve or Reject.
    pub decision: DecisionKind,
    /// Why; the output of an approved step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Who decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The decision itself.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum DecisionKind {
    #[default]
    Approve,
    Reject,
}

fn is_zero(v: &i32) -> bool {
    *v == 0
}

/// A reference to a Workflow in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct WorkflowRef {
    /// Name of the Workflow.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Phase of a run.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum RunPhase {
    /// Accepted, not yet started.
    #[default]
    Pending,
    /// Waiting for a concurrency slot.
    Queued,
    /// Steps are running.
    Running,
    /// Paused by `spec.suspend`.
    Suspended,
    /// Every step succeeded (or failed with `continueOnError`).
    Succeeded,
    /// A step failed, the run timed out, or the spec is invalid.
    Failed,
    /// Cancelled by `spec.cancel`.
    Cancelled,
}

impl RunPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, RunPhase::Succeeded | RunPhase::Failed | RunPhase::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Pending => "Pending",
            RunPhase::Queued => "Queued",
            RunPhase::Running => "Running",
            RunPhase::Suspended => "Suspended",
            RunPhase::Succeeded => "Succeeded",
            RunPhase::Failed => "Failed",
            RunPhase::Cancelled => "Cancelled",
        }
    }
}

/// Phase of a step (or of one `forEach` child).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum StepPhase {
    /// Not started.
    #[default]
    Pending,
    /// Running (a pod exists, or an in-process task is under way).
    Running,
    /// Failed an attempt; waiting for its backoff before the next.
    Retrying,
    /// Finished with an output.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Not run: its `when` was false, or a dependency failed or was skipped.
    Skipped,
    /// Stopped by cancellation or a run timeout.
    Cancelled,
    /// Waiting for a decision (approval steps) or a time (wait steps); holds no worker.
    Waiting,
}

impl StepPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, StepPhase::Succeeded | StepPhase::Failed | StepPhase::Skipped | StepPhase::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            StepPhase::Pending => "Pending",
            StepPhase::Running => "Running",
            StepPhase::Retrying => "Retrying",
            StepPhase::Succeeded => "Succeeded",
            StepPhase::Failed => "Failed",
            StepPhase::Skipped => "Skipped",
            StepPhase::Cancelled => "Cancelled",
            StepPhase::Waiting => "Waiting",
        }
    }
}

/// Observed state of a run.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRunStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Phase of the run.
    #[serde(default)]
    pub phase: RunPhase,
    /// kstatus conditions: Ready (Succeeded), Reconciling (in progress), Stalled (Failed).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Finished steps over all steps, as `finished/total`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub progress: String,
    /// When the first step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// A human-readable summary: why the run failed, what it waits for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Name of the Workflow (empty for an inline spec).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workflow_name: String,
    /// Hash of the Workflow spec the run started with.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workflow_spec_hash: String,
    /// The Workflow spec the run started with; later edits of the Workflow do not change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowSpec>,
    /// Parameters after defaults were applied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::any_json_map")]
    pub params: BTreeMap<String, serde_json::Value>,
    /// The Workflow's `spec.output`, rendered when the run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// One row per step, per `forEach` child (`step[index]`) and per step of each loop
    /// iteration (`loop.iteration.step`, iterations from 1).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub steps: BTreeMap<String, StepStatus>,
    /// Tokens and cost of the run's agent steps so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<RunUsage>,
    /// The OpenTelemetry trace of the run's spans (32 hex digits), when the operator exports
    /// traces: search for it in the tracing backend.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
}

/// Observed state of a step.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// Phase of the step.
    pub phase: StepPhase,
    /// Attempts started so far.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub attempts: u32,
    /// When the current attempt started (microseconds, for timeouts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    /// When the step finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    /// When the next attempt may start (phase Retrying).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<MicroTime>,
    /// Agent that served the call (agent steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Replica that served the call (agent steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Pod of the current attempt (container steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// What the current attempt runs as besides a pod, as `kubectl get` takes it
    /// (`<Kind>.<version>.<group>/<name>`): the child run of a workflow step
    /// (`WorkflowRun.v1alpha1.volt.dev/...`), the object of a resource step (`Job.v1.batch/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// True when the result came from the cache and the step did not run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// Token usage and cost (agent steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenUsage>,
    /// Which agent answered instead of the step's, and why (agent steps that fell back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Number of `forEach` children (fan-out steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
    /// The current (then the last) iteration, from 1 (loop steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iterations: Option<u32>,
    /// The key of `spec.decisions` a waiting step needs besides an approval's own: for a tool
    /// call in `requireApproval`, `<step key>/<tool>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_key: Option<String>,
    /// When a waiting step's time comes: the end of a wait, the timeout of an approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<MicroTime>,
    /// The output, when it fits inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Where the output is stored when it is too large to keep inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<OutputRef>,
    /// Why the step failed, was skipped or is waiting.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Where the transcript of the last attempt is stored (agent steps): messages, tool calls
    /// and results, replica, latency, usage, repairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript_ref: Option<OutputRef>,
    /// The transcript on its way to its ConfigMap (never written to the API server).
    #[serde(skip)]
    #[schemars(skip)]
    pub transcript: Option<std::sync::Arc<String>>,
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// Token usage of an LLM call.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// What the tokens cost, from the answering Agents' `spec.pricing` (absent when none of
    /// them has prices).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub cost: f64,
}

/// A run's limits on what its agent steps spend.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunBudget {
    /// Most prompt plus completion tokens the run may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u64>,
    /// Most the run may spend, in the unit of the Agents' `spec.pricing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub max_cost: Option<f64>,
}

/// What a run's agent steps used: the sum over its step rows (every attempt of each step;
/// results from the cache cost nothing).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Cost, in the unit of the Agents' `spec.pricing` (0 when no Agent has prices).
    pub cost: f64,
}

/// A ConfigMap key holding a step's output.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutputRef {
    /// ConfigMap name, owned by the run.
    pub config_map: String,
    /// Key in the ConfigMap.
    pub key: String,
    /// Size of the output in bytes.
    pub size: u64,
}
