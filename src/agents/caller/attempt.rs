//! One chat completion on a step's agents: a replica picked, room held, the attempt made and
//! retried across replicas, and its usage counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use tokio::time::Instant;
use tracing::debug;

use crate::api::{Strategy, TokenUsage};
use crate::engine::TaskInfo;
use crate::executors::Failure;

use crate::agents::balancer::{BalancerError, CallResult, Lease, PickRequest};
use crate::agents::registry::AgentEntry;
use crate::agents::transcript::Entry;
use crate::telemetry::CallSpan;

use super::conversation::{Answer, Attempt, Conversation, Turn, answer_of, build_request, note_response};
use super::errors::{CallError, FailureKind, classify, error_type, failure, redact};
use super::hold::CallRun;
use super::transport::{Progress, Transport};
use super::{Exhausted, LlmCaller, ms, strategy_name};

impl LlmCaller {
    /// One chat completion on `agents`, retried across replicas; with why the agents are
    /// exhausted, when they are (for fallbacks).
    pub(super) async fn complete_on(
        &self,
        agents: &[Arc<AgentEntry>],
        strategy: &Option<Strategy>,
        deadline: Option<Instant>,
        conv: &mut Conversation,
        info: &mut TaskInfo,
        run: &CallRun,
    ) -> Result<Answer, (Failure, Option<Exhausted>)> {
        let strategy = strategy.unwrap_or(self.default_strategy);
        let keys = agents.iter().map(|a| a.key.clone()).collect();
        let names = agents.iter().map(|a| a.key.name.as_str()).collect::<Vec<_>>().join(", ");
        let mut request = PickRequest::new(keys, strategy);
        let (mut failures, mut rate_limited, mut vanished) = (0u32, 0u32, 0u32);
        let mut last: Option<CallError> = None;
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let err = CallError::OutOfTime {
                    agent: names.clone(),
                    attempts: failures + rate_limited,
                    last: last.map(|e| e.to_string()).unwrap_or_else(|| "none".into()),
                };
                return Err((failure(&err, info.clone()), None));
            }
            // One agent: its limits are waited for before a replica is taken, so that waiting
            // calls hold no replica slot and the limiter's queue (by priority) decides.
            let mut hold = match agents {
                [only] => Some(self.hold(only, conv, deadline, run, info).await.map_err(|f| (f, None))?),
                _ => None,
            };
            let lease = match self.registry.balancer().acquire(request.clone(), deadline).await {
                Ok(lease) => lease,
                Err(source) => {
                    let exhausted =
                        matches!(source, BalancerError::NoHealthyReplica { .. }).then_some(Exhausted::NoReplica);
                    let err = CallError::NoReplica { agents: names.clone(), source };
                    let message = match &last {
                        Some(prev) => format!("{err}; last attempt: {prev}"),
                        None => err.to_string(),
                    };
                    return Err((Failure { message, retryable: err.retryable(), info: info.clone() }, exhausted));
                }
            };
            let key = lease.key().clone();
            if let Some(m) = &self.metrics {
                let labels = [&key.agent.namespace, &key.agent.name, &key.replica, strategy_name(strategy)];
                m.picks.with_label_values(&labels).inc();
                m.queue_wait.with_label_values(&[strategy_name(strategy)]).observe(lease.waited().as_secs_f64());
            }
            let Some(entry) = agents.iter().find(|a| a.key == key.agent) else {
                // Cannot happen: the balancer only gives replicas of the agents asked for.
                let f = Failure::retryable(format!("agent {names}: the balancer gave an unknown replica {key}"));
                return Err((f, None));
            };
            // The registry may have a newer view of the replica than the agents resolved above
            // (or, for an instant during an update, an older one).
            let current = self.registry.get(&key.agent.namespace, &key.agent.name);
            let replica =
                current.as_ref().and_then(|a| a.replica(&key.replica)).or_else(|| entry.replica(&key.replica));
            let Some(replica) = replica.cloned() else {
                drop(lease);
                vanished += 1;
                if vanished > 100 {
                    return Err((Failure::retryable(format!("agent {names}: replica {key} keeps vanishing")), None));
                }
                tokio::task::yield_now().await;
                continue;
            };
            if hold.is_none() {
                match self.hold(entry, conv, deadline, run, info).await {
                    Ok(h) => hold = Some(h),
                    Err(f) => {
                        drop(lease);
                        return Err((f, None));
                    }
                }
            }
            info.agent = Some(key.agent.name.clone());
            info.replica = Some(key.replica.clone());
            let secret = entry.spec.api_key_secret_ref.as_ref();
            let api_key = match self.secrets.api_key(&key.agent.namespace, &key.agent.name, secret).await {
                Ok(k) => k,
                Err(source) => {
                    drop(lease);
                    let err = CallError::Secret { agent: key.agent.name.clone(), source };
                    return Err((failure(&err, info.clone()), None));
                }
            };
            let agent_timeout = Duration::from_secs(u64::from(entry.spec.timeout_seconds.max(1)));
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let (timeout, step_bound) = match remaining {
                Some(r) if r < agent_timeout => (r, true),
                _ => (agent_timeout, false),
            };
            if let Some(k) = &api_key {
                conv.transcript.hide(k.expose());
            }
            let tools = conv.tool_defs.get(&key.agent).map(Vec::as_slice).unwrap_or_default();
            let turn = Turn { messages: &conv.messages, tools, response_format: conv.response_format.as_ref() };
            let started = Instant::now();
            let attempt = Attempt { entry, replica: &replica, key: api_key.as_ref(), turn, timeout, step_bound };
            match self.attempt(attempt, lease).await {
                Ok(mut answer) => {
                    if let Some(t) = &mut answer.tokens {
                        t.cost = entry.spec.pricing.as_ref().map_or(0.0, |p| p.cost(t.prompt, t.completion));
                    }
                    if let Some(h) = hold.take() {
                        h.settle(answer.tokens);
                    }
                    self.count_usage(entry, run, answer.tokens);
                    conv.transcript.push(Entry::Call {
                        agent: key.agent.name.clone(),
                        model: entry.spec.model.clone(),
                        replica: key.replica.clone(),
                        latency_ms: ms(started.elapsed()),
                        http_ms: ms(answer.http),
                        tokens: answer.tokens,
                    });
                    answer.agent = Some(key.agent.clone());
                    return Ok(answer);
                }
                Err(err) => {
                    drop(hold.take());
                    let err = redact(err, api_key.as_ref());
                    let kind = match &err {
                        CallError::Replica { kind, .. } => *kind,
                        CallError::OutOfTime { last, .. } => {
                            let attempts = failures + rate_limited + 1;
                            let err = CallError::OutOfTime { agent: names.clone(), attempts, last: last.clone() };
                            return Err((failure(&err, info.clone()), None));
                        }
                        _ => FailureKind::Rejected,
                    };
                    debug!(agent = %key.agent, replica = %key.replica, error = %err, "agent call failed");
                    match kind {
                        FailureKind::Rejected => {
                            let exhausted = Exhausted::of_rejection(&err.to_string());
                            return Err((failure(&err, info.clone()), exhausted));
                        }
                        FailureKind::RateLimited(wait) => {
                            rate_limited += 1;
                            self.count_retry(&key, "rate_limited");
                            let wait = wait.unwrap_or_else(|| self.backoff(rate_limited));
                            // The agent's own limit was too generous for the provider: lower it
                            // for a while (every run that uses the agent slows down).
                            if let Some(l) = self.limits.get(&key.agent) {
                                l.rate_limited(Some(wait));
                            }
                            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                            let limit = remaining.unwrap_or(self.retry.max_retry_after);
                            if rate_limited > self.retry.max_rate_limited || wait > limit {
                                let message = format!(
                                    "{err}; gave up after {rate_limited} rate-limited attempts (the replica asks to wait {:.1}s)",
                                    wait.as_secs_f64()
                                );
                                let f = Failure { message, retryable: true, info: info.clone() };
                                return Err((f, Some(Exhausted::RateLimited)));
                            }
                            // The balancer keeps the replica out of rotation for `wait`; the
                            // next acquire goes elsewhere or waits for it.
                        }
                        FailureKind::Transient | FailureKind::Timeout => {
                            failures += 1;
                            if failures >= self.retry.max_attempts.max(1) {
                                let message = format!("{err} (after {failures} attempts)");
                                return Err((Failure { message, retryable: true, info: info.clone() }, None));
                            }
                            self.count_retry(&key, if kind == FailureKind::Timeout { "timeout" } else { "error" });
                            let pause = self.backoff(failures);
                            let pause = match deadline {
                                Some(d) => pause.min(d.saturating_duration_since(Instant::now())),
                                None => pause,
                            };
                            tokio::time::sleep(pause).await;
                        }
                    }
                    request = request.avoiding(Some(key));
                    last = Some(err);
                }
            }
        }
    }

    /// Tokens and cost of a settled call, by namespace, workflow and agent.
    fn count_usage(&self, entry: &AgentEntry, run: &CallRun, tokens: Option<TokenUsage>) {
        let (Some(m), Some(t)) = (&self.metrics, tokens) else { return };
        let workflow = run.meta().workflow.as_deref().unwrap_or_default();
        let labels = |kind| [entry.key.namespace.as_str(), workflow, entry.key.name.as_str(), kind];
        m.usage_tokens.with_label_values(&labels("input")).inc_by(t.prompt);
        m.usage_tokens.with_label_values(&labels("output")).inc_by(t.completion);
        if t.cost > 0.0 && t.cost.is_finite() {
            m.cost.with_label_values(&[&entry.key.namespace, workflow, &entry.key.name]).inc_by(t.cost);
        }
    }

    /// One chat completion on one replica; reports the outcome to the balancer.
    async fn attempt(&self, a: Attempt<'_>, lease: Lease) -> Result<Answer, CallError> {
        let key = lease.key().clone();
        let agent = a.entry.key.name.clone();
        let replica_err = |message: String, kind: FailureKind| CallError::Replica {
            agent: agent.clone(),
            replica: key.replica.clone(),
            message,
            kind,
        };
        let request = match build_request(a.entry, &a.turn) {
            Ok(r) => r,
            Err(e) => {
                drop(lease);
                return Err(replica_err(format!("building the request: {e}"), FailureKind::Rejected));
            }
        };
        let config = OpenAIConfig::new()
            .with_api_base(a.replica.base_url.clone())
            .with_api_key(a.key.map(|k| k.expose().to_string()).unwrap_or_default())
            .with_org_id("")
            .with_project_id("");
        let progress = Arc::new(Progress::default());
        let mut span = CallSpan::llm(&a.entry.spec.model, &agent, &key.replica, &a.replica.base_url);
        let transport = Transport {
            client: self.http.clone(),
            max_reply: self.max_reply,
            progress: progress.clone(),
            traceparent: span.traceparent().and_then(|t| reqwest::header::HeaderValue::from_str(&t).ok()),
        };
        let client = async_openai::Client::build(self.http.clone(), config).with_http_service(transport);
        let result = tokio::time::timeout(a.timeout, client.chat().create(request)).await;
        let ns = key.agent.namespace.clone();
        match &result {
            Ok(Ok(response)) => note_response(&mut span, response),
            Ok(Err(e)) => span.fail(error_type(e), &classify(e).0),
            Err(_) => span.fail("timeout", &progress.timed_out(a.timeout)),
        }
        match result {
            Err(_) if a.step_bound => {
                drop(lease);
                self.count(&key, "timeout");
                Err(CallError::OutOfTime {
                    agent: agent.clone(),
                    attempts: 1,
                    last: format!("replica {}: {}", key.replica, progress.timed_out(a.timeout)),
                })
            }
            Err(_) => {
                lease.finish(CallResult::Failure);
                self.count(&key, "timeout");
                Err(replica_err(progress.timed_out(a.timeout), FailureKind::Timeout))
            }
            Ok(Ok(response)) => match answer_of(response) {
                Ok(mut answer) => {
                    answer.http = Duration::from_micros(progress.http_us.load(Ordering::Relaxed));
                    let latency = lease.finish(CallResult::Success);
                    self.count(&key, "success");
                    if let Some(m) = &self.metrics {
                        let labels = [ns.as_str(), &key.agent.name, &key.replica];
                        m.latency.with_label_values(&labels).observe(latency.as_secs_f64());
                        if let Some(t) = answer.tokens {
                            m.tokens
                                .with_label_values(&[&ns, &key.agent.name, &key.replica, "prompt"])
                                .inc_by(t.prompt);
                            m.tokens
                                .with_label_values(&[&ns, &key.agent.name, &key.replica, "completion"])
                                .inc_by(t.completion);
                        }
                    }
                    debug!(agent = %key.agent, replica = %key.replica, ms = latency.as_millis() as u64, "agent call answered");
                    Ok(answer)
                }
                Err((message, kind)) => {
                    span.fail("invalid_reply", &message);
                    lease.finish(if kind == FailureKind::Rejected {
                        CallResult::Rejected
                    } else {
                        CallResult::Failure
                    });
                    self.count(&key, if kind == FailureKind::Rejected { "rejected" } else { "error" });
                    Err(replica_err(message, kind))
                }
            },
            Ok(Err(e)) => {
                let (message, kind) = classify(&e);
                match kind {
                    FailureKind::RateLimited(wait) => {
                        let wait = wait.unwrap_or_else(|| self.backoff(1));
                        lease.finish(CallResult::RateLimited(wait));
                        self.count(&key, "rate_limited");
                    }
                    FailureKind::Rejected => {
                        lease.finish(CallResult::Rejected);
                        self.count(&key, "rejected");
                    }
                    FailureKind::Transient | FailureKind::Timeout => {
                        lease.finish(CallResult::Failure);
                        self.count(&key, "error");
                    }
                }
                Err(replica_err(message, kind))
            }
        }
    }
}
