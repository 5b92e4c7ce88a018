//! Kubernetes Events, published off the reconcile path through a bounded queue. Repeated
//! events on one object become a series (one object, a count) instead of a flood.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tracing::debug;

use crate::metrics::Metrics;

const QUEUE: usize = 4096;

/// A handle to publish events; cloning is cheap.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    metrics: Metrics,
}

impl EventSink {
    /// Starts the publisher task.
    pub fn start(client: Client, metrics: Metrics) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        let reporter = Reporter { controller: "volt-operator".into(), instance: std::env::var("POD_NAME").ok() };
        let recorder = Recorder::new(client, reporter);
        tokio::spawn(async move {
            while let Some((ev, reference)) = rx.recv().await {
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    debug!(error = %e, reason = %ev.reason, "publishing an event failed");
                }
            }
        });
        Self { tx, metrics }
    }

    /// Queues an event; never waits. A full queue drops it and counts the drop.
    pub fn publish(&self, reference: ObjectReference, warning: bool, reason: &str, action: &str, note: String) {
        self.publish_related(reference, None, warning, reason, action, note)
    }

    /// Queues an event about `reference` that also concerns `related` (a replica's pod of an
    /// Agent, say). Repeats of one reason on one object become a series; a related object
    /// keeps the events of different related objects apart.
    pub fn publish_related(
        &self,
        reference: ObjectReference,
        related: Option<ObjectReference>,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let note: String = note.chars().take(1000).collect();
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: related,
        };
        if self.tx.try_send((ev, reference)).is_err() {
            self.metrics.events_dropped.with_label_values(&["kubernetes"]).inc();
        }
    }
}
