//! Step outputs over the inline bound live in ConfigMaps owned by the run (`outputRef`); the
//! engine reads them like inline ones. Read back before a pass ([`Outputs::hydrate`]), moved
//! out after it ([`Outputs::externalize`]), and remembered so each is read or written once.
//!
//! Rows of settled loop iterations (older than the one before the current: templates read only
//! `loop.previous`) keep at most [`SETTLED_INLINE_LIMIT`] bytes inline and are not read back,
//! so a loop of 100 iterations does not grow the run object past what the API server takes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::{FIELD_MANAGER, OutputRef, WorkflowRun, WorkflowRunStatus};
use crate::naming;

use super::lock;

/// Inline bound of the outputs of settled loop iterations.
pub const SETTLED_INLINE_LIMIT: usize = 256;

/// Whether `key` is a row of a settled loop iteration: one no template can read any more
/// (older than the previous iteration of a running loop, or before the last of a finished one).
fn settled_iteration(status: &WorkflowRunStatus, key: &str) -> bool {
    let Some((loop_id, iteration, _)) = naming::parse_loop_key(key) else { return false };
    let Some(row) = status.steps.get(loop_id) else { return false };
    let current = row.iterations.unwrap_or(0);
    iteration + 1 < current || (row.phase.is_finished() && iteration < current)
}

/// Large outputs by (run uid, step key).
pub struct Outputs {
    client: Client,
    /// Outputs larger than this many bytes go to a ConfigMap.
    inline_limit: usize,
    known: Mutex<HashMap<(String, String), String>>,
}

impl Outputs {
    pub fn new(client: Client, inline_limit: usize) -> Self {
        Self { client, inline_limit, known: Default::default() }
    }

    /// Puts the outputs stored in ConfigMaps back into the status rows.
    pub async fn hydrate(&self, ns: &str, uid: &str, status: &mut WorkflowRunStatus) -> Result<(), kube::Error> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let settled: Vec<bool> = status.steps.keys().map(|k| settled_iteration(status, k)).collect();
        for ((key, row), settled) in status.steps.iter_mut().zip(settled) {
            let Some(r) = &row.output_ref else { continue };
            if row.output.is_some() || settled {
                continue;
            }
            let known = lock(&self.known).get(&(uid.to_string(), key.clone())).cloned();
            let text = match known {
                Some(t) => t,
                None => {
                    let cm = cms.get_opt(&r.config_map).await?;
                    match cm.and_then(|c| c.data).and_then(|mut d| d.remove(&r.key)) {
                        Some(t) => {
                            lock(&self.known).insert((uid.to_string(), key.clone()), t.clone());
                            t
                        }
                        None => {
                            row.message = format!("output ConfigMap {} is missing", r.config_map);
                            continue;
                        }
                    }
                }
            };
            row.output = Some(text);
        }
        Ok(())
    }

    /// Moves outputs over the inline bound, and every transcript, into ConfigMaps owned by
    /// the run.
    pub async fn externalize(&self, run: &WorkflowRun, status: &mut WorkflowRunStatus) -> Result<(), kube::Error> {
        let ns = run.namespace().unwrap_or_default();
        let name = run.name_any();
        let uid = run.uid().unwrap_or_default();
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        for (key, row) in status.steps.iter_mut() {
            let Some(transcript) = row.transcript.take() else { continue };
            let cm_name = naming::transcript_config_map(&name, key);
            let mut labels = naming::run_labels(&name);
            labels.insert(naming::LABEL_STEP.to_string(), naming::label_value(key_step(key)));
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(cm_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([("volt.dev/step-key".to_string(), key.clone())])),
                    owner_references: run.controller_owner_ref(&()).map(|o| vec![o]),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(naming::TRANSCRIPT_KEY.to_string(), transcript.to_string())])),
                ..Default::default()
            };
            let mut value = serde_json::to_value(&cm).map_err(kube::Error::SerdeError)?;
            value["apiVersion"] = json!("v1");
            value["kind"] = json!("ConfigMap");
            cms.patch(&cm_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await?;
            row.transcript_ref = Some(OutputRef {
                config_map: cm_name,
                key: naming::TRANSCRIPT_KEY.into(),
                size: transcript.len() as u64,
            });
        }
        let limits: Vec<usize> = status
            .steps
            .keys()
            .map(|k| {
                if settled_iteration(status, k) {
                    SETTLED_INLINE_LIMIT.min(self.inline_limit)
                } else {
                    self.inline_limit
                }
            })
            .collect();
        for ((key, row), limit) in status.steps.iter_mut().zip(limits) {
            let Some(out) = &row.output else { continue };
            if out.len() <= limit {
                continue;
            }
            let k = (uid.clone(), key.clone());
            let stored = lock(&self.known).get(&k).is_some_and(|s| s == out) && row.output_ref.is_some();
            if !stored {
                let cm_name = naming::output_config_map(&name, key);
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(cm_name.clone()),
                        namespace: Some(ns.clone()),
                        labels: Some(naming::run_labels(&name)),
                        owner_references: run.controller_owner_ref(&()).map(|o| vec![o]),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([("output".to_string(), out.clone())])),
                    ..Default::default()
                };
                let mut value = serde_json::to_value(&cm).map_err(kube::Error::SerdeError)?;
                value["apiVersion"] = json!("v1");
                value["kind"] = json!("ConfigMap");
                cms.patch(&cm_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&value)).await?;
                row.output_ref = Some(OutputRef { config_map: cm_name, key: "output".into(), size: out.len() as u64 });
                lock(&self.known).insert(k, out.clone());
            }
            row.output = None;
        }
        status.usage = crate::engine::usage::totals(&status.steps);
        Ok(())
    }

    /// Forgets a run's outputs (it finished or was deleted).
    pub fn forget_run(&self, uid: &str) {
        lock(&self.known).retain(|(u, _), _| u != uid);
    }
}

/// The step id of a status key (`implement[2]` -> `implement`).
fn key_step(key: &str) -> &str {
    key.split(['[', '/']).next().unwrap_or(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{StepPhase, StepStatus};

    #[test]
    fn iterations_before_the_previous_one_are_settled() {
        let mut status = WorkflowRunStatus::default();
        let loop_row = |iterations, phase| StepStatus { iterations: Some(iterations), phase, ..Default::default() };
        status.steps.insert("l".into(), loop_row(5, StepPhase::Running));
        let settled = |s: &WorkflowRunStatus, k: &str| settled_iteration(s, k);
        assert!(settled(&status, "l.3.code"));
        assert!(settled(&status, "l.1.code[2]"));
        assert!(!settled(&status, "l.4.code"), "the previous iteration: loop.previous reads it");
        assert!(!settled(&status, "l.5.code"), "the current one");
        assert!(!settled(&status, "other"));
        assert!(!settled(&status, "nope.1.code"));
        status.steps.insert("l".into(), loop_row(5, StepPhase::Succeeded));
        assert!(settled(&status, "l.4.code"));
        assert!(!settled(&status, "l.5.code"), "the last iteration of a finished loop gives its output");
    }
}
