//! The HTTP server: `/healthz`, `/readyz`, `/metrics` and the JSON API, on one port.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::controllers::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// The router, separate from the listener so tests can call it directly.
pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/events", get(events))
        .with_state(AppState { metrics, health })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let synced = s.health.synced.load(std::sync::atomic::Ordering::Relaxed);
    let leader = s.health.leader.load(std::sync::atomic::Ordering::Relaxed);
    if synced && leader {
        (StatusCode::OK, "ok".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: caches synced={synced}, leader={leader}"))
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

async fn stats(State(s): State<AppState>) -> impl IntoResponse {
    let m = &s.metrics;
    let phase = |p: &str| m.runs_active.with_label_values(&[p]).get();
    let snap = s.health.system.snapshot();
    let cache = s.health.cache.get().map(|c| c.counts()).unwrap_or_default();
    let lookups = cache.hits + cache.misses;
    let healthy = s.health.ready() && snap.components.values().all(|c| c.healthy);
    axum::Json(json!({
        "health": {
            "status": if healthy { "healthy" } else { "degraded" },
            "ready": s.health.ready(),
            "components": snap.components,
        },
        "agents": {"total": snap.agents_total, "ready": snap.agents_ready, "healthyReplicas": snap.replicas_healthy},
        "runs": {
            "pending": phase("Pending"),
            "queued": phase("Queued"),
            "running": phase("Running"),
            "suspended": phase("Suspended"),
            "succeeded": phase("Succeeded"),
            "failed": phase("Failed"),
            "cancelled": phase("Cancelled"),
        },
        "cache": {
            "hits": cache.hits,
            "misses": cache.misses,
            "evictions": cache.evictions,
            "entries": cache.entries,
            "bytes": cache.bytes,
            "hitRate": if lookups == 0 { 0.0 } else { cache.hits as f64 / lookups as f64 },
        },
        "throughput": {"stepsPerSecond": snap.steps_per_second, "inProcessTasks": m.inprocess_tasks.get()},
        "responseTime": {"reconcileMs": snap.reconcile_ms},
    }))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventsQuery {
    correlation_id: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// Recent events, oldest first, for replay: `?correlationId=<run uid>&after=<id>&limit=<n>`.
async fn events(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> impl IntoResponse {
    let limit = q.limit.unwrap_or(1000).min(10_000);
    let events =
        s.health.events.get().map(|log| log.query(q.correlation_id.as_deref(), q.after, limit)).unwrap_or_default();
    axum::Json(json!({"events": events}))
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "HTTP server listening");
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
