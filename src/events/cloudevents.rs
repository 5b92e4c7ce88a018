//! Structured-mode CloudEvents 1.0 over HTTP, one POST per event, retried with backoff.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use tracing::debug;

use super::{Batch, Handler, VoltEvent};
use crate::metrics::Metrics;

pub struct CloudEventsSink {
    url: String,
    client: reqwest::Client,
    retries: u32,
    metrics: Metrics,
}

impl CloudEventsSink {
    pub fn new(url: String, metrics: Metrics) -> Self {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap_or_default();
        Self { url, client, retries: 3, metrics }
    }

    /// The CloudEvent of an event.
    pub fn envelope(e: &VoltEvent) -> serde_json::Value {
        json!({
            "specversion": "1.0",
            "id": format!("{}-{}", e.correlation_id, e.id),
            "source": format!("/apis/volt.dev/v1alpha1/namespaces/{}/{}", e.namespace, e.object),
            "type": e.kind.cloud_type(),
            "time": e.time.to_string(),
            "subject": e.step.clone().unwrap_or_else(|| e.object.clone()),
            "datacontenttype": "application/json",
            "correlationid": e.correlation_id,
            "data": e,
        })
    }

    async fn send(&self, e: &VoltEvent) {
        let body = Self::envelope(e);
        let mut delay = Duration::from_millis(200);
        for attempt in 0..=self.retries {
            let res = self
                .client
                .post(&self.url)
                .header("content-type", "application/cloudevents+json")
                .json(&body)
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => return,
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    debug!(status = %r.status(), "CloudEvents sink rejected an event");
                    break;
                }
                Ok(_) | Err(_) if attempt < self.retries => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                _ => break,
            }
        }
        self.metrics.events_dropped.with_label_values(&["cloudevents"]).inc();
    }
}

impl Handler for CloudEventsSink {
    fn name(&self) -> &'static str {
        "cloudevents"
    }

    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            for e in &batch.events {
                self.send(e).await;
            }
        })
    }
}
