//! Loop steps: each iteration runs as a small run of the loop's steps, until `until` holds.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{OnMax, RunPhase, Step, StepPhase, WorkflowRunStatus};
use crate::naming;

use super::{Action, Input, Pass, Scope, Transition, advance, view};
use crate::engine::template::{self, StepView};

impl Pass<'_, '_> {
    /// What templates see of the steps of one loop iteration (by inner id).
    fn iteration_views(&self, prefix: &str) -> BTreeMap<String, StepView> {
        self.status
            .steps
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('['))
            .map(|(k, r)| (k[prefix.len()..].to_string(), view(r)))
            .collect()
    }

    /// Runs loop step `i`: passes over its current iteration as a small run of the loop's
    /// steps (their rows keyed `loop.iteration.id`), then evaluates `until` and starts the
    /// next iteration, or settles the loop. With `stop`, stops the iteration and cancels it.
    pub(super) fn drive_loop(&mut self, i: usize, step: &Step, stop: Option<&str>) {
        let id = self.input.dag.id(i).to_string();
        let (Some(body), Some(l)) = (self.input.dag.body(i), step.loop_.as_ref()) else {
            return self.transition(&id, StepPhase::Failed, "loop: no steps");
        };
        let mut events = self.loop_events.remove(&id).unwrap_or_default();
        loop {
            let n = self.status.steps.get(&id).and_then(|r| r.iterations).unwrap_or(1);
            let prefix = naming::loop_prefix(&id, n);
            let outer = self.context(i, None, None);
            let previous = (n > 1).then(|| {
                let views = self.iteration_views(&naming::loop_prefix(&id, n - 1));
                serde_json::json!({"steps": template::steps_value(&views)})
            });
            let scope = Scope {
                steps: outer.steps.clone(),
                loop_vars: serde_json::json!({"iteration": n, "previous": previous}),
                prefix: prefix.clone(),
            };
            let mut sub = WorkflowRunStatus {
                phase: RunPhase::Running,
                started_at: self.status.steps.get(&id).and_then(|r| r.started_at.clone()).map(|t| Time(t.0)),
                ..Default::default()
            };
            sub.steps = self
                .status
                .steps
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, r)| (k[prefix.len()..].to_string(), r.clone()))
                .collect();
            let input = Input {
                spec: &body.spec,
                dag: &body.dag,
                cancel: self.input.cancel || stop.is_some(),
                scope: Some(&scope),
                ..self.input
            };
            let d = advance(input, &mut sub, std::mem::take(&mut events));
            for (k, r) in std::mem::take(&mut sub.steps) {
                self.status.steps.insert(format!("{prefix}{k}"), r);
            }
            for a in d.actions {
                self.decision.actions.push(match a {
                    Action::Start(mut t) => {
                        t.key = format!("{prefix}{}", t.key);
                        Action::Start(t)
                    }
                    Action::Abort { key, attempt, step_id, reason } => {
                        Action::Abort { key: format!("{prefix}{key}"), attempt, step_id, reason }
                    }
                });
            }
            for t in d.transitions {
                if let Some(k) = t.key {
                    self.decision.transitions.push(Transition { key: Some(format!("{prefix}{k}")), ..t });
                }
            }
            if let Some(r) = d.requeue_after {
                self.requeue(r);
            }
            match sub.phase {
                RunPhase::Succeeded => {
                    let mut ctx = outer;
                    ctx.steps.extend(self.iteration_views(&prefix));
                    ctx.loop_ = Some(scope.loop_vars.clone());
                    let output = || {
                        body.spec
                            .steps
                            .iter()
                            .rev()
                            .find_map(|s| self.status.steps.get(&format!("{prefix}{}", s.id))?.output.clone())
                    };
                    match template::eval_condition(&l.until, &ctx) {
                        Ok(true) => {
                            self.row(&id).output = output();
                            let m = format!("until held after {n} iteration{}", if n == 1 { "" } else { "s" });
                            self.transition(&id, StepPhase::Succeeded, m);
                        }
                        Ok(false) if n >= l.max_iterations => {
                            let m = format!("until did not hold in {n} iterations (maxIterations)");
                            if l.on_max == OnMax::Succeed {
                                self.row(&id).output = output();
                                self.transition(&id, StepPhase::Succeeded, m);
                            } else {
                                self.transition(&id, StepPhase::Failed, m);
                            }
                        }
                        Ok(false) => {
                            let row = self.row(&id);
                            row.iterations = Some(n + 1);
                            row.message = format!("iteration {}", n + 1);
                            continue;
                        }
                        Err(e) => self.transition(&id, StepPhase::Failed, format!("loop.until: {e}")),
                    }
                }
                RunPhase::Failed => self.transition(&id, StepPhase::Failed, format!("iteration {n}: {}", sub.message)),
                RunPhase::Cancelled => {
                    self.transition(&id, StepPhase::Cancelled, stop.map_or(sub.message.clone(), str::to_string))
                }
                _ => {}
            }
            return;
        }
    }
}
