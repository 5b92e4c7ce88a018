//! Budgets at run time: the ledger of what agent calls spend, against the namespace's
//! `Budget` objects and each run's `spec.budget`.
//!
//! Before a call, [`Budgets::reserve`] checks every budget the call counts against (its
//! namespace, its run's Workflow, the agent that will answer) and the run's own budget, with
//! the call's worst case (the prompt's estimate plus `maxTokens`, at the agent's prices), and
//! holds that much; after the call, [`Reservation::settle`] replaces the hold with what the
//! reply's usage says. Since every call in flight holds its worst case, the budget is never
//! passed by more than what a reply uses beyond its estimate: at most one call.
//!
//! The Budget controller feeds the ledger ([`Budgets::upsert`]), which loads the window's usage
//! from the object's status the first time it sees it (so usage survives restarts), and writes
//! the usage back, coalesced, from [`Budgets::snapshot`]. Windows start again at their UTC
//! boundary, checked on every use.
//!
//! With shards ([`Budgets::sharded`]) every replica spends: the ledger counts by shard (the
//! shard of the call's run), each replica writes the shares of the shards it holds to the
//! Budget's `status.shards` ([`Budgets::pending_shares`]), and every replica takes the others'
//! shares from the Budget's watch, keeping per shard the larger of its own count and the
//! stored one. Within a window a share only grows, so that merge loses nothing of a share
//! written by one holder at a time; a replica learns of the others' spending one flush
//! interval late at most.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use tokio::sync::{Notify, watch};

use crate::api::{BudgetSpec, BudgetStatus, BudgetWindow, OnExceeded, RunBudget};

/// Tokens and cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spend {
    pub tokens: u64,
    pub cost: f64,
}

impl Spend {
    fn add(&mut self, o: Spend) {
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.cost += o.cost;
    }
    fn sub(&mut self, o: Spend) {
        self.tokens = self.tokens.saturating_sub(o.tokens);
        self.cost = (self.cost - o.cost).max(0.0);
    }
}

/// Why a call may not go out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {
    #[error("{what}: {spent}; this call may use up to {need} more, over {limit}")]
    Exceeded {
        /// `budget "team" (Monthly window from ...)` or `the run's spec.budget`.
        what: String,
        spent: String,
        need: String,
        limit: String,
        /// The Budget (namespace, name) when it is one, and what it says to do.
        budget: Option<(String, String)>,
        on_exceeded: OnExceeded,
    },
    #[error("{0}")]
    OutOfTime(String),
}

impl BudgetError {
    /// The Budget to suspend runs for, when the refusal comes from one with `onExceeded:
    /// Suspend`.
    pub fn suspends(&self) -> bool {
        matches!(self, BudgetError::Exceeded { on_exceeded: OnExceeded::Suspend, .. })
    }
}

/// What a call counts against.
#[derive(Debug, Clone, Default)]
pub struct CallScope {
    pub namespace: String,
    /// The run's Workflow (`workflowRef`), if any.
    pub workflow: Option<String>,
    /// The agent that answers.
    pub agent: String,
    /// The run, by uid, with its `spec.budget` and what it used before this process saw it.
    pub run: Option<RunScope>,
    /// The run's slot (label `volt.dev/shard`): with shards, whose share the call counts in.
    pub slot: Option<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct RunScope {
    pub uid: String,
    pub budget: Option<RunBudget>,
    /// The run's `status.usage` when first seen (after a restart).
    pub used_before: Spend,
}

/// The start of the window containing `now` (UTC); `Total` windows start at `created`.
pub fn window_start(window: BudgetWindow, now: Timestamp, created: Timestamp) -> Timestamp {
    let day = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let date = match window {
        BudgetWindow::Daily => day,
        BudgetWindow::Weekly => {
            day.checked_sub(jiff::Span::new().days(i64::from(day.weekday().to_monday_zero_offset()))).unwrap_or(day)
        }
        BudgetWindow::Monthly => day.first_of_month(),
        BudgetWindow::Total => return created,
    };
    date.to_zoned(jiff::tz::TimeZone::UTC).map(|z| z.timestamp()).unwrap_or(now)
}

/// When the window that started at `start` ends (`None` for `Total`).
pub fn window_end(window: BudgetWindow, start: Timestamp) -> Option<Timestamp> {
    let z = start.to_zoned(jiff::tz::TimeZone::UTC);
    let next = match window {
        BudgetWindow::Daily => z.checked_add(jiff::Span::new().days(1)),
        BudgetWindow::Weekly => z.checked_add(jiff::Span::new().weeks(1)),
        BudgetWindow::Monthly => z.checked_add(jiff::Span::new().months(1)),
        BudgetWindow::Total => return None,
    };
    next.ok().map(|z| z.timestamp())
}

/// The room left under `max_tokens`/`max_cost` for `need`, given what is used and held.
pub fn fits(max_tokens: Option<u64>, max_cost: Option<f64>, used: Spend, held: Spend, need: Spend) -> bool {
    let tokens_ok = max_tokens.is_none_or(|m| used.tokens.saturating_add(held.tokens).saturating_add(need.tokens) <= m);
    let cost_ok = max_cost.is_none_or(|m| used.cost + held.cost + need.cost <= m + 1e-12);
    tokens_ok && cost_ok
}

fn describe(max_tokens: Option<u64>, max_cost: Option<f64>, used: Spend, held: Spend, need: Spend) -> [String; 3] {
    let mut spent = Vec::new();
    let mut limit = Vec::new();
    let mut more = Vec::new();
    if let Some(m) = max_tokens {
        spent.push(format!("{} tokens used", used.tokens));
        if held.tokens > 0 {
            spent.push(format!("{} held by calls in flight", held.tokens));
        }
        limit.push(format!("maxTokens {m}"));
        more.push(format!("{} tokens", need.tokens));
    }
    if let Some(m) = max_cost {
        spent.push(format!("cost {} used", trim(used.cost)));
        if held.cost > 0.0 {
            spent.push(format!("cost {} held by calls in flight", trim(held.cost)));
        }
        limit.push(format!("maxCost {}", trim(m)));
        more.push(format!("cost {}", trim(need.cost)));
    }
    [spent.join(", "), more.join(" and "), limit.join(" and ")]
}

fn trim(x: f64) -> String {
    let s = format!("{:.6}", crate::engine::usage::round_cost(x));
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// What the calls of one shard's runs used in a Budget's window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Share {
    pub used: Spend,
    /// The last refusal in this window.
    pub refused: Option<String>,
}

impl Share {
    /// Takes what `other` has that this share lacks: the larger figures, a refusal.
    fn merge(&mut self, other: &Share) -> bool {
        let before = self.clone();
        self.used.tokens = self.used.tokens.max(other.used.tokens);
        self.used.cost = self.used.cost.max(other.used.cost);
        if self.refused.is_none() {
            self.refused.clone_from(&other.refused);
        }
        *self != before
    }
}

/// One Budget as the ledger keeps it.
#[derive(Debug, Clone)]
struct Kept {
    spec: BudgetSpec,
    created: Timestamp,
    window_start: Timestamp,
    /// By shard (only shard 0 without shards).
    shares: BTreeMap<u32, Share>,
    /// With shards: each share as the Budget's status last showed it (or as written).
    stored: BTreeMap<u32, Share>,
    held: Spend,
    /// Changed since the last [`Budgets::snapshot`].
    dirty: bool,
}

impl Kept {
    fn roll(&mut self, now: Timestamp) {
        let start = window_start(self.spec.window, now, self.created);
        if start > self.window_start {
            self.restart(start);
        }
    }

    /// A new window from `start`.
    fn restart(&mut self, start: Timestamp) {
        self.window_start = start;
        self.shares.clear();
        self.stored.clear();
        self.dirty = true;
    }

    fn used(&self) -> Spend {
        let mut sum = Spend::default();
        for s in self.shares.values() {
            sum.add(s.used);
        }
        sum
    }

    fn refused(&self) -> Option<String> {
        self.shares.values().find_map(|s| s.refused.clone())
    }

    /// The shares of the status that belong to this window, by shard.
    fn stored_shares(&self, status: &BudgetStatus) -> BTreeMap<u32, Share> {
        status
            .shards
            .iter()
            .filter(|(_, s)| s.window_start.0 == self.window_start)
            .filter_map(|(k, s)| {
                let share = Share { used: Spend { tokens: s.tokens, cost: s.cost }, refused: s.refused.clone() };
                Some((k.parse().ok()?, share))
            })
            .collect()
    }

    /// Takes the status's shares of this window (with shards); true when any count grew.
    fn merge_stored(&mut self, status: &BudgetStatus) -> bool {
        let stored = self.stored_shares(status);
        let mut grew = false;
        for (k, s) in &stored {
            grew |= self.shares.entry(*k).or_default().merge(s);
        }
        self.stored.extend(stored);
        grew
    }

    fn counts(&self, scope: &CallScope) -> bool {
        let sel = &self.spec.selector;
        (sel.workflows.is_empty() || scope.workflow.as_ref().is_some_and(|w| sel.workflows.contains(w)))
            && (sel.agents.is_empty() || sel.agents.contains(&scope.agent))
    }
}

#[derive(Debug, Default)]
struct RunKept {
    budget: Option<RunBudget>,
    used: Spend,
    held: Spend,
    seen: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct Ledger {
    budgets: BTreeMap<(String, String), Kept>,
    runs: HashMap<String, RunKept>,
}

/// What the Budget controller writes to a Budget's status.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub used: Spend,
    pub window_start: Timestamp,
    pub window_end: Option<Timestamp>,
    pub refused: Option<String>,
}

/// A share this replica counted that the Budget's status does not show yet.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingShare {
    pub namespace: String,
    pub name: String,
    pub shard: u32,
    pub share: Share,
    pub window_start: Timestamp,
}

/// Suspends a run (`spec.suspend: true`) when a Budget with `onExceeded: Suspend` refuses one
/// of its calls.
pub trait Suspender: Send + Sync {
    fn suspend<'a>(&'a self, namespace: &'a str, run: &'a str, why: &'a str) -> BoxFuture<'a, ()>;
}

/// The ledger of every Budget and run budget of this process.
pub struct Budgets {
    ledger: Mutex<Ledger>,
    changed: Notify,
    /// Whether every watched scope's Budgets have been listed (calls wait for it, so that a
    /// restarted operator counts against budgets it has not read yet).
    synced: watch::Sender<bool>,
    expected_scopes: Mutex<(usize, HashSet<String>)>,
    suspender: std::sync::OnceLock<Arc<dyn Suspender>>,
    dirty: Notify,
    /// With shards, how many (calls count in their run's shard's share); 0 without.
    shards: u32,
}

impl Default for Budgets {
    /// A ledger with no Budget objects to wait for (local mode, tests).
    fn default() -> Self {
        Budgets {
            ledger: Mutex::default(),
            changed: Notify::new(),
            synced: watch::channel(true).0,
            expected_scopes: Mutex::new((0, HashSet::new())),
            suspender: std::sync::OnceLock::new(),
            dirty: Notify::new(),
            shards: 0,
        }
    }
}

/// How long a call waits for the Budgets to be listed after a start.
const SYNC_WAIT: Duration = Duration::from_secs(30);
/// Runs not seen for this long are forgotten.
const RUN_IDLE: Duration = Duration::from_secs(3600);

impl Budgets {
    /// A ledger that waits for `scopes` Budget watches to list before letting calls through.
    pub fn waiting_for(scopes: usize) -> Self {
        let b = Budgets::default();
        b.synced.send_replace(scopes == 0);
        *b.lock_scopes() = (scopes, HashSet::new());
        b
    }

    /// Counts by shard, `shards` of them, and takes the other replicas' shares from the status.
    pub fn sharded(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }

    pub fn is_sharded(&self) -> bool {
        self.shards > 0
    }

    /// The share a call counts in.
    fn shard_of(&self, scope: &CallScope) -> u32 {
        match (self.shards, scope.slot) {
            (0, _) | (_, None) => 0,
            (n, Some(slot)) => slot % n,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_scopes(&self) -> std::sync::MutexGuard<'_, (usize, HashSet<String>)> {
        self.expected_scopes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_suspender(&self, s: Arc<dyn Suspender>) {
        let _ = self.suspender.set(s);
    }

    pub fn suspender(&self) -> Option<&Arc<dyn Suspender>> {
        self.suspender.get()
    }

    /// The Budgets of watch scope `scope` have been listed.
    pub fn scope_synced(&self, scope: &str) {
        let mut s = self.lock_scopes();
        s.1.insert(scope.to_string());
        if s.1.len() >= s.0 {
            self.synced.send_replace(true);
        }
    }

    /// A Budget as its object says; the first time, its window's usage comes from its status.
    /// With shards, every time: the other replicas' shares.
    pub fn upsert(
        &self,
        namespace: &str,
        name: &str,
        spec: &BudgetSpec,
        status: Option<&BudgetStatus>,
        created: Timestamp,
    ) {
        let now = Timestamp::now();
        let mut grew = false;
        {
            let mut l = self.lock();
            let key = (namespace.to_string(), name.to_string());
            match l.budgets.get_mut(&key) {
                Some(k) => {
                    if k.spec.window != spec.window {
                        k.restart(window_start(spec.window, now, created));
                    }
                    k.spec = spec.clone();
                    k.roll(now);
                    if let Some(s) = status.filter(|_| self.is_sharded()) {
                        grew = k.merge_stored(s);
                        k.dirty |= grew;
                    }
                }
                None => {
                    let start = window_start(spec.window, now, created);
                    let stored = status.and_then(|s| s.window_start.as_ref().map(|t| (t.0, s)));
                    let mut kept = Kept {
                        spec: spec.clone(),
                        created,
                        window_start: start,
                        shares: BTreeMap::new(),
                        stored: BTreeMap::new(),
                        held: Spend::default(),
                        dirty: stored.is_none_or(|(t, _)| t != start),
                    };
                    match stored {
                        // The stored window is the current one: go on from its shares, or
                        // (without shards, or from before them) from its total.
                        Some((t, s)) if t == start => {
                            if self.is_sharded() && !kept.stored_shares(s).is_empty() {
                                kept.merge_stored(s);
                            } else {
                                let refused = s
                                    .conditions
                                    .iter()
                                    .find(|c| c.type_ == crate::api::EXCEEDED && c.status == "True")
                                    .map(|c| c.message.clone());
                                let used = Spend { tokens: s.used.tokens, cost: s.used.cost };
                                kept.shares.insert(0, Share { used, refused });
                            }
                        }
                        _ => {}
                    }
                    l.budgets.insert(key, kept);
                }
            }
        }
        if grew {
            self.dirty.notify_waiters();
            self.dirty.notify_one();
        }
        self.changed.notify_waiters();
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.lock().budgets.remove(&(namespace.to_string(), name.to_string()));
        self.changed.notify_waiters();
    }

    /// The state to write to a Budget's status (rolling its window over when its time came).
    pub fn snapshot(&self, namespace: &str, name: &str) -> Option<Snapshot> {
        let mut l = self.lock();
        let k = l.budgets.get_mut(&(namespace.to_string(), name.to_string()))?;
        k.roll(Timestamp::now());
        k.dirty = false;
        Some(Snapshot {
            used: k.used(),
            window_start: k.window_start,
            window_end: window_end(k.spec.window, k.window_start),
            refused: k.refused(),
        })
    }

    /// With shards: the shares of a Budget (or of every Budget) that differ from what its
    /// status shows, for the caller to write for the shards it holds.
    pub fn pending_shares(&self, budget: Option<(&str, &str)>) -> Vec<PendingShare> {
        if !self.is_sharded() {
            return Vec::new();
        }
        let now = Timestamp::now();
        let mut l = self.lock();
        let mut out = Vec::new();
        for ((ns, name), k) in l.budgets.iter_mut() {
            if budget.is_some_and(|(bns, bname)| (bns, bname) != (ns.as_str(), name.as_str())) {
                continue;
            }
            k.roll(now);
            for (shard, share) in &k.shares {
                if k.stored.get(shard) != Some(share) {
                    out.push(PendingShare {
                        namespace: ns.clone(),
                        name: name.clone(),
                        shard: *shard,
                        share: share.clone(),
                        window_start: k.window_start,
                    });
                }
            }
        }
        out
    }

    /// A share was written: the status shows it now.
    pub fn share_written(&self, p: &PendingShare) {
        let mut l = self.lock();
        if let Some(k) = l.budgets.get_mut(&(p.namespace.clone(), p.name.clone()))
            && k.window_start == p.window_start
        {
            k.stored.insert(p.shard, p.share.clone());
        }
    }

    /// Budgets whose usage changed since their last snapshot.
    pub fn dirty(&self) -> Vec<(String, String)> {
        let now = Timestamp::now();
        let mut l = self.lock();
        l.budgets
            .iter_mut()
            .filter_map(|(key, k)| {
                k.roll(now);
                k.dirty.then(|| key.clone())
            })
            .collect()
    }

    /// Waits until a budget's usage changes (for the coalesced status writes).
    pub async fn changed(&self) {
        self.dirty.notified().await
    }

    /// Holds `need` against every budget `scope` counts against, or says which one refuses.
    pub fn try_reserve(self: &Arc<Self>, scope: &CallScope, need: Spend) -> Result<Reservation, BudgetError> {
        let now = Timestamp::now();
        let shard = self.shard_of(scope);
        let mut l = self.lock();
        let mut keys = Vec::new();
        for (key, k) in l.budgets.iter_mut().filter(|((ns, _), _)| *ns == scope.namespace) {
            k.roll(now);
            if !k.counts(scope) {
                continue;
            }
            let used = k.used();
            if !fits(k.spec.max_tokens, k.spec.max_cost, used, k.held, need) {
                let [spent, more, limit] = describe(k.spec.max_tokens, k.spec.max_cost, used, k.held, need);
                let what = match k.spec.window {
                    BudgetWindow::Total => format!("budget {:?}", key.1),
                    w => format!("budget {:?} ({w:?} window from {})", key.1, k.window_start),
                };
                let err = BudgetError::Exceeded {
                    what,
                    spent,
                    need: more,
                    limit,
                    budget: Some(key.clone()),
                    on_exceeded: k.spec.on_exceeded,
                };
                let share = k.shares.entry(shard).or_default();
                if share.refused.is_none() {
                    share.refused = Some(err.to_string());
                    k.dirty = true;
                    self.dirty.notify_waiters();
                    self.dirty.notify_one();
                }
                return Err(err);
            }
            keys.push(key.clone());
        }
        let mut run_uid = None;
        if let Some(run) = &scope.run {
            if l.runs.len() > 1000 {
                let cutoff = tokio::time::Instant::now().checked_sub(RUN_IDLE);
                l.runs.retain(|_, r| r.held.tokens > 0 || cutoff.is_none_or(|c| r.seen.is_some_and(|s| s > c)));
            }
            let r = l
                .runs
                .entry(run.uid.clone())
                .or_insert_with(|| RunKept { used: run.used_before, ..Default::default() });
            r.budget = run.budget.clone();
            r.seen = Some(tokio::time::Instant::now());
            if let Some(b) = &r.budget
                && !fits(b.max_tokens, b.max_cost, r.used, r.held, need)
            {
                let [spent, more, limit] = describe(b.max_tokens, b.max_cost, r.used, r.held, need);
                return Err(BudgetError::Exceeded {
                    what: "the run's spec.budget".into(),
                    spent,
                    need: more,
                    limit,
                    budget: None,
                    on_exceeded: OnExceeded::Fail,
                });
            }
            r.held.add(need);
            run_uid = Some(run.uid.clone());
        }
        for key in &keys {
            if let Some(k) = l.budgets.get_mut(key) {
                k.held.add(need);
            }
        }
        Ok(Reservation { budgets: self.clone(), keys, run: run_uid, shard, need, settled: false })
    }

    /// Like [`Budgets::try_reserve`], after waiting for the Budgets to be listed; a refusal
    /// from a Budget with `onExceeded: Suspend` waits for room until `deadline` (the
    /// suspension itself is the caller's).
    pub async fn reserve(
        self: &Arc<Self>,
        scope: &CallScope,
        need: Spend,
        deadline: Option<tokio::time::Instant>,
        mut on_suspend: impl FnMut(&BudgetError),
    ) -> Result<Reservation, BudgetError> {
        let mut synced = self.synced.subscribe();
        if !*synced.borrow_and_update() {
            let until = tokio::time::Instant::now() + SYNC_WAIT;
            let until = deadline.map_or(until, |d| d.min(until));
            let _ = tokio::time::timeout_at(until, synced.wait_for(|s| *s)).await;
        }
        let mut told = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_reserve(scope, need) {
                Ok(r) => return Ok(r),
                Err(e) if e.suspends() => {
                    if !told {
                        on_suspend(&e);
                        told = true;
                    }
                    // Room comes with a new window, a larger budget, or calls that used less
                    // than they held: check again on each change, and once a minute.
                    let minute = tokio::time::Instant::now() + Duration::from_secs(60);
                    let until = deadline.map_or(minute, |d| d.min(minute));
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(until) => {}
                    }
                    if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                        return Err(BudgetError::OutOfTime(format!(
                            "{e}; the run is suspended and the step's time ran out waiting for room"
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn release(&self, keys: &[(String, String)], run: Option<&str>, shard: u32, need: Spend, used: Option<Spend>) {
        {
            let mut l = self.lock();
            for key in keys {
                if let Some(k) = l.budgets.get_mut(key) {
                    k.held.sub(need);
                    if let Some(u) = used {
                        k.shares.entry(shard).or_default().used.add(u);
                        k.dirty = true;
                    }
                }
            }
            if let Some(r) = run.and_then(|uid| l.runs.get_mut(uid)) {
                r.held.sub(need);
                if let Some(u) = used {
                    r.used.add(u);
                }
            }
        }
        if used.is_some() && !keys.is_empty() {
            self.dirty.notify_waiters();
            self.dirty.notify_one();
        }
        self.changed.notify_waiters();
    }

    /// What a run has used, as this process counted it.
    pub fn run_used(&self, uid: &str) -> Option<Spend> {
        self.lock().runs.get(uid).map(|r| r.used)
    }
}

/// A call's hold on its budgets.
pub struct Reservation {
    budgets: Arc<Budgets>,
    keys: Vec<(String, String)>,
    run: Option<String>,
    /// The share it counts in.
    shard: u32,
    need: Spend,
    settled: bool,
}

impl Reservation {
    /// The call used `used`: the hold becomes usage.
    pub fn settle(mut self, used: Spend) {
        self.settled = true;
        self.budgets.release(&self.keys, self.run.as_deref(), self.shard, self.need, Some(used));
    }

    /// What the call holds.
    pub fn need(&self) -> Spend {
        self.need
    }

    /// The Budgets the call counts against.
    pub fn budgets(&self) -> &[(String, String)] {
        &self.keys
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.budgets.release(&self.keys, self.run.as_deref(), self.shard, self.need, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BudgetSelector;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn spec(window: BudgetWindow, max_tokens: Option<u64>, max_cost: Option<f64>) -> BudgetSpec {
        BudgetSpec { window, max_tokens, max_cost, ..Default::default() }
    }

    fn scope(agent: &str, workflow: Option<&str>) -> CallScope {
        CallScope {
            namespace: "ns".into(),
            workflow: workflow.map(String::from),
            agent: agent.into(),
            ..Default::default()
        }
    }

    fn t(tokens: u64) -> Spend {
        Spend { tokens, cost: 0.0 }
    }

    #[test]
    fn windows_start_at_utc_boundaries() {
        let now = ts("2024-06-13T15:04:05Z"); // a Thursday
        let created = ts("2024-01-02T03:04:05Z");
        assert_eq!(window_start(BudgetWindow::Daily, now, created), ts("2024-06-13T00:00:00Z"));
        assert_eq!(window_start(BudgetWindow::Weekly, now, created), ts("2024-06-10T00:00:00Z"));
        assert_eq!(window_start(BudgetWindow::Monthly, now, created), ts("2024-06-01T00:00:00Z"));
        assert_eq!(window_start(BudgetWindow::Total, now, created), created);
        assert_eq!(window_end(BudgetWindow::Monthly, ts("2024-01-01T00:00:00Z")), Some(ts("2024-02-01T00:00:00Z")));
        assert_eq!(window_end(BudgetWindow::Weekly, ts("2024-06-10T00:00:00Z")), Some(ts("2024-06-17T00:00:00Z")));
        assert_eq!(window_end(BudgetWindow::Total, created), None);
        // A Monday is its own week's start.
        assert_eq!(window_start(BudgetWindow::Weekly, ts("2024-06-10T00:00:00Z"), created), ts("2024-06-10T00:00:00Z"));
    }

    #[test]
    fn fits_counts_what_is_used_held_and_needed() {
        assert!(fits(Some(100), None, t(50), t(30), t(20)));
        assert!(!fits(Some(100), None, t(50), t(30), t(21)));
        let c = |cost| Spend { tokens: 0, cost };
        assert!(fits(None, Some(1.0), c(0.5), c(0.25), c(0.25)));
        assert!(!fits(None, Some(1.0), c(0.5), c(0.25), c(0.26)));
        assert!(fits(None, None, t(u64::MAX), t(u64::MAX), t(u64::MAX)));
    }

    #[test]
    fn reservations_hold_the_worst_case_and_settle_on_usage() {
        let b = Arc::new(Budgets::default());
        b.upsert("ns", "team", &spec(BudgetWindow::Total, Some(100), None), None, Timestamp::now());
        let r1 = b.try_reserve(&scope("a", None), t(60)).expect("room");
        // 60 held: another 60 does not fit while the first is in flight.
        let err = b.try_reserve(&scope("a", None), t(60)).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("budget \"team\""), "{msg}");
        assert!(msg.contains("0 tokens used, 60 held by calls in flight"), "{msg}");
        assert!(msg.contains("maxTokens 100"), "{msg}");
        // The first call used 10: 90 left.
        r1.settle(t(10));
        let r2 = b.try_reserve(&scope("a", None), t(60)).expect("room again");
        drop(r2); // failed call: nothing used
        assert_eq!(b.snapshot("ns", "team").expect("kept").used, t(10));
        b.try_reserve(&scope("a", None), t(90)).expect("exactly the rest").settle(t(90));
        assert!(b.try_reserve(&scope("a", None), t(1)).is_err());
    }

    #[test]
    fn selectors_pick_the_calls_counted() {
        let b = Arc::new(Budgets::default());
        let mut s = spec(BudgetWindow::Total, Some(10), None);
        s.selector = BudgetSelector { workflows: vec!["wf".into()], agents: vec!["big".into()] };
        b.upsert("ns", "sel", &s, None, Timestamp::now());
        // Other agent, other workflow, other namespace: not counted.
        b.try_reserve(&scope("small", Some("wf")), t(100)).expect("other agent").settle(t(100));
        b.try_reserve(&scope("big", Some("other")), t(100)).expect("other workflow").settle(t(100));
        let mut other_ns = scope("big", Some("wf"));
        other_ns.namespace = "elsewhere".into();
        b.try_reserve(&other_ns, t(100)).expect("other namespace").settle(t(100));
        assert!(b.try_reserve(&scope("big", Some("wf")), t(11)).is_err());
        assert!(b.try_reserve(&scope("big", None), t(11)).is_ok(), "a run of no workflow is not counted");
    }

    #[test]
    fn run_budgets_start_from_what_the_run_used() {
        let b = Arc::new(Budgets::default());
        let mut sc = scope("a", None);
        sc.run = Some(RunScope {
            uid: "u".into(),
            budget: Some(RunBudget { max_tokens: None, max_cost: Some(1.0) }),
            used_before: Spend { tokens: 0, cost: 0.75 },
        });
        let need = Spend { tokens: 5, cost: 0.2 };
        b.try_reserve(&sc, need).expect("room").settle(need);
        let err = b.try_reserve(&sc, need).err().expect("refused").to_string();
        assert!(err.starts_with("the run's spec.budget: cost 0.95 used"), "{err}");
        assert!(err.contains("maxCost 1"), "{err}");
        assert_eq!(b.run_used("u").map(|s| s.tokens), Some(5));
    }

    #[test]
    fn usage_is_loaded_from_the_status_of_the_current_window_only() {
        let b = Arc::new(Budgets::default());
        let now = Timestamp::now();
        let s = spec(BudgetWindow::Daily, Some(100), None);
        let start = window_start(BudgetWindow::Daily, now, now);
        let status = |t: Timestamp| BudgetStatus {
            used: crate::api::BudgetUsed { tokens: 70, cost: 0.0 },
            window_start: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t)),
            ..Default::default()
        };
        b.upsert("ns", "today", &s, Some(&status(start)), now);
        assert_eq!(b.snapshot("ns", "today").expect("kept").used.tokens, 70);
        let yesterday = start.checked_sub(jiff::SignedDuration::from_hours(24)).expect("time");
        b.upsert("ns", "old", &s, Some(&status(yesterday)), now);
        let snap = b.snapshot("ns", "old").expect("kept");
        assert_eq!((snap.used.tokens, snap.window_start), (0, start));
        // Seen again: the ledger's own count wins over the (older) status.
        b.try_reserve(&scope("a", None), t(5)).expect("room").settle(t(5));
        b.upsert("ns", "today", &s, Some(&status(start)), now);
        assert_eq!(b.snapshot("ns", "today").expect("kept").used.tokens, 75);
    }

    #[test]
    fn a_new_window_starts_from_zero() {
        let b = Arc::new(Budgets::default());
        b.upsert("ns", "d", &spec(BudgetWindow::Daily, Some(10), None), None, Timestamp::now());
        b.try_reserve(&scope("a", None), t(10)).expect("room").settle(t(10));
        assert!(b.try_reserve(&scope("a", None), t(1)).is_err());
        // Pretend the window started yesterday.
        {
            let mut l = b.lock();
            let k = l.budgets.values_mut().next().expect("kept");
            k.window_start = k.window_start.checked_sub(jiff::SignedDuration::from_hours(24)).expect("time");
        }
        b.try_reserve(&scope("a", None), t(10)).expect("a new day");
        let snap = b.snapshot("ns", "d").expect("kept");
        assert_eq!(snap.used.tokens, 0);
        assert_eq!(snap.refused, None);
    }

    fn status_with_shares(start: Timestamp, shares: &[(&str, u64, Timestamp)]) -> BudgetStatus {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        BudgetStatus {
            used: crate::api::BudgetUsed { tokens: shares.iter().map(|s| s.1).sum(), cost: 0.0 },
            window_start: Some(Time(start)),
            shards: shares
                .iter()
                .map(|(k, tokens, at)| {
                    let share =
                        crate::api::BudgetShare { tokens: *tokens, cost: 0.0, window_start: Time(*at), refused: None };
                    (k.to_string(), share)
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn with_shards_every_replica_counts_its_shards_and_the_others_from_the_status() {
        let b = Arc::new(Budgets::default().sharded(3));
        let now = Timestamp::now();
        let s = spec(BudgetWindow::Daily, Some(100), None);
        let start = window_start(BudgetWindow::Daily, now, now);
        b.upsert("ns", "team", &s, None, now);
        let on = |slot| CallScope { slot: Some(slot), ..scope("a", None) };
        // Slots 4 and 5 are shards 1 and 2 of 3: each call counts in its shard's share.
        b.try_reserve(&on(4), t(10)).expect("room").settle(t(10));
        b.try_reserve(&on(5), t(20)).expect("room").settle(t(20));
        let pending = b.pending_shares(Some(("ns", "team")));
        let figures: Vec<(u32, u64)> = pending.iter().map(|p| (p.shard, p.share.used.tokens)).collect();
        assert_eq!(figures, vec![(1, 10), (2, 20)]);
        assert!(pending.iter().all(|p| p.window_start == start));
        b.share_written(&pending[0]);
        assert_eq!(b.pending_shares(None).len(), 1, "shard 1's share is written, shard 2's waits");
        // Another replica's share of shard 0 comes with the watch: 60 more, 90 in all.
        b.upsert("ns", "team", &s, Some(&status_with_shares(start, &[("0", 60, start), ("1", 10, start)])), now);
        assert_eq!(b.snapshot("ns", "team").expect("kept").used.tokens, 90);
        let err = b.try_reserve(&on(4), t(11)).err().expect("refused on the total").to_string();
        assert!(err.contains("90 tokens used"), "{err}");
        // A stored share below this replica's count (written before its last calls) does not
        // lower it; a share of an earlier window counts for nothing.
        let yesterday = start.checked_sub(jiff::SignedDuration::from_hours(24)).expect("time");
        let status = status_with_shares(start, &[("0", 60, start), ("1", 3, start), ("2", 500, yesterday)]);
        b.upsert("ns", "team", &s, Some(&status), now);
        let snap = b.snapshot("ns", "team").expect("kept");
        assert_eq!(snap.used.tokens, 90);
        // The refusal is shard 1's to write, and shows in the total.
        assert!(snap.refused.is_some());
        assert!(b.pending_shares(None).iter().any(|p| p.shard == 1 && p.share.refused.is_some()));
    }

    #[test]
    fn with_shards_a_restart_goes_on_from_the_shares_or_from_the_total_before_shards() {
        let now = Timestamp::now();
        let s = spec(BudgetWindow::Monthly, Some(1000), None);
        let start = window_start(BudgetWindow::Monthly, now, now);
        let b = Budgets::default().sharded(2);
        b.upsert("ns", "x", &s, Some(&status_with_shares(start, &[("0", 7, start), ("1", 5, start)])), now);
        assert_eq!(b.snapshot("ns", "x").expect("kept").used.tokens, 12);
        assert!(b.pending_shares(None).is_empty(), "what the status shows is not written again");
        // Written before shards were on: the total goes on as shard 0's share.
        let before = BudgetStatus { shards: Default::default(), ..status_with_shares(start, &[("0", 40, start)]) };
        let b = Budgets::default().sharded(2);
        b.upsert("ns", "x", &s, Some(&before), now);
        assert_eq!(b.snapshot("ns", "x").expect("kept").used.tokens, 40);
        let pending = b.pending_shares(None);
        assert_eq!(pending.iter().map(|p| (p.shard, p.share.used.tokens)).collect::<Vec<_>>(), vec![(0, 40)]);
        // Without shards, the ledger neither keeps shares to write nor takes them from the status.
        let b = Budgets::default();
        b.upsert("ns", "x", &s, Some(&status_with_shares(start, &[("0", 7, start)])), now);
        b.upsert("ns", "x", &s, Some(&status_with_shares(start, &[("0", 70, start)])), now);
        assert_eq!(b.snapshot("ns", "x").expect("kept").used.tokens, 7);
        assert!(b.pending_shares(None).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn suspend_budgets_wait_for_room() {
        let b = Arc::new(Budgets::default());
        let mut s = spec(BudgetWindow::Total, Some(10), None);
        s.on_exceeded = OnExceeded::Suspend;
        b.upsert("ns", "s", &s, None, Timestamp::now());
        b.try_reserve(&scope("a", None), t(10)).expect("room").settle(t(10));
        let told = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (b2, told2) = (b.clone(), told.clone());
        let waiter = tokio::spawn(async move {
            b2.reserve(&scope("a", None), t(5), None, |_| {
                told2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .await
            .map(|r| r.settle(t(5)))
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(told.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(!waiter.is_finished());
        // The budget is raised: the call goes.
        b.upsert("ns", "s", &spec(BudgetWindow::Total, Some(20), None), None, Timestamp::now());
        waiter.await.expect("task").expect("went");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        b.upsert("ns", "s", &s, None, Timestamp::now());
        let err = b.reserve(&scope("a", None), t(5), Some(deadline), |_| {}).await.err().expect("out of time");
        assert!(matches!(err, BudgetError::OutOfTime(_)), "{err}");
    }
}
