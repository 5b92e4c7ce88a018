//! What a pass's transitions become outside the run: step and run counters, step duration
//! histograms, and events (the event log, Kubernetes Events, CloudEvents).

use kube::{Resource, ResourceExt};
use tracing::debug;

use crate::api::{RunPhase, StepKind, StepPhase, WorkflowRun, WorkflowRunStatus};
use crate::engine::{Phase, Transition};
use crate::events::{Batch, Dispatcher, EventKind};
use crate::metrics::Metrics;

/// The event kind of a transition (a step served from the cache is `StepCached`).
fn event_kind(phase: Phase, cached: bool) -> EventKind {
    match phase {
        Phase::Step(StepPhase::Running) => EventKind::StepStarted,
        Phase::Step(StepPhase::Retrying) => EventKind::StepRetried,
        Phase::Step(StepPhase::Succeeded) if cached => EventKind::StepCached,
        Phase::Step(StepPhase::Succeeded) => EventKind::StepSucceeded,
        Phase::Step(StepPhase::Failed) => EventKind::StepFailed,
        Phase::Step(StepPhase::Skipped) => EventKind::StepSkipped,
        Phase::Step(StepPhase::Waiting) => EventKind::StepWaiting,
        Phase::Step(StepPhase::Cancelled | StepPhase::Pending) => EventKind::StepCancelled,
        Phase::Run(RunPhase::Succeeded) => EventKind::RunSucceeded,
        Phase::Run(RunPhase::Failed) => EventKind::RunFailed,
        Phase::Run(RunPhase::Cancelled) => EventKind::RunCancelled,
        Phase::Run(RunPhase::Suspended) => EventKind::RunSuspended,
        Phase::Run(RunPhase::Running | RunPhase::Pending | RunPhase::Queued) => EventKind::RunStarted,
    }
}

/// Within a pass, the run starts before its steps and finishes after them.
fn order(t: &Transition) -> u8 {
    match t.phase {
        Phase::Run(RunPhase::Running) => 0,
        Phase::Run(p) if p.is_finished() => 2,
        _ => 1,
    }
}

/// Counts the transitions and publishes them as events of the run.
pub fn record(
    metrics: &Metrics,
    events: &Dispatcher,
    run: &WorkflowRun,
    kind_of: impl Fn(&str) -> Option<StepKind>,
    transitions: &[Transition],
    status: &WorkflowRunStatus,
) {
    if transitions.is_empty() {
        return;
    }
    let ns = run.namespace().unwrap_or_default();
    let uid = run.uid().unwrap_or_default();
    let object = format!("WorkflowRun/{}", run.name_any());
    let mut ordered: Vec<&Transition> = transitions.iter().collect();
    ordered.sort_by_key(|t| order(t));
    let mut batch = Vec::with_capacity(transitions.len());
    for t in ordered {
        let phase = t.phase.as_str();
        let row = t.key.as_ref().and_then(|k| status.steps.get(k));
        match &t.key {
            Some(key) => {
                let kind = kind_of(key).map(|k| k.as_str()).unwrap_or("unknown");
                metrics.steps.with_label_values(&[kind, phase]).inc();
                if let Some(row) = row
                    && matches!(t.phase, Phase::Step(StepPhase::Succeeded | StepPhase::Failed))
                    && let (Some(s), Some(f)) = (&row.started_at, &row.finished_at)
                {
                    let secs = (f.0.as_microsecond() - s.0.as_microsecond()).max(0) as f64 / 1e6;
                    metrics.step_duration.with_label_values(&[kind, phase]).observe(secs);
                }
            }
            None => metrics.runs.with_label_values(&[phase]).inc(),
        }
        let mut e = events.event(event_kind(t.phase, row.is_some_and(|r| r.cached)), &uid, &ns, object.clone());
        e.step = t.key.clone();
        e.attempt = t.attempt;
        e.message = t.message.clone();
        batch.push(e);
    }
    debug!(run = %run.name_any(), transitions = batch.len(), "transitions");
    events.publish(Batch { events: batch, reference: Some(run.object_ref(&())) });
}
