//! The in-memory tier: bounded by entries and bytes, evicting by LRU, LFU or FIFO, with a
//! time to live per entry. Pure and synchronous; the manager wraps it.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Which entry a full cache evicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheStrategy {
    /// The least recently used.
    #[default]
    Lru,
    /// The least frequently used (then the least recently).
    Lfu,
    /// The oldest.
    Fifo,
}

impl std::str::FromStr for CacheStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(Self::Lru),
            "lfu" => Ok(Self::Lfu),
            "fifo" => Ok(Self::Fifo),
            _ => Err(format!("{s:?} is not a cache strategy (lru, lfu, fifo)")),
        }
    }
}

/// What a cached step result carries besides its output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub value: String,
    /// When the entry expires, in milliseconds since the Unix epoch.
    pub expires_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<(u64, u64)>,
}

impl Entry {
    /// The engine event of a cache hit for attempt `attempt` of step key `key`.
    pub fn into_hit(self, key: String, attempt: u32) -> crate::engine::Event {
        let info = crate::engine::TaskInfo {
            agent: self.agent,
            replica: self.replica,
            tokens: self.tokens.map(|(prompt, completion)| crate::api::TokenUsage { prompt, completion, cost: 0.0 }),
            cached: true,
            ..Default::default()
        };
        crate::engine::Event::Succeeded { key, attempt, output: self.value, info }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    entry: Entry,
    hits: u64,
    inserted: u64,
    used: u64,
}

/// Why an entry left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its time to live passed.
    Expired,
    /// The cache was over its entry or byte bound.
    Capacity,
}

/// Counters of a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub entries: usize,
    pub bytes: usize,
}

/// A bounded map of results.
#[derive(Debug)]
pub struct MemoryCache {
    strategy: CacheStrategy,
    max_entries: usize,
    max_bytes: usize,
    slots: HashMap<String, Slot>,
    seq: u64,
    bytes: usize,
    counts: Counts,
}

fn size_of(key: &str, e: &Entry) -> usize {
    key.len() + e.value.len() + 64
}

impl MemoryCache {
    pub fn new(strategy: CacheStrategy, max_entries: usize, max_bytes: usize) -> Self {
        Self {
            strategy,
            max_entries: max_entries.max(1),
            max_bytes: max_bytes.max(1),
            slots: HashMap::new(),
            seq: 0,
            bytes: 0,
            counts: Counts::default(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Looks a key up; an expired entry is removed and counts as a miss.
    pub fn get(&mut self, key: &str, now_ms: i64) -> (Option<Entry>, Vec<(String, Eviction)>) {
        let mut evicted = Vec::new();
        let expired = self.slots.get(key).is_some_and(|s| s.entry.expires_ms <= now_ms);
        if expired {
            self.remove(key);
            self.counts.evictions += 1;
            evicted.push((key.to_string(), Eviction::Expired));
        }
        let seq = self.tick();
        match self.slots.get_mut(key) {
            Some(slot) => {
                slot.hits += 1;
                slot.used = seq;
                self.counts.hits += 1;
                (Some(slot.entry.clone()), evicted)
            }
            None => {
                self.counts.misses += 1;
                (None, evicted)
            }
        }
    }

    /// Whether a live entry exists, without counting a hit or a miss.
    pub fn contains(&self, key: &str, now_ms: i64) -> bool {
        self.slots.get(key).is_some_and(|s| s.entry.expires_ms > now_ms)
    }

    /// Inserts (or replaces) an entry; returns what was evicted to make room. An entry larger
    /// than the whole byte bound is not kept.
    pub fn insert(&mut self, key: String, entry: Entry, now_ms: i64) -> Vec<(String, Eviction)> {
        let mut evicted = Vec::new();
        if size_of(&key, &entry) > self.max_bytes || entry.expires_ms <= now_ms {
            return evicted;
        }
        self.remove(&key);
        // Expired entries go first, then victims of the strategy.
        let expired: Vec<String> =
            self.slots.iter().filter(|(_, s)| s.entry.expires_ms <= now_ms).map(|(k, _)| k.clone()).collect();
        for k in expired {
            self.remove(&k);
            self.counts.evictions += 1;
            evicted.push((k, Eviction::Expired));
        }
        let size = size_of(&key, &entry);
        while !self.slots.is_empty() && (self.slots.len() + 1 > self.max_entries || self.bytes + size > self.max_bytes)
        {
            let Some(victim) = self.victim() else { break };
            self.remove(&victim);
            self.counts.evictions += 1;
            evicted.push((victim, Eviction::Capacity));
        }
        let seq = self.tick();
        self.bytes += size;
        self.slots.insert(key, Slot { entry, hits: 0, inserted: seq, used: seq });
        evicted
    }

    fn victim(&self) -> Option<String> {
        let pick = match self.strategy {
            CacheStrategy::Lru => self.slots.iter().min_by_key(|(_, s)| s.used),
            CacheStrategy::Lfu => self.slots.iter().min_by_key(|(_, s)| (s.hits, s.used)),
            CacheStrategy::Fifo => self.slots.iter().min_by_key(|(_, s)| s.inserted),
        };
        pick.map(|(k, _)| k.clone())
    }

    /// Removes a key; true when it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        match self.slots.remove(key) {
            Some(slot) => {
                self.bytes -= size_of(key, &slot.entry);
                true
            }
            None => false,
        }
    }

    pub fn counts(&self) -> Counts {
        Counts { entries: self.slots.len(), bytes: self.bytes, ..self.counts }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(v: &str, expires_ms: i64) -> Entry {
        Entry { value: v.into(), expires_ms, ..Default::default() }
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut c = MemoryCache::new(CacheStrategy::Lru, 2, 1 << 20);
        c.insert("a".into(), e("1", 100), 0);
        c.insert("b".into(), e("2", 100), 0);
        assert!(c.get("a", 1).0.is_some());
        let ev = c.insert("c".into(), e("3", 100), 2);
        assert_eq!(ev, vec![("b".to_string(), Eviction::Capacity)]);
        assert!(c.contains("a", 3) && c.contains("c", 3) && !c.contains("b", 3));
    }

    #[test]
    fn lfu_evicts_the_least_frequently_used() {
        let mut c = MemoryCache::new(CacheStrategy::Lfu, 2, 1 << 20);
        c.insert("a".into(), e("1", 100), 0);
        c.insert("b".into(), e("2", 100), 0);
        for _ in 0..3 {
            c.get("a", 1);
        }
        c.get("b", 1);
        c.get("b", 1);
        c.get("a", 1);
        let ev = c.insert("c".into(), e("3", 100), 2);
        assert_eq!(ev[0].0, "b", "b has fewer hits even though used more recently");
    }

    #[test]
    fn fifo_evicts_the_oldest_insert() {
        let mut c = MemoryCache::new(CacheStrategy::Fifo, 2, 1 << 20);
        c.insert("a".into(), e("1", 100), 0);
        c.insert("b".into(), e("2", 100), 0);
        c.get("a", 1);
        let ev = c.insert("c".into(), e("3", 100), 2);
        assert_eq!(ev[0].0, "a");
    }

    #[test]
    fn ttl_and_bytes_bound() {
        let mut c = MemoryCache::new(CacheStrategy::Lru, 100, 200);
        c.insert("a".into(), e("x", 10), 0);
        assert!(c.get("a", 5).0.is_some());
        let (hit, ev) = c.get("a", 10);
        assert!(hit.is_none());
        assert_eq!(ev, vec![("a".to_string(), Eviction::Expired)]);
        // 200 bytes hold one 100-byte value (plus overhead), not two.
        c.insert("b".into(), e(&"y".repeat(100), 100), 0);
        c.insert("c".into(), e(&"z".repeat(100), 100), 0);
        assert!(!c.contains("b", 1) && c.contains("c", 1));
        assert!(c.counts().bytes <= 200);
        // Too large for the bound: not kept.
        c.insert("d".into(), e(&"w".repeat(500), 100), 0);
        assert!(!c.contains("d", 1));
        let counts = c.counts();
        assert_eq!((counts.hits, counts.misses), (1, 1));
    }
}
