//! Tests of the scheduler, driven by a small simulated executor: a fake clock, a script of
//! outcomes per step, and a loop that feeds results back into [`advance`].
//!
//! The driver checks invariants on every pass (see [`Harness::check`]): no attempt is started
//! twice, a step starts only after its dependencies finished, retries wait for `retryAt`,
//! forEach children respect `maxParallel`, and advancing again at the same time with no new
//! events changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;
use serde_json::Value as Json;

use super::dag::{Dag, step_at, validate};
use super::scheduler::{
    Action, Decision, Event, Input, RunInfo, Settings, TaskInfo, TaskStart, Transition, Work, advance, backoff_delay,
    child_key,
};
use crate::api::{
    AgentStep, Backoff, HttpStep, ParamSpec, RetryPolicy, RunPhase, Step, StepDefaults, StepPhase, WorkflowRunStatus,
    WorkflowSpec,
};

// ---- building specs ----

fn tmpl(id: &str, deps: &[&str], text: &str) -> Step {
    Step {
        id: id.into(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        template: Some(text.into()),
        ..Default::default()
    }
}

fn http(id: &str, deps: &[&str]) -> Step {
    Step {
        id: id.into(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        http: Some(HttpStep { url: format!("https://example.com/{id}"), ..Default::default() }),
        ..Default::default()
    }
}

fn with(mut step: Step, f: impl FnOnce(&mut Step)) -> Step {
    f(&mut step);
    step
}

fn retry(limit: u32, initial: f64, factor: f64, max: f64) -> Option<RetryPolicy> {
    Some(RetryPolicy { limit, backoff: Some(Backoff { initial_seconds: initial, factor, max_seconds: max }) })
}

fn spec(steps: Vec<Step>) -> WorkflowSpec {
    WorkflowSpec { steps, ..Default::default() }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---- the driver ----

/// What an attempt of a task does when the driver "executes" it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Ok(String),
    /// A retryable failure.
    Fail(String),
    /// A failure that must not be retried.
    Fatal(String),
    /// Never finishes (until aborted).
    Hang,
    /// The in-process work is lost: the driver reports `Event::Lost`.
    Lose,
}

#[derive(Debug, Clone)]
struct InFlight {
    key: String,
    attempt: u32,
    done_at: Option<Timestamp>,
    outcome: Outcome,
}

#[derive(Debug, Clone)]
struct Started {
    at: Duration,
    task: TaskStart,
}

#[derive(Debug, Clone)]
struct Aborted {
    at: Duration,
    key: String,
    attempt: u32,
    reason: String,
}

struct Harness {
    spec: WorkflowSpec,
    dag: Dag,
    run: RunInfo,
    params: BTreeMap<String, Json>,
    settings: Settings,
    status: WorkflowRunStatus,
    t0: Timestamp,
    now: Timestamp,
    suspend: bool,
    cancel: bool,
    deadline: Option<Timestamp>,
    decisions: BTreeMap<String, crate::api::StepDecision>,
    /// Outcomes by status key, or by step id for every key of the step; the nth start of a key
    /// takes the nth outcome (the last one repeats). Default: `Ok("out:<key>")`.
    scripts: BTreeMap<String, Vec<Outcome>>,
    /// How long a task takes, by key or step id.
    delays: BTreeMap<String, Duration>,
    default_delay: Duration,
    in_flight: Vec<InFlight>,
    starts_of_key: BTreeMap<String, usize>,
    starts: Vec<Started>,
    aborts: Vec<Aborted>,
    transitions: Vec<(Duration, Transition)>,
    /// (key, attempt) started so far.
    started: BTreeSet<(String, u32)>,
    /// (key, attempt) reported lost, which may be started again.
    lost: BTreeSet<(String, u32)>,
    /// retryAt of Retrying rows as of the last pass.
    retry_at: BTreeMap<String, Timestamp>,
    /// Most forEach children seen Running at once, by step id.
    max_children_running: BTreeMap<String, usize>,
    passes: usize,
    check_idempotence: bool,
}

impl Harness {
    fn new(spec: WorkflowSpec) -> Self {
        let dag = validate(&spec).unwrap_or_else(|e| panic!("invalid spec: {e}"));
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        Self {
            spec,
            dag,
            run: RunInfo { name: "run-1".into(), namespace: "ns".into(), uid: "uid-1".into(), ..Default::default() },
            params: BTreeMap::new(),
            settings: Settings::default(),
            status: WorkflowRunStatus::default(),
            t0,
            now: t0,
            suspend: false,
            cancel: false,
            decisions: BTreeMap::new(),
            deadline: None,
            scripts: BTreeMap::new(),
            delays: BTreeMap::new(),
            default_delay: secs(1),
            in_flight: Vec::new(),
            starts_of_key: BTreeMap::new(),
            starts: Vec::new(),
            aborts: Vec::new(),
            transitions: Vec::new(),
            started: BTreeSet::new(),
            lost: BTreeSet::new(),
            retry_at: BTreeMap::new(),
            max_children_running: BTreeMap::new(),
            passes: 0,
            check_idempotence: true,
        }
    }

    fn script(mut self, key: &str, outcomes: Vec<Outcome>) -> Self {
        self.scripts.insert(key.into(), outcomes);
        self
    }

    fn delay(mut self, key: &str, d: Duration) -> Self {
        self.delays.insert(key.into(), d);
        self
    }

    /// Time since the start of the test.
    fn elapsed(&self) -> Duration {
        Duration::from_millis((self.now.as_millisecond() - self.t0.as_millisecond()) as u64)
    }

    fn set_time(&mut self, since_t0: Duration) {
        self.now = self.t0 + since_t0;
    }

    fn row(&self, key: &str) -> &crate::api::StepStatus {
        self.status.steps.get(key).unwrap_or_else(|| panic!("no row {key:?} in {:#?}", self.status.steps))
    }

    fn phase(&self, key: &str) -> StepPhase {
        self.status.steps.get(key).map(|r| r.phase).unwrap_or_default()
    }

    fn output(&self, key: &str) -> String {
        self.row(key).output.clone().unwrap_or_else(|| panic!("{key:?} has no output"))
    }

    /// Starts of a key as (attempt, seconds since t0).
    fn starts_of(&self, key: &str) -> Vec<(u32, f64)> {
        self.starts.iter().filter(|s| s.task.key == key).map(|s| (s.task.attempt, s.at.as_secs_f64())).collect()
    }

    fn start_of(&self, key: &str) -> &TaskStart {
        &self.starts.iter().find(|s| s.task.key == key).unwrap_or_else(|| panic!("{key:?} never started")).task
    }

    fn input(&self) -> Input<'_> {
        Input {
            spec: &self.spec,
            dag: &self.dag,
            run: &self.run,
            params: &self.params,
            now: self.now,
            suspend: self.suspend,
            cancel: self.cancel,
            deadline: self.deadline,
            settings: &self.settings,
            decisions: &self.decisions,
            scope: None,
        }
    }

    /// One call of [`advance`], with its actions carried out and invariants checked.
    fn advance(&mut self, events: Vec<Event>) -> Decision {
        let mut status = std::mem::take(&mut self.status);
        let d = advance(self.input(), &mut status, events);
        self.status = status;
        self.passes += 1;
        self.check(&d);
        self.execute(&d);
        if self.check_idempotence {
            self.check_idempotent(&d);
        }
        d
    }

    /// Calling again at the same time with no events must change nothing (unless the last
    /// pass asked to be called again at once).
    fn check_idempotent(&mut self, first: &Decision) {
        if first.requeue_after == Some(Duration::ZERO) {
            return;
        }
        let before = self.status.clone();
        let mut status = self.status.clone();
        let again = advance(self.input(), &mut status, vec![]);
        assert!(again.actions.is_empty(), "second pass at {:?} acted: {:#?}", self.elapsed(), again.actions);
        assert!(again.transitions.is_empty(), "second pass at {:?} moved: {:#?}", self.elapsed(), again.transitions);
        assert_eq!(status, before, "second pass at {:?} changed the status", self.elapsed());
    }

    fn check(&mut self, d: &Decision) {
        let at = self.elapsed();
        for action in &d.actions {
            match action {
                Action::Start(t) => {
                    let id = (t.key.clone(), t.attempt);
                    assert!(
                        !self.started.contains(&id) || self.lost.remove(&id),
                        "{:?} attempt {} started twice (at {at:?})",
                        t.key,
                        t.attempt
                    );
                    self.started.insert(id);
                    let row = self.row(&t.key);
                    assert_eq!(row.phase, StepPhase::Running, "{:?} started but not Running", t.key);
                    assert_eq!(row.attempts, t.attempt, "{:?}: attempt number", t.key);
                    if let Some(due) = self.retry_at.get(&t.key) {
                        assert!(
                            self.now >= *due,
                            "{:?} attempt {} started at {} before its retryAt {due}",
                            t.key,
                            t.attempt,
                            self.now
                        );
                    }
                    if crate::naming::parse_loop_key(&t.key).is_some() {
                        // Inside a loop: the loop's own pass checked its steps' order.
                        continue;
                    }
                    let i = self.dag.index_of(&t.step_id).expect("start of an unknown step");
                    for &dep in self.dag.deps(i) {
                        let p = self.phase(self.dag.id(dep));
                        assert!(
                            p.is_finished(),
                            "{:?} started while its dependency {:?} is {p:?}",
                            t.key,
                            self.dag.id(dep)
                        );
                    }
                    if self.dag.is_finally(i) {
                        for j in self.dag.dag_steps() {
                            assert!(
                                self.phase(self.dag.id(j)).is_finished(),
                                "finally {:?} started before the DAG ended",
                                t.key
                            );
                        }
                    }
                    match t.index {
                        Some(c) => {
                            assert_eq!(t.key, child_key(&t.step_id, c));
                            let parent = self.row(&t.step_id);
                            assert_eq!(parent.phase, StepPhase::Running, "child {:?} of a parent not Running", t.key);
                            assert!(c < parent.items.unwrap_or(0) as usize);
                        }
                        None => assert_eq!(t.key, t.step_id),
                    }
                }
                Action::Abort { key, attempt, .. } => {
                    assert!(
                        self.started.contains(&(key.clone(), *attempt)),
                        "abort of {key:?} attempt {attempt}, never started"
                    );
                    let row = self.row(key);
                    assert!(
                        row.phase != StepPhase::Running || row.attempts != *attempt,
                        "{key:?} attempt {attempt} aborted but still Running"
                    );
                }
            }
        }
        // forEach children never exceed maxParallel.
        for i in 0..self.dag.len() {
            let step = step_at(&self.spec, i);
            let Some(n) = self.status.steps.get(&step.id).and_then(|r| r.items) else { continue };
            let running =
                (0..n as usize).filter(|&c| self.phase(&child_key(&step.id, c)) == StepPhase::Running).count();
            if let Some(max) = step.max_parallel {
                assert!(running <= max as usize, "{}: {running} children running, maxParallel {max}", step.id);
            }
            let m = self.max_children_running.entry(step.id.clone()).or_default();
            *m = (*m).max(running);
        }
        // Progress is finished/total over the steps (not the forEach children).
        let done = (0..self.dag.len()).filter(|&i| self.phase(self.dag.id(i)).is_finished()).count();
        assert_eq!(self.status.progress, format!("{done}/{}", self.dag.len()));
        self.retry_at = self
            .status
            .steps
            .iter()
            .filter(|(_, r)| r.phase == StepPhase::Retrying)
            .filter_map(|(k, r)| r.retry_at.as_ref().map(|t| (k.clone(), t.0)))
            .collect();
        for t in &d.transitions {
            self.transitions.push((at, t.clone()));
        }
    }

    fn execute(&mut self, d: &Decision) {
        let at = self.elapsed();
        for action in &d.actions {
            match action {
                Action::Start(t) => {
                    let n = self.starts_of_key.entry(t.key.clone()).or_default();
                    let outcome = self
                        .scripts
                        .get(&t.key)
                        .or_else(|| self.scripts.get(&t.step_id))
                        .map(|s| s[(*n).min(s.len() - 1)].clone())
                        .unwrap_or_else(|| Outcome::Ok(format!("out:{}", t.key)));
                    *n += 1;
                    let delay = self
                        .delays
                        .get(&t.key)
                        .or_else(|| self.delays.get(&t.step_id))
                        .copied()
                        .unwrap_or(self.default_delay);
                    let done_at = (outcome != Outcome::Hang).then(|| self.now + delay);
                    self.in_flight.push(InFlight { key: t.key.clone(), attempt: t.attempt, done_at, outcome });
                    self.starts.push(Started { at, task: t.clone() });
                }
                Action::Abort { key, attempt, reason, .. } => {
                    self.in_flight.retain(|f| !(f.key == *key && f.attempt == *attempt));
                    self.aborts.push(Aborted { at, key: key.clone(), attempt: *attempt, reason: reason.clone() });
                }
            }
        }
        // Every Running row (other than forEach parents) has its task in flight.
        let in_flight: BTreeSet<(&str, u32)> = self.in_flight.iter().map(|f| (f.key.as_str(), f.attempt)).collect();
        for (key, row) in &self.status.steps {
            if row.phase == StepPhase::Running && row.items.is_none() && row.iterations.is_none() {
                assert!(
                    in_flight.contains(&(key.as_str(), row.attempts)),
                    "{key:?} is Running attempt {} but nothing runs it",
                    row.attempts
                );
            }
        }
    }

    fn has_due(&self) -> bool {
        self.in_flight.iter().any(|f| f.done_at.is_some_and(|t| t <= self.now))
    }

    /// Results of the tasks done by now, in the order they finished.
    fn take_due(&mut self) -> Vec<Event> {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        self.in_flight.retain(|f| {
            if f.done_at.is_some_and(|t| t <= now) {
                due.push(f.clone());
                false
            } else {
                true
            }
        });
        due.sort_by_key(|f| f.done_at);
        due.into_iter()
            .map(|f| {
                let (key, attempt) = (f.key, f.attempt);
                match f.outcome {
                    Outcome::Ok(output) => Event::Succeeded { key, attempt, output, info: TaskInfo::default() },
                    Outcome::Fail(message) => {
                        Event::Failed { key, attempt, message, retryable: true, info: TaskInfo::default() }
                    }
                    Outcome::Fatal(message) => {
                        Event::Failed { key, attempt, message, retryable: false, info: TaskInfo::default() }
                    }
                    Outcome::Lose => {
                        self.lost.insert((key.clone(), attempt));
                        Event::Lost { key, attempt }
                    }
                    Outcome::Hang => unreachable!(),
                }
            })
            .collect()
    }

    /// Feeds what finished, advances, then moves the clock to the next completion or requeue.
    fn tick(&mut self) -> Decision {
        let d = self.pass();
        self.move_clock(&d);
        d
    }

    /// Feeds what finished and advances, at the current time.
    fn pass(&mut self) -> Decision {
        let events = self.take_due();
        self.advance(events)
    }

    /// Moves the clock to the next completion or requeue, unless something is due now.
    fn move_clock(&mut self, d: &Decision) {
        if self.status.phase.is_finished() || self.has_due() {
            return;
        }
        let next_done = self.in_flight.iter().filter_map(|f| f.done_at).min();
        let next_requeue = d.requeue_after.map(|r| self.now + r);
        let next = match (next_done, next_requeue) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(t) = next
            && t > self.now
        {
            self.now = t;
        }
    }

    /// Ticks until the run finishes; panics if it does not within `max_passes`.
    fn run(&mut self) -> &mut Self {
        self.run_bounded(10_000)
    }

    fn run_bounded(&mut self, max_passes: usize) -> &mut Self {
        for _ in 0..max_passes {
            if self.status.phase.is_finished() {
                return self;
            }
            self.tick();
        }
        panic!("the run did not finish in {max_passes} passes: {:#?}", self.status);
    }

    /// Ticks until `cond` holds (or panics after many passes).
    fn run_until(&mut self, cond: impl Fn(&Self) -> bool) -> &mut Self {
        for _ in 0..10_000 {
            if cond(self) {
                return self;
            }
            assert!(!self.status.phase.is_finished(), "the run finished first: {:#?}", self.status);
            self.tick();
        }
        panic!("condition never held: {:#?}", self.status);
    }

    fn step_transitions(&self, key: &str) -> Vec<(String, u32)> {
        self.transitions
            .iter()
            .filter(|(_, t)| t.key.as_deref() == Some(key))
            .map(|(_, t)| (t.phase.to_string(), t.attempt))
            .collect()
    }

    fn run_transitions(&self) -> Vec<String> {
        self.transitions.iter().filter(|(_, t)| t.key.is_none()).map(|(_, t)| t.phase.to_string()).collect()
    }
}

fn http_body(t: &TaskStart) -> Option<String> {
    match &t.work {
        Work::Http { body, .. } => body.clone(),
        other => panic!("not http: {other:?}"),
    }
}

fn http_url(t: &TaskStart) -> String {
    match &t.work {
        Work::Http { url, .. } => url.clone(),
        other => panic!("not http: {other:?}"),
    }
}

// ---- basics ----

#[test]
fn backoff_grows_and_is_capped() {
    let b = Backoff { initial_seconds: 2.0, factor: 3.0, max_seconds: 30.0 };
    let d: Vec<u64> = (1..=5).map(|r| backoff_delay(Some(&b), r).as_secs()).collect();
    assert_eq!(d, [2, 6, 18, 30, 30]);
    assert_eq!(backoff_delay(None, 1), secs(1));
    assert_eq!(backoff_delay(Some(&b), 10_000), secs(30));
    let zero = Backoff { initial_seconds: 0.0, factor: 2.0, max_seconds: 10.0 };
    assert_eq!(backoff_delay(Some(&zero), 3), Duration::ZERO);
}

#[test]
fn linear_chain_runs_in_order() {
    let mut h = Harness::new(spec(vec![http("a", &[]), http("b", &["a"]), http("c", &["b"])]));
    let d = h.tick();
    assert_eq!(d.actions.len(), 1);
    assert_eq!(h.status.phase, RunPhase::Running);
    assert_eq!(h.status.progress, "0/3");
    assert!(h.status.started_at.is_some());
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.starts_of("a"), [(1, 0.0)]);
    assert_eq!(h.starts_of("b"), [(1, 1.0)]);
    assert_eq!(h.starts_of("c"), [(1, 2.0)]);
    for k in ["a", "b", "c"] {
        let r = h.row(k);
        assert_eq!((r.phase, r.attempts), (StepPhase::Succeeded, 1));
        assert_eq!(r.output.as_deref(), Some(format!("out:{k}").as_str()));
        assert!(r.started_at.is_some() && r.finished_at.is_some());
    }
    assert_eq!(h.status.progress, "3/3");
    assert_eq!(h.status.finished_at.as_ref().map(|t| t.0), Some(h.t0 + secs(3)));
    assert_eq!(h.run_transitions(), ["Running", "Succeeded"]);
    assert_eq!(h.step_transitions("b"), [("Running".to_string(), 1), ("Succeeded".to_string(), 1)]);
}

#[test]
fn template_chain_finishes_in_one_pass() {
    let mut h = Harness::new(spec(vec![
        tmpl("a", &[], "A"),
        tmpl("b", &["a"], "{{ steps.a.output }}B"),
        tmpl("c", &["b"], "{{ steps.b.output }}C"),
    ]));
    let d = h.advance(vec![]);
    assert!(d.actions.is_empty());
    assert_eq!(d.requeue_after, None);
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.output("c"), "ABC");
    assert_eq!(h.status.progress, "3/3");
}

#[test]
fn diamond_joins_after_both_branches() {
    let mut h = Harness::new(spec(vec![http("a", &[]), http("b", &["a"]), http("c", &["a"]), http("d", &["b", "c"])]))
        .delay("b", secs(5))
        .delay("c", secs(1));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.starts_of("b"), [(1, 1.0)]);
    assert_eq!(h.starts_of("c"), [(1, 1.0)]);
    // c finished at 2s, b at 6s: d waits for both.
    assert_eq!(h.starts_of("d"), [(1, 6.0)]);
}

#[test]
fn outputs_flow_between_steps() {
    let mut s = spec(vec![
        http("a", &[]),
        with(http("b", &["a"]), |s| {
            let h = s.http.as_mut().unwrap();
            h.url = "https://example.com/{{ steps.a.json.tasks[1] }}".into();
            h.body = Some("{{ steps.a.json.x }}".into());
            h.headers.insert("x-who".into(), "{{ params.who }}".into());
        }),
        Step {
            id: "ask".into(),
            depends_on: vec!["a".into()],
            agent: Some(AgentStep {
                ref_: Some("coder".into()),
                prompt: "Do {{ steps.a.json.tasks | join(',') }} for {{ params.who }}".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        tmpl("c", &["b", "ask"], "{{ steps.a.output }}|{{ steps.b.output }}|{{ steps.ask.output }}|{{ run.name }}"),
    ]);
    s.params.push(ParamSpec { name: "who".into(), ..Default::default() });
    let a_out = r#"{"x": 42, "tasks": ["p", "q"]}"#;
    let mut h =
        Harness::new(s).script("a", vec![Outcome::Ok(a_out.into())]).script("b", vec![Outcome::Ok("B!".into())]);
    h.params.insert("who".into(), Json::from("Ada"));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    let b = h.start_of("b").clone();
    assert_eq!(http_url(&b), "https://example.com/q");
    assert_eq!(http_body(&b).as_deref(), Some("42"));
    match &b.work {
        Work::Http { headers, .. } => assert_eq!(headers["x-who"], "Ada"),
        _ => unreachable!(),
    }
    match &h.start_of("ask").work {
        Work::Agent { agent, prompt, .. } => {
            assert_eq!(agent.as_deref(), Some("coder"));
            assert_eq!(prompt, "Do p,q for Ada");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.output("c"), format!("{a_out}|B!|out:ask|run-1"));
}

// ---- forEach ----

fn fan_spec(max_parallel: Option<u32>) -> WorkflowSpec {
    spec(vec![
        http("list", &[]),
        with(http("fan", &["list"]), |s| {
            s.for_each = Some("{{ steps.list.json }}".into());
            s.max_parallel = max_parallel;
            let h = s.http.as_mut().unwrap();
            h.url = "https://example.com/{{ item }}".into();
            h.body = Some("{{ index }}".into());
        }),
        tmpl("after", &["fan"], "{{ steps.fan.json | length }}:{{ steps.fan.json[0] }}"),
    ])
}

#[test]
fn for_each_respects_max_parallel_and_keeps_order() {
    let items: Vec<String> = (0..7).map(|i| format!("i{i}")).collect();
    let mut h =
        Harness::new(fan_spec(Some(2))).script("list", vec![Outcome::Ok(serde_json::to_string(&items).unwrap())]);
    // Children finish out of order.
    for (c, d) in [5, 1, 3, 1, 2, 4, 1].into_iter().enumerate() {
        let key = child_key("fan", c);
        h = h.delay(&key, secs(d)).script(&key, vec![Outcome::Ok(format!("r{c}"))]);
    }
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.max_children_running["fan"], 2);
    let expected: Vec<String> = (0..7).map(|c| format!("r{c}")).collect();
    assert_eq!(h.output("fan"), serde_json::to_string(&expected).unwrap());
    assert_eq!(h.row("fan").items, Some(7));
    assert_eq!(h.output("after"), "7:r0");
    for c in 0..7 {
        let t = h.start_of(&child_key("fan", c)).clone();
        assert_eq!(t.index, Some(c));
        assert_eq!(http_url(&t), format!("https://example.com/i{c}"));
        assert_eq!(http_body(&t), Some(c.to_string()));
    }
    // The progress counts the step, not its children.
    assert_eq!(h.status.progress, "3/3");
}

#[test]
fn for_each_without_max_parallel_starts_all_children_at_once() {
    let mut h = Harness::new(fan_spec(None)).script("list", vec![Outcome::Ok("[1,2,3,4]".into())]);
    h.run();
    assert_eq!(h.max_children_running["fan"], 4);
    assert!((0..4).all(|c| h.starts_of(&child_key("fan", c)) == [(1, 1.0)]));
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

#[test]
fn for_each_over_an_empty_list_succeeds() {
    let mut s = fan_spec(Some(2));
    s.steps[2].template = Some("{{ steps.fan.json | length }}".into());
    let mut h = Harness::new(s).script("list", vec![Outcome::Ok("[]".into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.row("fan").phase, StepPhase::Succeeded);
    assert_eq!(h.row("fan").items, Some(0));
    assert_eq!(h.output("fan"), "[]");
    assert!(h.starts.iter().all(|s| s.task.step_id != "fan"));
    assert_eq!(h.output("after"), "0");
}

#[test]
fn for_each_of_templates_finishes_in_one_pass() {
    let mut h =
        Harness::new(spec(vec![with(tmpl("fan", &[], "{{ item * 2 }}"), |s| s.for_each = Some("[1, 2, 3]".into()))]));
    h.advance(vec![]);
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.output("fan"), r#"["2","4","6"]"#);
}

#[test]
fn for_each_child_failure_fails_the_step_after_all_children_settle() {
    let mut h = Harness::new(fan_spec(Some(3)))
        .script("list", vec![Outcome::Ok("[1,2,3]".into())])
        .script("fan[1]", vec![Outcome::Fail("bad item".into())])
        .delay("fan[2]", secs(10));
    h.spec.steps[1].retry = retry(1, 1.0, 1.0, 1.0);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.starts_of("fan[1]").len(), 2, "the failing child is retried");
    assert_eq!(h.row("fan[2]").phase, StepPhase::Succeeded, "other children still finish");
    let fan = h.row("fan");
    assert_eq!(fan.phase, StepPhase::Failed);
    assert!(fan.message.contains("1 of 3 items failed; fan[1]: failed after 2 attempts: bad item"), "{}", fan.message);
    assert_eq!(fan.output.as_deref(), Some(r#"["out:fan[0]",null,"out:fan[2]"]"#));
    // It settles only when the slow child is done.
    assert_eq!(fan.finished_at.as_ref().map(|t| t.0), Some(h.t0 + secs(11)));
    assert_eq!(h.row("after").phase, StepPhase::Skipped);
}

#[test]
fn for_each_over_a_non_list_fails() {
    let mut h = Harness::new(fan_spec(None)).script("list", vec![Outcome::Ok(r#"{"not": "a list"}"#.into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert!(
        h.row("fan").message.starts_with("forEach: forEach must be a JSON list, got an object"),
        "{}",
        h.row("fan").message
    );
}

#[test]
fn for_each_children_retry_within_max_parallel() {
    let mut h = Harness::new(fan_spec(Some(1)))
        .script("list", vec![Outcome::Ok("[1,2]".into())])
        .script("fan[0]", vec![Outcome::Fail("x".into()), Outcome::Ok("ok0".into())]);
    h.spec.steps[1].retry = retry(2, 10.0, 1.0, 10.0);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.max_children_running["fan"], 1);
    // fan[0] fails at 2s; fan[1] takes the free slot (2s..3s); fan[0] retries at 12s.
    assert_eq!(h.starts_of("fan[0]"), [(1, 1.0), (2, 12.0)]);
    assert_eq!(h.starts_of("fan[1]"), [(1, 2.0)]);
    assert_eq!(h.output("fan"), r#"["ok0","out:fan[1]"]"#);
}

#[test]
fn a_timed_out_child_frees_its_slot_in_the_same_pass() {
    // Found by the property test: the slot freed by a child that timed out for good was not
    // used until some later, unrelated pass, and nothing asked for one: the fan-out stalled.
    let s = spec(vec![with(http("fan", &[]), |s| {
        s.for_each = Some("[1, 2]".into());
        s.max_parallel = Some(1);
        s.timeout_seconds = Some(5);
        s.continue_on_error = true;
    })]);
    let mut h = Harness::new(s).script("fan[0]", vec![Outcome::Hang]);
    h.tick();
    assert_eq!(h.elapsed(), secs(5));
    let d = h.tick();
    assert!(d.actions.iter().any(|a| matches!(a, Action::Abort { key, .. } if key == "fan[0]")));
    assert!(d.actions.iter().any(|a| matches!(a, Action::Start(t) if t.key == "fan[1]")), "{d:?}");
    h.run();
    assert_eq!(h.starts_of("fan[1]"), [(1, 5.0)]);
    assert_eq!(h.row("fan").phase, StepPhase::Failed);
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

#[test]
fn a_fan_out_that_cannot_go_on_stops_its_children() {
    // If the list cannot be evaluated again (say the controller could not load an upstream
    // output kept in a ConfigMap), the step fails and no child is left running.
    let mut h = Harness::new(fan_spec(Some(1))).script("list", vec![Outcome::Ok("[1, 2]".into())]);
    h.run_until(|h| h.phase("fan[0]") == StepPhase::Running);
    h.status.steps.get_mut("list").unwrap().output = None;
    let d = h.advance(vec![]);
    assert_eq!(d.actions.len(), 1);
    assert!(matches!(&d.actions[0], Action::Abort { key, attempt: 1, .. } if key == "fan[0]"), "{d:?}");
    assert_eq!(h.row("fan[0]").phase, StepPhase::Cancelled);
    assert_eq!(h.row("fan[1]").phase, StepPhase::Cancelled);
    assert_eq!(h.row("fan[1]").message, r#"not started: step "fan" failed"#);
    let fan = h.row("fan");
    assert_eq!(fan.phase, StepPhase::Failed);
    assert!(fan.message.starts_with("forEach: undefined value"), "{}", fan.message);
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert!(h.in_flight.is_empty());
}

// ---- retries ----

#[test]
fn retries_wait_for_their_backoff() {
    let s = spec(vec![with(http("b", &[]), |s| s.retry = retry(3, 10.0, 2.0, 15.0))]);
    let fail = || Outcome::Fail("boom".into());
    let mut h = Harness::new(s).script("b", vec![fail(), fail(), fail(), Outcome::Ok("done".into())]);
    // Attempt 1 runs 0s..1s and fails.
    h.tick();
    let d = h.tick();
    assert_eq!(h.elapsed(), secs(11), "the clock moves to the requeue");
    assert_eq!(d.requeue_after, Some(secs(10)));
    let row = h.row("b");
    assert_eq!(row.phase, StepPhase::Retrying);
    assert_eq!(row.attempts, 1);
    assert_eq!(row.retry_at.as_ref().map(|t| t.0), Some(h.t0 + secs(11)));
    assert!(row.message.contains("attempt 1 failed: boom; retrying in 10.0s"), "{}", row.message);
    // Not a moment before retryAt.
    h.set_time(Duration::from_millis(10_999));
    let d = h.advance(vec![]);
    assert!(d.actions.is_empty());
    assert_eq!(d.requeue_after, Some(Duration::from_millis(1)));
    h.set_time(secs(11));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    // Delays 10s, 20s capped at 15s, 15s.
    assert_eq!(h.starts_of("b"), [(1, 0.0), (2, 11.0), (3, 27.0), (4, 43.0)]);
    let r = h.row("b");
    assert_eq!((r.phase, r.attempts, r.output.as_deref()), (StepPhase::Succeeded, 4, Some("done")));
    assert_eq!(r.retry_at, None);
    let phases: Vec<(String, u32)> = h.step_transitions("b");
    let expect: Vec<(String, u32)> = [
        ("Running", 1),
        ("Retrying", 1),
        ("Running", 2),
        ("Retrying", 2),
        ("Running", 3),
        ("Retrying", 3),
        ("Running", 4),
        ("Succeeded", 4),
    ]
    .into_iter()
    .map(|(p, a)| (p.to_string(), a))
    .collect();
    assert_eq!(phases, expect);
}

#[test]
fn retries_run_out() {
    let s = spec(vec![with(http("b", &[]), |s| s.retry = retry(1, 1.0, 1.0, 1.0))]);
    let mut h = Harness::new(s).script("b", vec![Outcome::Fail("boom".into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.starts_of("b").len(), 2);
    assert_eq!(h.row("b").message, "failed after 2 attempts: boom");
    assert_eq!(h.status.message, r#"step "b" failed: failed after 2 attempts: boom"#);
    assert_eq!(h.run_transitions(), ["Running", "Failed"]);
}

#[test]
fn non_retryable_failures_are_not_retried() {
    let s = spec(vec![with(http("b", &[]), |s| s.retry = retry(5, 1.0, 1.0, 1.0))]);
    let mut h = Harness::new(s).script("b", vec![Outcome::Fatal("401".into())]);
    h.run();
    assert_eq!(h.starts_of("b").len(), 1);
    assert_eq!((h.row("b").phase, h.row("b").message.as_str()), (StepPhase::Failed, "401"));
}

#[test]
fn retry_policy_comes_from_step_then_workflow_then_settings() {
    let fail = vec![Outcome::Fail("x".into())];
    // Settings.
    let mut h = Harness::new(spec(vec![http("a", &[])])).script("a", fail.clone());
    h.settings.default_retry =
        RetryPolicy { limit: 2, backoff: Some(Backoff { initial_seconds: 0.0, ..Default::default() }) };
    h.run();
    assert_eq!(h.starts_of("a").len(), 3);
    // The workflow's defaults win over the settings.
    let mut s = spec(vec![http("a", &[]), with(http("b", &[]), |s| s.retry = retry(0, 1.0, 1.0, 1.0))]);
    s.defaults = Some(StepDefaults { retry: retry(1, 0.0, 1.0, 1.0), timeout_seconds: None });
    let mut h = Harness::new(s).script("a", fail.clone()).script("b", fail);
    h.settings.default_retry = RetryPolicy { limit: 5, backoff: None };
    h.run();
    assert_eq!(h.starts_of("a").len(), 2);
    // And the step's own policy wins over both.
    assert_eq!(h.starts_of("b").len(), 1);
}

#[test]
fn zero_backoff_retries_at_once() {
    let s = spec(vec![with(http("a", &[]), |s| s.retry = retry(1, 0.0, 1.0, 0.0))]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Fail("x".into()), Outcome::Ok("y".into())]);
    h.tick();
    // The failure and the next attempt happen in the same pass.
    let d = h.tick();
    assert_eq!(d.actions.len(), 1);
    assert_eq!(h.starts_of("a"), [(1, 0.0), (2, 1.0)]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

// ---- failure, finally, fail-fast, continueOnError ----

#[test]
fn a_failure_fails_the_run_and_finally_still_runs() {
    let mut s = spec(vec![http("a", &[]), http("b", &["a"])]);
    s.finally = vec![
        tmpl("report", &[], "Run finished: {{ run.phase }} ({{ steps.a.phase }}, {{ steps.b.phase }})"),
        with(http("notify", &["report"]), |s| s.http.as_mut().unwrap().body = Some("{{ steps.report.output }}".into())),
    ];
    let mut h = Harness::new(s).script("a", vec![Outcome::Fatal("kaput".into())]).delay("notify", secs(3));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.status.message, r#"step "a" failed: kaput"#);
    assert_eq!(h.row("b").phase, StepPhase::Skipped);
    assert_eq!(h.row("b").message, r#"not run: dependency "a" failed"#);
    assert_eq!(h.output("report"), "Run finished: Failed (Failed, Skipped)");
    assert_eq!(http_body(h.start_of("notify")).as_deref(), Some("Run finished: Failed (Failed, Skipped)"));
    // The run ends only after its finally steps: notify runs 1s..4s.
    assert_eq!(h.starts_of("notify"), [(1, 1.0)]);
    assert_eq!(h.status.finished_at.as_ref().map(|t| t.0), Some(h.t0 + secs(4)));
    assert_eq!(h.status.progress, "4/4");
}

#[test]
fn finally_sees_success_and_its_failure_fails_the_run() {
    let mut s = spec(vec![http("a", &[])]);
    s.finally = vec![tmpl("report", &[], "{{ run.phase }}"), http("cleanup", &[])];
    let mut h = Harness::new(s.clone());
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.output("report"), "Succeeded");
    let mut h = Harness::new(s).script("cleanup", vec![Outcome::Fatal("nope".into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.status.message, r#"finally step "cleanup" failed"#);
}

#[test]
fn dag_steps_see_run_phase_running() {
    let mut h = Harness::new(spec(vec![tmpl("a", &[], "{{ run.phase }} {{ run.namespace }}/{{ run.uid }}")]));
    h.run();
    assert_eq!(h.output("a"), "Running ns/uid-1");
}

#[test]
fn fail_fast_skips_pending_steps_but_lets_running_ones_finish() {
    let s = spec(vec![
        http("a", &[]),
        http("slow", &[]),
        http("x", &["a"]),
        http("c", &["slow"]),
        with(http("r", &[]), |s| s.retry = retry(3, 2.0, 1.0, 2.0)),
        http("after-r", &["r"]),
    ]);
    let mut h = Harness::new(s)
        .script("a", vec![Outcome::Fatal("a broke".into())])
        .script("r", vec![Outcome::Fail("flaky".into()), Outcome::Ok("r ok".into())])
        .delay("a", secs(2))
        .delay("slow", secs(5));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.status.message, r#"step "a" failed: a broke"#);
    assert!(
        h.aborts.is_empty(),
        "running steps are not aborted: {:?}",
        h.aborts.iter().map(|a| &a.key).collect::<Vec<_>>()
    );
    assert_eq!(h.row("slow").phase, StepPhase::Succeeded);
    assert_eq!(h.row("x").message, r#"not run: dependency "a" failed"#);
    assert_eq!(h.row("c").phase, StepPhase::Skipped);
    assert_eq!(h.row("c").message, r#"not run: the run is failing (step "a" failed)"#);
    // r failed at 1s and retries at 3s, after a failed (2s): a retry under way still runs.
    assert_eq!(h.starts_of("r"), [(1, 0.0), (2, 3.0)]);
    assert_eq!(h.row("r").phase, StepPhase::Succeeded);
    assert_eq!(h.row("after-r").phase, StepPhase::Skipped);
    for k in ["x", "c", "after-r"] {
        assert!(h.starts_of(k).is_empty());
    }
}

#[test]
fn continue_on_error_lets_dependents_run_and_the_run_succeed() {
    let s = spec(vec![
        with(http("a", &[]), |s| s.continue_on_error = true),
        tmpl("b", &["a"], "a was {{ steps.a.phase }}"),
        http("c", &["b"]),
    ]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Fail("meh".into())]);
    h.run();
    assert_eq!(h.row("a").phase, StepPhase::Failed);
    assert_eq!(h.output("b"), "a was Failed");
    assert_eq!(h.row("c").phase, StepPhase::Succeeded);
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

// ---- timeouts ----

#[test]
fn a_step_timeout_aborts_and_retries() {
    let s = spec(vec![with(http("a", &[]), |s| {
        s.timeout_seconds = Some(5);
        s.retry = retry(1, 2.0, 1.0, 2.0);
    })]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Hang, Outcome::Ok("second time".into())]);
    let d = h.tick();
    assert_eq!(d.requeue_after, Some(secs(5)));
    assert_eq!(h.start_of("a").timeout, Some(secs(5)));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.aborts.len(), 1);
    let a = &h.aborts[0];
    assert_eq!((a.at, a.key.as_str(), a.attempt), (secs(5), "a", 1));
    assert!(a.reason.contains("timed out after 5s"), "{}", a.reason);
    assert_eq!(h.starts_of("a"), [(1, 0.0), (2, 7.0)]);
    assert!(h.transitions.iter().any(|(_, t)| t.phase.as_str() == "Retrying" && t.message.contains("timed out")));
    assert_eq!(h.output("a"), "second time");
}

#[test]
fn a_step_timeout_without_retries_fails_the_step() {
    let mut s = spec(vec![http("a", &[])]);
    s.defaults = Some(StepDefaults { timeout_seconds: Some(5), retry: None });
    let mut h = Harness::new(s).script("a", vec![Outcome::Hang]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.row("a").phase, StepPhase::Failed);
    assert_eq!(h.row("a").message, "timed out after 5s");
    assert_eq!(h.aborts.len(), 1);
    assert_eq!(h.status.finished_at.as_ref().map(|t| t.0), Some(h.t0 + secs(5)));
}

#[test]
fn a_late_result_after_a_timeout_is_ignored() {
    let s = spec(vec![with(http("a", &[]), |s| {
        s.timeout_seconds = Some(5);
        s.retry = retry(1, 100.0, 1.0, 100.0);
    })]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Hang]);
    h.tick();
    h.set_time(secs(5));
    h.advance(vec![]);
    assert_eq!(h.row("a").phase, StepPhase::Retrying);
    let before = h.status.clone();
    let d = h.advance(vec![Event::Succeeded {
        key: "a".into(),
        attempt: 1,
        output: "late".into(),
        info: TaskInfo::default(),
    }]);
    assert!(d.actions.is_empty() && d.transitions.is_empty());
    assert_eq!(h.status, before);
}

#[test]
fn the_run_deadline_cancels_what_runs_and_runs_finally() {
    let mut s = spec(vec![http("a", &[]), http("b", &["a"]), http("c", &[])]);
    s.finally = vec![tmpl("report", &[], "{{ run.phase }}")];
    let mut h = Harness::new(s).script("a", vec![Outcome::Hang]);
    h.deadline = Some(h.t0 + secs(30));
    let d = h.tick();
    assert_eq!(d.requeue_after, Some(secs(30)));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.status.message, "run timed out");
    assert_eq!(h.elapsed(), secs(30));
    assert_eq!(h.aborts.len(), 1);
    assert_eq!((h.aborts[0].key.as_str(), h.aborts[0].reason.as_str()), ("a", "run timed out"));
    assert_eq!(h.row("a").phase, StepPhase::Cancelled);
    assert_eq!(h.row("b").phase, StepPhase::Cancelled);
    assert_eq!(h.row("b").message, "not started: run timed out");
    assert_eq!(h.row("c").phase, StepPhase::Succeeded);
    assert_eq!(h.output("report"), "Failed");
}

// ---- when ----

#[test]
fn when_false_skips_and_dependents_still_run() {
    let s = spec(vec![
        http("a", &[]),
        with(http("b", &["a"]), |s| s.when = Some("steps.a.output == 'no'".into())),
        with(http("b2", &["a"]), |s| s.when = Some("{{ steps.a.output == 'yes' }}".into())),
        tmpl("c", &["b", "b2"], "b={{ steps.b.phase }} b2={{ steps.b2.phase }}"),
    ]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Ok("yes".into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.row("b").phase, StepPhase::Skipped);
    assert!(h.row("b").message.contains("steps.a.output == 'no'"), "{}", h.row("b").message);
    assert!(h.starts_of("b").is_empty());
    assert_eq!(h.row("b2").phase, StepPhase::Succeeded);
    assert_eq!(h.output("c"), "b=Skipped b2=Succeeded");
}

#[test]
fn when_on_an_undefined_name_fails_the_step() {
    let s = spec(vec![
        http("a", &[]),
        with(http("b", &["a"]), |s| s.when = Some("steps.a.json.flag".into())),
        http("c", &["b"]),
    ]);
    // "plain" is not JSON, so steps.a.json is undefined.
    let mut h = Harness::new(s).script("a", vec![Outcome::Ok("plain".into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    let b = h.row("b");
    assert_eq!(b.phase, StepPhase::Failed);
    assert!(b.message.starts_with("when: "), "{}", b.message);
    assert!(b.message.contains("steps.a.json.flag"), "{}", b.message);
    assert!(h.starts_of("b").is_empty());
    assert_eq!(h.row("c").phase, StepPhase::Skipped);
}

#[test]
fn reading_the_output_of_a_skipped_step_is_an_error() {
    let s = spec(vec![
        with(tmpl("a", &[], "x"), |s| s.when = Some("false".into())),
        tmpl("b", &["a"], "{{ steps.a.output }}"),
    ]);
    let mut h = Harness::new(s);
    h.run();
    assert_eq!(h.row("a").phase, StepPhase::Skipped);
    assert_eq!(h.row("b").phase, StepPhase::Failed);
    assert!(h.row("b").message.starts_with("template: undefined value"), "{}", h.row("b").message);
}

// ---- cancel and suspend ----

#[test]
fn cancel_aborts_running_tasks_cancels_pending_ones_and_runs_finally() {
    let mut s = spec(vec![
        http("a", &[]),
        http("b", &[]),
        http("c", &["a"]),
        with(http("fan", &[]), |s| {
            s.for_each = Some("[1, 2, 3]".into());
            s.max_parallel = Some(2);
        }),
    ]);
    s.finally = vec![tmpl("report", &[], "{{ run.phase }}"), http("cleanup", &["report"])];
    let mut h = Harness::new(s).delay("a", secs(10)).delay("b", secs(10)).delay("fan", secs(10));
    h.tick();
    assert_eq!(h.starts.len(), 4, "a, b, fan[0], fan[1]");
    h.set_time(secs(3));
    h.cancel = true;
    let d = h.advance(vec![]);
    let mut aborted: Vec<(String, u32, String)> = d
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Abort { key, attempt, reason, .. } => Some((key.clone(), *attempt, reason.clone())),
            Action::Start(_) => None,
        })
        .collect();
    aborted.sort();
    let expected: Vec<(String, u32, String)> =
        ["a", "b", "fan[0]", "fan[1]"].into_iter().map(|k| (k.to_string(), 1, "cancelled".to_string())).collect();
    assert_eq!(aborted, expected);
    for k in ["a", "b", "fan[0]", "fan[1]", "fan"] {
        assert_eq!(h.row(k).phase, StepPhase::Cancelled, "{k}");
    }
    for k in ["c", "fan[2]"] {
        assert_eq!(h.row(k).phase, StepPhase::Cancelled, "{k}");
        assert_eq!(h.row(k).message, "not started: cancelled");
    }
    // Finally runs at once: report renders, cleanup starts.
    assert_eq!(h.output("report"), "Cancelled");
    assert!(d.actions.iter().any(|a| matches!(a, Action::Start(t) if t.key == "cleanup")));
    assert_eq!(h.status.phase, RunPhase::Running);
    assert_eq!(h.status.message, "cancelled; running finally steps");
    // A late result of an aborted task changes nothing.
    let before = h.status.clone();
    h.advance(vec![Event::Succeeded { key: "a".into(), attempt: 1, output: "late".into(), info: TaskInfo::default() }]);
    assert_eq!(h.status, before);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Cancelled);
    assert_eq!(h.status.message, "cancelled");
    assert_eq!(h.row("cleanup").phase, StepPhase::Succeeded);
    assert_eq!(h.status.progress, "6/6");
    assert!(h.in_flight.is_empty());
}

#[test]
fn cancel_before_start_cancels_everything() {
    let mut s = spec(vec![http("a", &[]), http("b", &["a"])]);
    s.finally = vec![tmpl("report", &[], "{{ run.phase }}")];
    let mut h = Harness::new(s);
    h.cancel = true;
    h.run();
    assert!(h.starts.is_empty());
    assert_eq!(h.status.phase, RunPhase::Cancelled);
    assert_eq!(h.output("report"), "Cancelled");
}

#[test]
fn suspend_holds_new_starts_and_resume_goes_on() {
    let s = spec(vec![http("a", &[]), http("b", &["a"]), with(http("r", &[]), |s| s.retry = retry(1, 1.0, 1.0, 1.0))]);
    let mut h =
        Harness::new(s).delay("a", secs(2)).script("r", vec![Outcome::Fail("x".into()), Outcome::Ok("y".into())]);
    h.tick();
    h.suspend = true;
    let d = h.advance(vec![]);
    assert!(d.actions.is_empty());
    assert_eq!(h.status.phase, RunPhase::Suspended);
    assert_eq!(h.status.message, "suspended: running steps finish, no new steps start");
    assert_eq!(
        d.transitions.iter().filter(|t| t.key.is_none()).map(|t| t.phase.as_str()).collect::<Vec<_>>(),
        ["Suspended"]
    );
    // Running steps finish; r fails and waits; nothing new starts, however long we wait.
    for t in [1, 2, 5, 100, 1000] {
        h.set_time(secs(t));
        let events = h.take_due();
        let d = h.advance(events);
        assert!(d.actions.is_empty(), "started while suspended: {:?}", d.actions);
    }
    assert_eq!(h.row("a").phase, StepPhase::Succeeded);
    assert_eq!(h.row("r").phase, StepPhase::Retrying);
    assert_eq!(h.phase("b"), StepPhase::Pending);
    assert_eq!(h.status.phase, RunPhase::Suspended);
    assert_eq!(h.status.message, "suspended");
    h.suspend = false;
    let d = h.advance(vec![]);
    let started: BTreeSet<&str> = d
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Start(t) => Some(t.key.as_str()),
            Action::Abort { .. } => None,
        })
        .collect();
    assert_eq!(started, BTreeSet::from(["b", "r"]));
    assert_eq!(h.status.phase, RunPhase::Running);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

#[test]
fn suspend_still_times_out_running_for_each_children() {
    let s = spec(vec![with(http("fan", &[]), |s| {
        s.for_each = Some("[1, 2]".into());
        s.timeout_seconds = Some(5);
    })]);
    let mut h = Harness::new(s).script("fan[0]", vec![Outcome::Hang]).delay("fan[1]", secs(1));
    h.tick();
    h.suspend = true;
    h.set_time(secs(1));
    let events = h.take_due();
    h.advance(events);
    h.set_time(secs(6));
    let d = h.advance(vec![]);
    assert!(
        d.actions.iter().any(|a| matches!(a, Action::Abort { key, .. } if key == "fan[0]")),
        "a running child times out while the run is suspended, as a plain step does: {d:?}"
    );
    assert_eq!(h.row("fan[0]").phase, StepPhase::Failed);
    // The fan-out settles while suspended: all its children have finished.
    assert_eq!(h.row("fan").phase, StepPhase::Failed);
    assert_eq!(h.status.phase, RunPhase::Failed);
}

#[test]
fn suspend_still_times_out_running_steps() {
    let s = spec(vec![with(http("a", &[]), |s| s.timeout_seconds = Some(5)), http("b", &["a"])]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Hang]);
    h.tick();
    h.suspend = true;
    h.set_time(secs(6));
    let d = h.advance(vec![]);
    assert!(d.actions.iter().any(|a| matches!(a, Action::Abort { key, .. } if key == "a")));
    assert_eq!(h.row("a").phase, StepPhase::Failed);
    assert_eq!(h.status.phase, RunPhase::Failed);
}

#[test]
fn a_failure_found_while_scheduling_skips_steps_looked_at_before_it() {
    // Found by the property test. The order is c, d, b, a: when a times out, b (blocked by
    // suspend) was already looked at, so it was only skipped, and the run only failed, on
    // some later pass; and nothing asked for one.
    let s = spec(vec![
        http("c", &[]),
        tmpl("d", &[], "d"),
        http("b", &["c"]),
        with(http("a", &["d"]), |s| s.timeout_seconds = Some(5)),
    ]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Hang]);
    let order: Vec<&str> = h.dag.topo_order().iter().map(|&i| h.dag.id(i)).collect();
    assert_eq!(order, ["c", "d", "b", "a"]);
    h.tick();
    h.suspend = true;
    h.tick();
    assert_eq!(h.phase("b"), StepPhase::Pending);
    assert_eq!(h.elapsed(), secs(5));
    h.tick();
    assert_eq!(h.row("a").message, "timed out after 5s");
    assert_eq!(h.row("b").phase, StepPhase::Skipped);
    assert_eq!(h.status.phase, RunPhase::Failed);
}

// ---- idempotence, stale events, lost work ----

#[test]
fn advancing_twice_changes_nothing() {
    let mut s = spec(vec![
        with(http("a", &[]), |s| {
            s.timeout_seconds = Some(100);
            s.retry = retry(2, 5.0, 1.0, 5.0);
        }),
        with(http("fan", &["a"]), |s| {
            s.for_each = Some("[1, 2, 3]".into());
            s.max_parallel = Some(2);
        }),
        tmpl("t", &["fan"], "{{ steps.fan.output }}"),
    ]);
    s.finally = vec![http("f", &[])];
    let mut h = Harness::new(s).script("a", vec![Outcome::Fail("x".into()), Outcome::Ok("y".into())]);
    h.deadline = Some(h.t0 + secs(1000));
    // The harness checks idempotence after every pass; make it explicit too.
    let mut passes = 0;
    while !h.status.phase.is_finished() {
        let first = h.pass();
        passes += 1;
        if first.requeue_after != Some(Duration::ZERO) {
            let before = h.status.clone();
            let mut status = h.status.clone();
            let d = advance(h.input(), &mut status, vec![]);
            assert_eq!(d.actions, vec![]);
            assert_eq!(d.transitions, vec![]);
            assert_eq!(status, before);
        }
        h.move_clock(&first);
    }
    assert!(passes > 5);
    // A finished run stays as it is.
    let before = h.status.clone();
    h.set_time(secs(5000));
    let d = h.advance(vec![Event::Lost { key: "f".into(), attempt: 1 }]);
    assert_eq!(d, Decision::default());
    assert_eq!(h.status, before);
}

#[test]
fn stale_and_unknown_events_are_ignored() {
    let s = spec(vec![with(http("a", &[]), |s| s.retry = retry(2, 0.0, 1.0, 0.0)), http("b", &[])]);
    let mut h = Harness::new(s).script("a", vec![Outcome::Fail("x".into()), Outcome::Hang]);
    h.tick();
    h.tick();
    assert_eq!((h.row("a").phase, h.row("a").attempts), (StepPhase::Running, 2));
    assert_eq!(h.row("b").phase, StepPhase::Succeeded);
    let before = h.status.clone();
    let ok = |key: &str, attempt| Event::Succeeded {
        key: key.into(),
        attempt,
        output: "stale".into(),
        info: TaskInfo::default(),
    };
    let events = vec![
        ok("a", 1),
        Event::Failed {
            key: "a".into(),
            attempt: 1,
            message: "old".into(),
            retryable: false,
            info: TaskInfo::default(),
        },
        Event::Lost { key: "a".into(), attempt: 1 },
        ok("a", 3),
        ok("b", 1),
        ok("nope", 1),
        ok("a[0]", 2),
    ];
    let d = h.advance(events);
    assert!(d.actions.is_empty() && d.transitions.is_empty());
    assert_eq!(h.status, before);
    // The current attempt's result counts.
    h.in_flight.clear();
    h.advance(vec![ok("a", 2)]);
    assert_eq!(h.output("a"), "stale");
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

#[test]
fn lost_work_restarts_the_same_attempt() {
    let s = spec(vec![with(http("a", &[]), |s| s.retry = retry(2, 1.0, 1.0, 1.0))]);
    let mut h = Harness::new(s).script(
        "a",
        vec![Outcome::Lose, Outcome::Fail("x".into()), Outcome::Lose, Outcome::Lose, Outcome::Ok("finally".into())],
    );
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    // Lost at 1s: attempt 1 again at once; fails at 2s; attempt 2 at 3s, lost twice.
    assert_eq!(h.starts_of("a"), [(1, 0.0), (1, 1.0), (2, 3.0), (2, 4.0), (2, 5.0)]);
    assert_eq!(h.row("a").attempts, 2);
    assert_eq!(h.output("a"), "finally");
}

#[test]
fn lost_for_each_child_restarts() {
    let s = spec(vec![with(http("fan", &[]), |s| {
        s.for_each = Some("[1, 2]".into());
        s.max_parallel = Some(1);
    })]);
    let mut h = Harness::new(s).script("fan[0]", vec![Outcome::Lose, Outcome::Ok("a".into())]);
    h.run();
    assert_eq!(h.starts_of("fan[0]"), [(1, 0.0), (1, 1.0)]);
    assert_eq!(h.max_children_running["fan"], 1);
    assert_eq!(h.output("fan"), r#"["a","out:fan[1]"]"#);
}

#[test]
fn task_info_is_recorded() {
    let mut h = Harness::new(spec(vec![http("a", &[])]));
    h.tick();
    let info = TaskInfo {
        agent: Some("coder".into()),
        replica: Some("vllm-0".into()),
        tokens: Some(crate::api::TokenUsage { prompt: 10, completion: 5, ..Default::default() }),
        cached: true,
        ..Default::default()
    };
    h.in_flight.clear();
    h.advance(vec![Event::Succeeded { key: "a".into(), attempt: 1, output: "o".into(), info }]);
    let r = h.row("a");
    assert_eq!((r.agent.as_deref(), r.replica.as_deref(), r.cached), (Some("coder"), Some("vllm-0"), true));
    assert_eq!(r.tokens.map(|t| t.prompt + t.completion), Some(15));
    assert_eq!(r.message, "result from cache");
}

#[test]
fn tokens_add_up_over_attempts_failed_ones_included() {
    let s = spec(vec![with(http("a", &[]), |s| s.retry = retry(1, 0.0, 1.0, 0.0))]);
    let mut h = Harness::new(s);
    h.tick();
    let used = |prompt, completion, cost| TaskInfo {
        tokens: Some(crate::api::TokenUsage { prompt, completion, cost }),
        ..Default::default()
    };
    h.in_flight.clear();
    let failed =
        Event::Failed { key: "a".into(), attempt: 1, message: "bad".into(), retryable: true, info: used(10, 2, 0.1) };
    h.advance(vec![failed]);
    if h.row("a").phase == StepPhase::Retrying {
        h.advance(vec![]);
    }
    assert_eq!((h.row("a").phase, h.row("a").attempts), (StepPhase::Running, 2));
    h.in_flight.clear();
    h.advance(vec![Event::Succeeded { key: "a".into(), attempt: 2, output: "o".into(), info: used(20, 4, 0.2) }]);
    let t = h.row("a").tokens.expect("tokens");
    assert_eq!((t.prompt, t.completion), (30, 6));
    assert!((t.cost - 0.3).abs() < 1e-12);
    assert_eq!(crate::engine::usage::totals(&h.status.steps).map(|u| u.input_tokens), Some(30));
}

// ---- scale and progress ----

/// A deterministic pseudo-random sequence (no dependency on a seedable RNG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn a_500_step_random_dag_completes() {
    let mut rng = Lcg(42);
    let mut steps = Vec::new();
    for i in 0..500usize {
        let id = format!("s{i}");
        let mut deps = BTreeSet::new();
        if i > 0 {
            for _ in 0..rng.next(4) {
                deps.insert(format!("s{}", rng.next(i as u64)));
            }
        }
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        let step = if rng.next(2) == 0 {
            let text = deps.iter().map(|d| format!("{{{{ steps.{d}.phase }}}}")).collect::<Vec<_>>().join(",");
            tmpl(&id, &deps, &text)
        } else {
            http(&id, &deps)
        };
        steps.push(step);
    }
    let external = steps.iter().filter(|s| s.http.is_some()).count();
    let mut h = Harness::new(spec(steps));
    for i in 0..500 {
        h.delays.insert(format!("s{i}"), Duration::from_millis(rng.next(3000)));
    }
    h.check_idempotence = false;
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.status.progress, "500/500");
    assert_eq!(h.starts.len(), external);
    assert!(h.status.steps.values().all(|r| r.phase == StepPhase::Succeeded));
}

#[test]
fn progress_counts_finished_steps_over_all_steps() {
    let mut s =
        spec(vec![http("a", &[]), with(http("b", &["a"]), |s| s.when = Some("false".into())), http("c", &["a"])]);
    s.finally = vec![http("f", &[])];
    let mut h = Harness::new(s).delay("c", secs(5));
    let mut seen = vec![];
    while !h.status.phase.is_finished() {
        h.tick();
        if seen.last() != Some(&h.status.progress) {
            seen.push(h.status.progress.clone());
        }
    }
    assert_eq!(seen, ["0/4", "2/4", "3/4", "4/4"]);
}

// ---- validation that the scheduler relies on ----

#[test]
fn item_in_the_when_of_a_for_each_step_is_rejected() {
    // `when` is evaluated once for the whole step, before the fan-out, so it cannot read
    // `item`; validation must say so rather than fail the run later.
    let s = spec(vec![with(tmpl("fan", &[], "{{ item }}"), |s| {
        s.for_each = Some("[1, 2]".into());
        s.when = Some("item > 1".into());
    })]);
    let err = validate(&s).unwrap_err().to_string();
    assert!(err.contains("steps[0].when"), "{err}");
    assert!(err.contains("\"item\""), "{err}");
}

#[test]
fn the_dag_records_what_each_step_reads() {
    let mut s = spec(vec![
        http("a", &[]),
        http("b", &["a"]),
        with(http("c", &["b"]), |s| {
            s.when = Some("steps.a.phase == 'Succeeded'".into());
            s.http.as_mut().unwrap().body = Some("{{ steps.b.json.x }}".into());
        }),
        with(tmpl("d", &["c"], "{{ item }}"), |s| s.for_each = Some("{{ steps.b.json }}".into())),
    ]);
    s.finally = vec![tmpl("f", &[], "{{ steps.d.output }} {{ run.phase }}")];
    let dag = validate(&s).unwrap();
    let reads = |id: &str| -> Vec<&str> { dag.reads(dag.index_of(id).unwrap()).iter().map(|&j| dag.id(j)).collect() };
    assert_eq!(reads("a"), Vec::<&str>::new());
    assert_eq!(reads("c"), ["a", "b"]);
    assert_eq!(reads("d"), ["b"]);
    assert_eq!(reads("f"), ["d"]);
}

// ---- property tests ----

#[derive(Debug, Clone)]
enum GenKind {
    Template,
    Http,
    /// A forEach of http children over this many items, at most this many at once.
    Fan(u8, u8),
}

#[derive(Debug, Clone)]
struct GenStep {
    kind: GenKind,
    dep_seeds: Vec<u16>,
    /// Attempts that fail before one succeeds.
    fails: u8,
    fatal: bool,
    hang: bool,
    lost: bool,
    retry: u8,
    coe: bool,
    skip: bool,
    delay: u8,
}

fn gen_step() -> impl Strategy<Value = GenStep> {
    let kind = prop_oneof![
        2 => Just(GenKind::Template),
        4 => Just(GenKind::Http),
        1 => (0u8..4, 1u8..3).prop_map(|(n, m)| GenKind::Fan(n, m)),
    ];
    (
        kind,
        prop::collection::vec(any::<u16>(), 0..4),
        prop_oneof![3 => Just(0u8), 1 => 1u8..4],
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        0u8..3,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        0u8..4,
    )
        .prop_map(|(kind, dep_seeds, fails, fatal, hang, lost, retry, coe, skip, delay)| GenStep {
            kind,
            dep_seeds,
            fails,
            fatal,
            hang,
            lost,
            retry,
            coe,
            skip,
            delay,
        })
}

impl GenStep {
    fn external(&self) -> bool {
        !matches!(self.kind, GenKind::Template)
    }

    /// Whether the step fails for good if it runs.
    fn would_fail(&self) -> bool {
        let has_tasks = match self.kind {
            GenKind::Template => false,
            GenKind::Http => true,
            GenKind::Fan(n, _) => n > 0,
        };
        let fatal = self.fatal && !self.hang;
        has_tasks && !self.skip && !self.coe && self.fails > 0 && (fatal || self.fails > self.retry)
    }

    fn build(&self, id: &str, earlier: &[String]) -> Step {
        let mut deps: Vec<String> = Vec::new();
        if !earlier.is_empty() {
            for s in &self.dep_seeds {
                let d = earlier[*s as usize % earlier.len()].clone();
                if !deps.contains(&d) {
                    deps.push(d);
                }
            }
        }
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        let mut step = match self.kind {
            GenKind::Template => {
                let text = deps.iter().map(|d| format!("{{{{ steps.{d}.phase }}}}")).collect::<Vec<_>>().join(" ");
                tmpl(id, &deps, &format!("{id}: {text}"))
            }
            GenKind::Http => http(id, &deps),
            GenKind::Fan(n, m) => with(http(id, &deps), |s| {
                s.for_each = Some(serde_json::to_string(&(0..n).collect::<Vec<_>>()).unwrap());
                s.max_parallel = Some(m.into());
                s.http.as_mut().unwrap().url = "https://example.com/{{ item }}".into();
            }),
        };
        if self.external() {
            step.retry = retry(self.retry.into(), f64::from(self.delay), 2.0, 5.0);
            step.continue_on_error = self.coe;
            if self.hang {
                step.timeout_seconds = Some(20);
            }
        }
        // `when` reads a dependency when there is one: true, or false for `skip`.
        let op = if self.skip { "==" } else { "!=" };
        match deps.first() {
            Some(d) if self.skip || self.dep_seeds.len() % 2 == 1 => {
                step.when = Some(format!("steps.{d}.phase {op} 'x'"))
            }
            None if self.skip => step.when = Some("1 == 2".into()),
            _ => {}
        }
        step
    }

    fn script(&self) -> Vec<Outcome> {
        let mut s = Vec::new();
        if self.lost {
            s.push(Outcome::Lose);
        }
        for _ in 0..self.fails {
            s.push(if self.hang {
                Outcome::Hang
            } else if self.fatal {
                Outcome::Fatal("fatal".into())
            } else {
                Outcome::Fail("flaky".into())
            });
        }
        s.push(Outcome::Ok("ok".into()));
        s
    }
}

fn build_harness(dag_steps: &[GenStep], finally: &[GenStep]) -> Harness {
    let mut s = WorkflowSpec::default();
    let mut ids = Vec::new();
    for (i, g) in dag_steps.iter().enumerate() {
        let id = format!("s{i}");
        s.steps.push(g.build(&id, &ids));
        ids.push(id);
    }
    let mut fids = Vec::new();
    for (i, g) in finally.iter().enumerate() {
        let id = format!("f{i}");
        s.finally.push(g.build(&id, &fids));
        fids.push(id);
    }
    let mut h = Harness::new(s);
    for (id, g) in ids.iter().chain(&fids).zip(dag_steps.iter().chain(finally)) {
        h.scripts.insert(id.clone(), g.script());
        h.delays.insert(id.clone(), secs(g.delay.into()));
    }
    h
}

/// 64 cases by default, to keep the suite fast; `PROPTEST_CASES=5000` digs deeper.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_dags_run_to_a_consistent_end(
        dag_steps in prop::collection::vec(gen_step(), 1..20),
        finally in prop::collection::vec(gen_step(), 0..3),
    ) {
        let mut h = build_harness(&dag_steps, &finally);
        // The harness checks, on every pass: no (key, attempt) started twice (but lost work),
        // dependencies finished before a start, retryAt honoured, maxParallel, progress,
        // and that a second pass at the same time changes nothing.
        h.run_bounded(2_000);
        let phase = h.status.phase;
        prop_assert!(phase == RunPhase::Succeeded || phase == RunPhase::Failed, "{phase:?}");
        // Every step and child settled, and no task was left running.
        for (key, row) in &h.status.steps {
            prop_assert!(row.phase.is_finished(), "{key} is {:?}", row.phase);
        }
        prop_assert!(h.in_flight.is_empty(), "tasks left running: {:?}", h.in_flight);
        prop_assert_eq!(&h.status.progress, &format!("{0}/{0}", h.dag.len()));
        prop_assert!(h.status.finished_at.is_some());
        // Succeeded iff no step failed for good, and that is exactly when the model says no
        // step would.
        let hard_failed: Vec<&String> = h.status.steps.iter()
            .filter(|(k, r)| r.phase == StepPhase::Failed && !k.contains('[')
                && !step_at(&h.spec, h.dag.index_of(k).unwrap()).continue_on_error)
            .map(|(k, _)| k)
            .collect();
        prop_assert_eq!(phase == RunPhase::Succeeded, hard_failed.is_empty(), "hard failures: {:?}", hard_failed);
        let any_would_fail = dag_steps.iter().chain(&finally).any(GenStep::would_fail);
        prop_assert_eq!(phase == RunPhase::Failed, any_would_fail);
        // No key is started more often than its retry policy allows (lost work aside).
        for (i, g) in dag_steps.iter().chain(&finally).enumerate() {
            let id = h.dag.id(i).to_string();
            for s in h.starts.iter().filter(|s| s.task.step_id == id) {
                prop_assert!(s.task.attempt <= u32::from(g.retry) + 1);
            }
            if g.skip {
                prop_assert!(h.phase(&id) == StepPhase::Skipped || h.phase(&id) == StepPhase::Cancelled);
            }
        }
        // With no failures at all, everything ran and succeeded (or was skipped by `when`).
        if !any_would_fail {
            for (i, g) in dag_steps.iter().chain(&finally).enumerate() {
                let p = h.phase(h.dag.id(i));
                prop_assert!(p == StepPhase::Succeeded || p == StepPhase::Skipped || (g.coe && p == StepPhase::Failed), "{}: {p:?}", h.dag.id(i));
            }
        }
    }

    #[test]
    fn random_dags_cancel_or_suspend_cleanly(
        dag_steps in prop::collection::vec(gen_step(), 1..15),
        finally in prop::collection::vec(gen_step(), 0..2),
        stop_after in 0usize..12,
        suspend_for in 0usize..4,
        cancel in any::<bool>(),
        deadline in prop::option::of(0u64..30),
    ) {
        let mut h = build_harness(&dag_steps, &finally);
        h.deadline = deadline.map(|d| h.t0 + secs(d));
        for _ in 0..stop_after {
            if h.status.phase.is_finished() { break; }
            h.tick();
        }
        // Suspend for a few passes: no new DAG step starts meanwhile.
        if !h.status.phase.is_finished() && suspend_for > 0 {
            h.suspend = true;
            let n = h.starts.len();
            for _ in 0..suspend_for {
                h.tick();
                if h.status.phase.is_finished() { break; }
                prop_assert_eq!(h.status.phase, RunPhase::Suspended);
            }
            prop_assert_eq!(h.starts.len(), n, "started while suspended");
            h.suspend = false;
        }
        let finished_before = h.status.phase.is_finished();
        if cancel && !finished_before {
            h.cancel = true;
            let n = h.starts.len();
            h.run_bounded(2_000);
            prop_assert_eq!(h.status.phase, RunPhase::Cancelled);
            // Only finally steps start after a cancel.
            for s in &h.starts[n..] {
                prop_assert!(h.dag.is_finally(h.dag.index_of(&s.task.step_id).unwrap()), "{} started after cancel", s.task.key);
            }
            for i in h.dag.dag_steps() {
                let p = h.phase(h.dag.id(i));
                prop_assert!(p.is_finished(), "{}: {p:?}", h.dag.id(i));
            }
        } else {
            h.run_bounded(2_000);
            prop_assert!(h.status.phase.is_finished());
        }
        if let Some(d) = deadline {
            // No DAG step starts once the deadline has passed, and a run that succeeded
            // finished in time.
            for s in &h.starts {
                let i = h.dag.index_of(&s.task.step_id).unwrap();
                prop_assert!(h.dag.is_finally(i) || s.at < secs(d), "{} started at {:?}", s.task.key, s.at);
            }
            if h.status.phase == RunPhase::Succeeded {
                prop_assert!(h.status.finished_at.as_ref().unwrap().0 < h.t0 + secs(d));
            }
            if h.status.message == "run timed out" {
                prop_assert_eq!(h.status.phase, RunPhase::Failed);
            }
        }
        prop_assert!(h.in_flight.is_empty(), "tasks left running: {:?}", h.in_flight);
        for (key, row) in &h.status.steps {
            prop_assert!(row.phase.is_finished(), "{key} is {:?}", row.phase);
        }
    }
}

// ---- control flow: loops, approvals, waits, the run's output ----

fn decide(kind: crate::api::DecisionKind, comment: &str) -> crate::api::StepDecision {
    crate::api::StepDecision { decision: kind, comment: Some(comment.into()), by: Some("ada".into()) }
}

fn review_loop(max: u32) -> Step {
    Step {
        id: "rl".into(),
        loop_: Some(crate::api::LoopStep {
            max_iterations: max,
            until: "'APPROVED' in steps.review.output".into(),
            on_max: Default::default(),
            steps: vec![
                with(http("code", &[]), |s| {
                    s.http.as_mut().unwrap().body = Some(
                        "{{ params.task }} #{{ loop.iteration }}{% if loop.previous %} fix: {{ loop.previous.steps.review.output }}{% endif %}"
                            .into(),
                    )
                }),
                with(http("review", &["code"]), |s| {
                    s.http.as_mut().unwrap().body = Some("{{ steps.code.output }}".into())
                }),
            ],
        }),
        ..Default::default()
    }
}

fn loop_spec(max: u32) -> WorkflowSpec {
    let mut s = spec(vec![
        tmpl("plan", &[], "the plan"),
        with(review_loop(max), |s| s.depends_on = vec!["plan".into()]),
        tmpl("after", &["rl"], "{{ steps.rl.output }} after {{ steps.rl.iterations }}"),
    ]);
    s.params = vec![ParamSpec { name: "task".into(), default: Some(Json::from("build it")), ..Default::default() }];
    s.output = Some("{{ steps.after.output }}".into());
    s
}

fn loop_harness(max: u32) -> Harness {
    let s = loop_spec(max);
    let mut h = Harness::new(s.clone());
    h.params = crate::engine::params::resolve(&s, &BTreeMap::new()).unwrap();
    // Scripts by key: each iteration's review is a key of its own.
    h.script("rl.1.review", vec![Outcome::Ok("fix the tests".into())])
        .script("rl.2.review", vec![Outcome::Ok("add docs".into())])
        .script("rl.3.review", vec![Outcome::Ok("APPROVED".into())])
}

#[test]
fn a_loop_repeats_until_its_condition_holds_and_every_iteration_is_in_status() {
    let mut h = loop_harness(5);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded, "{:#?}", h.status);
    assert_eq!(h.row("rl").iterations, Some(3));
    assert_eq!(h.output("rl"), "APPROVED");
    assert_eq!(h.row("rl").message, "until held after 3 iterations");
    for n in 1..=3 {
        assert_eq!(h.phase(&format!("rl.{n}.code")), StepPhase::Succeeded);
        assert_eq!(h.phase(&format!("rl.{n}.review")), StepPhase::Succeeded);
    }
    assert!(!h.status.steps.contains_key("rl.4.code"));
    // loop.iteration and loop.previous in the loop's templates.
    assert_eq!(http_body(h.start_of("rl.1.code")).unwrap(), "build it #1");
    assert_eq!(http_body(h.start_of("rl.2.code")).unwrap(), "build it #2 fix: fix the tests");
    assert_eq!(http_body(h.start_of("rl.3.code")).unwrap(), "build it #3 fix: add docs");
    assert_eq!(http_body(h.start_of("rl.3.review")).unwrap(), "out:rl.3.code");
    // After the loop: output and iterations; the run's output.
    assert_eq!(h.output("after"), "APPROVED after 3");
    assert_eq!(h.status.output.as_deref(), Some("APPROVED after 3"));
    assert_eq!(h.status.progress, "3/3");
    // Inner transitions are reported under their keys.
    assert_eq!(h.step_transitions("rl.2.review"), [("Running".to_string(), 1), ("Succeeded".to_string(), 1)]);
}

#[test]
fn a_loop_that_reaches_max_iterations_fails_unless_on_max_succeeds() {
    let mut h = loop_harness(2);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.phase("rl"), StepPhase::Failed);
    assert_eq!(h.row("rl").message, "until did not hold in 2 iterations (maxIterations)");
    assert_eq!(h.phase("after"), StepPhase::Skipped);
    assert_eq!(h.status.output, None);

    let mut s = loop_spec(2);
    s.steps[1].loop_.as_mut().unwrap().on_max = crate::api::OnMax::Succeed;
    let mut h = Harness::new(s.clone()).script("review", vec![Outcome::Ok("nope".into())]);
    h.params = crate::engine::params::resolve(&s, &BTreeMap::new()).unwrap();
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.output("rl"), "nope");
}

#[test]
fn a_loop_of_templates_runs_all_its_iterations_in_one_pass() {
    let s = spec(vec![Step {
        id: "count".into(),
        loop_: Some(crate::api::LoopStep {
            max_iterations: 10,
            until: "steps.n.output == '4'".into(),
            on_max: Default::default(),
            steps: vec![tmpl("n", &[], "{{ loop.iteration }}")],
        }),
        ..Default::default()
    }]);
    let mut h = Harness::new(s);
    h.advance(vec![]);
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.row("count").iterations, Some(4));
    assert_eq!(h.output("count"), "4");
    assert_eq!(h.output("count.2.n"), "2");
}

#[test]
fn retries_when_and_for_each_work_inside_a_loop() {
    let s = spec(vec![Step {
        id: "l".into(),
        loop_: Some(crate::api::LoopStep {
            max_iterations: 3,
            until: "loop.iteration == 2".into(),
            on_max: Default::default(),
            steps: vec![
                with(http("flaky", &[]), |s| s.retry = retry(2, 1.0, 1.0, 1.0)),
                with(http("fan", &["flaky"]), |s| s.for_each = Some("[1, 2, 3]".into())),
                with(tmpl("odd", &["fan"], "odd"), |s| s.when = Some("loop.iteration == 1".into())),
            ],
        }),
        ..Default::default()
    }]);
    let mut h = Harness::new(s).script("l.1.flaky", vec![Outcome::Fail("boom".into()), Outcome::Ok("ok".into())]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded, "{:#?}", h.status);
    assert_eq!(h.starts_of("l.1.flaky").len(), 2);
    assert_eq!(h.row("l.1.fan").items, Some(3));
    assert_eq!(h.phase("l.2.fan[2]"), StepPhase::Succeeded);
    assert_eq!(h.phase("l.1.odd"), StepPhase::Succeeded);
    assert_eq!(h.phase("l.2.odd"), StepPhase::Skipped);
    // The loop's output: its last step that has one.
    assert_eq!(h.output("l"), r#"["out:l.2.fan[0]","out:l.2.fan[1]","out:l.2.fan[2]"]"#);
}

#[test]
fn cancel_and_suspend_reach_inside_a_loop() {
    let mut h = loop_harness(5).script("code", vec![Outcome::Hang]);
    h.tick();
    assert_eq!(h.phase("rl.1.code"), StepPhase::Running);
    h.suspend = true;
    h.advance(vec![]);
    assert_eq!(h.status.phase, RunPhase::Suspended);
    h.cancel = true;
    let d = h.advance(vec![]);
    assert!(d.actions.iter().any(|a| matches!(a, Action::Abort { key, .. } if key == "rl.1.code")), "{d:?}");
    assert_eq!(h.phase("rl.1.code"), StepPhase::Cancelled);
    assert_eq!(h.phase("rl"), StepPhase::Cancelled);
    assert_eq!(h.status.phase, RunPhase::Cancelled);

    // Suspended between iterations: the next iteration starts nothing until resumed.
    let mut h = loop_harness(5);
    h.run_until(|h| h.phase("rl.1.review") == StepPhase::Running);
    h.suspend = true;
    h.set_time(secs(1000));
    let events = h.take_due();
    let d = h.advance(events);
    assert!(d.actions.is_empty(), "{d:?}");
    assert_eq!(h.row("rl").iterations, Some(2));
    assert_eq!(h.phase("rl.2.code"), StepPhase::Pending);
    h.suspend = false;
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
}

#[test]
fn after_a_restart_a_loop_goes_on_in_its_iteration_without_running_finished_steps_again() {
    let mut h = loop_harness(5);
    h.run_until(|h| h.phase("rl.2.review") == StepPhase::Running);
    // The operator restarts: the in-process work is lost, the status stays.
    let status = h.status.clone();
    let mut h = loop_harness(5);
    h.status = status;
    h.advance(vec![Event::Lost { key: "rl.2.review".into(), attempt: 1 }]);
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert!(h.starts_of("rl.1.code").is_empty() && h.starts_of("rl.2.code").is_empty(), "finished steps ran again");
    assert_eq!(h.starts_of("rl.2.review").len(), 1);
    // Results of an earlier iteration are stale.
    let d = h.advance(vec![Event::Succeeded {
        key: "rl.1.review".into(),
        attempt: 1,
        output: "x".into(),
        info: TaskInfo::default(),
    }]);
    assert!(d.transitions.is_empty());
}

fn approval(id: &str, deps: &[&str], timeout: Option<u32>, on_timeout: crate::api::OnTimeout) -> Step {
    Step {
        id: id.into(),
        depends_on: deps.iter().map(|s| s.to_string()).collect(),
        approval: Some(crate::api::ApprovalStep {
            message: Some("Deploy {{ steps.build.output }}?".into()),
            timeout_seconds: timeout,
            on_timeout,
        }),
        ..Default::default()
    }
}

#[test]
fn an_approval_waits_for_its_decision() {
    use crate::api::{DecisionKind, OnTimeout};
    let s = spec(vec![
        http("build", &[]),
        approval("sign-off", &["build"], None, OnTimeout::Reject),
        http("deploy", &["sign-off"]),
    ]);
    let mut h = Harness::new(s.clone());
    h.run_until(|h| h.phase("sign-off") == StepPhase::Waiting);
    assert_eq!(h.row("sign-off").message, "Deploy out:build?");
    assert_eq!(h.status.message, "waiting for approval: sign-off");
    h.set_time(secs(100_000));
    let d = h.advance(vec![]);
    assert!(d.actions.is_empty() && d.requeue_after.is_none(), "no worker, no polling: {d:?}");
    h.decisions.insert("sign-off".into(), decide(DecisionKind::Approve, "ship it"));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.output("sign-off"), "ship it");
    assert_eq!(h.row("sign-off").message, "approved by ada");
    assert_eq!(
        h.step_transitions("sign-off").iter().map(|t| t.0.as_str()).collect::<Vec<_>>(),
        ["Waiting", "Succeeded"]
    );

    let mut h = Harness::new(s.clone());
    h.decisions.insert("sign-off".into(), decide(DecisionKind::Reject, "not today"));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Failed);
    assert_eq!(h.row("sign-off").message, "rejected by ada: not today");
    assert_eq!(h.phase("deploy"), StepPhase::Skipped);
}

#[test]
fn an_approval_times_out_to_its_on_timeout() {
    use crate::api::OnTimeout;
    for (on_timeout, phase) in [(OnTimeout::Reject, RunPhase::Failed), (OnTimeout::Approve, RunPhase::Succeeded)] {
        let s = spec(vec![http("build", &[]), approval("ok", &["build"], Some(60), on_timeout)]);
        let mut h = Harness::new(s);
        h.run();
        assert_eq!(h.status.phase, phase);
        assert!(h.row("ok").message.starts_with("no decision in time"), "{}", h.row("ok").message);
        assert!(h.elapsed() >= secs(60) && h.elapsed() < secs(62), "{:?}", h.elapsed());
    }
}

#[test]
fn an_approval_inside_a_loop_is_decided_by_its_key_and_cancel_settles_it() {
    let s = spec(vec![
        http("build", &[]),
        Step {
            id: "l".into(),
            depends_on: vec!["build".into()],
            loop_: Some(crate::api::LoopStep {
                max_iterations: 3,
                until: "steps.ok.phase == 'Succeeded'".into(),
                on_max: Default::default(),
                steps: vec![approval("ok", &[], None, Default::default())],
            }),
            ..Default::default()
        },
    ]);
    let mut h = Harness::new(s.clone());
    h.run_until(|h| h.phase("l.1.ok") == StepPhase::Waiting);
    assert_eq!(h.status.message, "waiting for approval: l.1.ok");
    h.decisions.insert("l.1.ok".into(), decide(crate::api::DecisionKind::Approve, "fine"));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.output("l"), "fine");

    let mut h = Harness::new(s);
    h.run_until(|h| h.phase("l.1.ok") == StepPhase::Waiting);
    h.cancel = true;
    h.advance(vec![]);
    assert_eq!(h.phase("l.1.ok"), StepPhase::Cancelled);
    assert_eq!(h.status.phase, RunPhase::Cancelled);
}

#[test]
fn a_wait_holds_no_worker_and_ends_on_time() {
    let s = spec(vec![
        Step {
            id: "cool".into(),
            wait: Some(crate::api::WaitStep { seconds: Some(30), until: None }),
            ..Default::default()
        },
        Step {
            id: "until".into(),
            depends_on: vec!["cool".into()],
            wait: Some(crate::api::WaitStep { seconds: None, until: Some("2023-11-14T22:14:00Z".into()) }),
            ..Default::default()
        },
        http("after", &["until"]),
    ]);
    let mut h = Harness::new(s);
    let d = h.tick();
    assert!(d.actions.is_empty());
    assert_eq!(h.phase("cool"), StepPhase::Waiting);
    assert_eq!(d.requeue_after, Some(secs(30)));
    h.run();
    assert_eq!(h.status.phase, RunPhase::Succeeded);
    assert_eq!(h.start_of("after").key, "after");
    // 1_700_000_000 is 2023-11-14T22:13:20Z: the second wait ends 40s after the first began.
    assert_eq!(h.starts_of("after")[0].1, 40.0);
}

#[test]
fn a_wait_until_a_bad_time_fails_naming_the_field() {
    let s = spec(vec![Step {
        id: "w".into(),
        wait: Some(crate::api::WaitStep { seconds: None, until: Some("{{ run.name }}".into()) }),
        ..Default::default()
    }]);
    let mut h = Harness::new(s);
    h.run();
    assert_eq!(h.phase("w"), StepPhase::Failed);
    assert!(h.row("w").message.starts_with("wait.until: \"run-1\" is not an RFC 3339 time"), "{}", h.row("w").message);
}

#[test]
fn a_runtime_that_takes_a_loop_or_a_waiting_step_for_lost_changes_nothing() {
    let mut h = loop_harness(5);
    h.run_until(|h| h.phase("rl.1.review") == StepPhase::Running);
    let before = h.status.clone();
    let d = h.advance(vec![Event::Lost { key: "rl".into(), attempt: 1 }]);
    assert!(d.actions.is_empty() && d.transitions.is_empty(), "{d:?}");
    assert_eq!(h.status, before);
}
