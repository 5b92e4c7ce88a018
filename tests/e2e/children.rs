//! Child runs and resource steps in the cluster: a `workflow` step's child WorkflowRun (named,
//! owned, labelled; the parent's suspend reaches it; its output is the step's), a cycle of
//! Workflows failing with the chain, and a `resource` step running a batch/v1 Job through the
//! kube-controller-manager: refused while RBAC does not allow Jobs (naming the permission),
//! run to success once allowed, deleted on cancel.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use volt_operator::api::{RunPhase, StepPhase, WorkflowRun};

use crate::kit::{self, Env, Kubelet, OPERATOR_USER, Operator, kubectl, run_obj, step, wait_for};

const LONG: Duration = Duration::from_secs(90);

fn merge(e: &Env, run: &str, patch: &str) {
    let ran = kubectl(&["patch", "wfr", run, "-n", &e.ns, "--type", "merge", "-p", patch]);
    assert!(ran.ok, "{}", ran.stderr);
}

#[tokio::test]
async fn a_workflow_step_runs_a_child_run_that_follows_its_parent_and_cycles_fail_with_the_chain() {
    let e = Env::new("children").await;
    let _op = Operator::start_with_chart_rights(&e.client, &e.ns).await;
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "testing"},
        "spec": {"params": [{"name": "target"}], "output": "tested {{ params.target }}: {{ steps.gate.output }}",
                 "steps": [{"id": "gate", "approval": {}}]}}))
        .await;
    for (name, calls) in [("ping", "pong"), ("pong", "ping")] {
        e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name},
            "spec": {"steps": [{"id": "call", "workflow": {"ref": calls}}]}}))
            .await;
    }
    let wf = json!({
        "output": "{{ steps.test.output }}",
        "steps": [
            {"id": "build", "template": "build-7"},
            {"id": "test", "dependsOn": ["build"],
             "workflow": {"ref": "testing", "params": {"target": "{{ steps.build.output }}"}}}
        ]
    });
    e.apply(run_obj("parent-1", wf)).await;
    let child_name = "parent-1-test-1";
    let child = wait_for(&e.runs, child_name, LONG, |r| {
        r.status.as_ref().is_some_and(|s| s.steps.get("gate").is_some_and(|g| g.phase == StepPhase::Waiting))
    })
    .await;
    assert_eq!(child.labels().get("volt.dev/parent-run").map(String::as_str), Some("parent-1"));
    let owner = child.owner_references().first().cloned().expect("an owner");
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("WorkflowRun", "parent-1", Some(true)));
    assert_eq!(child.spec.params.get("target"), Some(&json!("build-7")), "params rendered from the parent");
    let parent = e.runs.get("parent-1").await.expect("parent");
    let row = step(parent.status.as_ref().expect("status"), "test");
    assert_eq!(row.phase, StepPhase::Running);
    assert_eq!(row.object.as_deref(), Some("WorkflowRun.v1alpha1.volt.dev/parent-1-test-1"));

    // The parent's suspend reaches the child, and so does the resume.
    merge(&e, "parent-1", r#"{"spec":{"suspend":true}}"#);
    wait_for(&e.runs, child_name, LONG, |r| r.spec.suspend).await;
    merge(&e, "parent-1", r#"{"spec":{"suspend":false}}"#);
    wait_for(&e.runs, child_name, LONG, |r| !r.spec.suspend).await;

    // Deciding the child's gate ends the child, then the parent's step, with the child's output.
    merge(&e, child_name, r#"{"spec":{"decisions":{"gate":{"decision":"Approve","comment":"fine"}}}}"#);
    let s = e.finished("parent-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "test").output.as_deref(), Some("tested build-7: fine"));
    assert_eq!(s.output.as_deref(), Some("tested build-7: fine"));

    // ping -> pong -> ping: the grandchild is refused, and the failure climbs with the chain.
    let mut run = run_obj("ping-1", json!({}));
    run["spec"] = json!({"workflowRef": {"name": "ping"}});
    e.apply(run).await;
    let s = e.finished("ping-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed);
    let message = &step(&s, "call").message;
    assert!(message.contains("child run ping-1-call-1 failed"), "{message}");
    assert!(message.contains("cycle: ping -> pong -> ping"), "{message}");

    // A missing Workflow fails the step at once, naming it.
    let wf = json!({"steps": [{"id": "call", "workflow": {"ref": "nowhere"}}]});
    e.apply(run_obj("lost-1", wf)).await;
    let s = e.finished("lost-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(step(&s, "call").message.contains("workflow.ref: Workflow \"nowhere\" not found"), "{s:#?}");

    // Cancelling the parent cancels the child.
    let wf = json!({"steps": [{"id": "test", "workflow": {"ref": "testing", "params": {"target": "x"}}}]});
    e.apply(run_obj("parent-2", wf)).await;
    wait_for(&e.runs, "parent-2-test-1", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Running))
        .await;
    merge(&e, "parent-2", r#"{"spec":{"cancel":true}}"#);
    assert_eq!(e.finished("parent-2", LONG).await.phase, RunPhase::Cancelled);
    assert_eq!(e.finished("parent-2-test-1", LONG).await.phase, RunPhase::Cancelled);
}

fn job(env: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
        "spec": {"backoffLimit": 0, "template": {
            // The stand-in kubelet reads the attempt from this label (FAIL_ATTEMPTS).
            "metadata": {"labels": {"volt.dev/attempt": "1"}},
            "spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox:1.35", "env": env}]}}}})
}

#[tokio::test]
async fn a_resource_step_runs_a_job_when_rbac_allows_it_and_deletes_it_on_cancel() {
    let e = Env::new("resource").await;
    // The operator with the chart's rights in this namespace, and nothing more.
    let _op = Operator::start_with_chart_rights(&e.client, &e.ns).await;
    // Job pods: the stand-in kubelet runs them (the controller manager runs the Jobs).
    let _kubelet = Kubelet::start(
        e.client.clone(),
        &e.ns,
        Some("job-name".into()),
        kit::kubelet::scripted(|_| Duration::from_millis(300)),
    );
    let step_of = |env| {
        json!({"steps": [{"id": "train", "resource": {
            "manifest": job(env),
            "successWhen": "object.status.succeeded >= 1",
            "failureWhen": "object.status.failed >= 1",
            "output": "{{ object.status.succeeded }} succeeded"
        }}]})
    };

    // The chart grants no Jobs: the step fails, naming what to grant.
    e.apply(run_obj("denied", step_of(json!([])))).await;
    let s = e.finished("denied", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed, "{s:#?}");
    let message = &step(&s, "train").message;
    assert!(message.contains("may not create jobs.batch") && message.contains("rbac.extraRules"), "{message}");

    // What rbac.extraRules would add, for the operator's user in this namespace.
    let params = PatchParams::apply("test").force();
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "jobs"},
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "delete"]}]});
    Api::<Role>::namespaced(e.client.clone(), &e.ns).patch("jobs", &params, &Patch::Apply(&role)).await.expect("role");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "jobs"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR_USER}]});
    Api::<RoleBinding>::namespaced(e.client.clone(), &e.ns)
        .patch("jobs", &params, &Patch::Apply(&binding))
        .await
        .expect("binding");

    e.apply(run_obj("trained", step_of(json!([{"name": "OUTPUT", "value": "done"}])))).await;
    let s = e.finished("trained", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "train").output.as_deref(), Some("1 succeeded"));
    assert_eq!(step(&s, "train").object.as_deref(), Some("Job.v1.batch/train-train-1"));
    let jobs: Api<Job> = Api::namespaced(e.client.clone(), &e.ns);
    let made = jobs.get("train-train-1").await.expect("the Job");
    assert_eq!(made.owner_references()[0].name, "trained", "owned by the run");
    assert_eq!(made.labels().get("volt.dev/run").map(String::as_str), Some("trained"));

    // A failing Job fails the step through failureWhen.
    let mut failing = step_of(json!([{"name": "FAIL_ATTEMPTS", "value": "1"}]));
    failing["steps"][0]["resource"]["manifest"]["metadata"]["name"] = json!("flaky");
    e.apply(run_obj("broken", failing)).await;
    let s = e.finished("broken", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(step(&s, "train").message.contains("Job.v1.batch/flaky-train-1: failureWhen holds"), "{s:#?}");

    // Cancel deletes the Job of the running attempt.
    let mut slow = step_of(json!([{"name": "RUN_FOREVER", "value": "1"}]));
    slow["steps"][0]["resource"]["manifest"]["metadata"]["name"] = json!("slow");
    e.apply(run_obj("cancelled", slow)).await;
    wait_for(&e.runs, "cancelled", LONG, |r: &WorkflowRun| {
        r.status.as_ref().is_some_and(|s| s.steps.get("train").is_some_and(|x| x.object.is_some()))
    })
    .await;
    assert!(jobs.get_opt("slow-train-1").await.expect("get").is_some());
    merge(&e, "cancelled", r#"{"spec":{"cancel":true}}"#);
    assert_eq!(e.finished("cancelled", LONG).await.phase, RunPhase::Cancelled);
    let gone = async {
        while jobs.get_opt("slow-train-1").await.expect("get").is_some_and(|j| j.metadata.deletion_timestamp.is_none())
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(LONG, gone).await.expect("the Job is deleted on cancel");
}
