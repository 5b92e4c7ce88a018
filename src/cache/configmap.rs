//! The persistent tier: cache entries in ConfigMaps (`volt-step-cache-<shard>`) in the
//! namespace of the runs that made them, so they survive an operator restart and follow the
//! namespace's access rules. Bounded: entries over 32 KiB stay in memory only, and a shard
//! stops taking entries near the ConfigMap size limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::debug;

use super::memory::Entry;
use crate::naming;

/// Label on the cache's ConfigMaps.
pub const LABEL_CACHE: &str = "volt.dev/cache";
const SHARDS: u32 = 16;
const MAX_ENTRY: usize = 32 * 1024;
const MAX_SHARD: usize = 768 * 1024;

#[derive(Clone)]
pub struct ConfigMapTier {
    client: Client,
    /// (namespace, shard) -> bytes stored (approximate).
    sizes: Arc<Mutex<HashMap<(String, u32), usize>>>,
}

fn shard_of(key: &str) -> u32 {
    let d = Sha256::digest(key.as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % SHARDS
}

fn shard_name(shard: u32) -> String {
    format!("volt-step-cache-{shard}")
}

impl ConfigMapTier {
    pub fn new(client: Client) -> Self {
        Self { client, sizes: Default::default() }
    }

    fn sizes(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), usize>> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every unexpired entry persisted in `namespace`.
    pub async fn load(&self, namespace: &str) -> Result<Vec<(String, Entry)>, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let list = api.list(&ListParams::default().labels(&format!("{LABEL_CACHE}=steps"))).await?;
        let now = jiff::Timestamp::now().as_millisecond();
        let mut out = Vec::new();
        for cm in list.items {
            let shard = cm
                .metadata
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix("volt-step-cache-"))
                .and_then(|s| s.parse::<u32>().ok());
            let mut bytes = 0;
            for (k, v) in cm.data.unwrap_or_default() {
                bytes += k.len() + v.len();
                if let Ok(e) = serde_json::from_str::<Entry>(&v)
                    && e.expires_ms > now
                {
                    out.push((k, e));
                }
            }
            if let Some(s) = shard {
                self.sizes().insert((namespace.to_string(), s), bytes);
            }
        }
        Ok(out)
    }

    /// Persists an entry (best effort: the memory tier has it either way).
    pub async fn save(&self, namespace: &str, key: &str, entry: &Entry) {
        let Ok(value) = serde_json::to_string(entry) else { return };
        if value.len() > MAX_ENTRY {
            return;
        }
        let shard = shard_of(key);
        {
            let mut sizes = self.sizes();
            let size = sizes.entry((namespace.to_string(), shard)).or_default();
            if *size + value.len() + key.len() > MAX_SHARD {
                debug!(namespace, shard, "cache shard full; entry kept in memory only");
                return;
            }
            *size += value.len() + key.len();
        }
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let name = shard_name(shard);
        let patch = json!({"data": {key: value}});
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                let mut labels = BTreeMap::from([(LABEL_CACHE.to_string(), "steps".to_string())]);
                labels.insert(naming::LABEL_MANAGED_BY.into(), naming::MANAGED_BY.into());
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(key.to_string(), value)])),
                    ..Default::default()
                };
                if let Err(e) = api.create(&PostParams::default(), &cm).await {
                    debug!(namespace, error = %e, "cannot create a cache shard");
                }
            }
            Err(e) => debug!(namespace, error = %e, "cannot persist a cache entry"),
        }
    }

    /// Removes evicted keys from their shards, in the background.
    pub fn remove_later(&self, namespace: &str, keys: Vec<String>) {
        let mut by_shard: HashMap<u32, Vec<String>> = HashMap::new();
        for k in keys {
            by_shard.entry(shard_of(&k)).or_default().push(k);
        }
        let tier = self.clone();
        let namespace = namespace.to_string();
        tokio::spawn(async move {
            let api: Api<ConfigMap> = Api::namespaced(tier.client.clone(), &namespace);
            for (shard, keys) in by_shard {
                let data: serde_json::Map<String, serde_json::Value> =
                    keys.iter().map(|k| (k.clone(), serde_json::Value::Null)).collect();
                let patch = json!({"data": data});
                match api.patch(&shard_name(shard), &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(cm) => {
                        let bytes = cm.data.unwrap_or_default().iter().map(|(k, v)| k.len() + v.len()).sum();
                        tier.sizes().insert((namespace.clone(), shard), bytes);
                    }
                    Err(e) => debug!(namespace, error = %e, "cannot remove evicted cache entries"),
                }
            }
        });
    }
}
