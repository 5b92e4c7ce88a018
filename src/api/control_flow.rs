//! The control-flow step kinds: loops, child workflows, approvals, waits and resource steps
//! (custom executors: any Kubernetes object another controller runs).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Step;

/// A loop: its own small DAG of steps, repeated until `until` holds.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoopStep {
    /// Most iterations; reaching it without `until` holding fails the step (see `onMax`).
    #[schemars(range(min = 1, max = 100))]
    pub max_iterations: u32,
    /// Condition evaluated after each iteration over that iteration's steps; the loop ends
    /// when it holds.
    #[schemars(length(min = 1))]
    pub until: String,
    /// What reaching `maxIterations` does: `fail` (default) or `succeed`.
    #[serde(default)]
    pub on_max: OnMax,
    /// The steps of one iteration; ids are local to the loop.
    #[schemars(schema_with = "loop_steps_schema")]
    pub steps: Vec<Step>,
}

/// What reaching a loop's `maxIterations` does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnMax {
    #[default]
    Fail,
    Succeed,
}

thread_local! {
    /// Set while the schema of a loop's steps is generated: a step inside a loop may not hold
    /// a loop (validation says so), and its schema does not recurse.
    static IN_LOOP_SCHEMA: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

pub(super) fn loop_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    if IN_LOOP_SCHEMA.get() {
        return schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
            "description": "Loops do not nest."});
    }
    <LoopStep as JsonSchema>::json_schema(generator)
}

fn loop_steps_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    IN_LOOP_SCHEMA.set(true);
    let step = <Step as JsonSchema>::json_schema(generator);
    IN_LOOP_SCHEMA.set(false);
    schemars::json_schema!({"type": "array", "minItems": 1, "maxItems": 50, "items": step})
}

/// A person's sign-off, given by patching the run's `spec.decisions`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStep {
    /// What is asked (a template), shown in the step's message and events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long to wait for a decision, in seconds; then `onTimeout` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31536000))]
    pub timeout_seconds: Option<u32>,
    /// Decision taken when the timeout passes: `reject` (default) or `approve`.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

/// Decision taken when an approval times out.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    #[default]
    Reject,
    Approve,
}

/// A wait: exactly one of `seconds` and `until`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WaitStep {
    /// Seconds to wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31536000))]
    pub seconds: Option<u32>,
    /// An RFC 3339 time to wait until (a template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub until: Option<String>,
}

/// Runs another Workflow as a child WorkflowRun, owned by this run.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStep {
    /// Name of the Workflow, in the run's namespace.
    #[serde(rename = "ref")]
    #[schemars(length(min = 1, max = 253))]
    pub ref_: String,
    /// Parameters of the child run; string values are templates rendered against this run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// Creates a Kubernetes object (owned by the run, under a deterministic name), watches it and
/// ends when `successWhen` or `failureWhen` holds over it; cancel and timeout delete it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStep {
    /// The object to create: `apiVersion`, `kind` and the rest; string values are templates.
    /// Its name is set by the operator; a `metadata.name` given here is used as a prefix.
    #[schemars(schema_with = "manifest_schema")]
    pub manifest: serde_json::Value,
    /// Condition over the live `object` (such as `object.status.succeeded >= 1`).
    #[schemars(length(min = 1))]
    pub success_when: String,
    /// Condition over the live `object` that fails the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_when: Option<String>,
    /// Output, a template over `object` (default: the object's status as JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

fn manifest_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "required": ["apiVersion", "kind"],
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "The object to create: apiVersion, kind and the rest; string values are templates."
    })
}
