//! The HTTP server: `/healthz`, `/readyz`, `/metrics` and the JSON API, on one port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

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

/// Ready whether or not this replica leads (followers must be Ready, or a Deployment of two
/// replicas never finishes a rollout): the leader once its informers have synced, a follower
/// (which runs none) while the API server answers it. The body says which.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let h = &s.health;
    let leader = h.leader.load(Ordering::Relaxed);
    let body = if leader {
        format!("leader, caches synced={}", h.synced.load(Ordering::Relaxed))
    } else {
        format!("follower, API server answers={}", h.api_reachable.load(Ordering::Relaxed))
    };
    if h.ready() {
        (StatusCode::OK, format!("ok: {body}"))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {body}"))
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
        "leadership": {
            "leaderElection": s.health.election.get().is_some(),
            "leader": s.health.leader.load(Ordering::Relaxed),
            "lease": s.health.election.get().map(|c| c.lease.as_str()),
            "identity": s.health.election.get().map(|c| c.identity.as_str()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;

    async fn ready(health: Arc<Health>) -> (StatusCode, String) {
        let state = AppState { metrics: Metrics::new(), health };
        let response = readyz(State(state)).await.into_response();
        let code = response.status();
        let body = to_bytes(response.into_body(), 4096).await.expect("a body");
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    /// SPEC, "Readiness (changed)": a follower is Ready while the API server answers; the
    /// leader once its informers have synced.
    #[tokio::test]
    async fn followers_are_ready_while_the_api_answers() {
        let h = Arc::new(Health::default());
        assert_eq!(
            ready(h.clone()).await,
            (StatusCode::SERVICE_UNAVAILABLE, "not ready: follower, API server answers=false".into())
        );
        h.api_reachable.store(true, Ordering::Relaxed);
        assert_eq!(ready(h.clone()).await, (StatusCode::OK, "ok: follower, API server answers=true".into()));
        h.leader.store(true, Ordering::Relaxed);
        assert_eq!(ready(h.clone()).await.0, StatusCode::SERVICE_UNAVAILABLE, "a leader waits for its informers");
        h.synced.store(true, Ordering::Relaxed);
        assert_eq!(ready(h.clone()).await, (StatusCode::OK, "ok: leader, caches synced=true".into()));
    }

    #[tokio::test]
    async fn stats_report_leadership() {
        let h = Arc::new(Health::default());
        let _ = h.election.set(crate::leader::Candidate { lease: "ops/volt".into(), identity: "pod-a_1".into() });
        let state = AppState { metrics: Metrics::new(), health: h };
        let response = stats(State(state)).await.into_response();
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("a body");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            json["leadership"],
            json!({"leaderElection": true, "leader": false, "lease": "ops/volt", "identity": "pod-a_1"})
        );
    }
}
