//! The Agent controller: owns deployment-mode Deployments, derives each replica's health from
//! its pod's status, feeds the agent [`Registry`] that agent steps call through, and reports
//! replicas, endpoints (with live load) and Ready/Degraded conditions.
//!
//! Pods and Deployments are read from watch caches, so a pass costs no API reads. Every Agent
//! is reconciled again on `--metrics-interval` to refresh the live load in its status (a
//! status write only when something changed), and at once when a replica's circuit breaker
//! opens or closes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agents::{Registry, Replica, ReplicaLoad};
use crate::api::{
    Agent, AgentStatus, Cond, DEGRADED, EndpointStatus, FIELD_MANAGER, KState, ReplicaCounts, Scheme, own_conditions,
    set_condition, set_kstatus,
};
use crate::metrics::Metrics;
use crate::naming;

use super::{Error, drain, error_requeue};
use crate::events::EventSink;
use crate::executors::http_policy::reaches_own_port;
use crate::kube_util::{ServedFromWatchCache, WatchBackoff, api_for};

/// How long a pass waits for the pod cache's first list.
const POD_CACHE_WAIT: Duration = Duration::from_secs(30);

/// (Agent generation, Deployment generation) after applying an Agent's Deployment.
type Applied = (Option<i64>, Option<i64>);

struct Ctx {
    client: Client,
    metrics: Metrics,
    events: EventSink,
    resync: Duration,
    /// The operator's HTTP port: agent and MCP URLs may not reach it through loopback.
    own_port: Option<u16>,
    registry: Arc<Registry>,
    ownership: Arc<crate::shards::Ownership>,
    pods: Store<Pod>,
    deployments: Store<Deployment>,
    /// Every Agent of the scope (fallbacks name them).
    agents: Store<Agent>,
    /// Deployments applied, by Agent uid. The Deployment is applied again when either
    /// generation changes.
    applied: Mutex<HashMap<String, Applied>>,
}

/// Whether a replica pod may take calls, and if not, why (from pod status only).
pub fn replica_health(pod: &Pod) -> (bool, String) {
    if pod.metadata.deletion_timestamp.is_some() {
        return (false, "Terminating".into());
    }
    let Some(status) = pod.status.as_ref() else { return (false, "Pending".into()) };
    for cs in status.container_statuses.iter().flatten() {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_else(|| "Waiting".into());
            return (false, format!("{reason} (restarts: {})", cs.restart_count));
        }
    }
    let phase = status.phase.as_deref().unwrap_or("Pending");
    if phase != "Running" {
        return (false, phase.to_string());
    }
    let ready = status.conditions.iter().flatten().any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return (false, "NotReady".into());
    }
    if status.pod_ip.as_deref().unwrap_or("").is_empty() {
        return (false, "NoPodIP".into());
    }
    (true, String::new())
}

/// Whether `labels` match `sel`; an error for an operator Kubernetes does not define, and for
/// an empty selector (which would match every pod of the namespace).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let exprs = sel.match_expressions.as_deref().unwrap_or_default();
    if sel.match_labels.as_ref().is_none_or(|m| m.is_empty()) && exprs.is_empty() {
        return Err("selector matches nothing: give matchLabels or matchExpressions".into());
    }
    let mut all = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    for e in exprs {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("unknown selector operator {other:?}")),
        };
        all &= ok;
    }
    Ok(all)
}

/// Which endpoint form an Agent uses, or why its spec is invalid.
pub fn endpoint_kind(agent: &Agent) -> Result<&'static str, String> {
    let s = &agent.spec;
    let kind = match (s.endpoint.is_some(), s.replicas.is_some(), s.deployment.is_some()) {
        (true, false, false) => "endpoint",
        (false, true, false) => "replicas",
        (false, false, true) => "deployment",
        (false, false, false) => {
            return Err("spec: set exactly one of endpoint, replicas, deployment (none is set)".into());
        }
        _ => return Err("spec: set exactly one of endpoint, replicas, deployment (several are set)".into()),
    };
    crate::agents::mcp::validate(s)?;
    Ok(kind)
}

/// Agent URLs (`spec.endpoint.baseUrl`, `spec.tools[].url`) may not reach the operator's own
/// HTTP port through loopback, where its JSON API is (see
/// [`crate::executors::http_policy::reaches_own_port`]). The message names the field.
pub fn check_own_port(agent: &Agent, own_port: u16) -> Result<(), String> {
    let reaches = |url: &str| reqwest::Url::parse(url).is_ok_and(|u| reaches_own_port(&u, own_port));
    let refuse = |field: String, url: &str| {
        Err(format!(
            "{field}: {url:?} reaches port {own_port}, the operator's own HTTP port, through loopback, \
             which agents may not call"
        ))
    };
    if let Some(e) = &agent.spec.endpoint
        && reaches(&e.base_url)
    {
        return refuse("spec.endpoint.baseUrl".into(), &e.base_url);
    }
    for (i, tool) in agent.spec.tools.iter().enumerate() {
        if reaches(&tool.url) {
            return refuse(format!("spec.tools[{i}].url"), &tool.url);
        }
    }
    Ok(())
}

/// Checks an Agent's `spec.fallbacks` against the other Agents of its namespace: no
/// duplicates, not itself, each one exists, and no cycle through their own fallbacks.
pub fn check_fallbacks(agent: &Agent, others: &[Arc<Agent>]) -> Result<(), String> {
    let name = agent.name_any();
    let ns = agent.namespace();
    let find = |n: &str| others.iter().find(|a| a.name_any() == n && a.namespace() == ns);
    for (i, f) in agent.spec.fallbacks.iter().enumerate() {
        if *f == name {
            return Err(format!("spec.fallbacks[{i}]: {f:?} is the agent itself"));
        }
        if agent.spec.fallbacks[..i].contains(f) {
            return Err(format!("spec.fallbacks[{i}]: {f:?} is listed twice"));
        }
        if find(f).is_none() {
            return Err(format!("spec.fallbacks[{i}]: no Agent {f:?} in namespace {:?}", ns.as_deref().unwrap_or("")));
        }
    }
    // A cycle back to this agent through the fallbacks' own fallbacks.
    let mut path = vec![name.clone()];
    fn walk<'a>(
        at: &[String],
        start: &str,
        path: &mut Vec<String>,
        find: &dyn Fn(&str) -> Option<&'a Arc<Agent>>,
    ) -> Option<Vec<String>> {
        for f in at {
            if f == start {
                let mut cycle = path.clone();
                cycle.push(f.clone());
                return Some(cycle);
            }
            if path.contains(f) {
                continue;
            }
            let Some(a) = find(f) else { continue };
            path.push(f.clone());
            if let Some(c) = walk(&a.spec.fallbacks, start, path, find) {
                return Some(c);
            }
            path.pop();
        }
        None
    }
    if let Some(cycle) = walk(&agent.spec.fallbacks, &name, &mut path, &find) {
        return Err(format!("spec.fallbacks: a cycle of fallbacks: {}", cycle.join(" -> ")));
    }
    Ok(())
}

/// The pods of an agent: its Deployment's (by the operator's label) or those its selector
/// picks.
fn pod_selector(agent: &Agent) -> Option<LabelSelector> {
    if agent.spec.deployment.is_some() {
        return Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                naming::LABEL_AGENT.to_string(),
                naming::label_value(&agent.name_any()),
            )])),
            match_expressions: None,
        });
    }
    agent.spec.replicas.as_ref().map(|r| r.selector.clone())
}

/// Whether `pod` may be a replica of `agent` (same namespace, selected by its labels).
fn selects(agent: &Agent, pod: &Pod) -> bool {
    agent.namespace() == pod.namespace()
        && pod_selector(agent).is_some_and(|sel| selector_matches(&sel, pod.labels()).unwrap_or(false))
}

fn build_deployment(agent: &Agent) -> Option<Deployment> {
    let d = agent.spec.deployment.as_ref()?;
    let name = agent.name_any();
    let labels = naming::agent_labels(&name);
    let mut template = d.template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels.get_or_insert_with(BTreeMap::new).extend(labels.clone());
    Some(Deployment {
        metadata: ObjectMeta {
            name: Some(naming::agent_deployment(&name)),
            namespace: agent.namespace(),
            labels: Some(labels.clone()),
            owner_references: agent.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(d.replicas),
            selector: LabelSelector { match_labels: Some(labels), match_expressions: None },
            template,
            ..Default::default()
        },
        status: None,
    })
}

/// Applies a deployment-mode Agent's Deployment when it is missing, the Agent changed, or
/// someone else changed the Deployment's spec.
async fn ensure_deployment(agent: &Agent, ctx: &Ctx) -> Result<(), Error> {
    let ns = agent.namespace().unwrap_or_default();
    let dep_name = naming::agent_deployment(&agent.name_any());
    let uid = agent.uid().unwrap_or_default();
    let existing = ctx.deployments.get(&ObjectRef::new(&dep_name).within(&ns));
    let memo = ctx.applied.lock().unwrap_or_else(|p| p.into_inner()).get(&uid).copied();
    let current = existing.as_ref().map(|d| (agent.metadata.generation, d.metadata.generation));
    if existing.is_some() && memo.is_some() && memo == current {
        return Ok(());
    }
    let dep = build_deployment(agent).ok_or_else(|| Error::Other("spec.deployment is not set".into()))?;
    let mut value = serde_json::to_value(&dep)?;
    value["apiVersion"] = json!("apps/v1");
    value["kind"] = json!("Deployment");
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let applied = api.patch(&dep_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await?;
    ctx.applied
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid, (agent.metadata.generation, applied.metadata.generation));
    Ok(())
}

/// The replicas of a pod-backed agent, from the pod cache, sorted by pod name.
fn pod_replicas(agent: &Agent, ctx: &Ctx, selector: &LabelSelector) -> Result<Vec<Replica>, String> {
    let (port, path, scheme) = match (&agent.spec.deployment, &agent.spec.replicas) {
        (Some(d), _) => (d.port, d.path.as_str(), d.scheme),
        (None, Some(r)) => (r.port, r.path.as_str(), r.scheme),
        (None, None) => (0, "", Scheme::Http),
    };
    // Checks the selector even when no pod is there to match.
    selector_matches(selector, &BTreeMap::new())?;
    let ns = agent.namespace();
    let mut replicas = Vec::new();
    for pod in ctx.pods.state() {
        if pod.namespace() != ns || !selector_matches(selector, pod.labels())? {
            continue;
        }
        let (healthy, reason) = replica_health(&pod);
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
        replicas.push(Replica::pod(&pod.name_any(), &ip, port, path, scheme, healthy, &reason));
    }
    replicas.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(replicas)
}

/// A status row per replica: health from the pod and the circuit breaker, live load from the
/// balancer.
fn endpoint_rows(replicas: &[Replica], load: &[ReplicaLoad]) -> Vec<EndpointStatus> {
    replicas
        .iter()
        .map(|r| {
            let l = load.iter().find(|l| l.name == r.name).cloned().unwrap_or_default();
            let (healthy, reason) = if !r.healthy {
                (false, r.reason.clone())
            } else if l.circuit.is_open() {
                (false, format!("CircuitOpen ({} consecutive failed calls)", l.consecutive_failures))
            } else {
                (true, String::new())
            };
            EndpointStatus {
                pod: r.pod.clone().unwrap_or_default(),
                address: r.address.clone(),
                healthy,
                reason,
                in_flight: l.in_flight,
                completed: l.completed,
                failed: l.failed,
                ewma_latency_ms: l.ewma_latency.map(|d| d.as_millis() as u64).unwrap_or(0),
            }
        })
        .collect()
}

async fn reconcile(agent: Arc<Agent>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("agent");
    let generation = agent.metadata.generation;
    let now = Timestamp::now();
    let old = agent.status.clone().unwrap_or_default();
    let mut status =
        AgentStatus { conditions: old.conditions.clone(), observed_generation: generation, ..Default::default() };
    let stall = |status: &mut AgentStatus, msg: &str| {
        ctx.registry.set_invalid(&agent, msg);
        set_kstatus(&mut status.conditions, KState::Stalled, "InvalidSpec", msg, generation, now);
        set_condition(&mut status.conditions, Cond::new(DEGRADED, false, "InvalidSpec", ""), generation, now);
    };

    let kind = match endpoint_kind(&agent) {
        Ok(kind) => kind,
        Err(msg) => {
            stall(&mut status, &msg);
            return write_status(&agent, &ctx, &old, status).await;
        }
    };
    status.endpoint_kind = kind.into();
    if let Some(port) = ctx.own_port
        && let Err(msg) = check_own_port(&agent, port)
    {
        stall(&mut status, &msg);
        return write_status(&agent, &ctx, &old, status).await;
    }
    if !agent.spec.fallbacks.is_empty()
        && tokio::time::timeout(POD_CACHE_WAIT, crate::kube_util::wait_ready(&ctx.agents)).await.is_err()
    {
        return Err(Error::Other("the agent watch has not listed agents yet".into()));
    }
    if let Err(msg) = check_fallbacks(&agent, &ctx.agents.state()) {
        stall(&mut status, &msg);
        return write_status(&agent, &ctx, &old, status).await;
    }
    let (desired, replicas) = match kind {
        "endpoint" => {
            let url = agent.spec.endpoint.as_ref().map(|e| e.base_url.as_str()).unwrap_or_default();
            match Replica::endpoint(&agent.name_any(), url) {
                Ok(r) => (1, vec![r]),
                Err(e) => {
                    stall(&mut status, &e.to_string());
                    return write_status(&agent, &ctx, &old, status).await;
                }
            }
        }
        _ => {
            if kind == "deployment" && ctx.ownership.leads() {
                ensure_deployment(&agent, &ctx).await?;
            }
            let Some(selector) = pod_selector(&agent) else {
                return Err(Error::Other(format!("spec.{kind} is not set")));
            };
            if tokio::time::timeout(POD_CACHE_WAIT, crate::kube_util::wait_ready(&ctx.pods)).await.is_err() {
                return Err(Error::Other("the pod watch has not listed pods yet".into()));
            }
            match pod_replicas(&agent, &ctx, &selector) {
                Ok(replicas) => {
                    let desired = agent.spec.deployment.as_ref().map(|d| d.replicas).unwrap_or(replicas.len() as i32);
                    (desired, replicas)
                }
                Err(msg) => {
                    stall(&mut status, &format!("spec.replicas.selector: {msg}"));
                    return write_status(&agent, &ctx, &old, status).await;
                }
            }
        }
    };
    ctx.registry.update(&agent, replicas.clone());
    let names: Vec<&str> = replicas.iter().map(|r| r.name.as_str()).collect();
    ctx.metrics.llm.forget_replicas(&agent.namespace().unwrap_or_default(), &agent.name_any(), &names);
    let load = ctx.registry.load(&agent.namespace().unwrap_or_default(), &agent.name_any());
    let rows = endpoint_rows(&replicas, &load);

    let ready = replicas.iter().filter(|r| r.healthy).count() as i32;
    let healthy = rows.iter().filter(|r| r.healthy).count() as i32;
    status.replicas = ReplicaCounts { desired, ready, healthy };
    status.ready_replicas = format!("{ready}/{desired}");
    status.endpoints = rows;
    if healthy > 0 {
        set_kstatus(
            &mut status.conditions,
            KState::Ready,
            "Serving",
            &format!("{healthy} of {desired} replicas healthy"),
            generation,
            now,
        );
    } else {
        let msg = if desired == 0 { "no replicas".to_string() } else { format!("0 of {desired} replicas healthy") };
        set_kstatus(&mut status.conditions, KState::Reconciling, "NoHealthyReplicas", &msg, generation, now);
    }
    let unhealthy: Vec<String> = status
        .endpoints
        .iter()
        .filter(|r| !r.healthy)
        .map(|r| format!("{} ({})", if r.pod.is_empty() { &r.address } else { &r.pod }, r.reason))
        .collect();
    let circuit_open = status.endpoints.iter().any(|r| r.reason.starts_with("CircuitOpen"));
    let degraded = !unhealthy.is_empty() || healthy < desired;
    let reason = match (degraded, circuit_open) {
        (false, _) => "AllHealthy",
        (true, true) => "CircuitOpen",
        (true, false) => "ReplicasUnhealthy",
    };
    let msg = if unhealthy.is_empty() {
        if degraded { format!("{healthy} of {desired} replicas healthy") } else { String::new() }
    } else {
        format!("unhealthy: {}", unhealthy.join(", "))
    };
    set_condition(&mut status.conditions, Cond::new(DEGRADED, degraded, reason, msg), generation, now);
    write_status(&agent, &ctx, &old, status).await
}

async fn write_status(agent: &Agent, ctx: &Ctx, old: &AgentStatus, status: AgentStatus) -> Result<Action, Error> {
    if !ctx.ownership.leads() {
        return Ok(Action::requeue(ctx.resync));
    }
    // Health changes are events.
    for row in &status.endpoints {
        let before = old.endpoints.iter().find(|o| o.pod == row.pod && o.address == row.address);
        if before.map(|b| b.healthy) != Some(row.healthy) && (before.is_some() || !row.healthy) {
            let who = if row.pod.is_empty() { &row.address } else { &row.pod };
            let (reason, note) = if row.healthy {
                ("ReplicaHealthy", format!("replica {who} is healthy"))
            } else {
                ("ReplicaUnhealthy", format!("replica {who} is unhealthy: {}", row.reason))
            };
            let pod = (!row.pod.is_empty()).then(|| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(row.pod.clone()),
                namespace: agent.namespace(),
                ..Default::default()
            });
            ctx.events.publish_related(agent.object_ref(&()), pod, !row.healthy, reason, "HealthCheck", note);
        }
    }
    if old != &status {
        let ns = agent.namespace().unwrap_or_default();
        let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
        // Other writers' conditions are theirs: send only ours.
        let sent = AgentStatus { conditions: own_conditions(&status.conditions), ..status.clone() };
        let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "status": sent});
        api.patch_status(&agent.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.metrics.status_writes.with_label_values(&["Agent"]).inc();
    }
    Ok(Action::requeue(ctx.resync))
}

fn error_policy(_agent: Arc<Agent>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&["agent", err.metric_label()]).inc();
    error_requeue()
}

/// A stream that yields every `period`.
fn ticks(period: Duration) -> impl Stream<Item = ()> + Send + 'static {
    let period = period.max(Duration::from_millis(100));
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(period).await;
        Some(((), ()))
    })
}

/// The Agents of `scope` whose replica's circuit opened or closed.
fn circuit_changes(
    registry: &Registry,
    scope: Option<String>,
) -> impl Stream<Item = ObjectRef<Agent>> + Send + 'static {
    let rx = registry.circuit_changes();
    futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(key) => return Some((ObjectRef::new(&key.agent.name).within(&key.agent.namespace), rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter(move |r| std::future::ready(scope.is_none() || r.namespace == scope))
}

/// Settings of the Agent controller.
pub struct AgentSettings {
    /// Interval of the health re-check of each Agent.
    pub resync: Duration,
    /// Interval of the live-load refresh in status.
    pub load_interval: Duration,
    /// The operator's own HTTP port (agent and MCP URLs may not reach it through loopback).
    pub own_port: Option<u16>,
    /// Every replica feeds its registry; only the one that leads (shard 0's holder) applies
    /// Deployments, writes status and publishes health events.
    pub ownership: Arc<crate::shards::Ownership>,
}

/// The Agent controller for one scope; it keeps `registry` up to date with the scope's agents.
pub async fn controller(
    client: Client,
    scope: Option<String>,
    metrics: Metrics,
    events: EventSink,
    registry: Arc<Registry>,
    settings: AgentSettings,
    shutdown: CancellationToken,
) {
    // Agents: deleted ones leave the registry at once.
    let (agent_store, agent_writer) = reflector::store();
    let (forget, llm_metrics) = (registry.clone(), metrics.llm.clone());
    let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listed_now = listed.clone();
    let agent_stream = watcher(api_for::<Agent>(&client, &scope), watcher::Config::default().served_from_watch_cache())
        .backoff(WatchBackoff::default())
        .reflect(agent_writer)
        .inspect_ok(move |event| match event {
            watcher::Event::Delete(a) => {
                forget.remove(&a.namespace().unwrap_or_default(), &a.name_any());
                llm_metrics.forget_replicas(&a.namespace().unwrap_or_default(), &a.name_any(), &[]);
            }
            watcher::Event::InitDone => listed_now.store(true, std::sync::atomic::Ordering::Relaxed),
            _ => {}
        })
        .touched_objects();
    // Pods, as little of them as health needs (labels, deletion, status).
    let (pod_store, pod_writer) = reflector::store();
    // Paged: a cluster's pods are many and large; one unpaged list of them would set the
    // process's peak memory (slimmed objects are small once stored).
    let pod_stream = watcher(api_for::<Pod>(&client, &scope), watcher::Config::default().page_size(500))
        .backoff(WatchBackoff::default())
        .modify(|pod| {
            pod.managed_fields_mut().clear();
            pod.annotations_mut().clear();
            pod.spec = None;
        })
        .reflect(pod_writer)
        .touched_objects();
    let (dep_store, dep_writer) = reflector::store();
    let dep_stream = watcher(
        api_for::<Deployment>(&client, &scope),
        watcher::Config::default().labels(&format!("{}={}", naming::LABEL_MANAGED_BY, naming::MANAGED_BY)),
    )
    .backoff(WatchBackoff::default())
    .reflect(dep_writer)
    .touched_objects();

    let ctx = Arc::new(Ctx {
        client,
        metrics,
        events,
        resync: settings.resync,
        own_port: settings.own_port,
        ownership: settings.ownership,
        registry: registry.clone(),
        pods: pod_store,
        deployments: dep_store,
        agents: agent_store.clone(),
        applied: Mutex::default(),
    });

    // A pod change re-checks the Agents whose replicas it may be.
    let agents = agent_store.clone();
    let mapper = move |pod: Pod| {
        agents.state().into_iter().filter(|a| selects(a, &pod)).map(|a| ObjectRef::from_obj(&*a)).collect::<Vec<_>>()
    };
    // Agents deleted while the watch was down never send a Delete: prune on the load interval.
    let prune = {
        let (store, registry, scope) = (agent_store.clone(), registry.clone(), scope.clone());
        ticks(settings.load_interval).map(move |()| {
            if listed.load(std::sync::atomic::Ordering::Relaxed) {
                let known: std::collections::HashSet<(String, String)> =
                    store.state().iter().map(|a| (a.namespace().unwrap_or_default(), a.name_any())).collect();
                registry.retain(|k| {
                    scope.as_ref().is_some_and(|s| *s != k.namespace)
                        || known.contains(&(k.namespace.clone(), k.name.clone()))
                });
            }
        })
    };
    let stream = Controller::for_stream(agent_stream, agent_store)
        .trigger_backoff(WatchBackoff::default())
        .owns_stream(dep_stream)
        .watches_stream(pod_stream, mapper)
        .reconcile_all_on(prune)
        .reconcile_on(circuit_changes(&registry, scope))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx);
    drain("agent", stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::balancer::Circuit;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn pod(phase: &str, ready: bool) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some("127.0.0.2".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn agent_urls_may_not_reach_the_operators_own_port() {
        let agent = |spec: serde_json::Value| -> Agent {
            serde_json::from_value(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent",
                "metadata": {"name": "a", "namespace": "n"}, "spec": spec}))
            .expect("agent")
        };
        let ok = agent(json!({"model": "m", "endpoint": {"baseUrl": "http://127.0.0.1:8000/v1"},
            "tools": [{"name": "t", "url": "http://10.0.0.1:8080/mcp"}]}));
        assert_eq!(check_own_port(&ok, 8080), Ok(()));
        let err =
            check_own_port(&agent(json!({"model": "m", "endpoint": {"baseUrl": "http://localhost:8080/v1"}})), 8080)
                .expect_err("loopback own port");
        assert!(err.starts_with("spec.endpoint.baseUrl: \"http://localhost:8080/v1\" reaches port 8080"), "{err}");
        let err = check_own_port(
            &agent(json!({"model": "m", "endpoint": {"baseUrl": "http://x/v1"},
                "tools": [{"name": "t", "url": "http://[::1]:8080/mcp"}]})),
            8080,
        )
        .expect_err("MCP on the own port");
        assert!(err.starts_with("spec.tools[0].url"), "{err}");
    }

    #[test]
    fn health_from_pod_status() {
        assert_eq!(replica_health(&pod("Running", true)), (true, String::new()));
        assert_eq!(replica_health(&pod("Running", false)).1, "NotReady");
        assert_eq!(replica_health(&pod("Pending", false)).1, "Pending");
        let mut p = pod("Running", true);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
        assert_eq!(replica_health(&p).1, "Terminating");
        let mut p = pod("Running", false);
        if let Some(s) = p.status.as_mut() {
            s.container_statuses = Some(vec![ContainerStatus {
                restart_count: 5,
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting { reason: Some("CrashLoopBackOff".into()), message: None }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        assert_eq!(replica_health(&p), (false, "CrashLoopBackOff (restarts: 5)".into()));
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels = BTreeMap::from([("app".to_string(), "vllm".to_string()), ("tier".to_string(), "gpu".to_string())]);
        let sel = |labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            match_expressions: Some(exprs),
        };
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        assert_eq!(selector_matches(&sel(&[("app", "vllm")], vec![]), &labels), Ok(true));
        assert_eq!(selector_matches(&sel(&[("app", "other")], vec![]), &labels), Ok(false));
        assert_eq!(selector_matches(&sel(&[], vec![req("tier", "In", &["gpu", "cpu"])]), &labels), Ok(true));
        assert_eq!(selector_matches(&sel(&[], vec![req("tier", "NotIn", &["gpu"])]), &labels), Ok(false));
        assert_eq!(selector_matches(&sel(&[], vec![req("zone", "DoesNotExist", &[])]), &labels), Ok(true));
        assert_eq!(selector_matches(&sel(&[("app", "vllm")], vec![req("zone", "Exists", &[])]), &labels), Ok(false));
        assert!(selector_matches(&sel(&[], vec![req("a", "Near", &[])]), &labels).is_err());
        assert!(selector_matches(&LabelSelector::default(), &labels).is_err());
    }

    #[test]
    fn rows_merge_pod_health_circuits_and_load() {
        let replicas = vec![
            Replica::pod("a", "10.0.0.1", 8000, "/v1", Scheme::Http, true, ""),
            Replica::pod("b", "10.0.0.2", 8000, "/v1", Scheme::Http, true, ""),
            Replica::pod("c", "10.0.0.3", 8000, "/v1", Scheme::Http, false, "NotReady"),
        ];
        let load = vec![
            ReplicaLoad {
                name: "a".into(),
                in_flight: 2,
                completed: 10,
                failed: 1,
                ewma_latency: Some(Duration::from_millis(840)),
                ..Default::default()
            },
            ReplicaLoad {
                name: "b".into(),
                consecutive_failures: 3,
                circuit: Circuit::Open { until: tokio::time::Instant::now(), backoff: Duration::from_secs(5) },
                ..Default::default()
            },
        ];
        let rows = endpoint_rows(&replicas, &load);
        assert_eq!(
            (rows[0].healthy, rows[0].in_flight, rows[0].completed, rows[0].failed, rows[0].ewma_latency_ms),
            (true, 2, 10, 1, 840)
        );
        assert_eq!(rows[0].address, "10.0.0.1:8000");
        assert_eq!((rows[1].healthy, rows[1].reason.as_str()), (false, "CircuitOpen (3 consecutive failed calls)"));
        assert_eq!((rows[2].healthy, rows[2].reason.as_str()), (false, "NotReady"));
    }
}
