//! `resource` steps: custom executors the Kubernetes way. An attempt creates the step's object
//! (its rendered manifest, in the run's namespace, named deterministically, owned by the run),
//! watches it by name, and ends when `failureWhen` or `successWhen` holds over the live object.
//! Cancel and timeout delete it. The operator may create only the kinds its RBAC allows (the
//! chart's `rbac.extraRules`); a refusal is a step error naming the permission.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Scope};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::api::{ResourceStep, StepKind, WorkflowRunStatus, WorkflowSpec};
use crate::engine::template;
use crate::engine::{Dag, Event, RunInfo, TaskInfo, TaskStart, Work};
use crate::naming;
use crate::pass::Started;

use super::lock;

/// Wakes the run a watched object belongs to (namespace, run name).
pub type Wake = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What the watch of an object has seen.
#[derive(Debug, Clone)]
enum Seen {
    Nothing,
    Object(Arc<Json>),
    Gone,
    Refused(String),
}

struct Watch {
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The objects of resource steps, and one watch per running one.
pub struct Resources {
    client: Client,
    wake: Wake,
    /// Discovered kinds by (apiVersion, kind).
    kinds: Mutex<HashMap<(String, String), (ApiResource, Scope)>>,
    /// Watches by the object's reference (`Kind.version.group/name`) and namespace.
    watches: Mutex<HashMap<(String, String), Watch>>,
}

/// The `kubectl get` form of an object: `Kind.version.group/name` (`Kind.version/name` for the
/// core group).
fn reference(ar: &ApiResource, name: &str) -> String {
    if ar.group.is_empty() {
        format!("{}.{}/{name}", ar.kind, ar.version)
    } else {
        format!("{}.{}.{}/{name}", ar.kind, ar.version, ar.group)
    }
}

/// The (apiVersion, kind, name) of a reference.
fn parse_reference(r: &str) -> Option<(String, String, String)> {
    let (ty, name) = r.split_once('/')?;
    let mut parts = ty.splitn(3, '.');
    let (kind, version) = (parts.next()?, parts.next()?);
    let api_version = match parts.next() {
        Some(group) => format!("{group}/{version}"),
        None => version.to_string(),
    };
    Some((api_version, kind.to_string(), name.to_string()))
}

/// Why a manifest cannot be created, in the step's terms.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("resource.manifest: {0}")]
    Manifest(String),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl Resources {
    pub fn new(client: Client, wake: Wake) -> Self {
        Self { client, wake, kinds: Default::default(), watches: Default::default() }
    }

    /// The API resource of a kind, discovered once.
    async fn kind(&self, api_version: &str, kind: &str) -> Result<(ApiResource, Scope), Refusal> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(found) = lock(&self.kinds).get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (ar, caps) = match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok(found) => found,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return Err(Refusal::Manifest(format!("{kind} ({api_version}) is not served by this cluster")));
            }
            Err(kube::Error::Discovery(e)) => {
                return Err(Refusal::Manifest(format!("{kind} ({api_version}) is not served by this cluster: {e}")));
            }
            Err(e) => return Err(e.into()),
        };
        lock(&self.kinds).insert(key, (ar.clone(), caps.scope.clone()));
        Ok((ar, caps.scope))
    }

    fn api(&self, ar: &ApiResource, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, ar)
    }

    /// Watches an object by name (once), waking its run on every change.
    fn watch(&self, run: &RunInfo, ar: &ApiResource, name: &str) -> Arc<Mutex<Seen>> {
        let key = (run.namespace.clone(), reference(ar, name));
        let mut watches = lock(&self.watches);
        if let Some(w) = watches.get(&key) {
            return w.seen.clone();
        }
        let seen = Arc::new(Mutex::new(Seen::Nothing));
        let api = self.api(ar, &run.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (wake, ns, run_name, state) = (self.wake.clone(), run.namespace.clone(), run.name.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher(api, config));
            while let Some(event) = events.next().await {
                let next = match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        Seen::Object(Arc::new(serde_json::to_value(&o).unwrap_or_default()))
                    }
                    Ok(watcher::Event::Delete(_)) => Seen::Gone,
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
                    Err(
                        watcher::Error::InitialListFailed(kube::Error::Api(e))
                        | watcher::Error::WatchFailed(kube::Error::Api(e)),
                    ) if e.code == 403 => Seen::Refused(format!(
                        "the operator may not watch this kind (grant get, list and watch with the chart's rbac.extraRules): {}",
                        e.message
                    )),
                    Err(e) => {
                        debug!(error = %e, "watch of a resource step's object failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let stop = matches!(next, Seen::Refused(_));
                *lock(&state) = next;
                wake(&ns, &run_name);
                if stop {
                    break;
                }
            }
        });
        watches.insert(key, Watch { seen: seen.clone(), task });
        seen
    }

    fn unwatch(&self, ns: &str, reference: &str) {
        lock(&self.watches).remove(&(ns.to_string(), reference.to_string()));
    }

    /// Creates the object of an attempt (or finds it created).
    pub async fn start(&self, run: &RunInfo, task: &TaskStart) -> Result<Started, kube::Error> {
        match self.create(run, task).await {
            Ok(object) => Ok(Started::RunningAs { object }),
            Err(Refusal::Kube(e)) => Err(e),
            Err(refusal) => Ok(Started::refused(task, refusal.to_string())),
        }
    }

    async fn create(&self, run: &RunInfo, task: &TaskStart) -> Result<String, Refusal> {
        let Work::Resource { manifest, .. } = &task.work else {
            return Err(Refusal::Manifest("not a resource step".into()));
        };
        let text = |field: &str| manifest.get(field).and_then(Json::as_str).unwrap_or_default().to_string();
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        let (ar, scope) = self.kind(&api_version, &kind).await?;
        if scope != Scope::Namespaced {
            return Err(Refusal::Manifest(format!(
                "{kind} is cluster-scoped; resource steps create namespaced objects"
            )));
        }
        let prefix = manifest.pointer("/metadata/name").and_then(Json::as_str).filter(|s| !s.is_empty());
        let name = naming::resource_name(prefix.unwrap_or(&run.name), &task.key, task.attempt);
        let mut object = manifest.clone();
        let meta = object
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| serde_json::json!({})))
            .and_then(Json::as_object_mut)
            .ok_or_else(|| Refusal::Manifest("metadata must be an object".into()))?;
        meta.insert("name".into(), name.clone().into());
        meta.insert("namespace".into(), run.namespace.clone().into());
        meta.remove("generateName");
        let labels = meta.entry("labels").or_insert_with(|| serde_json::json!({}));
        if let Some(labels) = labels.as_object_mut() {
            for (k, v) in naming::step_labels(&run.name, &task.step_id, task.attempt) {
                labels.insert(k, v.into());
            }
        }
        let annotations = meta.entry("annotations").or_insert_with(|| serde_json::json!({}));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(naming::ANNOTATION_STEP_KEY.into(), task.key.clone().into());
        }
        let owner = super::pods::run_owner(run);
        meta.insert("ownerReferences".into(), serde_json::json!([owner]));
        let object: DynamicObject =
            serde_json::from_value(object).map_err(|e| Refusal::Manifest(format!("not a Kubernetes object: {e}")))?;
        let what = reference(&ar, &name);
        match self.api(&ar, &run.namespace).create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(kube::Error::Api(e)) if e.code == 403 => {
                let resource =
                    if ar.group.is_empty() { ar.plural.clone() } else { format!("{}.{}", ar.plural, ar.group) };
                return Err(Refusal::Manifest(format!(
                    "the operator may not create {resource} in namespace {:?}: grant it with the chart's \
                     rbac.extraRules (apiGroups: [{:?}], resources: [{}], verbs: [get, list, watch, create, delete]): {}",
                    run.namespace, ar.group, ar.plural, e.message
                )));
            }
            Err(kube::Error::Api(e)) if matches!(e.code, 400 | 422) => {
                return Err(Refusal::Manifest(format!("cannot create {what}: {}", e.message)));
            }
            Err(e) => return Err(e.into()),
        }
        self.watch(run, &ar, &name);
        Ok(what)
    }

    /// Ends of the objects of running resource steps.
    pub async fn observe(
        &self,
        run: &RunInfo,
        spec: &WorkflowSpec,
        dag: &Dag,
        status: &WorkflowRunStatus,
    ) -> Result<Vec<Event>, kube::Error> {
        let mut events = Vec::new();
        for (key, row) in super::pods::running(spec, dag, status, StepKind::Resource) {
            let Some(step) = dag.step_of_key(spec, key) else { continue };
            let (Some(res), Some(reference)) = (&step.resource, &row.object) else { continue };
            let Some((api_version, kind, name)) = parse_reference(reference) else { continue };
            let ar = match self.kind(&api_version, &kind).await {
                Ok((ar, _)) => ar,
                Err(Refusal::Kube(e)) => return Err(e),
                Err(Refusal::Manifest(m)) => {
                    events.push(failed(key, row.attempts, m, false));
                    continue;
                }
            };
            // After a restart the watch starts again here.
            let seen = lock(&self.watch(run, &ar, &name)).clone();
            let end = match seen {
                Seen::Nothing => None,
                Seen::Gone => Some(failed(key, row.attempts, format!("{reference} was deleted"), true)),
                Seen::Refused(m) => Some(failed(key, row.attempts, m, false)),
                Seen::Object(o) => judge(key, row.attempts, res, reference, &o),
            };
            if let Some(end) = end {
                self.unwatch(&run.namespace, reference);
                events.push(end);
            }
        }
        Ok(events)
    }

    /// Deletes the object of an attempt (cancel, timeout), with what it made (background).
    pub async fn delete(&self, run: &RunInfo, reference: &str) -> Result<(), kube::Error> {
        self.unwatch(&run.namespace, reference);
        let Some((api_version, kind, name)) = parse_reference(reference) else { return Ok(()) };
        let ar = match self.kind(&api_version, &kind).await {
            Ok((ar, _)) => ar,
            Err(Refusal::Kube(e)) => return Err(e),
            Err(Refusal::Manifest(_)) => return Ok(()),
        };
        debug!(run = %run.name, object = %reference, "deleting the object of an aborted resource step");
        match self.api(&ar, &run.namespace).delete(&name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn failed(key: &str, attempt: u32, message: String, retryable: bool) -> Event {
    Event::Failed { key: key.to_string(), attempt, message, retryable, info: TaskInfo::default() }
}

/// The end of a resource step, if its object says so: `failureWhen` first, then `successWhen`.
/// A condition that cannot be evaluated yet (a field not set so far) does not hold.
fn judge(key: &str, attempt: u32, res: &ResourceStep, reference: &str, object: &Json) -> Option<Event> {
    let holds = |c: &str| template::eval_condition_on(c, "object", object).unwrap_or(false);
    if res.failure_when.as_deref().is_some_and(holds) {
        let why = object.pointer("/status/conditions").map(|c| format!(" (conditions: {c})")).unwrap_or_default();
        return Some(failed(key, attempt, format!("{reference}: failureWhen holds{why}"), true));
    }
    if !holds(&res.success_when) {
        return None;
    }
    let output = match &res.output {
        Some(t) => match template::render_on(t, "object", object) {
            Ok(text) => text,
            Err(e) => return Some(failed(key, attempt, format!("resource.output: {e}"), false)),
        },
        None => object.get("status").map(|s| s.to_string()).unwrap_or_default(),
    };
    Some(Event::Succeeded { key: key.to_string(), attempt, output, info: TaskInfo::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(success: &str, failure: Option<&str>, output: Option<&str>) -> ResourceStep {
        ResourceStep {
            manifest: serde_json::json!({"apiVersion": "batch/v1", "kind": "Job"}),
            success_when: success.into(),
            failure_when: failure.map(str::to_string),
            output: output.map(str::to_string),
        }
    }

    #[test]
    fn references_round_trip() {
        let job = ApiResource::from_gvk(&GroupVersionKind::gvk("batch", "v1", "Job"));
        assert_eq!(reference(&job, "train-1"), "Job.v1.batch/train-1");
        assert_eq!(parse_reference("Job.v1.batch/train-1"), Some(("batch/v1".into(), "Job".into(), "train-1".into())));
        let cm = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "ConfigMap"));
        assert_eq!(parse_reference(&reference(&cm, "x")), Some(("v1".into(), "ConfigMap".into(), "x".into())));
        assert_eq!(
            parse_reference("WorkflowRun.v1alpha1.volt.dev/r"),
            Some(("volt.dev/v1alpha1".into(), "WorkflowRun".into(), "r".into()))
        );
    }

    #[test]
    fn conditions_over_the_live_object() {
        let s = step("object.status.succeeded >= 1", Some("object.status.failed >= 1"), None);
        let running = serde_json::json!({"status": {"active": 1}});
        assert_eq!(judge("k", 1, &s, "Job.v1.batch/j", &running), None, "fields not set yet do not hold");
        let done = serde_json::json!({"status": {"succeeded": 1}});
        match judge("k", 1, &s, "Job.v1.batch/j", &done) {
            Some(Event::Succeeded { output, .. }) => assert_eq!(output, r#"{"succeeded":1}"#),
            other => panic!("{other:?}"),
        }
        let failed = serde_json::json!({"status": {"failed": 2, "conditions": [{"type": "Failed"}]}});
        match judge("k", 1, &s, "Job.v1.batch/j", &failed) {
            Some(Event::Failed { message, retryable, .. }) => {
                assert!(message.contains("failureWhen holds") && message.contains("Failed"), "{message}");
                assert!(retryable);
            }
            other => panic!("{other:?}"),
        }
        let s = step("object.status.succeeded >= 1", None, Some("{{ object.status.succeeded }} done"));
        match judge("k", 1, &s, "Job.v1.batch/j", &done) {
            Some(Event::Succeeded { output, .. }) => assert_eq!(output, "1 done"),
            other => panic!("{other:?}"),
        }
    }
}
