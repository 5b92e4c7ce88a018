//! Decisions and switches: merge patches of a run's spec, made with the caller's rights.

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::api::{StepPhase, WorkflowRun};

use super::{Ctx, Error, Result};

pub(super) async fn get_run(ctx: &Ctx, name: &str) -> Result<WorkflowRun> {
    let api: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match api.get_opt(name).await.map_err(Error::from_api)? {
        Some(r) => Ok(r),
        None => Err(Error::NotFound { kind: "WorkflowRun", name: name.into(), namespace: ctx.namespace.clone() }),
    }
}

async fn patch(ctx: &Ctx, run: &str, patch: serde_json::Value) -> Result<()> {
    let api: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    api.patch(run, &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(Error::from_api)?;
    Ok(())
}

/// `cancel`, `suspend`, `resume`: sets `spec.<field>`.
pub(super) async fn set(ctx: &Ctx, run: &str, field: &str, value: bool) -> Result<u8> {
    get_run(ctx, run).await?;
    patch(ctx, run, json!({"spec": {field: value}})).await?;
    let what = match (field, value) {
        ("cancel", _) => "cancelled",
        (_, true) => "suspended",
        _ => "resumed",
    };
    println!("workflowrun.volt.dev/{run} {what}");
    Ok(0)
}

/// `approve`, `reject`: records the caller's decision in `spec.decisions`. STEP is the key of
/// an approval step (`sign-off`, `review.2.sign-off`), of a tool call (`ask/open_page`), or the
/// step whose tool call waits (`ask`, taken to its waiting tool call).
pub(super) async fn decide(ctx: &Ctx, run: &str, step: &str, approve: bool, message: Option<String>) -> Result<u8> {
    let r = get_run(ctx, run).await?;
    let status = r.status.unwrap_or_default();
    let key = match status.steps.get(step) {
        Some(row) if row.phase == StepPhase::Waiting => row.decision_key.clone().unwrap_or_else(|| step.to_string()),
        Some(row) if !step.contains('/') => {
            return Err(Error::Usage(format!(
                "step {step:?} of run {run} is {}, not waiting for a decision{}",
                row.phase.as_str(),
                waiting_hint(&status)
            )));
        }
        _ if step.contains('/') => step.to_string(),
        _ => {
            return Err(Error::Usage(format!("run {run} has no step {step:?}{}", waiting_hint(&status))));
        }
    };
    let decision = json!({"decision": if approve { "Approve" } else { "Reject" }, "comment": message, "by": ctx.user});
    patch(ctx, run, json!({"spec": {"decisions": {key.clone(): decision}}})).await?;
    println!("workflowrun.volt.dev/{run}: {key} {}", if approve { "approved" } else { "rejected" });
    Ok(0)
}

fn waiting_hint(status: &crate::api::WorkflowRunStatus) -> String {
    let waiting: Vec<String> = status
        .steps
        .iter()
        .filter(|(_, r)| r.phase == StepPhase::Waiting)
        .map(|(k, r)| r.decision_key.clone().unwrap_or_else(|| k.clone()))
        .collect();
    if waiting.is_empty() { " (nothing waits)".into() } else { format!(" (waiting: {})", waiting.join(", ")) }
}
