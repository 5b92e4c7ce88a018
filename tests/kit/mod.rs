//! The test kit, shared by `tests/e2e`, `tests/chaos.rs` and the examples (each includes it with
//! `#[path = ".../tests/kit/mod.rs"] mod kit;`): a real control plane ([`control_plane`]), a
//! kubelet stand-in ([`kubelet`]), OpenAI-compatible stub servers ([`openai`]) and the operator
//! in-process ([`in_process`]).
#![allow(dead_code, unused_imports)]

pub mod control_plane;
pub mod in_process;
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

/// Server-side applies a volt object (Agent, Workflow or WorkflowRun, by its `kind`) in `ns` as
/// field manager `manager`; panics naming the object if the API server refuses it.
pub async fn apply_as(client: &kube::Client, ns: &str, obj: serde_json::Value, manager: &str) {
    use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let ar = match kind.as_str() {
        "WorkflowRun" => ApiResource::erase::<volt_operator::api::WorkflowRun>(&()),
        "Workflow" => ApiResource::erase::<volt_operator::api::Workflow>(&()),
        "Agent" => ApiResource::erase::<volt_operator::api::Agent>(&()),
        other => panic!("unexpected kind {other}"),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(&name, &PatchParams::apply(manager).force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|err| panic!("apply {kind}/{name}: {err}"));
}

/// The sum of the samples of `metric` in a Prometheus text exposition.
pub fn metric_sum(exposition: &str, metric: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
