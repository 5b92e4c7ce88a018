use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::conditions_schema;

/// A Budget: the most tokens and cost the agent steps of a namespace (or of some workflows or
/// agents) may use in a window of time.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "volt.dev",
    version = "v1alpha1",
    kind = "Budget",
    namespaced,
    doc = "A Budget: the most tokens and cost agent steps may use in a window of time.",
    status = "BudgetStatus",
    shortname = "vbud",
    category = "volt",
    printcolumn = r#"{"name":"Window","type":"string","jsonPath":".spec.window"}"#,
    printcolumn = r#"{"name":"Tokens","type":"integer","jsonPath":".status.used.tokens"}"#,
    printcolumn = r#"{"name":"Max-Tokens","type":"integer","jsonPath":".spec.maxTokens"}"#,
    printcolumn = r#"{"name":"Cost","type":"number","jsonPath":".status.used.cost"}"#,
    printcolumn = r#"{"name":"Max-Cost","type":"number","jsonPath":".spec.maxCost"}"#,
    printcolumn = r#"{"name":"Exceeded","type":"string","jsonPath":".status.conditions[?(@.type==\"Exceeded\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("anyOf" = [
    {"required": ["maxTokens"]},
    {"required": ["maxCost"]}
]))]
pub struct BudgetSpec {
    /// What the budget counts: calls of steps of these Workflows, to these Agents (both, when
    /// both are given). Empty: every agent call in the namespace.
    #[serde(default, skip_serializing_if = "BudgetSelector::is_empty")]
    pub selector: BudgetSelector,

    /// The window usage is counted over; it starts again at each boundary (UTC): every day,
    /// every Monday, every first of the month, or never (`Total`).
    pub window: BudgetWindow,

    /// Most prompt plus completion tokens in a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000000000000u64))]
    pub max_tokens: Option<u64>,

    /// Most cost in a window, in the unit of the Agents' `spec.pricing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000000000000.0))]
    pub max_cost: Option<f64>,

    /// What happens to a step whose call would go over: `Fail` fails the step; `Suspend`
    /// suspends its run (`spec.suspend`) and the call waits for room (a new window, a larger
    /// budget) within the step's timeout.
    #[serde(default)]
    pub on_exceeded: OnExceeded,
}

/// Which calls a Budget counts.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct BudgetSelector {
    /// Workflow names (a run's `workflowRef`); empty: every workflow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub workflows: Vec<String>,
    /// Agent names (the agent that answers a call); empty: every agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253)))]
    pub agents: Vec<String>,
}

impl BudgetSelector {
    pub fn is_empty(&self) -> bool {
        self.workflows.is_empty() && self.agents.is_empty()
    }
}

/// The window a Budget counts over.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum BudgetWindow {
    Daily,
    Weekly,
    #[default]
    Monthly,
    /// Never starts again.
    Total,
}

/// What a call over a Budget does.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum OnExceeded {
    /// The step fails, naming the budget.
    #[default]
    Fail,
    /// The run is suspended and the call waits for room.
    Suspend,
}

/// Observed state of a Budget.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready (the spec is valid and counted), Exceeded (a call was refused in this window),
    /// Stalled (invalid spec).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// What the window has used so far (settled calls).
    #[serde(default)]
    pub used: BudgetUsed,
    /// When the current window started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Time>,
    /// With `--shards`: what the replicas holding each shard counted, by shard number. Each
    /// replica writes the shares of the shards it holds; `used` is their sum over the window.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub shards: std::collections::BTreeMap<String, BudgetShare>,
}

/// What the replicas holding one shard counted in a Budget's window.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetShare {
    pub tokens: u64,
    pub cost: f64,
    /// The window these figures belong to; a share of an earlier window counts for nothing.
    pub window_start: Time,
    /// The last call this shard's replica refused in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Tokens and cost used in a window.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct BudgetUsed {
    pub tokens: u64,
    pub cost: f64,
}
