//! The foundation against a real API server: CRDs, schema validation, printer columns, and the
//! Workflow controller's validation.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use volt_operator::api::{Agent, Workflow, WorkflowRun, condition_status};

use crate::kit::{Operator, control_plane, kubectl, kubectl_stdin, wait_for};

#[tokio::test]
async fn spec_examples_apply() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "examples").await;
    for f in ["examples/spec/agents.yaml", "examples/spec/workflow.yaml"] {
        let (ok, out, err) = kubectl(&["apply", "-n", &ns, "-f", f]).parts();
        assert!(ok, "kubectl apply {f}: {out}{err}");
    }
    let (ok, out, err) = kubectl(&["create", "-n", &ns, "-f", "examples/spec/run.yaml"]).parts();
    assert!(ok, "kubectl create run: {out}{err}");
    assert!(out.contains("workflowrun.volt.dev/dev-"), "{out}");
}

/// Objects the schema must reject at apply time, and what the error must name.
const BAD: &[(&str, &str)] = &[
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: bad-id}\nspec:\n  steps:\n  - {id: Bad_Id, template: x}\n",
        "spec.steps.id",
    ),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: bad-parallel}\nspec:\n  steps:\n  - {id: a, forEach: '[1]', maxParallel: 0, template: x}\n",
        "spec.steps.maxParallel",
    ),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: bad-retry}\nspec:\n  steps:\n  - {id: a, template: x, retry: {limit: -1}}\n",
        "spec.steps.retry.limit",
    ),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: bad-policy}\nspec:\n  concurrency: {maxRuns: 1, policy: Sometimes}\n  steps:\n  - {id: a, template: x}\n",
        "spec.concurrency.policy",
    ),
    ("apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: no-steps}\nspec:\n  steps: []\n", "spec.steps"),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {name: hot}\nspec:\n  model: m\n  parameters: {temperature: 5}\n  endpoint: {baseUrl: 'http://127.0.0.1:1/v1'}\n",
        "spec.parameters.temperature",
    ),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {name: zero}\nspec:\n  model: m\n  maxConcurrency: 0\n  endpoint: {baseUrl: 'http://127.0.0.1:1/v1'}\n",
        "spec.maxConcurrency",
    ),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {name: ftp}\nspec:\n  model: m\n  endpoint: {baseUrl: 'ftp://x'}\n",
        "spec.endpoint.baseUrl",
    ),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {name: two-forms}\nspec:\n  model: m\n  endpoint: {baseUrl: 'http://a/v1'}\n  replicas: {selector: {matchLabels: {a: b}}, port: 80}\n",
        "spec",
    ),
    ("apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {name: nothing}\nspec: {params: {a: 1}}\n", "spec"),
    (
        "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {name: neg}\nspec: {workflowRef: {name: w}, timeoutSeconds: 0}\n",
        "spec.timeoutSeconds",
    ),
];

#[tokio::test]
async fn schema_rejects_bad_objects_naming_the_field() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "schema").await;
    for (yaml, field) in BAD {
        let (ok, out, err) = kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], Some(yaml)).parts();
        assert!(!ok, "should be rejected:\n{yaml}\n{out}");
        assert!(err.contains(field), "error should name {field}:\n{yaml}\n{err}");
    }
}

#[tokio::test]
async fn kubectl_get_shows_the_columns() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "columns").await;
    let _op = Operator::start(&ns).await;
    let (ok, _, err) = kubectl(&["apply", "-n", &ns, "-f", "examples/spec/agents.yaml"]).parts();
    assert!(ok, "{err}");
    let wf = "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: hello}\nspec:\n  steps:\n  - {id: a, template: hi}\n  - {id: b, dependsOn: [a], template: '{{ steps.a.output }}!'}\n";
    let run = "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {name: hello-1}\nspec: {workflowRef: {name: hello}}\n";
    for y in [wf, run] {
        let (ok, _, err) = kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], Some(y)).parts();
        assert!(ok, "{err}");
    }
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    wait_for(&runs, "hello-1", Duration::from_secs(30), |r| r.status.as_ref().is_some_and(|s| s.phase.is_finished()))
        .await;

    let (ok, out, err) = kubectl(&["get", "workflowruns", "-n", &ns]).parts();
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "WORKFLOW", "PHASE", "PROGRESS", "STARTED", "AGE"], "{out}");
    assert!(
        out.contains("hello-1") && out.contains("hello") && out.contains("Succeeded") && out.contains("2/2"),
        "{out}"
    );
    let (_, wide, _) = kubectl(&["get", "wfr", "-n", &ns, "-o", "wide"]).parts();
    assert!(wide.lines().next().unwrap_or("").contains("MESSAGE"), "{wide}");

    let (_, out, _) = kubectl(&["get", "ag", "-n", &ns]).parts();
    let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "MODEL", "READY", "ENDPOINT", "AGE"], "{out}");
    assert!(out.contains("gpt-4o-mini"), "{out}");

    let (_, out, _) = kubectl(&["get", "vwf", "-n", &ns]).parts();
    let header: Vec<&str> = out.lines().next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header, ["NAME", "STEPS", "READY", "AGE"], "{out}");

    let (ok, out, err) = kubectl(&["get", "volt", "-n", &ns]).parts();
    assert!(ok, "{err}");
    for kind in ["agent.volt.dev/analyst", "workflow.volt.dev/hello", "workflowrun.volt.dev/hello-1"] {
        assert!(out.contains(kind), "`kubectl get volt` should list {kind}:\n{out}");
    }
}

#[tokio::test]
async fn invalid_workflow_is_reported_then_fixed() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "cycle").await;
    let _op = Operator::start(&ns).await;
    let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
    let cyclic = serde_json::json!({
        "apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "loop"},
        "spec": {"steps": [
            {"id": "fetch", "template": "x"},
            {"id": "plan", "dependsOn": ["fetch", "review"], "template": "x"},
            {"id": "build", "dependsOn": ["plan"], "template": "x"},
            {"id": "review", "dependsOn": ["build"], "template": "x"}
        ]}
    });
    let pp = PatchParams::apply("test").force();
    api.patch("loop", &pp, &Patch::Apply(&cyclic)).await.expect("apply");
    let wf = wait_for(&api, "loop", Duration::from_secs(20), |w| {
        w.status.as_ref().is_some_and(|s| s.observed_generation == Some(1))
    })
    .await;
    let status = wf.status.expect("status");
    let ready = condition_status(&status.conditions, "Ready").expect("Ready condition");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
    assert!(ready.message.contains("dependency cycle"), "{}", ready.message);
    for id in ["plan", "build", "review"] {
        assert!(ready.message.contains(id), "cycle should name {id}: {}", ready.message);
    }
    assert!(!ready.message.contains("fetch"), "fetch is not in the cycle: {}", ready.message);
    let stalled = condition_status(&status.conditions, "Stalled").expect("Stalled condition");
    assert_eq!(stalled.status, "True");
    assert_eq!(status.step_count, 4);

    // Fix it: the condition turns Ready and observedGeneration follows.
    let mut fixed = cyclic.clone();
    fixed["spec"]["steps"][1]["dependsOn"] = serde_json::json!(["fetch"]);
    api.patch("loop", &pp, &Patch::Apply(&fixed)).await.expect("apply fix");
    let wf = wait_for(&api, "loop", Duration::from_secs(20), |w| {
        w.status.as_ref().is_some_and(|s| s.observed_generation == Some(2))
    })
    .await;
    let status = wf.status.expect("status");
    let ready = condition_status(&status.conditions, "Ready").expect("Ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Valid"));
    assert_eq!(ready.observed_generation, Some(2));
    assert_eq!(condition_status(&status.conditions, "Stalled").map(|c| c.status.as_str()), Some("False"));

    // An Agent with an external endpoint is Ready.
    let agents: Api<Agent> = Api::namespaced(client.clone(), &ns);
    let agent = serde_json::json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "ext"},
        "spec": {"model": "m", "endpoint": {"baseUrl": "http://127.0.0.1:9/v1"}}});
    agents.patch("ext", &pp, &Patch::Apply(&agent)).await.expect("agent");
    let a = wait_for(&agents, "ext", Duration::from_secs(20), |a| {
        a.status.as_ref().is_some_and(|s| s.observed_generation == Some(1))
    })
    .await;
    let s = a.status.expect("status");
    assert_eq!(s.endpoint_kind, "endpoint");
    assert_eq!(s.ready_replicas, "1/1");
    assert_eq!(condition_status(&s.conditions, "Ready").map(|c| c.status.as_str()), Some("True"));
}
