//! Scale-out: runs split across active replicas by shard (`--shards N`).
//!
//! - Every run gets a slot once, the label `volt.dev/shard` = a hash of its UID modulo
//!   [`SLOTS`] (child runs take their parent's, so a parent and its children share a
//!   replica). Slot `v` belongs to shard `v % N`: the label never changes, even when `N` does.
//! - A replica reconciles only the runs of the shards it holds (label-selected watches, so its
//!   caches hold its share), runs only their in-process steps, and writes their status only
//!   while it still holds the shard's Lease ([`Ownership::holds_slot`], the fence).
//! - Which shards a replica holds is decided by [`leases`]: a Lease per shard and one per
//!   replica (membership), a fair share each, hand-over on join, leave and death.
//! - Work that must happen once (schedules, TTL sweeps, Workflow, Agent and Budget status) is
//!   done by shard 0's holder ([`Ownership::leads`]).
//!
//! Without sharding ([`Ownership::single`]) the one shard is held for good, or while this
//! replica is the elected leader.

pub mod leases;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kube::ResourceExt;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::api::WorkflowRun;
use crate::controllers::Health;
use crate::locks::lock;
use crate::naming;

/// Slots a run hashes to; shard `s` of `N` owns the slots `v` with `v % N == s`.
pub const SLOTS: u32 = 256;
/// Most shards (`--shards`).
pub const MAX_SHARDS: u32 = 64;

/// A run's slot: the first bytes of the SHA-256 of its UID, modulo [`SLOTS`].
pub fn slot_of_uid(uid: &str) -> u32 {
    let digest = Sha256::digest(uid.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % SLOTS
}

/// The slot in a `volt.dev/shard` label value, if it is one.
pub fn parse_slot(label: &str) -> Option<u32> {
    label.parse::<u32>().ok().filter(|v| *v < SLOTS)
}

/// The label selector of shard `shard`'s runs (and pods) of `shards`; `None` when not sharded.
pub fn selector(shard: u32, shards: u32) -> Option<String> {
    if shards <= 1 {
        return None;
    }
    let slots: Vec<String> = (0..SLOTS).filter(|v| v % shards == shard).map(|v| v.to_string()).collect();
    Some(format!("{} in ({})", naming::LABEL_SHARD, slots.join(",")))
}

/// Who decides whether this replica may act on a shard.
enum Gate {
    /// No sharding, no election: the one shard, always.
    Always,
    /// Leader election: the one shard while this replica leads.
    Leader(Arc<Health>),
    /// Shard Leases: while each is held and not past its deadline.
    Leases,
}

/// Which shards this replica holds: the fence every start and status write checks, and the
/// set of shards whose controllers should run.
pub struct Ownership {
    shards: u32,
    identity: String,
    gate: Gate,
    /// Shard -> until when it may act on it (monotonic), for [`Gate::Leases`].
    deadlines: std::sync::Mutex<HashMap<u32, Instant>>,
    /// The shards whose controllers should run.
    assigned: watch::Sender<BTreeSet<u32>>,
    /// The shards whose controllers run (they have not stopped yet).
    running: watch::Sender<BTreeSet<u32>>,
    /// Live replicas, as last seen (for `/api/v1/stats`).
    members: std::sync::Mutex<Vec<String>>,
}

impl Ownership {
    fn new(shards: u32, identity: String, gate: Gate, assigned: BTreeSet<u32>) -> Arc<Self> {
        Arc::new(Self {
            shards: shards.max(1),
            identity,
            gate,
            deadlines: Default::default(),
            assigned: watch::Sender::new(assigned),
            running: watch::Sender::new(BTreeSet::new()),
            members: Default::default(),
        })
    }

    /// No sharding: shard 0 of 1, held while `leader` is set (leader election) or always.
    pub fn single(leader: Option<Arc<Health>>) -> Arc<Self> {
        let gate = leader.map_or(Gate::Always, Gate::Leader);
        Self::new(1, String::new(), gate, BTreeSet::from([0]))
    }

    /// Sharding: nothing held until [`leases::run`] acquires it.
    pub fn sharded(shards: u32, identity: String) -> Arc<Self> {
        Self::new(shards, identity, Gate::Leases, BTreeSet::new())
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn is_sharded(&self) -> bool {
        matches!(self.gate, Gate::Leases)
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The shard of a slot.
    pub fn shard_of_slot(&self, slot: u32) -> u32 {
        slot % self.shards
    }

    /// Whether this replica may act on `shard` now.
    pub fn holds(&self, shard: u32) -> bool {
        match &self.gate {
            Gate::Always => shard == 0,
            Gate::Leader(health) => shard == 0 && health.leader.load(Ordering::Relaxed),
            Gate::Leases => lock(&self.deadlines).get(&shard).is_some_and(|until| Instant::now() < *until),
        }
    }

    /// Whether this replica may act on the run of a `volt.dev/shard` label value. Without
    /// sharding any run; with it, a run without a (valid) label belongs to no one yet.
    pub fn holds_slot(&self, label: Option<&str>) -> bool {
        if !self.is_sharded() {
            return self.holds(0);
        }
        label.and_then(parse_slot).is_some_and(|slot| self.holds(self.shard_of_slot(slot)))
    }

    /// Whether this replica may act on `run`.
    pub fn holds_run(&self, run: &WorkflowRun) -> bool {
        self.holds_slot(run.labels().get(naming::LABEL_SHARD).map(String::as_str))
    }

    /// Whether this replica does the work that must happen once: shard 0's holder.
    pub fn leads(&self) -> bool {
        self.holds(0)
    }

    /// The shards held now, in order.
    pub fn held(&self) -> Vec<u32> {
        (0..self.shards).filter(|s| self.holds(*s)).collect()
    }

    /// The shards whose controllers should run, as it changes.
    pub fn assigned(&self) -> watch::Receiver<BTreeSet<u32>> {
        self.assigned.subscribe()
    }

    /// Whether the controllers of `shard` still run.
    pub fn is_running(&self, shard: u32) -> bool {
        self.running.borrow().contains(&shard)
    }

    /// Called by the controllers' supervisor when a shard's controllers start or have stopped.
    pub fn set_running(&self, shard: u32, running: bool) {
        self.running.send_modify(|set| {
            if running {
                set.insert(shard);
            } else {
                set.remove(&shard);
            }
        });
    }

    /// Live replicas, as last seen.
    pub fn members(&self) -> Vec<String> {
        lock(&self.members).clone()
    }

    // The Lease side, for `leases`.

    fn extend(&self, shard: u32, until: Instant) {
        lock(&self.deadlines).insert(shard, until);
    }

    fn assign(&self, shard: u32) {
        self.assigned.send_if_modified(|set| set.insert(shard));
    }

    fn unassign(&self, shard: u32) {
        self.assigned.send_if_modified(|set| set.remove(&shard));
    }

    /// Stops acting on `shard` at once (lost or released).
    fn revoke(&self, shard: u32) {
        lock(&self.deadlines).remove(&shard);
        self.unassign(shard);
    }

    fn set_members(&self, members: Vec<String>) {
        *lock(&self.members) = members;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_spread_and_map_to_every_shard() {
        let mut per_shard = [0u32; 3];
        for i in 0..3000 {
            let slot = slot_of_uid(&format!("6f1c2a7e-0000-4000-8000-{i:012}"));
            assert!(slot < SLOTS);
            per_shard[(slot % 3) as usize] += 1;
        }
        for n in per_shard {
            assert!((800..1200).contains(&n), "uneven split: {per_shard:?}");
        }
        assert_eq!(slot_of_uid("a"), slot_of_uid("a"), "stable");
        assert_eq!(parse_slot("17"), Some(17));
        assert_eq!(parse_slot("256"), None);
        assert_eq!(parse_slot("x"), None);
    }

    #[test]
    fn selectors_cover_each_slot_once() {
        assert_eq!(selector(0, 1), None);
        let mut seen = BTreeSet::new();
        for shard in 0..5 {
            let sel = selector(shard, 5).expect("sharded");
            let inner = sel.trim_start_matches("volt.dev/shard in (").trim_end_matches(')');
            for v in inner.split(',') {
                let v: u32 = v.parse().expect("a number");
                assert_eq!(v % 5, shard);
                assert!(seen.insert(v), "slot {v} in two shards");
            }
        }
        assert_eq!(seen.len() as u32, SLOTS);
    }

    #[test]
    fn the_fence_follows_the_deadlines() {
        let single = Ownership::single(None);
        assert!(single.holds_slot(None) && single.leads());
        let health = Arc::new(Health::default());
        let elected = Ownership::single(Some(health.clone()));
        assert!(!elected.leads());
        health.leader.store(true, Ordering::Relaxed);
        assert!(elected.leads());

        let o = Ownership::sharded(4, "me".into());
        assert!(!o.holds_slot(Some("5")) && !o.holds_slot(None));
        o.extend(1, Instant::now() + std::time::Duration::from_secs(60));
        assert!(o.holds_slot(Some("5")), "slot 5 is shard 1 of 4");
        assert!(!o.holds_slot(Some("6")) && !o.holds_slot(None) && !o.holds_slot(Some("bad")));
        o.extend(2, Instant::now());
        assert!(!o.holds(2), "past its deadline");
        o.revoke(1);
        assert!(!o.holds(1) && o.held().is_empty());
    }
}
