use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::agent::{CapabilitySelector, Strategy};
use super::conditions::conditions_schema;
use super::control_flow::{ApprovalStep, LoopStep, ResourceStep, WaitStep, WorkflowStep};

/// Pattern every step id must match: a DNS label, so it can name pods and label values.
pub const STEP_ID_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Longest step id accepted.
pub const STEP_ID_MAX_LEN: usize = 48;

/// A Workflow: a reusable template of parameters and a DAG of steps. Start it with a
/// WorkflowRun.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "volt.dev",
    version = "v1alpha1",
    kind = "Workflow",
    namespaced,
    doc = "A Workflow: parameters and a DAG of steps, started by WorkflowRuns.",
    status = "WorkflowStatus",
    shortname = "vwf",
    category = "volt",
    printcolumn = r#"{"name":"Steps","type":"integer","jsonPath":".status.stepCount"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowSpec {
    /// What the workflow does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Parameters a run passes in; templates read them as `params.<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<ParamSpec>,

    /// Defaults applied to every step that does not set its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<StepDefaults>,

    /// How many runs of this workflow may be active at once, and what happens to more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,

    /// The steps, a DAG through `dependsOn`.
    #[schemars(length(min = 1, max = 10000))]
    pub steps: Vec<Step>,

    /// Steps that always run after the DAG ends, whatever happened. They may depend on each
    /// other, and may read the outputs of any DAG step and `run.phase`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub finally: Vec<Step>,

    /// The run's output: a template rendered when the run ends (it may read every step),
    /// recorded in the run's `status.output`. A child run's output is its parent step's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// A parameter of a Workflow.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ParamSpec {
    /// Name, used as `params.<name>` in templates.
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"), length(max = 128))]
    pub name: String,
    /// Whether a run must give this parameter.
    #[serde(default)]
    pub required: bool,
    /// Value used when a run does not give one (any JSON value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::any_json")]
    pub default: Option<serde_json::Value>,
    /// What the parameter is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Step defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepDefaults {
    /// Default timeout of one step attempt, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<u32>,
    /// Default retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// Concurrency control of a Workflow's runs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Concurrency {
    /// Most runs of this workflow active at once.
    #[schemars(range(min = 1, max = 100000))]
    pub max_runs: u32,
    /// What happens to a run over the limit.
    #[serde(default)]
    pub policy: ConcurrencyPolicy,
}

/// What happens to a run over a workflow's `maxRuns`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ConcurrencyPolicy {
    /// Wait (phase Queued) until a slot frees; higher `priority` first, then oldest.
    #[default]
    Queue,
    /// Fail the run at once.
    Forbid,
    /// Ignore the limit.
    Allow,
}

/// Retry policy of a step.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    #[schemars(range(min = 0, max = 100))]
    pub limit: u32,
    /// Exponential backoff between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
}

/// Exponential backoff: initialSeconds x factor^(attempt-1), capped at maxSeconds.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// Delay before the first retry, in seconds.
    #[serde(default = "default_initial_backoff")]
    #[schemars(range(min = 0.0, max = 86400.0))]
    pub initial_seconds: f64,
    /// Multiplier applied to the delay after each retry.
    #[serde(default = "default_backoff_factor")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub factor: f64,
    /// Longest delay, in seconds.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 0.0, max = 86400.0))]
    pub max_seconds: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_seconds: default_initial_backoff(),
            factor: default_backoff_factor(),
            max_seconds: default_max_backoff(),
        }
    }
}

fn default_initial_backoff() -> f64 {
    1.0
}
fn default_backoff_factor() -> f64 {
    2.0
}
fn default_max_backoff() -> f64 {
    60.0
}

/// A step of a Workflow. Exactly one of `agent`, `container`, `http`, `template`, `loop`,
/// `approval` and `wait`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Unique id: a DNS label (lower-case letters, digits and '-'), at most 48 characters.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 48))]
    pub id: String,

    /// Steps that must finish before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,

    /// Condition (a template expression such as `steps.test.phase == 'Succeeded'`); the step is
    /// Skipped when it is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,

    /// Fan-out: a template rendering to a JSON list; one child runs per item, with `item` set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,

    /// Most children of a `forEach` running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_parallel: Option<u32>,

    /// Retry policy (defaults to the workflow's `defaults.retry`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,

    /// Timeout of one attempt, in seconds (defaults to `defaults.timeoutSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<u32>,

    /// When true, a failure of this step does not fail the run; dependents still run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,

    /// Memoization of this step's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,

    /// An LLM call to an Agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStep>,

    /// A container run as a pod owned by the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerStep>,

    /// An HTTP request made by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpStep>,

    /// A template rendered by the operator; the output is the rendered text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,

    /// A group of steps repeated until a condition holds.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::control_flow::loop_schema")]
    pub loop_: Option<LoopStep>,

    /// Waits for a decision in the run's `spec.decisions` (phase Waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalStep>,

    /// Waits for a number of seconds or until a time (phase Waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitStep>,

    /// Runs another Workflow as a child WorkflowRun; the output is the child's `status.output`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowStep>,

    /// Creates a Kubernetes object that another controller runs, and waits for a condition on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceStep>,
}

/// The kind of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepKind {
    Agent,
    Container,
    Http,
    Template,
    Loop,
    Approval,
    Wait,
    Workflow,
    Resource,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Agent => "agent",
            StepKind::Container => "container",
            StepKind::Http => "http",
            StepKind::Template => "template",
            StepKind::Loop => "loop",
            StepKind::Approval => "approval",
            StepKind::Wait => "wait",
            StepKind::Workflow => "workflow",
            StepKind::Resource => "resource",
        }
    }
}

impl Step {
    /// The kinds this step sets (a valid step sets exactly one).
    pub fn kinds(&self) -> Vec<StepKind> {
        let mut kinds = Vec::new();
        if self.agent.is_some() {
            kinds.push(StepKind::Agent);
        }
        if self.container.is_some() {
            kinds.push(StepKind::Container);
        }
        if self.http.is_some() {
            kinds.push(StepKind::Http);
        }
        if self.template.is_some() {
            kinds.push(StepKind::Template);
        }
        if self.loop_.is_some() {
            kinds.push(StepKind::Loop);
        }
        if self.approval.is_some() {
            kinds.push(StepKind::Approval);
        }
        if self.wait.is_some() {
            kinds.push(StepKind::Wait);
        }
        if self.workflow.is_some() {
            kinds.push(StepKind::Workflow);
        }
        if self.resource.is_some() {
            kinds.push(StepKind::Resource);
        }
        kinds
    }

    /// The single kind of a valid step.
    pub fn kind(&self) -> Option<StepKind> {
        match self.kinds().as_slice() {
            [k] => Some(*k),
            _ => None,
        }
    }
}

/// Step memoization.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Whether results are memoized.
    #[serde(default)]
    pub enabled: bool,
    /// How long a result stays valid, in seconds (defaults to the operator's cache TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31536000))]
    pub ttl_seconds: Option<u32>,
}

/// An LLM call.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStep {
    /// Name of the Agent, in the run's namespace.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub ref_: Option<String>,
    /// Selects agents by capability, across all that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<CapabilitySelector>,
    /// Load-balancing strategy for this step (defaults to the operator's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// The user message, a template. Optional when `messages` is given; then it comes after them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prompt: String,
    /// Multi-turn input before the prompt: system, user and assistant messages, each a template.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub messages: Vec<ChatMessage>,
    /// Structured output: the reply must be JSON valid against `schema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// Names of tools the step may use, among those its Agent allows (`spec.tools[].allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub tools: Vec<String>,
    /// Bound on model <-> tool round trips (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_turns: Option<u32>,
}

/// One message of an agent step's conversation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: ChatRole,
    /// What is said, a template.
    pub content: String,
}

/// The role of a message.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    #[default]
    User,
    Assistant,
}

/// The structured output of an agent step.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// A JSON Schema the reply must satisfy; sent as `response_format` and checked on the reply.
    #[schemars(schema_with = "super::any_json")]
    pub schema: serde_json::Value,
    /// Times the model is re-asked, with the validation errors, after an invalid reply.
    #[serde(default = "default_repair_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub repair_attempts: u32,
}

fn default_repair_attempts() -> u32 {
    2
}

/// A container run as a pod.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStep {
    /// Container image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Entrypoint (templates allowed in each element).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments (templates allowed in each element).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables (templates allowed in `value`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "env_schema")]
    pub env: Vec<EnvVar>,
    /// Compute resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::opaque_object")]
    pub resources: Option<ResourceRequirements>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Service account of the pod (defaults to the namespace's `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Settings copied into the pod as they are (no templates): security context, scheduling,
    /// image pull secrets, volumes.
    #[serde(flatten)]
    pub pod: PodSettings,
}

/// The user a container step runs as when its `securityContext` names none: the pod must run
/// as non-root (the restricted Pod Security Standard), and an image that would run as root (most
/// do) is refused by the kubelet unless the pod names a user. The same user as distroless'
/// `nonroot`.
pub const DEFAULT_RUN_AS_USER: i64 = 65532;

/// The settings of a container step's pod that are not templates, copied into the pod.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Security settings, within the restricted Pod Security Standard: the pod always runs as
    /// non-root (as user 65532 unless `runAsUser` says otherwise), without privilege escalation,
    /// with every capability dropped (NET_BIND_SERVICE may be added back) and a RuntimeDefault
    /// or Localhost seccomp profile. Values the profile forbids are rejected; fields it does not
    /// list (seLinuxOptions, windowsOptions...) are not part of the schema and are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<StepSecurityContext>,
    /// Node labels the pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pod tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Secrets (in the run's namespace) for pulling the image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Volumes of the pod: ConfigMaps, Secrets and emptyDir (a workspace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub volumes: Vec<StepVolume>,
    /// Where the container mounts those volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub volume_mounts: Vec<StepVolumeMount>,
}

/// A container step's security settings: the subset of a pod's and a container's security
/// context that the restricted Pod Security Standard allows to choose.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepSecurityContext {
    /// User id the container runs as; not 0 (root). Default: 65532.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub run_as_user: Option<i64>,
    /// Primary group id of the container's processes. Default: 65532 when `runAsUser` is not
    /// set either, else the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub run_as_group: Option<i64>,
    /// Group that owns the pod's volumes and is added to the processes' groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub fs_group: Option<i64>,
    /// More groups for the container's processes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplemental_groups: Vec<i64>,
    /// Always true (the only accepted value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_true")]
    pub run_as_non_root: Option<bool>,
    /// Mount the container's root filesystem read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
    /// Always false (the only accepted value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_false")]
    pub allow_privilege_escalation: Option<bool>,
    /// Always false (the only accepted value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_false")]
    pub privileged: Option<bool>,
    /// Capabilities: all are dropped; NET_BIND_SERVICE may be added back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<StepCapabilities>,
    /// Seccomp profile: RuntimeDefault (the default) or Localhost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp_profile: Option<StepSeccompProfile>,
    /// Only Default (the only accepted value; Unmasked is what the profile forbids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "only_default_proc_mount")]
    pub proc_mount: Option<String>,
}

fn only_default_proc_mount(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["Default"]})
}

fn only_true(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "boolean", "enum": [true]})
}

fn only_false(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "boolean", "enum": [false]})
}

/// Capabilities of a container step.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepCapabilities {
    /// Capabilities added back: only NET_BIND_SERVICE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "capabilities_add")]
    pub add: Vec<String>,
    /// Capabilities dropped; ALL is always dropped, whatever this says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
}

fn capabilities_add(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "array", "items": {"type": "string", "enum": ["NET_BIND_SERVICE"]}})
}

/// Seccomp profile of a container step.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepSeccompProfile {
    /// RuntimeDefault or Localhost (Unconfined is not allowed).
    #[serde(rename = "type")]
    #[schemars(schema_with = "seccomp_type")]
    pub type_: String,
    /// With Localhost: the profile's path relative to the kubelet's seccomp directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localhost_profile: Option<String>,
}

fn seccomp_type(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["RuntimeDefault", "Localhost"]})
}

/// A volume of a container step's pod: exactly one of `configMap`, `secret` and `emptyDir`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["configMap"]}, {"required": ["secret"]}, {"required": ["emptyDir"]}]))]
pub struct StepVolume {
    /// Name, referenced by `volumeMounts`: a DNS label.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub name: String,
    /// The keys of a ConfigMap in the run's namespace, as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolume>,
    /// The keys of a Secret in the run's namespace, as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolume>,
    /// An empty directory that lives as long as the pod: a workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolume>,
}

/// A ConfigMap as a volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapVolume {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Only these keys, at these paths (default: every key, named after it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// Mode of the files (default 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 511))]
    pub default_mode: Option<i32>,
    /// Start the pod even if the ConfigMap (or a listed key) is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A Secret as a volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolume {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Only these keys, at these paths (default: every key, named after it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// Mode of the files (default 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 511))]
    pub default_mode: Option<i32>,
    /// Start the pod even if the Secret (or a listed key) is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A key of a ConfigMap or Secret and the file it becomes.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyToPath {
    /// The key.
    pub key: String,
    /// Relative path of the file.
    pub path: String,
    /// Mode of this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 511))]
    pub mode: Option<i32>,
}

/// An emptyDir volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirVolume {
    /// "" (the node's disk, the default) or Memory (tmpfs, counted against the memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "empty_dir_medium")]
    pub medium: Option<String>,
    /// Largest size, a quantity such as 1Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity_string")]
    pub size_limit: Option<Quantity>,
}

fn empty_dir_medium(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["", "Memory"]})
}

fn quantity_string(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"})
}

/// Where the container mounts a volume.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepVolumeMount {
    /// Name of a volume in `volumes`.
    pub name: String,
    /// Absolute path in the container.
    #[schemars(regex(pattern = r"^/"))]
    pub mount_path: String,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Mount only this path inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

fn env_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "description": "Variable name."},
                "value": {"type": "string", "description": "Value (a template)."},
                "valueFrom": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                               "description": "Source of the value (secretKeyRef, configMapKeyRef, fieldRef...)."}
            }
        }
    })
}

/// An HTTP request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpStep {
    /// URL (a template).
    #[schemars(length(min = 1))]
    pub url: String,
    /// Method.
    #[serde(default)]
    pub method: HttpMethod,
    /// Request headers (values are templates).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Request body (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Status codes that count as success (default: any 2xx).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub success_codes: Vec<u16>,
}

/// HTTP method.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    #[default]
    Get,
    Post,
    Put,
    Patch,
    Delete,
    Head,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Head => "HEAD",
        }
    }
}

/// Observed state of a Workflow.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready=True when the spec is valid; Ready=False with reason InvalidSpec and a message
    /// naming the step otherwise.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Number of steps, `finally` included.
    #[serde(default)]
    pub step_count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The container step's schema carries the restricted profile, so the API server rejects
    /// what it forbids with an error naming the field.
    #[test]
    fn the_container_schema_enforces_the_restricted_profile() {
        let crd = super::super::crds().into_iter().find(|c| c.spec.names.kind == "Workflow").expect("Workflow CRD");
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let container =
            &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["steps"]["items"]["properties"]["container"];
        let props = &container["properties"];
        for field in
            ["image", "securityContext", "nodeSelector", "tolerations", "imagePullSecrets", "volumes", "volumeMounts"]
        {
            assert!(props.get(field).is_some(), "container.{field} is in the schema: {container:#}");
        }
        let sc = &props["securityContext"]["properties"];
        assert_eq!(sc["privileged"]["enum"], serde_json::json!([false]));
        assert_eq!(sc["allowPrivilegeEscalation"]["enum"], serde_json::json!([false]));
        assert_eq!(sc["runAsNonRoot"]["enum"], serde_json::json!([true]));
        assert_eq!(sc["runAsUser"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(sc["capabilities"]["properties"]["add"]["items"]["enum"], serde_json::json!(["NET_BIND_SERVICE"]));
        assert_eq!(
            sc["seccompProfile"]["properties"]["type"]["enum"],
            serde_json::json!(["RuntimeDefault", "Localhost"])
        );
        let volume = &props["volumes"]["items"];
        assert_eq!(volume["oneOf"].as_array().map(Vec::len), Some(3), "{volume:#}");
        assert!(volume["properties"].get("hostPath").is_none());
    }

    #[test]
    fn container_settings_read_from_yaml() {
        let step: Step = serde_saphyr::from_str(
            "id: build\ncontainer:\n  image: busybox:1.35\n  securityContext: {runAsUser: 1000}\n  \
             volumes: [{name: work, emptyDir: {}}]\n  volumeMounts: [{name: work, mountPath: /work}]\n",
        )
        .expect("parses");
        let c = step.container.expect("container");
        assert_eq!(c.pod.security_context.and_then(|s| s.run_as_user), Some(1000));
        assert_eq!(c.pod.volumes[0].empty_dir, Some(EmptyDirVolume::default()));
        assert_eq!(c.pod.volume_mounts[0].mount_path, "/work");
    }
}
