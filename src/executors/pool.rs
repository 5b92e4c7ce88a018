//! The bounded pool of in-process tasks, shared by every run of the process (the operator's,
//! or local mode's). Tasks never run on a pass: a pass spawns them here, and their results
//! wait in an inbox until the run's next pass. A task that panics ends as a failed attempt
//! whose message says so (retried as the step's retry policy says), never as an attempt that
//! waits for its timeout.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::api::{StepKind, StepPhase, StepStatus, WorkflowRunStatus, WorkflowSpec};
use crate::engine::{Dag, Event, RunInfo, TaskStart};
use crate::pass::{Started, StepRuntime};

use super::{Failure, TaskExecutor};

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
    runner: Arc<dyn TaskExecutor>,
    notify: Notify,
}

impl TaskPool {
    /// A pool running at most `limit` tasks at once (0: no limit of its own) through `runner`;
    /// `notify` is called with a run's (namespace, name) when one of its tasks finished.
    pub fn new(limit: usize, runner: Arc<dyn TaskExecutor>, notify: Notify) -> Self {
        let permits = if limit == 0 { Semaphore::MAX_PERMITS } else { limit };
        Self { state: Default::default(), permits: Arc::new(Semaphore::new(permits)), runner, notify }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `task` unless the same attempt is already running or has a result waiting
    /// (starting twice is a no-op: a pass whose status write failed starts its attempts again).
    pub fn spawn(&self, run: RunInfo, task: TaskStart) {
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
            let outcome =
                AssertUnwindSafe(crate::agents::in_run(&run, &task.key, attempt, pool.runner.run(&run, &task)))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| Err(Failure::retryable(panic_message(panic.as_ref()))));
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

    /// Running attempts of a run that this pool neither runs nor holds a result of, among the
    /// rows `runs_here` says this pool would run: their work was lost (the operator restarted,
    /// or a pass started them and its status write never landed). The engine runs them again.
    pub fn lost(&self, uid: &str, status: &WorkflowRunStatus, runs_here: impl Fn(&str) -> bool) -> Vec<Event> {
        status
            .steps
            .iter()
            .filter(|(key, row)| row.phase == StepPhase::Running && row.items.is_none() && runs_here(key))
            .filter(|(key, row)| !self.knows(uid, key, row.attempts))
            .map(|(key, row)| Event::Lost { key: key.clone(), attempt: row.attempts })
            .collect()
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

/// Every attempt runs on the pool: local mode's runtime (container steps as processes, through
/// the pool's executor). The controller's runtime adds pods to it.
impl StepRuntime for TaskPool {
    type Error = std::convert::Infallible;

    fn take(&self, run: &RunInfo) -> Vec<Event> {
        self.drain(&run.uid)
    }

    fn give_back(&self, run: &RunInfo, events: Vec<Event>) {
        self.restore(&run.uid, events);
    }

    fn observe<'a>(
        &'a self,
        run: &'a RunInfo,
        _spec: &'a WorkflowSpec,
        _dag: &'a Dag,
        status: &'a WorkflowRunStatus,
    ) -> BoxFuture<'a, Result<Vec<Event>, Self::Error>> {
        Box::pin(async move { Ok(self.lost(&run.uid, status, |_| true)) })
    }

    fn start<'a>(
        &'a self,
        run: &'a RunInfo,
        task: &'a TaskStart,
        _kind: Option<StepKind>,
    ) -> BoxFuture<'a, Result<Started, Self::Error>> {
        self.spawn(run.clone(), task.clone());
        Box::pin(async { Ok(Started::Running { pod: None }) })
    }

    fn abort<'a>(
        &'a self,
        run: &'a RunInfo,
        key: &'a str,
        attempt: u32,
        _kind: Option<StepKind>,
        _row: Option<&'a StepStatus>,
    ) -> BoxFuture<'a, Result<(), Self::Error>> {
        TaskPool::abort(self, &run.uid, key, attempt);
        Box::pin(async { Ok(()) })
    }
}

/// The failure message of a panicked task.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("the step's executor panicked: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executors::InProcessRunner;
    use crate::executors::http::HttpExecutor;

    /// A pass whose status write failed starts its attempts again: an attempt whose result
    /// waits in the inbox must not run a second time.
    #[tokio::test]
    async fn an_attempt_with_a_result_waiting_is_not_run_again() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // No agent caller: every agent task ends at once with a failure, which is a result.
        let runner = Arc::new(InProcessRunner::new(HttpExecutor::new(), None));
        let pool = TaskPool::new(4, runner, Arc::new(|_: &str, _: &str| {}));
        let run = RunInfo { namespace: "ns".into(), name: "r".into(), uid: "u".into(), ..Default::default() };
        pool.spawn(run.clone(), TaskStart::agent_for_tests(1));
        pool.idle(Duration::from_secs(5)).await;
        assert!(pool.knows("u", "ask", 1), "the result waits");
        pool.spawn(run.clone(), TaskStart::agent_for_tests(1));
        pool.idle(Duration::from_secs(5)).await;
        assert_eq!(pool.drain("u").len(), 1, "the attempt ran once");
        // Once taken, a new attempt runs.
        pool.spawn(run, TaskStart::agent_for_tests(2));
        pool.idle(Duration::from_secs(5)).await;
        assert_eq!(pool.drain("u").len(), 1);
    }

    struct Panics;
    impl TaskExecutor for Panics {
        fn run<'a>(
            &'a self,
            _: &'a RunInfo,
            _: &'a TaskStart,
        ) -> futures::future::BoxFuture<'a, super::super::Outcome> {
            Box::pin(async { panic!("boom") })
        }
    }

    /// A panicking executor ends the attempt as a failure that says so, and frees its entry.
    #[tokio::test]
    async fn a_panic_is_a_failed_attempt() {
        let pool = TaskPool::new(1, Arc::new(Panics), Arc::new(|_: &str, _: &str| {}));
        let run = RunInfo { namespace: "ns".into(), name: "r".into(), uid: "u".into(), ..Default::default() };
        pool.spawn(run, TaskStart::agent_for_tests(1));
        pool.idle(Duration::from_secs(5)).await;
        assert_eq!(pool.running(), 0, "no live entry is left behind");
        match pool.drain("u").as_slice() {
            [Event::Failed { attempt: 1, message, retryable: true, .. }] => {
                assert_eq!(message, "the step's executor panicked: boom")
            }
            other => panic!("one failure expected, got {other:?}"),
        }
    }
}
