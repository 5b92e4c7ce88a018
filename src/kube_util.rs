//! Kubernetes helpers shared by the controllers and the system watcher: API handles for a
//! scope, watch backoff, list settings, metadata slimming of cached objects, and the client
//! whose requests are counted and bounded in time.

use std::sync::Arc;
use std::time::Duration;

use kube::{Api, Client, Resource};

use crate::metrics::Metrics;

/// The API of `K` in one namespace, or in all when `ns` is `None`.
pub fn api_for<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Initial lists served by the API server's watch cache: `resourceVersion=0` and no page limit
/// (with a limit, the client drops `resourceVersion=0` and every page is a quorum read from
/// etcd that decodes every object of the type, which made startup with 10,000 runs take 20 s).
/// Memory stays bounded because every cache slims its objects as they arrive.
pub trait ServedFromWatchCache {
    fn served_from_watch_cache(self) -> Self;
}

impl ServedFromWatchCache for kube::runtime::watcher::Config {
    fn served_from_watch_cache(mut self) -> Self {
        self = self.any_semantic();
        self.page_size = None;
        self
    }
}

/// Waits until a store has its first full list. A store's readiness future wakes only its
/// most recent poller (the controller also waits on it), so poll it on a short interval.
pub async fn wait_ready<K>(store: &kube::runtime::reflector::Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(50), store.wait_until_ready()).await {
            Ok(_) => return,
            Err(_) => continue,
        }
    }
}

/// Builds the operator's kube client: its requests are counted in `metrics` by verb, and all
/// but watches are bounded by `timeout` ([`crate::api_timeout`]; `None`: unbounded).
pub async fn client_with_metrics(
    config: kube::Config,
    metrics: &Metrics,
    timeout: Option<Duration>,
) -> Result<Client, kube::Error> {
    let counter = crate::metrics::ApiCounterLayer { counter: Arc::new(metrics.api_requests.clone()) };
    let bound = crate::api_timeout::ApiTimeoutLayer::new(timeout).counting(metrics.api_timeouts.clone());
    let client = kube::client::ClientBuilder::try_from(config)?.with_layer(&bound).with_layer(&counter).build();
    Ok(client)
}

/// Backoff of the operator's watches after an error: from 0.5 s, doubling, at most 5 s, with
/// jitter, and back to 0.5 s after any event. kube's default (client-go's: up to 30 s, and a
/// failed resume, such as the 410 Gone every watch gets from a restarted apiserver, does not
/// reset it) kept the operator's caches stale for over a minute after a 30 s apiserver outage
/// (tests/chaos.rs). Every 5 s is one refused connection per watch while the apiserver is down.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    pub const MIN: Duration = Duration::from_millis(500);
    pub const MAX: Duration = Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::MIN }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use rand::Rng;
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Between 75% and 100% of the delay, so watches that failed together do not retry together.
        Some(delay.mul_f64(rand::rng().random_range(0.75..=1.0)))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

/// Drops what no controller reads from cached objects: managed fields (as large as the status
/// for server-side-applied objects) and `kubectl apply`'s copy of the object.
pub fn slim_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}
