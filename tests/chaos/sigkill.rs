//! The operator process SIGKILLed at random moments during twenty runs.

use super::*;

const RUNS: usize = 20;
const KILLS: usize = 5;
/// Runs designed to fail: their `flaky` step fails every attempt.
const FAILING: [usize; 2] = [7, 16];
const ITEMS: [&str; 3] = ["api", "engine", "ui"];
const SUITES: [&str; 2] = ["unit", "e2e"];

/// fetch (pod) -> plan (agent) -> build (3 pods, forEach) and flaky (a pod that fails its first
/// attempt, or every attempt) -> review (agent) -> test (2 pods) -> summary (agent) -> report
/// (template): about 7 s with no crash.
fn chaos_workflow(fails: bool) -> Value {
    json!({"steps": [
        {"id": "fetch", "container": container("{{ run.name }}-fetched")},
        {"id": "plan", "dependsOn": ["fetch"],
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/plan: {{ steps.fetch.output }}"}},
        {"id": "build", "dependsOn": ["plan"], "forEach": serde_json::to_string(&ITEMS).expect("json"),
         "container": container("{{ run.name }}-built-{{ item }}")},
        {"id": "flaky", "dependsOn": ["plan"], "retry": {"limit": 2, "backoff": {"initialSeconds": 0.2}},
         "container": container_failing("{{ run.name }}-flaky", if fails { "1,2,3" } else { "1" })},
        {"id": "review", "dependsOn": ["build", "flaky"],
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/review: {{ steps.build.output }} {{ steps.flaky.output }}"}},
        {"id": "test", "dependsOn": ["review"], "forEach": serde_json::to_string(&SUITES).expect("json"),
         "container": container("{{ run.name }}-tested-{{ item }}")},
        {"id": "summary", "dependsOn": ["review", "test"],
         "agent": {"ref": "writer", "prompt": "{{ run.name }}/summary: {{ steps.review.output }}"}},
        {"id": "report", "dependsOn": ["summary"], "template": "{{ steps.summary.output }}"}
    ]})
}

/// One SIGKILL: when, what the killed process had written (succeeded steps, read just before),
/// and when that process had started.
struct Kill {
    at: Instant,
    process_started: Instant,
    succeeded: BTreeMap<(String, String), StepStatus>,
}

/// The right end state of a run of [`chaos_workflow`].
fn check_chaos_run(name: &str, s: &WorkflowRunStatus, fails: bool) {
    let llm = |prompt: String| format!("llm: {prompt}");
    assert_eq!(step(s, "fetch").output.as_deref(), Some(format!("{name}-fetched").as_str()), "{name}");
    assert_eq!(step(s, "plan").output, Some(llm(format!("{name}/plan: {name}-fetched"))), "{name}");
    for (i, item) in ITEMS.iter().enumerate() {
        let row = step(s, &format!("build[{i}]"));
        assert_eq!(row.output.as_deref(), Some(format!("{name}-built-{item}").as_str()), "{name} build[{i}]");
        assert_eq!(row.attempts, 1, "{name} build[{i}] ran once");
    }
    for key in ["fetch", "plan"] {
        assert_eq!(step(s, key).attempts, 1, "{name}/{key}: one attempt, crashes or not");
    }
    let flaky = step(s, "flaky");
    if fails {
        assert_eq!(s.phase, RunPhase::Failed, "{name}: {s:#?}");
        assert_eq!((flaky.phase, flaky.attempts), (StepPhase::Failed, 3), "{name}: {flaky:#?}");
        assert!(flaky.message.contains("attempt 3 failed on purpose"), "{name}: {}", flaky.message);
        for key in ["review", "test", "summary", "report"] {
            let row = s.steps.get(key);
            assert!(row.is_none_or(|r| r.output.is_none() && r.attempts == 0), "{name}/{key} ran: {row:#?}");
        }
        return;
    }
    assert_eq!(s.phase, RunPhase::Succeeded, "{name}: {s:#?}");
    assert_eq!((flaky.attempts, flaky.output.as_deref()), (2, Some(format!("{name}-flaky").as_str())), "{name}");
    let build = step(s, "build").output.clone().unwrap_or_default();
    let built: Vec<String> =
        serde_json::from_str(&build).unwrap_or_else(|e| panic!("{name}: build output {build}: {e}"));
    assert_eq!(built, ITEMS.iter().map(|i| format!("{name}-built-{i}")).collect::<Vec<_>>());
    let review = llm(format!("{name}/review: {build} {name}-flaky"));
    assert_eq!(step(s, "review").output.as_deref(), Some(review.as_str()), "{name}");
    for (i, suite) in SUITES.iter().enumerate() {
        let row = step(s, &format!("test[{i}]"));
        assert_eq!(row.output.as_deref(), Some(format!("{name}-tested-{suite}").as_str()), "{name} test[{i}]");
        assert_eq!(row.attempts, 1, "{name} test[{i}] ran once");
    }
    let summary = llm(format!("{name}/summary: {review}"));
    assert_eq!(step(s, "summary").output.as_deref(), Some(summary.as_str()), "{name}");
    assert_eq!(step(s, "report").output.as_deref(), Some(summary.as_str()), "{name}");
    for key in ["review", "summary"] {
        assert_eq!(step(s, key).attempts, 1, "{name}/{key}: one attempt, crashes or not");
    }
    assert_eq!(s.progress, format!("{0}/{0}", s.steps.len() - ITEMS.len() - SUITES.len()), "{name}");
}

/// SIGKILL of the operator process at random moments during 20 concurrent runs, then a restart,
/// five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_during_twenty_runs() {
    let test_started = Instant::now();
    let seed = seed("sigkill");
    let mut rng = StdRng::seed_from_u64(seed);
    let cp = kit::shared();
    let pods = (Duration::from_millis(200), Duration::from_millis(700));
    let Scene { client, ns, stub, ledger, watch, _kubelet } = Scene::start(cp, "chaos-kill", SLOW_CALL, pods).await;
    let dir = LogDir::new("chaos-sigkill");
    let mut logs = vec![dir.join("operator-1.log")];
    let mut op = start_operator(cp, &ns, logs[0].clone());
    let first_ready = op.wait_ready(Duration::from_secs(60)).await;

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = (0..RUNS).map(|i| format!("run-{i:02}")).collect();
    let started = Instant::now();
    // Created 250 ms apart, so that the runs are not in lockstep: at any moment some are calling
    // their agent, some have pods running, some are between the two.
    let creating = tokio::spawn({
        let (client, ns, names) = (client.clone(), ns.clone(), names.clone());
        async move {
            for (i, name) in names.iter().enumerate() {
                apply(&client, &ns, run_obj(name, chaos_workflow(FAILING.contains(&i)))).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    // Kill moments: kill k at a random moment (seeded) of the k-th of five 2.2 s slots from 0.5 s
    // to 11.5 s after the first run was created (later if the operator is still starting): the
    // runs, created over 5 s, take at least 6.5 s each (three agent calls and three rounds of
    // pods), so every kill lands while runs are under way, at any point of their steps.
    let slot = Duration::from_millis(2200);
    let mut kills: Vec<Kill> = Vec::new();
    let mut restarts: Vec<Duration> = Vec::new();
    for k in 1..=KILLS {
        let offset = Duration::from_millis(rng.random_range(0..slot.as_millis() as u64));
        let down = Duration::from_millis(rng.random_range(0..=500));
        let due = started + Duration::from_millis(500) + slot * (k as u32 - 1) + offset;
        let extra = due.saturating_duration_since(Instant::now());
        tokio::time::sleep(extra).await;
        op.assert_alive(&format!("before kill {k}"));
        let (succeeded, unfinished) = snapshot(&runs, &names).await;
        assert!(unfinished > 0, "every run finished before kill {k}: the kills come too late to test anything");
        let status = op.sigkill().await;
        let at = Instant::now();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "the operator died of SIGKILL: {status}");
        let in_flight =
            stub.seen().iter().filter(|s| s.at >= op.started() && s.at <= at && s.at + SLOW_CALL > at).count();
        eprintln!(
            "[chaos] kill {k} at {:.2}s ({unfinished} runs unfinished, {} steps succeeded, {in_flight} agent calls \
             in flight); down for {:.2}s",
            at.duration_since(started).as_secs_f64(),
            succeeded.len(),
            down.as_secs_f64()
        );
        kills.push(Kill { at, process_started: op.started(), succeeded });
        tokio::time::sleep(down).await;
        logs.push(dir.join(format!("operator-{}.log", k + 1)));
        op = start_operator(cp, &ns, logs[k].clone());
        restarts.push(op.wait_ready(Duration::from_secs(60)).await);
    }

    creating.await.expect("create the runs");
    let finals = all_finished(&runs, &names, Duration::from_secs(180)).await;
    let finished_in = started.elapsed();
    op.assert_alive("after the runs");

    // One pod per step attempt, ever.
    let pods = check_pods(&ledger.pods(), &finals);

    // Every run reached the right end state, with the right outputs.
    for (i, name) in names.iter().enumerate() {
        check_chaos_run(name, &finals[name], FAILING.contains(&i));
    }

    // Finished steps are not run again: what was Succeeded before a kill is the same at the end,
    // and a watch of every version never saw a result lost or rewritten.
    for (k, kill) in kills.iter().enumerate() {
        for ((run, key), before) in &kill.succeeded {
            let after = step(&finals[run], key);
            assert_eq!(
                (after.phase, after.attempts, &after.finished_at, &after.output),
                (before.phase, before.attempts, &before.finished_at, &before.output),
                "{run}/{key} changed after kill {}",
                k + 1
            );
        }
    }
    let versions = watch.check();

    // Agent calls: each agent step that ran was called; a call was made again only across a
    // crash (at-least-once), never for a step already succeeded, and no more often than there
    // were calls left unrecorded by the killed processes.
    let seen = stub.seen();
    let calls = calls_by_prompt(&seen);
    let agent_steps: usize = finals
        .values()
        .map(|s| {
            s.steps
                .iter()
                .filter(|(k, r)| ["plan", "review", "summary"].contains(&k.as_str()) && r.phase == StepPhase::Succeeded)
                .count()
        })
        .sum();
    assert_eq!(calls.len(), agent_steps, "one prompt per agent step that ran: {:#?}", calls.keys());
    let mut repeats = 0;
    for (prompt, at) in &calls {
        let (run, key) = prompt_step(prompt);
        for pair in at.windows(2) {
            let across = kills.iter().any(|k| pair[0] <= k.at && k.at <= pair[1]);
            assert!(across, "{run}/{key} was called twice with no crash in between: {pair:?}");
        }
        repeats += at.len() - 1;
        for (k, kill) in kills.iter().enumerate() {
            if kill.succeeded.contains_key(&(run.clone(), key.clone())) {
                let after: Vec<_> = at.iter().filter(|t| **t > kill.at).collect();
                assert!(after.is_empty(), "{run}/{key} succeeded before kill {} yet was called again", k + 1);
            }
        }
    }
    let unrecorded: usize = kills
        .iter()
        .map(|kill| {
            calls
                .iter()
                .filter(|(prompt, _)| !kill.succeeded.contains_key(&prompt_step(prompt)))
                .filter(|(_, at)| at.iter().any(|t| *t >= kill.process_started && *t <= kill.at))
                .count()
        })
        .sum();
    assert!(repeats <= unrecorded, "{repeats} repeated calls, but only {unrecorded} were unrecorded at the kills");
    assert!(unrecorded > 0, "no kill landed while agent calls were under way: the test did not test anything");
    kit::logs::assert_no_panic(&logs);

    let failed = finals.values().filter(|s| s.phase == RunPhase::Failed).count();
    eprintln!(
        "[chaos] sigkill (seed {seed}): {RUNS} runs ({} Succeeded, {failed} Failed as designed) with {} steps, \
         {KILLS} SIGKILLs, restarts ready in {:.2}s..{:.2}s (first start {:.2}s); runs finished {:.1}s after \
         creation; {pods} pods for {pods} step attempts, none twice; {} agent calls for {} agent steps \
         ({repeats} repeated after a crash, of {unrecorded} calls unrecorded at the kills); {versions} run \
         versions watched, no result lost or rewritten; test took {:.1}s",
        RUNS - failed,
        finals.values().map(|s| s.steps.len()).sum::<usize>(),
        restarts.iter().min().unwrap_or(&Duration::ZERO).as_secs_f64(),
        restarts.iter().max().unwrap_or(&Duration::ZERO).as_secs_f64(),
        first_ready.as_secs_f64(),
        finished_in.as_secs_f64(),
        seen.len(),
        calls.len(),
        test_started.elapsed().as_secs_f64()
    );
}
