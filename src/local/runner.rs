//! The local run loop: the WorkflowRun controller's pass without Kubernetes. Each pass takes
//! what finished, asks the engine ([`engine::advance`]) what to do, answers cacheable starts
//! from the cache, starts the rest (local processes, in-process http and agent calls), and
//! waits for a result, a retry or timeout due, or Ctrl-C. State lives in memory, in the same
//! `WorkflowRunStatus` the cluster writes.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{Agent, KState, RunPhase, StepKind, StepPhase, WorkflowRunStatus, WorkflowSpec, set_kstatus};
use crate::engine::{self, Action, Dag, Event, RunInfo, Settings, TaskStart, Transition, Work};
use crate::executors::http::HttpExecutor;
use crate::executors::{AgentCaller, Failure, InProcessRunner, Outcome};

use super::cache::{DEFAULT_TTL, Entry, StepCache};
use super::process::{self, ProcessContext};

/// Everything about the run to make, checked and resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: WorkflowSpec,
    pub dag: Dag,
    /// Name of the Workflow (empty for an inline spec).
    pub workflow_name: String,
    /// Parameters after defaults.
    pub params: BTreeMap<String, Json>,
    pub run: RunInfo,
    /// Timeout of the whole run.
    pub timeout: Duration,
    /// The Agents of the run (for the cache keys of agent steps).
    pub agents: Vec<Agent>,
}

/// How steps run.
pub struct Executors {
    pub http: HttpExecutor,
    pub agents: Option<Arc<dyn AgentCaller>>,
    /// Why agent steps fail when `agents` is `None`.
    pub agents_unavailable: String,
    pub cache: Arc<dyn StepCache>,
    /// Where container steps' termination-log files are made.
    pub scratch: PathBuf,
    /// Most steps running at once.
    pub parallelism: usize,
    pub settings: Settings,
}

/// What the live view is told.
pub trait Observer: Send {
    /// After each pass that changed something.
    fn update(&mut self, transitions: &[Transition], status: &WorkflowRunStatus);
    /// Cancellation was asked for (Ctrl-C).
    fn cancelling(&mut self) {}
}

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_stores: u64,
    pub passes: u64,
}

/// Hash of a Workflow spec, as the controller records it.
pub fn hash_spec(spec: &WorkflowSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// Longest wait between passes when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(300);

struct Loop<'a> {
    plan: &'a Plan,
    exec: &'a Executors,
    runner: Arc<InProcessRunner>,
    permits: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Event>,
    /// Running attempts: key -> (attempt, handle).
    live: HashMap<String, (u32, AbortHandle)>,
    /// Cache keys of running cacheable attempts.
    pending_cache: HashMap<(String, u32), (String, Duration)>,
    stats: Stats,
    process: ProcessContext,
}

/// Runs a plan to its end; `cancel` cancels the run as `spec.cancel` does (running steps are
/// stopped, `finally` steps still run).
pub async fn run(
    plan: &Plan,
    exec: &Executors,
    observer: &mut dyn Observer,
    cancel: CancellationToken,
) -> (WorkflowRunStatus, Stats) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut lp = Loop {
        plan,
        exec,
        runner: Arc::new(InProcessRunner::new(exec.http.clone(), exec.agents.clone())),
        permits: Arc::new(Semaphore::new(exec.parallelism.max(1))),
        tx,
        live: HashMap::new(),
        pending_cache: HashMap::new(),
        stats: Stats::default(),
        process: ProcessContext {
            run: plan.run.name.clone(),
            namespace: plan.run.namespace.clone(),
            dir: exec.scratch.clone(),
        },
    };
    let mut status = WorkflowRunStatus {
        workflow_name: plan.workflow_name.clone(),
        workflow_spec_hash: hash_spec(&plan.spec),
        workflow: Some(plan.spec.clone()),
        params: plan.params.clone(),
        ..Default::default()
    };
    let started = Timestamp::now();
    let mut events = Vec::new();
    let mut cancelled = false;
    loop {
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        for e in &events {
            lp.finished(e);
        }
        lp.remember_results(&events).await;
        let now = Timestamp::now();
        let input = engine::Input {
            spec: &plan.spec,
            dag: &plan.dag,
            run: &plan.run,
            params: &plan.params,
            now,
            suspend: false,
            cancel: cancelled,
            deadline: started.checked_add(plan.timeout).ok(),
            settings: &exec.settings,
        };
        lp.stats.passes += 1;
        let mut decision = engine::advance(input, &mut status, std::mem::take(&mut events));
        let mut transitions = std::mem::take(&mut decision.transitions);
        let mut requeue = decision.requeue_after;
        // Cache hits finish their steps at once; their dependents may start in the same pass.
        loop {
            let hits = lp.execute(&decision.actions).await;
            if hits.is_empty() {
                break;
            }
            decision = engine::advance(input, &mut status, hits);
            transitions.append(&mut decision.transitions);
            requeue = match (requeue, decision.requeue_after) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if !transitions.is_empty() {
            observer.update(&transitions, &status);
        }
        if status.phase.is_finished() {
            break;
        }
        let wait = requeue.unwrap_or(IDLE_WAIT).max(Duration::from_millis(5));
        tokio::select! {
            e = rx.recv() => events.extend(e),
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                observer.cancelling();
            }
        }
    }
    for (_, (_, handle)) in lp.live.drain() {
        handle.abort();
    }
    finish_status(plan, &mut status);
    (status, lp.stats)
}

/// Conditions as the controller writes them, and the note on container steps that ran as
/// local processes.
fn finish_status(plan: &Plan, status: &mut WorkflowRunStatus) {
    let now = Timestamp::now();
    if status.finished_at.is_none() {
        status.finished_at = Some(Time(now));
    }
    let (state, reason) = match status.phase {
        RunPhase::Succeeded => (KState::Ready, "Succeeded"),
        RunPhase::Cancelled => (KState::Stalled, "Cancelled"),
        _ => (KState::Stalled, "Failed"),
    };
    let message = if status.message.is_empty() {
        format!("run {}", status.phase.as_str().to_lowercase())
    } else {
        status.message.clone()
    };
    set_kstatus(&mut status.conditions, state, reason, &message, None, now);
    for (key, row) in status.steps.iter_mut() {
        let id = key.split('[').next().unwrap_or(key);
        let Some(i) = plan.dag.index_of(id) else { continue };
        let step = engine::dag::step_at(&plan.spec, i);
        if let Some(c) = &step.container
            && row.phase == StepPhase::Succeeded
            && row.message.is_empty()
            && row.items.is_none()
        {
            row.message = process::image_note(&c.image);
        }
    }
}

impl Loop<'_> {
    /// Forgets the task of a result.
    fn finished(&mut self, e: &Event) {
        let (key, attempt) = match e {
            Event::Succeeded { key, attempt, .. }
            | Event::Failed { key, attempt, .. }
            | Event::Lost { key, attempt } => (key, *attempt),
        };
        if self.live.get(key).is_some_and(|(a, _)| *a == attempt) {
            self.live.remove(key);
        }
    }

    /// Stores the results of cacheable tasks that just succeeded.
    async fn remember_results(&mut self, events: &[Event]) {
        for e in events {
            let Event::Succeeded { key, attempt, output, info } = e else { continue };
            let Some((cache_key, ttl)) = self.pending_cache.remove(&(key.clone(), *attempt)) else { continue };
            if info.cached {
                continue;
            }
            let entry = Entry {
                value: output.clone(),
                expires_ms: 0,
                agent: info.agent.clone(),
                replica: info.replica.clone(),
                tokens: info.tokens.map(|t| (t.prompt, t.completion)),
            };
            self.exec.cache.put(&cache_key, entry, ttl).await;
            self.stats.cache_stores += 1;
        }
    }

    /// Carries the engine's actions out; returns the results the cache answered.
    async fn execute(&mut self, actions: &[Action]) -> Vec<Event> {
        let mut hits = Vec::new();
        for action in actions {
            match action {
                Action::Start(task) => {
                    if let Some(cache) = &task.cache {
                        let key = cache_key(self.plan, &task.work);
                        if let Some(hit) = self.exec.cache.get(&key).await {
                            self.stats.cache_hits += 1;
                            hits.push(hit.into_hit(task.key.clone(), task.attempt));
                            continue;
                        }
                        self.stats.cache_misses += 1;
                        let ttl = cache.ttl_seconds.map_or(DEFAULT_TTL, |s| Duration::from_secs(u64::from(s)));
                        self.pending_cache.insert((task.key.clone(), task.attempt), (key, ttl));
                    }
                    self.spawn(task.clone());
                }
                Action::Abort { key, attempt, .. } => {
                    if self.live.get(key).is_some_and(|(a, _)| a == attempt)
                        && let Some((_, handle)) = self.live.remove(key)
                    {
                        handle.abort();
                    }
                    self.pending_cache.remove(&(key.clone(), *attempt));
                }
            }
        }
        hits
    }

    /// Starts an attempt unless it already runs.
    fn spawn(&mut self, task: TaskStart) {
        if let Some((attempt, handle)) = self.live.get(&task.key) {
            if *attempt == task.attempt && !handle.is_finished() {
                return;
            }
            handle.abort();
        }
        let (key, attempt) = (task.key.clone(), task.attempt);
        let tx = self.tx.clone();
        let permits = self.permits.clone();
        let runner = self.runner.clone();
        let process = self.process.clone();
        let unavailable = self.exec.agents_unavailable.clone();
        let namespace = self.plan.run.namespace.clone();
        let handle = tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let work = async {
                match &task.work {
                    Work::Container { .. } => process::run(&process, &task).await,
                    Work::Agent { .. } if runner.agents.is_none() => Err(Failure::permanent(unavailable)),
                    _ => runner.run(&namespace, &task.work, task.timeout).await,
                }
            };
            let outcome: Outcome = AssertUnwindSafe(work)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(Failure::permanent("the step's executor panicked")));
            let event = crate::executors::outcome_event(task.key.clone(), attempt, outcome);
            let _ = tx.send(event);
        });
        self.live.insert(key, (attempt, handle.abort_handle()));
    }
}

/// The cache key of a task's work, as the controller computes it: agent steps include the
/// model, instructions and parameters of every agent that may serve them.
pub fn cache_key(plan: &Plan, work: &Work) -> String {
    crate::cache::work_key(&plan.run.namespace, work, plan.agents.iter())
}

/// The kind of the step a status key belongs to.
pub fn kind_of(plan: &Plan, key: &str) -> Option<StepKind> {
    let id = key.split('[').next().unwrap_or(key);
    plan.dag.index_of(id).and_then(|i| engine::dag::step_at(&plan.spec, i).kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::cache::{DiskCache, NoCache};

    struct Recorder(Vec<String>);
    impl Observer for Recorder {
        fn update(&mut self, transitions: &[Transition], _: &WorkflowRunStatus) {
            for t in transitions {
                self.0.push(format!("{}={}", t.key.as_deref().unwrap_or("run"), t.phase));
            }
        }
    }

    fn plan(yaml: &str) -> Plan {
        let spec: WorkflowSpec = serde_saphyr::from_str(yaml).expect("spec parses");
        let dag = engine::validate(&spec).expect("valid");
        let params = engine::params::resolve(&spec, &BTreeMap::new()).expect("params");
        Plan {
            spec,
            dag,
            workflow_name: "w".into(),
            params,
            run: RunInfo { name: "w-local".into(), namespace: "default".into(), uid: "u".into() },
            timeout: Duration::from_secs(60),
            agents: vec![],
        }
    }

    fn executors(cache: Arc<dyn StepCache>, scratch: PathBuf) -> Executors {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Executors {
            http: HttpExecutor::new(),
            agents: None,
            agents_unavailable: "agent steps need a client".into(),
            cache,
            scratch,
            parallelism: 4,
            settings: Settings::default(),
        }
    }

    const PIPELINE: &str = r#"
params: [{name: n, default: 3}]
steps:
- id: list
  template: "[{% for i in range(params.n) %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}]"
- id: square
  dependsOn: [list]
  forEach: "{{ steps.list.json }}"
  maxParallel: 2
  cache: {enabled: true, ttlSeconds: 60}
  container: {image: busybox, command: [sh, -c, 'printf %s $(( {{ item }} * {{ item }} )) > /dev/termination-log']}
- id: total
  dependsOn: [square]
  template: "{{ steps.square.json | map('int') | sum }}"
finally:
- id: report
  template: "{{ run.phase }}"
"#;

    #[tokio::test]
    async fn runs_fan_out_processes_and_templates_then_hits_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache: Arc<dyn StepCache> = Arc::new(DiskCache::open(dir.path().join("cache")));
        let p = plan(PIPELINE);
        let exec = executors(cache, dir.path().join("scratch"));
        let mut rec = Recorder(vec![]);
        let (status, stats) = run(&p, &exec, &mut rec, CancellationToken::new()).await;
        assert_eq!(status.phase, RunPhase::Succeeded, "{}", status.message);
        let out = |k: &str| status.steps.get(k).and_then(|r| r.output.clone()).unwrap_or_default();
        assert_eq!(out("square"), r#"["0","1","4"]"#);
        assert_eq!(out("total"), "5");
        assert_eq!(out("report"), "Succeeded");
        assert_eq!(status.progress, "4/4");
        assert_eq!((stats.cache_hits, stats.cache_misses, stats.cache_stores), (0, 3, 3));
        assert!(status.steps["square[1]"].message.contains("image busybox not used"));
        assert!(rec.0.contains(&"run=Succeeded".to_string()), "{:?}", rec.0);

        let (again, stats) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
        assert_eq!(again.phase, RunPhase::Succeeded);
        assert_eq!(stats.cache_hits, 3);
        assert!(again.steps["square"].cached && again.steps["square[2]"].cached);
        assert_eq!(again.steps["total"].output.as_deref(), Some("5"));
    }

    #[tokio::test]
    async fn retries_then_fails_and_finally_still_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = plan(
            r#"
steps:
- id: flaky
  retry: {limit: 1, backoff: {initialSeconds: 0.01}}
  container: {image: alpine, command: [sh, -c, 'echo nope >&2; exit 1']}
- id: after
  dependsOn: [flaky]
  template: x
- id: ask
  agent: {ref: writer, prompt: hi}
  continueOnError: true
finally:
- id: report
  template: "{{ run.phase }}"
"#,
        );
        let exec = executors(Arc::new(NoCache), dir.path().to_path_buf());
        let (status, _) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
        assert_eq!(status.phase, RunPhase::Failed);
        let flaky = &status.steps["flaky"];
        assert_eq!((flaky.phase, flaky.attempts), (StepPhase::Failed, 2));
        assert!(
            flaky.message.contains("failed after 2 attempts") && flaky.message.contains("nope"),
            "{}",
            flaky.message
        );
        assert_eq!(status.steps["after"].phase, StepPhase::Skipped);
        assert_eq!(status.steps["ask"].message, "agent steps need a client");
        assert_eq!(status.steps["report"].output.as_deref(), Some("Failed"));
        assert!(status.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"));
    }

    #[tokio::test]
    async fn step_timeouts_and_cancellation_stop_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = plan(
            r#"
steps:
- id: slow
  timeoutSeconds: 1
  container: {image: alpine, command: [sleep, "30"]}
"#,
        );
        let exec = executors(Arc::new(NoCache), dir.path().to_path_buf());
        let t = std::time::Instant::now();
        let (status, _) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
        assert_eq!(status.phase, RunPhase::Failed);
        assert!(status.steps["slow"].message.contains("timed out after 1s"), "{}", status.steps["slow"].message);
        assert!(t.elapsed() < Duration::from_secs(10));

        let p = plan(
            "steps:\n- id: slow\n  container: {image: alpine, command: [sleep, \"30\"]}\nfinally:\n- id: f\n  template: \"{{ run.phase }}\"\n",
        );
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            c2.cancel();
        });
        let t = std::time::Instant::now();
        let (status, _) = run(&p, &exec, &mut Recorder(vec![]), cancel).await;
        assert_eq!(status.phase, RunPhase::Cancelled);
        assert_eq!(status.steps["f"].output.as_deref(), Some("Cancelled"));
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
