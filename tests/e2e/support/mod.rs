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

/// Status code and body of `GET path` on `127.0.0.1:port` (an operator's HTTP server), or
/// `None` when nothing answers within `timeout`.
pub async fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}
