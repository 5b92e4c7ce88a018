//! Admission and queueing of runs, once for the operator whatever the number of watched
//! namespaces: a Workflow's `concurrency.maxRuns` (Queue or Forbid) and the operator-wide
//! `--max-concurrent-runs`; queued runs start by priority, then age. Also the wakers that
//! route "look at this run again" to the controller of the run's scope.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{ConcurrencyPolicy, RunPhase, WorkflowRun, WorkflowSpec};

use super::lock;

/// What admission decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    Queue(String),
    Forbid(String),
}

/// A scope's (and shard's) run cache and the channel that wakes its controller.
type Scope = (u64, Option<String>, Store<WorkflowRun>, UnboundedSender<ObjectRef<WorkflowRun>>);

/// The run controllers of every scope and shard.
#[derive(Default)]
pub struct Scopes(Mutex<(u64, Vec<Scope>)>);

impl Scopes {
    /// Registers a controller; the id removes it when it stops.
    pub fn add(
        &self,
        scope: Option<String>,
        runs: Store<WorkflowRun>,
        wake: UnboundedSender<ObjectRef<WorkflowRun>>,
    ) -> u64 {
        let mut scopes = lock(&self.0);
        scopes.0 += 1;
        let id = scopes.0;
        scopes.1.push((id, scope, runs, wake));
        id
    }

    pub fn remove(&self, id: u64) {
        lock(&self.0).1.retain(|s| s.0 != id);
    }

    /// Asks the controllers of the run's namespace to reconcile it (with shards, the one whose
    /// shard holds it; the others do not find it in their caches).
    pub fn wake(&self, namespace: &str, name: &str) {
        for (_, scope, _, wake) in lock(&self.0).1.iter() {
            if scope.as_deref().is_none_or(|s| s == namespace) {
                let _ = wake.send(ObjectRef::new(name).within(namespace));
            }
        }
    }

    /// The active runs of every scope, as cached.
    pub fn runs(&self) -> Vec<std::sync::Arc<WorkflowRun>> {
        lock(&self.0).1.iter().flat_map(|(_, _, runs, _)| runs.state()).collect()
    }
}

/// Admission across the operator.
pub struct Admitter {
    max_concurrent_runs: u32,
    /// Runs admitted by this process (uid -> workflow key), until they finish.
    admitted: Mutex<HashMap<String, String>>,
    pub scopes: Scopes,
}

/// The key of the Workflow a run counts against (empty for an inline spec).
fn workflow_key(run: &WorkflowRun) -> String {
    run.spec
        .workflow_ref
        .as_ref()
        .map(|r| format!("{}/{}", run.namespace().unwrap_or_default(), r.name))
        .unwrap_or_default()
}

impl Admitter {
    pub fn new(max_concurrent_runs: u32) -> Self {
        Self { max_concurrent_runs, admitted: Default::default(), scopes: Scopes::default() }
    }

    /// A run found running (admitted before a restart) holds its slot.
    pub fn hold(&self, run: &WorkflowRun) {
        lock(&self.admitted).entry(run.uid().unwrap_or_default()).or_insert_with(|| workflow_key(run));
    }

    /// Whether `run` may start now.
    pub fn admit(&self, run: &WorkflowRun, spec: &WorkflowSpec) -> Admission {
        let uid = run.uid().unwrap_or_default();
        let wf_key = workflow_key(run);
        let mut admitted = lock(&self.admitted);
        if admitted.contains_key(&uid) {
            return Admission::Admit;
        }
        // A child run (a `workflow` step's) starts at once: its parent holds a slot and waits
        // for it, so queueing it behind other runs could stall them all.
        if super::children::parent_of(run).is_some() {
            admitted.insert(uid, wf_key);
            return Admission::Admit;
        }
        let all = self.scopes.runs();
        // Runs holding a slot: admitted here, or active in the cache (admitted before a restart).
        let mut active: HashMap<String, String> = admitted.clone();
        for r in &all {
            let phase = r.status.as_ref().map(|s| s.phase).unwrap_or_default();
            if matches!(phase, RunPhase::Running | RunPhase::Suspended) {
                active.insert(r.uid().unwrap_or_default(), workflow_key(r));
            }
        }
        let global_full = self.max_concurrent_runs > 0 && active.len() >= self.max_concurrent_runs as usize;
        let limit = spec.concurrency.as_ref().filter(|c| c.policy != ConcurrencyPolicy::Allow && !wf_key.is_empty());
        let wf_active = active.values().filter(|k| **k == wf_key).count();
        let wf_full = limit.is_some_and(|c| wf_active >= c.max_runs as usize);
        if let Some(c) = limit.filter(|_| wf_full) {
            return match c.policy {
                ConcurrencyPolicy::Forbid => Admission::Forbid(format!(
                    "workflow already has {} active runs (concurrency.maxRuns) and its policy is Forbid",
                    c.max_runs
                )),
                _ => {
                    Admission::Queue(format!("waiting: the workflow's concurrency.maxRuns ({}) is reached", c.max_runs))
                }
            };
        }
        if global_full {
            return Admission::Queue(format!(
                "waiting: the operator's limit of {} concurrent runs is reached",
                self.max_concurrent_runs
            ));
        }
        // Fairness: a waiting run of higher priority (or older at equal priority) goes first.
        let order = |r: &WorkflowRun| (-r.spec.priority, r.creation_timestamp().map(|t| t.0), r.name_any());
        let mine = order(run);
        let better_waiting = all.iter().any(|r| {
            let phase = r.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let competes = limit.is_some() && workflow_key(r) == wf_key;
            let waiting = phase == RunPhase::Queued
                && r.uid() != run.uid()
                && !admitted.contains_key(&r.uid().unwrap_or_default());
            waiting && (competes || self.max_concurrent_runs > 0) && order(r) < mine
        });
        let slots_left_wf = limit.map_or(usize::MAX, |c| (c.max_runs as usize).saturating_sub(wf_active));
        if better_waiting && slots_left_wf <= 1 {
            return Admission::Queue("waiting: runs with a higher priority are queued first".into());
        }
        admitted.insert(uid, wf_key);
        Admission::Admit
    }

    /// Frees a run's slot and wakes the queued runs; whether it held one.
    pub fn release(&self, uid: &str) -> bool {
        let was = lock(&self.admitted).remove(uid).is_some();
        if was {
            for r in self.scopes.runs() {
                if r.status.as_ref().is_some_and(|s| s.phase == RunPhase::Queued) {
                    self.scopes.wake(&r.namespace().unwrap_or_default(), &r.name_any());
                }
            }
        }
        was
    }
}
