//! Scheduling one step: its templates' context, its fan-out children, timeouts, retries and
//! starting an attempt.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use serde_json::Value as Json;

use crate::api::{RunPhase, Step, StepPhase, StepStatus};

use super::render::render_work;
use super::{Action, Pass, TaskStart, Work, child_key, duration_until, view};
use crate::engine::dag::step_at;
use crate::engine::template::{self, Context};

impl Pass<'_, '_> {
    /// What the templates of step `i` see. Only the steps they read are copied in (templates
    /// see no others anyway), so that a pass stays linear in the number of steps.
    pub(super) fn context(&self, i: usize, finally_outcome: Option<RunPhase>, item: Option<(usize, Json)>) -> Context {
        let mut ctx = Context { params: self.input.params.clone(), item, ..Default::default() };
        if let Some(scope) = self.input.scope {
            ctx.steps = scope.steps.clone();
            ctx.loop_ = Some(scope.loop_vars.clone());
        }
        for &j in self.input.dag.reads(i) {
            let id = self.input.dag.id(j);
            if let Some(row) = self.status.steps.get(id) {
                ctx.steps.insert(id.to_string(), view(row));
            }
        }
        self.set_run_vars(&mut ctx, finally_outcome.unwrap_or(RunPhase::Running));
        ctx
    }

    pub(super) fn schedule_step(&mut self, i: usize, finally_outcome: Option<RunPhase>) {
        let dag = self.input.dag;
        let id = dag.id(i).to_string();
        let step = step_at(self.input.spec, i).clone();
        let phase = self.phase_of(i);
        let blocked =
            (self.input.suspend && !self.input.cancel) || (finally_outcome.is_none() && self.stop_reason().is_some());
        match phase {
            StepPhase::Pending => {
                if !dag.deps(i).iter().all(|&d| self.phase_of(d).is_finished()) {
                    return;
                }
                if let Some(&bad) = dag.deps(i).iter().find(|&&d| !self.dep_ok(d)) {
                    let msg =
                        format!("not run: dependency {:?} {}", dag.id(bad), self.phase_of(bad).as_str().to_lowercase());
                    self.transition(&id, StepPhase::Skipped, msg);
                    return;
                }
                if finally_outcome.is_none()
                    && let Some(f) = self.hard_failure
                {
                    let msg = format!("not run: the run is failing (step {:?} failed)", dag.id(f));
                    self.transition(&id, StepPhase::Skipped, msg);
                    return;
                }
                if blocked {
                    return;
                }
                let ctx = self.context(i, finally_outcome, None);
                if let Some(when) = &step.when {
                    match template::eval_condition(when, &ctx) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.transition(&id, StepPhase::Skipped, format!("when {when:?} was false"));
                            return;
                        }
                        Err(e) => {
                            self.transition(&id, StepPhase::Failed, format!("when: {e}"));
                            return;
                        }
                    }
                }
                if let Some(for_each) = &step.for_each {
                    match template::eval_list(for_each, &ctx, self.input.settings.max_for_each_items) {
                        Ok(items) => {
                            let now = self.now();
                            let n = items.len();
                            let row = self.row(&id);
                            row.items = Some(n as u32);
                            row.started_at = Some(MicroTime(now));
                            for c in 0..n {
                                self.status.steps.insert(child_key(&id, c), StepStatus::default());
                            }
                            self.transition(&id, StepPhase::Running, format!("fan-out over {n} items"));
                            self.schedule_children(i, &step, items, finally_outcome, false);
                        }
                        Err(e) => self.transition(&id, StepPhase::Failed, format!("forEach: {e}")),
                    }
                } else {
                    self.start(&id, &step, None, ctx, finally_outcome);
                }
            }
            StepPhase::Running if self.status.steps.get(&id).and_then(|r| r.items).is_some() => {
                // Even when blocked: running children still time out and the step settles.
                let ctx = self.context(i, finally_outcome, None);
                match step
                    .for_each
                    .as_deref()
                    .map(|f| template::eval_list(f, &ctx, self.input.settings.max_for_each_items))
                {
                    Some(Ok(items)) => self.schedule_children(i, &step, items, finally_outcome, blocked),
                    Some(Err(e)) => self.fail_fan_out(&id, format!("forEach: {e}")),
                    None => {}
                }
            }
            StepPhase::Running if step.loop_.is_some() => self.drive_loop(i, &step, None),
            StepPhase::Running => self.check_timeout(&id, &step),
            StepPhase::Waiting => self.check_waiting(&id, &step),
            StepPhase::Retrying if !blocked => {
                self.retry_if_due(&id, &step, None, finally_outcome);
            }
            _ => {}
        }
    }

    /// Times out, starts and retries the children of a fan-out (starting none when `blocked`),
    /// and settles the step when they have all finished.
    fn schedule_children(
        &mut self,
        i: usize,
        step: &Step,
        items: Vec<Json>,
        finally_outcome: Option<RunPhase>,
        blocked: bool,
    ) {
        let id = self.input.dag.id(i).to_string();
        let n = self.status.steps.get(&id).and_then(|r| r.items).unwrap_or(0) as usize;
        if items.len() != n {
            self.fail_fan_out(&id, format!("forEach list changed from {n} to {} items", items.len()));
            return;
        }
        let child_phase =
            |s: &Self, c: usize| s.status.steps.get(&child_key(&id, c)).map(|r| r.phase).unwrap_or_default();
        // Timeouts first, so that the slots they free are used in this same pass.
        for c in 0..n {
            match child_phase(self, c) {
                StepPhase::Running => self.check_timeout(&child_key(&id, c), step),
                // An item waiting for the decision on a tool call.
                StepPhase::Waiting => self.check_waiting(&child_key(&id, c), step),
                _ => {}
            }
        }
        let max_parallel = step.max_parallel.map_or(usize::MAX, |m| m as usize);
        let mut running = (0..n).filter(|&c| child_phase(self, c) == StepPhase::Running).count();
        for (c, item) in items.into_iter().enumerate() {
            let key = child_key(&id, c);
            match child_phase(self, c) {
                StepPhase::Pending if !blocked && running < max_parallel => {
                    let ctx = self.context(i, finally_outcome, Some((c, item)));
                    self.start(&key, step, Some(c), ctx, finally_outcome);
                    if self.status.steps.get(&key).is_some_and(|r| r.phase == StepPhase::Running) {
                        running += 1;
                    }
                }
                StepPhase::Retrying if !blocked && running < max_parallel => {
                    running += usize::from(self.retry_if_due(&key, step, Some((c, item)), finally_outcome));
                }
                _ => {}
            }
        }
        // All children settled: settle the parent.
        let rows: Vec<&StepStatus> = (0..n).filter_map(|c| self.status.steps.get(&child_key(&id, c))).collect();
        if rows.len() == n && rows.iter().all(|r| r.phase.is_finished()) {
            let failed: Vec<usize> = (0..n).filter(|&c| rows[c].phase == StepPhase::Failed).collect();
            let outputs: Vec<Json> =
                rows.iter().map(|r| r.output.clone().map(Json::String).unwrap_or(Json::Null)).collect();
            let cached = !rows.is_empty() && rows.iter().all(|r| r.cached);
            let output = serde_json::to_string(&outputs).unwrap_or_else(|_| "[]".into());
            let first_err = failed.first().map(|&c| rows[c].message.clone());
            let row = self.row(&id);
            row.output = Some(output);
            row.cached = cached;
            match first_err {
                None => self.transition(&id, StepPhase::Succeeded, ""),
                Some(msg) => {
                    let m = format!("{} of {n} items failed; {}: {msg}", failed.len(), child_key(&id, failed[0]));
                    self.transition(&id, StepPhase::Failed, m)
                }
            }
        }
    }

    /// Starts the next attempt when its backoff has passed; true when it started.
    fn retry_if_due(
        &mut self,
        key: &str,
        step: &Step,
        item: Option<(usize, Json)>,
        finally_outcome: Option<RunPhase>,
    ) -> bool {
        let due = self.status.steps.get(key).and_then(|r| r.retry_at.clone()).map(|t| t.0).unwrap_or(self.now());
        if due > self.now() {
            self.requeue(duration_until(self.now(), due));
            return false;
        }
        let index = item.as_ref().map(|(c, _)| *c);
        let Some(i) = self.input.dag.index_of(&step.id) else { return false };
        let ctx = self.context(i, finally_outcome, item);
        self.start(key, step, index, ctx, finally_outcome);
        self.status.steps.get(key).is_some_and(|r| r.phase == StepPhase::Running)
    }

    fn check_timeout(&mut self, key: &str, step: &Step) {
        let Some(timeout) = self.timeout(step) else { return };
        let Some(started) = self.status.steps.get(key).and_then(|r| r.started_at.clone()) else { return };
        let due = started.0 + timeout;
        if self.now() >= due {
            let attempt = self.status.steps.get(key).map(|r| r.attempts).unwrap_or(0);
            let reason = format!("timed out after {}s", timeout.as_secs());
            self.decision.actions.push(Action::Abort {
                key: key.into(),
                attempt,
                step_id: step.id.clone(),
                reason: reason.clone(),
            });
            self.fail_attempt(key, step, reason, true);
        } else {
            self.requeue(duration_until(self.now(), due));
        }
    }

    /// Renders and starts an attempt; template steps finish on the spot.
    fn start(&mut self, key: &str, step: &Step, index: Option<usize>, ctx: Context, _finally: Option<RunPhase>) {
        let now = self.now();
        let attempt = {
            let row = self.row(key);
            row.attempts += 1;
            row.started_at = Some(MicroTime(now));
            row.finished_at = None;
            row.retry_at = None;
            row.attempts
        };
        if let Some(a) = &step.approval {
            let message = match a.message.as_deref().map(|m| template::render(m, &ctx)).transpose() {
                Ok(m) => m.unwrap_or_else(|| format!("waiting for a decision on {key}")),
                Err(e) => return self.transition(key, StepPhase::Failed, format!("approval.message: {e}")),
            };
            let due = a.timeout_seconds.map(|s| MicroTime(now + Duration::from_secs(u64::from(s))));
            self.row(key).due_at = due;
            self.transition(key, StepPhase::Waiting, message);
            return self.check_waiting(key, step);
        }
        if let Some(w) = &step.wait {
            let due = match (w.seconds, &w.until) {
                (Some(s), _) => Ok(now + Duration::from_secs(u64::from(s))),
                (None, Some(u)) => template::render(u, &ctx).map_err(|e| format!("wait.until: {e}")).and_then(|t| {
                    t.trim().parse::<Timestamp>().map_err(|e| format!("wait.until: {t:?} is not an RFC 3339 time: {e}"))
                }),
                (None, None) => Err("wait: set seconds or until".to_string()),
            };
            match due {
                Ok(due) => {
                    self.row(key).due_at = Some(MicroTime(due));
                    self.transition(key, StepPhase::Waiting, format!("waiting until {due}"));
                    self.check_waiting(key, step);
                }
                Err(m) => self.transition(key, StepPhase::Failed, m),
            }
            return;
        }
        if step.loop_.is_some() {
            let Some(i) = self.input.dag.index_of(key) else { return };
            self.row(key).iterations = Some(1);
            self.transition(key, StepPhase::Running, "iteration 1");
            return self.drive_loop(i, step, None);
        }
        if let Some(w) = &step.workflow
            && let Some(why) = self.input.run.refuse_child(&w.ref_)
        {
            return self.transition(key, StepPhase::Failed, format!("workflow.ref: {why}"));
        }
        let mut work = match render_work(step, &ctx) {
            Ok(Some(work)) => work,
            Ok(None) => {
                // A template step: its rendering is its work.
                let text = step.template.as_deref().map(|t| template::render(t, &ctx));
                match text {
                    Some(Ok(text)) => {
                        let row = self.row(key);
                        row.output = Some(text);
                        row.phase = StepPhase::Running;
                        self.transition(key, StepPhase::Succeeded, "");
                    }
                    Some(Err(e)) => self.transition(key, StepPhase::Failed, format!("template: {e}")),
                    None => self.transition(key, StepPhase::Failed, "step has no kind"),
                }
                return;
            }
            Err((field, e)) => {
                self.transition(key, StepPhase::Failed, format!("{field}: {e}"));
                return;
            }
        };
        // Decisions on the step's tool calls (`<decision key>/<tool>`).
        if let Work::Agent { llm, .. } = &mut work
            && !llm.tools.is_empty()
        {
            let prefix = format!("{}/", self.decision_key(key));
            llm.decisions = self
                .input
                .decisions
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, d)| (k[prefix.len()..].to_string(), d.clone()))
                .collect();
        }
        let msg = if attempt > 1 { format!("attempt {attempt}") } else { String::new() };
        self.transition(key, StepPhase::Running, msg);
        let timeout = self.timeout(step);
        if let Some(t) = timeout {
            self.requeue(t);
        }
        self.decision.actions.push(Action::Start(TaskStart {
            key: key.to_string(),
            step_id: step.id.clone(),
            index,
            attempt,
            work,
            timeout,
            cache: step.cache.clone().filter(|c| c.enabled),
        }));
    }
}
