//! Step memoization end to end: a second run of the same workflow hits the cache, and the
//! cache survives an operator restart through its ConfigMap tier.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use volt_operator::api::{RunPhase, WorkflowRun, WorkflowRunStatus};

use crate::kit::kubelet::{Kubelet, PodPlan, behaviour};
use crate::kit::{self, Operator, control_plane};

async fn finished(runs: &Api<WorkflowRun>, name: &str) -> WorkflowRunStatus {
    kit::run_finished(runs, name, Duration::from_secs(60)).await
}

#[tokio::test]
async fn a_second_run_hits_the_cache_even_after_a_restart() {
    use axum::extract::State;
    use axum::routing::get;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/item/{n}",
            get(|State(calls): State<Arc<AtomicUsize>>, axum::extract::Path(n): axum::extract::Path<u32>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                format!("item {n}")
            }),
        )
        .with_state(calls.clone());
    let addr = kit::serve(app).await;

    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "cache").await;
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let _k = Kubelet::start(
        client.clone(),
        &ns,
        Some("volt.dev/run".into()),
        behaviour(|_p: &Pod| PodPlan::succeed("127.0.0.1", "built").run_for(Duration::from_millis(50))),
    );
    let cached = json!({"enabled": true, "ttlSeconds": 600});
    let wf = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "memo"}, "spec": {
    "params": [{"name": "n", "default": 4}],
    "steps": [
        {"id": "list", "template": "{{ range(params.n) | list | tojson }}"},
        {"id": "fetch", "dependsOn": ["list"], "forEach": "{{ steps.list.json }}", "cache": cached,
         "http": {"url": format!("http://{addr}/item/{{{{ item }}}}")}},
        {"id": "build", "dependsOn": ["fetch"], "cache": cached,
         "container": {"image": "busybox", "command": ["sh", "-c", "true"], "env": [{"name": "IN", "value": "{{ steps.fetch.output }}"}]}},
        {"id": "summary", "dependsOn": ["build"], "template": "{{ steps.fetch.json | length }} items, {{ steps.build.output }}"}
    ]}});
    let pp = PatchParams::apply("test").force();
    let wf_api: Api<volt_operator::api::Workflow> = Api::namespaced(client.clone(), &ns);
    wf_api.patch("memo", &pp, &Patch::Apply(&wf)).await.expect("workflow");
    let run = |name: &str| {
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
        "spec": {"workflowRef": {"name": "memo"}}})
    };

    let op = Operator::start(&ns).await;
    runs.patch("m1", &pp, &Patch::Apply(&run("m1"))).await.expect("run 1");
    let s1 = finished(&runs, "m1").await;
    assert_eq!(s1.phase, RunPhase::Succeeded, "{s1:#?}");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(s1.steps.values().all(|r| !r.cached));
    let pods_after_first = pods.list(&ListParams::default()).await.expect("pods").items.len();
    assert_eq!(pods_after_first, 1);

    // Second run: every cacheable step (4 fetches and the build) comes from the cache.
    runs.patch("m2", &pp, &Patch::Apply(&run("m2"))).await.expect("run 2");
    let s2 = finished(&runs, "m2").await;
    assert_eq!(s2.phase, RunPhase::Succeeded, "{s2:#?}");
    let cacheable: Vec<&str> = vec!["fetch[0]", "fetch[1]", "fetch[2]", "fetch[3]", "build"];
    let hits = cacheable.iter().filter(|k| s2.steps.get(**k).is_some_and(|r| r.cached)).count();
    eprintln!("second run: {hits}/{} cacheable steps from the cache", cacheable.len());
    assert!(hits * 100 >= cacheable.len() * 80, "at least 80% of cacheable steps hit, got {hits}/{}", cacheable.len());
    assert_eq!(calls.load(Ordering::SeqCst), 4, "no new HTTP calls");
    assert_eq!(pods.list(&ListParams::default()).await.expect("pods").items.len(), 1, "no new pod");
    assert_eq!(s2.steps["summary"].output, s1.steps["summary"].output);
    assert!(s2.steps["fetch"].cached, "a fan-out whose children all hit is cached");
    let c = op.health.cache.get().expect("cache").counts();
    assert!(c.hits >= 5, "{c:?}");
    op.stop().await;

    // The cache outlives the operator: a new one loads it from the ConfigMaps.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let shards = cms.list(&ListParams::default().labels("volt.dev/cache=steps")).await.expect("shards").items;
    let persisted: usize = shards.iter().map(|c| c.data.as_ref().map_or(0, |d| d.len())).sum();
    assert_eq!(persisted, 5, "five results persisted");
    let op = Operator::start(&ns).await;
    runs.patch("m3", &pp, &Patch::Apply(&run("m3"))).await.expect("run 3");
    let s3 = finished(&runs, "m3").await;
    assert_eq!(s3.phase, RunPhase::Succeeded);
    assert!(cacheable.iter().all(|k| s3.steps[*k].cached), "{:#?}", s3.steps);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    drop(op);
}
