//! The web view (`/ui`) end to end on the test control plane, through its HTTP API: the page
//! and its assets, the run list and a run page per caller (real TokenReview and
//! SubjectAccessReview), the live stream following a run, an approval decided through it and
//! recorded with the caller's name, and a caller without rights refused. The same flows in a
//! real browser: `web_view_browser.rs`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use volt_operator::api::{RunPhase, StepPhase};

use crate::kit::{self, Env, account_with_rules, run_obj};

/// `GET` or `POST` on the web view with `token` as bearer: status and JSON body.
pub async fn call(base: &str, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = match method {
        "POST" => client.post(format!("{base}{path}")),
        _ => client.get(format!("{base}{path}")),
    };
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}

/// A workflow with a fan-out, an approval and a step after it.
pub fn gated_workflow() -> Value {
    json!({"steps": [
        {"id": "plan", "template": "three items"},
        {"id": "fan", "dependsOn": ["plan"], "forEach": "[1, 2, 3]", "template": "item {{ item }}"},
        {"id": "gate", "dependsOn": ["fan"], "approval": {"message": "ship it?"}},
        {"id": "ship", "dependsOn": ["gate"], "template": "shipped"}
    ]})
}

/// Rules of a user who may read runs, and one who may also decide approvals.
pub fn reader_rules() -> Value {
    json!([{"apiGroups": ["volt.dev"], "resources": ["workflowruns"], "verbs": ["get", "list", "watch"]}])
}
pub fn approver_rules() -> Value {
    json!([{"apiGroups": ["volt.dev"], "resources": ["workflowruns"], "verbs": ["get", "list", "watch", "patch"]}])
}

/// Tokens of three users of `env`'s namespace: one who may read runs, one who may also decide
/// approvals, one with no rights.
pub struct Callers {
    pub reader: String,
    pub approver: String,
    pub nobody: String,
}

pub async fn callers(env: &Env) -> Callers {
    Callers {
        reader: account_with_rules(&env.client, &env.ns, "reader", reader_rules()).await,
        approver: account_with_rules(&env.client, &env.ns, "approver", approver_rules()).await,
        nobody: account_with_rules(&env.client, &env.ns, "nobody", json!([])).await,
    }
}

/// The operator's controllers and its HTTP server with the web view on, for `env`'s namespace.
pub struct WithUi {
    pub op: kit::Operator,
    /// The server's base URL.
    pub base: String,
    pub stop: tokio_util::sync::CancellationToken,
    /// API requests of the web view's own client (its watch, outputs, logs, decisions), by verb.
    pub ui_metrics: volt_operator::metrics::Metrics,
}

pub async fn operator_with_ui(env: &Env) -> WithUi {
    let op = kit::Operator::start(&env.ns).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let ui_metrics = volt_operator::metrics::Metrics::new();
    let config = kit::kube_config(kit::control_plane::shared().kubeconfig_path()).await;
    let client = volt_operator::kube_util::client_with_metrics(
        config,
        &ui_metrics,
        volt_operator::config::RunArgs::defaults().api_bound(),
    )
    .await
    .expect("the web view's client");
    let ui = volt_operator::ui::Ui {
        health: op.health.clone(),
        runs: volt_operator::ui::RunStore::start(&client, &[Some(env.ns.clone())], stop.clone()),
        client,
    };
    let router = volt_operator::http::router_with(op.metrics.clone(), op.health.clone(), Some(ui));
    let base = format!("http://{}", kit::serve(router).await);
    WithUi { op, base, stop, ui_metrics }
}

impl WithUi {
    /// Requests of the web view's client with `verb`.
    pub fn requests(&self, verb: &str) -> u64 {
        self.ui_metrics.api_requests.with_label_values(&[verb]).get()
    }
}

/// Reads server-sent events from `response` until `until` accepts one (name, data); panics
/// after `timeout`.
async fn next_event(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    timeout: Duration,
    mut until: impl FnMut(&str, &Value) -> bool,
) -> (String, Value) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        while let Some(i) = buf.find("\n\n") {
            let chunk: String = buf.drain(..i + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in chunk.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if data.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&data).expect("event data is JSON");
            if until(&name, &value) {
                return (name, value);
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(bytes))) => buf.push_str(&String::from_utf8_lossy(&bytes)),
            Ok(other) => panic!("the stream ended: {other:?}"),
            Err(_) => panic!("no matching event within {timeout:?}"),
        }
    }
}

#[tokio::test]
async fn the_web_view_lists_draws_streams_and_decides_per_caller() {
    let env = Env::new("ui").await;
    let with_ui = operator_with_ui(&env).await;
    let base = with_ui.base.clone();
    let Callers { reader, approver, nobody } = callers(&env).await;
    env.apply(run_obj("gated", gated_workflow())).await;

    // The page and its assets are open and hold no data; the API is not.
    let html = reqwest::get(format!("{base}/ui")).await.expect("/ui").text().await.expect("html");
    assert!(html.contains("/ui/assets/") && html.contains("app.js"), "{html}");
    let asset = html.split("/ui/assets/").nth(1).and_then(|s| s.split('"').next()).expect("an asset path");
    let js = reqwest::get(format!("{base}/ui/assets/{asset}")).await.expect("asset");
    assert_eq!(js.status().as_u16(), 200);
    assert!(js.headers()["cache-control"].to_str().unwrap_or_default().contains("immutable"));
    assert_eq!(call(&base, "GET", "/ui/api/runs", None, None).await.0, 401);
    assert_eq!(call(&base, "GET", "/ui/api/runs", Some("bogus"), None).await.0, 401);

    // The run list: the reader sees the run; the account without rights sees nothing, and is
    // refused the namespace by name.
    let listed = kit::wait_until("the run in the list", Duration::from_secs(30), || async {
        let (code, body) = call(&base, "GET", &format!("/ui/api/runs?namespace={}", env.ns), Some(&reader), None).await;
        assert_eq!(code, 200, "{body}");
        body["runs"].as_array().and_then(|r| r.iter().find(|r| r["name"] == "gated").cloned())
    })
    .await;
    assert_eq!(listed["namespace"], env.ns.as_str());
    let (code, body) = call(&base, "GET", "/ui/api/runs", Some(&nobody), None).await;
    assert_eq!((code, body["runs"].as_array().map(Vec::len)), (200, Some(0)), "{body}");
    let (code, body) = call(&base, "GET", &format!("/ui/api/runs?namespace={}", env.ns), Some(&nobody), None).await;
    assert_eq!(code, 403, "{body}");
    let run_path = format!("/ui/api/runs/{}/gated", env.ns);
    let (code, body) = call(&base, "GET", &run_path, Some(&nobody), None).await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("may not get workflowruns.volt.dev \"gated\"")),
        "{body}"
    );
    assert_eq!(call(&base, "GET", &format!("{run_path}/stream"), Some(&nobody), None).await.0, 403);

    // The run page: the nodes of the picture, the fan-out as one node.
    let (code, page) = call(&base, "GET", &run_path, Some(&reader), None).await;
    assert_eq!(code, 200, "{page}");
    let keys: Vec<&str> = page["nodes"].as_array().expect("nodes").iter().filter_map(|n| n["key"].as_str()).collect();
    assert_eq!(keys, ["plan", "fan", "gate", "ship"]);
    assert_eq!(page["nodes"][1]["fanOut"], true);

    // The live stream: the first event is the page; the gate comes to wait.
    let response = reqwest::Client::new()
        .get(format!("{base}{run_path}/stream"))
        .bearer_auth(&reader)
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"));
    let mut stream = Box::pin(response.bytes_stream());
    let mut buf = String::new();
    let (name, first) = next_event(&mut stream, &mut buf, Duration::from_secs(10), |_, _| true).await;
    assert_eq!(name, "page", "{first}");
    if first["states"]["gate"]["phase"] != "Waiting" {
        let waiting = |_: &str, v: &Value| v["states"]["gate"]["phase"] == "Waiting";
        let (name, _) = next_event(&mut stream, &mut buf, Duration::from_secs(30), waiting).await;
        assert_eq!(name, "states");
    }
    let (_, page) = call(&base, "GET", &run_path, Some(&reader), None).await;
    assert_eq!(page["states"]["fan"]["items"], json!([3, 3]), "{page}");
    assert_eq!(page["steps"]["gate"]["waiting"], true, "{page}");

    // A step's panel: the fan-out item's output.
    let (code, item) = call(&base, "GET", &format!("{run_path}/steps/fan%5B1%5D"), Some(&reader), None).await;
    assert_eq!((code, item["output"].as_str()), (200, Some("item 2")), "{item}");

    // Deciding: the reader may not patch the run; the approver may, and is recorded.
    let decide = json!({"step": "gate", "decision": "Approve", "comment": "looks good"});
    let (code, body) = call(&base, "POST", &format!("{run_path}/decisions"), Some(&reader), Some(decide.clone())).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = call(&base, "POST", &format!("{run_path}/decisions"), Some(&approver), Some(decide)).await;
    assert_eq!(code, 200, "{body}");
    let approver_name = format!("system:serviceaccount:{}:approver", env.ns);
    assert_eq!(body["by"], approver_name.as_str());
    let (_, ev) =
        next_event(&mut stream, &mut buf, Duration::from_secs(30), |_, v| v["run"]["phase"] == "Succeeded").await;
    assert!(ev["states"].is_object(), "{ev}");
    let status = env.finished("gated", Duration::from_secs(30)).await;
    assert_eq!(status.phase, RunPhase::Succeeded);
    assert_eq!(kit::step(&status, "ship").phase, StepPhase::Succeeded);
    let run = env.runs.get("gated").await.expect("the run");
    let decision = &run.spec.decisions["gate"];
    assert_eq!(decision.by.as_deref(), Some(approver_name.as_str()));
    assert_eq!(decision.comment.as_deref(), Some("looks good"));
    // Deciding again: nothing waits.
    let again = json!({"step": "gate", "decision": "Reject"});
    assert_eq!(call(&base, "POST", &format!("{run_path}/decisions"), Some(&approver), Some(again)).await.0, 409);
    // The web view's own API requests: its one watch (a list, then watches), one ConfigMap-free
    // step read (inline output: none), and the decision's patch; nothing per page or event.
    assert_eq!(with_ui.requests("get"), 0, "the pages and the stream come from the shared watch");
    assert_eq!(with_ui.requests("patch"), 1, "the decision");
    with_ui.stop.cancel();
    with_ui.op.stop().await;
}

/// `volt-operator run --ui` (the binary, as the chart runs it with `ui.enabled`) serves the
/// page and the runs of its namespaces from its own watch; without the flag there is no `/ui`.
#[tokio::test]
async fn the_binary_serves_the_web_view_only_with_ui() {
    let env = Env::new("ui-binary").await;
    let dir = kit::LogDir::new("ui-binary");
    let kubeconfig = kit::control_plane::shared().kubeconfig_path();
    let admin = kit::control_plane::shared().admin_token().expect("the admin token");
    env.apply(run_obj("hello", json!({"steps": [{"id": "greet", "template": "hi"}]}))).await;
    let mut on = kit::OperatorProcess::builder(kubeconfig, dir.join("on.log"))
        .namespaces(&[&env.ns])
        .args(["--ui", "--health-check-interval", "1"])
        .start(Duration::from_secs(60))
        .await;
    let (code, html) = on.get("/ui").await.expect("/ui answers");
    assert_eq!(code, 200);
    assert!(html.contains("app.js"), "{html}");
    let row = kit::wait_until("the run in the binary's list", Duration::from_secs(60), || async {
        let (code, body) = on.get_as(&format!("/ui/api/runs?namespace={}", env.ns), admin).await?;
        let body: Value = serde_json::from_str(&body).ok()?;
        (code == 200).then_some(())?;
        body["runs"].as_array()?.iter().find(|r| r["name"] == "hello" && r["phase"] == "Succeeded").cloned()
    })
    .await;
    assert_eq!(row["progress"], "1/1", "{row}");
    assert_eq!(on.get("/ui/api/runs").await.map(|(c, _)| c), Some(401));
    on.stop(Duration::from_secs(20)).await;
    on.assert_no_panic();

    let mut off = kit::OperatorProcess::builder(kubeconfig, dir.join("off.log"))
        .namespaces(&[&env.ns])
        .start(Duration::from_secs(60))
        .await;
    assert_eq!(off.get("/ui").await.map(|(c, _)| c), Some(404), "off by default");
    assert_eq!(off.get("/ui/api/runs").await.map(|(c, _)| c), Some(404));
    off.stop(Duration::from_secs(20)).await;
}
