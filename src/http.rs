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
    axum::Json(json!({
        "ready": s.health.ready(),
        "runs": {
            "running": phase("Running"),
            "queued": phase("Queued"),
            "succeeded": phase("Succeeded"),
            "failed": phase("Failed"),
        },
        "inProcessTasks": m.inprocess_tasks.get(),
    }))
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
