//! Which run an agent call belongs to. The task pool runs each attempt inside [`in_run`], so
//! the caller knows the run (for its priority in rate-limit queues, its Workflow for Budget
//! selectors and metrics, and its `spec.budget`: [`RunMeta`], read by the pass from the run it
//! has in hand) without the engine passing it along.

use std::future::Future;

use futures::future::BoxFuture;
use kube::Api;

use crate::api::WorkflowRun;
use crate::engine::RunInfo;
pub use crate::engine::RunMeta;

/// The run and step of the attempt being run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The step's status key.
    pub step: String,
    pub attempt: u32,
    /// The traceparent the run continues ([`RunInfo::traceparent`]).
    pub traceparent: Option<String>,
    /// The run's slot ([`RunInfo::shard`]), with shards.
    pub slot: Option<u32>,
    /// What the call needs of the run ([`RunInfo::meta`]).
    pub meta: RunMeta,
}

tokio::task_local! {
    static CURRENT: RunRef;
}

/// Runs `fut` as attempt `attempt` of step `step` of `run`.
pub fn in_run<F: Future>(run: &RunInfo, step: &str, attempt: u32, fut: F) -> impl Future<Output = F::Output> {
    let r = RunRef {
        namespace: run.namespace.clone(),
        name: run.name.clone(),
        uid: run.uid.clone(),
        step: step.into(),
        attempt,
        traceparent: run.traceparent.clone(),
        slot: run.shard.as_deref().and_then(crate::shards::parse_slot),
        meta: run.meta.clone(),
    };
    CURRENT.scope(r, fut)
}

/// The run of the attempt this task runs, if any.
pub fn current() -> Option<RunRef> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Suspends runs with a merge patch of `spec.suspend` (a Budget with `onExceeded: Suspend`).
pub struct KubeSuspender {
    pub client: kube::Client,
}

impl super::budget::Suspender for KubeSuspender {
    fn suspend<'a>(&'a self, namespace: &'a str, run: &'a str, why: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let api: Api<WorkflowRun> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({"spec": {"suspend": true}});
            match api.patch(run, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await {
                Ok(_) => tracing::info!(run, namespace, reason = why, "run suspended by a budget"),
                Err(e) => tracing::warn!(run, namespace, error = %e, "suspending a run for its budget"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RunBudget;

    #[tokio::test]
    async fn a_call_sees_the_run_it_runs_in_with_its_priority_and_budget() {
        let meta = RunMeta {
            workflow: Some("review".into()),
            priority: 7,
            budget: Some(RunBudget { max_tokens: Some(100), max_cost: None }),
            used: (40, 0.5),
        };
        let run = RunInfo {
            name: "r".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            shard: Some("12".into()),
            meta: meta.clone(),
            ..Default::default()
        };
        assert_eq!(current(), None, "outside a run");
        let seen = in_run(&run, "ask[2]", 3, async { current() }).await.expect("inside the run");
        assert_eq!((seen.name.as_str(), seen.step.as_str(), seen.attempt, seen.slot), ("r", "ask[2]", 3, Some(12)));
        assert_eq!(seen.meta, meta);
    }
}
