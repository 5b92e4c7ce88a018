//! How steps run. Container steps become pods ([`pod`]) in the cluster and processes in local
//! mode; agent and http steps run in-process ([`InProcessRunner`]) on a bounded pool
//! ([`pool`]), which turns a panic into a failed attempt; template steps are rendered by the
//! engine itself.

pub mod http;
pub mod http_policy;
pub mod pod;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::engine::{RunInfo, TaskInfo, TaskStart, Work};

/// A successful attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub text: String,
    pub info: TaskInfo,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub message: String,
    pub retryable: bool,
    pub info: TaskInfo,
}

impl Failure {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: true, info: TaskInfo::default() }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), retryable: false, info: TaskInfo::default() }
    }
}

pub type Outcome = Result<Output, Failure>;

/// The engine event of an attempt's outcome.
pub fn outcome_event(key: String, attempt: u32, outcome: Outcome) -> crate::engine::Event {
    use crate::engine::Event;
    match outcome {
        Ok(out) => Event::Succeeded { key, attempt, output: out.text, info: out.info },
        Err(f) => Event::Failed { key, attempt, message: f.message, retryable: f.retryable, info: f.info },
    }
}

/// Runs agent steps: picks an agent and a replica, and calls it.
pub trait AgentCaller: Send + Sync {
    fn call<'a>(&'a self, namespace: &'a str, work: &'a Work, timeout: Option<Duration>) -> BoxFuture<'a, Outcome>;
}

/// Runs container steps in this process's machine (local mode: as processes).
pub trait ContainerRunner: Send + Sync {
    fn run<'a>(&'a self, task: &'a TaskStart) -> BoxFuture<'a, Outcome>;
}

/// Runs `workflow` steps in this process (local mode: the child run runs here, from the files
/// given). In the cluster they are child WorkflowRuns.
pub trait ChildRunner: Send + Sync {
    fn run<'a>(&'a self, parent: &'a RunInfo, task: &'a TaskStart) -> BoxFuture<'a, Outcome>;
}

/// Runs one attempt of in-process work. The task pool ([`pool::TaskPool`]) runs attempts through
/// one of these; [`InProcessRunner`] is the operator's and local mode's.
pub trait TaskExecutor: Send + Sync {
    fn run<'a>(&'a self, run: &'a RunInfo, task: &'a TaskStart) -> BoxFuture<'a, Outcome>;
}

/// Why agent steps fail in a process that has no agent caller.
pub const NO_AGENT_CALLER: &str = "agent steps are not available in this operator build";

/// Runs in-process work: agent and http steps, and container steps where a [`ContainerRunner`]
/// is given (local mode; in the cluster they are pods).
#[derive(Clone)]
pub struct InProcessRunner {
    pub http: http::HttpExecutor,
    /// The agent caller, or why agent steps cannot run.
    agents: Result<Arc<dyn AgentCaller>, String>,
    containers: Option<Arc<dyn ContainerRunner>>,
    children: Option<Arc<dyn ChildRunner>>,
}

impl InProcessRunner {
    pub fn new(http: http::HttpExecutor, agents: Option<Arc<dyn AgentCaller>>) -> Self {
        Self { http, agents: agents.ok_or_else(|| NO_AGENT_CALLER.to_string()), containers: None, children: None }
    }

    /// Agent steps fail with `reason` (local mode says why it has no caller).
    pub fn without_agents(http: http::HttpExecutor, reason: impl Into<String>) -> Self {
        Self { http, agents: Err(reason.into()), containers: None, children: None }
    }

    /// Container steps run through `runner` instead of failing.
    pub fn with_containers(mut self, runner: Arc<dyn ContainerRunner>) -> Self {
        self.containers = Some(runner);
        self
    }

    /// Workflow steps run through `runner` instead of failing.
    pub fn with_children(mut self, runner: Arc<dyn ChildRunner>) -> Self {
        self.children = Some(runner);
        self
    }

    /// Runs `work`, bounded by `timeout`.
    pub async fn run(&self, namespace: &str, work: &Work, timeout: Option<Duration>) -> Outcome {
        let fut = async {
            match work {
                Work::Http { .. } => self.http.run(work).await,
                Work::Agent { .. } => match &self.agents {
                    Ok(agents) => agents.call(namespace, work, timeout).await,
                    Err(reason) => Err(Failure::permanent(reason.clone())),
                },
                Work::Container { .. } => Err(Failure::permanent("container steps run as pods, not in-process")),
                Work::Workflow { .. } => {
                    Err(Failure::permanent("workflow steps run as child WorkflowRuns, not in-process"))
                }
                Work::Resource { .. } => Err(Failure::permanent(
                    "resource steps create Kubernetes objects: they run in a cluster, not in local mode",
                )),
            }
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .unwrap_or_else(|_| Err(Failure::retryable(format!("timed out after {}s", t.as_secs())))),
            None => fut.await,
        }
    }
}

impl TaskExecutor for InProcessRunner {
    fn run<'a>(&'a self, run: &'a RunInfo, task: &'a TaskStart) -> BoxFuture<'a, Outcome> {
        match (&task.work, &self.containers, &self.children) {
            // A container runner bounds its attempt itself (it kills the process group).
            (Work::Container { .. }, Some(containers), _) => containers.run(task),
            (Work::Workflow { .. }, _, Some(children)) => Box::pin(async move {
                match task.timeout {
                    Some(t) => tokio::time::timeout(t, children.run(run, task))
                        .await
                        .unwrap_or_else(|_| Err(Failure::retryable(format!("timed out after {}s", t.as_secs())))),
                    None => children.run(run, task).await,
                }
            }),
            _ => Box::pin(InProcessRunner::run(self, &run.namespace, &task.work, task.timeout)),
        }
    }
}
