//! The web view's JSON endpoints. Every one authenticates the caller's bearer token and checks
//! the read or action with a SubjectAccessReview in the run's namespace, as `kubectl` would:
//! `list workflowruns` for the run list, `get workflowruns <name>` for a run, `get configmaps`
//! for outputs and transcripts kept in ConfigMaps, `get pods/log` for a pod's log, and
//! `patch workflowruns <name>` to decide an approval (recorded with the caller's name).

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use kube::api::{Api, LogParams, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Ui, graph};
use crate::api::{OutputRef, RunPhase, StepPhase, StepStatus, WorkflowRun};
use crate::auth::{Attributes, AuthError, Caller};
use crate::http::{access, caller};

/// Most runs listed at once (the newest).
pub const MAX_LISTED: usize = 2000;
/// Lines of a pod's log shown in a step's panel.
pub const LOG_LINES: i64 = 500;

/// Why a web view request is not served.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no WorkflowRun {name:?} in namespace {namespace:?}")]
    NoRun { namespace: String, name: String },
    #[error("run {run:?} has no step {key:?}")]
    NoStep { run: String, key: String },
    #[error("step {key:?} of run {run:?} is {phase}, not waiting for a decision")]
    NotWaiting { run: String, key: String, phase: &'static str },
    #[error("decision: {0}")]
    BadDecision(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let code = match &self {
            UiError::Auth(e) => return e.clone().into_response(),
            UiError::NoRun { .. } | UiError::NoStep { .. } => StatusCode::NOT_FOUND,
            UiError::NotWaiting { .. } => StatusCode::CONFLICT,
            UiError::BadDecision(_) => StatusCode::BAD_REQUEST,
            UiError::Kube(_) => StatusCode::BAD_GATEWAY,
        };
        (code, Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// The caller, allowed `attributes`.
pub(super) async fn authorized(ui: &Ui, headers: &HeaderMap, attributes: &Attributes) -> Result<Caller, UiError> {
    let who = caller(&ui.health, headers).await?;
    access(&ui.health)?.require(&who, attributes).await?;
    Ok(who)
}

/// `get workflowruns <name>` in `namespace`.
pub(super) fn get_run(namespace: &str, name: &str) -> Attributes {
    named(Attributes::volt("get", "workflowruns", namespace), name)
}

fn named(mut attributes: Attributes, object: &str) -> Attributes {
    if let Attributes::Resource { name, .. } = &mut attributes {
        *name = object.to_string();
    }
    attributes
}

fn core(verb: &str, resource: &str, subresource: &str, namespace: &str, name: &str) -> Attributes {
    Attributes::Resource {
        verb: verb.into(),
        group: String::new(),
        resource: resource.into(),
        subresource: subresource.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// A run as a row of the list (and the head of its page).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRow {
    pub namespace: String,
    pub name: String,
    pub workflow: String,
    pub phase: RunPhase,
    pub progress: String,
    pub message: String,
    pub created: Option<String>,
    pub started: Option<String>,
    pub finished: Option<String>,
    /// Seconds from start to finish (or to now while it runs).
    pub duration_seconds: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: f64,
    /// The run that started it (a `workflow` step's child run).
    pub parent: Option<String>,
}

/// The row of `run`, durations measured to `now`.
pub fn row(run: &WorkflowRun, now: Timestamp) -> RunRow {
    let status = run.status.clone().unwrap_or_default();
    let started = status.started_at.as_ref().map(|t| t.0);
    let finished = status.finished_at.as_ref().map(|t| t.0);
    let duration = started.map(|s| (finished.unwrap_or(now).as_millisecond() - s.as_millisecond()) as f64 / 1000.0);
    let usage = status.usage.unwrap_or_default();
    RunRow {
        namespace: run.namespace().unwrap_or_default(),
        name: run.name_any(),
        workflow: if status.workflow_name.is_empty() {
            run.spec.workflow_ref.as_ref().map(|w| w.name.clone()).unwrap_or_else(|| "(inline)".into())
        } else {
            status.workflow_name.clone()
        },
        phase: status.phase,
        progress: status.progress.clone(),
        message: status.message.chars().take(300).collect(),
        created: run.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        started: started.map(|t| t.to_string()),
        finished: finished.map(|t| t.to_string()),
        duration_seconds: duration.map(|d| d.max(0.0)),
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cost: usage.cost,
        parent: run.labels().get(crate::naming::LABEL_PARENT_RUN).cloned(),
    }
}

/// `GET /ui/api/whoami`: who the token is.
pub async fn whoami(State(ui): State<Ui>, headers: HeaderMap) -> Result<Json<Value>, UiError> {
    let who = caller(&ui.health, &headers).await?;
    Ok(Json(json!({"user": who.user, "groups": who.groups, "assets": *super::ASSETS_VERSION})))
}

#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    namespace: Option<String>,
    phase: Option<String>,
    workflow: Option<String>,
}

/// `GET /ui/api/runs?namespace=&phase=&workflow=`: the runs of the namespaces where the caller
/// may list WorkflowRuns (403 when a namespace asked for is not one), newest first.
pub async fn runs(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(q): Query<RunsQuery>,
) -> Result<Json<Value>, UiError> {
    let who = caller(&ui.health, &headers).await?;
    let access = access(&ui.health)?;
    let wanted = q.namespace.as_deref().filter(|n| !n.is_empty());
    if let Some(ns) = wanted {
        access.require(&who, &Attributes::volt("list", "workflowruns", ns)).await?;
    }
    let now = Timestamp::now();
    let mut allowed: HashMap<String, bool> = HashMap::new();
    let mut rows = Vec::new();
    for run in ui.runs.all() {
        let ns = run.namespace().unwrap_or_default();
        if wanted.is_some_and(|w| w != ns) {
            continue;
        }
        let may = match allowed.get(&ns) {
            Some(may) => *may,
            None => {
                let may = access.allowed(&who, &Attributes::volt("list", "workflowruns", &ns)).await?;
                *allowed.entry(ns.clone()).or_insert(may)
            }
        };
        if !may {
            continue;
        }
        let r = row(&run, now);
        if q.phase.as_deref().is_some_and(|p| !p.is_empty() && !p.eq_ignore_ascii_case(r.phase.as_str())) {
            continue;
        }
        if q.workflow.as_deref().is_some_and(|w| !r.workflow.contains(w)) {
            continue;
        }
        rows.push(r);
    }
    rows.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.name.cmp(&b.name)));
    let total = rows.len();
    rows.truncate(MAX_LISTED);
    let mut namespaces: Vec<String> = allowed.into_iter().filter(|(_, may)| *may).map(|(ns, _)| ns).collect();
    namespaces.sort();
    Ok(Json(json!({"runs": rows, "total": total, "namespaces": namespaces, "synced": ui.runs.synced()})))
}

/// A step's row as the run page lists it (outputs are fetched with the step).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRow {
    pub phase: StepPhase,
    pub attempts: u32,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub message: String,
    pub waiting: bool,
    pub decision_key: Option<String>,
}

fn step_row(r: &StepStatus) -> StepRow {
    StepRow {
        phase: r.phase,
        attempts: r.attempts,
        started: r.started_at.as_ref().map(|t| t.0.to_string()),
        finished: r.finished_at.as_ref().map(|t| t.0.to_string()),
        message: r.message.chars().take(200).collect(),
        waiting: r.phase == StepPhase::Waiting,
        decision_key: r.decision_key.clone(),
    }
}

/// Run `name` in `namespace`, after `get workflowruns <name>` is allowed.
async fn allowed_run(
    ui: &Ui,
    headers: &HeaderMap,
    namespace: &str,
    name: &str,
) -> Result<(Caller, std::sync::Arc<WorkflowRun>), UiError> {
    let who = authorized(ui, headers, &get_run(namespace, name)).await?;
    let run = ui
        .runs
        .get(namespace, name)
        .ok_or_else(|| UiError::NoRun { namespace: namespace.into(), name: name.into() })?;
    Ok((who, run))
}

/// The page of a run: its row, the picture's nodes and their states, and its steps' rows.
pub fn run_page(run: &WorkflowRun, now: Timestamp) -> Value {
    let status = run.status.clone().unwrap_or_default();
    let spec = status.workflow.clone().or_else(|| run.spec.workflow.clone()).unwrap_or_default();
    let nodes = graph::nodes(&spec);
    let states = graph::states(&nodes, &status);
    let steps: BTreeMap<&String, StepRow> = status.steps.iter().map(|(k, r)| (k, step_row(r))).collect();
    json!({"run": row(run, now), "nodes": nodes, "states": states, "steps": steps, "output": status.output})
}

/// `GET /ui/api/runs/{namespace}/{name}`.
pub async fn run(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Value>, UiError> {
    let (_, run) = allowed_run(&ui, &headers, &namespace, &name).await?;
    Ok(Json(run_page(&run, Timestamp::now())))
}

/// The text under `r` (a ConfigMap key), if the caller may read ConfigMaps there.
async fn config_map_text(ui: &Ui, who: &Caller, namespace: &str, r: &OutputRef) -> Result<String, String> {
    let attributes = core("get", "configmaps", "", namespace, &r.config_map);
    match access(&ui.health).map_err(|e| e.to_string())?.allowed(who, &attributes).await {
        Ok(true) => {}
        Ok(false) => return Err(format!("{:?} may not {attributes}", who.user)),
        Err(e) => return Err(e.to_string()),
    }
    let cm = Api::<ConfigMap>::namespaced(ui.client.clone(), namespace)
        .get(&r.config_map)
        .await
        .map_err(|e| e.to_string())?;
    cm.data.and_then(|mut d| d.remove(&r.key)).ok_or_else(|| format!("ConfigMap {} has no key {}", r.config_map, r.key))
}

/// `GET /ui/api/runs/{namespace}/{name}/steps/{key}`: a step's row in full, its output (from
/// the status or its ConfigMap), its agent transcript and its pod's log. What cannot be read
/// is named under `errors` (say, a caller who may read the run but not its pods' logs).
pub async fn step(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((namespace, name, key)): Path<(String, String, String)>,
) -> Result<Json<Value>, UiError> {
    let (who, run) = allowed_run(&ui, &headers, &namespace, &name).await?;
    let status = run.status.clone().unwrap_or_default();
    let row = status.steps.get(&key).ok_or_else(|| UiError::NoStep { run: name.clone(), key: key.clone() })?;
    let mut errors = BTreeMap::new();
    let output = match (&row.output, &row.output_ref) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(r)) => config_map_text(&ui, &who, &namespace, r).await.map_err(|e| errors.insert("output", e)).ok(),
        _ => None,
    };
    let transcript = match &row.transcript_ref {
        Some(r) => match config_map_text(&ui, &who, &namespace, r).await {
            Ok(text) => Some(match serde_json::from_str::<Value>(&text) {
                Ok(t) => crate::plugin::logs::transcript_text(&t),
                Err(_) => text,
            }),
            Err(e) => {
                errors.insert("transcript", e);
                None
            }
        },
        None => None,
    };
    let log = match &row.pod {
        Some(pod) => match access(&ui.health)?.allowed(&who, &core("get", "pods", "log", &namespace, pod)).await? {
            true => {
                let params = LogParams { tail_lines: Some(LOG_LINES), ..Default::default() };
                match Api::<Pod>::namespaced(ui.client.clone(), &namespace).logs(pod, &params).await {
                    Ok(text) => Some(text),
                    Err(e) => {
                        errors.insert("log", format!("pod {pod}: {e}"));
                        None
                    }
                }
            }
            false => {
                errors.insert("log", format!("{:?} may not get pods/log {pod:?} in namespace {namespace:?}", who.user));
                None
            }
        },
        None => None,
    };
    let spec = status.workflow.clone().or_else(|| run.spec.workflow.clone()).unwrap_or_default();
    let step_id =
        crate::naming::step_id_of(crate::naming::parse_loop_key(&key).map_or(key.as_str(), |(_, _, inner)| inner));
    let kind =
        spec.steps.iter().chain(&spec.finally).find(|s| s.id == step_id).and_then(|s| s.kind()).map(|k| k.as_str());
    Ok(Json(json!({
        "key": key, "kind": kind, "row": row, "output": output, "transcript": transcript, "log": log,
        "decision": run.spec.decisions.get(row.decision_key.as_deref().unwrap_or(&key)), "errors": errors,
    })))
}

#[derive(Debug, Deserialize)]
pub struct DecisionBody {
    /// The waiting step's status key.
    pub step: String,
    /// `Approve` or `Reject`.
    pub decision: String,
    #[serde(default)]
    pub comment: Option<String>,
}

/// `POST /ui/api/runs/{namespace}/{name}/decisions` `{step, decision, comment}`: records the
/// caller's decision in the run's `spec.decisions` (as `kubectl volt approve|reject` does),
/// with `by` the caller's user name, if the caller may patch the run.
pub async fn decide(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    Json(body): Json<DecisionBody>,
) -> Result<Json<Value>, UiError> {
    let attributes = named(Attributes::volt("patch", "workflowruns", &namespace), &name);
    let who = authorized(&ui, &headers, &attributes).await?;
    let decision = match body.decision.as_str() {
        "Approve" => "Approve",
        "Reject" => "Reject",
        other => return Err(UiError::BadDecision(format!("{other:?} is neither Approve nor Reject"))),
    };
    let run = ui
        .runs
        .get(&namespace, &name)
        .ok_or_else(|| UiError::NoRun { namespace: namespace.clone(), name: name.clone() })?;
    let status = run.status.clone().unwrap_or_default();
    let row =
        status.steps.get(&body.step).ok_or_else(|| UiError::NoStep { run: name.clone(), key: body.step.clone() })?;
    if row.phase != StepPhase::Waiting {
        return Err(UiError::NotWaiting { run: name, key: body.step, phase: row.phase.as_str() });
    }
    let key = row.decision_key.clone().unwrap_or_else(|| body.step.clone());
    let comment = body.comment.filter(|c| !c.trim().is_empty());
    let patch =
        json!({"spec": {"decisions": {key.clone(): {"decision": decision, "comment": comment, "by": who.user}}}});
    Api::<WorkflowRun>::namespaced(ui.client.clone(), &namespace)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(user = %who.user, namespace = %namespace, run = %name, step = %key, decision, "web view: decision recorded");
    Ok(Json(json!({"step": key, "decision": decision, "by": who.user})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_show_workflow_usage_and_duration() {
        let run: WorkflowRun = serde_json::from_value(json!({
            "apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "n", "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {"volt.dev/parent-run": "up"}},
            "spec": {"workflowRef": {"name": "wf"}},
            "status": {"phase": "Running", "progress": "1/3", "startedAt": "2026-01-01T00:00:10Z",
                       "usage": {"inputTokens": 10, "outputTokens": 5, "cost": 0.25}}
        }))
        .expect("run");
        let now: Timestamp = "2026-01-01T00:01:10Z".parse().expect("time");
        let r = row(&run, now);
        assert_eq!((r.workflow.as_str(), r.phase, r.progress.as_str()), ("wf", RunPhase::Running, "1/3"));
        assert_eq!(r.duration_seconds, Some(60.0));
        assert_eq!((r.input_tokens, r.output_tokens, r.cost), (10, 5, 0.25));
        assert_eq!(r.parent.as_deref(), Some("up"));
    }
}
