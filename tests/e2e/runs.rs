//! WorkflowRuns end to end: the operator in-process, pods completed by the kubelet stand-in.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use volt_operator::api::{RunPhase, StepPhase, WorkflowRunStatus, condition_status};

use crate::kit::{self, Env, Kubelet, Operator, container, run_obj, step, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// The stand-in for step pods ([`kit::kubelet::scripted`]): run for `run_for`, then succeed
/// with the container's `OUTPUT` env var as termination message, or fail when `FAIL_ATTEMPTS`
/// lists this attempt.
async fn kubelet(e: &Env, run_for: Duration) -> Kubelet {
    Kubelet::start(e.client.clone(), &e.ns, Some("volt.dev/run".into()), kit::kubelet::scripted(move |_| run_for))
}

async fn finished(e: &Env, name: &str) -> WorkflowRunStatus {
    e.finished(name, LONG).await
}

async fn pod_names(e: &Env) -> Vec<String> {
    let mut names: Vec<String> =
        e.pods.list(&ListParams::default()).await.expect("list pods").items.iter().map(|p| p.name_any()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn template_chain_passes_outputs_in_one_pass() {
    let e = Env::new("chain").await;
    let op = Operator::start(&e.ns).await;
    let wf = json!({
        "params": [{"name": "who", "default": "world"}],
        "steps": [
            {"id": "a", "template": "{\"greeting\": \"hello {{ params.who }}\"}"},
            {"id": "b", "dependsOn": ["a"], "template": "{{ steps.a.json.greeting | upper }}"},
            {"id": "c", "dependsOn": ["b"], "template": "{{ steps.b.output }}!"}
        ]
    });
    e.apply(run_obj("chain-1", wf)).await;
    let s = finished(&e, "chain-1").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "c").output.as_deref(), Some("HELLO WORLD!"));
    assert_eq!(s.progress, "3/3");
    assert_eq!(condition_status(&s.conditions, "Ready").map(|c| c.status.as_str()), Some("True"));
    assert!(s.started_at.is_some() && s.finished_at.is_some());
    let writes =
        op.api_requests("patch") + op.api_requests("create") + op.api_requests("update") + op.api_requests("delete");
    eprintln!("template chain: {writes} API writes for 3 steps (status patches and events)");
    // Its end written, the run is labelled finished: the operator's cache of active runs drops it.
    wait_for(&e.runs, "chain-1", LONG, |r| {
        r.labels().get("volt.dev/finished").map(String::as_str) == Some("Succeeded")
    })
    .await;
}

/// A step id with a hyphen (usual in Kubernetes names) is read as `steps['first-step']`, in a
/// template, a condition and a forEach, and the pod of a fan-out item is named from it.
#[tokio::test]
async fn hyphenated_step_ids_are_read_by_subscript() {
    let e = Env::new("hyphen").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(50)).await;
    let wf = json!({"steps": [
        {"id": "first-step", "template": "[1, 2]"},
        {"id": "fan-out", "dependsOn": ["first-step"], "forEach": "{{ steps['first-step'].json }}",
         "container": container("{{ item * 10 }}")},
        {"id": "sum-up", "dependsOn": ["fan-out"], "when": "steps['fan-out'].phase == 'Succeeded'",
         "template": "{{ steps[\"fan-out\"].json | map('int') | sum }}"}
    ]});
    e.apply(run_obj("hy", wf)).await;
    let s = finished(&e, "hy").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "sum-up").output.as_deref(), Some("30"));
    assert!(pod_names(&e).await.contains(&"hy-fan-out-1-1".to_string()), "{:?}", pod_names(&e).await);
}

#[tokio::test]
async fn container_diamond_creates_one_labelled_restricted_pod_per_step() {
    let e = Env::new("diamond").await;
    let op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(100)).await;
    let wf = json!({"steps": [
        {"id": "a", "container": container("1")},
        {"id": "b", "dependsOn": ["a"], "container": container("{{ steps.a.output | int + 1 }}")},
        {"id": "c", "dependsOn": ["a"], "container": container("{{ steps.a.output | int + 2 }}")},
        {"id": "d", "dependsOn": ["b", "c"], "template": "{{ steps.b.output }}+{{ steps.c.output }}"}
    ]});
    e.apply(run_obj("dia", wf)).await;
    let s = finished(&e, "dia").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "d").output.as_deref(), Some("2+3"));
    assert_eq!(pod_names(&e).await, ["dia-a-1", "dia-b-1", "dia-c-1"]);
    let (creates, patches) = (op.api_requests("create"), op.api_requests("patch"));
    eprintln!("diamond (3 pod steps + 1 template): {creates} creates (pods, events), {patches} patches (status)");
    let pod = e.pods.get("dia-b-1").await.expect("pod");
    let labels = pod.labels();
    assert_eq!(labels["volt.dev/run"], "dia");
    assert_eq!(labels["volt.dev/step"], "b");
    assert_eq!(labels["volt.dev/attempt"], "1");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "volt-operator");
    let run = e.runs.get("dia").await.expect("run");
    assert_eq!(pod.owner_references()[0].uid, run.uid().unwrap_or_default());
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.security_context.and_then(|s| s.run_as_non_root), Some(true));
    assert_eq!(spec.containers[0].security_context.as_ref().and_then(|s| s.allow_privilege_escalation), Some(false));
}

#[tokio::test]
async fn fan_out_respects_max_parallel_and_collects_outputs() {
    let e = Env::new("fanout").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(400)).await;
    let wf = json!({"steps": [
        {"id": "list", "template": "[\"a\", \"b\", \"c\", \"d\", \"e\"]"},
        {"id": "work", "dependsOn": ["list"], "forEach": "{{ steps.list.json }}", "maxParallel": 2,
         "container": container("done-{{ item }}")},
        {"id": "sum", "dependsOn": ["work"], "template": "{{ steps.work.json | join(',') }}"}
    ]});
    e.apply(run_obj("fan", wf)).await;
    let mut max_active = 0;
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let pods = e.pods.list(&ListParams::default()).await.expect("pods").items;
        let active = pods
            .iter()
            .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
            .count();
        max_active = max_active.max(active);
        let run = e.runs.get("fan").await.expect("run");
        if run.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "fan-out did not finish");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let s = finished(&e, "fan").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert!(max_active <= 2, "at most maxParallel=2 children at once, saw {max_active}");
    assert!(max_active >= 1);
    assert_eq!(step(&s, "work").items, Some(5));
    assert_eq!(step(&s, "sum").output.as_deref(), Some("done-a,done-b,done-c,done-d,done-e"));
    assert_eq!(pod_names(&e).await.len(), 5);
}

#[tokio::test]
async fn failed_attempts_are_retried_with_backoff_then_succeed() {
    let e = Env::new("retry").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(50)).await;
    let mut c = container("ok");
    c["env"].as_array_mut().expect("env").push(json!({"name": "FAIL_ATTEMPTS", "value": "1,2"}));
    let wf = json!({"steps": [{"id": "flaky", "container": c, "retry": {"limit": 3, "backoff": {"initialSeconds": 0.3, "factor": 2}}}]});
    let started = std::time::Instant::now();
    e.apply(run_obj("flaky", wf)).await;
    let s = finished(&e, "flaky").await;
    let elapsed = started.elapsed();
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let row = step(&s, "flaky");
    assert_eq!(row.attempts, 3);
    assert_eq!(row.output.as_deref(), Some("ok"));
    assert_eq!(pod_names(&e).await, ["flaky-flaky-1", "flaky-flaky-2", "flaky-flaky-3"]);
    // Backoff: two waits (0.3 s, then 0.6 s) separate the three attempts.
    assert!(elapsed >= Duration::from_millis(900), "two backoffs take at least 0.9 s, the run took {elapsed:?}");
}

#[tokio::test]
async fn a_failure_fails_the_run_and_finally_still_runs() {
    let e = Env::new("fail").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(50)).await;
    let mut bad = container("x");
    bad["env"].as_array_mut().expect("env").push(json!({"name": "FAIL_ATTEMPTS", "value": "1"}));
    let wf = json!({
        "steps": [
            {"id": "build", "container": bad},
            {"id": "deploy", "dependsOn": ["build"], "template": "never"},
            {"id": "tolerant", "template": "{{ nope }}", "continueOnError": true}
        ],
        "finally": [{"id": "report", "template": "run {{ run.phase }}; build {{ steps.build.phase }}"}]
    });
    let mut run = run_obj("f1", wf);
    // `nope` is not a known name: the workflow is invalid. Keep the run valid instead:
    run["spec"]["workflow"]["steps"][2]["template"] = json!("{{ params | length }}");
    e.apply(run).await;
    let s = finished(&e, "f1").await;
    assert_eq!(s.phase, RunPhase::Failed, "{s:#?}");
    assert!(s.message.contains("build"), "{}", s.message);
    assert!(step(&s, "build").message.contains("exited with code 3"), "{:?}", step(&s, "build"));
    assert_eq!(step(&s, "deploy").phase, StepPhase::Skipped);
    assert_eq!(step(&s, "report").output.as_deref(), Some("run Failed; build Failed"));
    assert_eq!(condition_status(&s.conditions, "Stalled").map(|c| c.status.as_str()), Some("True"));
    assert_eq!(condition_status(&s.conditions, "Ready").map(|c| c.status.as_str()), Some("False"));
}

#[tokio::test]
async fn step_timeout_deletes_the_pod_and_fails_the_step() {
    let e = Env::new("steptimeout").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(10)).await;
    let mut c = container("x");
    c["env"].as_array_mut().expect("env").push(json!({"name": "RUN_FOREVER", "value": "1"}));
    let wf = json!({"steps": [{"id": "slow", "container": c, "timeoutSeconds": 1}]});
    e.apply(run_obj("st", wf)).await;
    let s = finished(&e, "st").await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(step(&s, "slow").message.contains("timed out after 1s"), "{:?}", step(&s, "slow"));
    wait_for_no_pods(&e).await;
}

async fn wait_for_no_pods(e: &Env) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !pod_names(e).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "pods left: {:?}", pod_names(e).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn run_timeout_stops_everything() {
    let e = Env::new("runtimeout").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(10)).await;
    let mut c = container("x");
    c["env"].as_array_mut().expect("env").push(json!({"name": "RUN_FOREVER", "value": "1"}));
    let mut run = run_obj(
        "rt",
        json!({"steps": [{"id": "slow", "container": c}, {"id": "after", "dependsOn": ["slow"], "template": "x"}]}),
    );
    run["spec"]["timeoutSeconds"] = json!(2);
    e.apply(run).await;
    let s = finished(&e, "rt").await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(s.message.contains("run timed out"), "{}", s.message);
    assert_eq!(step(&s, "slow").phase, StepPhase::Cancelled);
    assert_eq!(step(&s, "after").phase, StepPhase::Cancelled);
    wait_for_no_pods(&e).await;
}

#[tokio::test]
async fn when_skips_a_step_and_its_dependents_still_run() {
    let e = Env::new("when").await;
    let _op = Operator::start(&e.ns).await;
    let wf = json!({
        "params": [{"name": "deploy", "default": "no"}],
        "steps": [
            {"id": "build", "template": "built"},
            {"id": "deploy", "dependsOn": ["build"], "when": "params.deploy == 'yes'", "template": "deployed"},
            {"id": "notify", "dependsOn": ["deploy"], "template": "deploy was {{ steps.deploy.phase }}"}
        ]
    });
    e.apply(run_obj("w1", wf)).await;
    let s = finished(&e, "w1").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "deploy").phase, StepPhase::Skipped);
    assert_eq!(step(&s, "notify").output.as_deref(), Some("deploy was Skipped"));
}

#[tokio::test]
async fn cancel_deletes_running_pods_and_runs_finally() {
    let e = Env::new("cancel").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(10)).await;
    let mut c = container("x");
    c["env"].as_array_mut().expect("env").push(json!({"name": "RUN_FOREVER", "value": "1"}));
    let wf = json!({"steps": [{"id": "long", "container": c}, {"id": "next", "dependsOn": ["long"], "template": "x"}],
                    "finally": [{"id": "cleanup", "template": "{{ run.phase }}"}]});
    e.apply(run_obj("c1", wf)).await;
    wait_for(&e.pods, "c1-long-1", LONG, |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .await;
    e.runs
        .patch("c1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .expect("cancel");
    let s = finished(&e, "c1").await;
    assert_eq!(s.phase, RunPhase::Cancelled, "{s:#?}");
    assert_eq!(step(&s, "long").phase, StepPhase::Cancelled, "{:?}", step(&s, "long"));
    assert_eq!(step(&s, "next").phase, StepPhase::Cancelled);
    assert_eq!(step(&s, "cleanup").output.as_deref(), Some("Cancelled"));
    wait_for_no_pods(&e).await;
}

#[tokio::test]
async fn suspend_holds_new_steps_until_resumed() {
    let e = Env::new("suspend").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(800)).await;
    let wf = json!({"steps": [{"id": "first", "container": container("1")}, {"id": "second", "dependsOn": ["first"], "container": container("2")}]});
    e.apply(run_obj("s1", wf)).await;
    wait_for(&e.pods, "s1-first-1", LONG, |_| true).await;
    e.runs
        .patch("s1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": true}})))
        .await
        .expect("suspend");
    wait_for(&e.runs, "s1", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Suspended)).await;
    // `first` finishes while suspended; `second` must not start.
    wait_for(&e.runs, "s1", LONG, |r| {
        r.status.as_ref().and_then(|s| s.steps.get("first")).is_some_and(|row| row.phase == StepPhase::Succeeded)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pod_names(&e).await, ["s1-first-1"], "no new pod while suspended");
    let s = e.runs.get("s1").await.expect("run").status.expect("status");
    assert_eq!(s.phase, RunPhase::Suspended);
    e.runs
        .patch("s1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": false}})))
        .await
        .expect("resume");
    let s = finished(&e, "s1").await;
    assert_eq!(s.phase, RunPhase::Succeeded);
    assert_eq!(step(&s, "second").output.as_deref(), Some("2"));
}

#[tokio::test]
async fn runs_queue_under_max_runs_and_start_by_priority() {
    let e = Env::new("queue").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(700)).await;
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "one-at-a-time"},
        "spec": {"concurrency": {"maxRuns": 1, "policy": "Queue"}, "steps": [{"id": "work", "container": container("w")}]}})).await;
    let mk = |name: &str, priority: i32| {
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
        "spec": {"workflowRef": {"name": "one-at-a-time"}, "priority": priority}})
    };
    e.apply(mk("q-first", 0)).await;
    wait_for(&e.runs, "q-first", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Running)).await;
    e.apply(mk("q-low", 0)).await;
    e.apply(mk("q-high", 10)).await;
    wait_for(&e.runs, "q-low", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Queued)).await;
    let high =
        wait_for(&e.runs, "q-high", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Queued)).await;
    assert!(high.status.expect("status").message.contains("maxRuns"));
    let mut finish_order = Vec::new();
    for name in ["q-first", "q-high", "q-low"] {
        let s = finished(&e, name).await;
        assert_eq!(s.phase, RunPhase::Succeeded, "{name}: {s:#?}");
        finish_order.push((s.started_at.expect("started").0, name));
    }
    finish_order.sort();
    let order: Vec<&str> = finish_order.iter().map(|(_, n)| *n).collect();
    assert_eq!(order, ["q-first", "q-high", "q-low"], "higher priority starts first");
    // Never two at once: each run's pod started after the previous one finished.
    let s_high = e.runs.get("q-high").await.expect("run").status.expect("s");
    let s_first = e.runs.get("q-first").await.expect("run").status.expect("s");
    assert!(s_high.started_at.expect("t").0 >= s_first.finished_at.expect("t").0);
}

#[tokio::test]
async fn a_1000_step_dag_completes_and_stays_small() {
    let e = Env::new("big").await;
    let op = Operator::start(&e.ns).await;
    let mut steps = Vec::new();
    for i in 0..1000usize {
        let deps: Vec<String> = [i / 2, i / 3]
            .iter()
            .filter(|&&d| d < i)
            .map(|d| format!("s{d}"))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        steps.push(json!({"id": format!("s{i}"), "dependsOn": deps, "template": format!("{i}")}));
    }
    e.apply(run_obj("big", json!({"steps": steps}))).await;
    let s = finished(&e, "big").await;
    assert_eq!(s.phase, RunPhase::Succeeded);
    assert_eq!(s.progress, "1000/1000");
    let size = serde_json::to_vec(&e.runs.get("big").await.expect("run")).expect("json").len();
    let writes = op.api_requests("patch") + op.api_requests("create");
    eprintln!("1000-step run: object {size} bytes, {writes} API writes");
    assert!(size < 512 * 1024, "a 1000-step run stays well under 1 MiB, got {size}");
}

#[tokio::test]
async fn large_outputs_go_to_a_configmap_owned_by_the_run() {
    let e = Env::new("bigout").await;
    let _op = Operator::start(&e.ns).await;
    let wf = json!({"steps": [
        {"id": "big", "template": "{% for i in range(2000) %}line {{ i }}\n{% endfor %}"},
        {"id": "count", "dependsOn": ["big"], "template": "{{ steps.big.output | length }}"}
    ]});
    e.apply(run_obj("bo", wf)).await;
    let s = finished(&e, "bo").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{}: {:?}", s.message, s.steps);
    let row = step(&s, "big");
    assert!(row.output.is_none(), "large output is not inline");
    let r = row.output_ref.clone().expect("outputRef");
    let cms: Api<ConfigMap> = Api::namespaced(e.client.clone(), &e.ns);
    let cm = cms.get(&r.config_map).await.expect("configmap");
    let data: BTreeMap<String, String> = cm.data.clone().expect("data");
    assert_eq!(data[&r.key].len() as u64, r.size);
    assert_eq!(step(&s, "count").output.as_deref(), Some(r.size.to_string().as_str()));
    let run = e.runs.get("bo").await.expect("run");
    assert_eq!(cm.owner_references()[0].uid, run.uid().unwrap_or_default());
}

#[tokio::test]
async fn an_operator_restart_neither_duplicates_pods_nor_reruns_steps() {
    let e = Env::new("restart").await;
    let op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(1500)).await;
    let wf = json!({"steps": [
        {"id": "one", "container": container("1")},
        {"id": "two", "dependsOn": ["one"], "container": container("2")},
        {"id": "three", "dependsOn": ["two"], "container": container("3")}
    ]});
    e.apply(run_obj("rs", wf)).await;
    wait_for(&e.runs, "rs", LONG, |r| {
        r.status.as_ref().and_then(|s| s.steps.get("two")).is_some_and(|row| row.phase == StepPhase::Running)
    })
    .await;
    op.stop().await;
    // While the operator is down, `two`'s pod finishes.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let _op = Operator::start(&e.ns).await;
    let s = finished(&e, "rs").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    for id in ["one", "two", "three"] {
        assert_eq!(step(&s, id).attempts, 1, "{id} ran once");
    }
    assert_eq!(pod_names(&e).await, ["rs-one-1", "rs-three-1", "rs-two-1"]);
}

#[tokio::test]
async fn a_deleted_pod_fails_its_step() {
    let e = Env::new("podgone").await;
    let _op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(10)).await;
    let mut c = container("x");
    c["env"].as_array_mut().expect("env").push(json!({"name": "RUN_FOREVER", "value": "1"}));
    e.apply(run_obj("pg", json!({"steps": [{"id": "victim", "container": c}]}))).await;
    wait_for(&e.pods, "pg-victim-1", LONG, |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .await;
    e.pods.delete("pg-victim-1", &Default::default()).await.expect("delete");
    let s = finished(&e, "pg").await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(step(&s, "victim").message.contains("deleted"), "{:?}", step(&s, "victim"));
}

#[tokio::test]
async fn http_steps_call_out_and_ttl_deletes_finished_runs() {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/status", get(|| async { axum::Json(json!({"healthy": true, "version": "1.2.3"})) }));
    let addr = kit::serve(app).await;
    let e = Env::new("http").await;
    let _op = Operator::start(&e.ns).await;
    let wf = json!({"steps": [
        {"id": "probe", "http": {"url": format!("http://{addr}/status")}},
        {"id": "report", "dependsOn": ["probe"], "template": "v{{ steps.probe.json.version }}"},
        {"id": "missing", "http": {"url": format!("http://{addr}/nope")}, "continueOnError": true}
    ]});
    let mut run = run_obj("h1", wf);
    run["spec"]["ttlSecondsAfterFinished"] = json!(2);
    e.apply(run).await;
    let s = finished(&e, "h1").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "report").output.as_deref(), Some("v1.2.3"));
    assert!(step(&s, "missing").message.contains("404"), "{:?}", step(&s, "missing"));
    // ttlSecondsAfterFinished: the run is deleted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while e.runs.get_opt("h1").await.expect("get").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "run not deleted after its TTL");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_operator_wide_limit_queues_runs_of_any_workflow() {
    let e = Env::new("globallimit").await;
    let _op = Operator::start_with(&e.ns, |a| a.max_concurrent_runs = 1).await;
    let _k = kubelet(&e, Duration::from_millis(600)).await;
    let wf = || json!({"steps": [{"id": "work", "container": container("w")}]});
    e.apply(run_obj("g1", wf())).await;
    wait_for(&e.runs, "g1", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Running)).await;
    e.apply(run_obj("g2", wf())).await;
    let g2 = wait_for(&e.runs, "g2", LONG, |r| r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Queued)).await;
    assert!(g2.status.expect("status").message.contains("concurrent runs"));
    let s1 = finished(&e, "g1").await;
    let s2 = finished(&e, "g2").await;
    assert_eq!((s1.phase, s2.phase), (RunPhase::Succeeded, RunPhase::Succeeded));
    assert!(s2.started_at.expect("t").0 >= s1.finished_at.expect("t").0, "g2 started after g1 finished");
}

#[tokio::test]
async fn step_progress_of_pod_steps_shares_status_writes_and_events() {
    let e = Env::new("coalesce").await;
    let op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(50)).await;
    let steps: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            let deps: Vec<String> = if i == 0 { vec![] } else { vec![format!("s{}", i - 1)] };
            json!({"id": format!("s{i}"), "dependsOn": deps, "container": container(&format!("out-{i}"))})
        })
        .collect();
    e.apply(run_obj("chain8", json!({"steps": steps}))).await;
    let s = finished(&e, "chain8").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    for i in 0..8 {
        let row = step(&s, &format!("s{i}"));
        assert_eq!(row.output.as_deref(), Some(format!("out-{i}").as_str()), "nothing is lost while it waits");
        assert_eq!(row.phase, StepPhase::Succeeded);
    }
    let writes = op.metrics.status_writes.with_label_values(&["WorkflowRun"]).get();
    let deferred = op.metrics.status_writes_deferred.get();
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(e.client.clone(), &e.ns);
    let on_run = events.list(&ListParams::default()).await.expect("events").items.len();
    eprintln!("8 pod steps in a chain: {writes} status writes ({deferred} changes deferred), {on_run} Events");
    assert!(deferred > 0, "step progress waits to share a write");
    assert!(writes < 8, "8 pod steps must take fewer than 8 status writes, took {writes}");
    assert!(on_run < 8, "8 pod steps must take fewer than 8 Events, took {on_run}");
}

#[tokio::test]
async fn progress_that_waits_is_written_within_the_flush_interval() {
    let e = Env::new("flush").await;
    let op = Operator::start(&e.ns).await;
    let _k = kubelet(&e, Duration::from_millis(50)).await;
    let long = json!({"image": "busybox", "env": [{"name": "RUN_FOREVER", "value": "1"}]});
    let wf = json!({"steps": [
        {"id": "a", "container": container("first")},
        {"id": "b", "dependsOn": ["a"], "container": long}
    ]});
    e.apply(run_obj("f1", wf)).await;
    // a's success and b's start wait (same phase), then are written: no other change wakes
    // the run while b runs forever.
    let run = wait_for(&e.runs, "f1", Duration::from_secs(10), |r| {
        r.status.as_ref().is_some_and(|s| {
            s.steps.get("a").is_some_and(|a| a.phase == StepPhase::Succeeded)
                && s.steps.get("b").is_some_and(|b| b.phase == StepPhase::Running && b.pod.is_some())
        })
    })
    .await;
    assert_eq!(run.status.and_then(|s| s.steps.get("a").and_then(|a| a.output.clone())).as_deref(), Some("first"));
    assert!(op.metrics.status_writes_deferred.get() > 0, "the progress waited before it was written");
    e.runs
        .patch("f1", &PatchParams::default(), &Patch::Merge(json!({"spec": {"cancel": true}})))
        .await
        .expect("cancel");
    let s = finished(&e, "f1").await;
    assert_eq!(s.phase, RunPhase::Cancelled);
}
