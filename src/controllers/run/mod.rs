//! The WorkflowRun controller: dereference (the Workflow snapshot, large outputs) -> admit
//! ([`admission`]) -> one pass ([`crate::pass`], over the [`pods::ClusterRuntime`]) -> outputs
//! to ConfigMaps ([`outputs`]) -> stage the status ([`status_writer`]), which a background
//! writer applies. Transitions become metrics and events ([`transitions`]); finished runs are
//! labelled, swept after their TTL and counted ([`finished`]).
//!
//! The task pool, the status writer, admission and the pending cache keys are built once for
//! the operator ([`Shared`]); each watched scope gets its caches and a [`Ctx`].

mod admission;
mod children;
mod finished;
mod outputs;
mod pods;
mod resources;
mod status_writer;
mod transitions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{Agent, RetryPolicy, RunPhase, Workflow, WorkflowRun, WorkflowRunStatus, WorkflowSpec};
use crate::cache::CacheManager;
use crate::config::RunArgs;
use crate::engine::{self, Dag, Phase, RunInfo, Settings, Transition};
use crate::events::Dispatcher;
use crate::executors::http::HttpExecutor;
use crate::executors::http_policy::{HttpStepPolicy, cluster_api_addresses};
use crate::executors::pool::TaskPool;
use crate::executors::{AgentCaller, InProcessRunner};
use crate::kube_util::{ServedFromWatchCache, WatchBackoff, api_for, wait_ready};
use crate::metrics::Metrics;
use crate::naming;
use crate::pass::{self, Pass, PendingCache};
use crate::shards::Ownership;

use super::{Error, Health, drain, error_requeue};
use admission::{Admission, Admitter};
use outputs::Outputs;
use pods::ClusterRuntime;
use status_writer::StatusWriter;

pub(crate) use crate::locks::lock;

/// What every scope's run controller shares: one task pool, one status writer, one admission.
pub struct Shared {
    pool: TaskPool,
    status: Arc<StatusWriter>,
    admission: Arc<Admitter>,
    pending: PendingCache,
    cache: Arc<CacheManager>,
    events: Dispatcher,
    metrics: Metrics,
    settings: Settings,
    default_timeout: Duration,
    inline_output_limit: usize,
    /// Finished runs by phase, from each scope's sweeper.
    finished: Mutex<Vec<finished::Counts>>,
    /// Which shards (runs) this replica may act on.
    ownership: Arc<Ownership>,
}

impl Shared {
    /// The operator's task pool (agent and http steps, bounded by `--max-inprocess-tasks`),
    /// status writer and admission.
    pub async fn new(
        client: &Client,
        args: &RunArgs,
        metrics: Metrics,
        events: Dispatcher,
        agents: Option<Arc<dyn AgentCaller>>,
        cache: Arc<CacheManager>,
        ownership: Arc<Ownership>,
    ) -> Arc<Self> {
        let policy = HttpStepPolicy::new(
            &args.http_step.allow,
            &args.http_step.deny,
            cluster_api_addresses(args.cluster_url.as_ref()).await,
        );
        let policy = if args.http_step.allow_own_port { policy } else { policy.with_own_port(args.http_addr.port()) };
        info!(policy = %policy.describe(), "HTTP step policy");
        let runner = Arc::new(InProcessRunner::new(HttpExecutor::with_policy(policy), agents));
        let admission = Arc::new(Admitter::new(args.max_concurrent_runs));
        let wake = admission.clone();
        let pool = TaskPool::new(
            args.max_inprocess_tasks.max(1),
            runner,
            Arc::new(move |ns: &str, name: &str| wake.scopes.wake(ns, name)),
        );
        Arc::new(Self {
            pool,
            status: StatusWriter::new(client.clone(), metrics.clone(), args.status_flush_interval),
            admission,
            pending: PendingCache::default(),
            cache,
            events,
            metrics,
            settings: settings(args),
            default_timeout: args.default_workflow_timeout,
            inline_output_limit: args.inline_output_limit,
            finished: Default::default(),
            ownership,
        })
    }

    /// Writes staged statuses until `stop`, then what still waits: each only while this
    /// replica holds the run's shard (or leads).
    pub async fn write_status(self: Arc<Self>, stop: CancellationToken) {
        self.status.clone().run(stop, self.fence()).await
    }

    /// Whether this replica may act on a run now, by its `volt.dev/shard` label: what every
    /// status write and every start checks.
    fn fence(&self) -> status_writer::Fence {
        let ownership = self.ownership.clone();
        Arc::new(move |slot| ownership.holds_slot(slot))
    }

    /// Runs by phase (active ones from the scopes' caches, finished ones from their sweepers'
    /// counts), the queue depth and the in-process tasks, every 5 s, for the whole operator.
    pub async fn gauges(self: Arc<Self>) {
        const PHASES: [RunPhase; 7] = [
            RunPhase::Pending,
            RunPhase::Queued,
            RunPhase::Running,
            RunPhase::Suspended,
            RunPhase::Succeeded,
            RunPhase::Failed,
            RunPhase::Cancelled,
        ];
        let metrics = &self.metrics;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let mut by_phase: HashMap<RunPhase, i64> = HashMap::new();
            for r in self.admission.scopes.runs() {
                *by_phase.entry(r.status.as_ref().map(|s| s.phase).unwrap_or_default()).or_default() += 1;
            }
            for counts in lock(&self.finished).iter() {
                for (phase, n) in lock(counts).iter() {
                    if let Some(p) = PHASES.into_iter().find(|p| p.is_finished() && p.as_str() == phase) {
                        *by_phase.entry(p).or_default() += n;
                    }
                }
            }
            for p in PHASES {
                metrics.runs_active.with_label_values(&[p.as_str()]).set(*by_phase.get(&p).unwrap_or(&0));
            }
            metrics.queue_depth.set(*by_phase.get(&RunPhase::Queued).unwrap_or(&0));
            metrics.inprocess_tasks.set(self.pool.running() as i64);
        }
    }
}

/// One scope's controller state.
pub struct Ctx {
    client: Client,
    shared: Arc<Shared>,
    runtime: ClusterRuntime,
    workflows: Store<Workflow>,
    agents: Store<Agent>,
    outputs: Outputs,
    /// Validated DAGs by run uid, with the spec hash they were made from.
    dags: Mutex<HashMap<String, (String, Arc<Dag>)>>,
}

impl Ctx {
    /// Frees a run's slot and everything remembered of it.
    fn release(&self, uid: &str) {
        self.shared.admission.release(uid);
        lock(&self.dags).remove(uid);
        self.outputs.forget_run(uid);
        self.shared.pool.forget_run(uid);
        self.shared.pending.forget_run(uid);
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

    /// The Workflow spec a run starts with: inline, or its Workflow's (from the cache, else the
    /// API). `Ok(None)`: the Workflow does not exist yet.
    async fn workflow_of(&self, run: &WorkflowRun, ns: &str) -> Result<Option<(String, WorkflowSpec)>, RunError> {
        match (&run.spec.workflow, &run.spec.workflow_ref) {
            (Some(inline), _) => Ok(Some((String::new(), inline.clone()))),
            (None, Some(r)) => {
                let spec = match self.workflows.get(&ObjectRef::new(&r.name).within(ns)) {
                    Some(wf) => Some(wf.spec.clone()),
                    None => {
                        Api::<Workflow>::namespaced(self.client.clone(), ns).get_opt(&r.name).await?.map(|w| w.spec)
                    }
                };
                Ok(spec.map(|s| (r.name.clone(), s)))
            }
            (None, None) => Err(RunError::Invalid("spec: set workflowRef or workflow".into())),
        }
    }
}

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
enum RunError {
    /// The run cannot start: it fails with this message.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

async fn reconcile(run: Arc<WorkflowRun>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let shared = &ctx.shared;
    let _timer = shared.metrics.reconcile_timer("workflowrun");
    let ns = run.namespace().unwrap_or_default();
    let uid = run.uid().unwrap_or_default();
    let now = Timestamp::now();
    // The fence: a run of a shard this replica does not hold now is not acted on. Lost for
    // good, the shard's controller is stopping and its new holder takes the run from its
    // written status; a renewal late past the deadline (a loaded API server) passes, and the
    // run is looked at again.
    if !shared.ownership.holds_run(&run) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    // A child run that ended wakes its parent, which takes the child's end as its step's.
    if let Some(parent) = children::parent_of(&run)
        && run.status.as_ref().is_some_and(|s| s.phase.is_finished())
    {
        shared.admission.scopes.wake(&ns, parent);
    }
    if run.metadata.deletion_timestamp.is_some() {
        ctx.release(&uid);
        shared.status.forget(&uid);
        return Ok(Action::await_change());
    }
    let before = shared.status.fresh(&run);
    let mut status = before.clone();
    let generation = run.metadata.generation;
    if status.phase.is_finished() {
        ctx.release(&uid);
        return finished::finished(&ctx.client, &shared.status, &run, &status).await;
    }

    // Dereference: snapshot the Workflow spec at start.
    if status.workflow.is_none() {
        let found = match ctx.workflow_of(&run, &ns).await {
            Ok(found) => found,
            Err(RunError::Invalid(message)) => return fail_run(&run, &ctx, &before, status, message, now).await,
            Err(RunError::Kube(e)) => return Err(e.into()),
        };
        let Some((workflow_name, spec)) = found else {
            status.phase = RunPhase::Pending;
            status.message = format!(
                "spec.workflowRef: Workflow {:?} not found in namespace {ns:?}; waiting for it",
                run.spec.workflow_ref.as_ref().map(|r| r.name.as_str()).unwrap_or_default()
            );
            pass::set_conditions(&mut status, generation, now);
            shared.status.stage(&run, &before, &status);
            return Ok(Action::requeue(Duration::from_secs(15)));
        };
        let hash = pass::hash_spec(&spec);
        match ctx.dag_for(&uid, &hash, &spec) {
            Err(e) => return fail_run(&run, &ctx, &before, status, format!("invalid workflow: {e}"), now).await,
            Ok(dag) => {
                if let Err(e) = engine::dag::check_decisions(&spec, &dag, run.spec.decisions.keys()) {
                    return fail_run(&run, &ctx, &before, status, e, now).await;
                }
            }
        }
        match engine::params::resolve(&spec, &run.spec.params) {
            Ok(params) => status.params = params,
            Err(e) => return fail_run(&run, &ctx, &before, status, e, now).await,
        }
        status.workflow_name = workflow_name;
        status.workflow_spec_hash = hash;
        status.workflow = Some(spec);
    }
    let spec = status.workflow.clone().unwrap_or_default();

    // Admit.
    if matches!(status.phase, RunPhase::Pending | RunPhase::Queued) {
        match shared.admission.admit(&run, &spec) {
            Admission::Admit => {}
            Admission::Queue(message) => {
                status.phase = RunPhase::Queued;
                status.message = message;
                pass::set_conditions(&mut status, generation, now);
                shared.status.stage(&run, &before, &status);
                return Ok(Action::requeue(Duration::from_secs(30)));
            }
            Admission::Forbid(message) => return fail_run(&run, &ctx, &before, status, message, now).await,
        }
    } else {
        shared.admission.hold(&run);
    }
    let dag = match ctx.dag_for(&uid, &status.workflow_spec_hash, &spec) {
        Ok(d) => d,
        Err(e) => return fail_run(&run, &ctx, &before, status, format!("invalid workflow: {e}"), now).await,
    };
    ctx.outputs.hydrate(&ns, &uid, &mut status).await?;

    // Pass.
    let info = RunInfo {
        name: run.name_any(),
        namespace: ns.clone(),
        uid: uid.clone(),
        chain: children::chain_of(&run, &status.workflow_name),
        traceparent: run.annotations().get(crate::naming::ANNOTATION_TRACEPARENT).cloned(),
        shard: run.labels().get(naming::LABEL_SHARD).cloned(),
        meta: engine::RunMeta::of(&run.spec, Some(&status)),
    };
    let timeout = run.spec.timeout_seconds.map(|s| Duration::from_secs(u64::from(s))).unwrap_or(shared.default_timeout);
    let started = status.started_at.as_ref().map(|t| t.0).unwrap_or(now);
    let params = status.params.clone();
    let input = engine::Input {
        spec: &spec,
        dag: &dag,
        run: &info,
        params: &params,
        now,
        suspend: run.spec.suspend,
        cancel: run.spec.cancel,
        deadline: Some(started + timeout),
        settings: &shared.settings,
        decisions: &run.spec.decisions,
        scope: None,
    };
    let agents =
        || ctx.agents.state().into_iter().filter(|a| a.namespace().as_deref() == Some(ns.as_str())).collect::<Vec<_>>();
    let pass = Pass { runtime: &ctx.runtime, cache: &*shared.cache, pending: &shared.pending, agents: &agents };
    let outcome = pass.run(input, &mut status).await?;
    ctx.runtime.children.sync_suspend(&run, &status).await?;

    // Outputs, then stage the status.
    ctx.outputs.externalize(&run, &mut status).await?;
    pass::set_conditions(&mut status, generation, now);
    let kind_of = |key: &str| dag.kind_of(&spec, key);
    transitions::record(&shared.metrics, &shared.events, &run, kind_of, &outcome.transitions, &status);
    crate::telemetry::record(&info, kind_of, &outcome.transitions, &status);
    shared.status.stage(&run, &before, &status);
    let requeue_after = outcome.requeue_after;
    outcome.recorded();

    if status.phase.is_finished() {
        ctx.release(&uid);
        return finished::finished(&ctx.client, &shared.status, &run, &status).await;
    }
    Ok(Action::requeue(requeue_after.map_or(Duration::from_secs(300), |d| d.max(Duration::from_millis(5)))))
}

/// A run that cannot start fails with `message`.
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
    status.finished_at = Some(Time(now));
    pass::set_conditions(&mut status, run.metadata.generation, now);
    if before.phase != RunPhase::Failed {
        let failed = Transition { key: None, phase: Phase::Run(RunPhase::Failed), attempt: 0, message };
        transitions::record(&ctx.shared.metrics, &ctx.shared.events, run, |_| None, &[failed], &status);
    }
    ctx.shared.status.stage(run, before, &status);
    finished::finished(&ctx.client, &ctx.shared.status, run, &status).await
}

fn error_policy(_run: Arc<WorkflowRun>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.shared.metrics.reconcile_errors.with_label_values(&["workflowrun", err.metric_label()]).inc();
    error_requeue()
}

/// How long passes in flight may take to end once the controller is stopped.
const STOP_GRACE: Duration = Duration::from_secs(5);

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

/// The WorkflowRun controller for one scope (a namespace, or all) and one shard: its runs,
/// their pods, the TTL sweep of its finished runs. When it stops (shutdown, or the shard
/// handed over or lost) its runs' in-process tasks end and what waits of their status is
/// written, if the shard is still held, or dropped.
pub async fn controller(
    client: Client,
    scope: Option<String>,
    catalog: super::catalog::Catalog,
    shared: Arc<Shared>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    shard: u32,
) {
    let selector = crate::shards::selector(shard, shared.ownership.shards());
    let with_shard = |labels: &str| match &selector {
        Some(sel) => format!("{labels},{sel}"),
        None => labels.to_string(),
    };
    // The caches keep only what the controller reads (see `finished::slim_*`): memory stays
    // flat with many finished runs.
    let (pod_reader, pod_writer) = reflector::store();
    // Paged, like the Agent controller's: pods of finished runs stay until their run is deleted.
    let pod_stream = watcher(
        api_for(&client, &scope),
        watcher::Config::default().labels(&with_shard(naming::LABEL_RUN)).page_size(500),
    )
    .backoff(WatchBackoff::default())
    .modify(finished::slim_pod)
    .reflect(pod_writer)
    .touched_objects();
    let wf_reader = catalog.workflows.clone();
    let (runs, run_writer) = reflector::store();
    let expectations = children::Expectations::default();
    let active = with_shard(&format!("!{}", naming::LABEL_FINISHED));
    let run_stream = watcher(
        api_for::<WorkflowRun>(&client, &scope),
        watcher::Config::default().labels(&active).served_from_watch_cache(),
    )
    .backoff(WatchBackoff::default())
    .modify(finished::slim_run)
    .reflect(run_writer)
    .inspect_ok({
        // A child run leaves this cache when its end is written (it is labelled finished):
        // that wakes its parent, which reads the child's end from the API. The reconcile that
        // sees the child's end in the cache may come too late to find it there.
        // And the status writer forgets the run it kept until the cache dropped it.
        let (admission, status, expected) = (shared.admission.clone(), shared.status.clone(), expectations.clone());
        move |event| {
            if let watcher::Event::Delete(run) = event {
                status.forget(&run.uid().unwrap_or_default());
                if let Some(parent) = children::parent_of(run) {
                    lock(&expected).remove(&run.name_any());
                    admission.scopes.wake(&run.namespace().unwrap_or_default(), parent);
                }
            }
        }
    })
    .touched_objects();
    // Passes of different runs run in parallel, bounded: a burst of new runs does not open
    // thousands of requests at once.
    let controller = Controller::for_stream(run_stream, runs.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(64));
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<ObjectRef<WorkflowRun>>();
    let registered = shared.admission.scopes.add(scope.clone(), runs.clone(), wake_tx);
    let ctx = Arc::new(Ctx {
        runtime: ClusterRuntime::new(
            client.clone(),
            shared.pool.clone(),
            pod_reader.clone(),
            children::Children::new(client.clone(), runs.clone(), wf_reader.clone(), expectations),
            resources::Resources::new(client.clone(), {
                let admission = shared.admission.clone();
                Arc::new(move |ns: &str, name: &str| admission.scopes.wake(ns, name))
            }),
            shared.fence(),
        ),
        outputs: Outputs::new(client.clone(), shared.inline_output_limit),
        client,
        shared: shared.clone(),
        workflows: wf_reader.clone(),
        agents: catalog.agents.clone(),
        dags: Default::default(),
    });

    // Readiness: every cache synced.
    let synced = {
        let (runs, pods, health) = (runs.clone(), pod_reader, health.clone());
        async move {
            wait_ready(&runs).await;
            wait_ready(&pods).await;
            catalog.ready().await;
            health.synced.store(true, std::sync::atomic::Ordering::Relaxed);
            info!("WorkflowRun controller caches synced");
        }
    };
    tokio::spawn(synced);

    // Finished runs: TTL and counts.
    let finished_counts = finished::Counts::default();
    lock(&shared.finished).push(finished_counts.clone());
    let sweeper = tokio::spawn(finished::sweep_finished(
        ctx.client.clone(),
        scope.clone(),
        with_shard(naming::LABEL_FINISHED),
        finished_counts.clone(),
    ));

    let stop = shutdown.clone();
    let stream = controller
        .owns_stream(pod_stream)
        .reconcile_on(futures::stream::poll_fn(move |cx| wake_rx.poll_recv(cx)))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx.clone());
    // Passes in flight may end within STOP_GRACE of the stop; a pass stuck on an API server that
    // does not answer is dropped then (as if the process had stopped), so that a shard handed
    // over or lost never keeps this replica from running the shards it holds.
    let drained = drain("workflowrun", stream);
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => {}
        _ = async { shutdown.cancelled().await; tokio::time::sleep(STOP_GRACE).await } => {
            warn!(shard, "passes in flight did not end within {STOP_GRACE:?} of the stop; dropping them");
        }
    }
    sweeper.abort();
    shared.admission.scopes.remove(registered);
    lock(&shared.finished).retain(|c| !Arc::ptr_eq(c, &finished_counts));
    let uids: Vec<String> = runs.state().iter().filter_map(|r| r.uid()).collect();
    for uid in &uids {
        shared.pool.forget_run(uid);
    }
    // Handed over (or shutting down): write what waits while the Lease is still held. Lost:
    // nothing may be written; the new holder starts from what was.
    if shared.ownership.holds(shard) {
        shared.status.flush(&uids, Duration::from_secs(10)).await;
    }
    for uid in &uids {
        ctx.release(uid);
        shared.status.forget(uid);
    }
}
