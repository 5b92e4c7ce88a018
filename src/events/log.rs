//! The event log: the latest events of this process in a bounded ring (all kinds, for replay
//! by correlation id and the unfiltered view), and, with a store ([`EventLog::with_store`]),
//! each run's events kept beyond the process in a ConfigMap per run ([`super::store`]).
//!
//! The handler never waits for the API: it adds a run's events to a bounded pending set and
//! wakes the writer task, which writes each run's pending events at most once per
//! [`WRITE_INTERVAL`] (at once when the run ends or pauses), reading the stored log first on
//! its first write for a run (after a restart or a hand-over) so earlier events are kept.
//! Exactly one process emits a run's events at a time (the leader; later the shard owner), so
//! one writer per run; a conflicting write is read again and merged. A failed write stays
//! pending and is retried with backoff, unless retrying cannot help (a ConfigMap of that name
//! that is not the run's log, a namespace gone, no right: the run's pending events are dropped);
//! drops, and a full pending set, count in `volt_events_dropped_total{sink="event-store"}`.
//!
//! Replica, cache and other events without a run (object other than `WorkflowRun/...`) are
//! kept in the ring only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::Client;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::store::{ConfigMapStore, EventStore, Loaded, RunRef, StoreError, Stored, merge};
use super::{Batch, Handler, VoltEvent};
use crate::locks::lock;
use crate::metrics::Metrics;

/// At most one write per run in this interval (except when the run ends or pauses).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// Most events waiting to be written, over all runs.
const MAX_PENDING: usize = 20_000;
/// How often the writer looks for due runs.
const TICK: Duration = Duration::from_millis(100);
/// Longest wait before retrying a failed write.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run's stored log is forgotten (read again on its next write) after this long without
/// events.
const IDLE: Duration = Duration::from_secs(300);

pub struct EventLog {
    cap: usize,
    ring: Mutex<VecDeque<VoltEvent>>,
    persist: Option<Persist>,
}

/// The handler's side of the store: what waits to be written, and the writer's wake-ups.
struct Persist {
    store: Arc<dyn EventStore>,
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    flushes: mpsc::Sender<oneshot::Sender<()>>,
    metrics: Metrics,
}

/// Events not yet written, by run UID.
#[derive(Default)]
struct Pending {
    runs: HashMap<String, RunPending>,
    total: usize,
}

struct RunPending {
    run: RunRef,
    events: Vec<VoltEvent>,
    /// When the oldest of `events` arrived.
    since: Instant,
    /// The run ended or paused: write without waiting.
    urgent: bool,
}

impl EventLog {
    /// A log in memory only.
    pub fn new(cap: usize) -> Self {
        Self { cap: cap.max(1), ring: Mutex::new(VecDeque::new()), persist: None }
    }

    /// A log that also keeps each run's events in a ConfigMap owned by the run, in the
    /// namespaces of `scopes` (`None`: any). Starts its writer task (inside a tokio runtime).
    pub fn with_store(cap: usize, client: Client, scopes: Vec<Option<String>>, metrics: Metrics) -> Self {
        Self::with(cap, Arc::new(ConfigMapStore::new(client, scopes)), metrics)
    }

    /// [`EventLog::with_store`] over any store.
    pub(crate) fn with(cap: usize, store: Arc<dyn EventStore>, metrics: Metrics) -> Self {
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let wake = Arc::new(Notify::new());
        let (flushes, flush_rx) = mpsc::channel(16);
        let writer = Writer {
            store: store.clone(),
            pending: Arc::downgrade(&pending),
            runs: HashMap::new(),
            metrics: metrics.clone(),
        };
        tokio::spawn(writer.run(wake.clone(), flush_rx));
        Self {
            cap: cap.max(1),
            ring: Mutex::new(VecDeque::new()),
            persist: Some(Persist { store, pending, wake, flushes, metrics }),
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.ring).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events of this process in order, optionally only one correlation id and only after
    /// event id `after`; at most `limit` (the most recent ones).
    pub fn query(&self, correlation_id: Option<&str>, after: Option<u64>, limit: usize) -> Vec<VoltEvent> {
        let ring = lock(&self.ring);
        let matching: Vec<&VoltEvent> = ring
            .iter()
            .filter(|e| correlation_id.is_none_or(|c| e.correlation_id == c))
            .filter(|e| after.is_none_or(|a| e.id > a))
            .collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }

    /// Every event of correlation id `correlation_id` (a run UID, say) this log knows, oldest
    /// first: the run's stored log (in `namespace` when given), merged with this process's
    /// events not yet written and those in its ring. Without a store, the ring's.
    pub async fn replay(&self, correlation_id: &str, namespace: Option<&str>) -> Result<Vec<VoltEvent>, StoreError> {
        let ring = self.query(Some(correlation_id), None, usize::MAX);
        let Some(persist) = &self.persist else { return Ok(ring) };
        if !crate::naming::is_label_value(correlation_id) {
            // Not a UID: nothing of it is stored.
            return Ok(ring);
        }
        // Pending first: what the writer stores meanwhile is in the store when read next.
        let (pending, known) = {
            let p = lock(&persist.pending);
            match p.runs.get(correlation_id) {
                Some(r) => (r.events.clone(), Some(r.run.clone())),
                None => (Vec::new(), None),
            }
        };
        let known = known.or_else(|| ring.iter().find_map(RunRef::of));
        let namespace = namespace.or(known.as_ref().map(|r| r.namespace.as_str()));
        let name = known.as_ref().filter(|r| Some(r.namespace.as_str()) == namespace).map(|r| r.name.as_str());
        let stored = persist.store.find(correlation_id, namespace, name).await?;
        Ok(merge(stored.events, pending.into_iter().chain(ring)))
    }

    /// Writes every pending event now (at shutdown, say); returns once the writer has tried.
    pub async fn flush(&self) {
        let Some(persist) = &self.persist else { return };
        let (tx, rx) = oneshot::channel();
        if persist.flushes.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Adds run events to the pending set (never waits); counts what does not fit.
    fn keep(&self, persist: &Persist, events: &[VoltEvent]) {
        let mut dropped = 0u64;
        let mut urgent = false;
        {
            let mut p = lock(&persist.pending);
            for e in events {
                let Some(run) = RunRef::of(e) else { continue };
                if p.total >= MAX_PENDING {
                    dropped += 1;
                    continue;
                }
                p.total += 1;
                let end = e.step.is_none() && e.kind.is_run_end();
                urgent |= end;
                let entry = p.runs.entry(run.uid.clone()).or_insert_with(|| RunPending {
                    run,
                    events: Vec::new(),
                    since: Instant::now(),
                    urgent: false,
                });
                entry.events.push(e.clone());
                entry.urgent |= end;
            }
        }
        if dropped > 0 {
            persist.metrics.events_dropped.with_label_values(&["event-store"]).inc_by(dropped);
        }
        if urgent {
            persist.wake.notify_one();
        }
    }
}

impl Handler for EventLog {
    fn name(&self) -> &'static str {
        "log"
    }

    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            {
                let mut ring = lock(&self.ring);
                for e in &batch.events {
                    if ring.len() == self.cap {
                        ring.pop_front();
                    }
                    ring.push_back(e.clone());
                }
            }
            if let Some(persist) = &self.persist {
                self.keep(persist, &batch.events);
            }
        })
    }
}

/// The writer task's state: the stored log of each run it has written lately.
struct Writer {
    store: Arc<dyn EventStore>,
    pending: Weak<Mutex<Pending>>,
    runs: HashMap<String, Written>,
    metrics: Metrics,
}

#[derive(Default)]
struct Written {
    /// The stored log as last written or read, and its version; `None`: read it first.
    loaded: Option<Loaded>,
    last_write: Option<Instant>,
    /// After a failure: not before then.
    retry_at: Option<Instant>,
    failures: u32,
}

impl Writer {
    async fn run(mut self, wake: Arc<Notify>, mut flushes: mpsc::Receiver<oneshot::Sender<()>>) {
        loop {
            let flush = tokio::select! {
                _ = wake.notified() => None,
                _ = tokio::time::sleep(TICK) => None,
                f = flushes.recv() => f,
            };
            let Some(pending) = self.pending.upgrade() else { return };
            let now = Instant::now();
            let due: Vec<(RunRef, Vec<VoltEvent>, bool)> = {
                let p = lock(&pending);
                p.runs
                    .values()
                    .filter(|r| {
                        let w = self.runs.get(&r.run.uid);
                        let backing_off = w.and_then(|w| w.retry_at).is_some_and(|t| now < t);
                        let waited = r.since.elapsed() >= WRITE_INTERVAL
                            && w.and_then(|w| w.last_write).is_none_or(|t| now - t >= WRITE_INTERVAL);
                        flush.is_some() || (!backing_off && (r.urgent || waited))
                    })
                    .map(|r| (r.run.clone(), r.events.clone(), r.urgent))
                    .collect()
            };
            for (run, events, ended) in due {
                match self.write(&run, &events).await {
                    Ok(()) => {
                        let left = {
                            let mut p = lock(&pending);
                            let written: HashSet<u64> = events.iter().map(|e| e.id).collect();
                            p.total = p.total.saturating_sub(events.len());
                            let left = match p.runs.get_mut(&run.uid) {
                                Some(r) => {
                                    r.events.retain(|e| !written.contains(&e.id));
                                    r.since = Instant::now();
                                    r.urgent &= !ended;
                                    r.events.len()
                                }
                                None => 0,
                            };
                            if left == 0 {
                                p.runs.remove(&run.uid);
                            }
                            left
                        };
                        if ended && left == 0 {
                            // Its last events are stored: nothing more is coming.
                            self.runs.remove(&run.uid);
                        } else {
                            let w = self.runs.entry(run.uid.clone()).or_default();
                            w.failures = 0;
                            w.retry_at = None;
                            w.last_write = Some(Instant::now());
                        }
                    }
                    Err(e) if e.is_permanent() => {
                        // Retrying cannot help (not our ConfigMap, the namespace is gone, no
                        // right): give the run's events up, so they do not fill the pending set.
                        let dropped = {
                            let mut p = lock(&pending);
                            let n = p.runs.remove(&run.uid).map_or(0, |r| r.events.len());
                            p.total = p.total.saturating_sub(n);
                            n
                        };
                        self.runs.remove(&run.uid);
                        self.metrics.events_dropped.with_label_values(&["event-store"]).inc_by(dropped as u64);
                        warn!(error = %e, dropped, "a run's events cannot be kept; dropped");
                    }
                    Err(e) => {
                        let w = self.runs.entry(run.uid.clone()).or_default();
                        w.failures += 1;
                        w.loaded = None;
                        // A conflict: read again and retry at once; otherwise back off.
                        let backoff = match e {
                            StoreError::Conflict { .. } => Duration::ZERO,
                            _ => (Duration::from_millis(250) * 2u32.saturating_pow(w.failures.min(8))).min(MAX_BACKOFF),
                        };
                        w.retry_at = Some(Instant::now() + backoff);
                        if w.failures > 3 {
                            warn!(error = %e, failures = w.failures, "keeping a run's events failed; retrying");
                        } else {
                            debug!(error = %e, "keeping a run's events failed; retrying");
                        }
                    }
                }
            }
            // A run not written to for a while is read again on its next write.
            self.runs.retain(|_, w| w.retry_at.is_some() || w.last_write.is_some_and(|t| t.elapsed() < IDLE));
            if let Some(done) = flush {
                let _ = done.send(());
            }
        }
    }

    /// Appends `events` to the stored log of `run` (read first if not known).
    async fn write(&mut self, run: &RunRef, events: &[VoltEvent]) -> Result<(), StoreError> {
        let known = self.runs.get_mut(&run.uid).and_then(|w| w.loaded.take());
        let (mut stored, version) = match known {
            Some(l) => (l.stored, Some(l.version)),
            None => match self.store.load(run).await? {
                Some(l) => (l.stored, Some(l.version)),
                None => (Stored::default(), None),
            },
        };
        stored.append(events.iter().cloned());
        let version = self.store.save(run, &stored, version.as_deref()).await?;
        self.runs.entry(run.uid.clone()).or_default().loaded = Some(Loaded { stored, version });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::events::EventKind;
    use crate::events::store::testing::MemoryStore;

    fn event(id: u64, uid: &str, kind: EventKind, step: Option<&str>) -> VoltEvent {
        VoltEvent {
            id,
            time: jiff::Timestamp::now(),
            kind,
            correlation_id: uid.into(),
            namespace: "ns".into(),
            object: format!("WorkflowRun/run-{uid}"),
            step: step.map(str::to_string),
            attempt: 0,
            message: String::new(),
        }
    }

    fn ids(events: &[VoltEvent]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    async fn publish(log: &EventLog, events: Vec<VoltEvent>) {
        log.handle(&Batch { events, reference: None }).await;
    }

    /// Lets the writer run for `d` of (paused) tokio time.
    async fn advance(d: Duration) {
        let step = Duration::from_millis(50);
        let mut gone = Duration::ZERO;
        while gone < d {
            tokio::time::sleep(step).await;
            gone += step;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn step_progress_is_coalesced_and_the_end_written_at_once() {
        let store = Arc::new(MemoryStore::default());
        let log = EventLog::with(100, store.clone(), Metrics::new());
        for i in 1..=5 {
            publish(&log, vec![event(i, "u1", EventKind::StepStarted, Some("a"))]).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(store.saves.load(Ordering::Relaxed), 0, "progress waits for the interval");
        assert_eq!(ids(&log.replay("u1", None).await.expect("replay")), [1, 2, 3, 4, 5], "pending is replayed");
        // The run ends: written at once, with everything before it, in one write.
        publish(&log, vec![event(6, "u1", EventKind::RunSucceeded, None)]).await;
        for _ in 0..100 {
            if store.stored("u1").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stored = store.stored("u1").expect("written when the run ended");
        assert_eq!(ids(&stored.events), [1, 2, 3, 4, 5, 6]);
        assert_eq!(store.saves.load(Ordering::Relaxed), 1, "one write");
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_one_write_per_interval_per_run() {
        let store = Arc::new(MemoryStore::default());
        let log = EventLog::with(100, store.clone(), Metrics::new());
        // 50 events over 5 s: about one write a second, never one per event.
        for i in 1..=50 {
            publish(&log, vec![event(i, "u1", EventKind::StepSucceeded, Some("a"))]).await;
            advance(Duration::from_millis(100)).await;
        }
        advance(Duration::from_secs(2)).await;
        let saves = store.saves.load(Ordering::Relaxed);
        assert!((3..=6).contains(&saves), "{saves} writes for 5 s of events");
        assert_eq!(store.stored("u1").map(|s| s.events.len()), Some(50));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_process_appends_to_what_is_stored() {
        let store = Arc::new(MemoryStore::default());
        {
            let first = EventLog::with(100, store.clone(), Metrics::new());
            publish(
                &first,
                vec![event(1, "u1", EventKind::RunStarted, None), event(2, "u1", EventKind::StepStarted, Some("a"))],
            )
            .await;
            advance(Duration::from_secs(2)).await;
        }
        let second = EventLog::with(100, store.clone(), Metrics::new());
        // The new process knows nothing of the run, and replays it from the store.
        assert_eq!(ids(&second.replay("u1", Some("ns")).await.expect("replay")), [1, 2]);
        publish(&second, vec![event(3, "u1", EventKind::RunSucceeded, None)]).await;
        advance(Duration::from_millis(500)).await;
        assert_eq!(store.stored("u1").map(|s| ids(&s.events)), Some(vec![1, 2, 3]), "appended, not replaced");
    }

    #[tokio::test(start_paused = true)]
    async fn failed_writes_stay_pending_and_are_retried() {
        let store = Arc::new(MemoryStore::default());
        let log = EventLog::with(100, store.clone(), Metrics::new());
        store.down.store(true, Ordering::Relaxed);
        publish(&log, vec![event(1, "u1", EventKind::RunFailed, None)]).await;
        advance(Duration::from_secs(3)).await;
        assert_eq!(store.stored("u1"), None);
        let pending = |log: &EventLog| {
            let p = lock(log.persist.as_ref().map(|p| &p.pending).expect("a store"));
            p.runs.get("u1").map(|r| ids(&r.events)).unwrap_or_default()
        };
        assert_eq!(pending(&log), [1], "still pending");
        store.down.store(false, Ordering::Relaxed);
        advance(Duration::from_secs(40)).await;
        assert_eq!(store.stored("u1").map(|s| ids(&s.events)), Some(vec![1]));
        assert_eq!(pending(&log), Vec::<u64>::new(), "written, no longer pending");
    }

    #[tokio::test(start_paused = true)]
    async fn events_that_cannot_be_kept_are_dropped_and_counted() {
        let store = Arc::new(MemoryStore::default());
        let metrics = Metrics::new();
        let log = EventLog::with(100, store.clone(), metrics.clone());
        store.foreign.store(true, Ordering::Relaxed);
        publish(
            &log,
            vec![event(1, "u1", EventKind::StepStarted, Some("a")), event(2, "u1", EventKind::RunFailed, None)],
        )
        .await;
        advance(Duration::from_secs(2)).await;
        assert_eq!(metrics.events_dropped.with_label_values(&["event-store"]).get(), 2);
        assert!(lock(log.persist.as_ref().map(|p| &p.pending).expect("a store")).runs.is_empty(), "not retried");
        assert_eq!(store.stored("u1"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn replay_merges_stored_and_pending_once_each() {
        let store = Arc::new(MemoryStore::default());
        // Another process stored 1..3 (2 also emitted here, as after a hand-over).
        let run = RunRef { namespace: "ns".into(), name: "run-u1".into(), uid: "u1".into() };
        let mut before = Stored::default();
        before.append([1, 2, 3].map(|i| event(i, "u1", EventKind::StepStarted, Some("a"))));
        store.save(&run, &before, None).await.expect("save");
        let log = EventLog::with(100, store.clone(), Metrics::new());
        publish(
            &log,
            vec![
                event(2, "u1", EventKind::StepStarted, Some("a")),
                event(4, "u1", EventKind::StepSucceeded, Some("a")),
            ],
        )
        .await;
        assert_eq!(ids(&log.replay("u1", None).await.expect("replay")), [1, 2, 3, 4]);
        advance(Duration::from_secs(2)).await;
        assert_eq!(
            store.stored("u1").map(|s| ids(&s.events)),
            Some(vec![1, 2, 3, 4]),
            "the write read the store first"
        );
        assert_eq!(ids(&log.replay("u1", None).await.expect("replay")), [1, 2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_run_events_are_stored_and_a_full_pending_set_counts_drops() {
        let store = Arc::new(MemoryStore::default());
        let metrics = Metrics::new();
        let log = EventLog::with(10, store.clone(), metrics.clone());
        let mut agent = event(1, "a1", EventKind::ReplicaUnhealthy, None);
        agent.object = "Agent/coder".into();
        publish(&log, vec![agent]).await;
        assert!(lock(log.persist.as_ref().map(|p| &p.pending).expect("a store")).runs.is_empty(), "memory only");
        assert_eq!(ids(&log.query(Some("a1"), None, 10)), [1]);
        let many: Vec<VoltEvent> =
            (0..MAX_PENDING as u64 + 7).map(|i| event(i + 10, "u2", EventKind::StepStarted, Some("a"))).collect();
        publish(&log, many).await;
        assert_eq!(metrics.events_dropped.with_label_values(&["event-store"]).get(), 7);
    }

    #[tokio::test]
    async fn memory_only_logs_replay_their_ring() {
        let log = EventLog::new(3);
        publish(&log, (1..=5).map(|i| event(i, "u", EventKind::StepStarted, Some("a"))).collect()).await;
        assert_eq!(ids(&log.replay("u", None).await.expect("replay")), [3, 4, 5]);
        log.flush().await;
    }
}
