//! The HTTP server: `/healthz`, `/readyz`, `/metrics` and the JSON API, on one port.
//!
//! `/healthz`, `/readyz` and `/metrics` are open (probes and Prometheus); the JSON API answers
//! only callers with a bearer token the cluster accepts ([`crate::auth`]): `/api/v1/stats` those
//! who may `get` the non-resource URL [`STATS_PERMISSION`] (a ClusterRole's `nonResourceURLs`), `/api/v1/events` the events of
//! the namespaces where the caller may `list` the object's kind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::{Access, Attributes, AuthError, Caller};
use crate::controllers::Health;
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
}

/// The router, separate from the listener so tests can call it directly.
pub fn router(metrics: Metrics, health: Arc<Health>) -> Router {
    router_with(metrics, health, None)
}

/// [`router`], with the web view at `/ui` when `ui` is given ([`crate::ui`]).
pub fn router_with(metrics: Metrics, health: Arc<Health>, ui: Option<crate::ui::Ui>) -> Router {
    let api = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/events", get(events))
        .with_state(AppState { metrics, health });
    match ui {
        Some(ui) => api.merge(crate::ui::router(ui)),
        None => api,
    }
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

/// The non-resource URL a caller must be allowed to `get` to read `/api/v1/stats`. Not the URL
/// itself: Kubernetes' default `system:discovery` role grants every authenticated user `get` on
/// `/api/*`, which would let anyone in.
pub const STATS_PERMISSION: &str = "/volt.dev/stats";

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let code = match &self {
            AuthError::NoToken | AuthError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut response = (code, axum::Json(json!({"error": self.to_string()}))).into_response();
        if code == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The access checker, or 503 while there is none (before the client is built).
pub(crate) fn access(health: &Health) -> Result<&Arc<Access>, AuthError> {
    health.access.get().ok_or_else(|| AuthError::Unavailable("the operator has no Kubernetes client yet".into()))
}

/// The caller of a request, from its `Authorization` header.
pub(crate) async fn caller(health: &Health, headers: &HeaderMap) -> Result<Caller, AuthError> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    access(health)?.authenticate(authorization).await
}

async fn stats(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let checked = async {
        let who = caller(&s.health, &headers).await?;
        access(&s.health)?.require(&who, &Attributes::path("get", STATS_PERMISSION)).await
    };
    match checked.await {
        Ok(()) => stats_body(&s).into_response(),
        Err(e) => e.into_response(),
    }
}

fn stats_body(s: &AppState) -> axum::Json<serde_json::Value> {
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
        "shards": s.health.ownership.get().filter(|o| o.is_sharded()).map(|o| json!({
            "count": o.shards(),
            "held": o.held(),
            "identity": o.identity(),
            "members": o.members(),
        })),
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
    namespace: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// Recent events, oldest first, for replay: `?correlationId=<run uid>&namespace=<ns>&after=<id>&limit=<n>`.
/// With a correlation id, the run's stored log (kept in a ConfigMap by whichever replica emitted
/// the events, [`crate::events::store`]) merged with this process's events; without one, this
/// replica's recent events in memory. Only the events of objects whose kind the caller may
/// `list` in their namespace. A failed read of the store is a 502 with a JSON error.
async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> Response {
    let who = match caller(&s.health, &headers).await {
        Ok(who) => who,
        Err(e) => return e.into_response(),
    };
    let Ok(access) = access(&s.health) else {
        return AuthError::Unavailable("no access checker".into()).into_response();
    };
    let limit = q.limit.unwrap_or(1000).min(10_000);
    if let Some(ns) = q.namespace.as_deref().filter(|ns| !crate::naming::is_namespace(ns)) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": format!("namespace {ns:?} is not a namespace name")})),
        )
            .into_response();
    }
    let all = match (s.health.events.get(), q.correlation_id.as_deref()) {
        (None, _) => Vec::new(),
        // One correlation id: its run's stored log (whichever replica wrote it), with what this
        // process has not written yet.
        (Some(log), Some(id)) => match log.replay(id, q.namespace.as_deref()).await {
            Ok(events) => events.into_iter().filter(|e| q.after.is_none_or(|a| e.id > a)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, correlation_id = id, "reading a run's stored events failed");
                let body = json!({"error": format!("the stored events could not be read: {e}")});
                return (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response();
            }
        },
        // Everything: this replica's recent events, in memory.
        (Some(log), None) => log.query(None, q.after, usize::MAX),
    };
    let mut decided: std::collections::HashMap<(String, String), bool> = Default::default();
    let mut visible = Vec::new();
    for event in all {
        if q.namespace.as_deref().is_some_and(|ns| ns != event.namespace) {
            continue;
        }
        let key = (event.namespace.clone(), crate::naming::resource_of_object(&event.object));
        let allowed = match decided.get(&key) {
            Some(allowed) => *allowed,
            None => match access.allowed(&who, &Attributes::volt("list", &key.1, &key.0)).await {
                Ok(allowed) => *decided.entry(key).or_insert(allowed),
                Err(e) => return e.into_response(),
            },
        };
        if allowed {
            visible.push(event);
        }
    }
    let skip = visible.len().saturating_sub(limit);
    axum::Json(json!({"events": &visible[skip..]})).into_response()
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Arc<Health>,
    ui: Option<crate::ui::Ui>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, ui = ui.is_some(), "HTTP server listening");
    axum::serve(listener, router_with(metrics, health, ui))
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

    /// A health whose access checker accepts tokens `t-<user>` and grants `rights`.
    fn guarded(rights: Vec<(String, Attributes)>) -> Arc<Health> {
        let h = Arc::new(Health::default());
        let fake = crate::auth::testing::Fake { rights, down: false };
        let _ = h.access.set(Arc::new(Access::new(Arc::new(fake))));
        h
    }

    /// Status and JSON body of `GET path` on the router, with `token` as bearer if any.
    async fn get(health: Arc<Health>, path: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
        use tower::ServiceExt;
        let mut request = axum::http::Request::get(path);
        if let Some(t) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let request = request.body(axum::body::Body::empty()).expect("request");
        let response = router(Metrics::new(), health).oneshot(request).await.expect("a response");
        let code = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.expect("a body");
        (code, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn stats_report_leadership_to_callers_allowed_the_path() {
        let h = guarded(vec![("alice".into(), Attributes::path("get", STATS_PERMISSION))]);
        let _ = h.election.set(crate::leader::Candidate { lease: "ops/volt".into(), identity: "pod-a_1".into() });
        let (code, json) = get(h.clone(), "/api/v1/stats", Some("t-alice")).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            json["leadership"],
            json!({"leaderElection": true, "leader": false, "lease": "ops/volt", "identity": "pod-a_1"})
        );
        let (code, json) = get(h.clone(), "/api/v1/stats", None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(json["error"].as_str().is_some_and(|e| e.contains("no bearer token")), "{json}");
        assert_eq!(get(h.clone(), "/api/v1/stats", Some("wrong")).await.0, StatusCode::UNAUTHORIZED);
        let (code, json) = get(h.clone(), "/api/v1/stats", Some("t-bob")).await;
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert_eq!(json["error"], "\"bob\" may not get /volt.dev/stats");
        // Probes and metrics stay open; without an access checker the API is closed.
        assert_eq!(get(h.clone(), "/healthz", None).await.0, StatusCode::OK);
        let h = Arc::new(Health::default());
        assert_eq!(get(h, "/api/v1/stats", Some("t-alice")).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn events_show_only_the_namespaces_the_caller_may_list() {
        use crate::events::{Batch, EventKind, Handler, VoltEvent};
        let h = guarded(vec![
            ("alice".into(), Attributes::volt("list", "workflowruns", "a")),
            ("alice".into(), Attributes::volt("list", "agents", "b")),
        ]);
        let log = h.events.get_or_init(|| Arc::new(crate::events::EventLog::new(100))).clone();
        let event = |id, ns: &str, object: &str| VoltEvent {
            id,
            time: jiff::Timestamp::now(),
            kind: EventKind::RunStarted,
            correlation_id: format!("uid-{id}"),
            namespace: ns.into(),
            object: object.into(),
            step: None,
            attempt: 0,
            message: "secret of {ns}".into(),
        };
        let events = vec![
            event(1, "a", "WorkflowRun/r1"),
            event(2, "b", "WorkflowRun/r2"),
            event(3, "b", "Agent/coder"),
            event(4, "a", "WorkflowRun/r3"),
        ];
        log.handle(&Batch { events, reference: None }).await;
        let ids = |json: &serde_json::Value| -> Vec<u64> {
            json["events"].as_array().map(|v| v.iter().filter_map(|e| e["id"].as_u64()).collect()).unwrap_or_default()
        };
        let (code, json) = get(h.clone(), "/api/v1/events", Some("t-alice")).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(ids(&json), [1, 3, 4]);
        assert_eq!(ids(&get(h.clone(), "/api/v1/events?namespace=a&limit=1", Some("t-alice")).await.1), [4]);
        assert_eq!(
            ids(&get(h.clone(), "/api/v1/events?correlationId=uid-2", Some("t-alice")).await.1),
            Vec::<u64>::new()
        );
        assert_eq!(ids(&get(h.clone(), "/api/v1/events", Some("t-bob")).await.1), Vec::<u64>::new());
        assert_eq!(get(h, "/api/v1/events", None).await.0, StatusCode::UNAUTHORIZED);
    }

    /// A run's events come from its stored log (another process wrote them) merged with this
    /// process's, filtered as the caller may see; a store that fails is a 502 with a JSON error.
    #[tokio::test]
    async fn a_runs_events_come_from_its_stored_log() {
        use crate::events::store::testing::MemoryStore;
        use crate::events::store::{EventStore, RunRef, Stored};
        use crate::events::{Batch, EventKind, EventLog, Handler, VoltEvent};
        let h = guarded(vec![("alice".into(), Attributes::volt("list", "workflowruns", "a"))]);
        let store = Arc::new(MemoryStore::default());
        let log = h.events.get_or_init(|| Arc::new(EventLog::with(100, store.clone(), Metrics::new()))).clone();
        let event = |id| VoltEvent {
            id,
            time: jiff::Timestamp::now(),
            kind: EventKind::StepStarted,
            correlation_id: "uid-r".into(),
            namespace: "a".into(),
            object: "WorkflowRun/r".into(),
            step: Some("s".into()),
            attempt: 0,
            message: String::new(),
        };
        let run = RunRef { namespace: "a".into(), name: "r".into(), uid: "uid-r".into() };
        let mut stored = Stored::default();
        stored.append([event(10), event(20)]);
        store.save(&run, &stored, None).await.expect("save");
        log.handle(&Batch { events: vec![event(20), event(30)], reference: None }).await;
        let ids = |json: &serde_json::Value| -> Vec<u64> {
            json["events"].as_array().map(|v| v.iter().filter_map(|e| e["id"].as_u64()).collect()).unwrap_or_default()
        };
        let (code, json) = get(h.clone(), "/api/v1/events?correlationId=uid-r", Some("t-alice")).await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(ids(&json), [10, 20, 30]);
        let after = get(h.clone(), "/api/v1/events?correlationId=uid-r&after=10&limit=1", Some("t-alice")).await;
        assert_eq!(ids(&after.1), [30]);
        assert_eq!(
            ids(&get(h.clone(), "/api/v1/events?correlationId=uid-r", Some("t-bob")).await.1),
            Vec::<u64>::new()
        );
        let (code, json) = get(h.clone(), "/api/v1/events?correlationId=uid-r&namespace=a/../b", Some("t-alice")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{json}");
        store.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let (code, json) = get(h.clone(), "/api/v1/events?correlationId=uid-r", Some("t-alice")).await;
        assert_eq!(code, StatusCode::BAD_GATEWAY);
        assert!(json["error"].as_str().is_some_and(|e| e.contains("the store is down")), "{json}");
        // Without a correlation id: this replica's events in memory, as before.
        let (code, json) = get(h, "/api/v1/events", Some("t-alice")).await;
        assert_eq!((code, ids(&json)), (StatusCode::OK, vec![20, 30]));
    }
}
