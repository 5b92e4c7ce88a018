//! The live stream of a run page: server-sent events from the shared run watch, no API request
//! of their own. The first event (`page`) is the whole page ([`super::api::run_page`]); each
//! later one (`states`) carries the run's row and only the node states that changed, at most
//! every [`COALESCE`], so a run of thousands of steps sends little. The caller's access is
//! checked again before each event (from the review caches); a revoked token ends the stream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use jiff::Timestamp;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::Ui;
use super::api::{UiError, authorized, get_run, row, run_page};
use super::graph::{self, Node, NodeState};

/// Changes of one run closer together than this go out as one event.
pub const COALESCE: Duration = Duration::from_millis(200);

struct Watch {
    ui: Ui,
    headers: HeaderMap,
    namespace: String,
    name: String,
    nodes: Vec<Node>,
    last: BTreeMap<String, NodeState>,
    /// Phases of the status rows last sent.
    rows: BTreeMap<String, crate::api::StepPhase>,
    changes: tokio::sync::broadcast::Receiver<super::store::RunKey>,
    first: Option<serde_json::Value>,
    done: bool,
}

fn event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

impl Watch {
    /// The next event, or `None` when the stream ends.
    async fn next(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        if let Some(page) = self.first.take() {
            return Some(event("page", &page));
        }
        // Wait for a change of this run (or a lag, after which everything is compared).
        loop {
            match self.changes.recv().await {
                Ok((ns, name)) if ns == self.namespace && name == self.name => break,
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return None,
            }
        }
        tokio::time::sleep(COALESCE).await;
        while self.changes.try_recv().is_ok() {}
        if let Err(e) = authorized(&self.ui, &self.headers, &get_run(&self.namespace, &self.name)).await {
            self.done = true;
            return Some(event("denied", &json!({"error": e.to_string()})));
        }
        let Some(run) = self.ui.runs.get(&self.namespace, &self.name) else {
            self.done = true;
            return Some(event("gone", &json!({"namespace": self.namespace, "name": self.name})));
        };
        let status = run.status.clone().unwrap_or_default();
        let states = graph::states(&self.nodes, &status);
        let changed = graph::changed(&self.last, &states);
        self.last = states;
        let mut steps = serde_json::Map::new();
        for (k, r) in &status.steps {
            if self.rows.get(k) != Some(&r.phase) {
                self.rows.insert(k.clone(), r.phase);
                steps.insert(k.clone(), json!({"phase": r.phase}));
            }
        }
        let data = json!({"run": row(&run, Timestamp::now()), "states": changed, "steps": steps});
        Some(event("states", &data))
    }
}

/// `GET /ui/api/runs/{namespace}/{name}/stream`: `text/event-stream` of the run's page.
pub async fn stream(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, UiError> {
    authorized(&ui, &headers, &get_run(&namespace, &name)).await?;
    // Subscribe before reading the run, so that no change falls between the two.
    let changes = ui.runs.subscribe();
    let run: Arc<_> = ui
        .runs
        .get(&namespace, &name)
        .ok_or_else(|| UiError::NoRun { namespace: namespace.clone(), name: name.clone() })?;
    let page = run_page(&run, Timestamp::now());
    let status = run.status.clone().unwrap_or_default();
    let spec = status.workflow.clone().or_else(|| run.spec.workflow.clone()).unwrap_or_default();
    let nodes = graph::nodes(&spec);
    let last = graph::states(&nodes, &status);
    let rows = status.steps.iter().map(|(k, r)| (k.clone(), r.phase)).collect();
    let watch = Watch { ui, headers, namespace, name, nodes, last, rows, changes, first: Some(page), done: false };
    let stream = futures::stream::unfold(watch, |mut w| async move { w.next().await.map(|e| (Ok(e), w)) });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
