//! The event log outlives the operator process: a run finishes under one operator process (the
//! binary, with the chart's rights in its namespace), its events are kept in a ConfigMap owned by
//! the run, and a new process, which never saw the run, replays them at
//! `/api/v1/events?correlationId=<run uid>` in order, with `after=` paging.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use serde_json::{Value, json};
use volt_operator::api::RunPhase;
use volt_operator::naming;

use crate::kit::{Env, LogDir, OperatorProcess, control_plane, grant_operator, run_obj, wait_until};

const LONG: Duration = Duration::from_secs(90);

/// The events of `GET path` as the cluster admin: status, kinds, ids.
async fn events(op: &OperatorProcess, path: &str) -> (u16, Vec<Value>) {
    let token = control_plane::shared().admin_token().expect("the admin token of the test control plane");
    let (code, body) = op.get_as(path, token).await.unwrap_or_else(|| panic!("{path}: no answer\n{}", op.log_tail()));
    let json: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (code, json["events"].as_array().cloned().unwrap_or_default())
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap_or_default()).collect()
}

fn ids(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["id"].as_u64().unwrap_or_default()).collect()
}

#[tokio::test]
async fn a_new_operator_process_replays_the_events_of_a_run_it_never_saw() {
    let e = Env::new("event-log").await;
    grant_operator(&e.client, &e.ns).await;
    let dir = LogDir::new("event-log");
    let kubeconfig = control_plane::shared().operator_kubeconfig_path();
    let start = |log: &str| {
        OperatorProcess::builder(kubeconfig, dir.join(log))
            .namespaces(&[e.ns.as_str()])
            .args(["--health-check-interval", "1", "--log-format", "text"])
            .start(LONG)
    };
    let mut first = start("first.log").await;
    e.apply(run_obj(
        "logged",
        json!({"steps": [
            {"id": "a", "template": "x"},
            {"id": "b", "dependsOn": ["a"], "when": "false", "template": "y"},
            {"id": "c", "dependsOn": ["a"], "http": {"url": "http://127.0.0.1:9/nothing"}, "continueOnError": true}
        ]}),
    ))
    .await;
    let status = e.finished("logged", LONG).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{status:#?}");
    let uid = e.runs.get("logged").await.expect("run").uid().expect("uid");

    // The run's event log: a ConfigMap owned by the run, found by its UID, ending with its end.
    let cms: Api<ConfigMap> = Api::namespaced(e.client.clone(), &e.ns);
    let name = naming::events_config_map("logged");
    let cm = wait_until("the run's events stored up to RunSucceeded", LONG, || async {
        let cm = cms.get_opt(&name).await.ok()??;
        let stored = cm.data.as_ref()?.get(naming::EVENTS_KEY)?;
        stored.contains("RunSucceeded").then_some(cm)
    })
    .await;
    assert_eq!(cm.labels().get(naming::LABEL_EVENTS_OF), Some(&uid), "{:?}", cm.labels());
    assert_eq!(cm.labels().get(naming::LABEL_MANAGED_BY).map(String::as_str), Some(naming::MANAGED_BY));
    let owners = cm.owner_references();
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!((owners[0].kind.as_str(), owners[0].uid.as_str()), ("WorkflowRun", uid.as_str()));
    let from_first = events(&first, &format!("/api/v1/events?correlationId={uid}")).await.1;
    first.stop(Duration::from_secs(10)).await;
    first.assert_no_panic();

    // A new process, which never saw the run, replays it from the ConfigMap.
    let second = start("second.log").await;
    let path = format!("/api/v1/events?correlationId={uid}");
    let (code, replayed) = events(&second, &path).await;
    assert_eq!(code, 200, "{replayed:?}");
    let kinds_seen = kinds(&replayed);
    assert_eq!(kinds_seen.first(), Some(&"RunStarted"), "{kinds_seen:?}");
    assert_eq!(kinds_seen.last(), Some(&"RunSucceeded"), "{kinds_seen:?}");
    assert_eq!(kinds_seen.iter().filter(|k| **k == "RunSucceeded").count(), 1, "{kinds_seen:?}");
    for k in ["StepStarted", "StepSucceeded", "StepSkipped", "StepFailed"] {
        assert!(kinds_seen.contains(&k), "{k} in {kinds_seen:?}");
    }
    assert!(replayed.iter().all(|ev| ev["correlationId"] == uid.as_str()), "{replayed:#?}");
    let seen = ids(&replayed);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "increasing ids {seen:?}");
    assert_eq!(seen, ids(&from_first), "what the first process answered, nothing lost or added");

    // after= pages on, from any process; with the namespace, the same log.
    let (code, rest) = events(&second, &format!("{path}&after={}", seen[1])).await;
    assert_eq!(code, 200);
    assert_eq!(ids(&rest), seen[2..], "after= skips what was seen");
    let (_, in_ns) = events(&second, &format!("{path}&namespace={}", e.ns)).await;
    assert_eq!(ids(&in_ns), seen);
    let (code, _) = events(&second, &format!("{path}&namespace=Not..A..Namespace")).await;
    assert_eq!(code, 400, "a malformed namespace is refused");
    second.assert_no_panic();
}
