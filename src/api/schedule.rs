use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions::conditions_schema;
use super::run::WorkflowRef;

/// A WorkflowSchedule: starts a WorkflowRun of a Workflow on a cron schedule, like a CronJob
/// starts Jobs. Runs are named `<schedule>-<unix minute of the slot>`, so a slot never starts
/// twice.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "volt.dev",
    version = "v1alpha1",
    kind = "WorkflowSchedule",
    namespaced,
    doc = "A WorkflowSchedule: starts WorkflowRuns of a Workflow on a cron schedule.",
    status = "WorkflowScheduleStatus",
    shortname = "wfs",
    category = "volt",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Suspend","type":"boolean","jsonPath":".spec.suspend"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.activeCount"}"#,
    printcolumn = r#"{"name":"Last","type":"date","jsonPath":".status.lastScheduleTime"}"#,
    printcolumn = r#"{"name":"Next","type":"string","jsonPath":".status.nextScheduleTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowScheduleSpec {
    /// When to start runs: a cron expression of 5 fields (minute hour day-of-month month
    /// day-of-week), or one of @hourly, @daily (@midnight), @weekly, @monthly, @yearly
    /// (@annually).
    #[schemars(length(min = 1, max = 256))]
    pub schedule: String,

    /// The IANA time zone the expression is read in (`Europe/Paris`); UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,

    /// The Workflow each run starts, in the schedule's namespace.
    pub workflow_ref: WorkflowRef,

    /// Parameter values of every run, over the Workflow's defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::any_json_map")]
    pub params: BTreeMap<String, serde_json::Value>,

    /// What a slot does while a run of the schedule is still active: `Allow` starts another,
    /// `Forbid` skips the slot (counted in `status.missed`), `Replace` cancels the active runs
    /// (`spec.cancel`) and starts a new one.
    #[serde(default)]
    pub concurrency_policy: ScheduleConcurrencyPolicy,

    /// A slot whose run cannot start within this many seconds (the operator was down, the
    /// schedule suspended) is skipped and counted in `status.missed`. Unset: a late slot
    /// starts however late it is (only the latest one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,

    /// True: no new runs start; active runs go on.
    #[serde(default)]
    pub suspend: bool,

    /// Finished runs that succeeded to keep; older ones are deleted.
    #[serde(default = "default_successful_history")]
    #[schemars(range(min = 0, max = 1000))]
    pub successful_runs_history_limit: u32,

    /// Finished runs that failed or were cancelled to keep; older ones are deleted.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 1000))]
    pub failed_runs_history_limit: u32,
}

fn default_successful_history() -> u32 {
    3
}

fn default_failed_history() -> u32 {
    1
}

/// What a slot does while a run of the schedule is active.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum ScheduleConcurrencyPolicy {
    /// Start the slot's run whatever is active.
    #[default]
    Allow,
    /// Skip the slot while a run is active.
    Forbid,
    /// Cancel the active runs and start the slot's run.
    Replace,
}

/// Observed state of a schedule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowScheduleStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions: Ready (valid and scheduling), Stalled (invalid spec or missing
    /// Workflow, the message names the field).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The latest slot the schedule dealt with: its run started, or it was skipped (and
    /// counted in `missed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The next slot (unset while suspended or invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// The latest run the schedule started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<String>,
    /// Runs of the schedule that have not finished, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    /// How many runs are active (the length of `active`).
    #[serde(default)]
    pub active_count: u32,
    /// Slots that started no run: missed while the operator was down or the schedule
    /// suspended, past `startingDeadlineSeconds`, or skipped by `concurrencyPolicy: Forbid`.
    #[serde(default)]
    pub missed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_crd_has_its_columns_defaults_and_bounds() {
        let crd = WorkflowSchedule::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["wfs".to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["volt".to_string()]));
        let v = &crd.spec.versions[0];
        let cols: Vec<&str> = v.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Schedule", "Suspend", "Active", "Last", "Next", "Age", "Message"]);
        let schema = serde_json::to_value(&v.schema).expect("schema");
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["successfulRunsHistoryLimit"]["default"], 3);
        assert_eq!(spec["properties"]["failedRunsHistoryLimit"]["default"], 1);
        assert_eq!(spec["properties"]["concurrencyPolicy"]["default"], "Allow");
        assert_eq!(spec["properties"]["startingDeadlineSeconds"]["minimum"], 0.0);
        let required: Vec<&str> =
            spec["required"].as_array().expect("required").iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(required, ["schedule", "workflowRef"]);
        let conds = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conds["x-kubernetes-list-type"], "map");
    }

    #[test]
    fn a_minimal_spec_takes_the_defaults() {
        let spec: WorkflowScheduleSpec =
            serde_json::from_value(serde_json::json!({"schedule": "@daily", "workflowRef": {"name": "w"}}))
                .expect("parses");
        assert_eq!(spec.successful_runs_history_limit, 3);
        assert_eq!(spec.failed_runs_history_limit, 1);
        assert_eq!(spec.concurrency_policy, ScheduleConcurrencyPolicy::Allow);
        assert!(!spec.suspend && spec.time_zone.is_none() && spec.starting_deadline_seconds.is_none());
    }
}
