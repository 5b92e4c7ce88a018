//! The end-to-end fixture: a real control plane ([`control_plane`]) and a kubelet stand-in
//! ([`kubelet`]).
#![allow(dead_code)]

pub mod control_plane;
pub mod kubelet;
pub mod openai;

use std::{future::Future, time::Duration};

pub use control_plane::shared;

/// Polls `check` every 100 ms until it returns `Some`, and returns that; panics with `what` after
/// `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
