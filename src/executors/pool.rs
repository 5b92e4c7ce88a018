//! The bounded pool of in-process tasks. Tasks never run on the reconcile loop: a reconcile
//! spawns them here, and their results wait in an inbox until the run's next reconcile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::engine::{Event, TaskStart};

use super::InProcessRunner;

/// Called when a task of a run finished, with the run's (namespace, name).
pub type Notify = Arc<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Default)]
struct State {
    /// (run uid, step key) -> (attempt, handle)
    live: HashMap<(String, String), (u32, AbortHandle)>,
    /// run uid -> finished results not yet taken by a reconcile
    inbox: HashMap<String, Vec<Event>>,
}

/// A bounded pool of in-process tasks with an inbox of results per run.
#[derive(Clone)]
pub struct TaskPool {
    state: Arc<Mutex<State>>,
    permits: Arc<Semaphore>,
    runner: Arc<InProcessRunner>,
    notify: Notify,
}

/// Where a task belongs.
#[derive(Debug, Clone)]
pub struct RunRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl TaskPool {
    pub fn new(limit: usize, runner: Arc<InProcessRunner>, notify: Notify) -> Self {
        Self { state: Default::default(), permits: Arc::new(Semaphore::new(limit.max(1))), runner, notify }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `task` unless the same attempt is already running (starting twice is a no-op).
    pub fn spawn(&self, run: RunRef, task: TaskStart) {
        let key = (run.uid.clone(), task.key.clone());
        let mut state = self.lock();
        if let Some((attempt, handle)) = state.live.get(&key) {
            if *attempt == task.attempt && !handle.is_finished() {
                return;
            }
            handle.abort();
        }
        let pool = self.clone();
        let attempt = task.attempt;
        let handle = tokio::spawn(async move {
            let permit = pool.permits.clone().acquire_owned().await;
            let outcome = pool.runner.run(&run.namespace, &task.work, task.timeout).await;
            drop(permit);
            let event = super::outcome_event(task.key.clone(), attempt, outcome);
            {
                let mut state = pool.lock();
                let k = (run.uid.clone(), task.key.clone());
                if state.live.get(&k).is_some_and(|(a, _)| *a == attempt) {
                    state.live.remove(&k);
                }
                state.inbox.entry(run.uid.clone()).or_default().push(event);
            }
            (pool.notify)(&run.namespace, &run.name);
        });
        state.live.insert(key, (attempt, handle.abort_handle()));
    }

    /// Aborts an attempt, if it runs.
    pub fn abort(&self, uid: &str, key: &str, attempt: u32) {
        let mut state = self.lock();
        let k = (uid.to_string(), key.to_string());
        if state.live.get(&k).is_some_and(|(a, _)| *a == attempt)
            && let Some((_, handle)) = state.live.remove(&k)
        {
            handle.abort();
        }
    }

    /// Whether the attempt is running here or has a result waiting.
    pub fn knows(&self, uid: &str, key: &str, attempt: u32) -> bool {
        let state = self.lock();
        state.live.get(&(uid.to_string(), key.to_string())).is_some_and(|(a, _)| *a == attempt)
            || state.inbox.get(uid).is_some_and(|evs| {
                evs.iter().any(|e| matches!(e, Event::Succeeded { key: k, attempt: a, .. } | Event::Failed { key: k, attempt: a, .. } if k == key && *a == attempt))
            })
    }

    /// Takes the results waiting for a run.
    pub fn drain(&self, uid: &str) -> Vec<Event> {
        self.lock().inbox.remove(uid).unwrap_or_default()
    }

    /// Puts results back (the reconcile that took them failed to record them).
    pub fn restore(&self, uid: &str, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let mut state = self.lock();
        let inbox = state.inbox.entry(uid.to_string()).or_default();
        let newer = std::mem::take(inbox);
        *inbox = events;
        inbox.extend(newer);
    }

    /// Aborts every task of a run and drops its results.
    pub fn forget_run(&self, uid: &str) {
        let mut state = self.lock();
        state.live.retain(|(u, _), (_, h)| {
            if u == uid {
                h.abort();
                false
            } else {
                true
            }
        });
        state.inbox.remove(uid);
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        self.lock().live.len()
    }

    /// Waits until no task runs (for tests and shutdown), at most `limit`.
    pub async fn idle(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
