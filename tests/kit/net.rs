//! Loopback networking: free ports, a plain `GET` of an operator's HTTP port, and serving an
//! axum router on a loopback address of its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::Duration;

/// Distinct free loopback ports (bound together, then released, so they differ from each other;
/// another process may still take one before it is used).
pub fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in ports.iter_mut() {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind a loopback port: {e}"))?;
        *port = listener.local_addr().map_err(|e| format!("cannot read a bound port: {e}"))?.port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// One free loopback port; panics if none can be bound.
pub fn free_port() -> u16 {
    let [port] = free_ports().unwrap_or_else(|e| panic!("a free port: {e}"));
    port
}

/// Status code and body of `GET path` on `127.0.0.1:port` (an operator's HTTP server), or
/// `None` when nothing answers within `timeout`.
pub async fn http_get(port: u16, path: &str, timeout: Duration) -> Option<(u16, String)> {
    http_get_as(port, path, None, timeout).await
}

/// [`http_get`] with `Authorization: Bearer <token>` when `token` is given (the operator's JSON
/// API wants a token the cluster accepts).
pub async fn http_get_as(port: u16, path: &str, token: Option<&str>, timeout: Duration) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

/// Serves `router` on `127.0.0.1` and a free port, in the background of the current tokio
/// runtime; its address.
pub async fn serve(router: axum::Router) -> SocketAddr {
    serve_on(IpAddr::V4(Ipv4Addr::LOCALHOST), router).await
}

/// Serves `router` on `ip` (say [`super::openai::next_ip`], a loopback address of its own) and a
/// free port, in the background of the current tokio runtime; its address.
pub async fn serve_on(ip: impl Into<IpAddr>, router: axum::Router) -> SocketAddr {
    let ip = ip.into();
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let addr = listener.local_addr().expect("the bound address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}
