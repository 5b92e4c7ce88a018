//! What the run controllers and the shard labeller read of a scope's Workflows and Agents: one
//! slimmed cache of each per scope and replica, whatever the number of shards it runs, kept
//! across hand-overs (a shard that moves here lists no Workflows or Agents again).

use futures::StreamExt;
use kube::Client;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{Agent, Workflow};
use crate::kube_util::{ServedFromWatchCache, WatchBackoff, api_for, slim_meta, wait_ready};

/// A scope's Workflows and Agents, metadata slimmed.
#[derive(Clone)]
pub struct Catalog {
    pub workflows: Store<Workflow>,
    pub agents: Store<Agent>,
}

impl Catalog {
    /// Watches the Workflows and Agents of `scope` until `shutdown`.
    pub fn start(client: &Client, scope: &Option<String>, shutdown: CancellationToken) -> (Catalog, JoinHandle<()>) {
        let (workflows, wf_writer) = reflector::store();
        let wf_stream =
            watcher(api_for::<Workflow>(client, scope), watcher::Config::default().served_from_watch_cache())
                .backoff(WatchBackoff::default())
                .modify(|w: &mut Workflow| slim_meta(&mut w.metadata))
                .reflect(wf_writer)
                .touched_objects();
        let (agents, agent_writer) = reflector::store();
        let agent_stream =
            watcher(api_for::<Agent>(client, scope), watcher::Config::default().served_from_watch_cache())
                .backoff(WatchBackoff::default())
                .modify(|a: &mut Agent| slim_meta(&mut a.metadata))
                .reflect(agent_writer)
                .touched_objects();
        // Both only feed their stores.
        let task = tokio::spawn(async move {
            let feed = futures::future::join(wf_stream.for_each(|_| async {}), agent_stream.for_each(|_| async {}));
            tokio::select! {
                _ = feed => {}
                _ = shutdown.cancelled() => {}
            }
        });
        (Catalog { workflows, agents }, task)
    }

    /// Until both caches have listed.
    pub async fn ready(&self) {
        wait_ready(&self.workflows).await;
        wait_ready(&self.agents).await;
    }
}
