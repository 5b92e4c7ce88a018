//! Waiting steps: approvals, waits and agent steps waiting for the decision on a tool call.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::api::{DecisionKind, OnTimeout, Step, StepPhase};

use super::{Pass, decision_for, duration_until};

impl Pass<'_, '_> {
    /// The key of a status row as `spec.decisions` names it (with the loop prefix).
    pub(super) fn decision_key(&self, key: &str) -> String {
        match self.input.scope {
            Some(scope) => format!("{}{key}", scope.prefix),
            None => key.to_string(),
        }
    }

    /// Settles a waiting step whose decision came or whose time passed; otherwise asks to
    /// come back when its time comes (a decision wakes the run by changing it).
    pub(super) fn check_waiting(&mut self, key: &str, step: &Step) {
        let now = self.now();
        // An agent step waiting for the decision on a tool call: the decision starts it over.
        if let Some(dk) = self.status.steps.get(key).and_then(|r| r.decision_key.clone()) {
            if let Some(d) = decision_for(self.input.decisions, &dk) {
                let verb = if d.decision == DecisionKind::Approve { "approved" } else { "rejected" };
                let by = d.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
                let row = self.row(key);
                row.decision_key = None;
                row.retry_at = Some(MicroTime(now));
                self.transition(key, StepPhase::Retrying, format!("{dk} {verb}{by}; the step starts over"));
                self.requeue(Duration::ZERO);
            }
            return;
        }
        let due = self.status.steps.get(key).and_then(|r| r.due_at.clone()).map(|t| t.0);
        if step.approval.is_some()
            && let Some(d) = decision_for(self.input.decisions, &self.decision_key(key))
        {
            let by = d.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
            let comment = d.comment.clone().unwrap_or_default();
            match d.decision {
                DecisionKind::Approve => {
                    self.row(key).output = Some(comment);
                    self.transition(key, StepPhase::Succeeded, format!("approved{by}"));
                }
                DecisionKind::Reject => {
                    let why = if comment.is_empty() { String::new() } else { format!(": {comment}") };
                    self.transition(key, StepPhase::Failed, format!("rejected{by}{why}"));
                }
            }
            return;
        }
        let Some(due) = due else { return };
        if now < due {
            self.requeue(duration_until(now, due));
            return;
        }
        match step.approval.as_ref().map(|a| a.on_timeout) {
            Some(OnTimeout::Approve) => {
                self.row(key).output = Some(String::new());
                self.transition(key, StepPhase::Succeeded, "no decision in time: approved (onTimeout: approve)");
            }
            Some(OnTimeout::Reject) => {
                self.transition(key, StepPhase::Failed, "no decision in time: rejected (onTimeout: reject)")
            }
            None => {
                self.row(key).output = Some(due.to_string());
                self.transition(key, StepPhase::Succeeded, "");
            }
        }
    }
}
