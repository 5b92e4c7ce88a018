//! Applying what happened to tasks: results, failures (retried or final) and lost attempts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::api::{Step, StepPhase, StepStatus, TokenUsage};
use crate::naming;

use super::{Event, Pass, TaskInfo, backoff_delay};

impl Pass<'_, '_> {
    pub(super) fn apply(&mut self, event: Event) {
        let (key, attempt) = match &event {
            Event::Succeeded { key, attempt, .. }
            | Event::Failed { key, attempt, .. }
            | Event::Lost { key, attempt } => (key.clone(), *attempt),
        };
        if let Some((loop_id, iteration, inner)) = naming::parse_loop_key(&key) {
            // The loop's current iteration takes it; results of earlier iterations are stale.
            let current = self.status.steps.get(loop_id).and_then(|r| r.iterations);
            if current == Some(iteration) {
                let inner = inner.to_string();
                let event = match event {
                    Event::Succeeded { output, info, .. } => Event::Succeeded { key: inner, attempt, output, info },
                    Event::Failed { message, retryable, info, .. } => {
                        Event::Failed { key: inner, attempt, message, retryable, info }
                    }
                    Event::Lost { .. } => Event::Lost { key: inner, attempt },
                };
                self.loop_events.entry(loop_id.to_string()).or_default().push(event);
            }
            return;
        }
        let Some(step) = self.step_of_key(&key).cloned() else { return };
        // The engine itself runs loops, approvals and waits: no runtime reports on them (a
        // runtime that sees a Running loop with nothing behind it must not make it lost).
        if step.loop_.is_some() || step.approval.is_some() || step.wait.is_some() {
            return;
        }
        let Some(row) = self.status.steps.get(&key) else { return };
        // Stale: another attempt, or already settled (an abort raced the result).
        if row.phase != StepPhase::Running || row.attempts != attempt {
            return;
        }
        match event {
            Event::Succeeded { output, info, .. } => {
                let row = self.row(&key);
                record_info(row, &info);
                row.output = Some(output);
                row.output_ref = None;
                let msg = if info.cached { "result from cache" } else { "" };
                self.transition(&key, StepPhase::Succeeded, msg);
            }
            Event::Failed { message, info, .. } if info.waits_for.is_some() => {
                record_info(self.row(&key), &info);
                let decision_key =
                    format!("{}/{}", self.decision_key(&key), info.waits_for.map(|w| *w).unwrap_or_default());
                self.row(&key).decision_key = Some(decision_key);
                self.transition(&key, StepPhase::Waiting, message);
                self.check_waiting(&key, &step);
            }
            Event::Failed { message, retryable, info, .. } => {
                record_info(self.row(&key), &info);
                self.fail_attempt(&key, &step, message, retryable);
            }
            Event::Lost { .. } => {
                let now = self.now();
                let row = self.row(&key);
                row.attempts = row.attempts.saturating_sub(1);
                row.phase = StepPhase::Retrying;
                row.retry_at = Some(MicroTime(now));
                row.message = "in-process work was interrupted; running the attempt again".into();
            }
        }
    }

    pub(super) fn fail_attempt(&mut self, key: &str, step: &Step, message: String, retryable: bool) {
        let policy = self.retry_policy(step);
        let attempts = self.row(key).attempts;
        if retryable && attempts <= policy.limit {
            let delay = backoff_delay(policy.backoff.as_ref(), attempts);
            let at = self.now() + delay;
            let msg = format!("attempt {attempts} failed: {message}; retrying in {:.1}s", delay.as_secs_f64());
            self.row(key).retry_at = Some(MicroTime(at));
            self.transition(key, StepPhase::Retrying, msg);
            self.requeue(delay);
        } else {
            let msg = if attempts > 1 { format!("failed after {attempts} attempts: {message}") } else { message };
            self.transition(key, StepPhase::Failed, msg);
        }
    }
}

fn record_info(row: &mut StepStatus, info: &TaskInfo) {
    if info.agent.is_some() {
        row.agent = info.agent.clone();
    }
    if info.replica.is_some() {
        row.replica = info.replica.clone();
    }
    // Every attempt's calls were made and paid for: their tokens and cost add up. A cache hit
    // shows what the stored call used (the run's usage leaves it out).
    match (info.tokens, info.cached) {
        (Some(t), true) => row.tokens = Some(t),
        (Some(t), false) => {
            let before = row.tokens.filter(|_| !row.cached).unwrap_or_default();
            row.tokens = Some(TokenUsage {
                prompt: before.prompt.saturating_add(t.prompt),
                completion: before.completion.saturating_add(t.completion),
                cost: before.cost + t.cost,
            });
        }
        (None, _) => {}
    }
    row.fallback = info.fallback.as_deref().cloned();
    row.cached = info.cached;
    if info.transcript.is_some() {
        row.transcript = info.transcript.clone();
    }
}
