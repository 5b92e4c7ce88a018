//! Tools of agent steps, from MCP servers over the streamable HTTP transport (the official
//! Rust SDK, `rmcp`). An Agent lists servers and the tools it allows from each
//! (`spec.tools`); a step names the tools it may use (`agent.tools`). For one attempt of a
//! step, [`ToolSet::open`] takes a session to each server of those tools from the
//! [`Sessions`] pool (connecting and listing the server's tools when the pool has none);
//! [`ToolSet::call`] runs one call the model asked for, bounded in time and in the size of its
//! result. Header values (from the server's `headersFrom` Secret) are sent marked sensitive and
//! taken out of every message this module makes.
//!
//! Sessions are kept across steps, one per server (namespace, URL and header values), with the
//! server's tool list: a step does not pay for a session's opening (initialize, the tool list,
//! the session's own stream) nor for its closing. The tool list is listed again when the server
//! says it changed (`notifications/tools/list_changed`) or when a step asks for a tool it does
//! not hold. A session that fails a call or does not answer one in time is dropped from the
//! pool; one unused for [`SESSION_IDLE`] is closed, and at most [`MAX_SESSIONS`] are kept (the
//! pool is a `moka` cache: expiry and eviction happen off the lookup's path).

use crate::locks::lock;
use crate::text::clip;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use moka::future::Cache;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use rmcp::model::CallToolRequestParams;
use rmcp::service::{MaybeSendFuture, NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::api::{AgentSpec, McpServer};

use super::secrets::SecretSource;

/// Largest tool result handed to the model; a longer one fails the step.
pub const MAX_TOOL_RESULT_BYTES: usize = 64 * 1024;
/// Largest answer read from an MCP server (the transport's own bound).
const MAX_MCP_RESPONSE_BYTES: usize = 1024 * 1024;
/// How long connecting to a server and listing its tools may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pooled session may go unused before it is closed.
pub const SESSION_IDLE: Duration = Duration::from_secs(300);
/// Most sessions the pool keeps (the least recently used goes first).
pub const MAX_SESSIONS: u64 = 256;
/// Requests one session carries at once (rmcp's default is 16); steps share sessions.
const SESSION_CONCURRENCY: usize = 1024;

/// Why a tool could not be used. Messages name the tool and server, never header values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    #[error("tool {tool:?} is not allowed by agent {agent:?} (spec.tools[].allow)")]
    NotAllowed { agent: String, tool: String },
    #[error("MCP server {server:?} (spec.tools[].headersFrom): {message}")]
    Headers { server: String, message: String },
    #[error("MCP server {server:?}: {message}")]
    Server { server: String, message: String, retryable: bool },
    #[error("MCP server {server:?} has no tool {tool:?} (it lists: {available})")]
    Missing { server: String, tool: String, available: String },
    #[error("the model asked for tool {tool:?}, which the step does not offer (agent.tools: {offered})")]
    Unknown { tool: String, offered: String },
    #[error("tool {tool:?}: the arguments are not a JSON object: {message}")]
    BadArguments { tool: String, message: String },
    #[error("tool {tool:?} (MCP server {server:?}) failed: {message}")]
    Failed { tool: String, server: String, message: String },
    #[error("tool {tool:?} (MCP server {server:?}) returned {size} bytes, over the bound of {limit}")]
    TooLarge { tool: String, server: String, size: usize, limit: usize },
    #[error("tool {tool:?} (MCP server {server:?}) did not answer within {secs:.1}s")]
    Hung { tool: String, server: String, secs: f64 },
    #[error(
        "waiting for approval of tool {tool:?} (MCP server {server:?}, requireApproval) with arguments {arguments}"
    )]
    NeedsApproval { tool: String, server: String, arguments: String },
}

impl ToolError {
    /// A short class of the error (a span's `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            ToolError::NotAllowed { .. } => "not_allowed",
            ToolError::Headers { .. } => "headers",
            ToolError::Server { .. } => "server",
            ToolError::Missing { .. } => "missing",
            ToolError::Unknown { .. } => "unknown_tool",
            ToolError::BadArguments { .. } => "bad_arguments",
            ToolError::Failed { .. } => "tool_error",
            ToolError::TooLarge { .. } => "too_large",
            ToolError::Hung { .. } => "timeout",
            ToolError::NeedsApproval { .. } => "needs_approval",
        }
    }

    /// Whether a new attempt of the step may help.
    pub fn retryable(&self) -> bool {
        match self {
            ToolError::Server { retryable, .. } => *retryable,
            ToolError::Hung { .. } => true,
            _ => false,
        }
    }
}

/// Checks an Agent's `spec.tools`: names, URLs, tools allowed once.
pub fn validate(spec: &AgentSpec) -> Result<(), String> {
    let mut servers = Vec::new();
    let mut tools: HashMap<&str, &str> = HashMap::new();
    for (i, s) in spec.tools.iter().enumerate() {
        let f = format!("spec.tools[{i}]");
        if s.name.trim().is_empty() {
            return Err(format!("{f}.name: must not be empty"));
        }
        if servers.contains(&s.name.as_str()) {
            return Err(format!("{f}.name: server {:?} is listed twice", s.name));
        }
        servers.push(s.name.as_str());
        match reqwest::Url::parse(&s.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => return Err(format!("{f}.url: must be an http:// or https:// URL with a host")),
            Err(e) => return Err(format!("{f}.url: {e}")),
        }
        if let Some(h) = &s.headers_from
            && h.secret_ref.name.trim().is_empty()
        {
            return Err(format!("{f}.headersFrom.secretRef.name: must not be empty"));
        }
        for t in &s.allow {
            if t.trim().is_empty() {
                return Err(format!("{f}.allow: a tool name must not be empty"));
            }
            if let Some(other) = tools.insert(t, &s.name) {
                return Err(format!("{f}.allow: tool {t:?} is also allowed from server {other:?}"));
            }
        }
        for t in &s.require_approval {
            if !s.allow.contains(t) {
                return Err(format!("{f}.requireApproval: tool {t:?} is not in allow"));
            }
        }
    }
    Ok(())
}

/// Whether `spec` allows every tool of `tools`.
pub fn allows_all(spec: &AgentSpec, tools: &[String]) -> bool {
    tools.iter().all(|t| spec.tools.iter().any(|s| s.allow.contains(t)))
}

struct Tool {
    server: String,
    description: String,
    input_schema: Value,
    approval: bool,
}

/// The client side of a session: notes when the server says its tools changed.
#[derive(Clone, Default)]
struct Watcher {
    tools_changed: Arc<AtomicBool>,
}

impl ClientHandler for Watcher {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + MaybeSendFuture + '_ {
        self.tools_changed.store(true, Ordering::Relaxed);
        std::future::ready(())
    }
}

/// One open session to an MCP server and the tools it listed.
struct Session {
    client: RunningService<RoleClient, Watcher>,
    tools_changed: Arc<AtomicBool>,
    tools: Mutex<Arc<Vec<rmcp::model::Tool>>>,
    /// Failed a call or left one unanswered: not handed out again.
    broken: AtomicBool,
    /// Where the pool keeps it.
    key: SessionKey,
}

impl Session {
    fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed) && !self.client.is_closed() && !self.client.is_transport_closed()
    }
}

/// Which server a session talks to, as whom: the namespace, the URL and a digest of the
/// header values (the values themselves are not kept here).
#[derive(Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    namespace: String,
    url: String,
    headers: [u8; 32],
}

/// MCP sessions kept across steps (see the module's documentation): idle ones expire and the
/// least recently used go when the pool is full, in the cache's own upkeep, not under a lock
/// every lookup takes. Dropping a session that no step holds closes it. Clones share the pool.
#[derive(Clone)]
pub struct Sessions {
    open: Cache<SessionKey, Arc<Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_limits(SESSION_IDLE, MAX_SESSIONS)
    }
}

impl Sessions {
    /// A pool closing sessions unused for `idle`, keeping at most `capacity`.
    pub fn with_limits(idle: Duration, capacity: u64) -> Self {
        let open =
            Cache::builder().max_capacity(capacity).time_to_idle(idle).eviction_policy(EvictionPolicy::lru()).build();
        Self { open }
    }

    /// Sessions in the pool (as of the cache's last upkeep, which runs every few operations).
    pub fn len(&self) -> usize {
        usize::try_from(self.open.entry_count()).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A usable session for `key`; one that broke or closed is taken out.
    async fn get(&self, key: &SessionKey) -> Option<Arc<Session>> {
        let session = self.open.get(key).await?;
        if session.usable() {
            return Some(session);
        }
        self.remove(&session).await;
        None
    }

    async fn put(&self, session: Arc<Session>) {
        self.open.insert(session.key.clone(), session).await;
    }

    /// Takes `session` out of the pool, if it is still the one kept for its key.
    async fn remove(&self, session: &Arc<Session>) {
        self.open
            .entry_by_ref(&session.key)
            .and_compute_with(|kept| {
                let op = match kept {
                    Some(kept) if Arc::ptr_eq(kept.value(), session) => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }
}

/// The MCP sessions of one attempt and the tools a step may use through them.
pub struct ToolSet {
    /// Where broken sessions are taken out of.
    pool: Sessions,
    tools: BTreeMap<String, Tool>,
    sessions: HashMap<String, Arc<Session>>,
    /// Header values, to take out of messages.
    secrets: Vec<String>,
}

impl ToolSet {
    /// Takes sessions to the servers of `wanted` (tools of the agent `spec`) from `pool`, or
    /// connects to them and lists their tools.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        pool: &Sessions,
        http: &reqwest::Client,
        secrets: &dyn SecretSource,
        namespace: &str,
        agent: &str,
        spec: &AgentSpec,
        wanted: &[String],
        deadline: Option<Instant>,
    ) -> Result<ToolSet, ToolError> {
        let mut set =
            ToolSet { pool: pool.clone(), tools: BTreeMap::new(), sessions: HashMap::new(), secrets: Vec::new() };
        let mut by_server: BTreeMap<&str, (&McpServer, Vec<&String>)> = BTreeMap::new();
        for t in wanted {
            let Some(server) = spec.tools.iter().find(|s| s.allow.contains(t)) else {
                return Err(ToolError::NotAllowed { agent: agent.into(), tool: t.clone() });
            };
            by_server.entry(server.name.as_str()).or_insert((server, Vec::new())).1.push(t);
        }
        for (name, (server, tools)) in by_server {
            let session = set.session(pool, http, secrets, namespace, server, deadline).await?;
            let mut listed = lock(&session.tools).clone();
            // A tool the list does not hold may be new on the server: list again, once.
            if tools.iter().any(|t| !listed.iter().any(|l| l.name == t.as_str())) {
                listed = set.list(&session, server, deadline).await?;
            }
            for t in tools {
                let Some(found) = listed.iter().find(|l| l.name == t.as_str()) else {
                    let available = listed.iter().map(|l| l.name.to_string()).collect::<Vec<_>>().join(", ");
                    return Err(ToolError::Missing { server: name.into(), tool: t.clone(), available });
                };
                set.tools.insert(
                    t.clone(),
                    Tool {
                        server: name.into(),
                        description: found.description.as_deref().unwrap_or_default().to_string(),
                        input_schema: Value::Object((*found.input_schema).clone()),
                        approval: server.require_approval.contains(t),
                    },
                );
            }
            set.sessions.insert(name.to_string(), session);
        }
        Ok(set)
    }

    /// A session to `server`: from `pool`, its tool list refreshed when the server said it
    /// changed; else a new one, put in the pool.
    async fn session(
        &mut self,
        pool: &Sessions,
        http: &reqwest::Client,
        secrets: &dyn SecretSource,
        namespace: &str,
        server: &McpServer,
        deadline: Option<Instant>,
    ) -> Result<Arc<Session>, ToolError> {
        let headers = self.headers(secrets, namespace, server).await?;
        let mut digest = Sha256::new();
        let mut sorted: Vec<_> = headers.iter().collect();
        sorted.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        for (k, v) in sorted {
            digest.update(k.as_str().as_bytes());
            digest.update([0]);
            digest.update(v.as_bytes());
            digest.update([0]);
        }
        let key =
            SessionKey { namespace: namespace.into(), url: server.url.clone(), headers: digest.finalize().into() };
        if let Some(session) = pool.get(&key).await {
            if session.tools_changed.swap(false, Ordering::Relaxed) {
                self.list(&session, server, deadline).await?;
            }
            return Ok(session);
        }
        let session = Arc::new(self.connect(http, server, headers, key, deadline).await?);
        pool.put(session.clone()).await;
        Ok(session)
    }

    /// Lists the tools of `session` again and keeps the list.
    async fn list(
        &self,
        session: &Arc<Session>,
        server: &McpServer,
        deadline: Option<Instant>,
    ) -> Result<Arc<Vec<rmcp::model::Tool>>, ToolError> {
        let bound = bound(deadline, OPEN_TIMEOUT);
        let listed = match tokio::time::timeout(bound, session.client.list_all_tools()).await {
            Ok(Ok(l)) => Arc::new(l),
            Ok(Err(e)) => {
                self.broken(session).await;
                let message = self.redact(&format!("listing tools: {e}"));
                return Err(ToolError::Server { server: server.name.clone(), message, retryable: true });
            }
            Err(_) => {
                self.broken(session).await;
                let message = format!("listing tools took over {:.1}s", bound.as_secs_f64());
                return Err(ToolError::Server { server: server.name.clone(), message, retryable: true });
            }
        };
        *lock(&session.tools) = listed.clone();
        Ok(listed)
    }

    /// The headers of `server` from its `headersFrom` Secret; their values become secrets to
    /// take out of messages.
    async fn headers(
        &mut self,
        secrets: &dyn SecretSource,
        namespace: &str,
        server: &McpServer,
    ) -> Result<HashMap<HeaderName, HeaderValue>, ToolError> {
        let mut headers = HashMap::new();
        if let Some(from) = &server.headers_from {
            let data = secrets
                .secret_data(namespace, &from.secret_ref.name)
                .await
                .map_err(|e| ToolError::Headers { server: server.name.clone(), message: e.to_string() })?;
            for (k, v) in data {
                let bad = |what: &str| ToolError::Headers {
                    server: server.name.clone(),
                    message: format!("key {k:?} of Secret {:?} is not a valid header {what}", from.secret_ref.name),
                };
                let name = HeaderName::try_from(k.as_str()).map_err(|_| bad("name"))?;
                let mut value = HeaderValue::from_str(v.expose()).map_err(|_| bad("value"))?;
                value.set_sensitive(true);
                self.secrets.push(v.expose().to_string());
                headers.insert(name, value);
            }
        }
        Ok(headers)
    }

    /// Connects to `server` and lists its tools.
    async fn connect(
        &self,
        http: &reqwest::Client,
        server: &McpServer,
        headers: HashMap<HeaderName, HeaderValue>,
        key: SessionKey,
        deadline: Option<Instant>,
    ) -> Result<Session, ToolError> {
        let config = StreamableHttpClientTransportConfig::with_uri(server.url.as_str())
            .custom_headers(headers)
            .max_json_response_size(MAX_MCP_RESPONSE_BYTES)
            .max_sse_event_size(MAX_MCP_RESPONSE_BYTES)
            .max_concurrent_requests(SESSION_CONCURRENCY);
        let transport = StreamableHttpClientTransport::with_client(http.clone(), config);
        let bound = bound(deadline, OPEN_TIMEOUT);
        let server_err = |message: String, retryable: bool| ToolError::Server {
            server: server.name.clone(),
            message: self.redact(&message),
            retryable,
        };
        let watcher = Watcher::default();
        let tools_changed = watcher.tools_changed.clone();
        let client = match tokio::time::timeout(bound, watcher.serve(transport)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(server_err(format!("connecting to {}: {e}", server.url), true)),
            Err(_) => {
                return Err(server_err(
                    format!("no answer from {} within {:.1}s", server.url, bound.as_secs_f64()),
                    true,
                ));
            }
        };
        let listed = match tokio::time::timeout(bound, client.list_all_tools()).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(server_err(format!("listing tools: {e}"), true)),
            Err(_) => return Err(server_err(format!("listing tools took over {:.1}s", bound.as_secs_f64()), true)),
        };
        Ok(Session { client, tools_changed, tools: Mutex::new(Arc::new(listed)), broken: AtomicBool::new(false), key })
    }

    /// The tools as the chat completion request's `tools`.
    pub fn definitions(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|(name, t)| {
                json!({"type": "function", "function": {
                    "name": name, "description": t.description, "parameters": t.input_schema,
                }})
            })
            .collect()
    }

    /// The header values to keep out of anything shown.
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }

    /// Runs tool `name` with `arguments` (the model's JSON text), within `deadline` or
    /// `per_call`; gives the result's text.
    pub async fn call(
        &self,
        name: &str,
        arguments: &str,
        deadline: Option<Instant>,
        per_call: Duration,
        decisions: &std::collections::BTreeMap<String, crate::api::StepDecision>,
        traceparent: Option<String>,
    ) -> Result<String, ToolError> {
        let Some(tool) = self.tools.get(name) else {
            let offered = self.tools.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(ToolError::Unknown { tool: name.into(), offered });
        };
        if tool.approval {
            match decisions.get(name) {
                None => {
                    return Err(ToolError::NeedsApproval {
                        tool: name.into(),
                        server: tool.server.clone(),
                        arguments: clip(&self.redact(arguments), 300),
                    });
                }
                // A rejection is the tool's answer: the model goes on without it.
                Some(d) if d.decision == crate::api::DecisionKind::Reject => {
                    let by = d.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
                    let why = d.comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
                    return Ok(format!("The call of tool {name} was rejected{by}{why}. Do not call it again."));
                }
                Some(_) => {}
            }
        }
        let args: serde_json::Map<String, Value> = if arguments.trim().is_empty() {
            Default::default()
        } else {
            serde_json::from_str(arguments)
                .map_err(|e| ToolError::BadArguments { tool: name.into(), message: e.to_string() })?
        };
        let session = &self.sessions[&tool.server];
        let mut params = CallToolRequestParams::new(name.to_string());
        params.arguments = Some(args);
        // W3C trace context in the request's `_meta` (MCP SEP-414): the server's spans join.
        if let Some(tp) = traceparent {
            let mut meta = rmcp::model::RequestMetaObject::new();
            meta.set_traceparent(tp);
            params.meta = Some(meta);
        }
        let bound = bound(deadline, per_call);
        let result = match tokio::time::timeout(bound, session.client.call_tool(params)).await {
            Err(_) => {
                // The request may hold a place in the session until the server answers.
                self.broken(session).await;
                return Err(ToolError::Hung {
                    tool: name.into(),
                    server: tool.server.clone(),
                    secs: bound.as_secs_f64(),
                });
            }
            Ok(Err(e)) => {
                self.broken(session).await;
                return Err(ToolError::Server {
                    server: tool.server.clone(),
                    message: self.redact(&format!("calling tool {name:?}: {e}")),
                    retryable: true,
                });
            }
            Ok(Ok(r)) => serde_json::to_value(&r).unwrap_or(Value::Null),
        };
        let text = result_text(&result);
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            return Err(ToolError::Failed {
                tool: name.into(),
                server: tool.server.clone(),
                message: clip(&self.redact(&text), 500),
            });
        }
        if text.len() > MAX_TOOL_RESULT_BYTES {
            return Err(ToolError::TooLarge {
                tool: name.into(),
                server: tool.server.clone(),
                size: text.len(),
                limit: MAX_TOOL_RESULT_BYTES,
            });
        }
        Ok(self.redact(&text))
    }

    /// Gives the sessions back to the pool; those the pool dropped (broken, idle) close when
    /// no other step holds them.
    pub async fn close(self) {
        drop(self.sessions);
    }

    fn redact(&self, text: &str) -> String {
        redact_all(text, &self.secrets)
    }

    /// Marks `session` as not to be handed out again and takes it out of the pool (steps
    /// holding it finish with it; it closes when the last lets go).
    async fn broken(&self, session: &Arc<Session>) {
        session.broken.store(true, Ordering::Relaxed);
        self.pool.remove(session).await;
    }
}

/// The time a call may take: `per_call`, cut to what is left before `deadline`.
fn bound(deadline: Option<Instant>, per_call: Duration) -> Duration {
    match deadline {
        Some(d) => per_call.min(d.saturating_duration_since(Instant::now())),
        None => per_call,
    }
}

/// The text of a `tools/call` result: its text blocks joined, else its structured content,
/// else the JSON of its content.
fn result_text(result: &Value) -> String {
    let content = result.get("content").and_then(Value::as_array).cloned().unwrap_or_default();
    let texts: Vec<&str> = content
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    if texts.len() == content.len() && !texts.is_empty() {
        return texts.join("\n");
    }
    if let Some(s) = result.get("structuredContent") {
        return s.to_string();
    }
    Value::Array(content).to_string()
}

/// `text` with every non-empty value of `secrets` replaced by `[redacted]`.
pub fn redact_all(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tools: Value) -> AgentSpec {
        serde_json::from_value(json!({"model": "m", "tools": tools})).expect("spec")
    }

    #[test]
    fn agent_tools_are_checked() {
        assert_eq!(validate(&spec(json!([{"name": "docs", "url": "http://d:8000/mcp", "allow": ["search"]}]))), Ok(()));
        let err = validate(&spec(json!([{"name": "docs", "url": "ftp://d/mcp"}]))).expect_err("scheme");
        assert!(err.starts_with("spec.tools[0].url"), "{err}");
        let err = validate(&spec(json!([
            {"name": "a", "url": "http://a/mcp", "allow": ["search"]},
            {"name": "b", "url": "http://b/mcp", "allow": ["search"]}
        ])))
        .expect_err("twice");
        assert!(err.contains("also allowed from server \"a\""), "{err}");
        let err = validate(&spec(json!([{"name": "a", "url": "http://a/mcp", "requireApproval": ["rm"]}])))
            .expect_err("approval of a tool not allowed");
        assert!(err.contains("requireApproval"), "{err}");
    }

    #[test]
    fn results_become_text() {
        assert_eq!(
            result_text(&json!({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})),
            "a\nb"
        );
        assert_eq!(result_text(&json!({"content": [], "structuredContent": {"n": 1}})), r#"{"n":1}"#);
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(redact_all("Bearer tok-123456 used", &["tok-123456".into()]), "Bearer [redacted] used");
    }

    /// A minimal MCP server over streamable HTTP (JSON answers, no server stream): each
    /// `initialize` opens a session and notes its `Authorization` header; tool `fail` answers
    /// HTTP 500.
    async fn tiny_server() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let opened: Arc<Mutex<Vec<String>>> = Default::default();
        let log = opened.clone();
        let answer = move |headers: HeaderMap, axum::Json(req): axum::Json<Value>| {
            let log = log.clone();
            async move {
                let ok = |result: Value| axum::Json(json!({"jsonrpc": "2.0", "id": req["id"], "result": result}));
                match req["method"].as_str() {
                    Some("initialize") => {
                        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("-");
                        let mut opened = lock(&log);
                        opened.push(auth.to_string());
                        let id = format!("s{}", opened.len());
                        let info = json!({"protocolVersion": req["params"]["protocolVersion"],
                            "capabilities": {"tools": {}}, "serverInfo": {"name": "tiny", "version": "0"}});
                        ([("mcp-session-id", id)], ok(info)).into_response()
                    }
                    Some("tools/list") => ok(json!({"tools": [
                        {"name": "add", "inputSchema": {"type": "object"}},
                        {"name": "fail", "inputSchema": {"type": "object"}}]}))
                    .into_response(),
                    Some("tools/call") if req["params"]["name"] == "fail" => {
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                    Some("tools/call") => ok(json!({"content": [{"type": "text", "text": "3"}]})).into_response(),
                    _ => StatusCode::ACCEPTED.into_response(),
                }
            }
        };
        let app = axum::Router::new().route(
            "/mcp",
            axum::routing::post(answer)
                .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
                .delete(|| async { StatusCode::OK }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/mcp", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, opened)
    }

    #[tokio::test]
    async fn sessions_are_pooled_per_server_and_header_set_and_broken_ones_replaced() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, opened) = tiny_server().await;
        let http = reqwest::Client::new();
        let secrets = crate::agents::secrets::StaticSecrets::new()
            .with("ns", "as-a", "Authorization", "Bearer a")
            .with("ns", "as-b", "Authorization", "Bearer b");
        let agent = |secret: &str| {
            spec(
                json!([{"name": "t", "url": url, "allow": ["add", "fail"], "headersFrom": {"secretRef": {"name": secret}}}]),
            )
        };
        let (as_a, as_b) = (agent("as-a"), agent("as-b"));
        let wanted = ["add".to_string(), "fail".to_string()];
        let pool = Sessions::default();
        let open = |spec| ToolSet::open(&pool, &http, &secrets, "ns", "agent", spec, &wanted, None);
        let no_decisions = BTreeMap::new();

        let first = open(&as_a).await.expect("a session");
        let again = open(&as_a).await.expect("the same session");
        assert!(Arc::ptr_eq(&first.sessions["t"], &again.sessions["t"]), "the same server and headers share one");
        let other = open(&as_b).await.expect("another session");
        assert!(!Arc::ptr_eq(&first.sessions["t"], &other.sessions["t"]), "other headers get their own");
        assert_eq!(*lock(&opened), ["Bearer a", "Bearer b"]);
        assert_eq!(first.call("add", "{}", None, OPEN_TIMEOUT, &no_decisions, None).await, Ok("3".into()));

        let err = first.call("fail", "{}", None, OPEN_TIMEOUT, &no_decisions, None).await.expect_err("HTTP 500");
        assert!(matches!(err, ToolError::Server { .. }), "{err}");
        let replaced = open(&as_a).await.expect("a new session");
        assert!(!Arc::ptr_eq(&first.sessions["t"], &replaced.sessions["t"]), "a broken session is not handed out");
        assert!(Arc::ptr_eq(&other.sessions["t"], &open(&as_b).await.expect("b").sessions["t"]), "b is unharmed");
        assert_eq!(*lock(&opened), ["Bearer a", "Bearer b", "Bearer a"]);
        for set in [first, again, other, replaced] {
            set.close().await;
        }

        // Idle sessions are closed (a pool with a short idle time).
        let pool = Sessions::with_limits(Duration::from_millis(30), MAX_SESSIONS);
        let before = lock(&opened).len();
        let set = ToolSet::open(&pool, &http, &secrets, "ns", "agent", &as_a, &wanted, None).await.expect("a");
        let held = set.sessions["t"].clone();
        set.close().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let set = ToolSet::open(&pool, &http, &secrets, "ns", "agent", &as_a, &wanted, None).await.expect("a");
        assert!(!Arc::ptr_eq(&held, &set.sessions["t"]), "an idle session is not reused");
        assert_eq!(lock(&opened).len(), before + 2);
    }
}
