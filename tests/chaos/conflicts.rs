//! Status writes answered 409 Conflict, and another writer on the same runs.

use super::*;

/// The status writes seen and those answered 409.
#[derive(Default)]
struct Conflicts {
    writes: AtomicUsize,
    injected: AtomicUsize,
}

/// Answers a share (`rate`, seeded) of the WorkflowRun status writes with 409 Conflict (as the
/// apiserver words it), without sending them: the write did not happen.
fn conflicts(seed: u64, rate: f64) -> (Faults, Arc<Conflicts>) {
    let rng = Mutex::new(StdRng::seed_from_u64(seed));
    let counts = Arc::new(Conflicts::default());
    let seen = counts.clone();
    let faults = Faults::new(move |req| {
        let path = req.uri().path();
        if req.method() != http::Method::PATCH || !path.contains("/workflowruns/") || !path.ends_with("/status") {
            return Fault::Pass;
        }
        seen.writes.fetch_add(1, Ordering::Relaxed);
        if !rng.lock().unwrap_or_else(|p| p.into_inner()).random_bool(rate) {
            return Fault::Pass;
        }
        seen.injected.fetch_add(1, Ordering::Relaxed);
        Fault::Answer(conflict_response(path))
    });
    (faults, counts)
}

fn conflict_response(path: &str) -> http::Response<Body> {
    let name = path.trim_end_matches("/status").rsplit('/').next().unwrap_or_default();
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("Operation cannot be fulfilled on workflowruns.volt.dev \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
        "reason": "Conflict", "details": {"name": name, "group": "volt.dev", "kind": "workflowruns"}, "code": 409});
    let full = http_body_util::Full::new(bytes::Bytes::from(status.to_string()));
    let body = http_body_util::BodyExt::map_err(full, |never| -> tower::BoxError { match never {} });
    http::Response::builder()
        .status(409)
        .header("content-type", "application/json")
        .body(Box::new(body) as Body)
        .expect("a 409 response")
}

/// Two runs of many steps (40 agent calls fanned out, 12 pods, templates) while a third of the
/// operator's status writes get 409 Conflict and another client keeps writing the same object:
/// its labels and annotations, and a condition of its own in the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_conflicts_and_other_writers_lose_nothing() {
    let test_started = Instant::now();
    let seed = seed("conflicts");
    let cp = kit::shared();
    let pods = (Duration::from_millis(100), Duration::from_millis(400));
    let Scene { client, ns, stub, ledger, watch, _kubelet } =
        Scene::start(cp, "chaos-conflict", Duration::from_millis(100), pods).await;

    // The operator in-process, as the operator user, its client behind the fault layer.
    let (faults, conflicts) = conflicts(seed, 1.0 / 3.0);
    let config = kit::kube_config(cp.operator_kubeconfig_path()).await;
    let metrics = volt_operator::metrics::Metrics::new();
    let counter = volt_operator::metrics::ApiCounterLayer { counter: Arc::new(metrics.api_requests.clone()) };
    let operator_client = kube::client::ClientBuilder::try_from(config)
        .expect("operator client")
        .with_layer(&counter)
        .with_layer(&faults)
        .build();
    // Every change written (no coalescing), so that many writes meet the injected conflicts.
    let op = kit::in_process::Operator::start_on(&ns, operator_client, metrics, |args| {
        args.status_flush_interval = Duration::ZERO;
    })
    .await;

    let names: Vec<String> = vec!["many-0".into(), "many-1".into()];
    let items: Vec<u32> = (1..=40).collect();
    let pod_items: Vec<u32> = (1..=12).collect();
    let workflow = json!({"steps": [
        {"id": "list", "template": serde_json::to_string(&items).expect("json")},
        {"id": "fan", "dependsOn": ["list"], "forEach": "{{ steps.list.json }}", "maxParallel": 4,
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/fan[{{ index }}]: item {{ item }}"}},
        {"id": "pods", "dependsOn": ["list"], "forEach": serde_json::to_string(&pod_items).expect("json"), "maxParallel": 3,
         "container": container("{{ run.name }}-pod-{{ item }}")},
        {"id": "join", "dependsOn": ["fan", "pods"], "template": "{{ steps.fan.json | length }} answers, {{ steps.pods.json | length }} pods"},
        {"id": "done", "dependsOn": ["join"], "template": "{{ steps.join.output }}!"}
    ]});
    for name in &names {
        apply(&client, &ns, run_obj(name, workflow.clone())).await;
    }

    // The other writer: labels and annotations (merge patches), and its own condition in the
    // status (server-side apply as manager "auditor", without force: a 409 here means the
    // operator took the auditor's field).
    let stop = Arc::new(AtomicBool::new(false));
    let other = tokio::spawn({
        let (client, ns, names, stop) = (client.clone(), ns.clone(), names.clone(), stop.clone());
        async move {
            let runs: Api<WorkflowRun> = Api::namespaced(client, &ns);
            let mut tick = 0u64;
            let mut refused = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick += 1;
                for name in &names {
                    let meta = json!({"metadata": {"labels": {"chaos/tick": tick.to_string()},
                                                   "annotations": {"chaos/tick": tick.to_string()}}});
                    runs.patch(name, &PatchParams::default(), &Patch::Merge(&meta)).await.expect("patch metadata");
                    let status = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun",
                        "status": {"conditions": [{"type": "Audited", "status": "True", "reason": "Tick",
                            "message": format!("tick {tick}"), "lastTransitionTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()}]}});
                    match runs.patch_status(name, &PatchParams::apply("auditor"), &Patch::Apply(&status)).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 409 => {
                            refused.push(format!("{name} tick {tick}: {}", e.message))
                        }
                        Err(e) => panic!("auditor apply: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (tick, refused)
        }
    });

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let finals = all_finished(&runs, &names, Duration::from_secs(120)).await;
    stop.store(true, Ordering::Relaxed);
    let (ticks, refused) = other.await.expect("the other writer");
    assert!(refused.is_empty(), "the auditor's own condition was taken by the operator: {refused:#?}");

    for (name, s) in &finals {
        assert_eq!(s.phase, RunPhase::Succeeded, "{name}: {s:#?}");
        for (i, item) in items.iter().enumerate() {
            let row = step(s, &format!("fan[{i}]"));
            let expected = format!("llm: {name}/fan[{i}]: item {item}");
            assert_eq!((row.phase, row.output.as_deref()), (StepPhase::Succeeded, Some(expected.as_str())));
            assert_eq!(row.attempts, 1, "{name}/fan[{i}]");
        }
        for i in 0..pod_items.len() {
            let row = step(s, &format!("pods[{i}]"));
            let expected = format!("{name}-pod-{}", i + 1);
            assert_eq!((row.output.as_deref(), row.attempts), (Some(expected.as_str()), 1), "{name}/pods[{i}]");
        }
        let done = format!("{} answers, {} pods!", items.len(), pod_items.len());
        assert_eq!(step(s, "done").output.as_deref(), Some(done.as_str()), "{name}");
    }
    // Each agent step was called once: no result was dropped with a refused write.
    let calls = calls_by_prompt(&stub.seen());
    let repeated: Vec<_> = calls.iter().filter(|(_, at)| at.len() > 1).map(|(p, at)| (p, at.len())).collect();
    assert!(repeated.is_empty(), "agent calls repeated after a 409: {repeated:#?}");
    assert_eq!(calls.len(), names.len() * items.len());
    let pods = check_pods(&ledger.pods(), &finals);
    let versions = watch.check();

    // The other writer's fields are its own: its last tick stays, and removing its condition
    // removes it (the operator does not hold on to it).
    let audited = |run: &WorkflowRun| {
        run.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Audited").map(|c| c.message.clone()))
    };
    for name in &names {
        let run = runs.get(name).await.expect("get run");
        assert_eq!(audited(&run), Some(format!("tick {ticks}")), "{name}: the auditor's last write");
        assert_eq!(run.labels().get("chaos/tick"), Some(&ticks.to_string()));
        assert_eq!(run.annotations().get("chaos/tick"), Some(&ticks.to_string()));
        let release = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "status": {}});
        runs.patch_status(name, &PatchParams::apply("auditor"), &Patch::Apply(&release)).await.expect("release");
        // A change the operator reconciles (it must not bring the condition back).
        let meta = json!({"metadata": {"annotations": {"chaos/released": "true"}}});
        runs.patch(name, &PatchParams::default(), &Patch::Merge(&meta)).await.expect("patch");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for name in &names {
        let run = runs.get(name).await.expect("get run");
        assert_eq!(audited(&run), None, "{name}: the auditor removed its condition, yet it is there");
        let s = run.status.unwrap_or_default();
        assert_eq!((s.phase, s.steps.len()), (finals[name].phase, finals[name].steps.len()), "{name}");
    }

    let injected = conflicts.injected.load(Ordering::Relaxed);
    let writes = conflicts.writes.load(Ordering::Relaxed);
    assert!(injected >= 3, "only {injected} conflicts injected in {writes} status writes");
    drop(op);
    eprintln!(
        "[chaos] conflicts (seed {seed}): {} runs of {} steps Succeeded with {injected} of {writes} status \
         writes answered 409 and {ticks} rounds of another writer (labels, annotations, a status condition); \
         {} agent calls, none repeated; {pods} pods, none twice; {versions} run versions watched, no result \
         lost, the other writer's condition never went back; test took {:.1}s",
        finals.len(),
        finals.values().map(|s| s.steps.len()).sum::<usize>(),
        calls.len(),
        test_started.elapsed().as_secs_f64()
    );
}
