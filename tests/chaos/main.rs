//! Fault injection against a real control plane (issue 9), a suite of its own (`make chaos`,
//! `cargo test --test chaos`): its control plane is not the end-to-end suite's, and the outage
//! test starts one more of its own, since it stops the apiserver.
//!
//! - [`sigkill`]: the operator, a real OS process under its
//!   non-admin identity and the chart's RBAC, is killed with SIGKILL at random moments (seeded)
//!   during 20 concurrent runs mixing pod and agent steps, and started again, several times.
//! - [`outage`]: kube-apiserver (of a control plane of its own) is
//!   stopped for 30 s while runs are in the middle of pod and agent steps, then started again.
//! - [`conflicts`]: a third of the operator's status writes are answered 409 Conflict, while
//!   another client patches the run's labels and annotations and applies a condition of its own
//!   to the run's status.
//! - [`silence`]: one in eight of the operator's requests (all but watches) is never answered,
//!   half before the API server sees it, half after it has acted on it.
//!
//! What every test checks, from the outside: each run's end state and outputs; a watch of every
//! pod created in the namespace (deleted ones too) shows one pod per step attempt; a watch of the
//! runs shows that a step result, once written, is never lost or rewritten; the OpenAI stub's
//! log shows which agent calls were made twice, and each such repeat is explained by a crash or
//! by a result write that got no answer.
//!
//! `VOLT_CHAOS_SEED=<n>` replays a seed; each test prints the one it used.

#[path = "../kit/mod.rs"]
mod kit;

mod conflicts;
mod outage;
mod sigkill;
mod silence;

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
// The scene every test starts with, and the fault layer over the operator's client

/// A namespace the operator user may work in (the chart's rights), an OpenAI stub answering in
/// `call` behind the `writer` Agent, the pod ledger and the run watch, and the kubelet stand-in,
/// whose pods run between `pods.0` and `pods.1`.
struct Scene {
    client: Client,
    ns: String,
    stub: Stub,
    ledger: PodLedger,
    watch: RunWatch,
    _kubelet: Kubelet,
}

impl Scene {
    async fn start(cp: &ControlPlane, name: &str, call: Duration, pods: (Duration, Duration)) -> Scene {
        let client = cp.client().await;
        let ns = cp.namespace(&client, name).await;
        grant_operator(&client, &ns).await;
        let stub = Stub::start("llm", call).await;
        apply(&client, &ns, agent("writer", &stub.base_url())).await;
        let ledger = PodLedger::start(client.clone(), &ns).await;
        let watch = RunWatch::start(client.clone(), &ns).await;
        let kubelet = Kubelet::start(client.clone(), &ns, Some("volt.dev/run".into()), step_pods(pods.0, pods.1));
        Scene { client, ns, stub, ledger, watch, _kubelet: kubelet }
    }
}

type Body = Box<kube::client::DynBody>;
type Request = http::Request<kube::client::Body>;

/// What a fault layer does with a request.
enum Fault {
    /// Send it and hand back its answer.
    Pass,
    /// Answer this instead, without sending it.
    Answer(http::Response<Body>),
    /// Hold it for ever, unsent.
    Unsent,
    /// Send it, and hold its answer for ever.
    Unanswered,
}

/// A tower layer over the operator's client that asks `decide` what to do with each request.
#[derive(Clone)]
struct Faults {
    decide: Arc<dyn Fn(&Request) -> Fault + Send + Sync>,
}

impl Faults {
    fn new(decide: impl Fn(&Request) -> Fault + Send + Sync + 'static) -> Self {
        Faults { decide: Arc::new(decide) }
    }
}

impl<S> tower::Layer<S> for Faults {
    type Service = FaultService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FaultService { inner, faults: self.clone() }
    }
}

#[derive(Clone)]
struct FaultService<S> {
    inner: S,
    faults: Faults,
}

impl<S> tower::Service<Request> for FaultService<S>
where
    S: tower::Service<Request, Response = http::Response<Body>, Error = tower::BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match (self.faults.decide)(&req) {
            Fault::Pass => Box::pin(self.inner.call(req)),
            Fault::Answer(response) => Box::pin(futures::future::ready(Ok(response))),
            Fault::Unsent => Box::pin(futures::future::pending()),
            Fault::Unanswered => {
                let done = self.inner.call(req);
                Box::pin(async move {
                    let _answer = done.await;
                    futures::future::pending().await
                })
            }
        }
    }
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

/// The succeeded steps of the runs `names`, by run and step key.
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
