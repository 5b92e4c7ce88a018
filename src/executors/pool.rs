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

impl State {
    /// Whether a result of the attempt waits in the inbox.
    fn has_result(&self, uid: &str, key: &str, attempt: u32) -> bool {
        self.inbox.get(uid).is_some_and(|evs| {
            evs.iter().any(|e| matches!(e, Event::Succeeded { key: k, attempt: a, .. } | Event::Failed { key: k, attempt: a, .. } if k == key && *a == attempt))
        })
    }
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

    /// Spawns `task` unless the same attempt is already running or has a result waiting
    /// (starting twice is a no-op: a pass whose status write failed starts its attempts again).
    pub fn spawn(&self, run: RunRef, task: TaskStart) {
        let key = (run.uid.clone(), task.key.clone());
        let mut state = self.lock();
        if state.has_result(&run.uid, &task.key, task.attempt) {
            return;
        }
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
            || state.has_result(uid, key, attempt)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Work;
    use crate::executors::http::HttpExecutor;

    fn task(attempt: u32) -> TaskStart {
        TaskStart {
            key: "ask".into(),
            step_id: "ask".into(),
            index: None,
            attempt,
            work: Work::Agent { agent: Some("a".into()), selector: None, strategy: None, prompt: "hi".into() },
            timeout: None,
            cache: None,
        }
    }

    /// A pass whose status write failed starts its attempts again: an attempt whose result
    /// waits in the inbox must not run a second time.
    #[tokio::test]
    async fn an_attempt_with_a_result_waiting_is_not_run_again() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // No agent caller: every agent task ends at once with a failure, which is a result.
        let runner = Arc::new(InProcessRunner::new(HttpExecutor::new(), None));
        let pool = TaskPool::new(4, runner, Arc::new(|_: &str, _: &str| {}));
        let run = RunRef { namespace: "ns".into(), name: "r".into(), uid: "u".into() };
        pool.spawn(run.clone(), task(1));
        pool.idle(Duration::from_secs(5)).await;
        assert!(pool.knows("u", "ask", 1), "the result waits");
        pool.spawn(run.clone(), task(1));
        pool.idle(Duration::from_secs(5)).await;
        assert_eq!(pool.drain("u").len(), 1, "the attempt ran once");
        // Once taken, a new attempt runs.
        pool.spawn(run, task(2));
        pool.idle(Duration::from_secs(5)).await;
        assert_eq!(pool.drain("u").len(), 1);
    }
}
