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
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, StopConfiguration,
};
use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::{debug, warn};

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::api::{CapabilitySelector, ChatRole, Strategy, TokenUsage};
use crate::engine::output_schema;
use crate::engine::{LlmWork, TaskInfo, Work};
use crate::executors::{AgentCaller, Failure, Outcome, Output};
use crate::metrics::LlmMetrics;

use super::balancer::{AgentKey, BalancerError, CallResult, Lease, PickRequest, ReplicaKey};
use super::budget::{BudgetError, Budgets, CallScope, Reservation, RunScope, Spend};
use super::limits::{Limits, Need, Permit, estimate_tokens};
use super::mcp::{self, ToolError, ToolSet};
use super::registry::{AgentEntry, Registry, Replica};
use super::runs::{RunMeta, RunRef};
use super::secrets::{ApiKey, SecretError, SecretSource};
use super::transcript::{Entry, Transcript};
use crate::telemetry::CallSpan;

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

/// An HTTP answer that was not a success, as the transport saw it (status, the delay the
/// server asked for, and its error message).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("HTTP {status}: {message}")]
struct HttpStatusError {
    status: u16,
    retry_after: Option<Duration>,
    message: String,
    quota: bool,
}

/// Largest error body read from a replica.
const MAX_ERROR_BODY: usize = 8 * 1024;

/// Largest chat completion read from a replica, by default: far more than any model writes in
/// one answer, and about what a step's output can hold (a ConfigMap's 1 MiB).
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// A successful (2xx) answer that is not a usable chat completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum ReplyError {
    #[error("reply larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reply is not valid JSON: {0}")]
    NotJson(String),
    #[error("reply is not a chat completion: {0}")]
    NotChatCompletion(String),
}

/// How far the answer to one attempt has come, for the message when its time runs out.
#[derive(Debug, Default)]
struct Progress {
    /// The HTTP status, once the headers came (0 before).
    status: AtomicU16,
    /// Body bytes received.
    body: AtomicUsize,
    /// Microseconds from sending the request to the end of a successful reply's body.
    http_us: std::sync::atomic::AtomicU64,
}

impl Progress {
    /// Why an attempt cut after `timeout` failed.
    fn timed_out(&self, timeout: Duration) -> String {
        let secs = timeout.as_secs_f64();
        match self.status.load(Ordering::Relaxed) {
            0 => format!("no answer within {secs:.1}s"),
            status => format!(
                "reply not complete within {secs:.1}s (HTTP {status}, {} bytes of the body received)",
                self.body.load(Ordering::Relaxed)
            ),
        }
    }
}

/// The HTTP transport under async-openai: one request per call, no retries of its own (the
/// caller retries, across replicas), error answers turned into [`HttpStatusError`] with the
/// headers async-openai would drop (`Retry-After`). It reads successful answers itself, at most
/// `max_reply` bytes, and checks they are chat completions: async-openai would read a body of
/// any size, and log the whole of one it cannot parse.
#[derive(Clone)]
struct Transport {
    client: reqwest::Client,
    max_reply: usize,
    progress: Arc<Progress>,
    /// The W3C `traceparent` of the call's span, when traces are on.
    traceparent: Option<reqwest::header::HeaderValue>,
}

impl tower::Service<HttpRequestFactory> for Transport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = BoxFuture<'static, Result<reqwest::Response, OpenAIError>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let Transport { client, max_reply, progress, traceparent } = self.clone();
        Box::pin(async move {
            let mut request = factory.build().await?;
            if let Some(value) = traceparent {
                request.headers_mut().insert("traceparent", value);
            }
            // No key: send no Authorization header rather than an empty bearer token.
            let empty_bearer = request
                .headers()
                .get(reqwest::header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes().trim_ascii() == b"Bearer");
            if empty_bearer {
                request.headers_mut().remove(reqwest::header::AUTHORIZATION);
            }
            // The key, to take out of error messages that echo it (before they are cut short,
            // which could leave part of it); and the header marked sensitive, so that HTTP
            // libraries never print it.
            let key = match request.headers_mut().get_mut(reqwest::header::AUTHORIZATION) {
                Some(value) => {
                    value.set_sensitive(true);
                    value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(|k| k.trim().to_string())
                }
                None => None,
            };
            let sent = std::time::Instant::now();
            let response = client.execute(request).await.map_err(|e| OpenAIError::Reqwest(e.without_url()))?;
            let status = response.status();
            progress.status.store(status.as_u16(), Ordering::Relaxed);
            if status.is_success() {
                let reply = read_reply(response, max_reply, &progress).await;
                progress.http_us.store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                return reply;
            }
            let retry_after = retry_after(response.headers(), jiff::Timestamp::now());
            let body = read_limited(response, MAX_ERROR_BODY).await;
            let (message, quota) = error_message(&body, key.as_deref());
            Err(OpenAIError::Boxed(Box::new(HttpStatusError { status: status.as_u16(), retry_after, message, quota })))
        })
    }
}

/// Reads a successful answer, at most `limit` bytes, checks it is a chat completion, and gives
/// it back as a response whose body is in memory.
async fn read_reply(
    mut response: reqwest::Response,
    limit: usize,
    progress: &Progress,
) -> Result<reqwest::Response, OpenAIError> {
    let too_large = || OpenAIError::Boxed(Box::new(ReplyError::TooLarge { limit }));
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| OpenAIError::Reqwest(e.without_url()))? {
        if body.len() + chunk.len() > limit {
            // Dropping the response closes the connection: the rest is never read.
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
        progress.body.store(body.len(), Ordering::Relaxed);
    }
    check_reply(&body).map_err(|e| OpenAIError::Boxed(Box::new(e)))?;
    let mut out = http::Response::new(body);
    *out.status_mut() = response.status();
    *out.version_mut() = response.version();
    *out.headers_mut() = std::mem::take(response.headers_mut());
    Ok(reqwest::Response::from(out))
}

/// Whether `body` is a chat completion, with the parser's reason when it is not.
fn check_reply(body: &[u8]) -> Result<(), ReplyError> {
    use serde_json::error::Category;
    match serde_json::from_slice::<CreateChatCompletionResponse>(body) {
        Ok(_) => Ok(()),
        Err(e) if e.classify() == Category::Data => Err(ReplyError::NotChatCompletion(clip(&e.to_string(), 200))),
        Err(e) => Err(ReplyError::NotJson(clip(&e.to_string(), 200))),
    }
}

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= limit {
            body.truncate(limit);
            break;
        }
    }
    body
}

/// The message of an OpenAI error body (`{"error": {"message": ...}}`), or the body's text,
/// with `key` (the API key sent) taken out; and whether it says the quota is exhausted (a 429
/// that waiting does not cure).
fn error_message(body: &[u8], key: Option<&str>) -> (String, bool) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let message = error
        .and_then(|e| e.get("message").and_then(|m| m.as_str()).or_else(|| e.as_str()))
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let quota = error
        .and_then(|e| e.get("type").or_else(|| e.get("code")))
        .and_then(|t| t.as_str())
        .is_some_and(|t| t == "insufficient_quota");
    // The code tells a context too long or a content filter apart (for fallbacks).
    let message = match error.and_then(|e| e.get("code")).and_then(|c| c.as_str()) {
        Some(code) if !code.is_empty() && !message.contains(code) => format!("{message} ({code})"),
        _ => message,
    };
    let message = match key.filter(|k| !k.is_empty()) {
        Some(key) => message.replace(key, "[redacted]"),
        None => message,
    };
    (clip(&message, 300), quota)
}

/// The delay a 429 or 503 asks for: `retry-after-ms` (OpenAI), else `Retry-After` in seconds
/// or as an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: jiff::Timestamp) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let ms = at.as_millisecond() - now.as_millisecond();
    Some(Duration::from_millis(ms.max(0) as u64))
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

/// The run an agent step belongs to, as its calls need it (none outside a run: tests).
#[derive(Debug, Clone, Default)]
struct CallRun {
    run: Option<RunRef>,
}

/// The meta of no run.
static NO_RUN: RunMeta = RunMeta { workflow: None, priority: 0, budget: None, used: (0, 0.0) };

impl CallRun {
    fn meta(&self) -> &RunMeta {
        self.run.as_ref().map_or(&NO_RUN, |r| &r.meta)
    }

    fn scope(&self, agent: &AgentKey) -> CallScope {
        CallScope {
            namespace: agent.namespace.clone(),
            workflow: self.meta().workflow.clone(),
            agent: agent.name.clone(),
            run: self.run.as_ref().map(|r| RunScope {
                uid: r.uid.clone(),
                budget: r.meta.budget.clone(),
                used_before: Spend { tokens: r.meta.used.0, cost: r.meta.used.1 },
            }),
            slot: self.run.as_ref().and_then(|r| r.slot),
        }
    }
}

/// A call's room under its agent's rate limit and its budgets, until it settles.
struct Hold {
    permit: Option<Permit>,
    reservation: Reservation,
}

impl Hold {
    /// The call answered with `tokens` (the worst case stays spent when the reply says none).
    fn settle(self, tokens: Option<TokenUsage>) {
        let Hold { permit, reservation } = self;
        match tokens {
            Some(t) => {
                if let Some(p) = permit {
                    p.settle(t.prompt + t.completion);
                }
                reservation.settle(Spend { tokens: t.prompt + t.completion, cost: t.cost });
            }
            None => {
                let need = reservation.need();
                if let Some(p) = permit {
                    p.settle(need.tokens);
                }
                reservation.settle(need);
            }
        }
    }
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

/// Completion tokens reserved for a call whose Agent sets no `parameters.maxTokens`.
pub const DEFAULT_COMPLETION_RESERVE: u64 = 4096;

/// The worst case of the next call of `conv` to `entry`: the prompt's estimate plus
/// `maxTokens`, in tokens and at the agent's prices.
fn worst_case(entry: &AgentEntry, conv: &Conversation) -> (u64, f64) {
    let chars = entry.spec.instructions.len()
        + conv.sizes.messages
        + conv.sizes.tool_defs.get(&entry.key).copied().unwrap_or(0)
        + conv.sizes.response_format;
    let prompt = estimate_tokens(chars);
    let completion = entry.spec.parameters.max_tokens.map_or(DEFAULT_COMPLETION_RESERVE, u64::from);
    let cost = entry.spec.pricing.as_ref().map_or(0.0, |p| p.cost(prompt, completion));
    (prompt + completion, cost)
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

struct Attempt<'a> {
    entry: &'a AgentEntry,
    replica: &'a Replica,
    key: Option<&'a ApiKey>,
    turn: Turn<'a>,
    timeout: Duration,
    /// The timeout is what is left of the step's time, not the agent's `timeoutSeconds`: its
    /// expiry says nothing about the replica.
    step_bound: bool,
}

/// What one model call sends besides the agent's instructions and parameters.
#[derive(Clone, Copy)]
struct Turn<'a> {
    /// The conversation so far, as OpenAI messages.
    messages: &'a [Value],
    /// Tool definitions (`tools` of the request).
    tools: &'a [Value],
    response_format: Option<&'a Value>,
}

/// A successful chat completion.
struct Answer {
    text: String,
    tokens: Option<TokenUsage>,
    /// The assistant message, as sent back in the next turn.
    message: Value,
    tool_calls: Vec<ToolCall>,
    /// The agent that answered.
    agent: Option<AgentKey>,
    /// The HTTP exchange with the replica (the model's time, as the operator sees it).
    http: Duration,
}

/// A tool call the model asks for.
struct ToolCall {
    id: String,
    name: String,
    arguments: String,
}

/// An agent step's conversation: its messages, the tools offered (by agent), the response
/// format, and its transcript.
struct Conversation {
    messages: Vec<Value>,
    tool_defs: HashMap<AgentKey, Vec<Value>>,
    response_format: Option<Value>,
    transcript: Transcript,
    /// Lengths of the JSON of the above, kept as they are added, so that estimating a call's
    /// tokens does not serialise the whole conversation at every turn.
    sizes: Sizes,
}

#[derive(Default)]
struct Sizes {
    messages: usize,
    tool_defs: HashMap<AgentKey, usize>,
    response_format: usize,
}

impl Conversation {
    fn new(llm: &LlmWork, prompt: &str) -> Self {
        let mut conv = Conversation {
            messages: Vec::new(),
            tool_defs: HashMap::new(),
            response_format: llm.schema.as_ref().map(|schema| {
                json!({"type": "json_schema", "json_schema": {
                    "name": "output", "schema": schema, "strict": output_schema::strict_compatible(schema),
                }})
            }),
            transcript: Transcript::default(),
            sizes: Sizes::default(),
        };
        conv.sizes.response_format = conv.response_format.as_ref().map_or(0, |f| f.to_string().len());
        for (role, content) in &llm.messages {
            let role = match role {
                ChatRole::System => "system",
                ChatRole::User => "user",
                ChatRole::Assistant => "assistant",
            };
            conv.push(json!({"role": role, "content": content}));
        }
        if !prompt.is_empty() {
            conv.push(json!({"role": "user", "content": prompt}));
        }
        conv
    }

    fn push(&mut self, message: Value) {
        self.sizes.messages += message.to_string().len();
        self.transcript.message(&message);
        self.messages.push(message);
    }

    /// Offers `defs` (tool definitions) when calling `agent`.
    fn offer_tools(&mut self, agent: AgentKey, defs: Vec<Value>) {
        self.sizes.tool_defs.insert(agent.clone(), defs.iter().map(|d| d.to_string().len()).sum());
        self.tool_defs.insert(agent, defs);
    }

    /// `info` with the transcript of the attempt.
    fn info(&self, mut info: TaskInfo, outcome: &str, error: Option<&str>) -> TaskInfo {
        info.transcript = Some(Arc::new(self.transcript.finish(outcome, error)));
        info
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

    /// Holds room for one call to `entry` under its rate limit and the budgets it counts
    /// against.
    async fn hold(
        &self,
        entry: &AgentEntry,
        conv: &mut Conversation,
        deadline: Option<Instant>,
        run: &CallRun,
        info: &TaskInfo,
    ) -> Result<Hold, Failure> {
        let (tokens, cost) = worst_case(entry, conv);
        let limiter = self.limits.for_agent(&entry.key, entry.spec.rate_limit.as_ref());
        let scope = run.scope(&entry.key);
        let reservation = self
            .budgets
            .reserve(&scope, Spend { tokens, cost }, deadline, |e| {
                if let (Some(s), Some(r)) = (self.budgets.suspender(), &run.run) {
                    let (s, ns, name, why) = (s.clone(), r.namespace.clone(), r.name.clone(), e.to_string());
                    tokio::spawn(async move { s.suspend(&ns, &name, &why).await });
                }
            })
            .await;
        let reservation = match reservation {
            Ok(r) => r,
            Err(e) => {
                if let (Some(m), BudgetError::Exceeded { budget: Some((ns, name)), .. }) = (&self.metrics, &e) {
                    m.budget_refusals.with_label_values(&[ns, name]).inc();
                }
                let message = format!("agent {:?}: {e}", entry.key.name);
                return Err(Failure { message, retryable: false, info: info.clone() });
            }
        };
        let permit = match limiter {
            Some(l) => {
                let need = Need { requests: 1.0, tokens: tokens as f64 };
                match l.acquire(need, run.meta().priority, deadline).await {
                    Ok(p) => {
                        if let Some(m) = &self.metrics {
                            m.rate_limit_wait
                                .with_label_values(&[&entry.key.namespace, &entry.key.name])
                                .observe(p.waited.as_secs_f64());
                        }
                        if p.waited >= Duration::from_millis(1) {
                            conv.transcript
                                .push(Entry::RateLimitWait { agent: entry.key.name.clone(), waited_ms: ms(p.waited) });
                        }
                        Some(p)
                    }
                    Err(e) => return Err(Failure { message: e.to_string(), retryable: true, info: info.clone() }),
                }
            }
            None => None,
        };
        Ok(Hold { permit, reservation })
    }

    /// One chat completion on `agents`, retried across replicas; with why the agents are
    /// exhausted, when they are (for fallbacks).
    async fn complete_on(
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

fn failure(err: &CallError, info: TaskInfo) -> Failure {
    Failure { message: err.to_string(), retryable: err.retryable(), info }
}

/// Removes the API key from an error, should a server ever echo it.
fn redact(err: CallError, key: Option<&ApiKey>) -> CallError {
    let Some(key) = key.map(ApiKey::expose).filter(|k| !k.is_empty()) else { return err };
    match err {
        CallError::Replica { agent, replica, message, kind } if message.contains(key) => {
            CallError::Replica { agent, replica, message: message.replace(key, "[redacted]"), kind }
        }
        other => other,
    }
}

/// The chat completion request of a turn of a step: the agent's instructions as the first
/// system message, then the conversation; its tools and response format.
#[allow(deprecated)] // `max_tokens` and `seed`: what self-hosted servers (vLLM, Ollama, llama.cpp) read.
fn build_request(entry: &AgentEntry, turn: &Turn<'_>) -> Result<CreateChatCompletionRequest, String> {
    let spec = &entry.spec;
    let mut messages: Vec<ChatCompletionRequestMessage> = Vec::with_capacity(turn.messages.len() + 1);
    if !spec.instructions.is_empty() {
        messages
            .push(ChatCompletionRequestSystemMessage { content: spec.instructions.clone().into(), name: None }.into());
    }
    for (i, m) in turn.messages.iter().enumerate() {
        messages.push(serde_json::from_value(m.clone()).map_err(|e| format!("message {i}: {e}"))?);
    }
    let tools = (!turn.tools.is_empty())
        .then(|| serde_json::from_value(Value::Array(turn.tools.to_vec())))
        .transpose()
        .map_err(|e| format!("tools: {e}"))?;
    let response_format = turn
        .response_format
        .map(|f| serde_json::from_value(f.clone()))
        .transpose()
        .map_err(|e| format!("response_format: {e}"))?;
    let p = &spec.parameters;
    let f = |v: Option<f64>| v.map(|x| x as f32);
    if p.stop.len() > 4 {
        return Err(format!("spec.parameters.stop has {} sequences; at most 4 are allowed", p.stop.len()));
    }
    Ok(CreateChatCompletionRequest {
        messages,
        model: spec.model.clone(),
        temperature: f(p.temperature),
        top_p: f(p.top_p),
        max_tokens: p.max_tokens,
        presence_penalty: f(p.presence_penalty),
        frequency_penalty: f(p.frequency_penalty),
        stop: (!p.stop.is_empty()).then(|| StopConfiguration::StringArray(p.stop.clone())),
        seed: p.seed,
        tools,
        response_format,
        ..Default::default()
    })
}

fn answer_of(response: CreateChatCompletionResponse) -> Result<Answer, (String, FailureKind)> {
    let tokens = response.usage.as_ref().map(|u| TokenUsage {
        prompt: u64::from(u.prompt_tokens),
        completion: u64::from(u.completion_tokens),
        cost: 0.0,
    });
    let Some(choice) = response.choices.into_iter().next() else {
        return Err(("the answer has no choices".into(), FailureKind::Transient));
    };
    if choice.finish_reason == Some(async_openai::types::chat::FinishReason::ContentFilter) {
        return Err((
            "the reply was withheld by the content filter (finish_reason content_filter)".into(),
            FailureKind::Rejected,
        ));
    }
    let mut message = serde_json::to_value(&choice.message).unwrap_or_else(|_| json!({}));
    let tool_calls: Vec<ToolCall> = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .map(|c| ToolCall {
                    id: c["id"].as_str().unwrap_or_default().to_string(),
                    name: c["function"]["name"].as_str().unwrap_or_default().to_string(),
                    arguments: c["function"]["arguments"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    // What is sent back: role, content and tool calls (not annotations, audio or refusals).
    if let Some(m) = message.as_object_mut() {
        m.retain(|k, _| matches!(k.as_str(), "role" | "content" | "tool_calls"));
    }
    match (choice.message.content, choice.message.refusal) {
        (Some(text), _) => Ok(Answer { text, tokens, message, tool_calls, agent: None, http: Duration::ZERO }),
        (None, Some(refusal)) if tool_calls.is_empty() => {
            Err((format!("the model refused: {}", clip(&refusal, 300)), FailureKind::Rejected))
        }
        (None, _) => Ok(Answer { text: String::new(), tokens, message, tool_calls, agent: None, http: Duration::ZERO }),
    }
}

/// The GenAI attributes of an answer: the model that answered, its ID, why it stopped, and
/// the tokens used.
fn note_response(span: &mut CallSpan, response: &CreateChatCompletionResponse) {
    if !span.recording() {
        return;
    }
    span.set("gen_ai.response.model", response.model.clone());
    span.set("gen_ai.response.id", response.id.clone());
    let reasons = response
        .choices
        .iter()
        .filter_map(|c| c.finish_reason.as_ref())
        .filter_map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)));
    span.set_strings("gen_ai.response.finish_reasons", reasons);
    if let Some(u) = &response.usage {
        span.set("gen_ai.usage.input_tokens", i64::from(u.prompt_tokens));
        span.set("gen_ai.usage.output_tokens", i64::from(u.completion_tokens));
    }
}

/// `error.type` of a failed call: the HTTP status, or a class of transport error.
fn error_type(e: &OpenAIError) -> String {
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
fn classify(e: &OpenAIError) -> (String, FailureKind) {
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

impl AgentCaller for LlmCaller {
    fn call<'a>(&'a self, namespace: &'a str, work: &'a Work, timeout: Option<Duration>) -> BoxFuture<'a, Outcome> {
        Box::pin(self.call_work(namespace, work, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_reads_milliseconds_seconds_and_dates() {
        let now: jiff::Timestamp = "2024-01-01T00:00:00Z".parse().expect("time");
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(2)));
        h.insert("retry-after", HeaderValue::from_static("Mon, 01 Jan 2024 00:00:05 GMT"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(5)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn error_bodies_give_their_message() {
        let (m, quota) = error_message(br#"{"error":{"message":"Rate limit reached","type":"requests"}}"#, None);
        assert_eq!((m.as_str(), quota), ("Rate limit reached", false));
        let (_, quota) = error_message(br#"{"error":{"message":"quota","type":"insufficient_quota"}}"#, None);
        assert!(quota);
        assert_eq!(error_message(b"  upstream connect error  ", None).0, "upstream connect error");
    }

    #[test]
    fn echoed_keys_are_taken_out_before_messages_are_cut_short() {
        let key = "sk-0123456789abcdef0123456789abcdef";
        // The key straddles the 300-character cut: cutting first would leave part of it.
        let body = format!(r#"{{"error":{{"message":"{} {key} is not valid"}}}}"#, "x".repeat(280));
        let (m, _) = error_message(body.as_bytes(), Some(key));
        assert!(!m.contains("0123456789abcdef"), "{m}");
        assert!(m.contains("[redacted]"), "{m}");
        let (m, _) = error_message(format!("bad key {key}").as_bytes(), Some(key));
        assert_eq!(m, "bad key [redacted]");
        assert_eq!(error_message(b"no key here", Some("")).0, "no key here");
    }

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
    fn replies_that_are_not_chat_completions_are_named() {
        let good = br#"{"id":"c","object":"chat.completion","created":1,"model":"m",
            "choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
        assert_eq!(check_reply(good), Ok(()));
        let bad = check_reply(br#"{"id": "c", "choices": [{"#).expect_err("truncated");
        assert!(matches!(bad, ReplyError::NotJson(_)), "{bad:?}");
        assert!(bad.to_string().starts_with("reply is not valid JSON: EOF while parsing"), "{bad}");
        let bad = check_reply(b"<html>502 Bad Gateway</html>").expect_err("html");
        assert!(matches!(bad, ReplyError::NotJson(_)), "{bad:?}");
        let bad = check_reply(br#"{"result": "hi"}"#).expect_err("wrong shape");
        assert!(bad.to_string().starts_with("reply is not a chat completion: missing field"), "{bad}");
        let (message, kind) = classify(&OpenAIError::Boxed(Box::new(bad)));
        assert_eq!(kind, FailureKind::Transient);
        assert!(message.starts_with("reply is not a chat completion"), "{message}");
    }

    #[test]
    fn timeouts_say_how_far_the_reply_came() {
        let p = Progress::default();
        assert_eq!(p.timed_out(Duration::from_millis(1500)), "no answer within 1.5s");
        p.status.store(200, Ordering::Relaxed);
        p.body.store(42, Ordering::Relaxed);
        assert_eq!(
            p.timed_out(Duration::from_secs(2)),
            "reply not complete within 2.0s (HTTP 200, 42 bytes of the body received)"
        );
    }

    /// A server on loopback that answers 200 with a chunked body that never ends; returns its
    /// address and the bytes it managed to write.
    async fn endless_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let written = Arc::new(AtomicUsize::new(0));
        let count = written.clone();
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
            while socket.write_all(chunk.as_bytes()).await.is_ok() {
                count.fetch_add(0x10000, Ordering::Relaxed);
            }
        });
        (addr, written)
    }

    #[tokio::test]
    async fn an_endless_reply_is_cut_at_the_limit() {
        let (addr, written) = endless_server().await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let response = client.post(format!("http://{addr}/v1/chat/completions")).send().await.expect("headers");
        let progress = Progress::default();
        let limit = 256 * 1024;
        let read = tokio::time::timeout(Duration::from_secs(10), read_reply(response, limit, &progress)).await;
        let err = read.expect("an endless body must be cut, not read forever").expect_err("too large");
        assert_eq!(classify(&err), ("reply larger than 262144 bytes".to_string(), FailureKind::Transient));
        assert!(progress.body.load(Ordering::Relaxed) <= limit);
        // What the server could write is the limit plus what the socket buffers hold: far less
        // than a body read to its end (which here has none).
        let sent = written.load(Ordering::Relaxed);
        assert!(sent < 64 * 1024 * 1024, "{sent} bytes sent");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_fails_before_reading() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50000000\r\n\r\n{";
            let _ = socket.write_all(head.as_bytes()).await;
            // Never sends the rest.
            std::future::pending::<()>().await;
        });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let response = reqwest::Client::new().get(format!("http://{addr}/")).send().await.expect("headers");
        let read = tokio::time::timeout(Duration::from_secs(5), read_reply(response, 1024, &Progress::default())).await;
        let err = read.expect("no wait for a body that is too large anyway").expect_err("too large");
        assert_eq!(classify(&err).0, "reply larger than 1024 bytes");
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

    #[test]
    fn requests_carry_instructions_prompt_model_and_parameters() {
        let spec: crate::api::AgentSpec = serde_json::from_value(serde_json::json!({
            "model": "m", "instructions": "be brief",
            "parameters": {"temperature": 0.5, "maxTokens": 64, "stop": ["END"], "seed": 7}
        }))
        .expect("spec");
        let entry = AgentEntry {
            key: super::super::balancer::AgentKey::new("ns", "a"),
            spec,
            labels: Default::default(),
            replicas: vec![],
            invalid: None,
        };
        let messages = [serde_json::json!({"role": "user", "content": "hello"})];
        let turn = Turn { messages: &messages, tools: &[], response_format: None };
        let req = build_request(&entry, &turn).expect("request");
        let json = serde_json::to_value(&req).expect("json");
        assert_eq!(json["model"], "m");
        assert_eq!(json["messages"][0], serde_json::json!({"role": "system", "content": "be brief"}));
        assert_eq!(json["messages"][1], serde_json::json!({"role": "user", "content": "hello"}));
        assert_eq!(json["temperature"], 0.5);
        assert_eq!(json["max_tokens"], 64);
        assert_eq!(json["stop"], serde_json::json!(["END"]));
        assert_eq!(json["seed"], 7);
        assert!(json.get("stream").is_none());
    }

    #[test]
    fn the_worst_case_counts_the_whole_conversation() {
        let spec: crate::api::AgentSpec = serde_json::from_value(
            serde_json::json!({"model": "m", "instructions": "be brief", "parameters": {"maxTokens": 10}}),
        )
        .expect("spec");
        let key = super::super::balancer::AgentKey::new("ns", "a");
        let entry = AgentEntry { key: key.clone(), spec, labels: Default::default(), replicas: vec![], invalid: None };
        let llm = LlmWork {
            schema: Some(serde_json::json!({"type": "object"})),
            messages: vec![(ChatRole::System, "hi".into())],
            ..Default::default()
        };
        let mut conv = Conversation::new(&llm, "go");
        conv.offer_tools(key, vec![serde_json::json!({"type": "function", "function": {"name": "add"}})]);
        conv.push(serde_json::json!({"role": "tool", "tool_call_id": "c", "content": "x".repeat(4000)}));
        let chars = "be brief".len()
            + conv.messages.iter().map(|m| m.to_string().len()).sum::<usize>()
            + conv.tool_defs.values().flatten().map(|d| d.to_string().len()).sum::<usize>()
            + conv.response_format.as_ref().map_or(0, |f| f.to_string().len());
        assert_eq!(worst_case(&entry, &conv).0, estimate_tokens(chars) + 10);
    }
}
