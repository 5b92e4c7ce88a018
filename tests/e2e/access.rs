//! Who may read the operator's JSON API, end to end on the test control plane: the caller's
//! bearer token checked with a real TokenReview, each read with a real SubjectAccessReview.
//! Probes and metrics stay open.

use std::time::Duration;

use serde_json::{Value, json};

use crate::kit::{self, Env, Operator, account_with_rules, control_plane, run_obj};

/// `GET api+path` with `token` as bearer (if any): status and JSON body.
async fn get(api: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("{api}{path}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

fn objects(body: &Value) -> Vec<String> {
    let events = body["events"].as_array().cloned().unwrap_or_default();
    let mut objects: Vec<String> = events
        .iter()
        .map(|e| format!("{}/{}", e["namespace"].as_str().unwrap_or("?"), e["object"].as_str().unwrap_or("?")))
        .collect();
    objects.dedup();
    objects
}

#[tokio::test]
async fn the_json_api_shows_each_caller_what_kubectl_would() {
    let a = Env::new("access-a").await;
    let b = Env::new("access-b").await;
    // One operator watching both namespaces (its caches see both; the API must not leak).
    let op = Operator::start_with(&a.ns, |args| args.namespaces = vec![a.ns.clone(), b.ns.clone()]).await;
    for env in [&a, &b] {
        env.apply(run_obj("r", json!({"steps": [{"id": "s", "template": "secret of {{ run.namespace }}"}]}))).await;
    }
    for env in [&a, &b] {
        env.finished("r", Duration::from_secs(60)).await;
    }
    let api =
        format!("http://{}", kit::serve(volt_operator::http::router(op.metrics.clone(), op.health.clone())).await);

    let list_runs =
        json!([{"apiGroups": ["volt.dev"], "resources": ["workflowruns"], "verbs": ["get", "list", "watch"]}]);
    let viewer = account_with_rules(&a.client, &a.ns, "viewer", list_runs).await;
    let nobody = account_with_rules(&a.client, &a.ns, "nobody", json!([])).await;
    let admin = control_plane::shared().admin_token().expect("the admin token");

    // No token, a token the cluster refuses: 401 and nothing else.
    for path in ["/api/v1/events", "/api/v1/stats"] {
        let (code, body) = get(&api, path, None).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body["events"].is_null() && body["health"].is_null(), "{body}");
        let (code, body) = get(&api, path, Some("not-a-token")).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("does not accept this token")), "{body}");
    }

    // Events: the viewer sees namespace A's run only, the account without rights nothing, the
    // admin both. Wait for the event log to hold both runs' ends.
    let both = kit::wait_until("both runs' events", Duration::from_secs(20), || async {
        let (_, body) = get(&api, "/api/v1/events", Some(admin)).await;
        let objects = objects(&body);
        (objects.contains(&format!("{}/WorkflowRun/r", a.ns)) && objects.contains(&format!("{}/WorkflowRun/r", b.ns)))
            .then_some(objects)
    })
    .await;
    assert!(both.len() >= 2, "{both:?}");
    let (code, body) = get(&api, "/api/v1/events", Some(&viewer)).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(objects(&body), [format!("{}/WorkflowRun/r", a.ns)], "the viewer sees A only: {body:#}");
    let (code, body) = get(&api, &format!("/api/v1/events?namespace={}", b.ns), Some(&viewer)).await;
    assert_eq!((code, objects(&body)), (200, vec![]), "{body:#}");
    let (code, body) = get(&api, "/api/v1/events", Some(&nobody)).await;
    assert_eq!((code, objects(&body)), (200, vec![]), "{body:#}");

    // Stats: a cluster-wide summary, for callers allowed the path (the admin), not the others.
    let (code, body) = get(&api, "/api/v1/stats", Some(&viewer)).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("may not get /volt.dev/stats") && e.contains(":viewer")),
        "{body}"
    );
    let (code, body) = get(&api, "/api/v1/stats", Some(admin)).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["health"]["status"].is_string(), "{body}");

    // Open: probes and metrics.
    for path in ["/healthz", "/metrics"] {
        let code = reqwest::get(format!("{api}{path}")).await.expect(path).status().as_u16();
        assert_eq!(code, 200, "{path}");
    }

    // Repeated calls reuse the reviews (no API request per call).
    let access = op.health.access.get().expect("the access checker");
    let before = access.reviews_sent();
    for _ in 0..20 {
        assert_eq!(get(&api, "/api/v1/events", Some(&viewer)).await.0, 200);
    }
    assert_eq!(access.reviews_sent(), before, "cached reviews");
    op.stop().await;
}

/// HTTP steps may not call the operator's own port through loopback (its JSON API, from inside
/// the operator), by address or by name; other loopback ports stay reachable; the flag
/// `--http-step-allow-own-port` lifts the block.
#[tokio::test]
async fn http_steps_do_not_reach_the_operators_own_port() {
    let env = Env::new("access-own-port").await;
    let port = kit::free_port();
    let op = Operator::start_with(&env.ns, |args| args.http_addr = ([127, 0, 0, 1], port).into()).await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the operator's port");
    let router = volt_operator::http::router(op.metrics.clone(), op.health.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let other = kit::serve(axum::Router::new().route("/ok", axum::routing::get(|| async { "fine" }))).await;

    let step = |id: &str, url: String| json!({"id": id, "http": {"url": url}, "continueOnError": true});
    env.apply(run_obj(
        "peek",
        json!({"steps": [
            step("events", format!("http://127.0.0.1:{port}/api/v1/events")),
            step("by-name", format!("http://localhost:{port}/api/v1/stats")),
            step("mapped", format!("http://[::ffff:127.0.0.1]:{port}/healthz")),
            step("other-port", format!("http://{other}/ok")),
        ]}),
    ))
    .await;
    let s = env.finished("peek", Duration::from_secs(60)).await;
    for id in ["events", "by-name", "mapped"] {
        let row = kit::step(&s, id);
        assert_eq!(row.phase, volt_operator::api::StepPhase::Failed, "{id}: {row:#?}");
        assert!(
            row.message.contains(&format!("on port {port}, the operator's own HTTP port through loopback")),
            "{id}: {}",
            row.message
        );
        assert_eq!(row.attempts, 1, "{id}: denied for good, not retried");
    }
    let ok = kit::step(&s, "other-port");
    assert_eq!(ok.output.as_deref(), Some("fine"), "{ok:#?}");
    op.stop().await;

    // `--http-step-allow-own-port` lifts the block.
    let op = Operator::start_with(&env.ns, |args| {
        args.http_addr = ([127, 0, 0, 1], port).into();
        args.http_step.allow_own_port = true;
    })
    .await;
    env.apply(run_obj("allowed", json!({"steps": [step("health", format!("http://127.0.0.1:{port}/healthz"))]}))).await;
    let s = env.finished("allowed", Duration::from_secs(60)).await;
    let row = kit::step(&s, "health");
    assert_eq!(row.phase, volt_operator::api::StepPhase::Succeeded, "{row:#?}");
    op.stop().await;
}
