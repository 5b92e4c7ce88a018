//! The runs the web view shows: one watch of WorkflowRuns per watched scope, shared by every
//! page and stream (a browser adds no API request per run), and a broadcast of which run
//! changed, for the live pages.
//!
//! The run controller's own cache holds only unfinished runs (finished ones are tracked by
//! metadata) and runs only on the leader; the web view wants finished runs too, on every
//! replica, hence a watch of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use kube::Client;
use kube::ResourceExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::api::WorkflowRun;
use crate::kube_util::{WatchBackoff, api_for};

/// Changes kept for slow readers; one that falls further behind reloads everything.
const CHANGES: usize = 4096;

/// Which run changed: namespace and name.
pub type RunKey = (String, String);

/// The WorkflowRuns of the watched scopes, kept current by one shared watch per scope.
pub struct RunStore {
    stores: Vec<Store<WorkflowRun>>,
    changes: broadcast::Sender<RunKey>,
    synced: Vec<Arc<AtomicBool>>,
}

impl RunStore {
    /// Starts one watch per scope (`None`: every namespace) until `shutdown`.
    pub fn start(client: &Client, scopes: &[Option<String>], shutdown: CancellationToken) -> Arc<Self> {
        let (changes, _) = broadcast::channel(CHANGES);
        let mut stores = Vec::new();
        let mut synced = Vec::new();
        for scope in scopes {
            let (reader, writer) = reflector::store::<WorkflowRun>();
            let listed = Arc::new(AtomicBool::new(false));
            let stream = watcher(api_for::<WorkflowRun>(client, scope), watcher::Config::default())
                .backoff(WatchBackoff::default())
                .reflect(writer);
            let (tx, listed2, stop) = (changes.clone(), listed.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                loop {
                    let event = tokio::select! {
                        _ = stop.cancelled() => break,
                        event = stream.next() => event,
                    };
                    match event {
                        Some(Ok(watcher::Event::Apply(run) | watcher::Event::Delete(run))) => {
                            let _ = tx.send((run.namespace().unwrap_or_default(), run.name_any()));
                        }
                        Some(Ok(watcher::Event::InitDone)) => listed2.store(true, Ordering::Relaxed),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => tracing::debug!(error = %e, "web view: the WorkflowRun watch failed; retrying"),
                        None => break,
                    }
                }
            });
            stores.push(reader);
            synced.push(listed);
        }
        Arc::new(Self { stores, changes, synced })
    }

    /// Whether every scope has been listed once.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Relaxed))
    }

    /// Every run held.
    pub fn all(&self) -> Vec<Arc<WorkflowRun>> {
        self.stores.iter().flat_map(|s| s.state()).collect()
    }

    /// Run `name` of namespace `ns`, if held.
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<WorkflowRun>> {
        let key = reflector::ObjectRef::new(name).within(ns);
        self.stores.iter().find_map(|s| s.get(&key))
    }

    /// Which runs change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RunKey> {
        self.changes.subscribe()
    }
}
