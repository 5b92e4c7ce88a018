//! Writes WorkflowRun status off the reconcile path.
//!
//! A pass decides a run's new status and hands it to the [`StatusWriter`] ([`StatusWriter::stage`]);
//! a background task writes it with one server-side apply of the whole status. The pass never
//! waits for the API server, so a step that finishes while a status write is in flight starts
//! its dependents at once.
//!
//! Writes are coalesced: a change that leaves the run's phase as it was waits until
//! `interval` has passed since the run's last write, so a run's many step transitions share one
//! write; a run starting, finishing or failing is written at once. Every pass starts from the
//! staged status ([`StatusWriter::fresh`]), which is newer than the watch cache, so nothing is
//! lost while it waits. A crash loses what waits: the steps it recorded run again (pods are
//! found by their deterministic names; in-process steps are retried, at-least-once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::{FIELD_MANAGER, WorkflowRun, WorkflowRunStatus, own_conditions};
use crate::locks::lock;
use crate::metrics::Metrics;
use crate::naming;

/// Status writes in flight at once.
const CONCURRENT_WRITES: usize = 16;

/// A run's status as this process knows it.
struct Entry {
    namespace: String,
    name: String,
    /// The resourceVersion of this process's last write (None: none yet).
    resource_version: Option<String>,
    status: WorkflowRunStatus,
    /// Staged and not written yet: newer than anything the API server has.
    dirty: bool,
    /// Write as soon as possible (the run's phase changed).
    urgent: bool,
    /// Bumped on every stage, so a write knows whether it wrote the latest.
    version: u64,
    writing: bool,
    /// When this process last wrote the status (or failed to).
    at: Option<Instant>,
    /// `spec.ttlSecondsAfterFinished`.
    ttl: Option<u32>,
    /// The run's `volt.dev/shard` label: written only while this replica holds its shard.
    slot: Option<String>,
}

/// Whether this replica may still write the status of a run with this `volt.dev/shard` label.
pub type Fence = Arc<dyn Fn(Option<&str>) -> bool + Send + Sync>;

pub struct StatusWriter {
    client: Client,
    metrics: Metrics,
    interval: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    wake: Notify,
    writes: Arc<Semaphore>,
}

fn rv_number(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|r| r.parse::<u64>().ok())
}

impl StatusWriter {
    pub fn new(client: Client, metrics: Metrics, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            client,
            metrics,
            interval,
            entries: Mutex::default(),
            wake: Notify::new(),
            writes: Arc::new(Semaphore::new(CONCURRENT_WRITES)),
        })
    }

    /// The run's status as last known: the staged one while it waits, else what this process
    /// last wrote while the watch cache does not show it yet (resourceVersions are etcd
    /// revisions), else the cached object's.
    pub fn fresh(&self, run: &WorkflowRun) -> WorkflowRunStatus {
        let uid = run.uid().unwrap_or_default();
        let cached = run.status.clone().unwrap_or_default();
        let mut entries = lock(&self.entries);
        let Some(e) = entries.get(&uid) else { return cached };
        if e.dirty || e.writing {
            return e.status.clone();
        }
        let older = match (rv_number(run.resource_version().as_deref()), rv_number(e.resource_version.as_deref())) {
            (Some(seen), Some(ours)) => seen < ours,
            _ => false,
        };
        if older {
            return e.status.clone();
        }
        // The cache caught up. Keep the entry (when we last wrote) while the run is active.
        if cached.phase.is_finished() {
            entries.remove(&uid);
        }
        cached
    }

    /// Hands a pass's status over for writing. `before` is what the pass started from.
    pub fn stage(&self, run: &WorkflowRun, before: &WorkflowRunStatus, status: &WorkflowRunStatus) {
        if before == status {
            return;
        }
        let urgent = before.phase != status.phase || status.phase.is_finished() || self.interval.is_zero();
        {
            let mut entries = lock(&self.entries);
            let e = entries.entry(run.uid().unwrap_or_default()).or_insert_with(|| Entry {
                namespace: run.namespace().unwrap_or_default(),
                name: run.name_any(),
                resource_version: None,
                status: WorkflowRunStatus::default(),
                dirty: false,
                urgent: false,
                version: 0,
                writing: false,
                at: None,
                ttl: None,
                slot: None,
            });
            e.ttl = run.spec.ttl_seconds_after_finished;
            e.slot = run.labels().get(naming::LABEL_SHARD).cloned();
            e.status = status.clone();
            e.dirty = true;
            e.urgent |= urgent;
            e.version += 1;
            if !e.urgent {
                self.metrics.status_writes_deferred.inc();
            }
        }
        self.wake.notify_one();
    }

    /// Forgets a deleted run.
    pub fn forget(&self, uid: &str) {
        lock(&self.entries).remove(uid);
    }

    /// Writes what waits of these runs now, and waits for it (at most `limit`); what the fence
    /// refuses is dropped instead.
    pub async fn flush(&self, uids: &[String], limit: Duration) {
        {
            let mut entries = lock(&self.entries);
            for uid in uids {
                if let Some(e) = entries.get_mut(uid) {
                    e.urgent = true;
                }
            }
        }
        self.wake.notify_one();
        let deadline = Instant::now() + limit;
        while uids.iter().any(|u| self.pending(u)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a status of the run waits or is being written.
    pub fn pending(&self, uid: &str) -> bool {
        lock(&self.entries).get(uid).is_some_and(|e| e.dirty || e.writing)
    }

    /// Whether this process wrote the run's end and labelled it finished (it keeps the entry
    /// until its cache drops the run).
    pub fn ended(&self, uid: &str) -> bool {
        lock(&self.entries)
            .get(uid)
            .is_some_and(|e| !e.dirty && !e.writing && e.status.phase.is_finished() && e.resource_version.is_some())
    }

    /// Writes what is due until `shutdown`, then everything that waits. Only what `fence`
    /// allows: the status of a run whose shard (or leadership) this replica does not hold now
    /// waits (a renewal late past its deadline) and is forgotten when the shard's controller
    /// stops, for a replica that lost its Lease must not overwrite the new holder's writes.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, fence: Fence) {
        let tick = (self.interval / 10).clamp(Duration::from_millis(10), Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            self.start_due(false, &*fence);
        }
        self.start_due(true, &*fence);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&self.entries).values().any(|e| e.writing) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a write for every run whose status is due (all that wait, with `all`).
    fn start_due(self: &Arc<Self>, all: bool, fence: &dyn Fn(Option<&str>) -> bool) {
        let due: Vec<(String, String, String, WorkflowRunStatus, u64, Option<u32>)> = {
            let mut entries = lock(&self.entries);
            entries
                .iter_mut()
                .filter(|(_, e)| {
                    e.dirty
                        && !e.writing
                        && (all || e.urgent || e.at.is_none_or(|t| t.elapsed() >= self.interval))
                        && fence(e.slot.as_deref())
                })
                .map(|(uid, e)| {
                    e.writing = true;
                    (uid.clone(), e.namespace.clone(), e.name.clone(), e.status.clone(), e.version, e.ttl)
                })
                .collect()
        };
        for (uid, ns, name, status, version, ttl) in due {
            let this = self.clone();
            tokio::spawn(async move {
                let Ok(_permit) = this.writes.clone().acquire_owned().await else { return };
                let mut result = this.write(&ns, &name, &status).await;
                // A run's end is written: label it, so that caches of active runs drop it. The
                // entry stays (with the label's resourceVersion) until the cache has dropped the
                // run: a pass that comes meanwhile with the cache's older object must start from
                // the end, not run the last steps again and write over it.
                if result.is_ok() && status.phase.is_finished() {
                    result = mark_finished(&this.client, &ns, &name, &status, ttl).await;
                }
                let mut entries = lock(&this.entries);
                let Some(e) = entries.get_mut(&uid) else { return };
                e.writing = false;
                e.at = Some(Instant::now());
                match result {
                    Ok(rv) => {
                        e.resource_version = rv;
                        if e.version == version {
                            e.dirty = false;
                            e.urgent = false;
                        } else if e.urgent {
                            this.wake.notify_one();
                        }
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        debug!(run = %name, namespace = %ns, "run deleted before its status was written");
                        entries.remove(&uid);
                    }
                    Err(err) => {
                        // Kept dirty: retried after the interval.
                        e.urgent = false;
                        warn!(run = %name, namespace = %ns, error = %err, "writing a run's status failed; will retry");
                        this.metrics.reconcile_errors.with_label_values(&["workflowrun", "status_write"]).inc();
                    }
                }
            });
        }
    }

    /// One server-side apply of a run's whole status; the new resourceVersion.
    ///
    async fn write(&self, ns: &str, name: &str, status: &WorkflowRunStatus) -> Result<Option<String>, kube::Error> {
        let api: Api<WorkflowRun> = Api::namespaced(self.client.clone(), ns);
        // Other writers' conditions are theirs: send only ours.
        let sent = WorkflowRunStatus { conditions: own_conditions(&status.conditions), ..status.clone() };
        let patch = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "status": sent});
        let written = api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        self.metrics.status_writes.with_label_values(&["WorkflowRun"]).inc();
        Ok(written.resource_version())
    }
}

/// Labels a run whose end is written with its phase (and, with a TTL, when it expires): the
/// run controller's cache then holds only active runs, and finished ones are tracked by their
/// metadata (see `controllers::run::sweep_finished`).
pub async fn mark_finished(
    client: &Client,
    ns: &str,
    name: &str,
    status: &WorkflowRunStatus,
    ttl: Option<u32>,
) -> Result<Option<String>, kube::Error> {
    let mut annotations = serde_json::Map::new();
    if let Some(ttl) = ttl {
        let done = status.finished_at.as_ref().map(|t| t.0).unwrap_or_else(jiff::Timestamp::now);
        let expires = done + Duration::from_secs(u64::from(ttl));
        annotations.insert(naming::ANNOTATION_EXPIRES.into(), json!(expires.to_string()));
    }
    let patch = json!({"metadata": {
        "labels": {naming::LABEL_FINISHED: status.phase.as_str()},
        "annotations": annotations,
    }});
    let api: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let labelled = api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(labelled.resource_version())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::api::RunPhase;

    /// A fake API server: answers every request with the run at a new resourceVersion, and
    /// records (method, path) of each; fails the first `fail` requests with a 500.
    #[derive(Clone, Default)]
    struct Api {
        seen: Arc<Mutex<Vec<(String, String)>>>,
        rv: Arc<AtomicU64>,
        fail: Arc<AtomicU64>,
    }

    impl Api {
        fn client(&self) -> Client {
            let api = self.clone();
            let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
                let api = api.clone();
                async move {
                    lock(&api.seen).push((req.method().to_string(), req.uri().path().to_string()));
                    let rv = api.rv.fetch_add(1, Ordering::SeqCst) + 1;
                    let failing = api.fail.load(Ordering::SeqCst) > 0;
                    let (code, body) = if failing {
                        api.fail.fetch_sub(1, Ordering::SeqCst);
                        (
                            500,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "boom", "reason": "InternalError", "code": 500}),
                        )
                    } else {
                        (
                            200,
                            json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun",
                                     "metadata": {"name": "r", "namespace": "ns", "uid": "u", "resourceVersion": rv.to_string()},
                                     "spec": {}}),
                        )
                    };
                    let mut response =
                        http::Response::new(kube::client::Body::from(serde_json::to_vec(&body).unwrap_or_default()));
                    *response.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            Client::new(service, "ns")
        }
        fn status_patches(&self) -> usize {
            lock(&self.seen).iter().filter(|(m, p)| m == "PATCH" && p.ends_with("/status")).count()
        }
    }

    fn run() -> WorkflowRun {
        let mut run = WorkflowRun::new("r", Default::default());
        run.metadata.namespace = Some("ns".into());
        run.metadata.uid = Some("u".into());
        // Older than anything the fake API answers: the cache lags behind the writes.
        run.metadata.resource_version = Some("0".into());
        run
    }

    fn status(phase: RunPhase, progress: &str) -> WorkflowRunStatus {
        WorkflowRunStatus { phase, progress: progress.into(), ..Default::default() }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..300 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn progress_waits_for_the_interval_and_shares_one_write_while_phase_changes_go_at_once() {
        let api = Api::default();
        let writer = StatusWriter::new(api.client(), Metrics::new(), Duration::from_millis(400));
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.clone().run(stop.clone(), Arc::new(|_| true)));
        let run = run();
        // The run starts: its phase changes, so it is written at once.
        writer.stage(&run, &WorkflowRunStatus::default(), &status(RunPhase::Running, "0/3"));
        until("the start to be written", || api.status_patches() == 1).await;
        // Progress within the interval: staged, not written, and what the next pass starts from.
        let t = Instant::now();
        for i in 1..=2 {
            let before = writer.fresh(&run);
            writer.stage(&run, &before, &status(RunPhase::Running, &format!("{i}/3")));
        }
        assert_eq!(writer.fresh(&run).progress, "2/3", "a pass starts from the staged status");
        assert!(writer.pending("u"));
        assert!(!writer.ended("u"));
        until("the progress to be written", || api.status_patches() == 2).await;
        assert!(t.elapsed() >= Duration::from_millis(300), "progress waited {:?}", t.elapsed());
        // The end: written at once, then the run is labelled finished.
        let before = writer.fresh(&run);
        writer.stage(&run, &before, &status(RunPhase::Succeeded, "3/3"));
        until("the end and its label", || {
            lock(&api.seen).iter().any(|(m, p)| m == "PATCH" && p.ends_with("/workflowruns/r"))
        })
        .await;
        assert_eq!(api.status_patches(), 3, "two progress stages shared one write");
        assert!(!writer.pending("u"));
        // A pass that comes with the cache's older object starts from the end (it would run the
        // last steps again and write over the end), until the cache drops the finished run.
        until("the label's resourceVersion", || writer.fresh(&run).phase == RunPhase::Succeeded).await;
        // Such a pass does not label the run again: the writer did.
        assert!(writer.ended("u"), "the end is written and labelled");
        writer.forget("u");
        assert_eq!(writer.fresh(&run).phase, RunPhase::default(), "forgotten once the cache dropped it");
        assert!(!writer.ended("u"));
        stop.cancel();
        let _ = task.await;
    }

    #[tokio::test]
    async fn a_failed_write_is_kept_and_tried_again() {
        let api = Api::default();
        api.fail.store(1, Ordering::SeqCst);
        let writer = StatusWriter::new(api.client(), Metrics::new(), Duration::from_millis(100));
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.clone().run(stop.clone(), Arc::new(|_| true)));
        writer.stage(&run(), &WorkflowRunStatus::default(), &status(RunPhase::Running, "0/1"));
        until("a second try", || api.status_patches() == 2).await;
        until("the write to land", || !writer.pending("u")).await;
        stop.cancel();
        let _ = task.await;
    }

    #[tokio::test]
    async fn what_waits_is_written_at_shutdown_only_while_the_shard_is_held() {
        for (held, writes) in [(true, 2), (false, 1)] {
            let api = Api::default();
            let writer = StatusWriter::new(api.client(), Metrics::new(), Duration::from_secs(3600));
            let stop = CancellationToken::new();
            let holds = Arc::new(std::sync::atomic::AtomicBool::new(true));
            let fence: Fence = {
                let holds = holds.clone();
                Arc::new(move |slot| slot == Some("7") && holds.load(Ordering::SeqCst))
            };
            let task = tokio::spawn(writer.clone().run(stop.clone(), fence));
            let mut run = run();
            run.metadata.labels = Some([(naming::LABEL_SHARD.to_string(), "7".to_string())].into());
            writer.stage(&run, &WorkflowRunStatus::default(), &status(RunPhase::Running, "0/2"));
            until("the start to be written", || api.status_patches() == 1).await;
            // Progress only (same phase): it would wait an hour.
            writer.stage(&run, &writer.fresh(&run), &status(RunPhase::Running, "1/2"));
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(api.status_patches(), 1);
            holds.store(held, Ordering::SeqCst);
            stop.cancel();
            let _ = task.await;
            assert_eq!(api.status_patches(), writes, "shard held: {held}");
            assert_eq!(writer.pending("u"), !held, "written, or kept for the shard's controller to forget");
        }
        // A run of another shard is never written.
        let api = Api::default();
        let writer = StatusWriter::new(api.client(), Metrics::new(), Duration::from_millis(10));
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.clone().run(stop.clone(), Arc::new(|slot| slot == Some("7"))));
        writer.stage(&run(), &WorkflowRunStatus::default(), &status(RunPhase::Running, "0/2"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(writer.pending("u"), "kept while the shard is not held, until forgotten");
        writer.forget("u");
        stop.cancel();
        let _ = task.await;
        assert_eq!(api.status_patches(), 0);
    }
}
