//! Figures for docs/real-node.md: a container step's time from the run's creation to its output
//! in the run's status, on the real node, split into what the operator adds (before the pod
//! exists, and after the kubelet reports it finished) and what the scheduler and the kubelet
//! take. Timestamps come from watches in this process (Kubernetes' own are whole seconds).
//!
//! `VOLT_NODE_SAMPLES=n` sets the number of runs (10 by default; the docs used 40). The table
//! is printed and written to `target/node-figures.json`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use volt_operator::api::WorkflowRun;

use crate::cluster::{self, apply, operator, percentile};
use crate::kit;

/// When this process first saw each moment of a run.
#[derive(Default, Clone, Debug)]
struct Marks {
    created: Option<Instant>,
    pod: Option<Instant>,
    bound: Option<Instant>,
    done: Option<Instant>,
    output: Option<Instant>,
    text: Option<String>,
}

type Seen = Arc<Mutex<HashMap<String, Marks>>>;

fn mark(seen: &Seen, run: &str, f: impl FnOnce(&mut Marks)) {
    let mut map = seen.lock().unwrap_or_else(|p| p.into_inner());
    f(map.entry(run.to_string()).or_default());
}

fn secs(a: Option<Instant>, b: Option<Instant>) -> f64 {
    match (a, b) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => f64::NAN,
    }
}

#[tokio::test]
async fn figures_real_pod_start_to_step_output() {
    let node = cluster::shared();
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "node-figures").await;
    let logs = kit::LogDir::new(&ns);
    let _op = operator(&ns, &logs).await;
    let samples: usize = std::env::var("VOLT_NODE_SAMPLES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    apply(
        &ns,
        &format!(
            "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {{name: one}}\nspec:\n  steps:\n  \
             - {{id: out, container: {{image: {}, command: [sh, -c, 'echo done > /dev/termination-log']}}}}\n",
            node.images.busybox
        ),
    );

    let seen: Seen = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_watch = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut stream = watcher(pods, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(pod)) = stream.next().await {
                let now = Instant::now();
                let Some(run) = pod.metadata.labels.as_ref().and_then(|l| l.get("volt.dev/run")).cloned() else {
                    continue;
                };
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                mark(&seen, &run, |m| {
                    m.pod.get_or_insert(now);
                    if bound {
                        m.bound.get_or_insert(now);
                    }
                    if phase == "Succeeded" {
                        m.done.get_or_insert(now);
                    }
                });
            }
        })
    };
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let run_watch = {
        let seen = seen.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            let mut stream = watcher(runs, watcher::Config::default()).applied_objects().boxed();
            while let Some(Ok(run)) = stream.next().await {
                let now = Instant::now();
                let name = run.metadata.name.clone().unwrap_or_default();
                if let Some(out) = run.status.as_ref().and_then(|s| s.steps.get("out")).and_then(|r| r.output.clone()) {
                    mark(&seen, &name, |m| {
                        m.output.get_or_insert(now);
                        m.text.get_or_insert(out);
                    });
                }
            }
        })
    };
    // The watches are running once they have listed.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One warm-up run, then the samples, one at a time.
    for i in 0..=samples {
        let name = format!("f{i}");
        let run: WorkflowRun = serde_json::from_value(serde_json::json!({
            "apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": name}, "spec": {"workflowRef": {"name": "one"}}
        }))
        .expect("a run");
        // Created when the API server has it: the mark is taken just before the request.
        mark(&seen, &name, |m| m.created = Some(Instant::now()));
        runs.create(&PostParams::default(), &run).await.expect("create the run");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let m = seen.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned().unwrap_or_default();
            if m.output.is_some() && m.done.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "run {name}: no output after 90 s: {m:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    pod_watch.abort();
    run_watch.abort();

    let marks: Vec<Marks> = {
        let map = seen.lock().unwrap_or_else(|p| p.into_inner());
        (1..=samples).map(|i| map[&format!("f{i}")].clone()).collect()
    };
    for m in &marks {
        assert_eq!(m.text.as_deref().map(str::trim), Some("done"), "{m:?}");
    }
    let column = |f: &dyn Fn(&Marks) -> f64| marks.iter().map(f).collect::<Vec<f64>>();
    let rows: Vec<(&str, Vec<f64>)> = vec![
        ("run created -> output in status (total)", column(&|m| secs(m.created, m.output))),
        ("  operator: run created -> pod created", column(&|m| secs(m.created, m.pod))),
        ("  scheduler: pod created -> bound", column(&|m| secs(m.pod, m.bound))),
        ("  kubelet: bound -> Succeeded reported", column(&|m| secs(m.bound, m.done))),
        ("  operator: Succeeded -> output in status", column(&|m| secs(m.done, m.output))),
        ("operator's share (before + after)", column(&|m| secs(m.created, m.pod) + secs(m.done, m.output))),
        ("scheduler + kubelet share", column(&|m| secs(m.pod, m.done))),
    ];
    let mut table = format!("[node] {samples} container steps, one at a time (seconds):\n");
    table.push_str(&format!("{:<44} {:>7} {:>7} {:>7}\n", "", "p50", "p95", "max"));
    let mut json = serde_json::Map::new();
    for (label, values) in &rows {
        let (p50, p95, max) = (percentile(values, 50.0), percentile(values, 95.0), percentile(values, 100.0));
        table.push_str(&format!("{label:<44} {p50:>7.3} {p95:>7.3} {max:>7.3}\n"));
        json.insert(label.trim().to_string(), serde_json::json!({"p50": p50, "p95": p95, "max": max}));
    }
    eprintln!("{table}");
    json.insert("samples".into(), samples.into());
    let path = kit::repo("target/node-figures.json");
    let _ = std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default());

    let total = &rows[0].1;
    assert!(total.iter().all(|t| t.is_finite()), "every run has all its moments: {marks:?}");
    assert!(percentile(total, 95.0) < 30.0, "{table}");
    // Nothing of the namespace is left running (the pods finished).
    let left = Api::<Pod>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.expect("pods");
    assert!(
        left.items.iter().all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")),
        "every step pod Succeeded"
    );
}
