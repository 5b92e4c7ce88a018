//! How steps run. Container steps become pods ([`pod`]); agent and http steps run in-process
//! ([`InProcessRunner`]) on a bounded pool ([`pool`]); template steps are rendered by the
//! engine itself.

pub mod http;
pub mod http_policy;
pub mod pod;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::engine::{TaskInfo, Work};

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

/// Runs in-process work (agent and http steps).
#[derive(Clone)]
pub struct InProcessRunner {
    pub http: http::HttpExecutor,
    pub agents: Option<Arc<dyn AgentCaller>>,
}

impl InProcessRunner {
    pub fn new(http: http::HttpExecutor, agents: Option<Arc<dyn AgentCaller>>) -> Self {
        Self { http, agents }
    }

    /// Runs `work`, bounded by `timeout`.
    pub async fn run(&self, namespace: &str, work: &Work, timeout: Option<Duration>) -> Outcome {
        let fut = async {
            match work {
                Work::Http { .. } => self.http.run(work).await,
                Work::Agent { .. } => match &self.agents {
                    Some(agents) => agents.call(namespace, work, timeout).await,
                    None => Err(Failure::permanent("agent steps are not available in this operator build")),
                },
                Work::Container { .. } => Err(Failure::permanent("container steps run as pods, not in-process")),
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
