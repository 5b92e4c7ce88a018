//! Where a run's events are kept beyond the process that emitted them: one ConfigMap per run
//! (`<run>.events`, [`naming::events_config_map`]), owned by the run so garbage collection
//! deletes it with the run, labelled [`naming::LABEL_EVENTS_OF`]`=<run uid>`. Its data holds the
//! events as a JSON array, oldest first ([`naming::EVENTS_KEY`]), and how many of the oldest were
//! dropped over the bounds ([`naming::EVENTS_TRUNCATED_KEY`]): at most [`MAX_EVENTS`] events and
//! [`MAX_BYTES`] of JSON, well under the API server's 1 MiB.
//!
//! [`Stored`] is the pure part (append, bound, encode, decode); [`EventStore`] the I/O, with
//! [`ConfigMapStore`] the implementation against the cluster.

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::VoltEvent;
use crate::api::WorkflowRun;
use crate::naming;

/// Most events kept per run.
pub const MAX_EVENTS: usize = 1000;
/// Most bytes of JSON kept per run.
pub const MAX_BYTES: usize = 512 * 1024;

/// Errors of the event store, naming the run or the ConfigMap.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the Kubernetes API, about the events of run {run}: {source}")]
    Kube {
        run: String,
        #[source]
        source: kube::Error,
    },
    #[error("ConfigMap {namespace}/{name} changed since it was read (events of run {run})")]
    Conflict { namespace: String, name: String, run: String },
    #[error("ConfigMap {namespace}/{name} is not the event log of run {run} (label {label} differs)", label = naming::LABEL_EVENTS_OF)]
    Foreign { namespace: String, name: String, run: String },
    #[error("ConfigMap {namespace}/{name}: {field} does not parse: {reason}")]
    Corrupt { namespace: String, name: String, field: &'static str, reason: String },
    #[error("events of run {run}: JSON: {source}")]
    Json {
        run: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Whether retrying cannot help: a ConfigMap that is not the run's log or does not parse,
    /// or the API refusing the request itself (the namespace is gone, no right, invalid).
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Foreign { .. } | StoreError::Corrupt { .. } | StoreError::Json { .. } => true,
            StoreError::Kube { source: kube::Error::Api(status), .. } => {
                matches!(status.code, 400 | 403 | 404 | 422)
            }
            StoreError::Kube { .. } | StoreError::Conflict { .. } => false,
        }
    }
}

/// The run a log belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl RunRef {
    /// The run of a run or step event (object `WorkflowRun/<name>`, correlation id its UID);
    /// `None` for other events (replicas, the cache), which are kept in memory only.
    pub fn of(e: &VoltEvent) -> Option<RunRef> {
        let name = e.object.strip_prefix("WorkflowRun/")?;
        if name.is_empty() || e.namespace.is_empty() || !naming::is_label_value(&e.correlation_id) {
            return None;
        }
        Some(RunRef { namespace: e.namespace.clone(), name: name.to_string(), uid: e.correlation_id.clone() })
    }

    /// `namespace/name (uid)`, for messages.
    fn describe(&self) -> String {
        format!("{}/{} ({})", self.namespace, self.name, self.uid)
    }
}

/// A run's stored events, oldest first, with the number dropped before them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored {
    pub events: Vec<VoltEvent>,
    /// Events dropped (the oldest) to keep within the bounds.
    pub truncated: u64,
}

impl Stored {
    /// Adds `new` (ignoring ids already there), in id order, then drops the oldest over
    /// [`MAX_EVENTS`] and [`MAX_BYTES`].
    pub fn append(&mut self, new: impl IntoIterator<Item = VoltEvent>) {
        self.append_bounded(new, MAX_EVENTS, MAX_BYTES);
    }

    fn append_bounded(&mut self, new: impl IntoIterator<Item = VoltEvent>, max_events: usize, max_bytes: usize) {
        let mut seen: BTreeSet<u64> = self.events.iter().map(|e| e.id).collect();
        for e in new {
            if seen.insert(e.id) {
                self.events.push(e);
            }
        }
        self.events.sort_by_key(|e| e.id);
        let over = self.events.len().saturating_sub(max_events);
        self.drop_oldest(over);
        // The JSON array: `[`, the events joined by `,`, `]`.
        let sizes: Vec<usize> = self.events.iter().map(|e| serde_json::to_vec(e).map_or(0, |v| v.len()) + 1).collect();
        let mut total: usize = sizes.iter().sum::<usize>() + 1;
        let mut drop = 0;
        while total > max_bytes && drop < sizes.len() {
            total -= sizes[drop];
            drop += 1;
        }
        self.drop_oldest(drop);
    }

    fn drop_oldest(&mut self, n: usize) {
        if n > 0 {
            self.events.drain(..n);
            self.truncated += n as u64;
        }
    }

    /// The ConfigMap data.
    pub fn to_data(&self, run: &RunRef) -> Result<BTreeMap<String, String>, StoreError> {
        let events =
            serde_json::to_string(&self.events).map_err(|source| StoreError::Json { run: run.describe(), source })?;
        Ok(BTreeMap::from([
            (naming::EVENTS_KEY.to_string(), events),
            (naming::EVENTS_TRUNCATED_KEY.to_string(), self.truncated.to_string()),
        ]))
    }

    /// From the data of ConfigMap `namespace/name`, keeping only the events of run `uid` in
    /// that namespace (whoever may edit the ConfigMap cannot make it speak for another).
    pub fn from_data(
        namespace: &str,
        name: &str,
        uid: &str,
        data: &BTreeMap<String, String>,
    ) -> Result<Stored, StoreError> {
        let corrupt = |field, reason: String| StoreError::Corrupt {
            namespace: namespace.to_string(),
            name: name.to_string(),
            field,
            reason,
        };
        let events: Vec<VoltEvent> = match data.get(naming::EVENTS_KEY) {
            Some(text) => serde_json::from_str(text).map_err(|e| corrupt(naming::EVENTS_KEY, e.to_string()))?,
            None => Vec::new(),
        };
        let truncated = match data.get(naming::EVENTS_TRUNCATED_KEY) {
            Some(text) => {
                text.trim().parse().map_err(|e: std::num::ParseIntError| corrupt("truncated", e.to_string()))?
            }
            None => 0,
        };
        let mut stored = Stored { events: Vec::new(), truncated };
        stored.events = events.into_iter().filter(|e| e.correlation_id == uid && e.namespace == namespace).collect();
        stored.events.sort_by_key(|e| e.id);
        Ok(stored)
    }
}

/// Merges stored events with others (this process's, not yet written): by id, oldest first,
/// each id once.
pub fn merge(stored: Vec<VoltEvent>, others: impl IntoIterator<Item = VoltEvent>) -> Vec<VoltEvent> {
    let mut by_id: BTreeMap<u64, VoltEvent> = stored.into_iter().map(|e| (e.id, e)).collect();
    for e in others {
        by_id.entry(e.id).or_insert(e);
    }
    by_id.into_values().collect()
}

/// A run's stored events and the version to save over.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub stored: Stored,
    pub version: String,
}

/// Reads and writes runs' event logs.
pub trait EventStore: Send + Sync {
    /// The stored log of `run`; `None` when there is none.
    fn load<'a>(&'a self, run: &'a RunRef) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>>;
    /// Saves `stored` as the log of `run`, over `version` (from [`EventStore::load`] or the
    /// previous save; `None`: creates it). Someone else's write in between is a
    /// [`StoreError::Conflict`]. The new version.
    fn save<'a>(
        &'a self,
        run: &'a RunRef,
        stored: &'a Stored,
        version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, StoreError>>;
    /// The stored events of the run with UID `uid`: in `namespace` when given (by name when the
    /// run's `name` is known too), otherwise wherever the store may look.
    fn find<'a>(
        &'a self,
        uid: &'a str,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Stored, StoreError>>;
}

/// The event logs as ConfigMaps in the runs' namespaces.
pub struct ConfigMapStore {
    client: Client,
    /// Where runs live: every namespace (`None`) or each listed one, as the operator watches.
    scopes: Vec<Option<String>>,
}

impl ConfigMapStore {
    pub fn new(client: Client, scopes: Vec<Option<String>>) -> Self {
        let scopes = if scopes.is_empty() { vec![None] } else { scopes };
        Self { client, scopes }
    }

    fn api(&self, namespace: &str) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn owned_by(cm: &ConfigMap, uid: &str) -> bool {
        cm.labels().get(naming::LABEL_EVENTS_OF).is_some_and(|v| v == uid)
    }

    fn decode(cm: &ConfigMap, uid: &str) -> Result<Stored, StoreError> {
        let namespace = cm.namespace().unwrap_or_default();
        let empty = BTreeMap::new();
        Stored::from_data(&namespace, &cm.name_any(), uid, cm.data.as_ref().unwrap_or(&empty))
    }

    fn object(run: &RunRef, stored: &Stored, version: Option<&str>) -> Result<ConfigMap, StoreError> {
        let owner = OwnerReference {
            api_version: WorkflowRun::api_version(&()).into_owned(),
            kind: WorkflowRun::kind(&()).into_owned(),
            name: run.name.clone(),
            uid: run.uid.clone(),
            controller: Some(false),
            block_owner_deletion: None,
        };
        Ok(ConfigMap {
            metadata: ObjectMeta {
                name: Some(naming::events_config_map(&run.name)),
                namespace: Some(run.namespace.clone()),
                labels: Some(naming::events_labels(&run.name, &run.uid)),
                owner_references: Some(vec![owner]),
                resource_version: version.map(str::to_string),
                ..Default::default()
            },
            data: Some(stored.to_data(run)?),
            ..Default::default()
        })
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

impl EventStore for ConfigMapStore {
    fn load<'a>(&'a self, run: &'a RunRef) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>> {
        Box::pin(async move {
            let name = naming::events_config_map(&run.name);
            let cm = self
                .api(&run.namespace)
                .get_opt(&name)
                .await
                .map_err(|source| StoreError::Kube { run: run.describe(), source })?;
            let Some(cm) = cm else { return Ok(None) };
            if !Self::owned_by(&cm, &run.uid) {
                return Err(StoreError::Foreign { namespace: run.namespace.clone(), name, run: run.describe() });
            }
            let version = cm.resource_version().unwrap_or_default();
            Ok(Some(Loaded { stored: Self::decode(&cm, &run.uid)?, version }))
        })
    }

    fn save<'a>(
        &'a self,
        run: &'a RunRef,
        stored: &'a Stored,
        version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, StoreError>> {
        Box::pin(async move {
            let api = self.api(&run.namespace);
            let cm = Self::object(run, stored, version)?;
            let name = naming::events_config_map(&run.name);
            // Create, or a merge patch carrying the resourceVersion read: the API server refuses
            // it (409) if someone wrote in between. (The chart grants create and patch.)
            let written = match version {
                None => {
                    api.create(
                        &PostParams { field_manager: Some(crate::api::FIELD_MANAGER.into()), ..Default::default() },
                        &cm,
                    )
                    .await
                }
                Some(_) => {
                    let body =
                        serde_json::to_value(&cm).map_err(|source| StoreError::Json { run: run.describe(), source })?;
                    let body = json!({"metadata": body["metadata"], "data": body["data"]});
                    let params =
                        PatchParams { field_manager: Some(crate::api::FIELD_MANAGER.into()), ..Default::default() };
                    api.patch(&name, &params, &Patch::Merge(&body)).await
                }
            };
            match written {
                Ok(cm) => Ok(cm.resource_version().unwrap_or_default()),
                Err(e) if is_conflict(&e) => {
                    Err(StoreError::Conflict { namespace: run.namespace.clone(), name, run: run.describe() })
                }
                Err(source) => Err(StoreError::Kube { run: run.describe(), source }),
            }
        })
    }

    fn find<'a>(
        &'a self,
        uid: &'a str,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Stored, StoreError>> {
        Box::pin(async move {
            let kube_err = |source| StoreError::Kube { run: uid.to_string(), source };
            if let (Some(ns), Some(name)) = (namespace, name) {
                let cm = self.api(ns).get_opt(&naming::events_config_map(name)).await.map_err(kube_err)?;
                if let Some(cm) = cm.filter(|cm| Self::owned_by(cm, uid)) {
                    return Self::decode(&cm, uid);
                }
            }
            let selector = ListParams::default().labels(&format!("{}={uid}", naming::LABEL_EVENTS_OF));
            let scopes: Vec<Option<String>> = match namespace {
                Some(ns) => vec![Some(ns.to_string())],
                None => self.scopes.clone(),
            };
            let mut found = Stored::default();
            for scope in scopes {
                let api: Api<ConfigMap> = match &scope {
                    Some(ns) => self.api(ns),
                    None => Api::all(self.client.clone()),
                };
                for cm in api.list(&selector).await.map_err(kube_err)? {
                    let stored = Self::decode(&cm, uid)?;
                    found.truncated += stored.truncated;
                    found.events = merge(std::mem::take(&mut found.events), stored.events);
                }
            }
            Ok(found)
        })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory [`EventStore`] for tests, with faults on demand.

    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::locks::lock;

    #[derive(Default)]
    pub struct MemoryStore {
        /// By run UID: the run, its log, its version.
        pub logs: Mutex<HashMap<String, (RunRef, Stored, u64)>>,
        /// Saves, loads and finds fail (for a while: retrying helps) while set.
        pub down: AtomicBool,
        /// Loads find a ConfigMap that is not the run's log while set.
        pub foreign: AtomicBool,
        pub saves: AtomicUsize,
    }

    impl MemoryStore {
        pub fn stored(&self, uid: &str) -> Option<Stored> {
            lock(&self.logs).get(uid).map(|(_, s, _)| s.clone())
        }

        fn check(&self, run: &RunRef) -> Result<(), StoreError> {
            if self.down.load(Ordering::Relaxed) {
                return Err(down(&run.uid));
            }
            if self.foreign.load(Ordering::Relaxed) {
                return Err(StoreError::Foreign {
                    namespace: run.namespace.clone(),
                    name: run.name.clone(),
                    run: run.uid.clone(),
                });
            }
            Ok(())
        }
    }

    /// What a store that is down answers: a transient error of the API.
    fn down(uid: &str) -> StoreError {
        let status = kube::core::Status::failure("the store is down", "ServiceUnavailable").with_code(503);
        StoreError::Kube { run: uid.to_string(), source: kube::Error::Api(Box::new(status)) }
    }

    impl EventStore for MemoryStore {
        fn load<'a>(&'a self, run: &'a RunRef) -> BoxFuture<'a, Result<Option<Loaded>, StoreError>> {
            Box::pin(async move {
                self.check(run)?;
                Ok(lock(&self.logs).get(&run.uid).map(|(_, s, v)| Loaded { stored: s.clone(), version: v.to_string() }))
            })
        }

        fn save<'a>(
            &'a self,
            run: &'a RunRef,
            stored: &'a Stored,
            version: Option<&'a str>,
        ) -> BoxFuture<'a, Result<String, StoreError>> {
            Box::pin(async move {
                self.check(run)?;
                let mut logs = lock(&self.logs);
                let current = logs.get(&run.uid).map(|(_, _, v)| v.to_string());
                if current.as_deref() != version {
                    return Err(StoreError::Conflict {
                        namespace: run.namespace.clone(),
                        name: run.name.clone(),
                        run: run.uid.clone(),
                    });
                }
                let next = current.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
                logs.insert(run.uid.clone(), (run.clone(), stored.clone(), next));
                self.saves.fetch_add(1, Ordering::Relaxed);
                Ok(next.to_string())
            })
        }

        fn find<'a>(
            &'a self,
            uid: &'a str,
            _namespace: Option<&'a str>,
            _name: Option<&'a str>,
        ) -> BoxFuture<'a, Result<Stored, StoreError>> {
            Box::pin(async move {
                if self.down.load(Ordering::Relaxed) {
                    return Err(down(uid));
                }
                Ok(self.stored(uid).unwrap_or_default())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    pub(crate) fn event(id: u64, uid: &str) -> VoltEvent {
        VoltEvent {
            id,
            time: jiff::Timestamp::from_second(1_700_000_000).unwrap_or_default(),
            kind: EventKind::StepStarted,
            correlation_id: uid.into(),
            namespace: "ns".into(),
            object: "WorkflowRun/r".into(),
            step: Some("a".into()),
            attempt: 1,
            message: String::new(),
        }
    }

    #[test]
    fn appending_keeps_id_order_and_each_id_once() {
        let mut s = Stored::default();
        s.append([event(3, "u"), event(1, "u")]);
        s.append([event(2, "u"), event(3, "u")]);
        assert_eq!(s.events.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(s.truncated, 0);
    }

    #[test]
    fn the_oldest_go_over_the_count_and_are_counted() {
        let mut s = Stored::default();
        s.append((1..=MAX_EVENTS as u64 + 5).map(|i| event(i, "u")));
        assert_eq!(s.events.len(), MAX_EVENTS);
        assert_eq!(s.events.first().map(|e| e.id), Some(6), "the oldest dropped");
        assert_eq!(s.truncated, 5);
        s.append([event(MAX_EVENTS as u64 + 6, "u")]);
        assert_eq!((s.events.len(), s.truncated), (MAX_EVENTS, 6));
    }

    #[test]
    fn the_oldest_go_over_the_bytes_and_the_json_stays_under_them() {
        let run = RunRef { namespace: "ns".into(), name: "r".into(), uid: "u".into() };
        let mut big = |id| {
            let mut e = event(id, "u");
            e.message = "m".repeat(10_000);
            e
        };
        let mut s = Stored::default();
        s.append((1..=100).map(&mut big));
        let json = &s.to_data(&run).expect("data")[naming::EVENTS_KEY];
        assert!(json.len() <= MAX_BYTES, "{} bytes", json.len());
        assert!(json.len() > MAX_BYTES - 11_000, "no more dropped than needed: {} bytes", json.len());
        assert_eq!(s.truncated as usize + s.events.len(), 100);
        assert!(s.truncated > 0);
        assert_eq!(s.events.last().map(|e| e.id), Some(100), "the newest kept");
        // Exactly at the bound is kept.
        let mut exact = Stored::default();
        exact.append_bounded([event(1, "u")], 10, serde_json::to_vec(&[event(1, "u")]).map_or(0, |v| v.len()));
        assert_eq!((exact.events.len(), exact.truncated), (1, 0));
    }

    #[test]
    fn data_round_trips_and_keeps_only_the_runs_events() {
        let run = RunRef { namespace: "ns".into(), name: "r".into(), uid: "u".into() };
        let mut s = Stored::default();
        s.append([event(1, "u"), event(2, "u")]);
        s.truncated = 7;
        let data = s.to_data(&run).expect("data");
        assert_eq!(data[naming::EVENTS_TRUNCATED_KEY], "7");
        assert_eq!(Stored::from_data("ns", "r.events", "u", &data).expect("parses"), s);
        // Forged lines: another run, another namespace.
        let mut other_ns = event(4, "u");
        other_ns.namespace = "secret".into();
        let mut forged = data.clone();
        forged.insert(
            naming::EVENTS_KEY.into(),
            serde_json::to_string(&[event(1, "u"), event(3, "other"), other_ns]).expect("json"),
        );
        let back = Stored::from_data("ns", "r.events", "u", &forged).expect("parses");
        assert_eq!(back.events.iter().map(|e| e.id).collect::<Vec<_>>(), [1]);
        let mut bad = data;
        bad.insert(naming::EVENTS_TRUNCATED_KEY.into(), "many".into());
        let err = Stored::from_data("ns", "r.events", "u", &bad).expect_err("corrupt");
        assert!(err.to_string().contains("ns/r.events: truncated"), "{err}");
        assert_eq!(Stored::from_data("ns", "r.events", "u", &BTreeMap::new()).expect("empty"), Stored::default());
    }

    #[test]
    fn merging_dedupes_by_id_in_order() {
        let merged = merge(vec![event(1, "u"), event(3, "u")], [event(2, "u"), event(3, "u"), event(4, "u")]);
        assert_eq!(merged.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 3, 4]);
    }

    #[test]
    fn only_run_events_have_a_run() {
        let e = event(1, "6f1c2d3e-0000-4000-8000-123456789abc");
        let run = RunRef::of(&e).expect("a run event");
        assert_eq!((run.namespace.as_str(), run.name.as_str()), ("ns", "r"));
        let mut agent = e.clone();
        agent.object = "Agent/coder".into();
        assert_eq!(RunRef::of(&agent), None);
        let mut cache = e;
        cache.object = "StepCache".into();
        cache.correlation_id = "cache/ns".into();
        assert_eq!(RunRef::of(&cache), None);
    }
}
