//! The cache manager: step memoization with a bounded in-memory tier ([`memory`]) and a
//! persistent tier in ConfigMaps ([`configmap`]) that survives operator restarts.
//!
//! Keys are hashes of everything that determines a step's result (see [`step_key`]) and of
//! the namespace, so a result is never served to another namespace.

pub mod configmap;
pub mod memory;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::debug;

use crate::engine::Work;

pub use configmap::ConfigMapTier;
pub use memory::{CacheStrategy, Counts, Entry, Eviction, MemoryCache};

/// Bounds and defaults of the step cache.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub strategy: CacheStrategy,
    /// Time to live of a result whose step sets none.
    pub ttl: Duration,
    pub max_entries: usize,
    pub max_bytes: usize,
}

/// The cache's metrics, registered in the operator's registry.
#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub evictions: IntCounterVec,
    pub entries: IntGauge,
    pub bytes: IntGauge,
    pub hit_ratio: prometheus::Gauge,
}

impl CacheMetrics {
    pub fn register(registry: &Registry) -> Self {
        let hits = IntCounter::new("volt_cache_hits_total", "Step cache hits.").expect("valid metric");
        let misses = IntCounter::new("volt_cache_misses_total", "Step cache misses.").expect("valid metric");
        let evictions = IntCounterVec::new(
            Opts::new("volt_cache_evictions_total", "Step cache evictions, by reason (expired, capacity)."),
            &["reason"],
        )
        .expect("valid metric");
        let entries = IntGauge::new("volt_cache_entries", "Entries in the step cache.").expect("valid metric");
        let bytes = IntGauge::new("volt_cache_bytes", "Bytes held by the step cache.").expect("valid metric");
        let hit_ratio = prometheus::Gauge::new("volt_cache_hit_ratio", "Hits over lookups since start (0 to 1).")
            .expect("valid metric");
        for c in [Box::new(hits.clone()) as Box<dyn prometheus::core::Collector>, Box::new(misses.clone())] {
            let _ = registry.register(c);
        }
        let _ = registry.register(Box::new(evictions.clone()));
        let _ = registry.register(Box::new(entries.clone()));
        let _ = registry.register(Box::new(bytes.clone()));
        let _ = registry.register(Box::new(hit_ratio.clone()));
        Self { hits, misses, evictions, entries, bytes, hit_ratio }
    }
}

/// Time to live of a result whose step sets no `ttlSeconds`, unless configured otherwise
/// (`--cache-ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// A store of step results, as the run pass sees it: the cluster's [`CacheManager`], local
/// mode's disk cache, or none.
pub trait StepCache: Send + Sync {
    /// The unexpired result stored under `key` for `namespace`.
    fn get<'a>(&'a self, namespace: &'a str, key: &'a str) -> BoxFuture<'a, Option<Entry>>;
    /// Stores a result for `ttl` (the store's default when `None`).
    fn put<'a>(&'a self, namespace: &'a str, key: String, entry: Entry, ttl: Option<Duration>) -> BoxFuture<'a, ()>;
    /// Where the results live, for people.
    fn describe(&self) -> String;
}

impl StepCache for CacheManager {
    fn get<'a>(&'a self, namespace: &'a str, key: &'a str) -> BoxFuture<'a, Option<Entry>> {
        Box::pin(CacheManager::get(self, namespace, key))
    }
    fn put<'a>(&'a self, namespace: &'a str, key: String, entry: Entry, ttl: Option<Duration>) -> BoxFuture<'a, ()> {
        Box::pin(CacheManager::put(self, namespace, key, entry, ttl))
    }
    fn describe(&self) -> String {
        if self.tier.is_some() { "memory and ConfigMaps".into() } else { "memory".into() }
    }
}

/// Step memoization shared by every run.
pub struct CacheManager {
    mem: Mutex<MemoryCache>,
    default_ttl: Duration,
    tier: Option<ConfigMapTier>,
    loaded: tokio::sync::Mutex<HashSet<String>>,
    metrics: CacheMetrics,
    events: std::sync::OnceLock<crate::events::Dispatcher>,
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl CacheManager {
    pub fn new(args: &CacheSettings, metrics: CacheMetrics, tier: Option<ConfigMapTier>) -> Self {
        Self {
            mem: Mutex::new(MemoryCache::new(args.strategy, args.max_entries, args.max_bytes)),
            default_ttl: args.ttl,
            tier,
            loaded: Default::default(),
            metrics,
            events: Default::default(),
        }
    }

    /// Publishes evictions as `CacheEviction` events (correlation id `cache/<namespace>`).
    pub fn publish_to(&self, events: crate::events::Dispatcher) {
        let _ = self.events.set(events);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryCache> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a namespace's persisted entries once (after a restart).
    async fn ensure_loaded(&self, namespace: &str) {
        let Some(tier) = &self.tier else { return };
        let mut loaded = self.loaded.lock().await;
        if loaded.contains(namespace) {
            return;
        }
        match tier.load(namespace).await {
            Ok(entries) => {
                let now = now_ms();
                let n = entries.len();
                let mut mem = self.lock();
                for (k, e) in entries {
                    if !mem.contains(&k, now) {
                        mem.insert(k, e, now);
                    }
                }
                debug!(namespace, entries = n, "loaded the persisted step cache");
                loaded.insert(namespace.to_string());
            }
            Err(e) => debug!(namespace, error = %e, "cannot load the persisted step cache; starting empty"),
        }
    }

    /// Looks a result up.
    pub async fn get(&self, namespace: &str, key: &str) -> Option<Entry> {
        self.ensure_loaded(namespace).await;
        let (hit, evicted) = self.lock().get(key, now_ms());
        self.account(namespace, &evicted);
        if hit.is_some() {
            self.metrics.hits.inc();
        } else {
            self.metrics.misses.inc();
        }
        self.refresh_gauges();
        hit
    }

    /// Stores a result for `ttl` (the default TTL when `None`).
    pub async fn put(&self, namespace: &str, key: String, mut entry: Entry, ttl: Option<Duration>) {
        self.ensure_loaded(namespace).await;
        let now = now_ms();
        entry.expires_ms = now + ttl.unwrap_or(self.default_ttl).as_millis() as i64;
        let evicted = self.lock().insert(key.clone(), entry.clone(), now);
        self.account(namespace, &evicted);
        self.refresh_gauges();
        if let Some(tier) = &self.tier
            && self.lock().contains(&key, now)
        {
            tier.save(namespace, &key, &entry).await;
        }
    }

    fn account(&self, namespace: &str, evicted: &[(String, Eviction)]) {
        if evicted.is_empty() {
            return;
        }
        let mut batch = Vec::new();
        for (key, why) in evicted {
            let reason = match why {
                Eviction::Expired => "expired",
                Eviction::Capacity => "capacity",
            };
            self.metrics.evictions.with_label_values(&[reason]).inc();
            if let Some(d) = self.events.get() {
                let mut e = d.event(
                    crate::events::EventKind::CacheEviction,
                    &format!("cache/{namespace}"),
                    namespace,
                    "StepCache".into(),
                );
                e.message = format!("entry {key} evicted ({reason})");
                batch.push(e);
            }
        }
        if let Some(d) = self.events.get() {
            d.publish(crate::events::Batch { events: batch, reference: None });
        }
        if let Some(tier) = &self.tier {
            let keys: Vec<String> = evicted.iter().map(|(k, _)| k.clone()).collect();
            tier.remove_later(namespace, keys);
        }
    }

    fn refresh_gauges(&self) {
        let c = self.counts();
        self.metrics.entries.set(c.entries as i64);
        self.metrics.bytes.set(c.bytes as i64);
        let lookups = c.hits + c.misses;
        self.metrics.hit_ratio.set(if lookups == 0 { 0.0 } else { c.hits as f64 / lookups as f64 });
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts()
    }

    /// Memoizes any async computation of a string: the cached value when there is one, else
    /// the computation's, which is then cached (errors are not).
    pub async fn memoize<F, Fut, E>(&self, namespace: &str, key: &str, ttl: Option<Duration>, f: F) -> Result<String, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<String, E>>,
    {
        if let Some(hit) = self.get(namespace, key).await {
            return Ok(hit.value);
        }
        let value = f().await?;
        self.put(namespace, key.to_string(), Entry { value: value.clone(), ..Default::default() }, ttl).await;
        Ok(value)
    }
}

/// The cache key of a task's work run in `namespace`; agent steps include the model,
/// instructions and parameters of every agent in `agents` that may serve them (the caller
/// passes the agents of the namespace).
pub fn work_key<'a>(namespace: &str, work: &Work, agents: impl IntoIterator<Item = &'a crate::api::Agent>) -> String {
    use kube::ResourceExt;
    let identity = match work {
        Work::Agent { agent, selector, .. } => {
            let mut matching: Vec<serde_json::Value> = agents
                .into_iter()
                .filter(|a| match (agent, selector) {
                    (Some(name), _) => &a.name_any() == name,
                    (None, Some(sel)) => sel.capabilities.iter().all(|c| a.spec.capabilities.contains(c)),
                    (None, None) => false,
                })
                .map(|a| {
                    json!({"name": a.name_any(), "model": a.spec.model, "instructions": a.spec.instructions,
                           "parameters": a.spec.parameters})
                })
                .collect();
            matching.sort_by_key(|v| v["name"].as_str().unwrap_or_default().to_string());
            serde_json::Value::Array(matching)
        }
        _ => serde_json::Value::Null,
    };
    step_key(namespace, work, &identity)
}

/// The cache key of a step's work: a hash of the namespace, the step kind, the rendered work
/// (prompt, request, image, command, args, env) and `identity` (for agent steps, the model,
/// instructions and parameters of the agents that may serve it).
pub fn step_key(namespace: &str, work: &Work, identity: &serde_json::Value) -> String {
    let work_json = match work {
        Work::Agent { agent, selector, prompt, llm, .. } => {
            let mut w = json!({
                "kind": "agent", "agent": agent, "selector": selector, "prompt": prompt, "agents": identity,
            });
            // Only steps that use them add the fields, so keys of plain steps stay as they were.
            if !llm.messages.is_empty() {
                w["messages"] = json!(llm.messages);
            }
            if let Some(schema) = &llm.schema {
                w["schema"] = schema.clone();
                w["repairAttempts"] = json!(llm.repair_attempts);
            }
            if !llm.tools.is_empty() {
                w["tools"] = json!(llm.tools);
                w["maxTurns"] = json!(llm.max_turns);
            }
            w
        }
        Work::Container { image, command, args, env, working_dir, .. } => json!({
            "kind": "container", "image": image, "command": command, "args": args, "env": env, "workingDir": working_dir,
        }),
        Work::Http { method, url, headers, body, success_codes } => json!({
            "kind": "http", "method": method.as_str(), "url": url, "headers": headers, "body": body, "codes": success_codes,
        }),
        // Not memoized (validation refuses `cache` on them): the key only has to be total.
        Work::Workflow { workflow, params } => json!({"kind": "workflow", "workflow": workflow, "params": params}),
        Work::Resource { manifest, .. } => json!({"kind": "resource", "manifest": manifest}),
    };
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(&work_json).unwrap_or_default());
    hex::encode(&h.finalize()[..20])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager() -> CacheManager {
        let args = CacheSettings {
            strategy: CacheStrategy::Lru,
            ttl: Duration::from_secs(60),
            max_entries: 10,
            max_bytes: 1 << 20,
        };
        CacheManager::new(&args, CacheMetrics::register(&Registry::new()), None)
    }

    #[tokio::test]
    async fn memoize_runs_once_and_counts() {
        let m = manager();
        let mut calls = 0;
        for _ in 0..3 {
            let v: Result<String, ()> = m
                .memoize("ns", "k", None, || {
                    calls += 1;
                    async { Ok("v".to_string()) }
                })
                .await;
            assert_eq!(v, Ok("v".to_string()));
        }
        assert_eq!(calls, 1);
        let c = m.counts();
        assert_eq!((c.hits, c.misses, c.entries), (2, 1, 1));
        // Errors are not cached.
        let e: Result<String, &str> = m.memoize("ns", "bad", None, || async { Err("boom") }).await;
        assert_eq!(e, Err("boom"));
        assert!(m.get("ns", "bad").await.is_none());
    }

    #[tokio::test]
    async fn evictions_are_events() {
        let args = CacheSettings {
            strategy: CacheStrategy::Fifo,
            ttl: Duration::from_secs(60),
            max_entries: 1,
            max_bytes: 1 << 20,
        };
        let m = CacheManager::new(&args, CacheMetrics::register(&Registry::new()), None);
        let log = std::sync::Arc::new(crate::events::EventLog::new(10));
        let d = crate::events::Dispatcher::start(vec![(0, log.clone())], crate::metrics::Metrics::new());
        m.publish_to(d);
        m.put("ns", "a".into(), Entry { value: "1".into(), ..Default::default() }, None).await;
        m.put("ns", "b".into(), Entry { value: "2".into(), ..Default::default() }, None).await;
        for _ in 0..100 {
            if !log.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let events = log.query(Some("cache/ns"), None, 10);
        assert_eq!(events.len(), 1);
        assert!(events[0].message.contains("entry a evicted (capacity)"), "{:?}", events[0]);
        assert_eq!(m.metrics.evictions.with_label_values(&["capacity"]).get(), 1);
    }

    #[test]
    fn keys_cover_what_determines_the_result() {
        let w = |prompt: &str| Work::Agent {
            agent: Some("a".into()),
            selector: None,
            strategy: None,
            prompt: prompt.into(),
            llm: Default::default(),
        };
        let id = json!([{"model": "m1"}]);
        let with = |f: &dyn Fn(&mut crate::engine::LlmWork)| {
            let mut work = w("p");
            if let Work::Agent { llm, .. } = &mut work {
                f(llm);
            }
            step_key("ns", &work, &id)
        };
        let plain = step_key("ns", &w("p"), &id);
        assert_eq!(with(&|_| {}), plain);
        assert_ne!(with(&|l| l.schema = Some(json!({"type": "object"}))), plain);
        assert_ne!(
            with(&|l| l.schema = Some(json!({"type": "object"}))),
            with(&|l| l.schema = Some(json!({"type": "array"})))
        );
        assert_ne!(with(&|l| l.messages = vec![(crate::api::ChatRole::User, "hi".into())]), plain);
        assert_ne!(with(&|l| l.tools = vec!["search".into()]), plain);
        assert_eq!(step_key("ns", &w("p"), &id), step_key("ns", &w("p"), &id));
        assert_ne!(step_key("ns", &w("p"), &id), step_key("ns", &w("q"), &id));
        assert_ne!(step_key("ns", &w("p"), &id), step_key("other", &w("p"), &id));
        assert_ne!(step_key("ns", &w("p"), &id), step_key("ns", &w("p"), &json!([{"model": "m2"}])));
    }
}
