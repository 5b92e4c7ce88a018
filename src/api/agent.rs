use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::conditions_schema;

/// An Agent: an OpenAI-compatible chat endpoint, the instructions and parameters to call it
/// with, and the replicas that serve it.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "volt.dev",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    doc = "An Agent: an OpenAI-compatible chat endpoint with instructions, parameters and replicas.",
    status = "AgentStatus",
    shortname = "ag",
    category = "volt",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpointKind"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [
    {"required": ["endpoint"]},
    {"required": ["replicas"]},
    {"required": ["deployment"]}
]))]
pub struct AgentSpec {
    /// Model name sent in every chat completion request (for example `gpt-4o-mini`).
    #[schemars(length(min = 1))]
    pub model: String,

    /// System prompt sent before every step's prompt.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instructions: String,

    /// Capabilities this agent offers; steps may select agents by capability.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,

    /// Sampling parameters sent with every request.
    #[serde(default, skip_serializing_if = "ModelParameters::is_empty")]
    pub parameters: ModelParameters,

    /// The Secret key holding the API key, sent as a bearer token. Never put a literal key in
    /// the spec. The Secret must be in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Relative weight of this agent (and each of its replicas) for the `weighted` strategy.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000))]
    pub weight: u32,

    /// In-flight calls allowed per replica; further calls wait in a fair queue.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrency: u32,

    /// Timeout of one call, in seconds.
    #[serde(default = "default_agent_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,

    /// An external service: one logical replica at a fixed base URL (for example a hosted API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<ExternalEndpoint>,

    /// Existing pods that serve the OpenAI API (vLLM, Ollama, llama.cpp...), selected by labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaSelector>,

    /// A Deployment of replicas that the operator creates and owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<AgentDeployment>,

    /// MCP servers (streamable HTTP) whose tools this agent's steps may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tools: Vec<McpServer>,

    /// Calls and tokens per minute allowed to this agent, shared by every run and step that
    /// uses it (in this operator). Calls over the limit wait in a fair queue (higher run
    /// priority first, then first come) instead of meeting the provider's 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Agents (by name, in this namespace) tried in order when this one is exhausted: rate
    /// limited past its retries, every replica's circuit open, context too long, content
    /// filtered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 253)))]
    pub fallbacks: Vec<String>,

    /// Prices of this agent's tokens, in a currency unit of your choice: the cost of each step
    /// and run, and what Budgets' `maxCost` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
}

/// Requests and tokens per minute allowed to an agent. Each call reserves its worst case (an
/// estimate of the prompt plus `maxTokens`) and gives back what the reply's usage did not use.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Chat completion requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000000u64))]
    pub tokens_per_minute: Option<u64>,
}

/// Prices per million tokens.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pricing {
    /// Price of a million prompt (input) tokens.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub input_per_million_tokens: f64,
    /// Price of a million completion (output) tokens.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub output_per_million_tokens: f64,
}

impl Pricing {
    /// The cost of `input` prompt and `output` completion tokens.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_million_tokens + output as f64 * self.output_per_million_tokens) / 1e6
    }
}

/// An MCP server reached over the streamable HTTP transport, and the tools allowed from it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McpServer {
    /// Name of the server, unique within the agent.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The server's MCP endpoint (`http://` or `https://`), for example `http://docs-mcp:8000/mcp`.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// HTTP headers sent to the server (for example `Authorization`), read from every key of a
    /// Secret in the Agent's namespace. They never appear in status, events, logs or transcripts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<HeadersFrom>,
    /// Tools of this server that steps may use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Allowed tools whose calls wait for a decision, like an approval step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require_approval: Vec<String>,
}

/// Where an MCP server's headers come from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeadersFrom {
    /// A Secret whose keys are header names and values header values.
    pub secret_ref: SecretNameRef,
}

/// A Secret, by name, in the object's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct SecretNameRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_weight() -> u32 {
    1
}
fn default_max_concurrency() -> u32 {
    4
}
fn default_agent_timeout() -> u32 {
    120
}

/// Sampling parameters of a chat completion.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelParameters {
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling probability mass, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f64>,
    /// Upper bound on completion tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u32>,
    /// Presence penalty, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty, -2 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Sequences where the model stops generating.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Seed for deterministic sampling, where the server supports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
}

impl ModelParameters {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// A key of a Secret in the same namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// A single external endpoint.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalEndpoint {
    /// Base URL of the OpenAI-compatible API, including the version path (for example
    /// `https://api.openai.com/v1`).
    #[schemars(length(min = 1), regex(pattern = r"^https?://"))]
    pub base_url: String,
}

/// Existing pods that serve the agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSelector {
    /// Label selector of the replica pods, in the Agent's namespace.
    pub selector: LabelSelector,
    /// Port the pods serve the API on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Path of the API on each pod.
    #[serde(default = "default_api_path")]
    pub path: String,
    /// URL scheme of the pods' API.
    #[serde(default)]
    pub scheme: Scheme,
}

/// A Deployment of replicas owned by the Agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentDeployment {
    /// Number of replicas.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Port each replica serves the API on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Path of the API on each replica.
    #[serde(default = "default_api_path")]
    pub path: String,
    /// URL scheme of the replicas' API.
    #[serde(default)]
    pub scheme: Scheme,
    /// Pod template of the replicas. The operator adds its labels (`volt.dev/agent`) to it.
    #[schemars(schema_with = "super::opaque_object")]
    pub template: PodTemplateSpec,
}

fn default_api_path() -> String {
    "/v1".to_string()
}
fn default_replicas() -> i32 {
    1
}

/// URL scheme used to reach replica pods.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    #[default]
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Load-balancing strategy: how a replica is picked for each call.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each healthy replica in turn.
    #[default]
    RoundRobin,
    /// The replica with the fewest in-flight calls.
    LeastConnections,
    /// In proportion to the agents' `weight` (smooth weighted round robin: even, interleaved).
    Weighted,
    /// The lowest expected latency from EWMA latency, error rate and in-flight calls.
    PerformanceBased,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" => Ok(Self::RoundRobin),
            "least_connections" => Ok(Self::LeastConnections),
            "weighted" => Ok(Self::Weighted),
            "performance_based" => Ok(Self::PerformanceBased),
            other => Err(format!(
                "unknown strategy {other:?}: expected round_robin, least_connections, weighted or performance_based"
            )),
        }
    }
}

/// Observed state of an Agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (at least one healthy replica), Degraded (replicas unhealthy or failing calls),
    /// Reconciling and Stalled.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Which endpoint form the agent uses: endpoint, replicas or deployment.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint_kind: String,
    /// Ready replicas over desired replicas, as `ready/desired`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ready_replicas: String,
    /// Replica counts.
    #[serde(default)]
    pub replicas: ReplicaCounts,
    /// One row per replica, with health from pod status and live load.
    #[serde(default)]
    pub endpoints: Vec<EndpointStatus>,
}

/// Replica counts of an Agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Replicas wanted (Deployment replicas, or pods matched).
    pub desired: i32,
    /// Replicas whose pod is Ready.
    pub ready: i32,
    /// Replicas that may receive calls (Ready, not terminating, not crash-looping, circuit closed).
    pub healthy: i32,
}

/// One replica of an Agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// Pod serving this replica (empty for an external endpoint).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    /// host:port (or the base URL for an external endpoint); empty until the pod has an IP.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Whether calls are sent to this replica.
    pub healthy: bool,
    /// Why the replica is not healthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Calls in flight now.
    #[serde(default)]
    pub in_flight: u32,
    /// Calls completed since the operator started.
    #[serde(default)]
    pub completed: u64,
    /// Calls failed since the operator started.
    #[serde(default)]
    pub failed: u64,
    /// Exponentially weighted moving average of call latency, in milliseconds.
    #[serde(default)]
    pub ewma_latency_ms: u64,
}

/// Labels selecting agents by capability.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct CapabilitySelector {
    /// Every capability listed must be offered by the agent.
    #[schemars(length(min = 1))]
    pub capabilities: Vec<String>,
    /// Optional label selector on the Agent objects.
    #[serde(default, rename = "matchLabels", skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}
