//! API requests that are never answered: a share of the operator's requests (all but watches)
//! is held forever, half before the API server sees it, half after it has acted on it. The
//! operator's time bound on requests (`--api-timeout`, `volt_operator::api_timeout`) must turn
//! each into an error that is retried; without it a pass, a status write or a pod create would
//! wait for good and its run would never finish.

use super::*;
use volt_operator::api_timeout::ApiTimeoutLayer;

/// The bound the operator runs with here (60 s by default).
const BOUND: Duration = Duration::from_secs(2);

/// The requests seen (all but watches), and those held.
#[derive(Default)]
struct Silence {
    requests: AtomicUsize,
    /// Held before the API server saw them.
    unsent: AtomicUsize,
    /// Done by the API server, their answer held.
    unanswered: AtomicUsize,
}

/// Holds a share (`rate`, seeded) of the requests for ever, half unsent and half unanswered.
fn silence(seed: u64, rate: f64) -> (Faults, Arc<Silence>) {
    let rng = Mutex::new(StdRng::seed_from_u64(seed));
    let counts = Arc::new(Silence::default());
    let seen = counts.clone();
    let faults = Faults::new(move |req| {
        if volt_operator::metrics::verb_of(req.method(), req.uri()) == "watch" {
            return Fault::Pass;
        }
        seen.requests.fetch_add(1, Ordering::Relaxed);
        let (hit, before) = {
            let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
            (rng.random_bool(rate), rng.random_bool(0.5))
        };
        match (hit, before) {
            (false, _) => Fault::Pass,
            (true, true) => {
                seen.unsent.fetch_add(1, Ordering::Relaxed);
                Fault::Unsent
            }
            (true, false) => {
                seen.unanswered.fetch_add(1, Ordering::Relaxed);
                Fault::Unanswered
            }
        }
    });
    (faults, counts)
}

/// Two runs of 27 steps (12 agent calls, 6 pods, templates and a child run) while one in eight
/// of the operator's requests gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_left_unanswered_are_retried_and_lose_nothing() {
    let test_started = Instant::now();
    let seed = seed("silence");
    let cp = kit::shared();
    let pods = (Duration::from_millis(100), Duration::from_millis(400));
    let Scene { client, ns, stub, ledger, watch, _kubelet } =
        Scene::start(cp, "chaos-silence", Duration::from_millis(100), pods).await;
    let child = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "child"},
        "spec": {"steps": [{"id": "ask", "agent": {"ref": "writer", "prompt": "{{ run.name }}/child"}}]}});
    apply(&client, &ns, child).await;

    // The operator in-process, as the operator user, its client behind the silence and the
    // operator's own bound, as `volt-operator run` builds it.
    let (faults, silence) = silence(seed, 1.0 / 8.0);
    let config = kit::kube_config(cp.operator_kubeconfig_path()).await;
    let metrics = volt_operator::metrics::Metrics::new();
    let counter = volt_operator::metrics::ApiCounterLayer { counter: Arc::new(metrics.api_requests.clone()) };
    let operator_client = kube::client::ClientBuilder::try_from(config)
        .expect("operator client")
        .with_layer(&faults)
        .with_layer(&ApiTimeoutLayer::new(Some(BOUND)).counting(metrics.api_timeouts.clone()))
        .with_layer(&counter)
        .build();
    let op = kit::in_process::Operator::start_on(&ns, operator_client, metrics, |args| {
        args.api_timeout = BOUND;
    })
    .await;

    let names: Vec<String> = vec!["quiet-0".into(), "quiet-1".into()];
    let items: Vec<u32> = (1..=12).collect();
    let pod_items: Vec<u32> = (1..=6).collect();
    let workflow = json!({"steps": [
        {"id": "list", "template": serde_json::to_string(&items).expect("json")},
        {"id": "fan", "dependsOn": ["list"], "forEach": "{{ steps.list.json }}", "maxParallel": 4,
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/fan[{{ index }}]: item {{ item }}"}},
        {"id": "pods", "dependsOn": ["list"], "forEach": serde_json::to_string(&pod_items).expect("json"), "maxParallel": 3,
         "container": container("{{ run.name }}-pod-{{ item }}")},
        {"id": "sub", "dependsOn": ["list"], "workflow": {"ref": "child"}},
        {"id": "join", "dependsOn": ["fan", "pods", "sub"], "template": "{{ steps.fan.json | length }} answers, {{ steps.pods.json | length }} pods"},
        {"id": "done", "dependsOn": ["join"], "template": "{{ steps.join.output }}!"}
    ]});
    for name in &names {
        apply(&client, &ns, run_obj(name, workflow.clone())).await;
    }

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let finals = all_finished(&runs, &names, Duration::from_secs(240)).await;
    for (name, s) in &finals {
        assert_eq!(s.phase, RunPhase::Succeeded, "{name}: {s:#?}");
        for (i, item) in items.iter().enumerate() {
            let row = step(s, &format!("fan[{i}]"));
            let expected = format!("llm: {name}/fan[{i}]: item {item}");
            assert_eq!((row.phase, row.output.as_deref()), (StepPhase::Succeeded, Some(expected.as_str())));
        }
        for i in 0..pod_items.len() {
            let row = step(s, &format!("pods[{i}]"));
            let expected = format!("{name}-pod-{}", i + 1);
            assert_eq!(row.output.as_deref(), Some(expected.as_str()), "{name}/pods[{i}]");
        }
        assert_eq!(step(s, "sub").phase, StepPhase::Succeeded, "{name}/sub");
        let done = format!("{} answers, {} pods!", items.len(), pod_items.len());
        assert_eq!(step(s, "done").output.as_deref(), Some(done.as_str()), "{name}");
    }
    // Every agent step was called; a step whose result was written is never called again, so
    // a repeat is a call whose result write went unanswered.
    let calls = calls_by_prompt(&stub.seen());
    assert_eq!(calls.len(), names.len() * (items.len() + 1), "every agent step called: {:?}", calls.keys());
    let repeated = calls.values().filter(|at| at.len() > 1).count();
    let pods = check_pods(&ledger.pods(), &finals);
    let versions = watch.check();

    let (requests, unsent, unanswered) = (
        silence.requests.load(Ordering::Relaxed),
        silence.unsent.load(Ordering::Relaxed),
        silence.unanswered.load(Ordering::Relaxed),
    );
    assert!(unsent >= 3 && unanswered >= 3, "only {unsent} + {unanswered} of {requests} requests held");
    // Each held request timed out once, unless its caller gave it up first (a pass dropped).
    let timeouts = kit::metrics::metric_sum(&op.metrics.render(), "volt_kube_api_timeouts_total") as usize;
    assert!(
        timeouts >= 1 && timeouts <= unsent + unanswered,
        "{timeouts} timeouts counted for {unsent} + {unanswered}"
    );
    drop(op);
    eprintln!(
        "[chaos] silence (seed {seed}): {} runs of {} steps Succeeded with {unsent} of {requests} requests \
         never sent and {unanswered} never answered (bound {BOUND:?}, {timeouts} timeouts counted); {} agent steps, {repeated} called again; \
         {pods} pods, none twice; {versions} run versions watched, no result lost; test took {:.1}s",
        finals.len(),
        finals.values().map(|s| s.steps.len()).sum::<usize>(),
        calls.len(),
        test_started.elapsed().as_secs_f64()
    );
}
