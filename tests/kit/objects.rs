//! Volt objects as the tests write them (JSON for [`super::apply`]), and reading a run's status.

use serde_json::{Value, json};
use volt_operator::api::{StepStatus, WorkflowRunStatus};

/// A WorkflowRun `name` of an inline `workflow` (`{"steps": [...]}`).
pub fn run_obj(name: &str, workflow: Value) -> Value {
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
           "spec": {"workflow": workflow}})
}

/// An Agent of the `endpoint` form: model `stub-model` (what [`super::openai::Stub`] serves),
/// `timeoutSeconds: 10`, then the fields of `extra` (which replace those).
pub fn endpoint_agent(name: &str, base_url: &str, extra: Value) -> Value {
    let mut spec = json!({"model": "stub-model", "timeoutSeconds": 10, "endpoint": {"baseUrl": base_url}});
    merge(&mut spec, extra);
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "metadata": {"name": name}, "spec": spec})
}

/// Adds the fields of the object `extra` to the object `into`, replacing those it has.
pub fn merge(into: &mut Value, extra: Value) {
    if let (Some(into), Value::Object(extra)) = (into.as_object_mut(), extra) {
        into.extend(extra);
    }
}

/// A container step's `container` whose pod the kubelet stand-in
/// ([`super::kubelet::scripted`]) ends Succeeded with `output` as termination message.
pub fn container(output: &str) -> Value {
    json!({"image": "busybox", "command": ["sh", "-c", "true"], "env": [{"name": "OUTPUT", "value": output}]})
}

/// [`container`], whose pod fails instead in the attempts listed in `attempts` (`"1,2"`).
pub fn container_failing(output: &str, attempts: &str) -> Value {
    let mut c = container(output);
    c["env"].as_array_mut().expect("env").push(json!({"name": "FAIL_ATTEMPTS", "value": attempts}));
    c
}

/// The row of step `key` (`id`, or `id[i]` for a fan-out child); panics, showing the rows, if
/// there is none.
pub fn step<'a>(status: &'a WorkflowRunStatus, key: &str) -> &'a StepStatus {
    status.steps.get(key).unwrap_or_else(|| panic!("no step {key} in {:#?}", status.steps))
}
