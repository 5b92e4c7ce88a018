//! One pass of a run, shared by the WorkflowRun controller and local mode.
//!
//! A pass takes what happened to the run's attempts from its [`StepRuntime`] (results of
//! in-process tasks, pod outcomes, attempts lost to a restart), stores cacheable results, asks
//! the engine ([`engine::advance`]) what to do, answers cacheable starts from the cache, and
//! starts and aborts the rest through the runtime. Cache hits finish their steps at once, so
//! their dependents may start in the same pass. It returns the transitions, when to come back
//! and the results it took, which go back to the runtime unless the caller records them
//! ([`Outcome::recorded`]): a pass whose status is never written must not lose them.
//!
//! The controller calls it between dereferencing the run and staging its status; local mode
//! calls it in a loop that waits for the next result. Neither restates what happens here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::api::{Agent, KState, RunPhase, StepKind, StepStatus, WorkflowRunStatus, WorkflowSpec, set_kstatus};
use crate::cache::{self, Entry, StepCache};
use crate::engine::{self, Action, Dag, Event, Input, RunInfo, TaskStart, Transition};

/// Where attempts run: in this process (agent, http, and container steps as local processes)
/// and, in the cluster, as pods. Implemented by the controller's runtime and local mode's.
pub trait StepRuntime: Send + Sync {
    /// Errors of the runtime's I/O (the pass fails and is tried again).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Takes the results of the run's attempts that finished since the last pass.
    fn take(&self, run: &RunInfo) -> Vec<Event>;

    /// Puts results back that a pass took and could not record.
    fn give_back(&self, run: &RunInfo, events: Vec<Event>);

    /// What the runtime sees of the run's running attempts besides the results it took: pods
    /// that ended, and attempts that nothing runs any more ([`Event::Lost`]).
    fn observe<'a>(
        &'a self,
        run: &'a RunInfo,
        spec: &'a WorkflowSpec,
        dag: &'a Dag,
        status: &'a WorkflowRunStatus,
    ) -> BoxFuture<'a, Result<Vec<Event>, Self::Error>>;

    /// Starts an attempt. Idempotent by (key, attempt): starting it twice runs it once.
    fn start<'a>(
        &'a self,
        run: &'a RunInfo,
        task: &'a TaskStart,
        kind: Option<StepKind>,
    ) -> BoxFuture<'a, Result<Started, Self::Error>>;

    /// Stops an attempt, if it runs.
    fn abort<'a>(
        &'a self,
        run: &'a RunInfo,
        key: &'a str,
        attempt: u32,
        kind: Option<StepKind>,
        row: Option<&'a StepStatus>,
    ) -> BoxFuture<'a, Result<(), Self::Error>>;
}

/// What starting an attempt did.
#[derive(Debug, Clone, PartialEq)]
pub enum Started {
    /// It runs; in the cluster, as this pod.
    Running { pod: Option<String> },
    /// It runs as this object (`Kind/name`): a child WorkflowRun, a resource step's object.
    RunningAs { object: String },
    /// It ended at once (refused for good, for example): its result.
    Ended(Event),
}

impl Started {
    /// The attempt was refused for good (a bad manifest, a cycle, a pod that cannot be built):
    /// it fails at once with `message`, without a retry.
    pub fn refused(task: &TaskStart, message: impl Into<String>) -> Started {
        Started::Ended(Event::Failed {
            key: task.key.clone(),
            attempt: task.attempt,
            message: message.into(),
            retryable: false,
            info: Default::default(),
        })
    }
}

/// Cache keys of running cacheable attempts, by (run uid, step key, attempt): their results
/// are stored when they succeed. One per process (the operator's runs share it).
#[derive(Default)]
pub struct PendingCache(Mutex<HashMap<AttemptKey, (String, Option<Duration>)>>);

/// (run uid, step key, attempt).
type AttemptKey = (String, String, u32);

impl PendingCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, (String, Option<Duration>)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, uid: &str, key: &str, attempt: u32, cache_key: String, ttl: Option<Duration>) {
        self.lock().insert((uid.to_string(), key.to_string(), attempt), (cache_key, ttl));
    }

    fn take(&self, uid: &str, key: &str, attempt: u32) -> Option<(String, Option<Duration>)> {
        self.lock().remove(&(uid.to_string(), key.to_string(), attempt))
    }

    /// Drops a run's entries (it finished or was deleted).
    pub fn forget_run(&self, uid: &str) {
        self.lock().retain(|(u, _, _), _| u != uid);
    }
}

/// Cache lookups and stores of a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub hits: u64,
    pub misses: u64,
    pub stores: u64,
}

/// What a pass needs besides the run: where attempts run, the cache, and the Agents that may
/// serve agent steps (their model and instructions are part of an agent step's cache key).
pub struct Pass<'a, R: StepRuntime> {
    pub runtime: &'a R,
    pub cache: &'a dyn StepCache,
    pub pending: &'a PendingCache,
    /// The Agents of the run's namespace; read only when a cacheable agent step starts.
    pub agents: &'a (dyn Fn() -> Vec<Arc<Agent>> + Send + Sync),
}

/// The result of a pass.
pub struct Outcome<'a, R: StepRuntime> {
    pub transitions: Vec<Transition>,
    /// Pass again after this long even if nothing happens (retries, timeouts).
    pub requeue_after: Option<Duration>,
    pub cache: CacheCounts,
    taken: Taken<'a, R>,
}

impl<R: StepRuntime> Outcome<'_, R> {
    /// The status this pass led to is recorded: the results it took are not given back.
    pub fn recorded(mut self) {
        self.taken.recorded = true;
    }
}

/// Results a pass took from the runtime. They go back unless the pass's status is recorded:
/// a pass that fails (an API error, a refused status write, the apiserver down) would
/// otherwise lose them, and the next pass would take those attempts for lost and run them
/// again.
struct Taken<'a, R: StepRuntime> {
    runtime: &'a R,
    run: RunInfo,
    events: Vec<Event>,
    recorded: bool,
}

impl<R: StepRuntime> Taken<'_, R> {
    /// The result of an attempt, if this pass took one.
    fn result_of(&self, key: &str, attempt: u32) -> Option<&Event> {
        self.events.iter().find(|e| !matches!(e, Event::Lost { .. }) && event_key(e) == (key, attempt))
    }
}

impl<R: StepRuntime> Drop for Taken<'_, R> {
    fn drop(&mut self) {
        if !self.recorded {
            self.runtime.give_back(&self.run, std::mem::take(&mut self.events));
        }
    }
}

/// The (step key, attempt) an event is about.
pub fn event_key(e: &Event) -> (&str, u32) {
    match e {
        Event::Succeeded { key, attempt, .. } | Event::Failed { key, attempt, .. } | Event::Lost { key, attempt } => {
            (key.as_str(), *attempt)
        }
    }
}

impl<'a, R: StepRuntime> Pass<'a, R> {
    /// One pass over the run: `status` becomes the run's new status.
    pub async fn run(&self, input: Input<'_>, status: &mut WorkflowRunStatus) -> Result<Outcome<'a, R>, R::Error> {
        let run = input.run;
        let taken = Taken { runtime: self.runtime, run: run.clone(), events: self.runtime.take(run), recorded: false };
        let mut events = taken.events.clone();
        let observed = self.runtime.observe(run, input.spec, input.dag, status).await?;
        // An attempt whose result this pass took is not lost.
        events.extend(
            observed
                .into_iter()
                .filter(|e| !matches!(e, Event::Lost { key, attempt } if taken.result_of(key, *attempt).is_some())),
        );
        let mut counts = CacheCounts::default();
        self.remember(run, &events, &mut counts).await;
        if status.trace_id.is_empty() && crate::telemetry::enabled() {
            status.trace_id = crate::telemetry::RunTrace::of(&run.uid, run.traceparent.as_deref()).trace_hex();
        }

        let mut decision = engine::advance(input, status, events);
        let mut transitions = std::mem::take(&mut decision.transitions);
        let mut requeue_after = decision.requeue_after;
        // Each round settles at least one step (a hit, or an attempt that ended at once), so
        // this ends.
        loop {
            let settled = self.execute(input, status, &decision.actions, &taken, &mut counts).await?;
            if settled.is_empty() {
                break;
            }
            decision = engine::advance(input, status, settled);
            transitions.append(&mut decision.transitions);
            requeue_after = match (requeue_after, decision.requeue_after) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(Outcome { transitions, requeue_after, cache: counts, taken })
    }

    /// Stores the results of cacheable attempts that just succeeded.
    async fn remember(&self, run: &RunInfo, events: &[Event], counts: &mut CacheCounts) {
        for e in events {
            let Event::Succeeded { key, attempt, output, info } = e else { continue };
            let Some((cache_key, ttl)) = self.pending.take(&run.uid, key, *attempt) else { continue };
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
            self.cache.put(&run.namespace, cache_key, entry, ttl).await;
            counts.stores += 1;
        }
    }

    /// Carries the engine's actions out; returns the results known at once: cache hits,
    /// attempts that already ran (see below) and attempts that ended as they started.
    async fn execute(
        &self,
        input: Input<'_>,
        status: &mut WorkflowRunStatus,
        actions: &[Action],
        taken: &Taken<'a, R>,
        counts: &mut CacheCounts,
    ) -> Result<Vec<Event>, R::Error> {
        let run = input.run;
        let mut settled = Vec::new();
        for action in actions {
            match action {
                Action::Start(task) => {
                    if let Some(spec) = &task.cache {
                        let agents = (self.agents)();
                        let key = cache::work_key(&run.namespace, &task.work, agents.iter().map(|a| &**a));
                        if let Some(hit) = self.cache.get(&run.namespace, &key).await {
                            counts.hits += 1;
                            settled.push(hit.into_hit(task.key.clone(), task.attempt));
                            continue;
                        }
                        counts.misses += 1;
                        let ttl = spec.ttl_seconds.map(|s| Duration::from_secs(u64::from(s)));
                        self.pending.insert(&run.uid, &task.key, task.attempt, key, ttl);
                    }
                    // A pass whose status was never recorded started this attempt, and its
                    // result came back before this pass started it again (the engine saw that
                    // result as stale): use it rather than run the attempt twice.
                    if let Some(result) = taken.result_of(&task.key, task.attempt) {
                        tracing::debug!(run = %run.name, step = %task.key, attempt = task.attempt, "the attempt ran already");
                        settled.push(result.clone());
                        continue;
                    }
                    let kind = input.dag.kind_of(input.spec, &task.key);
                    match self.runtime.start(run, task, kind).await? {
                        Started::Running { pod } => {
                            if let (Some(pod), Some(row)) = (pod, status.steps.get_mut(&task.key)) {
                                row.pod = Some(pod);
                            }
                        }
                        Started::RunningAs { object } => {
                            if let Some(row) = status.steps.get_mut(&task.key) {
                                row.object = Some(object);
                            }
                        }
                        Started::Ended(result) => settled.push(result),
                    }
                }
                Action::Abort { key, attempt, .. } => {
                    let kind = input.dag.kind_of(input.spec, key);
                    self.runtime.abort(run, key, *attempt, kind, status.steps.get(key)).await?;
                    self.pending.take(&run.uid, key, *attempt);
                }
            }
        }
        Ok(settled)
    }
}

/// Hash of a Workflow spec, recorded in the run's status (`workflowSpecHash`).
pub fn hash_spec(spec: &WorkflowSpec) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// The run's kstatus conditions (Ready, Reconciling, Stalled) and observed generation, from its
/// phase and message.
pub fn set_conditions(status: &mut WorkflowRunStatus, generation: Option<i64>, now: Timestamp) {
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

#[cfg(test)]
#[path = "pass_tests.rs"]
mod tests;
