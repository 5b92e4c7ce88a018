//! Wait loops: for any condition, for an object of the API, for a run to finish.

use std::future::Future;
use std::time::Duration;

use kube::Resource;
use kube::api::Api;
use serde::de::DeserializeOwned;
use volt_operator::api::{WorkflowRun, WorkflowRunStatus};

/// Polls `check` every 100 ms until it returns `Some`, and returns that; panics with `what` after
/// `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `name` every 50 ms until `check` holds, or panics after `timeout` with the last object
/// seen.
pub async fn wait_for<K>(api: &Api<K>, name: &str, timeout: Duration, check: impl Fn(&K) -> bool) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(Some(obj)) = api.get_opt(name).await {
            if check(&obj) {
                return obj;
            }
            last = Some(obj);
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {name}; last seen: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until run `name` has finished (Succeeded, Failed or Cancelled); its status.
pub async fn run_finished(runs: &Api<WorkflowRun>, name: &str, timeout: Duration) -> WorkflowRunStatus {
    let run = wait_for(runs, name, timeout, |r| r.status.as_ref().is_some_and(|s| s.phase.is_finished())).await;
    run.status.unwrap_or_default()
}
