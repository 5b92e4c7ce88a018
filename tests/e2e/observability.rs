//! Events, stats and metrics end to end: the event log replays a run's events by correlation
//! id, Kubernetes Events land on the run, CloudEvents reach a sink, `/api/v1/stats` reports
//! component health, and `/metrics` passes `promtool check metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use volt_operator::api::{RunPhase, WorkflowRun};

use crate::kit::{self, Operator, control_plane, wait_for};

#[tokio::test]
async fn events_stats_and_metrics() {
    // A CloudEvents sink that records what it receives.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = {
        let received = received.clone();
        axum::Router::new().route(
            "/ce",
            axum::routing::post(move |body: axum::Json<Value>| {
                let received = received.clone();
                async move {
                    received.lock().expect("lock").push(body.0);
                    "ok"
                }
            }),
        )
    };
    let sink_url = format!("http://{}/ce", kit::serve(sink).await);

    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "obs").await;
    let op = Operator::start_with(&ns, |a| a.cloudevents_url = Some(sink_url.clone())).await;
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let pp = PatchParams::apply("test").force();
    let mk = |name: &str| {
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
        "spec": {"workflow": {"steps": [
            {"id": "a", "template": "x"},
            {"id": "b", "dependsOn": ["a"], "when": "false", "template": "y"},
            {"id": "c", "dependsOn": ["a"], "http": {"url": "http://127.0.0.1:9/nothing"}, "continueOnError": true}
        ]}}})
    };
    for name in ["obs-1", "obs-2"] {
        runs.patch(name, &pp, &Patch::Apply(&mk(name))).await.expect("run");
    }
    let mut uids = Vec::new();
    for name in ["obs-1", "obs-2"] {
        let r = wait_for(&runs, name, Duration::from_secs(60), |r| {
            r.status.as_ref().is_some_and(|s| s.phase.is_finished())
        })
        .await;
        assert_eq!(r.status.as_ref().map(|s| s.phase), Some(RunPhase::Succeeded), "{:#?}", r.status);
        uids.push(r.uid().expect("uid"));
    }

    let api =
        format!("http://{}", kit::serve(volt_operator::http::router(op.metrics.clone(), op.health.clone())).await);
    // The JSON API wants a token the cluster accepts: the admin's.
    let admin = control_plane::shared().admin_token().expect("the admin token of the test control plane");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {admin}").parse().expect("header"));
    let http = reqwest::Client::builder().default_headers(headers).build().expect("client");
    let anonymous = reqwest::Client::new();
    for path in ["/api/v1/events", "/api/v1/stats"] {
        let code = anonymous.get(format!("{api}{path}")).send().await.expect(path).status();
        assert_eq!(code, reqwest::StatusCode::UNAUTHORIZED, "{path} without a token");
    }

    // Replay: only obs-1's events, in order, from start to finish.
    let url = format!("{api}/api/v1/events?correlationId={}", uids[0]);
    let body: Value = http.get(&url).send().await.expect("events").json().await.expect("json");
    let events = body["events"].as_array().expect("events list").clone();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap_or_default()).collect();
    assert!(events.iter().all(|e| e["correlationId"] == uids[0].as_str()), "{events:#?}");
    assert_eq!(kinds.first(), Some(&"RunStarted"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"RunSucceeded"), "{kinds:?}");
    for k in ["StepSucceeded", "StepSkipped", "StepStarted", "StepFailed"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap_or_default()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ordered ids {ids:?}");
    let after = ids[1];
    let body: Value =
        http.get(format!("{url}&after={after}")).send().await.expect("events").json().await.expect("json");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(events.len() - 2), "after= skips what was seen");

    // Kubernetes Events: aggregated on the run object.
    let k8s: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = k8s.list(&ListParams::default()).await.expect("events");
        let on_run: Vec<&K8sEvent> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("obs-1"))
            .collect();
        if on_run.iter().any(|e| e.reason.as_deref() == Some("RunSucceeded")) {
            assert!(on_run.len() <= 6, "aggregated, not one per transition: {}", on_run.len());
            let uid = on_run[0].regarding.as_ref().and_then(|r| r.uid.clone());
            assert_eq!(uid.as_deref(), Some(uids[0].as_str()), "the run UID correlates");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no RunSucceeded event on obs-1: {:#?}", list.items);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // CloudEvents: structured, typed, correlated.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().expect("lock").clone();
        let done = got.iter().find(|e| e["type"] == "dev.volt.run.succeeded" && e["correlationid"] == uids[1].as_str());
        if let Some(e) = done {
            assert_eq!(e["specversion"], "1.0");
            assert!(e["source"].as_str().unwrap_or_default().ends_with("WorkflowRun/obs-2"), "{e}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no CloudEvent for obs-2: {got:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stats: component health from the watcher (interval 1 s in tests).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats: Value =
            http.get(format!("{api}/api/v1/stats")).send().await.expect("stats").json().await.expect("json");
        let comps = &stats["health"]["components"];
        if comps["apiserver"]["healthy"] == true {
            assert_eq!(comps[format!("controller/workflowrun/{ns}")]["healthy"], true, "{stats:#}");
            assert!(stats["runs"]["succeeded"].as_i64().is_some(), "{stats:#}");
            assert!(stats["cache"]["hitRate"].is_number(), "{stats:#}");
            assert_eq!(stats["health"]["status"], "healthy", "{stats:#}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "apiserver health never reported: {stats:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Metrics: the real exposition passes promtool's checks.
    let text = http.get(format!("{api}/metrics")).send().await.expect("metrics").text().await.expect("text");
    for name in [
        "volt_reconciles_total",
        "volt_steps_total",
        "volt_step_duration_seconds_bucket",
        "volt_cache_hits_total",
        "volt_kube_api_requests_total",
        "volt_reconcile_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by hack/control-plane.sh");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
