//! The Agent controller: owns deployment-mode Deployments, derives each replica's health from
//! its pod's status, and reports replicas, endpoints and Ready/Degraded conditions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::{
    Agent, AgentStatus, Cond, DEGRADED, EndpointStatus, FIELD_MANAGER, KState, ReplicaCounts, set_condition,
    set_kstatus,
};
use crate::metrics::Metrics;
use crate::naming;

use super::events::EventSink;
use super::{Error, api_for, drain, error_requeue};

struct Ctx {
    client: Client,
    metrics: Metrics,
    events: EventSink,
    resync: Duration,
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

fn selector_string(sel: &LabelSelector) -> Result<String, String> {
    let mut parts: Vec<String> = sel.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => return Err(format!("unknown selector operator {other:?}")),
        });
    }
    if parts.is_empty() {
        return Err("selector matches nothing: give matchLabels or matchExpressions".into());
    }
    Ok(parts.join(","))
}

/// Which endpoint form an Agent uses, or why its spec is invalid.
pub fn endpoint_kind(agent: &Agent) -> Result<&'static str, String> {
    let s = &agent.spec;
    match (s.endpoint.is_some(), s.replicas.is_some(), s.deployment.is_some()) {
        (true, false, false) => Ok("endpoint"),
        (false, true, false) => Ok("replicas"),
        (false, false, true) => Ok("deployment"),
        (false, false, false) => Err("spec: set exactly one of endpoint, replicas, deployment (none is set)".into()),
        _ => Err("spec: set exactly one of endpoint, replicas, deployment (several are set)".into()),
    }
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

async fn reconcile(agent: Arc<Agent>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("agent");
    let ns = agent.namespace().unwrap_or_default();
    let name = agent.name_any();
    let generation = agent.metadata.generation;
    let now = Timestamp::now();
    let old = agent.status.clone().unwrap_or_default();
    let mut status =
        AgentStatus { conditions: old.conditions.clone(), observed_generation: generation, ..Default::default() };

    let kind = endpoint_kind(&agent);
    match kind {
        Err(msg) => {
            set_kstatus(&mut status.conditions, KState::Stalled, "InvalidSpec", &msg, generation, now);
            set_condition(&mut status.conditions, Cond::new(DEGRADED, false, "InvalidSpec", ""), generation, now);
        }
        Ok(kind) => {
            status.endpoint_kind = kind.into();
            let (desired, rows) = match kind {
                "endpoint" => {
                    let url = agent.spec.endpoint.as_ref().map(|e| e.base_url.clone()).unwrap_or_default();
                    (1, vec![EndpointStatus { address: url, healthy: true, ..Default::default() }])
                }
                _ => {
                    let (selector, port, desired) = if kind == "deployment" {
                        let dep = build_deployment(&agent).ok_or_else(|| Error::Other("no deployment".into()))?;
                        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
                        let dep_name = naming::agent_deployment(&name);
                        let mut value = serde_json::to_value(&dep)?;
                        value["apiVersion"] = json!("apps/v1");
                        value["kind"] = json!("Deployment");
                        api.patch(&dep_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await?;
                        let d = agent.spec.deployment.as_ref().map(|d| (d.port, d.replicas)).unwrap_or((0, 0));
                        (format!("{}={}", naming::LABEL_AGENT, naming::label_value(&name)), d.0, Some(d.1))
                    } else {
                        let r = agent.spec.replicas.as_ref().ok_or_else(|| Error::Other("no replicas".into()))?;
                        match selector_string(&r.selector) {
                            Ok(sel) => (sel, r.port, None),
                            Err(msg) => {
                                let msg = format!("spec.replicas.selector: {msg}");
                                set_kstatus(
                                    &mut status.conditions,
                                    KState::Stalled,
                                    "InvalidSpec",
                                    &msg,
                                    generation,
                                    now,
                                );
                                return write_status(&agent, &ctx, &old, status).await;
                            }
                        }
                    };
                    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                    let list = pods.list(&ListParams::default().labels(&selector)).await?;
                    let mut rows: Vec<EndpointStatus> = list
                        .items
                        .iter()
                        .map(|p| {
                            let (healthy, reason) = replica_health(p);
                            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
                            EndpointStatus {
                                pod: p.name_any(),
                                address: if ip.is_empty() { String::new() } else { format!("{ip}:{port}") },
                                healthy,
                                reason,
                                ..Default::default()
                            }
                        })
                        .collect();
                    rows.sort_by(|a, b| a.pod.cmp(&b.pod));
                    (desired.unwrap_or(rows.len() as i32), rows)
                }
            };
            let healthy = rows.iter().filter(|r| r.healthy).count() as i32;
            let ready = healthy;
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
                let msg =
                    if desired == 0 { "no replicas".to_string() } else { format!("0 of {desired} replicas healthy") };
                set_kstatus(&mut status.conditions, KState::Reconciling, "NoHealthyReplicas", &msg, generation, now);
            }
            let unhealthy: Vec<String> = status
                .endpoints
                .iter()
                .filter(|r| !r.healthy)
                .map(|r| format!("{} ({})", if r.pod.is_empty() { &r.address } else { &r.pod }, r.reason))
                .collect();
            let degraded = !unhealthy.is_empty() || healthy < desired;
            let msg = if unhealthy.is_empty() { String::new() } else { format!("unhealthy: {}", unhealthy.join(", ")) };
            set_condition(
                &mut status.conditions,
                Cond::new(DEGRADED, degraded, if degraded { "ReplicasUnhealthy" } else { "AllHealthy" }, msg),
                generation,
                now,
            );
        }
    }
    write_status(&agent, &ctx, &old, status).await
}

async fn write_status(agent: &Agent, ctx: &Ctx, old: &AgentStatus, status: AgentStatus) -> Result<Action, Error> {
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
            ctx.events.publish(agent.object_ref(&()), !row.healthy, reason, "HealthCheck", note);
        }
    }
    if old != &status {
        let ns = agent.namespace().unwrap_or_default();
        let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "status": status});
        api.patch_status(&agent.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.metrics.status_writes.with_label_values(&["Agent"]).inc();
    }
    Ok(Action::requeue(ctx.resync))
}

fn error_policy(_agent: Arc<Agent>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&["agent", err.metric_label()]).inc();
    error_requeue()
}

/// The Agent controller for one scope.
pub async fn controller(
    client: Client,
    scope: Option<String>,
    metrics: Metrics,
    events: EventSink,
    resync: Duration,
    shutdown: CancellationToken,
) {
    let api: Api<Agent> = api_for(&client, &scope);
    let pods: Api<Pod> = api_for(&client, &scope);
    let deployments: Api<Deployment> = api_for(&client, &scope);
    let ctx = Arc::new(Ctx { client, metrics, events, resync });
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let agents = controller.store();
    // A pod change re-checks every Agent in its namespace whose replicas might include it.
    let mapper = move |pod: Pod| {
        let ns = pod.namespace();
        agents.state().into_iter().filter(|a| a.namespace() == ns).map(|a| ObjectRef::from_obj(&*a)).collect::<Vec<_>>()
    };
    let stream = controller
        .owns(
            deployments,
            watcher::Config::default().labels(&format!("{}={}", naming::LABEL_MANAGED_BY, naming::MANAGED_BY)),
        )
        .watches(pods, watcher::Config::default(), mapper)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx);
    drain("agent", stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus};

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
    fn health_from_pod_status() {
        assert_eq!(replica_health(&pod("Running", true)), (true, String::new()));
        assert_eq!(replica_health(&pod("Running", false)).1, "NotReady");
        assert_eq!(replica_health(&pod("Pending", false)).1, "Pending");
        let mut p = pod("Running", true);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
        assert_eq!(replica_health(&p).1, "Terminating");
        let mut p = pod("Running", false);
        p.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            restart_count: 5,
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting { reason: Some("CrashLoopBackOff".into()), message: None }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        assert_eq!(replica_health(&p), (false, "CrashLoopBackOff (restarts: 5)".into()));
    }
}
