//! Fault injection against a real control plane (issue 9), a suite of its own (`make chaos`,
//! `cargo test --test chaos`): its control plane is not the end-to-end suite's, and the outage
//! test starts one more of its own, since it stops the apiserver.
//!
//! - [`sigkill_at_random_moments_during_twenty_runs`]: the operator, a real OS process under its
//!   non-admin identity and the chart's RBAC, is killed with SIGKILL at random moments (seeded)
//!   during 20 concurrent runs mixing pod and agent steps, and started again, several times.
//! - [`apiserver_stopped_for_30s_mid_run`]: kube-apiserver (of a control plane of its own) is
//!   stopped for 30 s while runs are in the middle of pod and agent steps, then started again.
//! - [`status_conflicts_and_other_writers_lose_nothing`]: a third of the operator's status writes
//!   are answered 409 Conflict, while another client patches the run's labels and annotations and
//!   applies a condition of its own to the run's status.
//!
//! What every test checks, from the outside: each run's end state and outputs; a watch of every
//! pod created in the namespace (deleted ones too) shows one pod per step attempt; a watch of the
//! runs shows that a step result, once written, is never lost or rewritten; the OpenAI stub's
//! log shows which agent calls were made twice, and each such repeat is explained by a crash.
//!
//! `VOLT_CHAOS_SEED=<n>` replays a seed; each test prints the one it used.

#[path = "kit/mod.rs"]
mod kit;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use volt_operator::api::{RunPhase, StepPhase, StepStatus, WorkflowRun, WorkflowRunStatus};
use volt_operator::kube_util::WatchBackoff;

use kit::kubelet::{Behaviour, Kubelet};
use kit::openai::{Seen, Stub};
use kit::{
    ControlPlane, LogDir, OperatorProcess, container, container_failing, grant_operator, run_obj, step, wait_until,
};

/// Latency of every agent call in the SIGKILL test: long enough that kills land mid-call.
const SLOW_CALL: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------------
// Setup

fn seed(test: &str) -> u64 {
    let seed = std::env::var("VOLT_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("[chaos] {test}: seed {seed} (VOLT_CHAOS_SEED={seed} replays it)");
    seed
}

async fn apply(client: &Client, ns: &str, obj: Value) {
    kit::apply_as(client, ns, obj, "chaos").await;
}

fn agent(name: &str, base_url: &str) -> Value {
    kit::endpoint_agent(name, base_url, json!({"maxConcurrency": 64, "timeoutSeconds": 60}))
}

/// The kubelet stand-in's plan for step pods ([`kit::kubelet::scripted`]): Running at once, then
/// after a run time between `min` and `max` (fixed per pod name) Succeeded with `OUTPUT`, or
/// Failed when `FAIL_ATTEMPTS` lists the pod's attempt.
fn step_pods(min: Duration, max: Duration) -> Behaviour {
    kit::kubelet::scripted(move |pod: &Pod| {
        let spread = (max - min).as_millis().max(1) as u64;
        let hash = pod.name_any().bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        min + Duration::from_millis(hash % spread)
    })
}

/// `volt-operator run` as the operator user (the kubeconfig of `cp`), watching `ns`, logging to
/// `log`; not yet ready.
fn start_operator(cp: &ControlPlane, ns: &str, log: PathBuf) -> OperatorProcess {
    OperatorProcess::builder(cp.operator_kubeconfig_path(), log)
        .namespaces(&[ns])
        .args(["--health-check-interval", "1", "--metrics-interval", "1", "--log-level", "info"])
        .spawn()
}

// ---------------------------------------------------------------------------------------------
// Watches that see everything

/// One pod as the ledger first saw it.
#[derive(Clone, Debug)]
struct PodSeen {
    uid: String,
    name: String,
    run: String,
    key: String,
    attempt: u32,
    deleted: bool,
}

/// Every pod created in a namespace, from a watch started before the first run: ADDED events
/// are recorded by UID, so a pod deleted (and perhaps made again under the same name) still
/// counts.
struct PodLedger {
    pods: Arc<Mutex<BTreeMap<String, PodSeen>>>,
    task: JoinHandle<()>,
}

impl PodLedger {
    async fn start(client: Client, ns: &str) -> PodLedger {
        let pods: Arc<Mutex<BTreeMap<String, PodSeen>>> = Arc::default();
        let ready = Arc::new(AtomicBool::new(false));
        let api: Api<Pod> = Api::namespaced(client, ns);
        let task = tokio::spawn({
            let (pods, ready) = (pods.clone(), ready.clone());
            async move {
                let mut events =
                    std::pin::pin!(watcher(api, watcher::Config::default()).backoff(WatchBackoff::default()));
                while let Some(event) = events.next().await {
                    let (pod, deleted) = match event {
                        Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                        Ok(watcher::Event::Delete(p)) => (p, true),
                        Ok(watcher::Event::InitDone) => {
                            ready.store(true, Ordering::Relaxed);
                            continue;
                        }
                        _ => continue,
                    };
                    let Some(uid) = pod.uid() else { continue };
                    let label = |k: &str| pod.labels().get(k).cloned().unwrap_or_default();
                    let mut pods = pods.lock().unwrap_or_else(|p| p.into_inner());
                    let seen = pods.entry(uid.clone()).or_insert_with(|| PodSeen {
                        uid,
                        name: pod.name_any(),
                        run: label("volt.dev/run"),
                        key: pod.annotations().get("volt.dev/step-key").cloned().unwrap_or_default(),
                        attempt: label("volt.dev/attempt").parse().unwrap_or(0),
                        deleted: false,
                    });
                    seen.deleted |= deleted;
                }
            }
        });
        wait_until("the pod ledger's watch", Duration::from_secs(30), || async {
            ready.load(Ordering::Relaxed).then_some(())
        })
        .await;
        PodLedger { pods, task }
    }

    fn pods(&self) -> Vec<PodSeen> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

impl Drop for PodLedger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks the ledger against the runs' final status: one pod per (run, step key, attempt), no
/// name used twice, and for every pod step attempts 1..=N each have their pod. Returns the
/// number of pods.
fn check_pods(ledger: &[PodSeen], finals: &BTreeMap<String, WorkflowRunStatus>) -> usize {
    let mut by_attempt: BTreeMap<(String, String, u32), Vec<&PodSeen>> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in ledger {
        assert!(!p.run.is_empty() && !p.key.is_empty() && p.attempt > 0, "a pod without volt labels: {p:?}");
        by_attempt.entry((p.run.clone(), p.key.clone(), p.attempt)).or_default().push(p);
        by_name.entry(&p.name).or_default().insert(&p.uid);
    }
    let doubles: Vec<_> = by_attempt.iter().filter(|(_, pods)| pods.len() > 1).collect();
    assert!(doubles.is_empty(), "step attempts with two pods: {doubles:#?}");
    let reused: Vec<_> = by_name.iter().filter(|(_, uids)| uids.len() > 1).collect();
    assert!(reused.is_empty(), "pod names created twice: {reused:#?}");
    let deleted: Vec<_> = ledger.iter().filter(|p| p.deleted).collect();
    assert!(deleted.is_empty(), "pods deleted during the runs: {deleted:#?}");
    for (run, key, attempt) in by_attempt.keys() {
        let row = finals.get(run).and_then(|s| s.steps.get(key));
        let known = row.map_or(0, |r| r.attempts);
        // One more than the status knows: a pod made by a pass whose status write a crash
        // prevented, for a step the run then never started again (it failed meanwhile).
        assert!(*attempt <= known + 1, "pod of {run}/{key} attempt {attempt}, but the step has {known} attempts");
    }
    for (run, status) in finals {
        for (key, row) in &status.steps {
            if row.pod.is_none() || !row.phase.is_finished() {
                continue;
            }
            let pods: BTreeSet<u32> =
                by_attempt.keys().filter(|(r, k, _)| r == run && k == key).map(|(_, _, a)| *a).collect();
            let expected: BTreeSet<u32> = (1..=row.attempts).collect();
            assert_eq!(pods, expected, "pods of {run}/{key} by attempt, against its {} attempts", row.attempts);
        }
    }
    ledger.len()
}

/// What a watch of the runs saw, per run, checked on every version: a succeeded step stays
/// succeeded with the same attempt count, finish time and output (a result is never lost or
/// rewritten), and the condition `Audited` another writer keeps on the status never goes back
/// to an older tick.
/// A succeeded step as a version of its run shows it: attempts, finishedAt, output.
type StepResult = (u32, String, Option<String>);

#[derive(Default)]
struct History {
    /// run -> succeeded steps in the latest version seen.
    succeeded: BTreeMap<String, BTreeMap<String, StepResult>>,
    audited: BTreeMap<String, u64>,
    versions: usize,
    violations: Vec<String>,
}

struct RunWatch {
    history: Arc<Mutex<History>>,
    task: JoinHandle<()>,
}

impl RunWatch {
    async fn start(client: Client, ns: &str) -> RunWatch {
        let history: Arc<Mutex<History>> = Arc::default();
        let ready = Arc::new(AtomicBool::new(false));
        let api: Api<WorkflowRun> = Api::namespaced(client, ns);
        let task = tokio::spawn({
            let (history, ready) = (history.clone(), ready.clone());
            async move {
                let mut events =
                    std::pin::pin!(watcher(api, watcher::Config::default()).backoff(WatchBackoff::default()));
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::Apply(run) | watcher::Event::InitApply(run)) => {
                            history.lock().unwrap_or_else(|p| p.into_inner()).observe(&run)
                        }
                        Ok(watcher::Event::InitDone) => ready.store(true, Ordering::Relaxed),
                        _ => {}
                    }
                }
            }
        });
        wait_until("the runs watch", Duration::from_secs(30), || async { ready.load(Ordering::Relaxed).then_some(()) })
            .await;
        RunWatch { history, task }
    }

    fn check(&self) -> usize {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        assert!(h.violations.is_empty(), "lost or rewritten updates seen by a watch: {:#?}", h.violations);
        h.versions
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl History {
    fn observe(&mut self, run: &WorkflowRun) {
        self.versions += 1;
        let name = run.name_any();
        let rv = run.resource_version().unwrap_or_default();
        let status = run.status.clone().unwrap_or_default();
        let now: BTreeMap<String, StepResult> = status
            .steps
            .iter()
            .filter(|(_, row)| row.phase == StepPhase::Succeeded)
            .map(|(k, row)| {
                let at = row.finished_at.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
                (k.clone(), (row.attempts, at, row.output.clone()))
            })
            .collect();
        if let Some(before) = self.succeeded.get(&name) {
            for (key, was) in before {
                match now.get(key) {
                    None => self.violations.push(format!(
                        "{name}@{rv}: step {key} was Succeeded {was:?}, now {:?}",
                        status.steps.get(key).map(|r| r.phase)
                    )),
                    Some(is) if is != was => {
                        self.violations.push(format!("{name}@{rv}: step {key} was Succeeded {was:?}, now {is:?}"))
                    }
                    _ => {}
                }
            }
        }
        self.succeeded.insert(name.clone(), now);
        if let Some(tick) = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Audited")
            .and_then(|c| c.message.strip_prefix("tick ")?.parse::<u64>().ok())
        {
            let last = self.audited.insert(name.clone(), tick).unwrap_or(0);
            if tick < last {
                self.violations.push(format!("{name}@{rv}: condition Audited went back from tick {last} to {tick}"));
            }
        }
    }
}

/// Waits until every run in `names` has finished; their statuses.
async fn all_finished(
    runs: &Api<WorkflowRun>,
    names: &[String],
    timeout: Duration,
) -> BTreeMap<String, WorkflowRunStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut finals = BTreeMap::new();
        for name in names {
            if let Ok(Some(run)) = runs.get_opt(name).await
                && let Some(status) = run.status.filter(|s| s.phase.is_finished())
            {
                finals.insert(name.clone(), status);
            }
        }
        if finals.len() == names.len() {
            return finals;
        }
        if Instant::now() > deadline {
            let pending: Vec<&String> = names.iter().filter(|n| !finals.contains_key(*n)).collect();
            let mut detail = String::new();
            for name in &pending {
                if let Ok(Some(run)) = runs.get_opt(name).await {
                    detail.push_str(&format!("\n{name}: {:#?}", run.status.map(|s| (s.phase, s.message, s.steps))));
                }
            }
            panic!("runs not finished after {timeout:?}: {pending:?}{detail}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Agent calls by prompt, each with the instants it was received.
fn calls_by_prompt(seen: &[Seen]) -> BTreeMap<String, Vec<Instant>> {
    let mut calls: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    for s in seen {
        calls.entry(s.user.clone()).or_default().push(s.at);
    }
    for at in calls.values_mut() {
        at.sort();
    }
    calls
}

/// The (run, step) of a prompt written as `{{ run.name }}/<step>: ...`.
fn prompt_step(prompt: &str) -> (String, String) {
    let head = prompt.split_once(": ").map_or(prompt, |(h, _)| h);
    let (run, step) = head.split_once('/').unwrap_or((head, ""));
    (run.to_string(), step.to_string())
}

// ---------------------------------------------------------------------------------------------
// SIGKILL

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

async fn succeeded_steps(runs: &Api<WorkflowRun>, names: &[String]) -> BTreeMap<(String, String), StepStatus> {
    snapshot(runs, names).await.0
}

/// The succeeded steps of the runs, and how many runs have not finished.
async fn snapshot(runs: &Api<WorkflowRun>, names: &[String]) -> (BTreeMap<(String, String), StepStatus>, usize) {
    let mut out = BTreeMap::new();
    let mut unfinished = 0;
    for name in names {
        let status = runs.get_opt(name).await.expect("get run").and_then(|r| r.status).unwrap_or_default();
        unfinished += usize::from(!status.phase.is_finished());
        for (key, row) in status.steps {
            if row.phase == StepPhase::Succeeded {
                out.insert((name.clone(), key), row);
            }
        }
    }
    (out, unfinished)
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
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chaos-kill").await;
    grant_operator(&client, &ns).await;
    let stub = Stub::start("llm", SLOW_CALL).await;
    apply(&client, &ns, agent("writer", &stub.base_url())).await;
    let ledger = PodLedger::start(client.clone(), &ns).await;
    let watch = RunWatch::start(client.clone(), &ns).await;
    let _kubelet = Kubelet::start(
        client.clone(),
        &ns,
        Some("volt.dev/run".into()),
        step_pods(Duration::from_millis(200), Duration::from_millis(700)),
    );
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

// ---------------------------------------------------------------------------------------------
// Apiserver outage

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
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chaos-outage").await;
    grant_operator(&client, &ns).await;
    let stub = Stub::start("llm", Duration::from_millis(1500)).await;
    apply(&client, &ns, agent("writer", &stub.base_url())).await;
    let ledger = PodLedger::start(client.clone(), &ns).await;
    let watch = RunWatch::start(client.clone(), &ns).await;
    let _kubelet = Kubelet::start(
        client.clone(),
        &ns,
        Some("volt.dev/run".into()),
        step_pods(Duration::from_millis(1500), Duration::from_millis(2500)),
    );
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
    let finals = all_finished(&runs, &names, Duration::from_secs(120)).await;
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

// ---------------------------------------------------------------------------------------------
// Conflicts and other writers

/// Answers a share of the WorkflowRun status writes that pass through it with 409 Conflict
/// (as the apiserver words it), without sending them: the write did not happen.
#[derive(Clone)]
struct Conflicts {
    rng: Arc<Mutex<StdRng>>,
    rate: f64,
    writes: Arc<AtomicUsize>,
    injected: Arc<AtomicUsize>,
}

impl<S> tower::Layer<S> for Conflicts {
    type Service = ConflictService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ConflictService { inner, faults: self.clone() }
    }
}

#[derive(Clone)]
struct ConflictService<S> {
    inner: S,
    faults: Conflicts,
}

type Body = Box<kube::client::DynBody>;

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

impl<S> tower::Service<http::Request<kube::client::Body>> for ConflictService<S>
where
    S: tower::Service<http::Request<kube::client::Body>, Response = http::Response<Body>, Error = tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        if req.method() == http::Method::PATCH && path.contains("/workflowruns/") && path.ends_with("/status") {
            self.faults.writes.fetch_add(1, Ordering::Relaxed);
            let hit = self.faults.rng.lock().unwrap_or_else(|p| p.into_inner()).random_bool(self.faults.rate);
            if hit {
                self.faults.injected.fetch_add(1, Ordering::Relaxed);
                return Box::pin(futures::future::ready(Ok(conflict_response(&path))));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

/// Two runs of many steps (40 agent calls fanned out, 12 pods, templates) while a third of the
/// operator's status writes get 409 Conflict and another client keeps writing the same object:
/// its labels and annotations, and a condition of its own in the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_conflicts_and_other_writers_lose_nothing() {
    let test_started = Instant::now();
    let seed = seed("conflicts");
    let cp = kit::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "chaos-conflict").await;
    grant_operator(&client, &ns).await;
    let stub = Stub::start("llm", Duration::from_millis(100)).await;
    apply(&client, &ns, agent("writer", &stub.base_url())).await;
    let ledger = PodLedger::start(client.clone(), &ns).await;
    let watch = RunWatch::start(client.clone(), &ns).await;
    let _kubelet = Kubelet::start(
        client.clone(),
        &ns,
        Some("volt.dev/run".into()),
        step_pods(Duration::from_millis(100), Duration::from_millis(400)),
    );

    // The operator in-process, as the operator user, its client behind the fault layer.
    let conflicts = Conflicts {
        rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
        rate: 1.0 / 3.0,
        writes: Arc::default(),
        injected: Arc::default(),
    };
    let config = kit::kube_config(cp.operator_kubeconfig_path()).await;
    let metrics = volt_operator::metrics::Metrics::new();
    let counter = volt_operator::metrics::ApiCounterLayer { counter: Arc::new(metrics.api_requests.clone()) };
    let operator_client = kube::client::ClientBuilder::try_from(config)
        .expect("operator client")
        .with_layer(&counter)
        .with_layer(&conflicts)
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
