//! Why an agent call failed: [`CallError`] and [`FailureKind`], how an async-openai error is
//! classified for retrying, and API keys kept out of the messages.

use crate::text::clip;
use std::time::Duration;

use async_openai::error::OpenAIError;
use tracing::warn;

use crate::engine::TaskInfo;
use crate::executors::Failure;

use crate::agents::balancer::BalancerError;
use crate::agents::secrets::{ApiKey, SecretError};

use super::transport::{HttpStatusError, ReplyError};

/// Why an agent call failed. Messages name the agent and replica, never the API key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("not an agent step")]
    NotAgentWork,
    #[error("agent step sets neither ref nor selector")]
    NoAgentGiven,
    #[error("agent {name:?} not found in namespace {namespace:?}")]
    AgentNotFound { namespace: String, name: String },
    #[error("no agent in namespace {namespace:?} matches the selector (capabilities {capabilities:?})")]
    NoAgentMatches { namespace: String, capabilities: Vec<String> },
    #[error("agent {agent:?} is invalid: {message}")]
    InvalidAgent { agent: String, message: String },
    #[error("agent {agents}: {source}")]
    NoReplica { agents: String, source: BalancerError },
    #[error("agent {agent:?} (spec.apiKeySecretRef): {source}")]
    Secret { agent: String, source: SecretError },
    #[error("agent {agent:?}, replica {replica}: {message}")]
    Replica { agent: String, replica: String, message: String, kind: FailureKind },
    #[error("agent {agent:?}: the step's time ran out after {attempts} attempts (last: {last})")]
    OutOfTime { agent: String, attempts: u32, last: String },
}

/// What kind of failure a replica's answer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Worth retrying on this or another replica.
    Transient,
    /// Rate limited: retry after the delay.
    RateLimited(Option<Duration>),
    /// Timed out.
    Timeout,
    /// The request itself was refused (4xx): retrying does not help.
    Rejected,
}

impl CallError {
    /// Whether the engine's retry policy may try the step again.
    pub fn retryable(&self) -> bool {
        match self {
            CallError::NotAgentWork
            | CallError::NoAgentGiven
            | CallError::AgentNotFound { .. }
            | CallError::NoAgentMatches { .. }
            | CallError::InvalidAgent { .. } => false,
            CallError::Secret { source, .. } => source.retryable(),
            CallError::Replica { kind, .. } => *kind != FailureKind::Rejected,
            CallError::NoReplica { .. } | CallError::OutOfTime { .. } => true,
        }
    }
}

pub(super) fn failure(err: &CallError, info: TaskInfo) -> Failure {
    Failure { message: err.to_string(), retryable: err.retryable(), info }
}

/// Removes the API key from an error, should a server ever echo it.
pub(super) fn redact(err: CallError, key: Option<&ApiKey>) -> CallError {
    let Some(key) = key.map(ApiKey::expose).filter(|k| !k.is_empty()) else { return err };
    match err {
        CallError::Replica { agent, replica, message, kind } if message.contains(key) => {
            CallError::Replica { agent, replica, message: message.replace(key, "[redacted]"), kind }
        }
        other => other,
    }
}

/// `error.type` of a failed call: the HTTP status, or a class of transport error.
pub(super) fn error_type(e: &OpenAIError) -> String {
    match e {
        OpenAIError::Boxed(inner) => match inner.downcast_ref::<HttpStatusError>() {
            Some(s) => s.status.to_string(),
            None => "invalid_reply".into(),
        },
        OpenAIError::Reqwest(r) if r.is_timeout() => "timeout".into(),
        OpenAIError::Reqwest(_) => "transport".into(),
        _ => "error".into(),
    }
}

/// What an async-openai error means for retrying.
pub(super) fn classify(e: &OpenAIError) -> (String, FailureKind) {
    match e {
        OpenAIError::Boxed(inner) if inner.is::<ReplyError>() => (inner.to_string(), FailureKind::Transient),
        OpenAIError::Boxed(inner) => match inner.downcast_ref::<HttpStatusError>() {
            Some(h) => {
                let kind = match h.status {
                    429 if h.quota => FailureKind::Rejected,
                    429 => FailureKind::RateLimited(h.retry_after),
                    503 if h.retry_after.is_some() => FailureKind::RateLimited(h.retry_after),
                    408 | 425 | 500..=599 => FailureKind::Transient,
                    _ => FailureKind::Rejected,
                };
                (h.to_string(), kind)
            }
            None => (inner.to_string(), FailureKind::Transient),
        },
        OpenAIError::Reqwest(e) => {
            let what = if e.is_connect() {
                "connection failed"
            } else if e.is_timeout() {
                "request timed out"
            } else {
                "connection error"
            };
            (format!("{what}: {}", error_chain(e)), FailureKind::Transient)
        }
        OpenAIError::JSONDeserialize(err, _) => {
            (format!("the answer is not a chat completion: {err}"), FailureKind::Transient)
        }
        OpenAIError::ApiError(api) => {
            let status = api.status_code.as_u16();
            let kind = match status {
                429 => FailureKind::RateLimited(None),
                408 | 500..=599 => FailureKind::Transient,
                _ => FailureKind::Rejected,
            };
            (format!("HTTP {status}: {}", clip(&api.api_error.message, 300)), kind)
        }
        OpenAIError::InvalidArgument(m) => (format!("invalid request: {m}"), FailureKind::Rejected),
        other => {
            warn!(error = %other, "unexpected error from the OpenAI client");
            (other.to_string(), FailureKind::Transient)
        }
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let boxed = |status: u16, retry_after: Option<Duration>, quota: bool| {
            OpenAIError::Boxed(Box::new(HttpStatusError { status, retry_after, message: "m".into(), quota }))
        };
        let kind = |e: OpenAIError| classify(&e).1;
        assert_eq!(
            kind(boxed(429, Some(Duration::from_secs(1)), false)),
            FailureKind::RateLimited(Some(Duration::from_secs(1)))
        );
        assert_eq!(kind(boxed(429, None, true)), FailureKind::Rejected);
        assert_eq!(kind(boxed(500, None, false)), FailureKind::Transient);
        assert_eq!(
            kind(boxed(503, Some(Duration::from_secs(2)), false)),
            FailureKind::RateLimited(Some(Duration::from_secs(2)))
        );
        assert_eq!(kind(boxed(400, None, false)), FailureKind::Rejected);
        assert_eq!(kind(boxed(401, None, false)), FailureKind::Rejected);
    }

    #[test]
    fn keys_are_redacted_from_replica_messages() {
        let err = CallError::Replica {
            agent: "a".into(),
            replica: "r".into(),
            message: "bad key sk-123 given".into(),
            kind: FailureKind::Rejected,
        };
        let out = redact(err, Some(&ApiKey::new("sk-123")));
        assert!(!out.to_string().contains("sk-123"), "{out}");
        assert!(!out.retryable());
    }
}
