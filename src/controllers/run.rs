//! The WorkflowRun controller. Each pass reads the run and what happened to its tasks, asks
//! the engine what to do, carries the actions out (pods, in-process tasks), and writes the
//! whole status once with server-side apply.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{
    Agent, ConcurrencyPolicy, FIELD_MANAGER, KState, OutputRef, RetryPolicy, RunPhase, StepKind, StepPhase, Workflow,
    WorkflowRun, WorkflowRunStatus, WorkflowSpec, set_kstatus,
};
use crate::cache::{self, CacheManager};
use crate::config::RunArgs;
use crate::engine::{self, Action as EngineAction, Dag, Event, RunInfo, Settings, Work};
use crate::executors::http::HttpExecutor;
use crate::executors::http_policy::{HttpStepPolicy, cluster_api_addresses};
use crate::executors::pod::{PodState, build_pod, pod_state};
use crate::executors::pool::{RunRef, TaskPool};
use crate::executors::{AgentCaller, InProcessRunner};
use crate::metrics::Metrics;
use crate::naming;

use super::ServedFromWatchCache;
use super::status_writer::{StatusWriter, mark_finished};
use super::{Error, Health, api_for, drain, error_requeue};
use crate::events::{Batch, Dispatcher, EventKind};

/// How long a created pod may be missing from the watch cache before we look for it.
const POD_EXPECTATION: Duration = Duration::from_secs(30);

/// How long a pod creation refused by RBAC is tried again before the step fails: an apiserver
/// that has just started refuses requests until it has loaded its RBAC objects, and RBAC may be
/// applied together with the first runs.
const RBAC_GRACE: Duration = Duration::from_secs(60);

/// (run uid, step key, attempt).
type AttemptKey = (String, String, u32);

pub struct Ctx {
    client: Client,
    metrics: Metrics,
    events: Dispatcher,
    pool: TaskPool,
    pods: Store<Pod>,
    workflows: Store<Workflow>,
    runs: Store<WorkflowRun>,
    settings: Settings,
    default_timeout: Duration,
    max_concurrent_runs: u32,
    inline_output_limit: usize,
    /// Runs admitted by this process (uid -> workflow name), until they finish.
    admitted: Mutex<HashMap<String, String>>,
    /// Pods created recently (name -> when), so a lagging cache is not taken for a deletion.
    expectations: Mutex<HashMap<String, Instant>>,
    /// Pods whose creation RBAC refused (name -> first refusal), tried again for [`RBAC_GRACE`].
    forbidden: Mutex<HashMap<String, Instant>>,
    /// Validated DAGs by (run uid, spec hash).
    dags: Mutex<HashMap<String, (String, Arc<Dag>)>>,
    /// Writes run status off the reconcile path, and knows the newest status of each run.
    status: Arc<StatusWriter>,
    /// Cache keys of running cacheable attempts, by (run uid, step key, attempt).
    pending_cache: Mutex<HashMap<AttemptKey, (String, Option<Duration>)>>,
    cache: Arc<CacheManager>,
    agents: Store<Agent>,
    /// Large outputs stored in ConfigMaps, by (run uid, key).
    outputs: Mutex<HashMap<(String, String), String>>,
    wake: mpsc::UnboundedSender<ObjectRef<WorkflowRun>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hash_spec(spec: &WorkflowSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

enum Admission {
    Admit,
    Queue(String),
    Forbid(String),
}

impl Ctx {
    fn workflow_key(run: &WorkflowRun) -> String {
        run.spec
            .workflow_ref
            .as_ref()
            .map(|r| format!("{}/{}", run.namespace().unwrap_or_default(), r.name))
            .unwrap_or_default()
    }

    /// Concurrency: the Workflow's `maxRuns` and the operator-wide limit; queued runs start by
    /// priority, then age.
    fn admit(&self, run: &WorkflowRun, spec: &WorkflowSpec) -> Admission {
        let uid = run.uid().unwrap_or_default();
        let wf_key = Self::workflow_key(run);
        let mut admitted = lock(&self.admitted);
        if admitted.contains_key(&uid) {
            return Admission::Admit;
        }
        let all = self.runs.state();
        // Runs holding a slot: admitted here, or active in the cache (admitted before a restart).
        let mut active: HashMap<String, String> = admitted.clone();
        for r in &all {
            let phase = r.status.as_ref().map(|s| s.phase).unwrap_or_default();
            if matches!(phase, RunPhase::Running | RunPhase::Suspended) {
                active.insert(r.uid().unwrap_or_default(), Self::workflow_key(r));
            }
        }
        let global_full = self.max_concurrent_runs > 0 && active.len() >= self.max_concurrent_runs as usize;
        let limit = spec.concurrency.as_ref().filter(|c| c.policy != ConcurrencyPolicy::Allow && !wf_key.is_empty());
        let wf_full = limit.is_some_and(|c| active.values().filter(|k| **k == wf_key).count() >= c.max_runs as usize);
        if wf_full && limit.is_some_and(|c| c.policy == ConcurrencyPolicy::Forbid) {
            return Admission::Forbid(format!(
                "workflow already has {} active runs (concurrency.maxRuns) and its policy is Forbid",
                limit.map(|c| c.max_runs).unwrap_or_default()
            ));
        }
        if wf_full {
            return Admission::Queue(format!(
                "waiting: the workflow's concurrency.maxRuns ({}) is reached",
                limit.map(|c| c.max_runs).unwrap_or_default()
            ));
        }
        if global_full {
            return Admission::Queue(format!(
                "waiting: the operator's limit of {} concurrent runs is reached",
                self.max_concurrent_runs
            ));
        }
        // Fairness: a waiting run of higher priority (or older at equal priority) goes first.
        let key = |r: &WorkflowRun| (-r.spec.priority, r.creation_timestamp().map(|t| t.0), r.name_any());
        let mine = key(run);
        let better_waiting = all.iter().any(|r| {
            let phase = r.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let competes = limit.is_some() && Self::workflow_key(r) == wf_key;
            let waiting = phase == RunPhase::Queued
                && r.uid() != run.uid()
                && !admitted.contains_key(&r.uid().unwrap_or_default());
            waiting && (competes || self.max_concurrent_runs > 0) && key(r) < mine
        });
        let slots_left_wf =
            limit.map_or(usize::MAX, |c| c.max_runs as usize - active.values().filter(|k| **k == wf_key).count());
        if better_waiting && slots_left_wf <= 1 {
            return Admission::Queue("waiting: runs with a higher priority are queued first".into());
        }
        admitted.insert(uid, wf_key);
        Admission::Admit
    }

    /// Frees a run's slot and wakes the queued runs.
    fn release(&self, uid: &str) {
        let was = lock(&self.admitted).remove(uid).is_some();
        lock(&self.dags).remove(uid);
        lock(&self.outputs).retain(|(u, _), _| u != uid);
        self.pool.forget_run(uid);
        if was {
            for r in self.runs.state() {
                if r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Queued) {
                    let _ = self.wake.send(ObjectRef::from_obj(&*r));
                }
            }
        }
    }

    fn dag_for(&self, uid: &str, hash: &str, spec: &WorkflowSpec) -> Result<Arc<Dag>, engine::InvalidSpec> {
        if let Some((h, dag)) = lock(&self.dags).get(uid)
            && h == hash
        {
            return Ok(dag.clone());
        }
        let dag = Arc::new(engine::validate(spec)?);
        lock(&self.dags).insert(uid.to_string(), (hash.to_string(), dag.clone()));
        Ok(dag)
    }
}

fn conditions_for(status: &mut WorkflowRunStatus, generation: Option<i64>, now: Timestamp) {
    let (state, reason) = match status.phase {
        RunPhase::Succeeded => (KState::Ready, "Succeeded"),
        RunPhase::Failed => (KState::Stalled, "Failed"),
        RunPhase::Cancelled => (KState::Stalled, "Cancelled"),
        RunPhase::Pending => (KState::Reconciling, "Pending"),
        RunPhase::Queued => (KState::Reconciling, "Queued"),
        RunPhase::Running => (KState::Reconciling, "Running"),
        RunPhase::Suspended => (KState::Reconciling, "Suspended"),
    };
    let message = if status.message.is_empty() {
        format!("run {}", status.phase.as_str().to_lowercase())
    } else {
        status.message.clone()
    };
    set_kstatus(&mut status.conditions, state, reason, &message, generation, now);
    status.observed_generation = generation;
}

async fn reconcile(run: Arc<WorkflowRun>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("workflowrun");
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let uid = run.uid().unwrap_or_default();
    let now = Timestamp::now();
    if run.metadata.deletion_timestamp.is_some() {
        ctx.release(&uid);
        ctx.status.forget(&uid);
        return Ok(Action::await_change());
    }
    let before = ctx.status.fresh(&run);
    let mut status = before.clone();
    let generation = run.metadata.generation;

    if status.phase.is_finished() {
        ctx.release(&uid);
        return finished(&run, &ctx, &status).await;
    }

    // Snapshot the Workflow spec at start.
    if status.workflow.is_none() {
        let spec = match (&run.spec.workflow, &run.spec.workflow_ref) {
            (Some(inline), _) => inline.clone(),
            (None, Some(r)) => {
                let cached = ctx.workflows.get(&ObjectRef::new(&r.name).within(&ns));
                let found = match cached {
                    Some(wf) => Some(wf.spec.clone()),
                    None => {
                        Api::<Workflow>::namespaced(ctx.client.clone(), &ns).get_opt(&r.name).await?.map(|w| w.spec)
                    }
                };
                match found {
                    Some(spec) => {
                        status.workflow_name = r.name.clone();
                        spec
                    }
                    None => {
                        status.phase = RunPhase::Pending;
                        status.message = format!(
                            "spec.workflowRef: Workflow {:?} not found in namespace {ns:?}; waiting for it",
                            r.name
                        );
                        conditions_for(&mut status, generation, now);
                        ctx.status.stage(&run, &before, &status);
                        return Ok(Action::requeue(Duration::from_secs(15)));
                    }
                }
            }
            (None, None) => {
                return fail_run(&run, &ctx, &before, status, "spec: set workflowRef or workflow".into(), now).await;
            }
        };
        let hash = hash_spec(&spec);
        if let Err(e) = ctx.dag_for(&uid, &hash, &spec) {
            return fail_run(&run, &ctx, &before, status, format!("invalid workflow: {e}"), now).await;
        }
        match engine::params::resolve(&spec, &run.spec.params) {
            Ok(params) => status.params = params,
            Err(e) => return fail_run(&run, &ctx, &before, status, e, now).await,
        }
        status.workflow_spec_hash = hash;
        status.workflow = Some(spec);
    }
    let spec = status.workflow.clone().unwrap_or_default();

    // Concurrency.
    if matches!(status.phase, RunPhase::Pending | RunPhase::Queued) {
        match ctx.admit(&run, &spec) {
            Admission::Admit => {}
            Admission::Queue(msg) => {
                status.phase = RunPhase::Queued;
                status.message = msg;
                conditions_for(&mut status, generation, now);
                ctx.status.stage(&run, &before, &status);
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
            Admission::Forbid(msg) => return fail_run(&run, &ctx, &before, status, msg, now).await,
        }
    } else {
        lock(&ctx.admitted).entry(uid.clone()).or_insert_with(|| Ctx::workflow_key(&run));
    }

    let dag = match ctx.dag_for(&uid, &status.workflow_spec_hash, &spec) {
        Ok(d) => d,
        Err(e) => return fail_run(&run, &ctx, &before, status, format!("invalid workflow: {e}"), now).await,
    };

    // Large outputs live in ConfigMaps; the engine reads them like inline ones.
    hydrate_outputs(&ctx, &ns, &uid, &mut status).await?;

    // What happened since the last pass.
    let mut taken = Taken::drain(&ctx.pool, &uid);
    let mut events = taken.events.clone();
    events.extend(observe_pods(&ctx, &run, &status, &spec, &dag).await?);
    for (key, row) in &status.steps {
        if row.phase == StepPhase::Running
            && row.items.is_none()
            && !is_container(&spec, &dag, key)
            && !ctx.pool.knows(&uid, key, row.attempts)
            && !events.iter().any(|e| event_key(e) == (key.as_str(), row.attempts))
        {
            events.push(Event::Lost { key: key.clone(), attempt: row.attempts });
        }
    }

    let deadline_secs =
        run.spec.timeout_seconds.map(|s| Duration::from_secs(u64::from(s))).unwrap_or(ctx.default_timeout);
    let started = status.started_at.as_ref().map(|t| t.0).unwrap_or(now);
    let info = RunInfo { name: name.clone(), namespace: ns.clone(), uid: uid.clone() };
    let params = status.params.clone();
    let input = engine::Input {
        spec: &spec,
        dag: &dag,
        run: &info,
        params: &params,
        now,
        suspend: run.spec.suspend,
        cancel: run.spec.cancel,
        deadline: Some(started + deadline_secs),
        settings: &ctx.settings,
    };
    remember_results(&ctx, &ns, &uid, &events).await;
    let mut decision = engine::advance(input, &mut status, events);
    let mut transitions = std::mem::take(&mut decision.transitions);
    let mut requeue_after = decision.requeue_after;
    // Cache hits finish their steps at once; their dependents may start in the same pass. Each
    // round settles at least one step, so this ends.
    loop {
        let hits = execute(&ctx, &run, &spec, &dag, &mut status, &decision.actions, &taken).await?;
        if hits.is_empty() {
            break;
        }
        decision = engine::advance(input, &mut status, hits);
        transitions.append(&mut decision.transitions);
        requeue_after = match (requeue_after, decision.requeue_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    externalize_outputs(&ctx, &run, &mut status).await?;
    conditions_for(&mut status, generation, now);
    record_transitions(&ctx, &run, &spec, &dag, &transitions, &status);
    ctx.status.stage(&run, &before, &status);
    taken.recorded();

    if status.phase.is_finished() {
        ctx.release(&uid);
        return finished(&run, &ctx, &status).await;
    }
    Ok(match requeue_after {
        Some(d) => Action::requeue(d.max(Duration::from_millis(5))),
        None => Action::requeue(Duration::from_secs(300)),
    })
}

/// Results a pass took from the pool's inbox. They go back to the inbox unless the pass records
/// them (its status write succeeds): a pass that fails (an API error, a refused status write,
/// the apiserver down) would otherwise lose them, and the next pass would take those attempts
/// for lost and run them again.
struct Taken<'a> {
    pool: &'a TaskPool,
    uid: &'a str,
    events: Vec<Event>,
    recorded: bool,
}

impl<'a> Taken<'a> {
    fn drain(pool: &'a TaskPool, uid: &'a str) -> Self {
        Self { pool, uid, events: pool.drain(uid), recorded: false }
    }

    /// The result of an attempt, if this pass took one.
    fn result_of(&self, key: &str, attempt: u32) -> Option<&Event> {
        self.events.iter().find(|e| !matches!(e, Event::Lost { .. }) && event_key(e) == (key, attempt))
    }

    /// The pass wrote the status these results led to.
    fn recorded(&mut self) {
        self.recorded = true;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.pool.restore(self.uid, std::mem::take(&mut self.events));
        }
    }
}

/// Carries the engine's actions out: creates or deletes pods, spawns or aborts in-process
/// tasks. Steps whose result is cached do not run: their results come back as events, and so do
/// in-process attempts that already ran (see below).
async fn execute(
    ctx: &Ctx,
    run: &WorkflowRun,
    spec: &WorkflowSpec,
    dag: &Dag,
    status: &mut WorkflowRunStatus,
    actions: &[EngineAction],
    taken: &Taken<'_>,
) -> Result<Vec<Event>, Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let uid = run.uid().unwrap_or_default();
    let run_ref = RunRef { namespace: ns.clone(), name: name.clone(), uid: uid.clone() };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut hits = Vec::new();
    for action in actions {
        match action {
            EngineAction::Start(task) => {
                if let Some(cache) = &task.cache {
                    let key = cache_key(ctx, &ns, &task.work);
                    if let Some(hit) = ctx.cache.get(&ns, &key).await {
                        hits.push(hit.into_hit(task.key.clone(), task.attempt));
                        continue;
                    }
                    let ttl = cache.ttl_seconds.map(|s| Duration::from_secs(u64::from(s)));
                    lock(&ctx.pending_cache).insert((uid.clone(), task.key.clone(), task.attempt), (key, ttl));
                }
                match &task.work {
                    Work::Container { .. } => {
                        let owner =
                            run.controller_owner_ref(&()).ok_or_else(|| Error::Other("run has no uid".into()))?;
                        let Some(pod) = build_pod(&name, &ns, owner, task) else { continue };
                        let pod_name = pod.name_any();
                        let created = pods.create(&PostParams::default(), &pod).await;
                        // Refused by RBAC: perhaps not for long (see RBAC_GRACE). The pass fails
                        // and is tried again; nothing it took is lost (see Taken).
                        let rbac_refused = matches!(&created, Err(kube::Error::Api(e))
                            if e.code == 403 && e.message.contains("cannot create resource"));
                        let try_again = rbac_refused && {
                            let first = *lock(&ctx.forbidden).entry(pod_name.clone()).or_insert_with(Instant::now);
                            first.elapsed() < RBAC_GRACE
                        };
                        if !try_again {
                            lock(&ctx.forbidden).remove(&pod_name);
                        }
                        match created {
                            Err(e) if try_again => return Err(e.into()),
                            Ok(_) => {
                                lock(&ctx.expectations).insert(pod_name.clone(), Instant::now());
                            }
                            Err(kube::Error::Api(e)) if e.code == 409 => {}
                            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 403 || e.code == 400 => {
                                ctx.pool.restore(
                                    &uid,
                                    vec![Event::Failed {
                                        key: task.key.clone(),
                                        attempt: task.attempt,
                                        message: format!("cannot create pod {pod_name}: {}", e.message),
                                        retryable: false,
                                        info: Default::default(),
                                    }],
                                );
                                let _ = ctx.wake.send(ObjectRef::from_obj(run));
                            }
                            Err(e) => return Err(e.into()),
                        }
                        if let Some(row) = status.steps.get_mut(&task.key) {
                            row.pod = Some(pod_name);
                        }
                    }
                    // A pass whose status write failed started this attempt, and its result came
                    // back before this pass started it again (the engine saw that result as
                    // stale): use it rather than run the attempt twice.
                    _ => match taken.result_of(&task.key, task.attempt) {
                        Some(result) => {
                            debug!(run = %name, step = %task.key, attempt = task.attempt, "the attempt ran already");
                            hits.push(result.clone())
                        }
                        None => ctx.pool.spawn(run_ref.clone(), task.clone()),
                    },
                }
            }
            EngineAction::Abort { key, attempt, .. } => {
                if let Some(pod_name) = status.steps.get(key).and_then(|r| r.pod.clone())
                    && is_container(spec, dag, key)
                {
                    debug!(run = %name, pod = %pod_name, "deleting the pod of an aborted attempt");
                    match pods.delete(&pod_name, &DeleteParams::background()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                } else {
                    ctx.pool.abort(&uid, key, *attempt);
                }
            }
        }
    }
    Ok(hits)
}

/// The cache key of a task's work; agent steps include the model, instructions and parameters
/// of every agent that may serve them.
fn cache_key(ctx: &Ctx, ns: &str, work: &Work) -> String {
    let agents = ctx.agents.state();
    cache::work_key(ns, work, agents.iter().map(|a| &**a).filter(|a| a.namespace().as_deref() == Some(ns)))
}

/// Stores the results of cacheable tasks that just succeeded.
async fn remember_results(ctx: &Ctx, ns: &str, uid: &str, events: &[Event]) {
    for e in events {
        let Event::Succeeded { key, attempt, output, info } = e else { continue };
        let pending = lock(&ctx.pending_cache).remove(&(uid.to_string(), key.clone(), *attempt));
        let Some((cache_key, ttl)) = pending else { continue };
        if info.cached {
            continue;
        }
        let entry = cache::Entry {
            value: output.clone(),
            expires_ms: 0,
            agent: info.agent.clone(),
            replica: info.replica.clone(),
            tokens: info.tokens.map(|t| (t.prompt, t.completion)),
        };
        ctx.cache.put(ns, cache_key, entry, ttl).await;
    }
}

fn event_key(e: &Event) -> (&str, u32) {
    match e {
        Event::Succeeded { key, attempt, .. } | Event::Failed { key, attempt, .. } | Event::Lost { key, attempt } => {
            (key.as_str(), *attempt)
        }
    }
}

fn step_kind(spec: &WorkflowSpec, dag: &Dag, key: &str) -> Option<StepKind> {
    let id = key.split('[').next().unwrap_or(key);
    dag.index_of(id).and_then(|i| engine::dag::step_at(spec, i).kind())
}

fn is_container(spec: &WorkflowSpec, dag: &Dag, key: &str) -> bool {
    step_kind(spec, dag, key) == Some(StepKind::Container)
}

/// Pod outcomes of running container steps.
async fn observe_pods(
    ctx: &Ctx,
    run: &WorkflowRun,
    status: &WorkflowRunStatus,
    spec: &WorkflowSpec,
    dag: &Dag,
) -> Result<Vec<Event>, Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let mut events = Vec::new();
    for (key, row) in &status.steps {
        if row.phase != StepPhase::Running || row.items.is_some() || !is_container(spec, dag, key) {
            continue;
        }
        let pod_name = naming::pod_name(&name, key, row.attempts);
        let cached = ctx.pods.get(&ObjectRef::new(&pod_name).within(&ns));
        let pod = match cached {
            Some(p) => {
                // Seen: from now on, missing from the cache means deleted.
                lock(&ctx.expectations).remove(&pod_name);
                Some((*p).clone())
            }
            None => {
                let recent = lock(&ctx.expectations).get(&pod_name).is_some_and(|t| t.elapsed() < POD_EXPECTATION);
                if recent {
                    continue;
                }
                Api::<Pod>::namespaced(ctx.client.clone(), &ns).get_opt(&pod_name).await?
            }
        };
        let Some(pod) = pod else {
            events.push(Event::Failed {
                key: key.clone(),
                attempt: row.attempts,
                message: format!("pod {pod_name} was deleted"),
                retryable: true,
                info: Default::default(),
            });
            continue;
        };
        // Only this run's pod counts (a same-named pod of a deleted, recreated run does not).
        if !pod.owner_references().iter().any(|o| Some(&o.uid) == run.metadata.uid.as_ref()) {
            continue;
        }
        match pod_state(&pod) {
            PodState::Running if pod.metadata.deletion_timestamp.is_some() => events.push(Event::Failed {
                key: key.clone(),
                attempt: row.attempts,
                message: format!("pod {pod_name} is being deleted"),
                retryable: true,
                info: Default::default(),
            }),
            PodState::Running => {}
            PodState::Succeeded { output } => {
                lock(&ctx.expectations).remove(&pod_name);
                events.push(Event::Succeeded {
                    key: key.clone(),
                    attempt: row.attempts,
                    output,
                    info: Default::default(),
                })
            }
            PodState::Failed { message } => {
                lock(&ctx.expectations).remove(&pod_name);
                events.push(Event::Failed {
                    key: key.clone(),
                    attempt: row.attempts,
                    message,
                    retryable: true,
                    info: Default::default(),
                })
            }
        }
    }
    Ok(events)
}

async fn hydrate_outputs(ctx: &Ctx, ns: &str, uid: &str, status: &mut WorkflowRunStatus) -> Result<(), Error> {
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    for (key, row) in status.steps.iter_mut() {
        let Some(r) = &row.output_ref else { continue };
        if row.output.is_some() {
            continue;
        }
        let cached = lock(&ctx.outputs).get(&(uid.to_string(), key.clone())).cloned();
        let text = match cached {
            Some(t) => t,
            None => {
                let cm = cms.get_opt(&r.config_map).await?;
                let t = cm.and_then(|c| c.data).and_then(|mut d| d.remove(&r.key));
                match t {
                    Some(t) => {
                        lock(&ctx.outputs).insert((uid.to_string(), key.clone()), t.clone());
                        t
                    }
                    None => {
                        row.message = format!("output ConfigMap {} is missing", r.config_map);
                        continue;
                    }
                }
            }
        };
        row.output = Some(text);
    }
    Ok(())
}

/// Moves outputs over the inline bound into ConfigMaps owned by the run.
async fn externalize_outputs(ctx: &Ctx, run: &WorkflowRun, status: &mut WorkflowRunStatus) -> Result<(), Error> {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let uid = run.uid().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    for (key, row) in status.steps.iter_mut() {
        let Some(out) = &row.output else { continue };
        if out.len() <= ctx.inline_output_limit {
            continue;
        }
        let k = (uid.clone(), key.clone());
        let stored = lock(&ctx.outputs).get(&k).is_some_and(|s| s == out) && row.output_ref.is_some();
        if !stored {
            let cm_name = naming::output_config_map(&name, key);
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(cm_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(naming::run_labels(&name)),
                    owner_references: run.controller_owner_ref(&()).map(|o| vec![o]),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([("output".to_string(), out.clone())])),
                ..Default::default()
            };
            let mut value = serde_json::to_value(&cm)?;
            value["apiVersion"] = json!("v1");
            value["kind"] = json!("ConfigMap");
            cms.patch(&cm_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await?;
            row.output_ref = Some(OutputRef { config_map: cm_name, key: "output".into(), size: out.len() as u64 });
            lock(&ctx.outputs).insert(k, out.clone());
        }
        row.output = None;
    }
    Ok(())
}

fn record_transitions(
    ctx: &Ctx,
    run: &WorkflowRun,
    spec: &WorkflowSpec,
    dag: &Dag,
    transitions: &[engine::Transition],
    status: &WorkflowRunStatus,
) {
    if transitions.is_empty() {
        return;
    }
    let ns = run.namespace().unwrap_or_default();
    let uid = run.uid().unwrap_or_default();
    let object = format!("WorkflowRun/{}", run.name_any());
    let mut events = Vec::with_capacity(transitions.len());
    // Within a pass, the run starts before its steps and finishes after them.
    let mut ordered: Vec<&engine::Transition> = transitions.iter().collect();
    ordered.sort_by_key(|t| match (&t.key, t.phase.as_str()) {
        (None, "Running") => 0,
        (None, "Succeeded" | "Failed" | "Cancelled") => 2,
        _ => 1,
    });
    for t in ordered {
        let kind = match &t.key {
            Some(key) => {
                let kind = step_kind(spec, dag, key).map(|k| k.as_str()).unwrap_or("unknown");
                ctx.metrics.steps.with_label_values(&[kind, &t.phase]).inc();
                let row = status.steps.get(key);
                if let Some(row) = row
                    && matches!(t.phase.as_str(), "Succeeded" | "Failed")
                    && let (Some(s), Some(f)) = (&row.started_at, &row.finished_at)
                {
                    let secs = (f.0.as_microsecond() - s.0.as_microsecond()).max(0) as f64 / 1e6;
                    ctx.metrics.step_duration.with_label_values(&[kind, &t.phase]).observe(secs);
                }
                match t.phase.as_str() {
                    "Running" => EventKind::StepStarted,
                    "Retrying" => EventKind::StepRetried,
                    "Succeeded" if row.is_some_and(|r| r.cached) => EventKind::StepCached,
                    "Succeeded" => EventKind::StepSucceeded,
                    "Failed" => EventKind::StepFailed,
                    "Skipped" => EventKind::StepSkipped,
                    _ => EventKind::StepCancelled,
                }
            }
            None => {
                ctx.metrics.runs.with_label_values(&[&t.phase]).inc();
                match t.phase.as_str() {
                    "Succeeded" => EventKind::RunSucceeded,
                    "Failed" => EventKind::RunFailed,
                    "Cancelled" => EventKind::RunCancelled,
                    "Suspended" => EventKind::RunSuspended,
                    _ => EventKind::RunStarted,
                }
            }
        };
        let mut e = ctx.events.event(kind, &uid, &ns, object.clone());
        e.step = t.key.clone();
        e.attempt = t.attempt;
        e.message = t.message.clone();
        events.push(e);
    }
    debug!(run = %run.name_any(), transitions = events.len(), "transitions");
    ctx.events.publish(Batch { events, reference: Some(run.object_ref(&())) });
}

async fn fail_run(
    run: &WorkflowRun,
    ctx: &Ctx,
    before: &WorkflowRunStatus,
    mut status: WorkflowRunStatus,
    message: String,
    now: Timestamp,
) -> Result<Action, Error> {
    info!(run = %run.name_any(), %message, "run failed before starting");
    status.phase = RunPhase::Failed;
    status.message = message.clone();
    status.finished_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
    conditions_for(&mut status, run.metadata.generation, now);
    if before.phase != RunPhase::Failed {
        ctx.metrics.runs.with_label_values(&["Failed"]).inc();
        let mut e = ctx.events.event(
            EventKind::RunFailed,
            &run.uid().unwrap_or_default(),
            &run.namespace().unwrap_or_default(),
            format!("WorkflowRun/{}", run.name_any()),
        );
        e.message = message;
        ctx.events.publish(Batch { events: vec![e], reference: Some(run.object_ref(&())) });
    }
    ctx.status.stage(run, before, &status);
    finished(run, ctx, &status).await
}

/// A finished run: labelled as such once its end is written (by the status writer, or here
/// for a run that finished before a restart), after which only its metadata is tracked, and
/// [`sweep_finished`] deletes it when its TTL passes.
async fn finished(run: &WorkflowRun, ctx: &Ctx, status: &WorkflowRunStatus) -> Result<Action, Error> {
    let uid = run.uid().unwrap_or_default();
    if !run.labels().contains_key(naming::LABEL_FINISHED) && !ctx.status.pending(&uid) {
        let ns = run.namespace().unwrap_or_default();
        match mark_finished(&ctx.client, &ns, &run.name_any(), status, run.spec.ttl_seconds_after_finished).await {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

/// Finished runs, by metadata only: deletes those whose TTL passed, and counts them by phase
/// for the gauges.
async fn sweep_finished(client: Client, scope: Option<String>, counts: Arc<Mutex<HashMap<String, i64>>>) {
    let api: Api<kube::core::PartialObjectMeta<WorkflowRun>> = api_for(&client, &scope);
    let (store, writer) = reflector::store();
    // Paged (quorum reads, each page bounded): finished runs may be many, readiness does not
    // wait for this list, and one unpaged response of all of them would set the process's
    // peak memory.
    let stream = watcher(api, watcher::Config::default().labels(naming::LABEL_FINISHED).page_size(500))
        .backoff(super::WatchBackoff::default())
        .modify(|m| m.metadata.managed_fields = None)
        .reflect(writer)
        .touched_objects()
        .for_each(|_| async {});
    let sweep = async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Timestamp::now();
            let mut by_phase: HashMap<String, i64> = HashMap::new();
            for m in store.state() {
                *by_phase.entry(m.labels().get(naming::LABEL_FINISHED).cloned().unwrap_or_default()).or_default() += 1;
                let expired = m
                    .annotations()
                    .get(naming::ANNOTATION_EXPIRES)
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .is_some_and(|t| t <= now);
                if !expired || m.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let ns = m.namespace().unwrap_or_default();
                let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
                let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
                match runs.delete(&m.name_any(), &dp).await {
                    Ok(_) => info!(run = %m.name_any(), namespace = %ns, "deleted after ttlSecondsAfterFinished"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => warn!(run = %m.name_any(), namespace = %ns, error = %e, "deleting an expired run failed"),
                }
            }
            *lock(&counts) = by_phase;
        }
    };
    tokio::select! {
        _ = stream => {}
        _ = sweep => {}
    }
}

fn error_policy(_run: Arc<WorkflowRun>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&["workflowrun", err.metric_label()]).inc();
    error_requeue()
}

/// Drops what no controller reads from cached objects: managed fields (as large as the status
/// for server-side-applied objects) and `kubectl apply`'s copy of the object.
pub(super) fn slim_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A cached run: a finished one keeps its phase, times and message (what the TTL, the
/// concurrency limits and the gauges read), not its spec snapshot, steps or inline workflow.
fn slim_run(run: &mut WorkflowRun) {
    slim_meta(&mut run.metadata);
    if let Some(status) = run.status.as_mut()
        && status.phase.is_finished()
    {
        status.workflow = None;
        status.steps.clear();
        status.params.clear();
        run.spec.workflow = None;
    }
}

/// A cached pod of a run: its status, labels, owners and deletion are what the controller reads.
fn slim_pod(pod: &mut Pod) {
    slim_meta(&mut pod.metadata);
    pod.metadata.annotations = None;
    pod.spec = None;
}

/// Settings of the run controller taken from the command line.
pub fn settings(args: &RunArgs) -> Settings {
    Settings {
        default_retry: RetryPolicy {
            limit: args.retry_limit,
            backoff: Some(crate::api::Backoff {
                initial_seconds: args.retry_backoff.as_secs_f64(),
                ..Default::default()
            }),
        },
        ..Default::default()
    }
}

/// The WorkflowRun controller for one scope.
#[allow(clippy::too_many_arguments)]
pub async fn controller(
    client: Client,
    scope: Option<String>,
    args: RunArgs,
    metrics: Metrics,
    events: Dispatcher,
    agents: Option<Arc<dyn AgentCaller>>,
    cache: Arc<CacheManager>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let runs_api: Api<WorkflowRun> = api_for(&client, &scope);
    let pods_api: Api<Pod> = api_for(&client, &scope);
    let wf_api: Api<Workflow> = api_for(&client, &scope);

    // The caches keep only what the controller reads (see `slim_*`): memory stays flat with
    // many finished runs.
    let (pod_reader, pod_writer) = reflector::store();
    // Paged, like the Agent controller's: pods of finished runs stay until their run is deleted.
    let pod_stream = watcher(pods_api, watcher::Config::default().labels(naming::LABEL_RUN).page_size(500))
        .backoff(super::WatchBackoff::default())
        .modify(slim_pod)
        .reflect(pod_writer)
        .touched_objects();
    let (wf_reader, wf_writer) = reflector::store();
    let (agent_reader, agent_writer) = reflector::store();
    let agent_stream = watcher(api_for::<Agent>(&client, &scope), watcher::Config::default().served_from_watch_cache())
        .backoff(super::WatchBackoff::default())
        .modify(|a: &mut Agent| slim_meta(&mut a.metadata))
        .reflect(agent_writer)
        .touched_objects();
    let wf_stream = watcher(wf_api, watcher::Config::default().served_from_watch_cache())
        .backoff(super::WatchBackoff::default())
        .modify(|w: &mut Workflow| slim_meta(&mut w.metadata))
        .reflect(wf_writer)
        .touched_objects();

    let (runs, run_writer) = reflector::store();
    let active = format!("!{}", naming::LABEL_FINISHED);
    let run_stream = watcher(runs_api, watcher::Config::default().labels(&active).served_from_watch_cache())
        .backoff(super::WatchBackoff::default())
        .modify(slim_run)
        .reflect(run_writer)
        .touched_objects();
    // Passes of different runs run in parallel, bounded: a burst of new runs does not open
    // thousands of requests at once.
    let controller = Controller::for_stream(run_stream, runs.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(64));
    let (wake_tx, wake_rx) = mpsc::unbounded_channel::<ObjectRef<WorkflowRun>>();
    let notify_tx = wake_tx.clone();
    let notify: crate::executors::pool::Notify = Arc::new(move |ns: &str, name: &str| {
        let _ = notify_tx.send(ObjectRef::new(name).within(ns));
    });
    let policy = HttpStepPolicy::new(
        &args.http_step.allow,
        &args.http_step.deny,
        cluster_api_addresses(args.cluster_url.as_ref()).await,
    );
    info!(namespace = scope.as_deref().unwrap_or("<all>"), policy = %policy.describe(), "HTTP step policy");
    let runner = Arc::new(InProcessRunner::new(HttpExecutor::with_policy(policy), agents));
    let pool = TaskPool::new(args.max_inprocess_tasks, runner, notify);
    let status_writer = StatusWriter::new(client.clone(), metrics.clone(), args.status_flush_interval);
    let writer_stop = CancellationToken::new();
    let writer = {
        let health = health.clone();
        let still_leader = move || health.leader.load(std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(status_writer.clone().run(writer_stop.clone(), still_leader))
    };
    let ctx = Arc::new(Ctx {
        client,
        metrics: metrics.clone(),
        events,
        pool,
        pods: pod_reader.clone(),
        workflows: wf_reader.clone(),
        runs: runs.clone(),
        settings: settings(&args),
        default_timeout: args.default_workflow_timeout,
        max_concurrent_runs: args.max_concurrent_runs,
        inline_output_limit: args.inline_output_limit,
        admitted: Default::default(),
        expectations: Default::default(),
        forbidden: Default::default(),
        dags: Default::default(),
        status: status_writer.clone(),
        pending_cache: Default::default(),
        cache,
        agents: agent_reader.clone(),
        outputs: Default::default(),
        wake: wake_tx,
    });

    // Workflows only feed the store; a changed Workflow never changes a started run.
    let wf_task = tokio::spawn(wf_stream.for_each(|_| async {}));
    let agent_task = tokio::spawn(agent_stream.for_each(|_| async {}));

    // Readiness: every cache synced.
    let synced = {
        let (runs, pods, wfs, health) = (runs.clone(), pod_reader.clone(), wf_reader.clone(), health.clone());
        async move {
            super::wait_ready(&runs).await;
            super::wait_ready(&pods).await;
            super::wait_ready(&wfs).await;
            health.synced.store(true, std::sync::atomic::Ordering::Relaxed);
            info!("WorkflowRun controller caches synced");
        }
    };
    tokio::spawn(synced);

    // Finished runs: TTL and counts.
    let finished_counts: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let sweeper = tokio::spawn(sweep_finished(ctx.client.clone(), scope.clone(), finished_counts.clone()));

    // Gauges refreshed on an interval.
    let gauges = {
        let (runs, metrics, ctx2) = (runs.clone(), metrics.clone(), ctx.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let mut by_phase: HashMap<RunPhase, i64> = HashMap::new();
                for r in runs.state() {
                    *by_phase.entry(r.status.as_ref().map(|s| s.phase).unwrap_or_default()).or_default() += 1;
                }
                for (phase, n) in lock(&finished_counts).iter() {
                    for p in [RunPhase::Succeeded, RunPhase::Failed, RunPhase::Cancelled] {
                        if p.as_str() == phase {
                            *by_phase.entry(p).or_default() += n;
                        }
                    }
                }
                for p in [
                    RunPhase::Pending,
                    RunPhase::Queued,
                    RunPhase::Running,
                    RunPhase::Suspended,
                    RunPhase::Succeeded,
                    RunPhase::Failed,
                    RunPhase::Cancelled,
                ] {
                    metrics.runs_active.with_label_values(&[p.as_str()]).set(*by_phase.get(&p).unwrap_or(&0));
                }
                metrics.queue_depth.set(*by_phase.get(&RunPhase::Queued).unwrap_or(&0));
                metrics.inprocess_tasks.set(ctx2.pool.running() as i64);
            }
        }
    };
    let gauges = tokio::spawn(gauges);

    let stream = controller
        .owns_stream(pod_stream)
        .reconcile_on(tokio_stream_from(wake_rx))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx.clone());
    drain("workflowrun", stream).await;
    // What waits is written once no pass can stage more.
    writer_stop.cancel();
    let _ = writer.await;
    wf_task.abort();
    agent_task.abort();
    gauges.abort();
    sweeper.abort();
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
