//! The run pass with fake runtimes and a memory cache, no API server: cache hits, a panic
//! retried, a lost task, abort on cancel, results given back, an attempt refused at start.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;
use prometheus::Registry;

use super::*;
use crate::api::StepPhase;
use crate::cache::{CacheManager, CacheMetrics, CacheSettings, CacheStrategy};
use crate::engine::Settings;
use crate::executors::pool::TaskPool;
use crate::executors::{Failure, Output, TaskExecutor};

/// What the fake executor does for an attempt: (step key, attempt) -> behaviour.
#[derive(Clone, Copy)]
enum Do {
    Succeed,
    Panic,
    Hang,
}

/// A fake executor that records each start and does what the script says (succeed by default).
struct Script {
    plan: BTreeMap<(String, u32), Do>,
    started: Mutex<Vec<(String, u32)>>,
    /// Attempts whose futures were dropped before they finished (aborted).
    dropped: AtomicUsize,
}

impl Script {
    fn new(plan: &[(&str, u32, Do)]) -> Arc<Self> {
        Arc::new(Self {
            plan: plan.iter().map(|(k, a, d)| ((k.to_string(), *a), *d)).collect(),
            started: Mutex::default(),
            dropped: AtomicUsize::new(0),
        })
    }
    fn starts(&self) -> Vec<(String, u32)> {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct DropGuard<'a>(&'a AtomicUsize, bool);
impl Drop for DropGuard<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl TaskExecutor for Script {
    fn run<'a>(
        &'a self,
        _run: &'a crate::engine::RunInfo,
        task: &'a TaskStart,
    ) -> BoxFuture<'a, crate::executors::Outcome> {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).push((task.key.clone(), task.attempt));
        let what = self.plan.get(&(task.key.clone(), task.attempt)).copied().unwrap_or(Do::Succeed);
        Box::pin(async move {
            let mut guard = DropGuard(&self.dropped, false);
            let out = match what {
                Do::Succeed => Ok(Output { text: format!("{}#{}", task.key, task.attempt), info: Default::default() }),
                Do::Panic => panic!("executor bug"),
                Do::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Err(Failure::permanent("unreachable"))
                }
            };
            guard.1 = true;
            out
        })
    }
}

struct Fixture {
    spec: WorkflowSpec,
    dag: Dag,
    run: RunInfo,
    settings: Settings,
    pool: TaskPool,
    woken: Arc<tokio::sync::Notify>,
    cache: CacheManager,
    pending: PendingCache,
}

impl Fixture {
    fn new(yaml: &str, exec: Arc<dyn TaskExecutor>) -> Self {
        let spec: WorkflowSpec = serde_saphyr::from_str(yaml).expect("spec parses");
        let dag = engine::validate(&spec).expect("valid");
        let woken = Arc::new(tokio::sync::Notify::new());
        let wake = woken.clone();
        let settings = CacheSettings {
            strategy: CacheStrategy::Lru,
            ttl: Duration::from_secs(60),
            max_entries: 100,
            max_bytes: 1 << 20,
        };
        Self {
            spec,
            dag,
            run: RunInfo { name: "r".into(), namespace: "ns".into(), uid: "u".into(), ..Default::default() },
            settings: Settings::default(),
            pool: TaskPool::new(4, exec, Arc::new(move |_: &str, _: &str| wake.notify_one())),
            woken,
            cache: CacheManager::new(&settings, CacheMetrics::register(&Registry::new()), None),
            pending: PendingCache::default(),
        }
    }

    fn input<'a>(&'a self, params: &'a BTreeMap<String, serde_json::Value>, cancel: bool) -> Input<'a> {
        Input {
            spec: &self.spec,
            dag: &self.dag,
            run: &self.run,
            params,
            now: Timestamp::now(),
            suspend: false,
            cancel,
            deadline: None,
            settings: &self.settings,
            decisions: &crate::engine::scheduler::NO_DECISIONS,
            scope: None,
        }
    }

    /// One pass over `rt`, recorded.
    async fn pass_with<R: StepRuntime>(&self, rt: &R, status: &mut WorkflowRunStatus, cancel: bool) -> CacheCounts {
        let none = || Vec::new();
        let pass = Pass { runtime: rt, cache: &self.cache, pending: &self.pending, agents: &none };
        let params = BTreeMap::new();
        let outcome = pass.run(self.input(&params, cancel), status).await.unwrap_or_else(|_| panic!("pass failed"));
        let counts = outcome.cache;
        outcome.recorded();
        counts
    }

    /// Passes until the run finishes (each waits for a result or the next retry).
    async fn finish(&self, status: &mut WorkflowRunStatus) -> CacheCounts {
        let mut total = CacheCounts::default();
        for _ in 0..50 {
            let c = self.pass_with(&self.pool, status, false).await;
            total.hits += c.hits;
            total.misses += c.misses;
            total.stores += c.stores;
            if status.phase.is_finished() {
                return total;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), self.woken.notified()).await;
        }
        panic!("the run did not finish: {status:#?}");
    }
}

const CACHED: &str = r#"
steps:
- id: ask
  cache: {enabled: true}
  http: {url: "http://127.0.0.1:1/x"}
- id: after
  dependsOn: [ask]
  template: "got {{ steps.ask.output }}"
"#;

#[tokio::test]
async fn a_cache_hit_finishes_the_step_and_its_dependents_in_the_same_pass() {
    let script = Script::new(&[]);
    let f = Fixture::new(CACHED, script.clone());
    let mut first = WorkflowRunStatus::default();
    let counts = f.finish(&mut first).await;
    assert_eq!(first.phase, RunPhase::Succeeded, "{}", first.message);
    assert_eq!((counts.hits, counts.misses, counts.stores), (0, 1, 1));
    assert_eq!(script.starts(), [("ask".to_string(), 1)]);

    // A second run of the same work: one pass, from the cache, nothing started.
    let mut second = WorkflowRunStatus::default();
    let counts = f.pass_with(&f.pool, &mut second, false).await;
    assert_eq!(second.phase, RunPhase::Succeeded, "{}", second.message);
    assert_eq!(counts.hits, 1);
    assert!(second.steps["ask"].cached);
    assert_eq!(second.steps["after"].output.as_deref(), Some("got ask#1"));
    assert_eq!(script.starts().len(), 1, "the cached step did not run again");
}

#[tokio::test]
async fn a_panic_is_a_failed_attempt_that_is_retried() {
    let yaml = "steps:\n- id: ask\n  retry: {limit: 1, backoff: {initialSeconds: 0.01}}\n  http: {url: \"http://127.0.0.1:1/\"}\n";
    let script = Script::new(&[("ask", 1, Do::Panic)]);
    let f = Fixture::new(yaml, script.clone());
    let mut status = WorkflowRunStatus::default();
    f.finish(&mut status).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{}", status.message);
    assert_eq!(script.starts(), [("ask".to_string(), 1), ("ask".to_string(), 2)]);
    assert_eq!((status.steps["ask"].attempts, status.steps["ask"].output.as_deref()), (2, Some("ask#2")));
    assert_eq!(f.pool.running(), 0);

    // Without retries the step fails at once, saying why.
    let f = Fixture::new(
        "steps:\n- id: ask\n  http: {url: \"http://127.0.0.1:1/\"}\n",
        Script::new(&[("ask", 1, Do::Panic)]),
    );
    let mut status = WorkflowRunStatus::default();
    f.finish(&mut status).await;
    assert_eq!(status.phase, RunPhase::Failed);
    assert!(
        status.steps["ask"].message.contains("the step's executor panicked: executor bug"),
        "{}",
        status.steps["ask"].message
    );
}

#[tokio::test]
async fn a_lost_attempt_runs_again() {
    let yaml = "steps:\n- id: ask\n  http: {url: \"http://127.0.0.1:1/\"}\n";
    let script = Script::new(&[]);
    let f = Fixture::new(yaml, script.clone());
    // A status written by another process: the attempt runs, but nothing here runs it.
    let mut status = WorkflowRunStatus::default();
    let other = Fixture::new(yaml, Script::new(&[("ask", 1, Do::Hang)]));
    other.pass_with(&other.pool, &mut status, false).await;
    assert_eq!((status.steps["ask"].phase, status.steps["ask"].attempts), (StepPhase::Running, 1));

    f.finish(&mut status).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{}", status.message);
    assert_eq!(script.starts(), [("ask".to_string(), 1)], "the same attempt ran again here");
    other.pool.forget_run("u");
}

#[tokio::test]
async fn cancel_aborts_running_attempts_and_finally_runs() {
    let yaml = "steps:\n- id: slow\n  http: {url: \"http://127.0.0.1:1/\"}\nfinally:\n- id: f\n  template: \"{{ run.phase }}\"\n";
    let script = Script::new(&[("slow", 1, Do::Hang)]);
    let f = Fixture::new(yaml, script.clone());
    let mut status = WorkflowRunStatus::default();
    f.pass_with(&f.pool, &mut status, false).await;
    assert_eq!(f.pool.running(), 1);
    while script.starts().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.pass_with(&f.pool, &mut status, true).await;
    assert_eq!(status.phase, RunPhase::Cancelled, "{}", status.message);
    assert_eq!(status.steps["slow"].phase, StepPhase::Cancelled);
    assert_eq!(status.steps["f"].output.as_deref(), Some("Cancelled"));
    assert_eq!(f.pool.running(), 0);
    for _ in 0..100 {
        if script.dropped.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the aborted attempt's work was not stopped");
}

#[tokio::test]
async fn results_of_a_pass_that_is_not_recorded_are_given_back() {
    let yaml = "steps:\n- id: ask\n  http: {url: \"http://127.0.0.1:1/\"}\n";
    let script = Script::new(&[]);
    let f = Fixture::new(yaml, script.clone());
    let mut status = WorkflowRunStatus::default();
    f.pass_with(&f.pool, &mut status, false).await;
    f.pool.idle(Duration::from_secs(5)).await;
    let before = status.clone();
    {
        // A pass whose status write fails: its outcome is dropped, not recorded.
        let none = || Vec::new();
        let pass = Pass { runtime: &f.pool, cache: &f.cache, pending: &f.pending, agents: &none };
        let params = BTreeMap::new();
        let mut lost = before.clone();
        let outcome = pass.run(f.input(&params, false), &mut lost).await.unwrap_or_else(|never| match never {});
        assert_eq!(lost.phase, RunPhase::Succeeded);
        drop(outcome);
    }
    // The next pass starts from the status before and still gets the result.
    status = before;
    f.pass_with(&f.pool, &mut status, false).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{}", status.message);
    assert_eq!(script.starts().len(), 1, "the attempt ran once");
}

/// A runtime whose container attempts are refused at start, as the API server refuses a pod.
struct Refusing(TaskPool);

impl StepRuntime for Refusing {
    type Error = std::convert::Infallible;
    fn take(&self, run: &RunInfo) -> Vec<Event> {
        self.0.take(run)
    }
    fn give_back(&self, run: &RunInfo, events: Vec<Event>) {
        self.0.give_back(run, events)
    }
    fn observe<'a>(
        &'a self,
        run: &'a RunInfo,
        spec: &'a WorkflowSpec,
        dag: &'a Dag,
        status: &'a WorkflowRunStatus,
    ) -> BoxFuture<'a, Result<Vec<Event>, Self::Error>> {
        self.0.observe(run, spec, dag, status)
    }
    fn start<'a>(
        &'a self,
        run: &'a RunInfo,
        task: &'a TaskStart,
        kind: Option<StepKind>,
    ) -> BoxFuture<'a, Result<Started, Self::Error>> {
        if kind == Some(StepKind::Container) {
            let refused = Event::Failed {
                key: task.key.clone(),
                attempt: task.attempt,
                message: "pods \"x\" is forbidden: violates PodSecurity".into(),
                retryable: false,
                info: Default::default(),
            };
            return Box::pin(async { Ok(Started::Ended(refused)) });
        }
        self.0.start(run, task, kind)
    }
    fn abort<'a>(
        &'a self,
        run: &'a RunInfo,
        key: &'a str,
        attempt: u32,
        kind: Option<StepKind>,
        row: Option<&'a StepStatus>,
    ) -> BoxFuture<'a, Result<(), Self::Error>> {
        StepRuntime::abort(&self.0, run, key, attempt, kind, row)
    }
}

#[tokio::test]
async fn an_attempt_refused_at_start_fails_the_step_in_the_same_pass() {
    let yaml =
        "steps:\n- id: build\n  container: {image: busybox:1}\n- id: after\n  dependsOn: [build]\n  template: x\n";
    let f = Fixture::new(yaml, Script::new(&[]));
    let rt = Refusing(f.pool.clone());
    let mut status = WorkflowRunStatus::default();
    f.pass_with(&rt, &mut status, false).await;
    assert_eq!(status.phase, RunPhase::Failed, "{}", status.message);
    assert!(status.steps["build"].message.contains("violates PodSecurity"), "{}", status.steps["build"].message);
    assert_eq!(status.steps["after"].phase, StepPhase::Skipped);
}

#[test]
fn conditions_follow_the_phase() {
    let mut status = WorkflowRunStatus { phase: RunPhase::Failed, message: "boom".into(), ..Default::default() };
    set_conditions(&mut status, Some(3), Timestamp::now());
    let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled").expect("Stalled");
    assert_eq!((stalled.status.as_str(), stalled.message.as_str()), ("True", "boom"));
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(hash_spec(&WorkflowSpec::default()), hash_spec(&WorkflowSpec::default()));
}
