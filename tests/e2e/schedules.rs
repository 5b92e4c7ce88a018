//! WorkflowSchedules against the real control plane, across real minute boundaries: the run of
//! a slot is named for its minute, labelled and owned; Forbid skips a slot while a run is
//! active and counts it; the history limits delete the oldest finished runs; a missing Workflow
//! is reported and picked up when it appears. The operator runs with the chart's rights only.

use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use volt_operator::api::{RunPhase, WorkflowRun, WorkflowSchedule, condition_status};
use volt_operator::naming;

use crate::kit::{Env, Operator, kubectl, wait_for, wait_until};

/// A slot comes within a minute; a little more for the apiserver and the watches.
const SLOT: Duration = Duration::from_secs(80);

async fn apply_schedule(api: &Api<WorkflowSchedule>, name: &str, spec: Value) {
    let obj = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowSchedule", "metadata": {"name": name},
                     "spec": spec});
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("apply WorkflowSchedule/{name}: {e}"));
}

fn ready(s: &WorkflowSchedule) -> Option<(String, String)> {
    let st = s.status.as_ref()?;
    let c = condition_status(&st.conditions, "Ready")?;
    Some((c.status.clone(), c.message.clone()))
}

async fn run_names(runs: &Api<WorkflowRun>, selector: &str) -> Vec<String> {
    let mut names: Vec<String> = runs
        .list(&ListParams::default().labels(selector))
        .await
        .expect("list runs")
        .items
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .map(|r| r.name_any())
        .collect();
    names.sort();
    names
}

/// A run owned by schedule `s` as if it had started it, of `workflow` with `params`.
fn owned_run(s: &WorkflowSchedule, name: &str, params: Value) -> Value {
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun",
           "metadata": {"name": name, "labels": {naming::LABEL_SCHEDULE: s.name_any()},
                        "ownerReferences": [{"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowSchedule",
                                             "name": s.name_any(), "uid": s.uid().unwrap_or_default(),
                                             "controller": true}]},
           "spec": {"workflowRef": {"name": "gate"}, "params": params}})
}

#[tokio::test]
async fn a_schedule_starts_the_run_of_each_minute_forbids_overlap_and_prunes_history() {
    let e = Env::new("sched").await;
    let op = Operator::start_with_chart_rights(&e.client, &e.ns).await;
    let schedules: Api<WorkflowSchedule> = Api::namespaced(e.client.clone(), &e.ns);

    // A missing Workflow is reported, naming the field.
    apply_schedule(
        &schedules,
        "orphan",
        json!({"schedule": "@daily", "workflowRef": {"name": "gate"}, "params": {"topic": "t"}}),
    )
    .await;
    let s = wait_for(&schedules, "orphan", SLOT, |s| ready(s).is_some()).await;
    let (status, message) = ready(&s).unwrap_or_default();
    assert_eq!(status, "False");
    assert!(message.contains("spec.workflowRef: Workflow \"gate\" not found"), "{message}");

    // A Workflow that waits for an approval, so its runs stay active.
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "gate"},
        "spec": {"params": [{"name": "topic", "required": true}, {"name": "lang", "default": "Rust"}],
                 "steps": [{"id": "ok", "approval": {"message": "{{ params.topic }} in {{ params.lang }}?"}}]}}))
        .await;
    // ... and the orphan picks it up.
    let s = wait_for(&schedules, "orphan", SLOT, |s| ready(s).is_some_and(|(st, _)| st == "True")).await;
    assert!(s.status.as_ref().and_then(|st| st.next_schedule_time.as_ref()).is_some());

    apply_schedule(
        &schedules,
        "minutely",
        json!({"schedule": "* * * * *", "workflowRef": {"name": "gate"}, "params": {"topic": "cron"},
               "concurrencyPolicy": "Forbid", "successfulRunsHistoryLimit": 1, "failedRunsHistoryLimit": 1}),
    )
    .await;
    let s = wait_for(&schedules, "minutely", SLOT, |s| ready(s).is_some()).await;
    assert_eq!(ready(&s).map(|r| r.0).as_deref(), Some("True"), "{:?}", s.status);
    let created = s.metadata.creation_timestamp.as_ref().map(|t| t.0).expect("created");
    let seen = s.status.as_ref().and_then(|st| st.next_schedule_time.as_ref()).map(|t| t.0).expect("next slot");
    assert_eq!(seen.as_second() % 60, 0, "a minute boundary: {seen}");
    // The first slot is the first minute after the creation (the first pass may already be
    // past it, and show the one after).
    let next = Timestamp::from_second((created.as_second() / 60 + 1) * 60).expect("time");
    assert!(seen == next || seen.as_second() == next.as_second() + 60, "created {created}, next {seen}");

    // History: runs the schedule owns that finished before its first slot. Two succeed (their
    // approval given up front), two fail (a required parameter is missing).
    let approve = json!({"ok": {"decision": "Approve", "comment": "early", "by": "test"}});
    for n in 1..=2 {
        let mut ok = owned_run(&s, &format!("old-ok-{n}"), json!({"topic": "old"}));
        ok["spec"]["decisions"] = approve.clone();
        e.apply(ok).await;
        e.apply(owned_run(&s, &format!("old-bad-{n}"), json!({}))).await;
    }
    let selector = format!("{}=minutely", naming::LABEL_SCHEDULE);
    let pruned = wait_until("the history limits to delete old-ok-1 and old-bad-1", SLOT, || async {
        let names = run_names(&e.runs, &selector).await;
        let olds: Vec<String> = names.into_iter().filter(|n| n.starts_with("old-")).collect();
        (olds == ["old-bad-2", "old-ok-2"]).then_some(olds)
    })
    .await;
    assert_eq!(pruned, ["old-bad-2", "old-ok-2"]);

    // The slot's run: named for its minute, labelled, owned, with the Workflow's params under
    // the schedule's.
    let first = naming::schedule_run_name("minutely", next.as_second());
    assert_eq!(first, format!("minutely-{}", next.as_second() / 60));
    let run = wait_for(&e.runs, &first, SLOT, |_| true).await;
    assert_eq!(run.labels().get(naming::LABEL_SCHEDULE).map(String::as_str), Some("minutely"));
    let owner = run.owner_references().first().cloned().expect("an owner");
    assert_eq!((owner.kind.as_str(), owner.uid), ("WorkflowSchedule", s.uid().unwrap_or_default()));
    assert_eq!(json!(run.spec.params), json!({"topic": "cron", "lang": "Rust"}));
    assert_eq!(run.annotations().get(naming::ANNOTATION_SCHEDULED_AT), Some(&next.to_string()));
    let started = Timestamp::now();
    assert!(started.as_second() - next.as_second() < 30, "started at {started} for the slot of {next}");
    let s = wait_for(&schedules, "minutely", SLOT, |s| {
        s.status.as_ref().is_some_and(|st| st.active == [first.clone()] && st.last_run.as_deref() == Some(&first))
    })
    .await;
    let st = s.status.clone().unwrap_or_default();
    assert_eq!(st.last_schedule_time.map(|t| t.0), Some(next));
    assert_eq!(st.active_count, 1);
    assert_eq!(st.missed, 0);
    let waiting =
        wait_for(&e.runs, &first, SLOT, |r| r.status.as_ref().is_some_and(|s| s.message == "waiting for approval: ok"))
            .await;
    assert_eq!(waiting.status.map(|s| s.params), Some(run.spec.params.clone()));

    // Forbid: the next minute passes with the run still waiting: skipped, counted, no new run.
    let second = Timestamp::from_second(next.as_second() + 60).expect("time");
    let s = wait_for(&schedules, "minutely", SLOT, |s| s.status.as_ref().is_some_and(|st| st.missed >= 1)).await;
    let st = s.status.clone().unwrap_or_default();
    assert_eq!(st.last_schedule_time.map(|t| t.0), Some(second));
    assert_eq!(st.active, std::slice::from_ref(&first));
    assert_eq!(run_names(&e.runs, &selector).await, [first.as_str(), "old-bad-2", "old-ok-2"]);
    let events = kubectl(&["get", "events", "-n", &e.ns, "-o", "jsonpath={.items[*].message}"]);
    assert!(events.stdout.contains("concurrencyPolicy Forbid"), "a SkippedForbid event: {}", events.stdout);
    assert!(events.stdout.contains(&format!("started run {first}")), "a Started event: {}", events.stdout);
    let text = op.metrics.render();
    let slots = |outcome| {
        crate::kit::metric_sum_where(
            &text,
            "volt_schedule_slots_total",
            &[("exported_namespace", e.ns.as_str()), ("schedule", "minutely"), ("outcome", outcome)],
        )
    };
    assert_eq!((slots("started"), slots("forbidden")), (1.0, 1.0), "{text}");
    let table = kubectl(&["get", "wfs", "-n", &e.ns]);
    for col in ["SCHEDULE", "SUSPEND", "ACTIVE", "LAST", "NEXT", "AGE", "* * * * *"] {
        assert!(table.stdout.contains(col), "{col} in:\n{}", table.stdout);
    }

    // Approved, the run succeeds; the history keeps it, the newest success, and deletes old-ok-2.
    let patch = json!({"spec": {"decisions": approve}});
    e.runs.patch(&first, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("approve");
    let done = e.finished(&first, SLOT).await;
    assert_eq!(done.phase, RunPhase::Succeeded, "{}", done.message);
    let names = wait_until("old-ok-2 to be deleted", SLOT, || async {
        let names = run_names(&e.runs, &selector).await;
        (!names.iter().any(|n| n == "old-ok-2")).then_some(names)
    })
    .await;
    // Left: this run, old-bad-2, and perhaps the run of a later minute, started once this one
    // no longer blocked it (and waiting for its approval).
    assert!(names.contains(&first) && names.contains(&"old-bad-2".to_string()), "{names:?}");
    assert!(names.len() <= 3, "{names:?}");
    let s = wait_for(&schedules, "minutely", SLOT, |s| s.status.as_ref().is_some_and(|st| !st.active.contains(&first)))
        .await;
    assert!(s.status.is_some_and(|st| st.missed >= 1));
}

#[tokio::test]
async fn a_restart_that_lost_the_status_does_not_start_a_slot_twice_and_replace_cancels() {
    let e = Env::new("sched-restart").await;
    let op = Operator::start(&e.ns).await;
    let schedules: Api<WorkflowSchedule> = Api::namespaced(e.client.clone(), &e.ns);
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "gate"},
        "spec": {"steps": [{"id": "ok", "approval": {}}]}}))
        .await;
    apply_schedule(
        &schedules,
        "again",
        json!({"schedule": "* * * * *", "workflowRef": {"name": "gate"}, "concurrencyPolicy": "Replace"}),
    )
    .await;
    let s =
        wait_for(&schedules, "again", SLOT, |s| s.status.as_ref().is_some_and(|st| st.next_schedule_time.is_some()))
            .await;
    let created = s.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).expect("created");
    let next = Timestamp::from_second((created / 60 + 1) * 60).expect("the first slot");
    let first = naming::schedule_run_name("again", next.as_second());
    wait_for(&e.runs, &first, SLOT, |_| true).await;
    wait_for(&schedules, "again", SLOT, |s| s.status.as_ref().is_some_and(|st| st.last_run.as_ref() == Some(&first)))
        .await;

    // Once the run waits (nothing more changes), the operator stops, and the status loses the
    // slot (as if its write had never landed).
    wait_for(&e.runs, &first, SLOT, |r| r.status.as_ref().is_some_and(|s| s.message == "waiting for approval: ok"))
        .await;
    op.stop().await;
    // Reconciles in flight when it stopped end first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let forget = json!({"status": {"lastScheduleTime": null, "lastRun": null, "active": null, "activeCount": 0}});
    schedules.patch_status("again", &PatchParams::default(), &Patch::Merge(&forget)).await.expect("forget the slot");
    let s = schedules.get("again").await.expect("schedule");
    assert!(s.status.as_ref().is_some_and(|st| st.last_schedule_time.is_none()), "{:?}", s.status);
    assert!(
        Timestamp::now().as_second() < next.as_second() + 60,
        "still in the slot's minute: the restarted operator finds the slot due again"
    );
    let _op = Operator::start(&e.ns).await;
    let s = wait_for(&schedules, "again", SLOT, |s| {
        s.status.as_ref().is_some_and(|st| st.last_schedule_time.as_ref().map(|t| t.0) == Some(next))
    })
    .await;
    let st = s.status.unwrap_or_default();
    assert_eq!(st.active, std::slice::from_ref(&first), "the run of the slot, found again");
    assert_eq!(st.missed, 0);
    let selector = format!("{}=again", naming::LABEL_SCHEDULE);
    assert_eq!(run_names(&e.runs, &selector).await, std::slice::from_ref(&first), "one run for the slot");

    // Replace: the next minute cancels the waiting run and starts its own.
    let second = naming::schedule_run_name("again", next.as_second() + 60);
    wait_for(&e.runs, &second, SLOT, |_| true).await;
    let cancelled = e.finished(&first, SLOT).await;
    assert_eq!(cancelled.phase, RunPhase::Cancelled, "{}", cancelled.message);
    let s = wait_for(&schedules, "again", SLOT, |s| {
        s.status.as_ref().is_some_and(|st| st.active == std::slice::from_ref(&second))
    })
    .await;
    assert_eq!(s.status.map(|st| st.missed), Some(0));
    let events = kubectl(&["get", "events", "-n", &e.ns, "-o", "jsonpath={.items[*].message}"]);
    assert!(events.stdout.contains(&format!("cancelled run {first}")), "a Replaced event: {}", events.stdout);
}

#[tokio::test]
async fn the_spec_example_is_ready_with_its_next_slot_in_paris() {
    let e = Env::new("sched-example").await;
    let _op = Operator::start(&e.ns).await;
    for f in ["examples/spec/workflow.yaml", "examples/spec/schedule.yaml"] {
        let ran = kubectl(&["apply", "-n", &e.ns, "-f", f]);
        assert!(ran.ok, "kubectl apply {f}: {}", ran.stderr);
    }
    let schedules: Api<WorkflowSchedule> = Api::namespaced(e.client.clone(), &e.ns);
    let s = wait_for(&schedules, "nightly-pipeline", SLOT, |s| ready(s).is_some()).await;
    assert_eq!(ready(&s), Some(("True".to_string(), "30 2 * * MON-FRI in Europe/Paris".to_string())));
    let next = s.status.and_then(|st| st.next_schedule_time).map(|t| t.0).expect("next slot");
    let paris = next.to_zoned(jiff::tz::TimeZone::get("Europe/Paris").expect("the tz database"));
    assert_eq!((paris.hour(), paris.minute()), (2, 30), "{paris}");
    assert!(!matches!(paris.weekday(), jiff::civil::Weekday::Saturday | jiff::civil::Weekday::Sunday), "{paris}");
    let wide = kubectl(&["get", "wfs", "-n", &e.ns, "-o", "wide"]);
    assert!(wide.stdout.contains("30 2 * * MON-FRI in Europe/Paris"), "{}", wide.stdout);
}
