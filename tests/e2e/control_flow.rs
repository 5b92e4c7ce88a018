//! Control flow in the cluster: loops (pods per iteration), approvals decided by patching the
//! run, waits, and the workflow's `spec.output`.

use std::time::Duration;

use kube::ResourceExt;
use kube::api::ListParams;
use serde_json::json;
use volt_operator::api::{RunPhase, StepPhase};

use crate::kit::{self, Env, Kubelet, Operator, container, kubectl, run_obj, step, wait_for};

const LONG: Duration = Duration::from_secs(90);

#[tokio::test]
async fn a_loop_of_pods_an_approval_by_patch_and_a_wait_run_to_the_workflow_output() {
    let e = Env::new("flow").await;
    let _op = Operator::start(&e.ns).await;
    let _kubelet = Kubelet::start(
        e.client.clone(),
        &e.ns,
        Some("volt.dev/run".into()),
        kit::kubelet::scripted(|_| Duration::from_millis(200)),
    );
    let wf = json!({
        "output": "{{ steps.rounds.output }} x{{ steps.rounds.iterations }}: {{ steps['sign-off'].output }}",
        "steps": [
            {"id": "rounds", "loop": {
                "maxIterations": 5,
                "until": "steps.review.output == 'round 3'",
                "steps": [
                    {"id": "code", "container": container("round {{ loop.iteration }}")},
                    {"id": "review", "dependsOn": ["code"], "template": "{{ steps.code.output }}"}
                ]
            }},
            {"id": "cool-down", "dependsOn": ["rounds"], "wait": {"seconds": 1}},
            {"id": "sign-off", "dependsOn": ["cool-down"],
             "approval": {"message": "Ship {{ steps.rounds.output }}?", "timeoutSeconds": 600}}
        ]
    });
    e.apply(run_obj("flow-1", wf)).await;
    let r = wait_for(&e.runs, "flow-1", LONG, |r| {
        r.status.as_ref().is_some_and(|s| s.steps.get("sign-off").is_some_and(|x| x.phase == StepPhase::Waiting))
    })
    .await;
    let s = r.status.unwrap_or_default();
    assert_eq!(s.phase, RunPhase::Running);
    assert_eq!(s.message, "waiting for approval: sign-off");
    assert_eq!(step(&s, "sign-off").message, "Ship round 3?");
    assert_eq!(step(&s, "rounds").iterations, Some(3));
    for n in 1..=3 {
        assert_eq!(step(&s, &format!("rounds.{n}.code")).phase, StepPhase::Succeeded);
        assert_eq!(step(&s, &format!("rounds.{n}.review")).output.as_deref(), Some(format!("round {n}").as_str()));
    }
    let mut pods: Vec<String> =
        e.pods.list(&ListParams::default()).await.expect("pods").items.iter().map(|p| p.name_any()).collect();
    pods.sort();
    assert_eq!(pods, ["flow-1-rounds-1-code-1", "flow-1-rounds-2-code-1", "flow-1-rounds-3-code-1"]);
    // The wide view shows what the run waits for.
    let wide = kubectl(&["get", "wfr", "flow-1", "-n", &e.ns, "-o", "wide"]);
    assert!(wide.stdout.contains("waiting for approval: sign-off"), "{}", wide.stdout);

    // Approving is a patch of the run: no operator rights needed.
    let patch = r#"{"spec":{"decisions":{"sign-off":{"decision":"Approve","comment":"ship it","by":"ada"}}}}"#;
    let ran = kubectl(&["patch", "wfr", "flow-1", "-n", &e.ns, "--type", "merge", "-p", patch]);
    assert!(ran.ok, "{}", ran.stderr);
    let s = e.finished("flow-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "sign-off").output.as_deref(), Some("ship it"));
    assert_eq!(step(&s, "sign-off").message, "approved by ada");
    assert_eq!(s.output.as_deref(), Some("round 3 x3: ship it"));
    let events = kubectl(&["get", "events", "-n", &e.ns, "-o", "jsonpath={.items[*].message}"]);
    assert!(events.stdout.contains("waiting"), "a Waiting event: {}", events.stdout);
}

#[tokio::test]
async fn a_rejection_fails_the_run_and_cancel_stops_a_loop_mid_iteration() {
    let e = Env::new("flow-reject").await;
    let _op = Operator::start(&e.ns).await;
    let _kubelet = Kubelet::start(
        e.client.clone(),
        &e.ns,
        Some("volt.dev/run".into()),
        kit::kubelet::scripted(|_| Duration::from_secs(600)),
    );
    let wf = json!({"steps": [
        {"id": "ok", "approval": {}},
        {"id": "after", "dependsOn": ["ok"], "template": "x"}
    ]});
    let mut run = run_obj("reject-1", wf);
    run["spec"]["decisions"] = json!({"ok": {"decision": "Reject", "comment": "no", "by": "bob"}});
    e.apply(run).await;
    let s = e.finished("reject-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert_eq!(step(&s, "ok").message, "rejected by bob: no");
    assert_eq!(step(&s, "after").phase, StepPhase::Skipped);

    // Decisions for unknown steps fail the run, naming the key.
    let mut run = run_obj("reject-2", json!({"steps": [{"id": "a", "template": "x"}]}));
    run["spec"]["decisions"] = json!({"nope": {"decision": "Approve"}});
    e.apply(run).await;
    let s = e.finished("reject-2", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(s.message.contains("spec.decisions: \"nope\" is not an approval step"), "{}", s.message);

    // Cancel inside an iteration deletes the iteration's pod.
    let wf = json!({"steps": [{"id": "l", "loop": {"maxIterations": 3, "until": "true",
        "steps": [{"id": "slow", "container": container("x")}]}}]});
    e.apply(run_obj("cancel-1", wf)).await;
    wait_for(&e.runs, "cancel-1", LONG, |r| {
        r.status.as_ref().is_some_and(|s| s.steps.get("l.1.slow").is_some_and(|x| x.phase == StepPhase::Running))
    })
    .await;
    let ran =
        kubectl(&["patch", "wfr", "cancel-1", "-n", &e.ns, "--type", "merge", "-p", r#"{"spec":{"cancel":true}}"#]);
    assert!(ran.ok, "{}", ran.stderr);
    let s = e.finished("cancel-1", LONG).await;
    assert_eq!(s.phase, RunPhase::Cancelled);
    assert_eq!(step(&s, "l").phase, StepPhase::Cancelled);
    assert_eq!(step(&s, "l.1.slow").phase, StepPhase::Cancelled);
    let gone = async {
        loop {
            let pods = e.pods.list(&ListParams::default()).await.expect("pods");
            if pods.items.iter().all(|p| p.metadata.deletion_timestamp.is_some()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(LONG, gone).await.expect("the iteration's pod is deleted");
}

#[tokio::test]
async fn a_loop_of_100_iterations_keeps_the_run_object_small() {
    let e = Env::new("flow-long").await;
    let _op = Operator::start(&e.ns).await;
    // Two steps of 3 KB each per iteration: 600 KB inline over 100 iterations.
    let wf = json!({
        "output": "{{ steps.rounds.iterations }}",
        "steps": [{"id": "rounds", "loop": {
            "maxIterations": 100,
            "until": "loop.iteration == 100",
            "steps": [
                {"id": "draft", "template": "{{ 'x' * 3000 }}{{ loop.iteration }}"},
                {"id": "check", "dependsOn": ["draft"], "template": "{{ steps.draft.output | length }}{{ 'y' * 3000 }}"}
            ]
        }}]
    });
    e.apply(run_obj("long-1", wf)).await;
    let s = e.finished("long-1", Duration::from_secs(300)).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{}", s.message);
    assert_eq!(s.output.as_deref(), Some("100"));
    let run = e.runs.get("long-1").await.expect("the run");
    let size = serde_json::to_vec(&run).expect("json").len();
    assert!(size < 512 * 1024, "the run object is {size} bytes");
    let old = step(&s, "rounds.1.draft");
    assert!(old.output.is_none() && old.output_ref.is_some(), "settled iterations' outputs are in ConfigMaps: {old:?}");
    assert!(step(&s, "rounds.100.check").output.as_deref().is_some_and(|o| o.starts_with("3003")));
    eprintln!("[e2e] a loop of 100 iterations: run object {size} bytes");
}
