//! Security end to end: HTTP steps reach only the addresses the operator's policy allows
//! (server-side request forgery), and API keys never leave the request they authorise: not in
//! the operator's logs (at trace level), the runs' status, Events or the event log; runs use
//! only the Agents and Secrets of their own namespace.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volt_operator::api::{Agent, RunPhase, StepPhase, WorkflowRun, WorkflowRunStatus};
use volt_operator::config::CidrList;

use crate::kit::openai::{Reply, Stub, next_ip};
use crate::kit::{self, LogDir, Operator, OperatorProcess, apply, control_plane, run_obj, step, wait_for};

const LONG: Duration = Duration::from_secs(90);

async fn finished(runs: &Api<WorkflowRun>, name: &str) -> WorkflowRunStatus {
    kit::run_finished(runs, name, LONG).await
}

// ---------------------------------------------------------------------------------------------
// HTTP steps and the address policy

/// A plain HTTP server on a loopback address of its own: `/ok` answers `fine`, `/redirect`
/// redirects to the `Location` given at start; it counts the connections it accepts.
struct Target {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Target {
    async fn start(redirect_to: Option<String>) -> Target {
        let listener = tokio::net::TcpListener::bind((next_ip(), 0)).await.expect("bind a loopback address");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicUsize::new(0));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), paths.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (seen, redirect_to) = (seen.clone(), redirect_to.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                    seen.lock().expect("paths").push(path.clone());
                    let response = match (path.as_str(), redirect_to) {
                        ("/redirect", Some(to)) => {
                            format!(
                                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            )
                        }
                        _ => "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nfine".to_string(),
                    };
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Target { addr, connections, paths }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn http_steps_reach_only_what_the_operator_allows() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, "sec-ssrf").await;
    let forbidden = Target::start(None).await;
    let allowed = Target::start(Some(forbidden.url("/secret"))).await;
    // The test denies the forbidden target's address (and ::1, so that `localhost` has no
    // allowed address: 127.0.0.1 is the cluster API's here). The cluster API comes from the
    // client configuration, as `volt-operator run` gives it.
    let deny = format!("169.254.0.0/16,fe80::/10,::1/128,{}", forbidden.addr.ip());
    let cluster_url: http::Uri = cp.server_url().parse().expect("the API server's URL");
    let _op = Operator::start_with(&ns, |a| {
        a.http_step.deny = CidrList::parse(&deny).expect("deny list");
        a.cluster_url = Some(cluster_url);
    })
    .await;

    let retry = json!({"limit": 2, "backoff": {"initialSeconds": 1}});
    let denied_step = |id: &str, url: String| json!({"id": id, "http": {"url": url}, "retry": retry.clone(), "continueOnError": true});
    let api = format!("{}/api/v1/namespaces/{ns}/secrets", cp.server_url());
    let steps = [
        (
            "forbidden",
            forbidden.url("/secret"),
            format!("{}, which is in {}/32", forbidden.addr.ip(), forbidden.addr.ip()),
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/".into(),
            "169.254.169.254, which is in 169.254.0.0/16".into(),
        ),
        ("mapped", "http://[::ffff:169.254.169.254]/latest/meta-data/".into(), "169.254.169.254, which is in".into()),
        ("cluster-api", api, "an address of the cluster API".into()),
        ("redirect", allowed.url("/redirect"), format!("the response redirected to {}", forbidden.url("/secret"))),
        ("by-name", format!("http://localhost:{}/secret", forbidden.addr.port()), "localhost resolves to".into()),
    ];
    let mut wf_steps = vec![json!({"id": "ok", "http": {"url": allowed.url("/ok")}})];
    wf_steps.extend(steps.iter().map(|(id, url, _)| denied_step(id, url.clone())));
    apply(&client, &ns, run_obj("ssrf", json!({"steps": wf_steps}))).await;
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let s = finished(&runs, "ssrf").await;

    let ok = step(&s, "ok");
    assert_eq!((ok.phase, ok.output.as_deref()), (StepPhase::Succeeded, Some("fine")), "{ok:#?}");
    for (id, url, detail) in &steps {
        let row = step(&s, id);
        assert_eq!(row.phase, StepPhase::Failed, "{id}: {row:#?}");
        assert_eq!(row.attempts, 1, "{id}: a denied request is not retried: {row:#?}");
        let prefix = format!("http step url {url} is denied by the operator's HTTP step policy: ");
        assert!(row.message.starts_with(&prefix), "{id}: {}", row.message);
        assert!(row.message.contains(detail.as_str()), "{id}: {:?} not in {}", detail, row.message);
        assert!(row.message.contains("--http-step-"), "{id} names the flag: {}", row.message);
    }
    assert_eq!(forbidden.connections(), 0, "the denied target was never connected to");
    let paths = allowed.paths.lock().expect("paths").clone();
    assert_eq!(paths.iter().filter(|p| *p == "/ok").count(), 1, "{paths:?}");
    assert_eq!(paths.iter().filter(|p| *p == "/redirect").count(), 1, "{paths:?}");
    assert_eq!(s.phase, RunPhase::Succeeded, "failures of continueOnError steps do not fail the run: {s:#?}");
}

#[test]
fn a_bad_range_stops_the_operator_at_startup_naming_the_flag() {
    for (flag, env) in [("--http-step-allow", "VOLT_HTTP_STEP_ALLOW"), ("--http-step-deny", "VOLT_HTTP_STEP_DENY")] {
        let by_flag = std::process::Command::new(kit::operator_bin())
            .args(["run", flag, "10.0.0.0/8,10.0.0.0/99"])
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .expect("run volt-operator");
        let by_env = std::process::Command::new(kit::operator_bin())
            .args(["run"])
            .env(env, "metadata.internal")
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .expect("run volt-operator");
        for (out, bad) in [(by_flag, "10.0.0.0/99"), (by_env, "metadata.internal")] {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains(flag), "{stderr}");
            assert!(stderr.contains(&format!("\"{bad}\" is not a CIDR")), "{stderr}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// API keys

/// The operator as a process watching `namespaces` at `log_level`, its stdout and stderr in
/// `<dir>/operator.log`, as the admin; once ready.
async fn operator_process(namespaces: &[&str], log_level: &str, dir: &LogDir) -> OperatorProcess {
    OperatorProcess::builder(control_plane::shared().kubeconfig_path(), dir.join("operator.log"))
        .namespaces(namespaces)
        .args(["--health-check-interval", "1", "--log-format", "text", "--log-level", log_level])
        .env_remove("RUST_LOG")
        .http_timeout(Duration::from_secs(5))
        .start(LONG)
        .await
}

/// An OpenAI-compatible endpoint that refuses every key and echoes the key it was given in its
/// error message, as some servers and proxies do: `/<mode>/v1/chat/completions` with mode
/// `echo` (a short message) or `clip` (the key far into a long message, where the operator cuts
/// messages short).
#[derive(Clone, Default)]
struct Echo {
    authorizations: Arc<Mutex<Vec<String>>>,
}

async fn echo_chat(State(echo): State<Echo>, UrlPath(mode): UrlPath<String>, headers: HeaderMap) -> impl IntoResponse {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    echo.authorizations.lock().expect("authorizations").push(auth.clone());
    let key = auth.trim_start_matches("Bearer ");
    let message = match mode.as_str() {
        "clip" => format!("{} {key} is not a valid key for this deployment", "x".repeat(268)),
        _ => format!("Incorrect API key provided: {key}. You can find your API key in your account settings."),
    };
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, axum::Json(body))
}

impl Echo {
    async fn start() -> (Echo, String) {
        let echo = Echo::default();
        let app = axum::Router::new()
            .route("/{mode}/v1/chat/completions", axum::routing::post(echo_chat))
            .with_state(echo.clone());
        let addr = kit::serve_on(next_ip(), app).await;
        (echo, format!("http://{addr}"))
    }
}

fn endpoint_agent(name: &str, base_url: &str, secret: Option<&str>, capabilities: &[&str]) -> Value {
    let mut extra = json!({"instructions": "Answer briefly.", "capabilities": capabilities});
    if let Some(secret) = secret {
        extra["apiKeySecretRef"] = json!({"name": secret, "key": "api-key"});
    }
    kit::endpoint_agent(name, base_url, extra)
}

async fn secret(client: &Client, ns: &str, name: &str, key: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"api-key": key}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("create Secret");
}

/// A distinctive API key: `sk-volt-` and 32 random hex digits.
fn new_key() -> String {
    format!("sk-volt-{:032x}", rand::random::<u128>())
}

/// Where `text` shows `key`: whole, base64-encoded (as in a Secret's data), or any 12
/// characters of its random part (a key cut short is a leak too).
fn leak(text: &str, key: &str) -> Option<String> {
    let base64 = serde_json::to_value(k8s_openapi::ByteString(key.as_bytes().to_vec())).expect("base64");
    let base64 = base64.as_str().expect("a string").to_string();
    let random = key.trim_start_matches("sk-volt-");
    let pieces = std::iter::once(key.to_string())
        .chain(std::iter::once(base64))
        .chain((0..=random.len() - 12).map(|i| random[i..i + 12].to_string()));
    for piece in pieces {
        if let Some(at) = text.find(&piece) {
            let start = text[..at].char_indices().rev().nth(150).map(|(i, _)| i).unwrap_or(0);
            let end = text[at..].char_indices().nth(150).map(|(i, _)| at + i).unwrap_or(text.len());
            return Some(format!("{piece:?} in …{}…", &text[start..end]));
        }
    }
    None
}

#[tokio::test]
async fn api_keys_stay_out_of_logs_status_and_events_and_runs_stay_in_their_namespace() {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns_a = cp.namespace(&client, "sec-keys-a").await;
    let ns_b = cp.namespace(&client, "sec-keys-b").await;
    let dir = LogDir::new("security-keys");
    let (key_a, key_b, key_b_only) = (new_key(), new_key(), new_key());

    // Namespace A: its key, Agents calling a working replica, refusing ones (401, 500), ones
    // that echo the key, and one whose apiKeySecretRef names a Secret only B has.
    let replica_a = Stub::start("replica-a", Duration::from_millis(5)).await;
    let refusing = Stub::start("refusing", Duration::from_millis(5)).await;
    refusing.always(Reply::Status(401));
    let failing = Stub::start("failing", Duration::from_millis(5)).await;
    failing.always(Reply::Status(500));
    let (echo, echo_url) = Echo::start().await;
    secret(&client, &ns_a, "llm-key", &key_a).await;
    let a_agents = [
        endpoint_agent("coder", &replica_a.base_url(), Some("llm-key"), &["chat"]),
        endpoint_agent("refusing", &refusing.base_url(), Some("llm-key"), &[]),
        endpoint_agent("failing", &failing.base_url(), Some("llm-key"), &[]),
        endpoint_agent("echo", &format!("{echo_url}/echo/v1"), Some("llm-key"), &[]),
        endpoint_agent("clip", &format!("{echo_url}/clip/v1"), Some("llm-key"), &[]),
        endpoint_agent("borrower", &replica_a.base_url(), Some("only-in-b"), &[]),
    ];
    // Namespace B: an Agent of the same name as A's, and one A has no Agent like, with B's keys.
    let replica_b = Stub::start("replica-b", Duration::from_millis(5)).await;
    secret(&client, &ns_b, "llm-key", &key_b).await;
    secret(&client, &ns_b, "only-in-b", &key_b_only).await;
    let b_agents = [
        endpoint_agent("coder", &replica_b.base_url(), Some("llm-key"), &["chat"]),
        endpoint_agent("remote", &replica_b.base_url(), Some("only-in-b"), &["only-b"]),
    ];

    // Trace level for everything (kube, hyper, reqwest, rustls included): a superset of debug.
    let mut op = operator_process(&[&ns_a, &ns_b], "trace", &dir).await;
    for (ns, agents) in [(&ns_a, &a_agents[..]), (&ns_b, &b_agents[..])] {
        let api: Api<Agent> = Api::namespaced(client.clone(), ns);
        for agent in agents {
            apply(&client, ns, agent.clone()).await;
            let name = agent["metadata"]["name"].as_str().expect("name");
            wait_for(&api, name, LONG, |a| a.status.as_ref().is_some_and(|s| s.replicas.healthy == 1)).await;
        }
    }

    let call = |id: &str, agent: Value| json!({"id": id, "agent": agent, "continueOnError": true});
    let a_steps = json!({"steps": [
        {"id": "hello", "agent": {"ref": "coder", "prompt": "Say hello"}},
        call("refused", json!({"ref": "refusing", "prompt": "p"})),
        call("failed", json!({"ref": "failing", "prompt": "p"})),
        call("echoed", json!({"ref": "echo", "prompt": "p"})),
        call("clipped", json!({"ref": "clip", "prompt": "p"})),
        call("borrow", json!({"ref": "borrower", "prompt": "p"})),
        call("remote", json!({"ref": "remote", "prompt": "p"})),
        call("by-capability", json!({"selector": {"capabilities": ["only-b"]}, "prompt": "p"})),
    ]});
    apply(&client, &ns_a, run_obj("keys", a_steps)).await;
    apply(
        &client,
        &ns_b,
        run_obj("keys-b", json!({"steps": [{"id": "hello", "agent": {"ref": "coder", "prompt": "Hi"}}]})),
    )
    .await;
    let runs_a: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns_a);
    let runs_b: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns_b);
    let s = finished(&runs_a, "keys").await;
    let sb = finished(&runs_b, "keys-b").await;

    // What each step did.
    assert_eq!(step(&s, "hello").output.as_deref(), Some("replica-a: Say hello"), "{s:#?}");
    assert_eq!(step(&sb, "hello").output.as_deref(), Some("replica-b: Hi"), "{sb:#?}");
    for id in ["refused", "failed", "echoed", "clipped", "borrow", "remote", "by-capability"] {
        assert_eq!(step(&s, id).phase, StepPhase::Failed, "{id}: {:#?}", step(&s, id));
    }
    assert!(step(&s, "refused").message.contains("HTTP 401"), "{}", step(&s, "refused").message);
    assert!(step(&s, "failed").message.contains("HTTP 500"), "{}", step(&s, "failed").message);
    assert!(
        step(&s, "echoed").message.contains("Incorrect API key provided: [redacted]"),
        "{}",
        step(&s, "echoed").message
    );
    assert_eq!(
        step(&s, "borrow").message,
        format!("agent \"borrower\" (spec.apiKeySecretRef): Secret \"only-in-b\" not found in namespace \"{ns_a}\"")
    );
    assert_eq!(step(&s, "remote").message, format!("agent \"remote\" not found in namespace \"{ns_a}\""));
    assert!(
        step(&s, "by-capability").message.starts_with(&format!("no agent in namespace \"{ns_a}\" matches")),
        "{}",
        step(&s, "by-capability").message
    );

    // Each endpoint got the key of its own namespace, as a bearer token; B's endpoint only
    // B's call, though A has an Agent of the same name.
    let bearer = |key: &str| format!("Bearer {key}");
    let auth = |stub: &Stub| stub.seen().into_iter().map(|r| r.authorization.unwrap_or_default()).collect::<Vec<_>>();
    assert_eq!(auth(&replica_a), [bearer(&key_a)], "A's replica: A's key, once (the borrower never called)");
    assert_eq!(auth(&refusing), [bearer(&key_a)], "401 is not retried");
    // Retried until the replica's circuit opens (3 failed calls in a row), then the call fails.
    assert_eq!(auth(&failing).len(), 3, "500 is retried");
    assert!(auth(&failing).iter().all(|a| *a == bearer(&key_a)));
    assert_eq!(*echo.authorizations.lock().expect("echo"), [bearer(&key_a), bearer(&key_a)]);
    assert_eq!(auth(&replica_b), [bearer(&key_b)], "B's replica: B's run only");

    // Everything the operator shows: its logs, the runs (status included), Events, ConfigMaps,
    // and its HTTP API (event log, stats, metrics).
    // (as the admin, who sees every namespace's events: the token the JSON API wants)
    let admin = control_plane::shared().admin_token().expect("the admin token");
    let (code, event_log) = op.get_as("/api/v1/events?limit=10000", admin).await.expect("the event log");
    assert_eq!(code, 200, "{event_log}");
    let (code, stats) = op.get_as("/api/v1/stats", admin).await.expect("stats");
    assert_eq!(code, 200, "{stats}");
    let (_, metrics) = op.get("/metrics").await.expect("metrics");
    op.stop(Duration::from_secs(20)).await;
    // Without colours (the text format colours levels and field names).
    let logs = kit::logs::strip_ansi(&op.log_text());
    let mut objects = String::new();
    for ns in [&ns_a, &ns_b] {
        let list = ListParams::default();
        for run in Api::<WorkflowRun>::namespaced(client.clone(), ns).list(&list).await.expect("runs") {
            objects.push_str(&serde_json::to_string(&run).expect("json"));
        }
        for agent in Api::<Agent>::namespaced(client.clone(), ns).list(&list).await.expect("agents") {
            objects.push_str(&serde_json::to_string(&agent).expect("json"));
        }
        for event in Api::<Event>::namespaced(client.clone(), ns).list(&list).await.expect("events") {
            objects.push_str(&serde_json::to_string(&event).expect("json"));
        }
        for cm in Api::<ConfigMap>::namespaced(client.clone(), ns).list(&list).await.expect("config maps") {
            objects.push_str(&serde_json::to_string(&cm).expect("json"));
        }
    }
    // What is searched is there: the failures and the debug and trace lines of the calls.
    assert!(logs.contains("agent call failed") && logs.contains(" TRACE "), "debug and trace lines logged");
    assert!(logs.lines().count() > 1000, "trace logging: {} lines", logs.lines().count());
    assert!(objects.contains("[redacted]") && objects.contains("Secret \\\"only-in-b\\\" not found"), "status read");
    assert!(event_log.contains(&ns_a) && event_log.contains("Incorrect API key provided"), "event log read");
    let mut shown = vec![("logs", logs), ("objects", objects), ("event log", event_log), ("stats", stats)];
    shown.push(("metrics", metrics));
    let mut leaks = Vec::new();
    for (key_name, key) in [("A's key", &key_a), ("B's key", &key_b), ("B's other key", &key_b_only)] {
        for (place, text) in &shown {
            if let Some(found) = leak(text, key) {
                leaks.push(format!("{key_name} in the {place}: {found}"));
            }
        }
    }
    if let Some(token) = cp.admin_token() {
        for (place, text) in &shown {
            assert!(!text.contains(token), "the operator's Kubernetes token in the {place}");
        }
    }
    assert!(leaks.is_empty(), "API keys leaked:\n{}", leaks.join("\n"));
}
