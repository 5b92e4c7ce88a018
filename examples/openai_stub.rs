//! A STUB OpenAI-compatible model server, for tests and demos: it runs no model. Agent
//! replicas on the test node (`hack/node.sh images --stub ...` builds the image
//! `localhost/volt-openai-stub:dev`) answer with it, so that workflows run end to end without a
//! GPU or an API key. Every reply starts with `[stub <name>]`, so no one takes it for a model.
//!
//! ```sh
//! openai_stub --port 8000 --name stub-a [--latency-ms 50]
//! ```
//!
//! - `POST /v1/chat/completions`: a chat completion (with token usage) whose content is
//!   `[stub <name>] <the last user message, shortened>`; when the messages ask for JSON, a JSON
//!   object `{"tasks": [...]}` instead (what planning steps parse); when they mention
//!   `VERDICT` or `APPROVED`, the reply ends with `VERDICT: approve` or `APPROVED`.
//! - `GET /v1/models`: one model, `stub`.
//! - `GET /health`: 200 while ready, 503 after `POST /admin/ready?value=false` (what a
//!   readiness probe reads: tests make a replica unready this way).
//! - `GET /admin/stats`: `{"name", "requests", "ready"}`.
//!
//! The name defaults to `$POD_NAME`, then the host name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "A stub OpenAI-compatible model server (canned replies, no model) for tests and demos")]
struct Args {
    /// Port to listen on (all addresses).
    #[arg(long, default_value_t = 8000, env = "STUB_PORT")]
    port: u16,
    /// Name in every reply (default: $POD_NAME, else the host name).
    #[arg(long, env = "STUB_NAME")]
    name: Option<String>,
    /// Delay before each answer, in milliseconds.
    #[arg(long, default_value_t = 0, env = "STUB_LATENCY_MS")]
    latency_ms: u64,
}

struct Stub {
    name: String,
    latency: Duration,
    ready: AtomicBool,
    requests: AtomicU64,
}

fn name(args: &Args) -> String {
    args.name
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "stub".to_string())
}

fn text_of(message: &Value) -> String {
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

/// The reply to a chat: canned, labelled, shaped by what the messages ask for.
fn reply(name: &str, messages: &[Value]) -> String {
    let user = messages.iter().rev().find(|m| m["role"] == "user").map(text_of).unwrap_or_default();
    let all: String = messages.iter().map(text_of).collect::<Vec<_>>().join("\n");
    if all.contains("JSON") {
        let tasks: Vec<Value> = (1..=3)
            .map(|i| json!({"id": format!("task-{i}"), "title": format!("[stub {name}] task {i}"), "priority": 4 - i}))
            .collect();
        return json!({"tasks": tasks, "note": format!("canned JSON from the stub model server {name}")}).to_string();
    }
    let short: String = user.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(160).collect();
    let mut text = format!("[stub {name}] {short}");
    if all.contains("VERDICT") {
        text.push_str("\nVERDICT: approve");
    } else if all.contains("APPROVED") {
        text.push_str("\nAPPROVED");
    }
    text
}

async fn completions(State(stub): State<Arc<Stub>>, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    stub.requests.fetch_add(1, Ordering::Relaxed);
    if !stub.latency.is_zero() {
        tokio::time::sleep(stub.latency).await;
    }
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let content = reply(&stub.name, &messages);
    let prompt_tokens = messages.iter().map(|m| text_of(m).split_whitespace().count()).sum::<usize>().max(1);
    let completion_tokens = content.split_whitespace().count().max(1);
    let model = body["model"].as_str().unwrap_or("stub").to_string();
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    (
        StatusCode::OK,
        Json(json!({
            "id": format!("chatcmpl-stub-{}", stub.requests.load(Ordering::Relaxed)),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "volt-openai-stub",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": null
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens
            }
        })),
    )
}

#[derive(serde::Deserialize)]
struct ReadyQuery {
    value: bool,
}

async fn set_ready(State(stub): State<Arc<Stub>>, Query(q): Query<ReadyQuery>) -> Json<Value> {
    stub.ready.store(q.value, Ordering::Relaxed);
    eprintln!("[stub {}] ready={}", stub.name, q.value);
    Json(json!({"ready": q.value}))
}

async fn health(State(stub): State<Arc<Stub>>) -> (StatusCode, &'static str) {
    if stub.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn stats(State(stub): State<Arc<Stub>>) -> Json<Value> {
    Json(json!({
        "name": stub.name,
        "requests": stub.requests.load(Ordering::Relaxed),
        "ready": stub.ready.load(Ordering::Relaxed),
    }))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let stub = Arc::new(Stub {
        name: name(&args),
        latency: Duration::from_millis(args.latency_ms),
        ready: AtomicBool::new(true),
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"object": "list", "data": [{"id": "stub", "object": "model"}]})) }),
        )
        .route("/health", get(health))
        .route("/admin/ready", post(set_ready))
        .route("/admin/stats", get(stats))
        .with_state(stub.clone());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = SocketAddr::from(([0, 0, 0, 0], args.port));
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("[stub {}] STUB OpenAI-compatible server (canned replies, no model) on {addr}", stub.name);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            })
            .await
    });
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("openai_stub: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_labelled_and_shaped_by_the_request() {
        let ask = |text: &str| vec![json!({"role": "user", "content": text})];
        assert_eq!(reply("a", &ask("Say   hello")), "[stub a] Say hello");
        let planned: Value = serde_json::from_str(&reply("a", &ask("List tasks as JSON for: x"))).expect("JSON");
        assert_eq!(planned["tasks"].as_array().map(Vec::len), Some(3));
        assert!(reply("a", &ask("End with VERDICT: approve")).ends_with("VERDICT: approve"));
    }
}
