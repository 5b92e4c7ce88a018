//! The event dispatcher: typed internal events with a correlation id (the run UID), delivered
//! to handlers in priority order by one task behind a bounded queue, so publishing never
//! blocks a reconcile. A full queue drops the batch and counts it.
//!
//! Handlers: [`EventLog`] (a bounded in-memory log, queryable for replay at
//! `/api/v1/events?correlationId=`, which also keeps each run's events in a ConfigMap owned by
//! the run: [`store`]), [`KubernetesEvents`] (one aggregated Kubernetes Event per
//! batch on the involved object) and [`CloudEventsSink`] (structured CloudEvents over HTTP,
//! with retries).

mod cloudevents;
mod kubernetes;
mod log;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use cloudevents::CloudEventsSink;
pub use kubernetes::EventSink;
pub use log::EventLog;

use crate::locks::lock;
use crate::metrics::Metrics;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    RunStarted,
    RunSucceeded,
    RunFailed,
    RunCancelled,
    RunSuspended,
    StepStarted,
    StepSucceeded,
    StepFailed,
    StepRetried,
    StepCached,
    StepSkipped,
    StepCancelled,
    /// A step waits for a decision or a time.
    StepWaiting,
    ReplicaHealthy,
    ReplicaUnhealthy,
    CacheEviction,
}

impl EventKind {
    pub fn is_warning(self) -> bool {
        matches!(self, EventKind::RunFailed | EventKind::StepFailed | EventKind::ReplicaUnhealthy)
    }
    /// Whether the run ended or paused: what its event log writes at once.
    pub fn is_run_end(self) -> bool {
        matches!(
            self,
            EventKind::RunSucceeded | EventKind::RunFailed | EventKind::RunCancelled | EventKind::RunSuspended
        )
    }
    /// The CloudEvents `type`.
    pub fn cloud_type(self) -> String {
        let name = format!("{self:?}");
        let mut out = String::from("dev.volt.");
        for (i, ch) in name.chars().enumerate() {
            if ch.is_uppercase() && i > 0 {
                out.push('.');
            }
            out.push(ch.to_ascii_lowercase());
        }
        out
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoltEvent {
    /// Increasing id: the time of the event in Unix microseconds, or one more than the id before
    /// it in this process when that is larger ([`next_id`]). So ids also increase across
    /// restarts and replicas (whose clocks agree), and `after=` pages through a run's events
    /// whoever emitted them. Below 2^53: exact as a JSON number.
    pub id: u64,
    pub time: Timestamp,
    pub kind: EventKind,
    /// The run UID for run and step events; the agent UID for replica events.
    pub correlation_id: String,
    pub namespace: String,
    /// The involved object (`WorkflowRun/name`, `Agent/name`).
    pub object: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A batch of events about one object, from one reconcile.
#[derive(Debug, Clone)]
pub struct Batch {
    pub events: Vec<VoltEvent>,
    /// The involved object, for Kubernetes Events.
    pub reference: Option<ObjectReference>,
}

/// Receives batches in the dispatcher's task.
pub trait Handler: Send + Sync {
    fn name(&self) -> &'static str;
    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, ()>;
}

const QUEUE: usize = 1024;

/// Where components publish events.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<Batch>,
    /// The id of the latest event.
    last_id: Arc<AtomicU64>,
    metrics: Metrics,
}

impl Dispatcher {
    /// Starts the delivery task; handlers run in ascending `priority` order.
    pub fn start(mut handlers: Vec<(i32, Arc<dyn Handler>)>, metrics: Metrics) -> Self {
        handlers.sort_by_key(|(p, _)| *p);
        let (tx, mut rx) = mpsc::channel::<Batch>(QUEUE);
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                for (_, h) in &handlers {
                    h.handle(&batch).await;
                }
            }
        });
        Self { tx, last_id: Arc::new(AtomicU64::new(0)), metrics }
    }

    /// A new event (id and time filled in).
    pub fn event(&self, kind: EventKind, correlation_id: &str, namespace: &str, object: String) -> VoltEvent {
        let time = Timestamp::now();
        let now = u64::try_from(time.as_microsecond()).unwrap_or(0);
        let mut last = self.last_id.load(Ordering::Relaxed);
        let id = loop {
            let id = next_id(last, now);
            match self.last_id.compare_exchange_weak(last, id, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break id,
                Err(seen) => last = seen,
            }
        };
        VoltEvent {
            id,
            time,
            kind,
            correlation_id: correlation_id.to_string(),
            namespace: namespace.to_string(),
            object,
            step: None,
            attempt: 0,
            message: String::new(),
        }
    }

    /// Queues a batch; never waits. A full queue drops it and counts the drop.
    pub fn publish(&self, batch: Batch) {
        if batch.events.is_empty() {
            return;
        }
        let n = batch.events.len() as u64;
        if self.tx.try_send(batch).is_err() {
            self.metrics.events_dropped.with_label_values(&["dispatcher"]).inc_by(n);
        }
    }
}

/// The id after `last` at `now_micros` (Unix microseconds): `max(last + 1, now)`. Increasing
/// within a process, and past any id of an earlier process while the clock goes forward.
pub fn next_id(last: u64, now_micros: u64) -> u64 {
    last.saturating_add(1).max(now_micros)
}

/// Publishes the transitions of an object as Kubernetes Events (a series when one repeats),
/// coalesced: step progress on one object within `window` becomes one Event (with the run's
/// start); the end of a run and warnings are published at once, with the progress gathered
/// before them.
pub struct KubernetesEvents {
    sink: EventSink,
    window: Duration,
    pending: Arc<Mutex<HashMap<String, Pending>>>,
}

struct Pending {
    reference: ObjectReference,
    events: Vec<VoltEvent>,
    since: Instant,
}

fn object_key(r: &ObjectReference) -> String {
    format!(
        "{}/{}/{}/{}",
        r.kind.as_deref().unwrap_or_default(),
        r.namespace.as_deref().unwrap_or_default(),
        r.name.as_deref().unwrap_or_default(),
        r.uid.as_deref().unwrap_or_default()
    )
}

impl KubernetesEvents {
    /// A handler that coalesces progress over `window` (zero: one Event per batch). Starts its
    /// flushing task, which ends when the handler is dropped.
    pub fn new(sink: EventSink, window: Duration) -> Self {
        let pending: Arc<Mutex<HashMap<String, Pending>>> = Arc::default();
        if !window.is_zero() {
            let weak = Arc::downgrade(&pending);
            let flusher = sink.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((window / 4).max(Duration::from_millis(10)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(pending) = weak.upgrade() else { return };
                    let due: Vec<Pending> = {
                        let mut map = lock(&pending);
                        let keys: Vec<String> =
                            map.iter().filter(|(_, p)| p.since.elapsed() >= window).map(|(k, _)| k.clone()).collect();
                        keys.iter().filter_map(|k| map.remove(k)).collect()
                    };
                    for p in due {
                        publish_events(&flusher, &p.reference, &p.events);
                    }
                }
            });
        }
        Self { sink, window, pending }
    }
}

impl Handler for KubernetesEvents {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(reference) = &batch.reference else { return };
            // A run starting waits with its first steps; its end and failures go at once.
            let urgent = self.window.is_zero()
                || batch
                    .events
                    .iter()
                    .any(|e| (e.step.is_none() && e.kind != EventKind::RunStarted) || e.kind.is_warning());
            let key = object_key(reference);
            let mut events = {
                let mut map = lock(&self.pending);
                let p = map.entry(key.clone()).or_insert_with(|| Pending {
                    reference: reference.clone(),
                    events: Vec::new(),
                    since: Instant::now(),
                });
                p.events.extend(batch.events.iter().cloned());
                if !urgent && p.since.elapsed() < self.window {
                    return;
                }
                map.remove(&key).map(|p| p.events).unwrap_or_default()
            };
            events.sort_by_key(|e| e.id);
            publish_events(&self.sink, reference, &events);
        })
    }
}

/// One Kubernetes Event for `events` (transitions of one object).
fn publish_events(sink: &EventSink, reference: &ObjectReference, events: &[VoltEvent]) {
    if events.is_empty() {
        return;
    }
    let warning = events.iter().any(|e| e.kind.is_warning());
    // The object's own transition names the event (the last one: a run that started and
    // finished in one window is named by its end); otherwise a step failure, otherwise plain
    // progress.
    let reason = match events.iter().rev().find(|e| e.step.is_none()) {
        Some(run_event) => format!("{:?}", run_event.kind),
        None if warning => "StepFailed".to_string(),
        None => "StepsProgressed".to_string(),
    };
    let mut notes: Vec<String> = events
        .iter()
        .map(|e| {
            let what = match &e.step {
                Some(s) => format!("step {s} {}", kind_verb(e.kind)),
                None => format!("run {}", kind_verb(e.kind)),
            };
            if e.message.is_empty() { what } else { format!("{what} ({})", e.message) }
        })
        .collect();
    notes.dedup();
    let mut note = notes.join("; ");
    if note.len() > 900 {
        let mut end = 900;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    sink.publish(reference.clone(), warning, &reason, "Reconcile", note);
}

fn kind_verb(k: EventKind) -> &'static str {
    match k {
        EventKind::RunStarted | EventKind::StepStarted => "started",
        EventKind::RunSucceeded | EventKind::StepSucceeded => "succeeded",
        EventKind::RunFailed | EventKind::StepFailed => "failed",
        EventKind::RunCancelled | EventKind::StepCancelled => "cancelled",
        EventKind::RunSuspended => "suspended",
        EventKind::StepRetried => "retrying",
        EventKind::StepCached => "served from cache",
        EventKind::StepSkipped => "skipped",
        EventKind::StepWaiting => "waiting",
        EventKind::ReplicaHealthy => "healthy",
        EventKind::ReplicaUnhealthy => "unhealthy",
        EventKind::CacheEviction => "evicted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_types_are_dotted() {
        assert_eq!(EventKind::StepSucceeded.cloud_type(), "dev.volt.step.succeeded");
        assert_eq!(EventKind::ReplicaUnhealthy.cloud_type(), "dev.volt.replica.unhealthy");
    }

    #[test]
    fn ids_follow_the_clock_and_always_increase() {
        assert_eq!(next_id(0, 1_700_000_000_000_000), 1_700_000_000_000_000, "a new process starts at the clock");
        assert_eq!(next_id(1_700_000_000_000_000, 1_700_000_000_000_000), 1_700_000_000_000_001, "same microsecond");
        assert_eq!(next_id(1_700_000_000_000_500, 1_700_000_000_000_100), 1_700_000_000_000_501, "clock behind");
        assert_eq!(next_id(u64::MAX, 0), u64::MAX);
    }

    #[tokio::test]
    async fn ids_increase_within_a_process_and_past_the_previous_process() {
        let d = Dispatcher::start(Vec::new(), Metrics::new());
        let before = u64::try_from(Timestamp::now().as_microsecond()).unwrap_or(0);
        let ids: Vec<u64> =
            (0..1000).map(|_| d.event(EventKind::StepStarted, "u", "ns", "WorkflowRun/r".into()).id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing");
        assert!(ids[0] >= before, "from the clock: {} < {before}", ids[0]);
        // A restarted process (a new dispatcher, once the clock has passed the ids of the one
        // before, as it has after any real restart) goes on above them.
        let last = ids.last().copied().unwrap_or_default();
        while u64::try_from(Timestamp::now().as_microsecond()).unwrap_or(0) <= last {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let again = Dispatcher::start(Vec::new(), Metrics::new());
        let first = again.event(EventKind::StepStarted, "u", "ns", "WorkflowRun/r".into()).id;
        assert!(first > last, "{first} after {last}");
    }

    #[tokio::test]
    async fn delivers_to_handlers_in_priority_order_and_counts_drops() {
        struct Rec(Arc<std::sync::Mutex<Vec<&'static str>>>, &'static str);
        impl Handler for Rec {
            fn name(&self) -> &'static str {
                self.1
            }
            fn handle<'a>(&'a self, _b: &'a Batch) -> BoxFuture<'a, ()> {
                Box::pin(async move { self.0.lock().unwrap().push(self.1) })
            }
        }
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let metrics = Metrics::new();
        let log = Arc::new(EventLog::new(10));
        let d = Dispatcher::start(
            vec![
                (20, Arc::new(Rec(seen.clone(), "second")) as Arc<dyn Handler>),
                (10, Arc::new(Rec(seen.clone(), "first"))),
                (30, log.clone()),
            ],
            metrics.clone(),
        );
        let e = d.event(EventKind::RunStarted, "uid-1", "ns", "WorkflowRun/r".into());
        d.publish(Batch { events: vec![e], reference: None });
        for _ in 0..100 {
            if log.len() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(*seen.lock().unwrap(), vec!["first", "second"]);
        assert_eq!(log.query(Some("uid-1"), None, 10).len(), 1);
    }
}
