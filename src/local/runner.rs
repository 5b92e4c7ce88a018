//! The local run loop: a wait loop around the run pass ([`crate::pass`]) that the
//! WorkflowRun controller also uses. Attempts run on a [`TaskPool`] (container steps as local
//! processes); each pass is followed by a wait for a result, a retry or timeout due, or
//! Ctrl-C. State lives in memory, in the same `WorkflowRunStatus` the cluster writes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::Value as Json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::{Agent, StepKind, StepPhase, WorkflowRunStatus, WorkflowSpec};
use crate::cache::StepCache;
use crate::engine::{self, Dag, RunInfo, Settings, Transition};
use crate::executors::http::HttpExecutor;
use crate::executors::pool::TaskPool;
use crate::executors::{AgentCaller, InProcessRunner};
use crate::pass::{self, Pass, PendingCache};

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
    /// Decisions given on the command line (`--approve STEP`, `--reject STEP`).
    pub decisions: BTreeMap<String, crate::api::StepDecision>,
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
    /// Most steps running at once (0: only the workflow's own limits, `maxParallel`).
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

/// Longest wait between passes when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(300);

/// Runs a plan to its end; `cancel` cancels the run as `spec.cancel` does (running steps are
/// stopped, `finally` steps still run).
pub async fn run(
    plan: &Plan,
    exec: &Executors,
    observer: &mut dyn Observer,
    cancel: CancellationToken,
) -> (WorkflowRunStatus, Stats) {
    let processes =
        ProcessContext { run: plan.run.name.clone(), namespace: plan.run.namespace.clone(), dir: exec.scratch.clone() };
    let runner = match &exec.agents {
        Some(agents) => InProcessRunner::new(exec.http.clone(), Some(agents.clone())),
        None => InProcessRunner::without_agents(exec.http.clone(), exec.agents_unavailable.clone()),
    }
    .with_containers(Arc::new(processes));
    let woken = Arc::new(Notify::new());
    let wake = woken.clone();
    let pool = TaskPool::new(exec.parallelism, Arc::new(runner), Arc::new(move |_: &str, _: &str| wake.notify_one()));
    let agents: Vec<Arc<Agent>> = plan.agents.iter().cloned().map(Arc::new).collect();
    let agents = move || agents.clone();
    let pending = PendingCache::default();
    let pass = Pass { runtime: &pool, cache: &*exec.cache, pending: &pending, agents: &agents };
    let mut status = WorkflowRunStatus {
        workflow_name: plan.workflow_name.clone(),
        workflow_spec_hash: pass::hash_spec(&plan.spec),
        workflow: Some(plan.spec.clone()),
        params: plan.params.clone(),
        ..Default::default()
    };
    let (started, mut cancelled, mut stats) = (Timestamp::now(), false, Stats::default());
    loop {
        let input = engine::Input {
            spec: &plan.spec,
            dag: &plan.dag,
            run: &plan.run,
            params: &plan.params,
            now: Timestamp::now(),
            suspend: false,
            cancel: cancelled,
            deadline: started.checked_add(plan.timeout).ok(),
            settings: &exec.settings,
            decisions: &plan.decisions,
            scope: None,
        };
        let outcome = match pass.run(input, &mut status).await {
            Ok(outcome) => outcome,
            Err(never) => match never {},
        };
        stats.passes += 1;
        stats.cache_hits += outcome.cache.hits;
        stats.cache_misses += outcome.cache.misses;
        stats.cache_stores += outcome.cache.stores;
        if !outcome.transitions.is_empty() {
            observer.update(&outcome.transitions, &status);
        }
        let wait = outcome.requeue_after.unwrap_or(IDLE_WAIT).max(Duration::from_millis(5));
        outcome.recorded();
        if status.phase.is_finished() {
            break;
        }
        tokio::select! {
            _ = woken.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                observer.cancelling();
            }
        }
    }
    pool.forget_run(&plan.run.uid);
    finish_status(plan, &mut status);
    (status, stats)
}

/// Conditions as the controller writes them, and the note on container steps that ran as
/// local processes.
fn finish_status(plan: &Plan, status: &mut WorkflowRunStatus) {
    let now = Timestamp::now();
    status.finished_at.get_or_insert(Time(now));
    pass::set_conditions(status, None, now);
    for (key, row) in status.steps.iter_mut() {
        let Some(i) = plan.dag.index_of(crate::naming::step_id_of(key)) else { continue };
        if let Some(c) = &engine::dag::step_at(&plan.spec, i).container
            && row.phase == StepPhase::Succeeded
            && row.message.is_empty()
            && row.items.is_none()
        {
            row.message = process::image_note(&c.image);
        }
    }
}

/// The kind of the step a status key belongs to.
pub fn kind_of(plan: &Plan, key: &str) -> Option<StepKind> {
    plan.dag.kind_of(&plan.spec, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RunPhase;
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
            decisions: BTreeMap::new(),
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
