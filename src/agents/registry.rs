//! The registry of agents and their replicas. In the cluster the Agent controller feeds it on
//! every pass ([`Registry::update`]); without a cluster (local mode, benchmarks) it is built
//! from a list of Agents ([`Registry::from_agents`]). The agent caller reads it to resolve a
//! step's agents, and its [`Balancer`] picks the replicas.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use kube::ResourceExt;
use tokio::sync::{broadcast, watch};

use crate::api::{Agent, AgentSpec, CapabilitySelector, Scheme};

use super::balancer::{AgentKey, Balancer, BalancerConfig, CircuitListener, ReplicaKey, ReplicaLoad, ReplicaSpec};

/// One replica of an agent: where to call it and whether its pod is healthy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// The replica's name: its pod's name, or `host[:port]` of an external endpoint.
    pub name: String,
    /// The pod serving it (none for an external endpoint).
    pub pod: Option<String>,
    /// `ip:port`, or the base URL of an external endpoint.
    pub address: String,
    /// Base URL of the OpenAI-compatible API (`http://10.0.0.5:8000/v1`).
    pub base_url: String,
    /// Health from pod status.
    pub healthy: bool,
    /// Why it is not healthy.
    pub reason: String,
}

/// Why a replica or an agent cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("agent {agent:?}: spec.endpoint.baseUrl {url:?} is not a valid http(s) URL: {reason}")]
    BadBaseUrl { agent: String, url: String, reason: String },
    #[error("agent {agent:?}: {message}")]
    InvalidSpec { agent: String, message: String },
}

impl Replica {
    /// The one replica of an external endpoint (`spec.endpoint.baseUrl`). Its name is the
    /// URL's `host[:port]` (never any credentials the URL may hold).
    pub fn endpoint(agent: &str, base_url: &str) -> Result<Replica, RegistryError> {
        let bad = |reason: &str| RegistryError::BadBaseUrl {
            agent: agent.into(),
            url: redact_url(base_url),
            reason: reason.into(),
        };
        let url = reqwest::Url::parse(base_url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        let host = url.host_str().ok_or_else(|| bad("no host"))?;
        let name = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        Ok(Replica {
            name,
            pod: None,
            address: redact_url(base_url),
            base_url: base_url.trim_end_matches('/').to_string(),
            healthy: true,
            reason: String::new(),
        })
    }

    /// A replica served by a pod at `ip` (`scheme://ip:port/path`).
    pub fn pod(pod: &str, ip: &str, port: i32, path: &str, scheme: Scheme, healthy: bool, reason: &str) -> Replica {
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        let address = if ip.is_empty() { String::new() } else { format!("{host}:{port}") };
        let path = path.trim_end_matches('/');
        let path = if path.is_empty() || path.starts_with('/') { path.to_string() } else { format!("/{path}") };
        let base_url = if ip.is_empty() { String::new() } else { format!("{}://{address}{path}", scheme.as_str()) };
        Replica {
            name: pod.to_string(),
            pod: Some(pod.to_string()),
            address,
            base_url,
            healthy: healthy && !ip.is_empty(),
            reason: if healthy && ip.is_empty() { "NoPodIP".into() } else { reason.to_string() },
        }
    }
}

/// A URL with any `user:password@` removed, for status and messages.
fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// An agent as the caller needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentEntry {
    pub key: AgentKey,
    pub spec: AgentSpec,
    /// Labels of the Agent object (capability selectors may match them).
    pub labels: BTreeMap<String, String>,
    pub replicas: Vec<Replica>,
    /// Why the agent cannot be called (an invalid spec), if so.
    pub invalid: Option<String>,
}

impl AgentEntry {
    pub fn replica(&self, name: &str) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.name == name)
    }

    /// Whether the agent offers every capability of `selector` and has its labels.
    pub fn matches(&self, selector: &CapabilitySelector) -> bool {
        selector.capabilities.iter().all(|c| self.spec.capabilities.contains(c))
            && selector.match_labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// Agents and their replicas, with the balancer that spreads calls across them.
pub struct Registry {
    agents: RwLock<BTreeMap<AgentKey, Arc<AgentEntry>>>,
    balancer: Balancer,
    version: watch::Sender<u64>,
    circuits: broadcast::Sender<ReplicaKey>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("agents", &self.read().len()).field("balancer", &self.balancer).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(BalancerConfig::default())
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(config: BalancerConfig) -> Self {
        let (circuits, _) = broadcast::channel(256);
        let tx = circuits.clone();
        let listener: CircuitListener = Arc::new(move |key: &ReplicaKey, _open: bool| {
            let _ = tx.send(key.clone());
        });
        Self {
            agents: RwLock::default(),
            balancer: Balancer::with_listener(config, listener),
            version: watch::channel(0).0,
            circuits,
        }
    }

    /// A registry of the given Agents, for use without a cluster (local mode): an `endpoint`
    /// agent gets its one replica at `baseUrl`; `replicas` and `deployment` agents have no
    /// pods to find here, so they get no replicas (calls to them fail with "no healthy
    /// replica"). An Agent without a namespace is put in `default`.
    pub fn from_agents(agents: impl IntoIterator<Item = Agent>, config: BalancerConfig) -> Result<Self, RegistryError> {
        let registry = Self::new(config);
        for mut agent in agents {
            if agent.metadata.namespace.is_none() {
                agent.metadata.namespace = Some("default".into());
            }
            let name = agent.name_any();
            let replicas = match (&agent.spec.endpoint, &agent.spec.replicas, &agent.spec.deployment) {
                (Some(e), None, None) => vec![Replica::endpoint(&name, &e.base_url)?],
                (None, Some(_), None) | (None, None, Some(_)) => Vec::new(),
                _ => {
                    return Err(RegistryError::InvalidSpec {
                        agent: name,
                        message: "set exactly one of spec.endpoint, spec.replicas, spec.deployment".into(),
                    });
                }
            };
            registry.update(&agent, replicas);
        }
        Ok(registry)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<AgentKey, Arc<AgentEntry>>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<AgentKey, Arc<AgentEntry>>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }

    fn key_of(agent: &Agent) -> AgentKey {
        AgentKey::new(agent.namespace().unwrap_or_default(), agent.name_any())
    }

    fn store(&self, entry: AgentEntry) {
        let specs = entry
            .replicas
            .iter()
            .map(|r| ReplicaSpec {
                name: r.name.clone(),
                healthy: r.healthy && entry.invalid.is_none(),
                reason: r.reason.clone(),
                max_concurrency: entry.spec.max_concurrency.max(1),
                weight: entry.spec.weight,
            })
            .collect();
        let key = entry.key.clone();
        let changed = {
            let mut agents = self.write();
            let changed = agents.get(&key).is_none_or(|old| **old != entry);
            agents.insert(key.clone(), Arc::new(entry));
            changed
        };
        self.balancer.set_replicas(&key, specs);
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Records an Agent and its replicas as they are now.
    pub fn update(&self, agent: &Agent, replicas: Vec<Replica>) {
        self.store(AgentEntry {
            key: Self::key_of(agent),
            spec: agent.spec.clone(),
            labels: agent.labels().clone(),
            replicas,
            invalid: None,
        });
    }

    /// Records an Agent whose spec is invalid: steps that use it fail with `message`.
    pub fn set_invalid(&self, agent: &Agent, message: impl Into<String>) {
        self.store(AgentEntry {
            key: Self::key_of(agent),
            spec: agent.spec.clone(),
            labels: agent.labels().clone(),
            replicas: Vec::new(),
            invalid: Some(message.into()),
        });
    }

    /// Forgets an agent.
    pub fn remove(&self, namespace: &str, name: &str) {
        let key = AgentKey::new(namespace, name);
        let removed = self.write().remove(&key).is_some();
        self.balancer.remove_agent(&key);
        if removed {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Keeps only the agents for which `keep` holds.
    pub fn retain(&self, mut keep: impl FnMut(&AgentKey) -> bool) {
        let gone: Vec<AgentKey> = self.read().keys().filter(|k| !keep(k)).cloned().collect();
        for key in gone {
            self.remove(&key.namespace, &key.name);
        }
    }

    /// The agent `name` of `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<AgentEntry>> {
        self.read().get(&AgentKey::new(namespace, name)).cloned()
    }

    /// Every agent of `namespace` that `selector` matches.
    pub fn select(&self, namespace: &str, selector: &CapabilitySelector) -> Vec<Arc<AgentEntry>> {
        self.read().values().filter(|a| a.key.namespace == namespace && a.matches(selector)).cloned().collect()
    }

    /// Every agent.
    pub fn agents(&self) -> Vec<Arc<AgentEntry>> {
        self.read().values().cloned().collect()
    }

    /// The live load of an agent's replicas.
    pub fn load(&self, namespace: &str, name: &str) -> Vec<ReplicaLoad> {
        self.balancer.load(&AgentKey::new(namespace, name))
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Changes whenever an agent is added, changed or removed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Replicas whose circuit opened or closed.
    pub fn circuit_changes(&self) -> broadcast::Receiver<ReplicaKey> {
        self.circuits.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentDeployment, ExternalEndpoint};

    fn agent(name: &str, yaml_spec: serde_json::Value) -> Agent {
        let mut a = Agent::new(name, serde_json::from_value(yaml_spec).expect("spec"));
        a.metadata.namespace = Some("ns".into());
        a
    }

    #[test]
    fn replica_urls() {
        let r = Replica::pod("vllm-0", "10.0.0.5", 8000, "/v1", Scheme::Http, true, "");
        assert_eq!((r.address.as_str(), r.base_url.as_str()), ("10.0.0.5:8000", "http://10.0.0.5:8000/v1"));
        let r = Replica::pod("p", "fd00::5", 443, "v1/", Scheme::Https, true, "");
        assert_eq!(r.base_url, "https://[fd00::5]:443/v1");
        let r = Replica::pod("p", "", 8000, "/v1", Scheme::Http, true, "");
        assert!(!r.healthy);
        assert_eq!(r.reason, "NoPodIP");
        let e = Replica::endpoint("a", "https://user:pw@api.example.com/v1/").expect("valid");
        assert_eq!(e.name, "api.example.com");
        assert_eq!(e.base_url, "https://user:pw@api.example.com/v1");
        assert!(!e.address.contains("pw"), "{}", e.address);
        let err = Replica::endpoint("a", "ftp://x").expect_err("not http");
        assert!(err.to_string().contains("agent \"a\""), "{err}");
    }

    #[test]
    fn from_agents_builds_endpoint_replicas_and_selects_by_capability() {
        let coder = agent(
            "coder",
            serde_json::json!({"model": "m", "capabilities": ["code", "review"],
                               "endpoint": {"baseUrl": "http://127.0.0.1:9000/v1"}}),
        );
        let mut pool = agent("pool", serde_json::json!({"model": "m", "capabilities": ["code"]}));
        pool.spec.deployment = Some(AgentDeployment { port: 8000, ..Default::default() });
        let reg = Registry::from_agents([coder, pool], BalancerConfig::default()).expect("valid");
        let coder = reg.get("ns", "coder").expect("coder");
        assert_eq!(coder.replicas.len(), 1);
        assert_eq!(coder.replicas[0].name, "127.0.0.1:9000");
        assert_eq!(reg.get("ns", "pool").map(|p| p.replicas.len()), Some(0));
        let sel = |caps: &[&str]| CapabilitySelector {
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            match_labels: Default::default(),
        };
        let names = |v: Vec<Arc<AgentEntry>>| v.into_iter().map(|a| a.key.name.clone()).collect::<Vec<String>>();
        assert_eq!(names(reg.select("ns", &sel(&["code"]))), ["coder", "pool"]);
        assert_eq!(names(reg.select("ns", &sel(&["code", "review"]))), ["coder"]);
        assert!(reg.select("other", &sel(&["code"])).is_empty());
        assert_eq!(reg.load("ns", "coder").len(), 1);

        let mut both = agent("both", serde_json::json!({"model": "m"}));
        both.spec.endpoint = Some(ExternalEndpoint { base_url: "http://x/v1".into() });
        both.spec.deployment = Some(AgentDeployment::default());
        assert!(Registry::from_agents([both], BalancerConfig::default()).is_err());
    }

    #[test]
    fn updates_bump_the_version_only_on_change_and_removal_forgets() {
        let reg = Registry::default();
        let rx = reg.subscribe();
        let a = agent("a", serde_json::json!({"model": "m", "endpoint": {"baseUrl": "http://h/v1"}}));
        let replicas = vec![Replica::pod("p", "10.0.0.1", 80, "/v1", Scheme::Http, true, "")];
        reg.update(&a, replicas.clone());
        let v1 = *rx.borrow();
        reg.update(&a, replicas);
        assert_eq!(*rx.borrow(), v1, "no change, no bump");
        reg.retain(|k| k.name != "a");
        assert!(reg.get("ns", "a").is_none());
        assert!(reg.load("ns", "a").is_empty());
        assert!(*rx.borrow() > v1);
    }
}
