//! Agent steps: resolve the step's agents, pick a replica, and make an OpenAI chat completion
//! call through async-openai, with retries that move to another replica.
//!
//! One call of a step:
//! 1. Agents: by `ref` (in the run's namespace) or every agent of the namespace matching the
//!    capability `selector`. An agent the registry does not know yet is waited for briefly (the
//!    Agent controller may not have seen it yet after a restart); then the step fails.
//! 2. A replica from the [`Balancer`](super::balancer::Balancer), by the step's strategy or the
//!    operator's default. When none is free the call waits in the balancer's fair queue.
//! 3. The API key from the agent's `apiKeySecretRef`. A missing Secret or key fails the step
//!    at once, naming both; the key never appears in any message.
//! 4. The chat completion: the agent's instructions as system message, then the step's
//!    `messages` and `prompt`, its model and parameters, the step's tools (from the Agent's MCP
//!    servers, [`super::mcp`]) and its output schema as `response_format`; one attempt lasts at
//!    most the agent's `timeoutSeconds`, and the whole call at most the step's timeout. Tool
//!    calls the model asks for are run and fed back, up to `maxTurns` round trips; a reply that
//!    fails the output schema is re-asked with the errors, up to `repairAttempts` times. The
//!    conversation is kept as a transcript ([`super::transcript`]) that rides with the result.
//! 5. On 429 (honouring `Retry-After`/`retry-after-ms`), 5xx, connection errors and timeouts,
//!    the call is retried with backoff, on another healthy replica where there is one. Other
//!    4xx answers fail the step without a retry.
//! 6. A reply is read by this module, not by async-openai: at most
//!    [`MAX_REPLY_BYTES`] (a longer one fails the attempt as soon as that much has come), and it
//!    must be JSON of a chat completion. The attempt's timeout covers the whole reply, so a
//!    server that sends its body a few bytes at a time is cut like one that never answers.
//!    These failures are retried like 5xx answers.

use crate::text::clip;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::debug;

use std::collections::HashMap;

use serde_json::json;

use crate::api::{CapabilitySelector, Strategy};
use crate::engine::output_schema;
use crate::engine::{LlmWork, TaskInfo, Work};
use crate::executors::{AgentCaller, Failure, Outcome, Output};
use crate::metrics::LlmMetrics;

use super::balancer::{AgentKey, ReplicaKey};
use super::budget::Budgets;
use super::limits::Limits;
use super::mcp::{self, ToolError, ToolSet};
use super::registry::{AgentEntry, Registry};
use super::secrets::SecretSource;
use super::transcript::Entry;
use crate::telemetry::CallSpan;

mod attempt;
mod conversation;
mod errors;
mod hold;
mod transport;

pub use conversation::DEFAULT_COMPLETION_RESERVE;
pub use errors::{CallError, FailureKind};
pub use transport::{MAX_REPLY_BYTES, retry_after};

use conversation::{Answer, Conversation};
use errors::failure;
use hold::CallRun;

/// How calls are retried.
#[derive(Clone, Debug)]
pub struct RetrySettings {
    /// Attempts of one call on replica failures (5xx, connection errors, timeouts).
    pub max_attempts: u32,
    /// Further attempts after rate limits (429), which wait as the replica asks.
    pub max_rate_limited: u32,
    /// First backoff between attempts; it doubles, with jitter.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured when the step has no timeout.
    pub max_retry_after: Duration,
    /// How long a step waits for an agent the registry does not know yet.
    pub resolve_grace: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            max_rate_limited: 8,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(120),
            resolve_grace: Duration::from_secs(5),
        }
    }
}

/// Sends agent steps to agent replicas.
pub struct LlmCaller {
    registry: Arc<Registry>,
    secrets: Arc<dyn SecretSource>,
    http: reqwest::Client,
    default_strategy: Strategy,
    metrics: Option<LlmMetrics>,
    retry: RetrySettings,
    max_reply: usize,
    limits: Arc<Limits>,
    budgets: Arc<Budgets>,
    /// MCP sessions kept across steps.
    mcp: Arc<mcp::Sessions>,
}

/// Why an agent cannot answer, so that its fallbacks are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exhausted {
    RateLimited,
    NoReplica,
    ContextTooLong,
    ContentFiltered,
}

impl Exhausted {
    fn as_str(self) -> &'static str {
        match self {
            Exhausted::RateLimited => "rate limited past its retries",
            Exhausted::NoReplica => "no healthy replica (circuits open or replicas down)",
            Exhausted::ContextTooLong => "the context is too long for its model",
            Exhausted::ContentFiltered => "its content filter withheld the reply",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Exhausted::RateLimited => "rate_limited",
            Exhausted::NoReplica => "no_replica",
            Exhausted::ContextTooLong => "context_length",
            Exhausted::ContentFiltered => "content_filter",
        }
    }

    /// A refused request that another model may take: a context too long, a content filter.
    fn of_rejection(message: &str) -> Option<Exhausted> {
        let m = message.to_ascii_lowercase();
        if m.contains("context_length_exceeded") || m.contains("maximum context length") || m.contains("context length")
        {
            Some(Exhausted::ContextTooLong)
        } else if m.contains("content_filter")
            || m.contains("content_policy")
            || m.contains("content management policy")
        {
            Some(Exhausted::ContentFiltered)
        } else {
            None
        }
    }
}

/// The name of a strategy, as in the API.
pub fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::RoundRobin => "round_robin",
        Strategy::LeastConnections => "least_connections",
        Strategy::Weighted => "weighted",
        Strategy::PerformanceBased => "performance_based",
    }
}

/// Milliseconds, to the microsecond.
fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

async fn close_all(tools: HashMap<AgentKey, ToolSet>) {
    futures::future::join_all(tools.into_values().map(ToolSet::close)).await;
}

impl LlmCaller {
    /// A caller over `registry`, reading API keys from `secrets`; steps that name no strategy
    /// use `default_strategy`.
    pub fn new(registry: Arc<Registry>, secrets: Arc<dyn SecretSource>, default_strategy: Strategy) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("volt-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Self {
            registry,
            secrets,
            http,
            default_strategy,
            metrics: None,
            retry: RetrySettings::default(),
            max_reply: MAX_REPLY_BYTES,
            limits: Arc::new(Limits::default()),
            budgets: Arc::new(Budgets::default()),
            mcp: Arc::new(mcp::Sessions::default()),
        }
    }

    /// Counts calls against `budgets` (the Budget controller's ledger).
    pub fn with_budgets(mut self, budgets: Arc<Budgets>) -> Self {
        self.budgets = budgets;
        self
    }

    /// The rate limiters of the agents.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// The MCP sessions kept across steps.
    pub fn mcp_sessions(&self) -> &Arc<mcp::Sessions> {
        &self.mcp
    }

    /// The run of the attempt this task runs, with what the caller needs of it.
    fn call_run(&self) -> CallRun {
        CallRun { run: super::runs::current() }
    }

    /// Records calls, tokens and picks in `metrics`.
    pub fn with_metrics(mut self, metrics: LlmMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn with_retry(mut self, retry: RetrySettings) -> Self {
        self.retry = retry;
        self
    }

    /// Fails (and retries) attempts whose reply is longer than `bytes` (default
    /// [`MAX_REPLY_BYTES`]).
    pub fn with_max_reply_bytes(mut self, bytes: usize) -> Self {
        self.max_reply = bytes.max(1);
        self
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The agents a step may use.
    async fn resolve(
        &self,
        namespace: &str,
        name: Option<&str>,
        selector: Option<&CapabilitySelector>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Arc<AgentEntry>>, CallError> {
        let find = || match (name, selector) {
            (Some(n), _) => self.registry.get(namespace, n).into_iter().collect::<Vec<_>>(),
            (None, Some(sel)) => self.registry.select(namespace, sel),
            (None, None) => Vec::new(),
        };
        if name.is_none() && selector.is_none() {
            return Err(CallError::NoAgentGiven);
        }
        let mut changes = self.registry.subscribe();
        let grace = Instant::now() + self.retry.resolve_grace;
        let until = deadline.map_or(grace, |d| d.min(grace));
        let mut agents = find();
        while agents.is_empty() {
            changes.borrow_and_update();
            match tokio::time::timeout_at(until, changes.changed()).await {
                Ok(Ok(())) => agents = find(),
                _ => break,
            }
        }
        if agents.is_empty() {
            return Err(match name {
                Some(n) => CallError::AgentNotFound { namespace: namespace.into(), name: n.into() },
                None => CallError::NoAgentMatches {
                    namespace: namespace.into(),
                    capabilities: selector.map(|s| s.capabilities.clone()).unwrap_or_default(),
                },
            });
        }
        if let [only] = agents.as_slice()
            && let Some(message) = &only.invalid
        {
            return Err(CallError::InvalidAgent { agent: only.key.name.clone(), message: message.clone() });
        }
        agents.retain(|a| a.invalid.is_none());
        if agents.is_empty() {
            return Err(CallError::NoAgentMatches {
                namespace: namespace.into(),
                capabilities: selector.map(|s| s.capabilities.clone()).unwrap_or_default(),
            });
        }
        Ok(agents)
    }

    fn backoff(&self, retry: u32) -> Duration {
        use rand::Rng;
        let exp = self.retry.initial_backoff.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let base = exp.min(self.retry.max_backoff);
        // Full jitter on the upper half, so retries of a fan-out do not land together.
        let half = base / 2;
        half + Duration::from_secs_f64(rand::rng().random_range(0.0..=half.as_secs_f64().max(0.0)))
    }

    fn count(&self, key: &ReplicaKey, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.calls.with_label_values(&[&key.agent.namespace, &key.agent.name, &key.replica, outcome]).inc();
        }
    }

    fn count_retry(&self, key: &ReplicaKey, reason: &str) {
        if let Some(m) = &self.metrics {
            m.retries.with_label_values(&[&key.agent.namespace, &key.agent.name, reason]).inc();
        }
    }

    async fn call_work(&self, namespace: &str, work: &Work, timeout: Option<Duration>) -> Result<Output, Failure> {
        let Work::Agent { agent, selector, strategy, prompt, llm } = work else {
            return Err(failure(&CallError::NotAgentWork, TaskInfo::default()));
        };
        let start = Instant::now();
        // Keep a little of the step's time to report a clear message before the runner's own
        // timeout cuts the call.
        let deadline = timeout.map(|t| start + t.saturating_sub((t / 20).min(Duration::from_millis(250))));
        let mut agents = self
            .resolve(namespace, agent.as_deref(), selector.as_ref(), deadline)
            .await
            .map_err(|e| failure(&e, TaskInfo::default()))?;
        let validator = match &llm.schema {
            Some(schema) => Some(
                output_schema::compile(schema)
                    .map_err(|e| Failure::permanent(format!("agent.output.schema is not a valid JSON Schema: {e}")))?,
            ),
            None => None,
        };
        let mut conv = Conversation::new(llm, prompt);
        // Tools: only agents that allow every tool of the step; a session per agent.
        let mut tools: HashMap<AgentKey, ToolSet> = HashMap::new();
        if !llm.tools.is_empty() {
            let (allowing, refusing): (Vec<_>, Vec<_>) =
                agents.into_iter().partition(|a| mcp::allows_all(&a.spec, &llm.tools));
            if allowing.is_empty() {
                let a = &refusing[0];
                let tool = llm.tools.iter().find(|t| !mcp::allows_all(&a.spec, std::slice::from_ref(t)));
                let err = ToolError::NotAllowed { agent: a.key.name.clone(), tool: tool.cloned().unwrap_or_default() };
                return Err(Failure::permanent(err.to_string()));
            }
            agents = allowing;
            for a in &agents {
                let set = ToolSet::open(
                    &self.mcp,
                    &self.http,
                    self.secrets.as_ref(),
                    namespace,
                    &a.key.name,
                    &a.spec,
                    &llm.tools,
                    deadline,
                )
                .await;
                match set {
                    Ok(set) => {
                        for s in set.secrets() {
                            conv.transcript.hide(s);
                        }
                        conv.offer_tools(a.key.clone(), set.definitions());
                        tools.insert(a.key.clone(), set);
                    }
                    Err(e) => {
                        close_all(tools).await;
                        let info = conv.info(TaskInfo::default(), "Failed", Some(&e.to_string()));
                        return Err(Failure { message: e.to_string(), retryable: e.retryable(), info });
                    }
                }
            }
        }
        let run = self.call_run();
        let result = self.converse(&agents, strategy, deadline, &mut conv, &tools, validator.as_ref(), llm, &run).await;
        close_all(tools).await;
        result.map(|(text, info)| Output { info: conv.info(info, "Succeeded", None), text }).map_err(|mut f| {
            f.info = conv.info(std::mem::take(&mut f.info), "Failed", Some(&f.message));
            f
        })
    }

    /// The turns of a conversation: model calls, the tool calls they ask for, and repairs of
    /// replies that fail the output schema, until a final answer.
    #[allow(clippy::too_many_arguments)]
    async fn converse(
        &self,
        agents: &[Arc<AgentEntry>],
        strategy: &Option<Strategy>,
        deadline: Option<Instant>,
        conv: &mut Conversation,
        tools: &HashMap<AgentKey, ToolSet>,
        validator: Option<&jsonschema::Validator>,
        llm: &LlmWork,
        run: &CallRun,
    ) -> Result<(String, TaskInfo), Failure> {
        let mut info = TaskInfo::default();
        let mut repairs = 0u32;
        let mut turns = 0u32;
        loop {
            let answer = self.complete(agents, strategy, deadline, conv, &mut info, run).await?;
            info.tokens = Some(conv.transcript.tokens());
            let message = answer.message.clone();
            conv.push(message);
            if !answer.tool_calls.is_empty() {
                turns += 1;
                conv.transcript.turn();
                if turns > llm.max_turns {
                    let names: Vec<&str> = answer.tool_calls.iter().map(|c| c.name.as_str()).collect();
                    let message = format!(
                        "stopped after maxTurns={} model <-> tool round trips without a final answer (the model still asks for {})",
                        llm.max_turns,
                        names.join(", ")
                    );
                    return Err(Failure { message, retryable: false, info });
                }
                let Some(set) = answer.agent.as_ref().and_then(|a| tools.get(a)) else {
                    let err = ToolError::Unknown { tool: answer.tool_calls[0].name.clone(), offered: String::new() };
                    return Err(Failure { message: err.to_string(), retryable: false, info });
                };
                let per_call = Duration::from_secs(u64::from(
                    agents
                        .iter()
                        .find(|a| Some(&a.key) == answer.agent.as_ref())
                        .map_or(120, |a| a.spec.timeout_seconds),
                ));
                let agent = answer.agent.as_ref().map_or("", |a| a.name.as_str());
                for call in &answer.tool_calls {
                    let started = Instant::now();
                    let mut span = CallSpan::tool(&call.name, &call.id, agent);
                    let result = set
                        .call(&call.name, &call.arguments, deadline, per_call, &llm.decisions, span.traceparent())
                        .await;
                    match &result {
                        Err(ToolError::NeedsApproval { .. }) => span.set("volt.tool.needs_approval", true),
                        Err(e) => span.fail(e.kind(), &e.to_string()),
                        Ok(_) => {}
                    }
                    drop(span);
                    let latency_ms = ms(started.elapsed());
                    match result {
                        Ok(text) => {
                            conv.transcript.push(Entry::Tool { name: call.name.clone(), latency_ms, error: None });
                            conv.push(json!({"role": "tool", "tool_call_id": call.id, "content": text}));
                        }
                        Err(e) => {
                            let message = e.to_string();
                            conv.transcript.push(Entry::Tool {
                                name: call.name.clone(),
                                latency_ms,
                                error: Some(message.clone()),
                            });
                            // The attempt waits for a person; a decision starts the step over.
                            if let ToolError::NeedsApproval { tool, .. } = &e {
                                info.waits_for = Some(Box::new(tool.clone()));
                            }
                            return Err(Failure { message, retryable: e.retryable(), info });
                        }
                    }
                }
                continue;
            }
            let Some(validator) = validator else { return Ok((answer.text, info)) };
            match output_schema::check(validator, &answer.text) {
                Ok(value) => return Ok((value.to_string(), info)),
                Err(problem) if repairs < llm.repair_attempts => {
                    repairs += 1;
                    conv.transcript.push(Entry::Repair { attempt: repairs, problem: problem.to_string() });
                    conv.push(json!({"role": "user", "content": format!(
                        "Your reply is not valid: {problem}. Reply again with only the JSON value, matching the JSON Schema:\n{}",
                        llm.schema.as_ref().map(|s| s.to_string()).unwrap_or_default()
                    )}));
                }
                Err(problem) => {
                    let message = format!(
                        "agent.output.schema: no valid reply after {} repair attempts; {problem}",
                        llm.repair_attempts
                    );
                    return Err(Failure { message, retryable: false, info });
                }
            }
        }
    }

    /// One chat completion of the conversation so far: on the step's agents, then on their
    /// fallbacks (`spec.fallbacks`, in order, then theirs) while the agent asked is exhausted.
    async fn complete(
        &self,
        agents: &[Arc<AgentEntry>],
        strategy: &Option<Strategy>,
        deadline: Option<Instant>,
        conv: &mut Conversation,
        info: &mut TaskInfo,
        run: &CallRun,
    ) -> Result<Answer, Failure> {
        let mut current: Vec<Arc<AgentEntry>> = agents.to_vec();
        let mut tried: Vec<AgentKey> = agents.iter().map(|a| a.key.clone()).collect();
        // Steps with tools keep to their agents: the tool sessions are theirs.
        let mut queue: std::collections::VecDeque<String> = if conv.tool_defs.is_empty() {
            agents.iter().flat_map(|a| a.spec.fallbacks.iter().cloned()).collect()
        } else {
            Default::default()
        };
        let namespace = agents.first().map(|a| a.key.namespace.clone()).unwrap_or_default();
        loop {
            let (failure, why) = match self.complete_on(&current, strategy, deadline, conv, info, run).await {
                Ok(answer) => return Ok(answer),
                Err((failure, None)) => return Err(failure),
                Err((failure, Some(why))) => (failure, why),
            };
            let from = current.iter().map(|a| a.key.name.as_str()).collect::<Vec<_>>().join(", ");
            let mut skipped = Vec::new();
            let next = loop {
                let Some(name) = queue.pop_front() else { break None };
                let key = AgentKey::new(&namespace, &name);
                if tried.contains(&key) {
                    continue;
                }
                tried.push(key);
                match self.registry.get(&namespace, &name) {
                    Some(a) if a.invalid.is_none() => break Some(a),
                    Some(_) => skipped.push(format!("{name:?} is invalid")),
                    None => skipped.push(format!("{name:?} not found")),
                }
            };
            let Some(next) = next else {
                let mut message = failure.message;
                if !skipped.is_empty() {
                    message.push_str(&format!("; fallbacks not usable: {}", skipped.join(", ")));
                }
                return Err(Failure { message, ..failure });
            };
            let reason = format!("{}: {}", why.as_str(), clip(&failure.message, 200));
            debug!(from = %from, to = %next.key.name, reason = %reason, "falling back");
            if let Some(m) = &self.metrics {
                m.fallbacks.with_label_values(&[&namespace, &from, &next.key.name, why.label()]).inc();
            }
            conv.transcript.push(Entry::Fallback {
                from: from.clone(),
                to: next.key.name.clone(),
                model: next.spec.model.clone(),
                reason: reason.clone(),
            });
            info.fallback = Some(Box::new(format!(
                "{} (model {}) answered instead of {from}: {}",
                next.key.name,
                next.spec.model,
                why.as_str()
            )));
            queue.extend(next.spec.fallbacks.iter().cloned());
            current = vec![next];
        }
    }
}

impl AgentCaller for LlmCaller {
    fn call<'a>(&'a self, namespace: &'a str, work: &'a Work, timeout: Option<Duration>) -> BoxFuture<'a, Outcome> {
        Box::pin(self.call_work(namespace, work, timeout))
    }
}
