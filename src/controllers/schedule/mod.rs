//! The WorkflowSchedule controller: starts a WorkflowRun of a Workflow at each slot of a cron
//! schedule, like the CronJob controller starts Jobs.
//!
//! Read (the schedule, its Workflow and its runs from watch caches) -> validate ([`cron`],
//! pure) -> decide ([`plan`], pure, at the [`cron::Clock`]'s time) -> apply (cancel replaced
//! runs, create the slot's run, delete runs beyond the history limits) -> write the status
//! (server-side apply) -> requeue at the next slot. No polling: runs of the schedule and its
//! Workflow wake it through the watches, the next slot through the requeue.
//!
//! The slot's run is created under a deterministic name, `<schedule>-<unix minute>`: after a
//! restart, or with a second replica, creating it again is a 409, taken as "already started".

pub mod cron;
pub mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{
    FIELD_MANAGER, KState, Workflow, WorkflowRef, WorkflowRun, WorkflowRunSpec, WorkflowSchedule,
    WorkflowScheduleStatus, own_conditions, set_kstatus,
};
use crate::events::EventSink;
use crate::kube_util::{ServedFromWatchCache, WatchBackoff, api_for, slim_meta, wait_ready};
use crate::metrics::Metrics;
use crate::naming;

use super::{Error, drain, error_requeue};
use cron::{Clock, CronSchedule, SpecError, SystemClock};
use plan::{FinishedRun, Observed, SlotAction};

/// How long a pass waits for the run and Workflow caches' first lists.
const CACHE_WAIT: Duration = Duration::from_secs(30);

struct Ctx {
    client: Client,
    metrics: Metrics,
    events: EventSink,
    clock: Arc<dyn Clock>,
    /// Runs labelled `volt.dev/schedule`, metadata only.
    runs: Store<PartialObjectMeta<WorkflowRun>>,
    workflows: Store<Workflow>,
}

/// Why a schedule cannot start runs: its spec (the field is named), or its Workflow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("spec.workflowRef: Workflow {name:?} not found in namespace {namespace:?}")]
    WorkflowNotFound { name: String, namespace: String },
    #[error("spec.params: {0}")]
    Params(String),
}

impl Invalid {
    fn reason(&self) -> &'static str {
        match self {
            Invalid::Spec(_) | Invalid::Params(_) => "InvalidSpec",
            Invalid::WorkflowNotFound { .. } => "WorkflowNotFound",
        }
    }
}

/// Checks what the API server's schema cannot: the expression, the time zone, the deadline.
pub fn validate(spec: &crate::api::WorkflowScheduleSpec) -> Result<CronSchedule, SpecError> {
    if let Some(d) = spec.starting_deadline_seconds
        && d < 0
    {
        return Err(SpecError::Deadline(d));
    }
    CronSchedule::parse(&spec.schedule, spec.time_zone.as_deref())
}

/// The params of a slot's run: the Workflow's defaults, then the schedule's; an error when a
/// required parameter has no value.
pub fn merged_params(
    wf: &Workflow,
    given: &BTreeMap<String, serde_json::Value>,
) -> Result<BTreeMap<String, serde_json::Value>, Invalid> {
    crate::engine::params::resolve(&wf.spec, given)
        .map_err(|e| Invalid::Params(e.trim_start_matches("spec.params: ").to_string()))?;
    let mut params: BTreeMap<String, serde_json::Value> =
        wf.spec.params.iter().filter_map(|p| Some((p.name.clone(), p.default.clone()?))).collect();
    params.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(params)
}

/// Whether `meta` is owned by the schedule with uid `uid`.
fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.uid == uid)
}

/// The schedule's runs from the cache: names of the active ones (sorted), and the finished
/// ones.
fn runs_of(sched: &WorkflowSchedule, ctx: &Ctx) -> (Vec<String>, Vec<FinishedRun>) {
    let uid = sched.uid().unwrap_or_default();
    let ns = sched.namespace();
    let (mut active, mut finished) = (Vec::new(), Vec::new());
    for m in ctx.runs.state() {
        if m.namespace() != ns || !owned_by(&m.metadata, &uid) || m.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match m.labels().get(naming::LABEL_FINISHED) {
            None => active.push(m.name_any()),
            Some(phase) => finished.push(FinishedRun {
                name: m.name_any(),
                created: m.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(Timestamp::UNIX_EPOCH),
                succeeded: phase == "Succeeded",
            }),
        }
    }
    active.sort();
    (active, finished)
}

/// The run of `slot`, owned by the schedule.
fn build_run(
    sched: &WorkflowSchedule,
    name: &str,
    slot: Timestamp,
    params: BTreeMap<String, serde_json::Value>,
) -> WorkflowRun {
    let mut annotations = BTreeMap::new();
    annotations.insert(naming::ANNOTATION_SCHEDULED_AT.to_string(), slot.to_string());
    WorkflowRun {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: sched.namespace(),
            labels: Some(naming::schedule_labels(&sched.name_any())),
            annotations: Some(annotations),
            owner_references: sched.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: WorkflowRunSpec {
            workflow_ref: Some(WorkflowRef { name: sched.spec.workflow_ref.name.clone() }),
            params,
            ..Default::default()
        },
        status: None,
    }
}

async fn reconcile(sched: Arc<WorkflowSchedule>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer("workflowschedule");
    if sched.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    for ready in [tokio::time::timeout(CACHE_WAIT, wait_ready(&ctx.runs)).await, {
        tokio::time::timeout(CACHE_WAIT, wait_ready(&ctx.workflows)).await
    }] {
        if ready.is_err() {
            return Err(Error::Other("the run and Workflow caches have not listed yet".into()));
        }
    }
    let now = ctx.clock.now();
    let ns = sched.namespace().unwrap_or_default();
    let name = sched.name_any();
    let generation = sched.metadata.generation;
    let old = sched.status.clone().unwrap_or_default();
    let (mut active, finished) = runs_of(&sched, &ctx);
    let mut status = WorkflowScheduleStatus {
        observed_generation: generation,
        conditions: old.conditions.clone(),
        last_schedule_time: old.last_schedule_time.clone(),
        next_schedule_time: None,
        last_run: old.last_run.clone(),
        active: Vec::new(),
        active_count: 0,
        missed: old.missed,
    };

    // Validate.
    let checked = validate(&sched.spec).map_err(Invalid::from).and_then(|cron| {
        let wf_name = &sched.spec.workflow_ref.name;
        let wf = ctx
            .workflows
            .get(&ObjectRef::new(wf_name).within(&ns))
            .ok_or_else(|| Invalid::WorkflowNotFound { name: wf_name.clone(), namespace: ns.clone() })?;
        Ok((cron, merged_params(&wf, &sched.spec.params)?))
    });
    let (cron, params) = match checked {
        Ok(ok) => ok,
        Err(invalid) => {
            let message = invalid.to_string();
            if crate::api::condition_status(&old.conditions, crate::api::STALLED)
                .is_none_or(|c| c.status != "True" || c.message != message)
            {
                info!(schedule = %name, namespace = %ns, %message, "schedule invalid");
                publish(&ctx, &sched, true, invalid.reason(), message.clone());
            }
            set_kstatus(&mut status.conditions, KState::Stalled, invalid.reason(), &message, generation, now);
            status.active_count = active.len() as u32;
            status.active = active;
            write_status(&sched, &ctx, &old, &status).await?;
            // A change of the schedule or its Workflow wakes it.
            return Ok(Action::await_change());
        }
    };

    // Decide.
    let observed = Observed {
        now,
        created: sched.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now),
        last_schedule: old.last_schedule_time.as_ref().map(|t| t.0),
        starting_deadline_seconds: sched.spec.starting_deadline_seconds,
        suspend: sched.spec.suspend,
        policy: sched.spec.concurrency_policy,
        active: &active,
        schedule: &name,
    };
    let decided = plan::plan(&cron, &observed);

    // Apply.
    let slots = |outcome: &str, n: u64| {
        ctx.metrics.schedule_slots.with_label_values(&[ns.as_str(), name.as_str(), outcome]).inc_by(n);
    };
    match &decided.action {
        SlotAction::Nothing => {}
        SlotAction::Start { slot, run, cancel } => {
            let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ns);
            for r in cancel {
                let patch = json!({"spec": {"cancel": true}});
                match runs.patch(r, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => publish(
                        &ctx,
                        &sched,
                        false,
                        "Replaced",
                        format!("cancelled run {r} to start the run of {slot}"),
                    ),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            match runs.create(&PostParams::default(), &build_run(&sched, run, *slot, params)).await {
                Ok(_) => {
                    slots("started", 1);
                    info!(schedule = %name, namespace = %ns, run = %run, %slot, "started a scheduled run");
                    publish(&ctx, &sched, false, "Started", format!("started run {run} for the slot of {slot}"));
                }
                // Started already: by a pass whose status write was lost, or another replica.
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            if !active.contains(run) {
                active.push(run.clone());
                active.sort();
            }
            status.last_run = Some(run.clone());
        }
        SlotAction::TooLate { slot, late } => {
            slots("too_late", 1);
            publish(
                &ctx,
                &sched,
                true,
                "MissedSchedule",
                format!("skipped the slot of {slot}: {}s late, past startingDeadlineSeconds", late.as_secs()),
            )
        }
        SlotAction::Forbidden { slot } => {
            slots("forbidden", 1);
            publish(
                &ctx,
                &sched,
                false,
                "SkippedForbid",
                format!("skipped the slot of {slot}: concurrencyPolicy Forbid and {} active", active.join(", ")),
            )
        }
    }
    if decided.older_missed > 0 {
        slots("missed", decided.older_missed);
        let at_least = if decided.older_missed >= cron::MAX_COUNTED_SLOTS { "at least " } else { "" };
        publish(
            &ctx,
            &sched,
            true,
            "MissedSchedule",
            format!(
                "missed {at_least}{} earlier slot(s) (the operator was down or the schedule suspended); only the latest is considered",
                decided.older_missed
            ),
        );
    }
    if let Some(slot) = decided.action.slot() {
        status.last_schedule_time = Some(Time(slot));
    }
    status.missed = status.missed.saturating_add(decided.missed);
    status.next_schedule_time = decided.next.map(Time);
    status.active_count = active.len() as u32;
    status.active = active;

    // History limits.
    let doomed = plan::prune(&finished, sched.spec.successful_runs_history_limit, sched.spec.failed_runs_history_limit);
    if !doomed.is_empty() {
        let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ns);
        let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
        for r in &doomed {
            match runs.delete(r, &dp).await {
                Ok(_) => info!(schedule = %name, namespace = %ns, run = %r, "deleted a run beyond the history limits"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    let (state, reason, message) = if sched.spec.suspend {
        (KState::Ready, "Suspended", "suspended: no new runs start".to_string())
    } else {
        (KState::Ready, "Scheduling", format!("{} in {}", sched.spec.schedule.trim(), cron.time_zone()))
    };
    set_kstatus(&mut status.conditions, state, reason, &message, generation, now);
    write_status(&sched, &ctx, &old, &status).await?;

    Ok(match decided.next {
        Some(next) => Action::requeue(until(next, ctx.clock.now())),
        None => Action::await_change(),
    })
}

/// How long from `now` until `slot`: exactly, and at least 1 ms (a slot already reached, as
/// after slow API calls, is taken at once). An early wake-up (clock drift) finds nothing due
/// and requeues for the rest.
fn until(slot: Timestamp, now: Timestamp) -> Duration {
    let wait = slot.duration_since(now);
    if wait.is_negative() { Duration::from_millis(1) } else { wait.unsigned_abs().max(Duration::from_millis(1)) }
}

/// An Event on the schedule.
fn publish(ctx: &Ctx, sched: &WorkflowSchedule, warning: bool, reason: &str, note: String) {
    ctx.events.publish(sched.object_ref(&()), warning, reason, "Schedule", note);
}

/// Applies the status when it changed; only the operator's conditions are sent.
async fn write_status(
    sched: &WorkflowSchedule,
    ctx: &Ctx,
    old: &WorkflowScheduleStatus,
    status: &WorkflowScheduleStatus,
) -> Result<(), Error> {
    if old == status {
        return Ok(());
    }
    let api: Api<WorkflowSchedule> = Api::namespaced(ctx.client.clone(), &sched.namespace().unwrap_or_default());
    let sent = WorkflowScheduleStatus { conditions: own_conditions(&status.conditions), ..status.clone() };
    let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowSchedule", "status": sent});
    match api.patch_status(&sched.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.status_writes.with_label_values(&["WorkflowSchedule"]).inc();
    Ok(())
}

fn error_policy(_s: Arc<WorkflowSchedule>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&["workflowschedule", err.metric_label()]).inc();
    error_requeue()
}

/// The WorkflowSchedule controller for one scope (a namespace, or all).
pub async fn controller(
    client: Client,
    scope: Option<String>,
    metrics: Metrics,
    events: EventSink,
    shutdown: CancellationToken,
) {
    let (schedules, sched_writer) = reflector::store();
    let sched_stream =
        watcher(api_for::<WorkflowSchedule>(&client, &scope), watcher::Config::default().served_from_watch_cache())
            .backoff(WatchBackoff::default())
            .modify(|s: &mut WorkflowSchedule| slim_meta(&mut s.metadata))
            .reflect(sched_writer)
            .touched_objects();
    let (runs, run_writer) = reflector::store();
    let run_stream = watcher(
        api_for::<PartialObjectMeta<WorkflowRun>>(&client, &scope),
        watcher::Config::default().labels(naming::LABEL_SCHEDULE).served_from_watch_cache(),
    )
    .backoff(WatchBackoff::default())
    .modify(|m: &mut PartialObjectMeta<WorkflowRun>| slim_meta(&mut m.metadata))
    .reflect(run_writer)
    .touched_objects();
    let (workflows, wf_writer) = reflector::store();
    let wf_stream = watcher(api_for::<Workflow>(&client, &scope), watcher::Config::default().served_from_watch_cache())
        .backoff(WatchBackoff::default())
        .modify(|w: &mut Workflow| {
            slim_meta(&mut w.metadata);
            w.status = None;
        })
        .reflect(wf_writer)
        .touched_objects();
    // A Workflow that appears, changes or goes wakes the schedules that start it.
    let referencing = {
        let schedules: Store<WorkflowSchedule> = schedules.clone();
        move |wf: Workflow| {
            let (ns, name) = (wf.namespace(), wf.name_any());
            schedules
                .state()
                .into_iter()
                .filter(|s| s.namespace() == ns && s.spec.workflow_ref.name == name)
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        }
    };
    let ctx = Arc::new(Ctx { client, metrics, events, clock: Arc::new(SystemClock), runs, workflows });
    let stream = Controller::for_stream(sched_stream, schedules)
        .with_config(kube::runtime::controller::Config::default().concurrency(8))
        .owns_stream(run_stream)
        .watches_stream(wf_stream, referencing)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx);
    drain("workflowschedule", stream.boxed()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ParamSpec, WorkflowScheduleSpec, WorkflowSpec};

    fn spec(extra: serde_json::Value) -> WorkflowScheduleSpec {
        let mut v = json!({"schedule": "*/5 * * * *", "workflowRef": {"name": "w"}});
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
        }
        serde_json::from_value(v).expect("a spec")
    }

    #[test]
    fn bad_input_names_the_field() {
        assert!(validate(&spec(json!({}))).is_ok());
        let cases = [
            (json!({"schedule": "every day"}), "spec.schedule: \"every day\" is not a 5-field cron expression"),
            (json!({"timeZone": "Europe/Atlantis"}), "spec.timeZone: unknown time zone \"Europe/Atlantis\""),
            (json!({"startingDeadlineSeconds": -5}), "spec.startingDeadlineSeconds: must be 0 or more, not -5"),
        ];
        for (extra, want) in cases {
            let err = validate(&spec(extra.clone())).expect_err("invalid").to_string();
            assert!(err.starts_with(want), "{extra}: {err}");
        }
        let missing = Invalid::WorkflowNotFound { name: "w".into(), namespace: "ns".into() };
        assert_eq!(missing.to_string(), "spec.workflowRef: Workflow \"w\" not found in namespace \"ns\"");
        assert_eq!(missing.reason(), "WorkflowNotFound");
    }

    #[test]
    fn run_params_are_the_workflows_defaults_under_the_schedules() {
        let wf = Workflow::new(
            "w",
            WorkflowSpec {
                params: vec![
                    ParamSpec { name: "topic".into(), required: true, ..Default::default() },
                    ParamSpec { name: "lang".into(), default: Some(json!("Rust")), ..Default::default() },
                    ParamSpec { name: "depth".into(), default: Some(json!(1)), ..Default::default() },
                ],
                ..Default::default()
            },
        );
        let given = BTreeMap::from([("topic".to_string(), json!("cron")), ("depth".to_string(), json!(3))]);
        let merged = merged_params(&wf, &given).expect("valid");
        assert_eq!(json!(merged), json!({"topic": "cron", "lang": "Rust", "depth": 3}));
        let err = merged_params(&wf, &BTreeMap::new()).expect_err("topic is required");
        assert_eq!(err.to_string(), "spec.params: required parameter \"topic\" is missing");
    }

    #[test]
    fn the_requeue_is_the_time_until_the_slot() {
        let slot: Timestamp = "2025-01-01T10:01:00Z".parse().expect("time");
        let at = |s: &str| s.parse::<Timestamp>().expect("time");
        assert_eq!(until(slot, at("2025-01-01T10:00:00.250Z")), Duration::from_millis(59_750));
        assert_eq!(until(slot, at("2025-01-01T10:01:00Z")), Duration::from_millis(1));
        assert_eq!(until(slot, at("2025-01-01T10:01:02Z")), Duration::from_millis(1));
    }

    #[test]
    fn a_slots_run_is_named_labelled_and_owned() {
        let mut s = WorkflowSchedule::new("nightly", spec(json!({"params": {"a": 1}})));
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some("uid-1".into());
        let slot: Timestamp = "2025-01-01T00:00:00Z".parse().expect("time");
        let name = naming::schedule_run_name("nightly", slot.as_second());
        let run = build_run(&s, &name, slot, s.spec.params.clone());
        assert_eq!(run.metadata.name.as_deref(), Some("nightly-28928160"));
        assert_eq!(run.labels()[naming::LABEL_SCHEDULE], "nightly");
        assert_eq!(run.annotations()[naming::ANNOTATION_SCHEDULED_AT], "2025-01-01T00:00:00Z");
        let owner = &run.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("WorkflowSchedule", "uid-1", Some(true))
        );
        assert!(owned_by(&run.metadata, "uid-1"));
        assert_eq!(run.spec.workflow_ref.map(|r| r.name), Some("w".to_string()));
        assert_eq!(run.spec.params["a"], 1);
    }
}
