//! The controllers: thin reconcilers that read, decide (with [`crate::engine`]), apply and write
//! status. [`run`] starts them all and the HTTP server's readiness follows them.

pub mod agent;
pub mod budget;
mod catalog;
pub mod run;
pub mod schedule;
mod shard_label;
pub mod workflow;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::controller::{self, Action};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use tracing::{info, warn};

use tokio_util::sync::CancellationToken;

use crate::config::RunArgs;
use crate::executors::AgentCaller;
use crate::metrics::Metrics;
use crate::shards::Ownership;

/// Errors of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Json(_) => "json",
            Error::Other(_) => "other",
        }
    }
}

/// What the HTTP server reports: health, readiness and the shared components' state.
#[derive(Default)]
pub struct Health {
    /// Every controller's caches have synced.
    pub synced: AtomicBool,
    /// This replica holds the lease (or leader election is off).
    pub leader: AtomicBool,
    /// The API server answered this replica's latest check: what makes a follower, which runs
    /// no informers, Ready. Set by leader election ([`crate::leader`]).
    pub api_reachable: AtomicBool,
    /// The Lease and this replica's identity, when leader election is on.
    pub election: std::sync::OnceLock<crate::leader::Candidate>,
    /// The step cache, once the controllers have started.
    pub cache: std::sync::OnceLock<Arc<crate::cache::CacheManager>>,
    /// The event log, once the controllers have started.
    pub events: std::sync::OnceLock<Arc<crate::events::EventLog>>,
    /// Component health and live figures.
    pub system: Arc<crate::watcher::SystemWatcher>,
    /// Which shards this replica holds, once the controllers have started.
    pub ownership: std::sync::OnceLock<Arc<Ownership>>,
    /// Who calls the HTTP API and what they may see; unset, the guarded endpoints answer 503.
    pub access: std::sync::OnceLock<Arc<crate::auth::Access>>,
}

impl Health {
    /// Readiness (`/readyz`), whether or not this replica leads: the leader (or the only
    /// replica) once its informers have synced, a follower while the API server answers it.
    pub fn ready(&self) -> bool {
        if self.leader.load(Ordering::Relaxed) {
            self.synced.load(Ordering::Relaxed)
        } else {
            self.api_reachable.load(Ordering::Relaxed)
        }
    }
}

/// The scopes to watch: every namespace, or each listed one.
pub fn scopes(args: &RunArgs) -> Vec<Option<String>> {
    if args.namespaces.is_empty() { vec![None] } else { args.namespaces.iter().cloned().map(Some).collect() }
}

/// Logs a controller's results instead of dropping them.
pub(crate) async fn drain<K, E, E2>(
    name: &'static str,
    stream: impl Stream<Item = Result<(ObjectRef<K>, Action), controller::Error<E, E2>>>,
) where
    K: Resource,
    E: std::error::Error + 'static,
    E2: std::error::Error + 'static,
{
    stream
        .for_each(|res| async move {
            match res {
                Ok(_) => {}
                Err(controller::Error::ReconcilerFailed(err, obj)) => {
                    warn!(controller = name, object = %obj, error = %err, "reconcile failed")
                }
                Err(controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(controller = name, object = %obj, "object gone before reconcile")
                }
                Err(err) => warn!(controller = name, error = ?err, "controller error"),
            }
        })
        .await;
}

/// Events kept for replay at `/api/v1/events`.
pub const EVENT_LOG_SIZE: usize = 10_000;

/// Starts the controllers and runs them until `shutdown` is cancelled.
///
/// Every replica runs the Agent and Budget controllers (their caches feed the LLM calls) and,
/// with shards, the labeller. The WorkflowRun controllers run per shard this replica holds
/// ([`shard_workers`]); shard 0's holder also runs the Workflow and schedule controllers.
/// Without shards there is one shard, held for good (or while this replica leads).
pub async fn run(
    client: Client,
    args: RunArgs,
    metrics: Metrics,
    health: Arc<Health>,
    ownership: Arc<Ownership>,
    shutdown: CancellationToken,
) {
    let _ = health.ownership.set(ownership.clone());
    // Agent steps: the Agent controllers feed the registry, the run controllers call through it.
    let registry = Arc::new(crate::agents::Registry::default());
    // Budgets: the Budget controllers feed the ledger; calls wait until every scope listed.
    let mut budgets = crate::agents::Budgets::waiting_for(scopes(&args).len());
    if ownership.is_sharded() {
        budgets = budgets.sharded(ownership.shards());
    }
    let budgets = Arc::new(budgets);
    budgets.set_suspender(Arc::new(crate::agents::runs::KubeSuspender { client: client.clone() }));
    let caller = crate::agents::LlmCaller::new(
        registry.clone(),
        Arc::new(crate::agents::KubeSecrets::new(client.clone())),
        args.lb_strategy,
    )
    .with_metrics(metrics.llm.clone())
    .with_budgets(budgets.clone());
    let limits = caller.limits().clone();
    let agents: Option<Arc<dyn AgentCaller>> = Some(Arc::new(caller));
    let events = crate::events::EventSink::start(client.clone(), metrics.clone());
    let cache = health
        .cache
        .get_or_init(|| {
            let cache_metrics = crate::cache::CacheMetrics::register(&metrics.registry);
            let tier = crate::cache::ConfigMapTier::new(client.clone());
            Arc::new(crate::cache::CacheManager::new(&args.cache.settings(), cache_metrics, Some(tier)))
        })
        .clone();
    let log = health
        .events
        .get_or_init(|| {
            Arc::new(crate::events::EventLog::with_store(
                EVENT_LOG_SIZE,
                client.clone(),
                scopes(&args),
                metrics.clone(),
            ))
        })
        .clone();
    let mut handlers: Vec<(i32, Arc<dyn crate::events::Handler>)> =
        vec![(0, log), (10, Arc::new(crate::events::KubernetesEvents::new(events.clone(), args.event_window)))];
    if let Some(url) = &args.cloudevents_url {
        handlers.push((20, Arc::new(crate::events::CloudEventsSink::new(url.clone(), metrics.clone()))));
    }
    let dispatcher = crate::events::Dispatcher::start(handlers, metrics.clone());
    cache.publish_to(dispatcher.clone());
    let mut tasks = Vec::new();
    if ownership.is_sharded() {
        tasks.push(tokio::spawn(rate_limit_share(limits, ownership.clone(), shutdown.clone())));
    }
    tasks.push(tokio::spawn(health.system.clone().run(
        client.clone(),
        scopes(&args),
        metrics.clone(),
        args.health_check_interval,
        shutdown.clone(),
    )));
    // One task pool, status writer and admission for the whole operator, whatever the scopes.
    let shared =
        run::Shared::new(&client, &args, metrics.clone(), dispatcher.clone(), agents, cache.clone(), ownership.clone())
            .await;
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(shared.clone().write_status(writer_stop.clone()));
    let gauges = tokio::spawn(shared.clone().gauges());
    let mut catalogs = Vec::new();
    for scope in scopes(&args) {
        let (catalog, task) = catalog::Catalog::start(&client, &scope, shutdown.clone());
        tasks.push(task);
        catalogs.push((scope.clone(), catalog.clone()));
        info!(namespace = scope.as_deref().unwrap_or("<all>"), "starting controllers");
        let where_ = scope.clone().unwrap_or_else(|| "all-namespaces".into());
        let name = |kind: &str| format!("controller/{kind}/{where_}");
        tasks.push(tokio::spawn(supervised(
            health.clone(),
            name("agent"),
            agent::controller(
                client.clone(),
                scope.clone(),
                metrics.clone(),
                events.clone(),
                registry.clone(),
                agent::AgentSettings {
                    resync: args.health_check_interval,
                    load_interval: args.metrics_interval,
                    own_port: (!args.http_step.allow_own_port).then(|| args.http_addr.port()),
                    ownership: ownership.clone(),
                },
                shutdown.clone(),
            ),
        )));
        tasks.push(tokio::spawn(supervised(
            health.clone(),
            name("budget"),
            budget::controller(
                client.clone(),
                scope.clone(),
                metrics.clone(),
                budgets.clone(),
                args.budget_flush_interval,
                ownership.clone(),
                shutdown.clone(),
            ),
        )));
        if ownership.is_sharded() {
            tasks.push(tokio::spawn(supervised(
                health.clone(),
                name("shard-labeller"),
                shard_label::controller(
                    client.clone(),
                    scope.clone(),
                    catalog.workflows.clone(),
                    ownership.clone(),
                    shutdown.clone(),
                ),
            )));
        }
    }
    let workers = Workers {
        client: client.clone(),
        metrics,
        health: health.clone(),
        shared,
        events,
        budgets,
        ownership: ownership.clone(),
        catalogs,
    };
    tasks.push(tokio::spawn(shard_workers(workers, ownership, shutdown.clone())));
    for res in futures::future::join_all(tasks).await {
        if let Err(e) = res {
            warn!(error = %e, "controller task ended abnormally");
        }
    }
    // What waits is written once no pass can stage more.
    writer_stop.cancel();
    let _ = writer.await;
    // And the events that wait for their run's ConfigMap.
    if let Some(log) = health.events.get() {
        log.flush().await;
    }
    gauges.abort();
}

/// What a shard's controllers are made of.
struct Workers {
    client: Client,
    metrics: Metrics,
    health: Arc<Health>,
    shared: Arc<run::Shared>,
    events: crate::events::EventSink,
    budgets: Arc<crate::agents::Budgets>,
    ownership: Arc<Ownership>,
    /// Each scope's Workflows and Agents, shared by the shards' controllers.
    catalogs: Vec<(Option<String>, catalog::Catalog)>,
}

impl Workers {
    /// The controllers of one shard, in every scope, until `stop`.
    async fn shard(&self, shard: u32, stop: CancellationToken) {
        let mut tasks = Vec::new();
        for (scope, catalog) in &self.catalogs {
            let where_ = scope.clone().unwrap_or_else(|| "all-namespaces".into());
            let sharded = self.ownership.is_sharded();
            let name = |kind: &str| {
                if sharded {
                    format!("controller/{kind}/{where_}/shard-{shard}")
                } else {
                    format!("controller/{kind}/{where_}")
                }
            };
            let client = self.client.clone();
            tasks.push(tokio::spawn(supervised(
                self.health.clone(),
                name("workflowrun"),
                run::controller(
                    client.clone(),
                    scope.clone(),
                    catalog.clone(),
                    self.shared.clone(),
                    self.health.clone(),
                    stop.clone(),
                    shard,
                ),
            )));
            // What must happen once: shard 0's holder.
            if shard == 0 {
                tasks.push(tokio::spawn(supervised(
                    self.health.clone(),
                    name("workflow"),
                    workflow::controller(client.clone(), scope.clone(), self.metrics.clone(), stop.clone()),
                )));
                tasks.push(tokio::spawn(supervised(
                    self.health.clone(),
                    name("workflowschedule"),
                    schedule::controller(
                        client,
                        scope.clone(),
                        self.metrics.clone(),
                        self.events.clone(),
                        stop.clone(),
                    ),
                )));
            }
        }
        futures::future::join_all(tasks).await;
        // Handed over (or shutting down): what its calls spent, while the Lease is still held.
        if self.ownership.is_sharded() && self.ownership.holds(shard) {
            let (client, budgets, ownership) = (&self.client, &self.budgets, &self.ownership);
            let write = budget::write_shares(client, budgets, ownership, &self.metrics, None, Some(shard));
            match tokio::time::timeout(Duration::from_secs(10), write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(shard, error = %e, "writing the shard's Budget shares"),
                Err(_) => warn!(shard, "writing the shard's Budget shares took over 10 s"),
            }
        }
    }
}

/// Starts each shard's controllers when this replica gets the shard and stops them when it
/// hands the shard over or loses it; reports which run to [`Ownership::set_running`].
async fn shard_workers(workers: Workers, ownership: Arc<Ownership>, shutdown: CancellationToken) {
    let workers = Arc::new(workers);
    let mut assigned = ownership.assigned();
    let mut running: BTreeMap<u32, (CancellationToken, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    // Shards whose controllers are stopping: one that stops slowly keeps no other from starting.
    let mut stopping = tokio::task::JoinSet::new();
    let mut stopping_shards = std::collections::BTreeSet::new();
    loop {
        let want = assigned.borrow_and_update().clone();
        let gone: Vec<u32> = running.keys().filter(|s| !want.contains(s)).copied().collect();
        for shard in gone {
            if let Some((token, handle)) = running.remove(&shard) {
                info!(shard, "stopping the controllers of a shard");
                token.cancel();
                stopping_shards.insert(shard);
                stopping.spawn(async move {
                    let _ = handle.await;
                    shard
                });
            }
        }
        for shard in want {
            // A shard taken back while its controllers still stop starts once they have.
            if running.contains_key(&shard) || stopping_shards.contains(&shard) {
                continue;
            }
            info!(shard, "starting the controllers of a shard");
            let token = shutdown.child_token();
            ownership.set_running(shard, true);
            let (w, t) = (workers.clone(), token.clone());
            running.insert(shard, (token, tokio::spawn(async move { w.shard(shard, t).await })));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = assigned.changed() => if changed.is_err() { break },
            Some(stopped) = stopping.join_next() => {
                if let Ok(shard) = stopped {
                    stopping_shards.remove(&shard);
                    if !running.contains_key(&shard) {
                        ownership.set_running(shard, false);
                    }
                }
            }
        }
    }
    for (_, (token, _)) in running.iter() {
        token.cancel();
    }
    for (shard, (_, handle)) in running {
        let _ = handle.await;
        ownership.set_running(shard, false);
    }
    while let Some(stopped) = stopping.join_next().await {
        if let Ok(shard) = stopped {
            ownership.set_running(shard, false);
        }
    }
}

/// With shards: each Agent's rate limits, this replica's part of them follows the part of the
/// shards it runs.
async fn rate_limit_share(limits: Arc<crate::agents::Limits>, ownership: Arc<Ownership>, shutdown: CancellationToken) {
    let mut assigned = ownership.assigned();
    loop {
        let held = assigned.borrow_and_update().len().max(1);
        limits.set_share(held as f64 / f64::from(ownership.shards()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = assigned.changed() => if changed.is_err() { return },
        }
    }
}

/// Runs a controller, telling the system watcher whether it is alive.
async fn supervised(health: Arc<Health>, name: String, controller: impl std::future::Future<Output = ()>) {
    health.system.set(&name, true, "running");
    controller.await;
    health.system.set(&name, false, "stopped");
}

/// Requeue after an error: a transient API error retries soon, with jitter.
pub(crate) fn error_requeue() -> Action {
    use rand::Rng;
    let ms = rand::rng().random_range(500..2500);
    Action::requeue(Duration::from_millis(ms))
}
