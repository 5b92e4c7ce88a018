//! The load balancer: picks a replica for each call among the replicas of the agents a step
//! selects, and keeps each replica's live load.
//!
//! - Only replicas whose pod is healthy, whose circuit is closed (or half-open for one probe),
//!   that are not rate limited, and that have a free slot (`maxConcurrency`) are picked.
//! - When none is free, the call waits in a fair queue: waiters are served first come, first
//!   served, each time a slot frees (a call ends, a replica appears or recovers). There is no
//!   polling: a waiter sleeps on a channel, and on a timer only when a circuit or a rate limit
//!   ends at a known instant. When every healthy replica the call may use has an open circuit,
//!   it does not wait: it fails at once, like a call with no healthy replica.
//! - A replica that fails `failure_threshold` calls in a row is taken out of rotation (its
//!   circuit opens) for a back-off. After the back-off one probe call is let through: success
//!   closes the circuit, failure opens it again for twice as long, up to a bound. Failures of
//!   calls that began before the circuit opened change nothing.
//! - A retry avoids the replicas its call already tried, while an untried one is in rotation.
//!
//! The strategies themselves are the pure function [`choose`]. Nothing here knows about
//! Kubernetes or HTTP.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::Strategy;

/// An agent: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey {
    pub namespace: String,
    pub name: String,
}

impl AgentKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl std::fmt::Display for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A replica of an agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaKey {
    pub agent: AgentKey,
    pub replica: String,
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.agent, self.replica)
    }
}

/// What the balancer is told about a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    pub name: String,
    /// Health from pod status (or true for an external endpoint).
    pub healthy: bool,
    /// Why the replica is not healthy.
    pub reason: String,
    /// In-flight calls allowed at once.
    pub max_concurrency: u32,
    /// Weight for the `weighted` strategy.
    pub weight: u32,
}

/// Tuning of the balancer.
#[derive(Clone, Debug)]
pub struct BalancerConfig {
    /// Consecutive failed calls that open a replica's circuit.
    pub failure_threshold: u32,
    /// First back-off of an open circuit.
    pub open_for: Duration,
    /// Longest back-off of an open circuit.
    pub max_open_for: Duration,
    /// Weight of a new latency sample in the moving average (0 to 1).
    pub latency_alpha: f64,
    /// Weight of a new outcome in the error rate (0 to 1).
    pub error_alpha: f64,
    /// Half-life of a latency average that gets no new samples, so a replica that was slow
    /// once is tried again by `performance_based` after a while.
    pub latency_half_life: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            latency_alpha: 0.3,
            error_alpha: 0.2,
            latency_half_life: Duration::from_secs(30),
        }
    }
}

/// State of a replica's circuit breaker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Circuit {
    /// Calls flow.
    #[default]
    Closed,
    /// Out of rotation until `until`; then one probe call is let through.
    Open { until: Instant, backoff: Duration },
    /// A probe call is in flight.
    HalfOpen { backoff: Duration },
}

impl Circuit {
    /// Open or probing: the replica is out of normal rotation.
    pub fn is_open(&self) -> bool {
        !matches!(self, Circuit::Closed)
    }
}

/// Live load of one replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplicaLoad {
    pub name: String,
    pub healthy: bool,
    pub reason: String,
    pub in_flight: u32,
    pub completed: u64,
    pub failed: u64,
    /// Times the balancer picked this replica.
    pub picks: u64,
    /// Moving average of call latency (none before the first completed call).
    pub ewma_latency: Option<Duration>,
    /// Moving average of failures (0 to 1).
    pub error_rate: f64,
    pub consecutive_failures: u32,
    pub circuit: Circuit,
    /// Rate limited (429) until then.
    pub throttled_until: Option<Instant>,
}

/// How a call on a replica ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// Answered; the latency is measured by the lease.
    Success,
    /// The replica failed (connection error, 5xx, timeout, a malformed answer): counts toward
    /// its circuit breaker.
    Failure,
    /// The replica asked to slow down (429): no calls until the given delay has passed.
    RateLimited(Duration),
    /// The replica answered, but refused the request (4xx): the request's fault, not the
    /// replica's.
    Rejected,
}

/// A request for a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickRequest {
    /// The agents whose replicas may serve the call.
    pub agents: Vec<AgentKey>,
    pub strategy: Strategy,
    /// Replicas to avoid while another one can serve (those a call's retries moved away from).
    pub avoid: Vec<ReplicaKey>,
}

impl PickRequest {
    pub fn new(mut agents: Vec<AgentKey>, strategy: Strategy) -> Self {
        agents.sort();
        agents.dedup();
        Self { agents, strategy, avoid: Vec::new() }
    }

    /// Also avoids `replica`: a call's retries go to replicas it has not tried yet, while there
    /// are some whose circuit is closed.
    pub fn avoiding(mut self, replica: Option<ReplicaKey>) -> Self {
        if let Some(r) = replica
            && !self.avoid.contains(&r)
        {
            self.avoid.push(r);
        }
        self
    }
}

/// Why no replica was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalancerError {
    #[error("no healthy replica: {detail}")]
    NoHealthyReplica { detail: String },
    #[error("no replica was free within {:.1}s ({why})", waited.as_secs_f64())]
    Timeout {
        waited: Duration,
        /// Why each replica could not be had when the wait ended.
        why: String,
    },
}

/// One replica as a strategy sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// May take a call now (free slot, circuit and rate limit allow it).
    pub eligible: bool,
    pub in_flight: u32,
    pub weight: u32,
    /// Latency estimate in milliseconds (none when unknown).
    pub latency_ms: Option<f64>,
    pub error_rate: f64,
}

/// Per group of agents (the agents of one request), what the strategies remember.
#[derive(Default, Debug)]
pub struct GroupState {
    /// Round-robin position, also the tie-breaker of the other strategies.
    pub cursor: usize,
    /// Smooth weighted round robin: the current weight of each replica.
    pub current: HashMap<ReplicaKey, i64>,
}

/// Picks among `views` by `strategy`; `None` when no view is eligible. `keys` name the views
/// (for the weighted state) and `state` is the group's memory.
pub fn choose(strategy: Strategy, views: &[View], keys: &[ReplicaKey], state: &mut GroupState) -> Option<usize> {
    let n = views.len();
    if n == 0 {
        return None;
    }
    let start = state.cursor % n;
    let rotation = (0..n).map(|i| (start + i) % n);
    let picked = match strategy {
        Strategy::RoundRobin => rotation.clone().find(|&j| views[j].eligible),
        Strategy::LeastConnections => min_by_rotating(views, rotation.clone(), |v| f64::from(v.in_flight)),
        Strategy::PerformanceBased => {
            let known = views.iter().filter_map(|v| v.latency_ms).fold(f64::INFINITY, f64::min);
            // A replica with no samples yet is assumed as fast as the fastest known one, so it
            // gets tried.
            let default = if known.is_finite() { known } else { 1.0 };
            min_by_rotating(views, rotation.clone(), |v| {
                let latency = v.latency_ms.unwrap_or(default).max(0.001);
                let penalty = 1.0 - v.error_rate.clamp(0.0, 0.9);
                latency * f64::from(v.in_flight + 1) / penalty
            })
        }
        Strategy::Weighted => {
            let positive = views.iter().any(|v| v.weight > 0);
            if positive {
                smooth_weighted(views, keys, state)
            } else {
                // Every weight is zero: spread evenly rather than never answer.
                rotation.clone().find(|&j| views[j].eligible)
            }
        }
    };
    if let Some(j) = picked {
        state.cursor = j + 1;
    }
    picked
}

fn min_by_rotating(views: &[View], order: impl Iterator<Item = usize>, cost: impl Fn(&View) -> f64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for j in order {
        if !views[j].eligible {
            continue;
        }
        let c = cost(&views[j]);
        if best.is_none_or(|(_, b)| c < b) {
            best = Some((j, c));
        }
    }
    best.map(|(j, _)| j)
}

/// Smooth weighted round robin (as in nginx): every eligible replica's current weight grows by
/// its weight, the largest is picked and loses the total. Over any window the picks follow the
/// weights, interleaved rather than in bursts.
fn smooth_weighted(views: &[View], keys: &[ReplicaKey], state: &mut GroupState) -> Option<usize> {
    let eligible: Vec<usize> = (0..views.len()).filter(|&j| views[j].eligible && views[j].weight > 0).collect();
    if eligible.is_empty() {
        return None;
    }
    let total: i64 = eligible.iter().map(|&j| i64::from(views[j].weight)).sum();
    let mut best: Option<(usize, i64)> = None;
    for &j in &eligible {
        let Some(key) = keys.get(j) else { continue };
        let cur = state.current.entry(key.clone()).or_insert(0);
        *cur += i64::from(views[j].weight);
        if best.is_none_or(|(_, b)| *cur > b) {
            best = Some((j, *cur));
        }
    }
    let (j, _) = best?;
    if let Some(cur) = keys.get(j).and_then(|k| state.current.get_mut(k)) {
        *cur -= total;
    }
    Some(j)
}

#[derive(Debug)]
struct Replica {
    spec: ReplicaSpec,
    in_flight: u32,
    completed: u64,
    failed: u64,
    picks: u64,
    ewma_ms: Option<f64>,
    last_sample: Option<Instant>,
    error_rate: f64,
    consecutive_failures: u32,
    circuit: Circuit,
    throttled_until: Option<Instant>,
}

impl Replica {
    fn new(spec: ReplicaSpec) -> Self {
        Self {
            spec,
            in_flight: 0,
            completed: 0,
            failed: 0,
            picks: 0,
            ewma_ms: None,
            last_sample: None,
            error_rate: 0.0,
            consecutive_failures: 0,
            circuit: Circuit::Closed,
            throttled_until: None,
        }
    }

    fn available(&self, now: Instant) -> bool {
        let circuit_allows = match self.circuit {
            Circuit::Closed => true,
            Circuit::Open { until, .. } => now >= until && self.in_flight == 0,
            Circuit::HalfOpen { .. } => false,
        };
        self.spec.healthy
            && circuit_allows
            && self.throttled_until.is_none_or(|t| now >= t)
            && self.in_flight < self.spec.max_concurrency.max(1)
    }

    /// Why the (healthy) replica cannot take a call now.
    fn unavailable_reason(&self, now: Instant) -> String {
        let secs = |t: Instant| t.saturating_duration_since(now).as_secs_f64();
        match self.circuit {
            Circuit::Open { until, .. } if until > now => {
                return format!(
                    "circuit open for {:.1}s more after {} failed calls in a row",
                    secs(until),
                    self.consecutive_failures
                );
            }
            Circuit::Open { .. } if self.in_flight > 0 => return "circuit open, waiting for its calls to end".into(),
            Circuit::HalfOpen { .. } => return "circuit half-open, its probe call in flight".into(),
            _ => {}
        }
        if let Some(t) = self.throttled_until.filter(|t| *t > now) {
            return format!("rate limited for {:.1}s more", secs(t));
        }
        if self.in_flight >= self.spec.max_concurrency.max(1) {
            return format!("busy with {} calls (maxConcurrency {})", self.in_flight, self.spec.max_concurrency.max(1));
        }
        "free".into()
    }

    /// When time alone makes the replica available again (a circuit or rate limit ending).
    fn available_at(&self, now: Instant) -> Option<Instant> {
        let circuit = match self.circuit {
            Circuit::Open { until, .. } if until > now => Some(until),
            _ => None,
        };
        let throttle = self.throttled_until.filter(|t| *t > now);
        match (circuit, throttle) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn latency_estimate(&self, now: Instant, half_life: Duration) -> Option<f64> {
        let ewma = self.ewma_ms?;
        let idle = self.last_sample.map(|t| now.saturating_duration_since(t)).unwrap_or_default();
        if half_life.is_zero() || self.in_flight > 0 {
            return Some(ewma);
        }
        Some(ewma * 0.5f64.powf(idle.as_secs_f64() / half_life.as_secs_f64()))
    }

    fn load(&self) -> ReplicaLoad {
        ReplicaLoad {
            name: self.spec.name.clone(),
            healthy: self.spec.healthy,
            reason: self.spec.reason.clone(),
            in_flight: self.in_flight,
            completed: self.completed,
            failed: self.failed,
            picks: self.picks,
            ewma_latency: self.ewma_ms.map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0)),
            error_rate: self.error_rate,
            consecutive_failures: self.consecutive_failures,
            circuit: self.circuit,
            throttled_until: self.throttled_until,
        }
    }
}

enum Pick {
    Got(ReplicaKey),
    Wait,
    NoneHealthy(String),
}

type Grant = Result<ReplicaKey, String>;

struct Waiter {
    id: u64,
    request: Arc<PickRequest>,
    tx: oneshot::Sender<Grant>,
}

/// Called with a replica whose circuit opened (`true`) or closed (`false`).
pub type CircuitListener = Arc<dyn Fn(&ReplicaKey, bool) + Send + Sync>;

#[derive(Default)]
struct State {
    replicas: BTreeMap<ReplicaKey, Replica>,
    by_agent: BTreeMap<AgentKey, Vec<ReplicaKey>>,
    queue: VecDeque<Waiter>,
    groups: HashMap<Vec<AgentKey>, GroupState>,
    next_id: u64,
}

struct Inner {
    state: Mutex<State>,
    config: BalancerConfig,
    listener: Option<CircuitListener>,
}

/// The load balancer; cloning shares it.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(BalancerConfig::default())
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("Balancer").field("replicas", &st.replicas.len()).field("queued", &st.queue.len()).finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, changes: Vec<(ReplicaKey, bool)>) {
        if let Some(listener) = &self.listener {
            for (key, open) in changes {
                listener(&key, open);
            }
        }
    }
}

impl State {
    fn try_pick(&mut self, req: &PickRequest, now: Instant, config: &BalancerConfig) -> Pick {
        let mut keys: Vec<ReplicaKey> = Vec::new();
        let mut unhealthy: Vec<String> = Vec::new();
        for agent in &req.agents {
            let replicas = self.by_agent.get(agent).map(Vec::as_slice).unwrap_or_default();
            if replicas.is_empty() {
                unhealthy.push(format!("agent {} has no replicas", agent.name));
            }
            for key in replicas {
                match self.replicas.get(key) {
                    Some(r) if r.spec.healthy => keys.push(key.clone()),
                    Some(r) => unhealthy.push(format!("{} ({})", key.replica, r.spec.reason)),
                    None => {}
                }
            }
        }
        if keys.is_empty() {
            return Pick::NoneHealthy(if unhealthy.is_empty() { "no replicas".into() } else { unhealthy.join(", ") });
        }
        // Replicas whose circuit is open are out of rotation: when that is all there is, the
        // call fails now rather than wait out the back-off (a circuit fails fast).
        let open_for = |r: &Replica| matches!(r.circuit, Circuit::Open { until, .. } if until > now);
        if keys.iter().all(|k| self.replicas.get(k).is_some_and(open_for)) {
            let open = keys
                .iter()
                .filter_map(|k| Some(format!("{} ({})", k.replica, self.replicas.get(k)?.unavailable_reason(now))));
            return Pick::NoneHealthy(open.chain(unhealthy).collect::<Vec<_>>().join(", "));
        }
        if !req.avoid.is_empty()
            && keys.iter().any(|k| !req.avoid.contains(k) && self.replicas.get(k).is_some_and(|r| !r.circuit.is_open()))
        {
            keys.retain(|k| !req.avoid.contains(k));
        }
        let views: Vec<View> = keys
            .iter()
            .filter_map(|k| self.replicas.get(k))
            .map(|r| View {
                eligible: r.available(now),
                in_flight: r.in_flight,
                weight: r.spec.weight,
                latency_ms: r.latency_estimate(now, config.latency_half_life),
                error_rate: r.error_rate,
            })
            .collect();
        let group = self.groups.entry(req.agents.clone()).or_default();
        match choose(req.strategy, &views, &keys, group) {
            Some(j) => match keys.get(j) {
                Some(key) => {
                    self.reserve(key, now);
                    Pick::Got(key.clone())
                }
                None => Pick::Wait,
            },
            None => Pick::Wait,
        }
    }

    fn reserve(&mut self, key: &ReplicaKey, now: Instant) {
        if let Some(r) = self.replicas.get_mut(key) {
            r.in_flight += 1;
            r.picks += 1;
            if let Circuit::Open { until, backoff } = r.circuit
                && now >= until
            {
                r.circuit = Circuit::HalfOpen { backoff };
            }
        }
    }

    /// Ends a call; returns a circuit change, if any.
    fn release(
        &mut self,
        key: &ReplicaKey,
        result: Option<(CallResult, Duration)>,
        now: Instant,
        config: &BalancerConfig,
    ) -> Option<(ReplicaKey, bool)> {
        let r = self.replicas.get_mut(key)?;
        r.in_flight = r.in_flight.saturating_sub(1);
        let was_open = r.circuit.is_open();
        let Some((result, latency)) = result else {
            // Cancelled: no verdict on the replica. A cancelled probe lets the next one through.
            if let Circuit::HalfOpen { backoff } = r.circuit {
                r.circuit = Circuit::Open { until: now, backoff };
            }
            return None;
        };
        let alpha = config.error_alpha.clamp(0.0, 1.0);
        match result {
            CallResult::Success => {
                r.completed += 1;
                let ms = latency.as_secs_f64() * 1000.0;
                let a = config.latency_alpha.clamp(0.0, 1.0);
                r.ewma_ms = Some(match r.ewma_ms {
                    Some(prev) => a * ms + (1.0 - a) * prev,
                    None => ms,
                });
                r.last_sample = Some(now);
                r.error_rate *= 1.0 - alpha;
                r.consecutive_failures = 0;
                r.circuit = Circuit::Closed;
            }
            CallResult::Failure => {
                r.failed += 1;
                r.error_rate = alpha + (1.0 - alpha) * r.error_rate;
                r.consecutive_failures += 1;
                let reopen = |backoff: Duration| {
                    let backoff = backoff.min(config.max_open_for);
                    Circuit::Open { until: now + backoff, backoff }
                };
                r.circuit = match r.circuit {
                    // The probe failed: twice as long.
                    Circuit::HalfOpen { backoff } => reopen(backoff.saturating_mul(2)),
                    // A call that began before the circuit opened: no news.
                    open @ Circuit::Open { .. } => open,
                    Circuit::Closed if r.consecutive_failures >= config.failure_threshold.max(1) => {
                        reopen(config.open_for)
                    }
                    Circuit::Closed => Circuit::Closed,
                };
            }
            CallResult::RateLimited(wait) => {
                r.failed += 1;
                r.error_rate = alpha + (1.0 - alpha) * r.error_rate;
                let until = now + wait;
                r.throttled_until = Some(r.throttled_until.map_or(until, |t| t.max(until)));
                if let Circuit::HalfOpen { backoff } = r.circuit {
                    r.circuit = Circuit::Open { until: now, backoff };
                }
            }
            CallResult::Rejected => {
                r.failed += 1;
                // The replica answered: it is alive.
                r.consecutive_failures = 0;
                r.circuit = Circuit::Closed;
            }
        }
        let open = r.circuit.is_open();
        (open != was_open).then(|| (key.clone(), open))
    }

    fn any_available(&self, now: Instant) -> bool {
        self.replicas.values().any(|r| r.available(now))
    }

    /// Serves waiters in order while replicas are free. Waiters that can no longer be served
    /// at all (no healthy replica left) are told so.
    fn settle(&mut self, now: Instant, config: &BalancerConfig) {
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].tx.is_closed() {
                self.queue.remove(i);
                continue;
            }
            let request = self.queue[i].request.clone();
            let outcome = match self.try_pick(&request, now, config) {
                Pick::Got(key) => Ok(key),
                Pick::NoneHealthy(detail) => Err(detail),
                Pick::Wait => {
                    if !self.any_available(now) {
                        break;
                    }
                    i += 1;
                    continue;
                }
            };
            let Some(waiter) = self.queue.remove(i) else { break };
            if let Err(Ok(key)) = waiter.tx.send(outcome) {
                // The waiter left meanwhile: give the slot back.
                self.release(&key, None, now, config);
            }
        }
    }

    /// Why no replica of `req` could be had, one clause per replica.
    fn why_waiting(&self, req: &PickRequest, now: Instant) -> String {
        let mut why = Vec::new();
        for key in req.agents.iter().filter_map(|a| self.by_agent.get(a)).flatten() {
            match self.replicas.get(key) {
                Some(r) if r.spec.healthy => why.push(format!("{}: {}", key.replica, r.unavailable_reason(now))),
                Some(r) => why.push(format!("{}: {}", key.replica, r.spec.reason)),
                None => {}
            }
        }
        if why.is_empty() { "no replicas".into() } else { why.join(", ") }
    }

    fn next_change(&self, req: &PickRequest, now: Instant) -> Option<Instant> {
        req.agents
            .iter()
            .filter_map(|a| self.by_agent.get(a))
            .flatten()
            .filter_map(|k| self.replicas.get(k))
            .filter(|r| r.spec.healthy)
            .filter_map(|r| r.available_at(now))
            .min()
    }
}

/// A replica given to one call. Report how the call went with [`Lease::finish`]; dropping the
/// lease without a verdict frees the slot and records nothing.
pub struct Lease {
    inner: Arc<Inner>,
    key: ReplicaKey,
    granted: Instant,
    waited: Duration,
    done: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).field("waited", &self.waited).finish()
    }
}

impl Lease {
    pub fn key(&self) -> &ReplicaKey {
        &self.key
    }

    /// Time spent waiting in the queue for this replica.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Time since the replica was given.
    pub fn elapsed(&self) -> Duration {
        self.granted.elapsed()
    }

    /// Records how the call went and frees the slot; returns the call's latency.
    pub fn finish(mut self, result: CallResult) -> Duration {
        self.done = true;
        let latency = self.granted.elapsed();
        let now = Instant::now();
        let change = {
            let mut st = self.inner.lock();
            let change = st.release(&self.key, Some((result, latency)), now, &self.inner.config);
            st.settle(now, &self.inner.config);
            change
        };
        self.inner.notify(change.into_iter().collect());
        latency
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let now = Instant::now();
        let mut st = self.inner.lock();
        st.release(&self.key, None, now, &self.inner.config);
        st.settle(now, &self.inner.config);
    }
}

/// A place in the queue; leaving it (dropping) gives back a slot granted meanwhile.
struct Place {
    inner: Arc<Inner>,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut st = self.inner.lock();
        st.queue.retain(|w| w.id != self.id);
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(key)) = rx.try_recv() {
                st.release(&key, None, now, &self.inner.config);
                st.settle(now, &self.inner.config);
            }
        }
    }
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        Self { inner: Arc::new(Inner { state: Mutex::default(), config, listener: None }) }
    }

    /// A balancer that reports circuit changes to `listener` (called outside of any lock).
    pub fn with_listener(config: BalancerConfig, listener: CircuitListener) -> Self {
        Self { inner: Arc::new(Inner { state: Mutex::default(), config, listener: Some(listener) }) }
    }

    pub fn config(&self) -> &BalancerConfig {
        &self.inner.config
    }

    /// Sets the replicas of an agent. Replicas that stay keep their load; new ones start
    /// empty; the others are forgotten. Waiting calls are served if this frees a replica.
    pub fn set_replicas(&self, agent: &AgentKey, replicas: Vec<ReplicaSpec>) {
        let now = Instant::now();
        let mut st = self.inner.lock();
        let mut keys: Vec<ReplicaKey> = Vec::with_capacity(replicas.len());
        for spec in replicas {
            let key = ReplicaKey { agent: agent.clone(), replica: spec.name.clone() };
            match st.replicas.get_mut(&key) {
                Some(r) => r.spec = spec,
                None => {
                    st.replicas.insert(key.clone(), Replica::new(spec));
                }
            }
            keys.push(key);
        }
        keys.sort();
        keys.dedup();
        let old = st.by_agent.insert(agent.clone(), keys.clone()).unwrap_or_default();
        for gone in old.iter().filter(|k| !keys.contains(k)) {
            st.replicas.remove(gone);
            for g in st.groups.values_mut() {
                g.current.remove(gone);
            }
        }
        st.settle(now, &self.inner.config);
    }

    /// Forgets an agent and its replicas.
    pub fn remove_agent(&self, agent: &AgentKey) {
        let now = Instant::now();
        let mut st = self.inner.lock();
        for key in st.by_agent.remove(agent).unwrap_or_default() {
            st.replicas.remove(&key);
        }
        st.groups.retain(|agents, _| !agents.contains(agent));
        st.settle(now, &self.inner.config);
    }

    /// Serves waiting calls that time has made servable (a circuit back-off or rate limit
    /// ended). Waiting calls do this themselves; this is for callers that want it sooner.
    pub fn settle(&self) {
        let now = Instant::now();
        self.inner.lock().settle(now, &self.inner.config);
    }

    /// The live load of an agent's replicas, by replica name.
    pub fn load(&self, agent: &AgentKey) -> Vec<ReplicaLoad> {
        let st = self.inner.lock();
        st.by_agent
            .get(agent)
            .map(|keys| keys.iter().filter_map(|k| st.replicas.get(k)).map(Replica::load).collect())
            .unwrap_or_default()
    }

    /// Calls waiting for a replica.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Gives a replica for one call: at once if one is free, else after waiting in the fair
    /// queue until one is, or until `deadline`. Fails at once when none of the agents has a
    /// healthy replica.
    pub async fn acquire(&self, request: PickRequest, deadline: Option<Instant>) -> Result<Lease, BalancerError> {
        let start = Instant::now();
        let request = Arc::new(request);
        let mut place = {
            let mut st = self.inner.lock();
            let now = Instant::now();
            // Waiters first: whatever they can take is theirs. What is left is free for us.
            st.settle(now, &self.inner.config);
            match st.try_pick(&request, now, &self.inner.config) {
                Pick::Got(key) => return Ok(self.lease(key, start)),
                Pick::NoneHealthy(detail) => return Err(BalancerError::NoHealthyReplica { detail }),
                Pick::Wait => {}
            }
            let (tx, rx) = oneshot::channel();
            st.next_id += 1;
            let id = st.next_id;
            st.queue.push_back(Waiter { id, request: request.clone(), tx });
            Place { inner: self.inner.clone(), id, rx: Some(rx) }
        };
        loop {
            let next = self.inner.lock().next_change(&request, Instant::now());
            let Some(rx) = place.rx.as_mut() else {
                return Err(self.timeout(&request, start));
            };
            let timer = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let expiry = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                grant = rx => {
                    place.rx = None;
                    return match grant {
                        Ok(Ok(key)) => Ok(self.lease(key, start)),
                        Ok(Err(detail)) => Err(BalancerError::NoHealthyReplica { detail }),
                        // The balancer never drops a waiter it did not answer.
                        Err(_) => Err(self.timeout(&request, start)),
                    };
                }
                _ = timer => self.settle(),
                _ = expiry => {
                    drop(place);
                    return Err(self.timeout(&request, start));
                }
            }
        }
    }

    fn timeout(&self, request: &PickRequest, start: Instant) -> BalancerError {
        let why = self.inner.lock().why_waiting(request, Instant::now());
        BalancerError::Timeout { waited: start.elapsed(), why }
    }

    fn lease(&self, key: ReplicaKey, start: Instant) -> Lease {
        Lease { inner: self.inner.clone(), key, granted: Instant::now(), waited: start.elapsed(), done: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn agent(name: &str) -> AgentKey {
        AgentKey::new("ns", name)
    }

    fn spec(name: &str, max: u32, weight: u32) -> ReplicaSpec {
        ReplicaSpec { name: name.into(), healthy: true, reason: String::new(), max_concurrency: max, weight }
    }

    fn balancer(replicas: &[(&str, u32)]) -> Balancer {
        let b = Balancer::default();
        b.set_replicas(&agent("a"), replicas.iter().map(|(n, m)| spec(n, *m, 1)).collect());
        b
    }

    fn req(strategy: Strategy) -> PickRequest {
        PickRequest::new(vec![agent("a")], strategy)
    }

    async fn pick(b: &Balancer, strategy: Strategy) -> Lease {
        b.acquire(req(strategy), None).await.expect("a replica")
    }

    fn counts(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for n in names {
            *m.entry(n).or_default() += 1;
        }
        m
    }

    fn views(specs: &[(bool, u32, u32, Option<f64>, f64)]) -> (Vec<View>, Vec<ReplicaKey>) {
        let views = specs
            .iter()
            .map(|&(eligible, in_flight, weight, latency_ms, error_rate)| View {
                eligible,
                in_flight,
                weight,
                latency_ms,
                error_rate,
            })
            .collect();
        let keys = (0..specs.len()).map(|i| ReplicaKey { agent: agent("a"), replica: format!("r{i}") }).collect();
        (views, keys)
    }

    #[test]
    fn round_robin_takes_each_eligible_replica_in_turn() {
        let (v, k) = views(&[(true, 0, 1, None, 0.0), (false, 4, 1, None, 0.0), (true, 0, 1, None, 0.0)]);
        let mut g = GroupState::default();
        let picks: Vec<usize> = (0..6).filter_map(|_| choose(Strategy::RoundRobin, &v, &k, &mut g)).collect();
        assert_eq!(picks, [0, 2, 0, 2, 0, 2]);
        let (v, k) = views(&[(false, 0, 1, None, 0.0); 3]);
        assert_eq!(choose(Strategy::RoundRobin, &v, &k, &mut g), None);
    }

    #[test]
    fn least_connections_takes_the_least_loaded_and_rotates_ties() {
        let (v, k) = views(&[(true, 2, 1, None, 0.0), (true, 0, 1, None, 0.0), (true, 1, 1, None, 0.0)]);
        let mut g = GroupState::default();
        assert_eq!(choose(Strategy::LeastConnections, &v, &k, &mut g), Some(1));
        let (v, k) = views(&[(true, 0, 1, None, 0.0); 3]);
        let picks: Vec<usize> = (0..3).filter_map(|_| choose(Strategy::LeastConnections, &v, &k, &mut g)).collect();
        let mut sorted = picks.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 1, 2], "ties rotate: {picks:?}");
    }

    #[test]
    fn weighted_follows_weights_smoothly() {
        let (v, k) = views(&[(true, 0, 3, None, 0.0), (true, 0, 1, None, 0.0), (true, 0, 0, None, 0.0)]);
        let mut g = GroupState::default();
        let picks: Vec<usize> = (0..40).filter_map(|_| choose(Strategy::Weighted, &v, &k, &mut g)).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 30);
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 10);
        assert_eq!(picks.iter().filter(|&&p| p == 2).count(), 0, "weight 0 takes no calls");
        // Smooth: never more than three of the heavy one in a row.
        assert!(picks.windows(4).all(|w| w.contains(&1)), "{picks:?}");
        // All weights zero: even spread rather than nothing.
        let (v, k) = views(&[(true, 0, 0, None, 0.0), (true, 0, 0, None, 0.0)]);
        let picks: Vec<usize> = (0..4).filter_map(|_| choose(Strategy::Weighted, &v, &k, &mut g)).collect();
        assert_eq!(picks.len(), 4);
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 2);
    }

    #[test]
    fn performance_based_weighs_latency_load_and_errors() {
        let mut g = GroupState::default();
        // 10 ms vs 100 ms: the fast one, until it has ten times the load.
        let (v, k) = views(&[(true, 0, 1, Some(100.0), 0.0), (true, 0, 1, Some(10.0), 0.0)]);
        assert_eq!(choose(Strategy::PerformanceBased, &v, &k, &mut g), Some(1));
        let (v, k) = views(&[(true, 0, 1, Some(100.0), 0.0), (true, 10, 1, Some(10.0), 0.0)]);
        assert_eq!(choose(Strategy::PerformanceBased, &v, &k, &mut g), Some(0));
        // Errors make a replica look slower.
        let (v, k) = views(&[(true, 0, 1, Some(10.0), 0.0), (true, 0, 1, Some(8.0), 0.5)]);
        assert_eq!(choose(Strategy::PerformanceBased, &v, &k, &mut g), Some(0));
        // An unmeasured replica is tried.
        let (v, k) = views(&[(true, 0, 1, Some(10.0), 0.0), (true, 0, 1, None, 0.0)]);
        let picks: Vec<usize> = (0..2).filter_map(|_| choose(Strategy::PerformanceBased, &v, &k, &mut g)).collect();
        assert!(picks.contains(&1), "{picks:?}");
    }

    #[tokio::test]
    async fn round_robin_spreads_sequential_calls_evenly() {
        let b = balancer(&[("r1", 4), ("r2", 4), ("r3", 4)]);
        let mut names = Vec::new();
        for _ in 0..30 {
            let lease = pick(&b, Strategy::RoundRobin).await;
            names.push(lease.key().replica.clone());
            lease.finish(CallResult::Success);
        }
        assert_eq!(&names[..6], ["r1", "r2", "r3", "r1", "r2", "r3"]);
        assert!(counts(names).values().all(|&c| c == 10));
        let load = b.load(&agent("a"));
        assert!(load.iter().all(|l| l.completed == 10 && l.picks == 10 && l.in_flight == 0), "{load:?}");
    }

    #[tokio::test]
    async fn unhealthy_and_full_replicas_are_skipped() {
        let b = Balancer::default();
        let mut sick = spec("sick", 4, 1);
        sick.healthy = false;
        sick.reason = "CrashLoopBackOff".into();
        b.set_replicas(&agent("a"), vec![spec("one", 2, 1), sick, spec("two", 1, 1)]);
        let held: Vec<Lease> = vec![
            pick(&b, Strategy::RoundRobin).await,
            pick(&b, Strategy::RoundRobin).await,
            pick(&b, Strategy::RoundRobin).await,
        ];
        let names = counts(held.iter().map(|l| l.key().replica.clone()));
        assert_eq!(names.get("one"), Some(&2));
        assert_eq!(names.get("two"), Some(&1));
        assert_eq!(names.get("sick"), None);
        // Everything healthy is full: the next call waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), pick(&b, Strategy::RoundRobin)).await;
        assert!(waiting.is_err(), "no free slot, the call must wait");
        assert_eq!(b.queued(), 0, "a waiter that gives up leaves the queue");
    }

    #[tokio::test]
    async fn no_healthy_replica_fails_at_once_with_reasons() {
        let b = Balancer::default();
        let mut sick = spec("p-1", 4, 1);
        sick.healthy = false;
        sick.reason = "NotReady".into();
        b.set_replicas(&agent("a"), vec![sick]);
        b.set_replicas(&agent("empty"), vec![]);
        let err = b
            .acquire(PickRequest::new(vec![agent("a"), agent("empty")], Strategy::RoundRobin), None)
            .await
            .expect_err("nothing healthy");
        let msg = err.to_string();
        assert!(msg.contains("p-1 (NotReady)") && msg.contains("agent empty has no replicas"), "{msg}");
    }

    #[tokio::test]
    async fn the_queue_is_first_come_first_served() {
        let b = balancer(&[("only", 1)]);
        let first = pick(&b, Strategy::RoundRobin).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (b2, order) = (b.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let lease = pick(&b2, Strategy::RoundRobin).await;
                order.lock().expect("lock").push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
                lease.finish(CallResult::Success);
            }));
            // Let the task enqueue before the next one starts.
            while b.queued() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        first.finish(CallResult::Success);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("lock"), [0, 1, 2, 3, 4]);
        assert_eq!(b.load(&agent("a"))[0].completed, 6);
    }

    #[tokio::test]
    async fn a_newcomer_does_not_overtake_the_queue_and_new_replicas_serve_it() {
        let b = balancer(&[("one", 1)]);
        let held = pick(&b, Strategy::RoundRobin).await;
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { pick(&b, Strategy::RoundRobin).await.key().replica.clone() })
        };
        while b.queued() < 1 {
            tokio::task::yield_now().await;
        }
        // A replica appears: the waiter gets it.
        b.set_replicas(&agent("a"), vec![spec("one", 1, 1), spec("two", 1, 1)]);
        assert_eq!(waiter.await.expect("task"), "two");
        drop(held);
        assert_eq!(b.load(&agent("a")).iter().map(|l| l.in_flight).sum::<u32>(), 0);
    }

    #[tokio::test]
    async fn a_granted_waiter_that_left_gives_its_slot_back() {
        let b = balancer(&[("only", 1)]);
        let held = pick(&b, Strategy::RoundRobin).await;
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { pick(&b, Strategy::RoundRobin).await })
        };
        while b.queued() < 1 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        held.finish(CallResult::Success);
        assert_eq!(b.load(&agent("a"))[0].in_flight, 0);
        let again = tokio::time::timeout(Duration::from_millis(100), pick(&b, Strategy::RoundRobin)).await;
        assert!(again.is_ok(), "the slot is free");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_ends_at_the_deadline() {
        let b = balancer(&[("only", 1)]);
        let _held = pick(&b, Strategy::RoundRobin).await;
        let deadline = Instant::now() + Duration::from_secs(2);
        let err = b.acquire(req(Strategy::RoundRobin), Some(deadline)).await.expect_err("times out");
        assert!(matches!(err, BalancerError::Timeout { .. }), "{err}");
        assert_eq!(err.to_string(), "no replica was free within 2.0s (only: busy with 1 calls (maxConcurrency 1))");
        assert_eq!(b.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_says_why_no_replica_was_free() {
        let b = balancer(&[("bad", 4)]);
        for _ in 0..3 {
            pick(&b, Strategy::RoundRobin).await.finish(CallResult::Failure);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        let _probe = pick(&b, Strategy::RoundRobin).await;
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = b.acquire(req(Strategy::RoundRobin), Some(deadline)).await.expect_err("probe in flight");
        assert_eq!(
            err.to_string(),
            "no replica was free within 1.0s (bad: circuit half-open, its probe call in flight)"
        );
        let b = balancer(&[("slow", 4)]);
        pick(&b, Strategy::RoundRobin).await.finish(CallResult::RateLimited(Duration::from_secs(10)));
        let deadline = Instant::now() + Duration::from_secs(1);
        let err = b.acquire(req(Strategy::RoundRobin), Some(deadline)).await.expect_err("rate limited");
        assert_eq!(err.to_string(), "no replica was free within 1.0s (slow: rate limited for 9.0s more)");
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_after_repeated_failures_and_recovers_after_a_probe() {
        let b = balancer(&[("bad", 4), ("good", 4)]);
        // Fail "bad" three times in a row.
        let mut failures = 0;
        while failures < 3 {
            let lease = pick(&b, Strategy::RoundRobin).await;
            if lease.key().replica == "bad" {
                lease.finish(CallResult::Failure);
                failures += 1;
            } else {
                lease.finish(CallResult::Success);
            }
        }
        let bad = |b: &Balancer| b.load(&agent("a")).into_iter().find(|l| l.name == "bad").expect("bad");
        assert!(matches!(bad(&b).circuit, Circuit::Open { .. }));
        // Out of rotation: every call goes to "good".
        for _ in 0..10 {
            let lease = pick(&b, Strategy::RoundRobin).await;
            assert_eq!(lease.key().replica, "good");
            lease.finish(CallResult::Success);
        }
        // After the back-off, one probe; its failure doubles the back-off.
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = loop {
            let lease = pick(&b, Strategy::RoundRobin).await;
            if lease.key().replica == "bad" {
                break lease;
            }
            lease.finish(CallResult::Success);
        };
        assert!(matches!(bad(&b).circuit, Circuit::HalfOpen { .. }));
        probe.finish(CallResult::Failure);
        match bad(&b).circuit {
            Circuit::Open { backoff, .. } => assert_eq!(backoff, Duration::from_secs(10)),
            other => panic!("expected open, got {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = loop {
            let lease = pick(&b, Strategy::RoundRobin).await;
            if lease.key().replica == "bad" {
                break lease;
            }
            lease.finish(CallResult::Success);
        };
        probe.finish(CallResult::Success);
        assert_eq!(bad(&b).circuit, Circuit::Closed);
        assert_eq!(bad(&b).consecutive_failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_fail_at_once_while_every_circuit_is_open_and_stragglers_do_not_lengthen_it() {
        let b = balancer(&[("only", 8)]);
        // Five calls in flight; they all fail (a hung replica): the third opens the circuit.
        let leases: Vec<Lease> = futures::future::join_all((0..5).map(|_| pick(&b, Strategy::RoundRobin))).await;
        for lease in leases {
            lease.finish(CallResult::Failure);
        }
        let only = |b: &Balancer| b.load(&agent("a"))[0].circuit;
        let Circuit::Open { backoff, .. } = only(&b) else { panic!("open: {:?}", only(&b)) };
        assert_eq!(backoff, Duration::from_secs(5), "failures of calls begun before it opened are no probes");
        // No waiting out the back-off: the call fails now, saying why.
        let err = b.acquire(req(Strategy::RoundRobin), None).await.expect_err("fails fast");
        assert_eq!(
            err.to_string(),
            "no healthy replica: only (circuit open for 5.0s more after 5 failed calls in a row)"
        );
        assert_eq!(b.queued(), 0);
        // After the back-off, the probe goes through.
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = pick(&b, Strategy::RoundRobin).await;
        assert!(matches!(only(&b), Circuit::HalfOpen { .. }));
        probe.finish(CallResult::Success);
        assert_eq!(only(&b), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_changes_are_reported() {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let seen = changes.clone();
        let listener: CircuitListener = Arc::new(move |k: &ReplicaKey, open| {
            seen.lock().expect("lock").push((k.replica.clone(), open));
        });
        let b = Balancer::with_listener(BalancerConfig { failure_threshold: 1, ..Default::default() }, listener);
        b.set_replicas(&agent("a"), vec![spec("r", 1, 1)]);
        pick(&b, Strategy::RoundRobin).await.finish(CallResult::Failure);
        tokio::time::advance(Duration::from_secs(5)).await;
        pick(&b, Strategy::RoundRobin).await.finish(CallResult::Success);
        assert_eq!(*changes.lock().expect("lock"), [("r".to_string(), true), ("r".to_string(), false)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_served_when_a_rate_limit_ends() {
        let b = balancer(&[("only", 4)]);
        pick(&b, Strategy::RoundRobin).await.finish(CallResult::RateLimited(Duration::from_secs(3)));
        let start = Instant::now();
        let lease = pick(&b, Strategy::RoundRobin).await;
        assert_eq!(start.elapsed(), Duration::from_secs(3), "served exactly when the rate limit ends");
        lease.finish(CallResult::Success);
        let load = &b.load(&agent("a"))[0];
        assert_eq!((load.completed, load.failed), (1, 1));
        assert_eq!(load.circuit, Circuit::Closed, "a rate limit is not a failure of the replica");
    }

    #[tokio::test]
    async fn a_retry_avoids_the_replica_that_failed() {
        let b = balancer(&[("r1", 4), ("r2", 4)]);
        let avoid = ReplicaKey { agent: agent("a"), replica: "r1".into() };
        for _ in 0..4 {
            let lease = b.acquire(req(Strategy::RoundRobin).avoiding(Some(avoid.clone())), None).await.expect("lease");
            assert_eq!(lease.key().replica, "r2");
            lease.finish(CallResult::Success);
        }
        // Every replica a call tried is avoided while an untried one is left.
        let b = balancer(&[("r1", 4), ("r2", 4), ("r3", 4)]);
        let key = |r: &str| Some(ReplicaKey { agent: agent("a"), replica: r.into() });
        for _ in 0..6 {
            let request = req(Strategy::RoundRobin).avoiding(key("r1")).avoiding(key("r2")).avoiding(key("r1"));
            assert_eq!(request.avoid.len(), 2);
            let lease = b.acquire(request, None).await.expect("lease");
            assert_eq!(lease.key().replica, "r3");
            lease.finish(CallResult::Success);
        }
        let all = req(Strategy::RoundRobin).avoiding(key("r1")).avoiding(key("r2")).avoiding(key("r3"));
        let lease = b.acquire(all, None).await.expect("all tried: any will do");
        lease.finish(CallResult::Success);
        // With one replica, the retry goes back to it.
        let b = balancer(&[("r1", 4)]);
        let lease = b.acquire(req(Strategy::RoundRobin).avoiding(Some(avoid)), None).await.expect("lease");
        assert_eq!(lease.key().replica, "r1");
    }

    #[tokio::test]
    async fn weighted_spreads_across_agents_by_their_weight() {
        let b = Balancer::default();
        b.set_replicas(&agent("big"), vec![spec("big-0", 8, 3)]);
        b.set_replicas(&agent("small"), vec![spec("small-0", 8, 1)]);
        let mut names = Vec::new();
        for _ in 0..40 {
            let lease = b.acquire(PickRequest::new(vec![agent("small"), agent("big")], Strategy::Weighted), None).await;
            let lease = lease.expect("lease");
            names.push(lease.key().replica.clone());
            lease.finish(CallResult::Success);
        }
        let c = counts(names);
        assert_eq!((c["big-0"], c["small-0"]), (30, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn least_connections_and_performance_favour_the_faster_replica() {
        for strategy in [Strategy::LeastConnections, Strategy::PerformanceBased] {
            let b = balancer(&[("fast", 4), ("slow", 4)]);
            let mut served = BTreeMap::<String, usize>::new();
            // Simulated time: "slow" takes 5 ms, "fast" 1 ms; 4 calls are in flight at once.
            let mut in_flight: Vec<(Lease, u32)> = Vec::new();
            for _ in 0..60 {
                while in_flight.len() >= 4 {
                    tokio::time::advance(Duration::from_millis(1)).await;
                    for call in in_flight.iter_mut() {
                        call.1 = call.1.saturating_sub(1);
                    }
                    let (done, rest): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|c| c.1 == 0);
                    in_flight = rest;
                    for (lease, _) in done {
                        lease.finish(CallResult::Success);
                    }
                }
                let lease = pick(&b, strategy).await;
                let ticks = if lease.key().replica == "fast" { 1 } else { 5 };
                *served.entry(lease.key().replica.clone()).or_default() += 1;
                in_flight.push((lease, ticks));
            }
            let (fast, slow) = (served.get("fast").copied().unwrap_or(0), served.get("slow").copied().unwrap_or(0));
            assert!(fast >= 2 * slow, "{strategy:?}: fast {fast}, slow {slow}");
        }
    }
}
