//! Locking a `std::sync::Mutex` that may be poisoned: the guard either way. The data behind the
//! operator's mutexes (maps, counters, timestamps) stays consistent when a holder panics, and
//! one panicking task must not take every later caller down with it.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the guard of a poisoned mutex too.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
