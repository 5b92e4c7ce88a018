//! The bad-input corpus (`tests/corpus/bad-objects.yaml`): every object is either rejected by
//! the schema at apply time with an error naming the field, or accepted and then marked with a
//! condition or a failed run whose message names the field or step. Nothing panics and the
//! operator keeps working for everyone else.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use volt_operator::api::{Agent, Budget, RunPhase, Workflow, WorkflowRun, WorkflowSchedule, condition_status};

use crate::kit::{Operator, control_plane, kubectl_stdin, wait_for};

const CORPUS: &str = include_str!("../corpus/bad-objects.yaml");

#[tokio::test]
async fn every_bad_object_is_rejected_or_reported() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "corpus").await;
    let op = Operator::start(&ns).await;
    let docs: Vec<&str> = CORPUS.split("\n---\n").collect();
    assert!(docs.len() >= 50, "the corpus has at least 50 objects, it has {}", docs.len());
    let (mut rejected, mut reported) = (0, 0);
    let mut failures = Vec::new();
    for doc in &docs {
        let obj: Value = match serde_saphyr::from_str(doc) {
            Ok(v) => v,
            Err(e) => panic!("corpus document does not parse: {e}\n{doc}"),
        };
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let expect = obj["metadata"]["annotations"]["expect"].as_str().unwrap_or_default().to_string();
        let (how, what) = expect
            .split_once(": ")
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or((expect.clone(), String::new()));
        let (ok, _out, err) = kubectl_stdin(&["apply", "-n", &ns, "-f", "-"], Some(doc)).parts();
        if how == "rejected" {
            if ok || !err.contains(&what) {
                failures.push(format!("{kind}/{name}: expected a rejection naming {what:?}, got ok={ok}: {err}"));
            }
            rejected += 1;
            continue;
        }
        if !ok {
            failures.push(format!("{kind}/{name}: expected the API server to accept it: {err}"));
            continue;
        }
        reported += 1;
        let timeout = Duration::from_secs(30);
        let message = match kind.as_str() {
            "Workflow" => {
                let api: Api<Workflow> = Api::namespaced(client.clone(), &ns);
                let w = wait_for(&api, &name, timeout, |w| {
                    w.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
                })
                .await;
                let s = w.status.unwrap_or_default();
                condition_status(&s.conditions, "Ready").map(|c| c.message.clone()).unwrap_or_default()
            }
            "Agent" => {
                let api: Api<Agent> = Api::namespaced(client.clone(), &ns);
                let a = wait_for(&api, &name, timeout, |a| {
                    a.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
                })
                .await;
                let s = a.status.unwrap_or_default();
                s.conditions.iter().map(|c| c.message.clone()).collect::<Vec<_>>().join("; ")
            }
            "Budget" => {
                let api: Api<Budget> = Api::namespaced(client.clone(), &ns);
                let b = wait_for(&api, &name, timeout, |b| {
                    b.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
                })
                .await;
                let s = b.status.unwrap_or_default();
                condition_status(&s.conditions, "Ready").map(|c| c.message.clone()).unwrap_or_default()
            }
            "WorkflowRun" => {
                let api: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
                let r =
                    wait_for(&api, &name, timeout, |r| r.status.as_ref().is_some_and(|s| s.phase.is_finished())).await;
                let s = r.status.unwrap_or_default();
                let want = if how == "succeeded" { RunPhase::Succeeded } else { RunPhase::Failed };
                if s.phase != want {
                    failures.push(format!("{kind}/{name}: expected {want:?}, got {:?}: {}", s.phase, s.message));
                }
                let steps: Vec<String> = s.steps.values().map(|r| r.message.clone()).collect();
                format!("{} | {}", s.message, steps.join(" | "))
            }
            "WorkflowSchedule" => {
                let api: Api<WorkflowSchedule> = Api::namespaced(client.clone(), &ns);
                let w = wait_for(&api, &name, timeout, |w| {
                    w.status.as_ref().is_some_and(|s| s.observed_generation.is_some())
                })
                .await;
                let s = w.status.unwrap_or_default();
                match condition_status(&s.conditions, "Ready") {
                    Some(c) if c.status == "False" => c.message.clone(),
                    other => format!("Ready is not False: {other:?}"),
                }
            }
            other => panic!("unexpected kind {other}"),
        };
        if !message.contains(&what) {
            failures.push(format!("{kind}/{name}: expected a message containing {what:?}, got {message:?}"));
        }
    }
    eprintln!("corpus: {} objects, {rejected} rejected by the schema, {reported} reported by the operator", docs.len());
    assert!(
        failures.is_empty(),
        "{} of {} corpus objects misbehaved:\n{}",
        failures.len(),
        docs.len(),
        failures.join("\n")
    );

    // Nothing else was disturbed: a good run still succeeds.
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let good = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "still-fine"},
        "spec": {"workflow": {"steps": [{"id": "a", "template": "ok"}]}}});
    runs.patch("still-fine", &PatchParams::apply("test").force(), &Patch::Apply(&good)).await.expect("apply");
    let r = wait_for(&runs, "still-fine", Duration::from_secs(30), |r| {
        r.status.as_ref().is_some_and(|s| s.phase.is_finished())
    })
    .await;
    assert_eq!(r.status.map(|s| s.phase), Some(RunPhase::Succeeded));
    assert_eq!(op.metrics.reconcile_errors.with_label_values(&["workflowrun", "other"]).get(), 0);
}
