//! Agent steps in local mode: the Agents from the files, called at their `endpoint.baseUrl` as
//! in the cluster, with an API key from the environment (never from the file): the variable
//! named by the Agent's annotation `volt.dev/api-key-env`, else `OPENAI_API_KEY`.
//!
//! The calls themselves (load balancing, retries across replicas, the OpenAI-compatible
//! client) are the cluster's: [`crate::agents::LlmCaller`] over a
//! [`crate::agents::Registry`] built from the static list of Agents; local mode only hands it
//! the keys it read from the environment.
//!
//! Budgets from the files count the run's calls as in the cluster ([`crate::agents::Budgets`]),
//! from nothing spent: a local run is its own window. `onExceeded: Suspend` fails the step
//! instead, since a local run cannot be suspended and resumed.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;

use crate::agents::{BalancerConfig, Budgets, LlmCaller, Registry, RetrySettings, StaticSecrets};
use crate::api::{Agent, Budget, OnExceeded, SecretKeyRef, Strategy};
use crate::executors::AgentCaller;

/// Annotation naming the environment variable that holds an Agent's API key in local mode.
pub const API_KEY_ENV_ANNOTATION: &str = "volt.dev/api-key-env";
/// Variable read when an Agent names none.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";

/// The environment variable an Agent's key is read from.
pub fn api_key_env(agent: &Agent) -> String {
    agent
        .annotations()
        .get(API_KEY_ENV_ANNOTATION)
        .filter(|v| !v.trim().is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_API_KEY_ENV.to_string())
}

/// The API key of an Agent, from the environment; `None` when the variable is unset or empty
/// (servers such as Ollama or vLLM need none).
pub fn api_key(agent: &Agent) -> Option<String> {
    std::env::var(api_key_env(agent)).ok().filter(|k| !k.is_empty())
}

/// How agent steps will be served in this run.
pub struct AgentSetup {
    pub caller: Option<Arc<dyn AgentCaller>>,
    /// Why agent steps cannot run, when `caller` is `None`: the message of their failure.
    pub unavailable: String,
    /// Notes for people (agents that local mode cannot call).
    pub notes: Vec<String>,
}

/// Name of the stand-in Secret that holds the keys read from the environment.
const ENV_SECRET: &str = "local-environment";

/// The ledger of a local run: its Budgets, each from nothing spent (`Suspend` acting as `Fail`).
fn budgets(budgets: &[Budget], notes: &mut Vec<String>) -> Arc<Budgets> {
    let ledger = Budgets::default();
    let now = jiff::Timestamp::now();
    for b in budgets {
        let mut spec = b.spec.clone();
        if spec.on_exceeded == OnExceeded::Suspend {
            notes.push(format!(
                "Budget/{}: onExceeded Suspend fails the step in local mode (a local run is not suspended)",
                b.name_any()
            ));
            spec.on_exceeded = OnExceeded::Fail;
        }
        ledger.upsert(&b.namespace().unwrap_or_default(), &b.name_any(), &spec, None, now);
    }
    Arc::new(ledger)
}

/// Builds the agent caller for the Agents and Budgets of a run (their namespace already set).
/// Each Agent's `apiKeySecretRef` (a cluster Secret, not read here) is replaced by the key from
/// the environment, or dropped when the variable is unset.
pub fn setup(agents: &[Agent], budgets_in_files: &[Budget], strategy: Strategy) -> AgentSetup {
    let mut notes = Vec::new();
    let mut secrets = StaticSecrets::new();
    let mut prepared = Vec::with_capacity(agents.len());
    for a in agents {
        let mut agent = a.clone();
        let name = agent.name_any();
        if agent.spec.endpoint.is_none() {
            let form = if agent.spec.replicas.is_some() { "replicas" } else { "deployment" };
            notes.push(format!(
                "Agent/{name}: uses {form}, which needs a cluster; local mode calls only agents with endpoint.baseUrl"
            ));
        }
        let var = api_key_env(&agent);
        match api_key(&agent) {
            Some(key) => {
                let namespace = agent.namespace().unwrap_or_else(|| "default".into());
                secrets = secrets.with(&namespace, ENV_SECRET, &var, key);
                agent.spec.api_key_secret_ref = Some(SecretKeyRef { name: ENV_SECRET.into(), key: var });
            }
            None => {
                if agent.spec.api_key_secret_ref.is_some() {
                    notes.push(format!(
                        "Agent/{name}: ${var} is not set, so it is called without an API key (its apiKeySecretRef \
                         names a cluster Secret, which local mode does not read)"
                    ));
                }
                agent.spec.api_key_secret_ref = None;
            }
        }
        prepared.push(agent);
    }
    match Registry::from_agents(prepared, BalancerConfig::default()) {
        Ok(registry) => {
            // The list is fixed: an unknown agent will not appear later, so do not wait for it.
            let retry = RetrySettings { resolve_grace: Duration::ZERO, ..RetrySettings::default() };
            let ledger = budgets(budgets_in_files, &mut notes);
            let caller =
                LlmCaller::new(Arc::new(registry), Arc::new(secrets), strategy).with_retry(retry).with_budgets(ledger);
            AgentSetup { caller: Some(Arc::new(caller)), unavailable: String::new(), notes }
        }
        Err(e) => AgentSetup { caller: None, unavailable: format!("agent steps cannot run: {e}"), notes },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentSpec;

    #[test]
    fn key_variable_from_the_annotation_or_the_default() {
        let mut a = Agent::new("a", AgentSpec::default());
        assert_eq!(api_key_env(&a), "OPENAI_API_KEY");
        a.annotations_mut().insert(API_KEY_ENV_ANNOTATION.into(), "MY_KEY".into());
        assert_eq!(api_key_env(&a), "MY_KEY");
    }
}
