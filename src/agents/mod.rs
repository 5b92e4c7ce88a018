//! Agents at run time: which replicas serve each agent, how calls are spread across them, and
//! the LLM call itself.
//!
//! - [`registry`]: agents and their replicas, fed by the Agent controller (or built from a
//!   list of Agents without a cluster, for local mode: [`Registry::from_agents`]).
//! - [`balancer`]: the load balancer (strategies, fair queue, circuit breaker, live load); pure,
//!   no Kubernetes or HTTP.
//! - [`caller`]: the [`AgentCaller`](crate::executors::AgentCaller) of agent steps: resolves
//!   agents, picks replicas, calls async-openai with retries across replicas.
//! - [`mcp`]: tools of agent steps from MCP servers (streamable HTTP), a bounded tool loop.
//! - [`transcript`]: what an agent step said and heard, redacted and size-bounded.
//! - [`secrets`]: API keys from Secrets (or given up front), never shown.
//! - [`limits`]: `spec.rateLimit` per agent: reserve, settle, a fair queue by run priority.
//! - [`budget`]: the ledger of Budgets and run budgets: reserve the worst case, settle usage.
//! - [`runs`]: which run a call belongs to (the task pool runs attempts [`runs::in_run`]).
//!
//! Wiring in the cluster:
//!
//! ```text
//! Agent controller --update(agent, replicas)--> Registry --Balancer--> LlmCaller --> replica
//!        ^                                          |
//!        +---- live load (on an interval) ----------+
//! ```

pub mod balancer;
pub mod budget;
pub mod caller;
pub mod limits;
pub mod mcp;
pub mod registry;
pub mod runs;
pub mod secrets;
pub mod transcript;

pub use balancer::{AgentKey, Balancer, BalancerConfig, ReplicaKey, ReplicaLoad};
pub use budget::Budgets;
pub use caller::{CallError, LlmCaller, RetrySettings};
pub use limits::Limits;
pub use registry::{AgentEntry, Registry, RegistryError, Replica};
pub use runs::in_run;
pub use secrets::{ApiKey, KubeSecrets, SecretError, SecretSource, StaticSecrets};
