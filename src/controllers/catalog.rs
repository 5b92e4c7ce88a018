//! What the run controllers and the shard labeller read of a scope's Workflows and Agents: one
//! slimmed cache of each per scope and replica, whatever the number of shards it runs, kept
//! across hand-overs (a shard that moves here lists no Workflows or Agents again).

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
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

/// A cache of `K` in `scope`, metadata slimmed, and the stream that feeds it.
fn slim_cache<K>(
    client: &Client,
    scope: &Option<String>,
) -> (Store<K>, impl futures::Stream<Item = Result<K, watcher::Error>> + Send + use<K>)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api_for::<K>(client, scope), watcher::Config::default().served_from_watch_cache())
        .backoff(WatchBackoff::default())
        .modify(|o: &mut K| slim_meta(o.meta_mut()))
        .reflect(writer)
        .touched_objects();
    (store, stream)
}

impl Catalog {
    /// Watches the Workflows and Agents of `scope` until `shutdown`.
    pub fn start(client: &Client, scope: &Option<String>, shutdown: CancellationToken) -> (Catalog, JoinHandle<()>) {
        let (workflows, wf_stream) = slim_cache::<Workflow>(client, scope);
        let (agents, agent_stream) = slim_cache::<Agent>(client, scope);
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
