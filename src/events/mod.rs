//! The event dispatcher: typed internal events with a correlation id (the run UID), delivered
//! to handlers in priority order by one task behind a bounded queue, so publishing never
//! blocks a reconcile. A full queue drops the batch and counts it.
//!
//! Handlers: [`EventLog`] (a bounded in-memory log, queryable for replay at
//! `/api/v1/events?correlationId=`), [`KubernetesEvents`] (one aggregated Kubernetes Event per
//! batch on the involved object) and [`CloudEventsSink`] (structured CloudEvents over HTTP,
//! with retries).

mod cloudevents;
mod log;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use serde::Serialize;
use tokio::sync::mpsc;

pub use cloudevents::CloudEventsSink;
pub use log::EventLog;

use crate::controllers::events::EventSink;
use crate::metrics::Metrics;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    ReplicaHealthy,
    ReplicaUnhealthy,
    CacheEviction,
}

impl EventKind {
    pub fn is_warning(self) -> bool {
        matches!(self, EventKind::RunFailed | EventKind::StepFailed | EventKind::ReplicaUnhealthy)
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
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VoltEvent {
    /// Increasing id, unique within this process.
    pub id: u64,
    pub time: Timestamp,
    pub kind: EventKind,
    /// The run UID for run and step events; the agent UID for replica events.
    pub correlation_id: String,
    pub namespace: String,
    /// The involved object (`WorkflowRun/name`, `Agent/name`).
    pub object: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub attempt: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
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
    next_id: Arc<AtomicU64>,
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
        Self { tx, next_id: Arc::new(AtomicU64::new(1)), metrics }
    }

    /// A new event (id and time filled in).
    pub fn event(&self, kind: EventKind, correlation_id: &str, namespace: &str, object: String) -> VoltEvent {
        VoltEvent {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            time: Timestamp::now(),
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

/// Publishes each batch as one Kubernetes Event on the involved object (a series when it
/// repeats), rather than one per transition.
pub struct KubernetesEvents {
    pub sink: EventSink,
}

impl Handler for KubernetesEvents {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(reference) = &batch.reference else { return };
            let warning = batch.events.iter().any(|e| e.kind.is_warning());
            // The run's own transition names the event; otherwise a step failure, otherwise
            // plain progress.
            let reason = match batch.events.iter().find(|e| e.step.is_none()) {
                Some(run_event) => format!("{:?}", run_event.kind),
                None if warning => "StepFailed".to_string(),
                None => "StepsProgressed".to_string(),
            };
            let mut notes: Vec<String> = batch
                .events
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
            self.sink.publish(reference.clone(), warning, &reason, "Reconcile", note);
        })
    }
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
