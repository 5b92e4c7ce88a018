//! A bounded in-memory log of events, for replay by correlation id.

use std::collections::VecDeque;
use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{Batch, Handler, VoltEvent};

pub struct EventLog {
    cap: usize,
    ring: Mutex<VecDeque<VoltEvent>>,
}

impl EventLog {
    pub fn new(cap: usize) -> Self {
        Self { cap: cap.max(1), ring: Mutex::new(VecDeque::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<VoltEvent>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events in order, optionally only one correlation id and only after event id `after`;
    /// at most `limit` (the most recent ones).
    pub fn query(&self, correlation_id: Option<&str>, after: Option<u64>, limit: usize) -> Vec<VoltEvent> {
        let ring = self.lock();
        let matching: Vec<&VoltEvent> = ring
            .iter()
            .filter(|e| correlation_id.is_none_or(|c| e.correlation_id == c))
            .filter(|e| after.is_none_or(|a| e.id > a))
            .collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }
}

impl Handler for EventLog {
    fn name(&self) -> &'static str {
        "log"
    }

    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut ring = self.lock();
            for e in &batch.events {
                if ring.len() == self.cap {
                    ring.pop_front();
                }
                ring.push_back(e.clone());
            }
        })
    }
}
