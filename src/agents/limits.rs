//! Rate limits per Agent (`spec.rateLimit`), in-process and shared by every run and step that
//! uses the agent: requests per minute and tokens per minute.
//!
//! Each limit is a token bucket refilled continuously at `limit / 60` per second that holds at
//! most one second of refill (at least one request, or one call's worth of tokens): calls go
//! out evenly, never in a burst a provider's own limiter would refuse. A call *reserves* its
//! worst case (one request, and the prompt's estimate plus `maxTokens`) before it is sent, and
//! *settles* on the reply's usage: what it did not use goes back in the bucket. A reservation
//! larger than the bucket goes out when the bucket is full and leaves it in debt, so one large
//! call is never starved.
//!
//! Calls that find no room wait in a fair queue: the highest run priority first, then first
//! come. Only the head of the queue takes from the buckets, so a large call is not overtaken
//! for ever by small ones. A waiting call that is dropped (its step aborted or timed out)
//! leaves the queue.
//!
//! When the provider still answers 429 (another client shares the key, or its limit is lower
//! than the Agent says), [`Limiter::rate_limited`] empties the buckets, pauses them for the
//! delay asked, and halves the rate for [`TIGHTEN_FOR`]; a further 429 halves it again (down
//! to a tenth).
//!
//! With shards ([`Limits::set_share`]) each replica takes its share of every limit: the part of
//! the shards it holds. Runs are spread over the shards by a hash of their UID, so each
//! replica's share of the calls follows its share of the shards, and together the replicas keep
//! to the limit (a replica whose shards are busier than the others' waits while they have room).
//!
//! Why not `governor`: its GCRA has no way to give back the unused part of a reservation, and
//! no queue ordered by priority; both are what this module is for.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::api::RateLimit;

use super::balancer::AgentKey;

/// How long a 429 keeps an agent's rate lowered.
pub const TIGHTEN_FOR: Duration = Duration::from_secs(60);
/// Lowest share of its rate a run of 429s leaves an agent.
const MIN_FACTOR: f64 = 0.1;
/// Seconds of refill a bucket holds.
const BURST_SECONDS: f64 = 1.0;

/// Why a call did not get through the limiter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "agent {agent:?} (spec.rateLimit): still waiting for room after {waited:.1}s ({position} calls ahead in its queue) when the step's time ran out"
    )]
    OutOfTime { agent: String, waited: f64, position: usize },
}

/// What one call takes from an agent's limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    pub requests: f64,
    pub tokens: f64,
}

/// One limit as a bucket: `level` may go below zero (debt) after a large reservation.
#[derive(Debug, Clone)]
struct Bucket {
    per_second: f64,
    capacity: f64,
    level: f64,
}

impl Bucket {
    fn new(per_minute: f64, min_capacity: f64) -> Self {
        let per_second = per_minute / 60.0;
        let capacity = (per_second * BURST_SECONDS).max(min_capacity);
        Bucket { per_second, capacity, level: capacity }
    }

    fn refill(&mut self, seconds: f64, factor: f64) {
        self.level = (self.level + seconds * self.per_second * factor).min(self.capacity);
    }

    /// Whether `n` may be taken now: all of it, or a full bucket for a reservation larger than
    /// the bucket.
    fn fits(&self, n: f64) -> bool {
        self.level >= n.min(self.capacity) - 1e-9
    }

    /// Seconds until [`Bucket::fits`] holds for `n`.
    fn wait_for(&self, n: f64, factor: f64) -> f64 {
        let missing = n.min(self.capacity) - self.level;
        if missing <= 0.0 { 0.0 } else { missing / (self.per_second * factor).max(1e-9) }
    }
}

/// The state of one agent's limits.
#[derive(Debug)]
struct State {
    limit: RateLimit,
    /// The part of `limit` this replica takes (with shards).
    share: f64,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    refilled: Instant,
    /// Waiting calls: (priority reversed, arrival) -> ().
    queue: BTreeMap<(i64, u64), ()>,
    next: u64,
    /// Rate factor after 429s, and until when.
    factor: f64,
    tightened_until: Option<Instant>,
    /// No call goes out before this (a provider's `Retry-After`).
    paused_until: Option<Instant>,
}

impl State {
    fn new(limit: &RateLimit, share: f64, now: Instant) -> Self {
        let mut s = State {
            limit: RateLimit::default(),
            share: 1.0,
            requests: None,
            tokens: None,
            refilled: now,
            queue: BTreeMap::new(),
            next: 0,
            factor: 1.0,
            tightened_until: None,
            paused_until: None,
        };
        s.configure(limit, share);
        s
    }

    /// New limits, or a new share of them: buckets start full (a change takes effect at once).
    fn configure(&mut self, limit: &RateLimit, share: f64) {
        if &self.limit == limit && self.share == share {
            return;
        }
        self.limit = limit.clone();
        self.share = share;
        self.requests = limit.requests_per_minute.map(|r| Bucket::new(f64::from(r) * share, 1.0));
        self.tokens = limit.tokens_per_minute.map(|t| Bucket::new(t as f64 * share, 1.0));
    }

    fn refill(&mut self, now: Instant) {
        if self.tightened_until.is_some_and(|t| now >= t) {
            self.factor = 1.0;
            self.tightened_until = None;
        }
        let from = match self.paused_until {
            Some(p) if now < p => {
                self.refilled = now;
                return;
            }
            Some(p) => {
                self.paused_until = None;
                p.max(self.refilled)
            }
            None => self.refilled,
        };
        let seconds = now.saturating_duration_since(from).as_secs_f64();
        self.refilled = now;
        let factor = self.factor;
        for b in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            b.refill(seconds, factor);
        }
    }

    /// Zero when `need` may go now, else the seconds to wait (for the head of the queue).
    fn wait(&self, need: Need, now: Instant) -> f64 {
        if let Some(p) = self.paused_until
            && now < p
        {
            return (p - now).as_secs_f64().max(1e-3);
        }
        let r = self.requests.as_ref().map_or(0.0, |b| b.wait_for(need.requests, self.factor));
        let t = self.tokens.as_ref().map_or(0.0, |b| b.wait_for(need.tokens, self.factor));
        let fits = self.requests.as_ref().is_none_or(|b| b.fits(need.requests))
            && self.tokens.as_ref().is_none_or(|b| b.fits(need.tokens));
        if fits { 0.0 } else { r.max(t).max(1e-3) }
    }

    fn take(&mut self, need: Need) {
        if let Some(b) = &mut self.requests {
            b.level -= need.requests;
        }
        if let Some(b) = &mut self.tokens {
            b.level -= need.tokens;
        }
    }
}

/// One agent's limiter.
#[derive(Debug)]
pub struct Limiter {
    agent: String,
    state: Mutex<State>,
    changed: Notify,
}

/// What a call took from a limiter; [`Permit::settle`] gives back what it did not use.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    tokens: f64,
    /// How long the call waited in the queue.
    pub waited: Duration,
}

impl Permit {
    /// The call used `tokens` (prompt plus completion): the difference with its reservation
    /// goes back to the bucket (or is taken, when the call used more).
    pub fn settle(mut self, tokens: u64) {
        let reserved = std::mem::take(&mut self.tokens);
        self.limiter.give_back(reserved - tokens as f64);
    }
}

impl Drop for Permit {
    /// A call that did not settle (it failed, or was dropped): its tokens were not used.
    fn drop(&mut self) {
        if self.tokens != 0.0 {
            let t = std::mem::take(&mut self.tokens);
            self.limiter.give_back(t);
        }
    }
}

/// Removes a waiting call from the queue when it stops waiting, however it stops.
struct InQueue<'a> {
    limiter: &'a Limiter,
    key: (i64, u64),
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        let was_head = {
            let mut s = self.limiter.lock();
            let head = s.queue.keys().next() == Some(&self.key);
            s.queue.remove(&self.key);
            head
        };
        if was_head {
            self.limiter.changed.notify_waiters();
        }
    }
}

impl Limiter {
    fn new(agent: &str, limit: &RateLimit, share: f64) -> Self {
        Limiter {
            agent: agent.to_string(),
            state: Mutex::new(State::new(limit, share, Instant::now())),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn give_back(&self, tokens: f64) {
        if tokens == 0.0 {
            return;
        }
        {
            let mut s = self.lock();
            if let Some(b) = &mut s.tokens {
                b.level = (b.level + tokens).min(b.capacity);
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits for room for `need` in the fair queue (higher `priority` first, then first come),
    /// takes it and returns the permit; gives up at `deadline`.
    pub async fn acquire(
        self: &Arc<Self>,
        need: Need,
        priority: i32,
        deadline: Option<Instant>,
    ) -> Result<Permit, LimitError> {
        let start = Instant::now();
        let key = {
            let mut s = self.lock();
            let seq = s.next;
            s.next += 1;
            // Fast path: nobody waits and there is room.
            s.refill(start);
            if s.queue.is_empty() && s.wait(need, start) == 0.0 {
                s.take(need);
                return Ok(Permit { limiter: self.clone(), tokens: need.tokens, waited: Duration::ZERO });
            }
            let key = (-i64::from(priority), seq);
            s.queue.insert(key, ());
            key
        };
        let guard = InQueue { limiter: self, key };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let wait = {
                let mut s = self.lock();
                s.refill(now);
                let head = s.queue.keys().next() == Some(&key);
                if head {
                    let wait = s.wait(need, now);
                    if wait == 0.0 {
                        s.take(need);
                        s.queue.remove(&key);
                        drop(s);
                        std::mem::forget(guard);
                        // The next in line is the head now.
                        self.changed.notify_waiters();
                        return Ok(Permit { limiter: self.clone(), tokens: need.tokens, waited: now - start });
                    }
                    Some(Duration::from_secs_f64(wait))
                } else {
                    None
                }
            };
            let until = match (wait, deadline) {
                (Some(w), Some(d)) => Some((now + w).min(d)),
                (Some(w), None) => Some(now + w),
                (None, d) => d,
            };
            match until {
                Some(u) => {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep_until(u) => {}
                    }
                }
                None => notified.await,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let position = {
                    let s = self.lock();
                    s.queue.range(..key).count()
                };
                return Err(LimitError::OutOfTime {
                    agent: self.agent.clone(),
                    waited: start.elapsed().as_secs_f64(),
                    position,
                });
            }
        }
    }

    /// The provider answered 429: no call for `retry_after`, and half the rate for
    /// [`TIGHTEN_FOR`] (a tenth at the lowest).
    pub fn rate_limited(&self, retry_after: Option<Duration>) {
        {
            let now = Instant::now();
            let mut guard = self.lock();
            let s = &mut *guard;
            s.refill(now);
            s.factor = (s.factor * 0.5).max(MIN_FACTOR);
            s.tightened_until = Some(now + TIGHTEN_FOR);
            for b in [&mut s.requests, &mut s.tokens].into_iter().flatten() {
                b.level = b.level.min(0.0);
            }
            if let Some(wait) = retry_after.filter(|w| !w.is_zero()) {
                let until = now + wait;
                s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
            }
        }
        self.changed.notify_waiters();
    }

    /// Calls waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    /// The share of the configured rate in force (1 unless 429s tightened it).
    pub fn factor(&self) -> f64 {
        let mut s = self.lock();
        s.refill(Instant::now());
        s.factor
    }
}

/// The limiters of every agent that has a `spec.rateLimit`.
#[derive(Debug)]
pub struct Limits {
    agents: Mutex<HashMap<AgentKey, Arc<Limiter>>>,
    /// The part of each limit this replica takes: 1 without shards.
    share: Mutex<f64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { agents: Mutex::default(), share: Mutex::new(1.0) }
    }
}

impl Limits {
    fn share(&self) -> f64 {
        *self.share.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This replica's part of every limit (with shards: the part of the shards it holds), in
    /// (0, 1]; the limiters change at once.
    pub fn set_share(&self, share: f64) {
        let share = if share.is_finite() { share.clamp(1e-3, 1.0) } else { 1.0 };
        *self.share.lock().unwrap_or_else(|p| p.into_inner()) = share;
        let limiters: Vec<Arc<Limiter>> =
            self.agents.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for l in limiters {
            {
                let mut s = l.lock();
                let limit = s.limit.clone();
                s.configure(&limit, share);
            }
            l.changed.notify_waiters();
        }
    }

    /// The limiter of `agent` under `limit` (created on first use; a changed limit applies at
    /// once); `None` when the agent has no limit.
    pub fn for_agent(&self, agent: &AgentKey, limit: Option<&RateLimit>) -> Option<Arc<Limiter>> {
        let share = self.share();
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let Some(limit) = limit.filter(|l| l.requests_per_minute.is_some() || l.tokens_per_minute.is_some()) else {
            agents.remove(agent);
            return None;
        };
        let limiter = agents.entry(agent.clone()).or_insert_with(|| Arc::new(Limiter::new(&agent.name, limit, share)));
        limiter.lock().configure(limit, share);
        Some(limiter.clone())
    }

    /// The limiter of `agent`, if it has one.
    pub fn get(&self, agent: &AgentKey) -> Option<Arc<Limiter>> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).get(agent).cloned()
    }
}

/// A rough count of the tokens of `text` (about four characters a token, as OpenAI's
/// tokenizers average on English and code), rounded up: the prompt's share of a reservation.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4) + 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(rpm: Option<u32>, tpm: Option<u64>) -> RateLimit {
        RateLimit { requests_per_minute: rpm, tokens_per_minute: tpm }
    }

    fn one(tokens: f64) -> Need {
        Need { requests: 1.0, tokens }
    }

    impl Limiter {
        fn new_whole(agent: &str, limit: &RateLimit) -> Self {
            Limiter::new(agent, limit, 1.0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_shards_a_replica_takes_its_share_of_the_limit() {
        let limits = Limits::default();
        let key = AgentKey { namespace: "ns".into(), name: "a".into() };
        limits.set_share(1.0 / 3.0);
        let l = limits.for_agent(&key, Some(&rl(Some(600), None))).expect("limited");
        let start = Instant::now();
        for _ in 0..103 {
            l.acquire(one(0.0), 0, None).await.expect("permit").settle(0);
        }
        // A third of 600/min: 3 at once (a bucket of 3.33), then 100 more at 200/min, the first
        // of them 0.2 s later.
        let took = start.elapsed().as_secs_f64();
        assert!((took - 29.9).abs() < 0.05, "{took}");
        // All the shards: the whole limit again, on the limiter already made.
        limits.set_share(1.0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        for _ in 0..110 {
            l.acquire(one(0.0), 0, None).await.expect("permit").settle(0);
        }
        let took = start.elapsed().as_secs_f64();
        assert!((took - 10.0).abs() < 0.05, "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_go_out_at_the_limit_after_a_one_second_burst() {
        let l = Arc::new(Limiter::new_whole("a", &rl(Some(600), None)));
        let start = Instant::now();
        for _ in 0..110 {
            l.acquire(one(0.0), 0, None).await.expect("permit").settle(0);
        }
        // 10 at once (one second of 600/min), then 100 more at 10 a second.
        let took = start.elapsed().as_secs_f64();
        assert!((took - 10.0).abs() < 0.05, "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn unused_tokens_go_back_and_overuse_is_taken() {
        let l = Arc::new(Limiter::new_whole("a", &rl(None, Some(6000))));
        // Bucket: 100 tokens. A worst case of 100 takes it all...
        let p = l.acquire(one(100.0), 0, None).await.expect("permit");
        // ...but the call used 10: 90 come back, so the next 90 go at once.
        p.settle(10);
        let start = Instant::now();
        l.acquire(one(90.0), 0, None).await.expect("permit").settle(90);
        assert_eq!(start.elapsed(), Duration::ZERO);
        // A call that used more than it reserved leaves a debt that the next one waits out.
        l.acquire(one(1.0), 0, None).await.expect("permit").settle(51);
        let start = Instant::now();
        l.acquire(one(50.0), 0, None).await.expect("permit").settle(50);
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 1.0).abs() < 0.02, "{waited}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_larger_than_the_bucket_goes_when_it_is_full() {
        let l = Arc::new(Limiter::new_whole("a", &rl(None, Some(600))));
        // Bucket: 10 tokens a second, 10 at most. 35 goes at once (full bucket), leaves a debt.
        let start = Instant::now();
        l.acquire(one(35.0), 0, None).await.expect("permit").settle(35);
        assert_eq!(start.elapsed(), Duration::ZERO);
        l.acquire(one(35.0), 0, None).await.expect("permit").settle(35);
        // -25 back up to full (10): 3.5 s.
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 3.5).abs() < 0.02, "{waited}");
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_permits_give_their_tokens_back() {
        let l = Arc::new(Limiter::new_whole("a", &rl(None, Some(600))));
        drop(l.acquire(one(10.0), 0, None).await.expect("permit"));
        let start = Instant::now();
        l.acquire(one(10.0), 0, None).await.expect("permit").settle(10);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    /// Waiters are served by priority, then in arrival order.
    #[tokio::test(start_paused = true)]
    async fn the_queue_is_by_priority_then_first_come() {
        let l = Arc::new(Limiter::new_whole("a", &rl(Some(60), None)));
        l.acquire(one(0.0), 0, None).await.expect("first").settle(0);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [("low-1", 0), ("low-2", 0), ("high", 5), ("low-3", 0), ("mid", 1)] {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                l.acquire(one(0.0), priority, None).await.expect("permit").settle(0);
                order.lock().expect("lock").push(name);
            }));
            // Arrivals in this order.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(*order.lock().expect("lock"), ["high", "mid", "low-1", "low-2", "low-3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let l = Arc::new(Limiter::new_whole("a", &rl(Some(60), None)));
        l.acquire(one(0.0), 0, None).await.expect("first").settle(0);
        let deadline = Instant::now() + Duration::from_millis(300);
        let err = l.acquire(one(0.0), 9, Some(deadline)).await.expect_err("out of time");
        assert!(err.to_string().contains("spec.rateLimit"), "{err}");
        assert_eq!(l.waiting(), 0);
        // The next one is not held up by the one that left.
        let start = Instant::now();
        l.acquire(one(0.0), 0, None).await.expect("next").settle(0);
        assert!(start.elapsed() <= Duration::from_millis(701), "{:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_and_halves_the_rate_for_a_while() {
        let l = Arc::new(Limiter::new_whole("a", &rl(Some(600), None)));
        l.rate_limited(Some(Duration::from_secs(2)));
        assert_eq!(l.factor(), 0.5);
        let start = Instant::now();
        l.acquire(one(0.0), 0, None).await.expect("permit").settle(0);
        // Paused 2 s, then one request at 5 a second: 0.2 s.
        let waited = start.elapsed().as_secs_f64();
        assert!((waited - 2.2).abs() < 0.02, "{waited}");
        l.rate_limited(None);
        l.rate_limited(None);
        l.rate_limited(None);
        l.rate_limited(None);
        assert_eq!(l.factor(), MIN_FACTOR);
        tokio::time::sleep(TIGHTEN_FOR).await;
        assert_eq!(l.factor(), 1.0);
    }

    #[test]
    fn agents_without_limits_have_no_limiter() {
        let limits = Limits::default();
        let k = AgentKey::new("ns", "a");
        assert!(limits.for_agent(&k, None).is_none());
        assert!(limits.for_agent(&k, Some(&rl(None, None))).is_none());
        let a = limits.for_agent(&k, Some(&rl(Some(5), None))).expect("limiter");
        let b = limits.for_agent(&k, Some(&rl(Some(5), None))).expect("limiter");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(limits.for_agent(&k, None).is_none());
        assert!(limits.get(&k).is_none());
    }

    #[test]
    fn token_estimates_round_up() {
        assert_eq!(estimate_tokens(0), 4);
        assert_eq!(estimate_tokens(9), 7);
    }
}
