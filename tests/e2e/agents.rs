//! Agents end to end: replica health from pod status, load balancing across replicas and LLM
//! steps, against OpenAI-compatible stub servers on loopback addresses that the kubelet
//! stand-in reports as the replicas' pod IPs. `llm_faults` reuses the helpers.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use volt_operator::api::{Agent, RunPhase, StepStatus, WorkflowRunStatus, condition_status};

use crate::kit::kubelet::{self, Kubelet, PodPlan};
use crate::kit::objects::merge;
use crate::kit::openai::{Reply, Stub};
use crate::kit::{Env, Operator, endpoint_agent, metric_sum_where, wait_for};

const LONG: Duration = Duration::from_secs(90);
const MODEL: &str = "stub-model";

/// The operator, refreshing live load every second.
pub(crate) async fn operator(e: &Env) -> Operator {
    Operator::start_with(&e.ns, |a| a.metrics_interval = Duration::from_secs(1)).await
}

/// An Agent of the `replicas` form: pods labelled `app=<app>`, serving on `port`.
pub(crate) fn replicas_agent(name: &str, app: &str, port: u16, extra: Value) -> Value {
    let mut spec = json!({
        "model": MODEL,
        "instructions": "Answer briefly.",
        "capabilities": ["chat"],
        "maxConcurrency": 8,
        "timeoutSeconds": 10,
        "replicas": {"selector": {"matchLabels": {"app": app}}, "port": port, "path": "/v1"}
    });
    merge(&mut spec, extra);
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "metadata": {"name": name}, "spec": spec})
}

/// A run fanning `items` agent calls out, `max_parallel` at once.
pub(crate) fn fan_out(name: &str, agent: Value, items: usize, max_parallel: u32) -> Value {
    let list = serde_json::to_string(&(0..items).collect::<Vec<_>>()).expect("json");
    let mut call = json!({"prompt": "item {{ item }}"});
    merge(&mut call, agent);
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
    "spec": {"workflow": {"steps": [
        {"id": "items", "template": list},
        {"id": "ask", "dependsOn": ["items"], "forEach": "{{ steps.items.json }}", "maxParallel": max_parallel,
         "agent": call}
    ]}}})
}

/// A run with one agent step.
pub(crate) fn single(name: &str, agent: Value) -> Value {
    let mut call = json!({"prompt": "Say hello"});
    merge(&mut call, agent);
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
           "spec": {"workflow": {"steps": [{"id": "ask", "agent": call}]}}})
}

pub(crate) async fn finished(e: &Env, name: &str) -> WorkflowRunStatus {
    e.finished(name, LONG).await
}

/// The fan-out children's rows.
pub(crate) fn children<'a>(s: &'a WorkflowRunStatus, step: &str) -> Vec<&'a StepStatus> {
    s.steps.iter().filter(|(k, _)| k.starts_with(&format!("{step}["))).map(|(_, v)| v).collect()
}

pub(crate) fn by<'a>(
    rows: &[&'a StepStatus],
    f: impl Fn(&'a StepStatus) -> Option<&'a String>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in rows {
        *counts.entry(f(r).cloned().unwrap_or_default()).or_default() += 1;
    }
    counts
}

/// A replica pod labelled `app=<app>` (with a finalizer when `hold`, so that deleting it
/// leaves it terminating).
pub(crate) async fn replica_pod(e: &Env, name: &str, app: &str, hold: bool) {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.0",
                                 "ports": [{"containerPort": 8000}]}]}
    });
    if hold {
        pod["metadata"]["finalizers"] = json!(["volt.dev/test-hold"]);
    }
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    e.pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|err| panic!("create pod {name}: {err}"));
}

/// Replica pods `names`, running and Ready at the stubs' addresses.
pub(crate) async fn running_replicas(e: &Env, app: &str, stubs: &[Stub]) {
    for stub in stubs {
        replica_pod(e, stub.name(), app, false).await;
        kubelet::set_running(&e.client, &e.ns, stub.name(), &stub.ip().to_string(), true).await.expect("running");
    }
}

pub(crate) async fn agent_status(
    e: &Env,
    name: &str,
    check: impl Fn(&volt_operator::api::AgentStatus) -> bool,
) -> Agent {
    wait_for(&e.agents, name, LONG, |a| a.status.as_ref().is_some_and(&check)).await
}

/// The sum of the samples of `metric` whose labels include all of `labels`.
fn metric(op: &Operator, metric: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum_where(&op.metrics.render(), metric, labels)
}

async fn events(e: &Env) -> Vec<Event> {
    Api::<Event>::namespaced(e.client.clone(), &e.ns).list(&ListParams::default()).await.expect("events").items
}

#[tokio::test]
async fn round_robin_spreads_a_fan_out_evenly_and_reports_live_load() {
    let e = Env::new("ag-rr").await;
    let op = operator(&e).await;
    let ms = Duration::from_millis(50);
    let stubs = Stub::group(&[("rr-a", ms), ("rr-b", ms), ("rr-c", ms)]).await;
    running_replicas(&e, "rr", &stubs).await;
    e.apply(replicas_agent("rr", "rr", stubs[0].port(), json!({}))).await;
    agent_status(&e, "rr", |s| s.replicas.healthy == 3).await;

    e.apply(fan_out("rr-run", json!({"ref": "rr", "strategy": "round_robin"}), 30, 3)).await;
    let s = finished(&e, "rr-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let rows = children(&s, "ask");
    assert_eq!(rows.len(), 30);
    let replicas = by(&rows, |r| r.replica.as_ref());
    assert_eq!(replicas, BTreeMap::from([("rr-a".into(), 10), ("rr-b".into(), 10), ("rr-c".into(), 10)]));
    for stub in &stubs {
        assert_eq!(stub.answered(), 10, "{}", stub.name());
        let seen = stub.seen();
        assert!(seen.iter().all(|r| r.model == MODEL && r.system.as_deref() == Some("Answer briefly.")));
        assert!(seen.iter().all(|r| r.authorization.is_none()), "no apiKeySecretRef, no Authorization header");
    }
    for (key, row) in &s.steps {
        if !key.starts_with("ask[") {
            continue;
        }
        let replica = row.replica.clone().unwrap_or_default();
        let output = row.output.clone().unwrap_or_default();
        assert!(output.starts_with(&format!("{replica}: item ")), "{key}: {output:?} from {replica}");
        assert_eq!(row.agent.as_deref(), Some("rr"));
        let tokens = row.tokens.expect("token usage");
        assert!(tokens.prompt >= 4 && tokens.completion >= 3, "{tokens:?}");
        assert_eq!(row.attempts, 1);
    }

    // Live load reaches the status on the metrics interval.
    let agent = agent_status(&e, "rr", |s| s.endpoints.iter().map(|r| r.completed).sum::<u64>() == 30).await;
    let status = agent.status.expect("status");
    for row in &status.endpoints {
        assert_eq!((row.completed, row.failed, row.in_flight), (10, 0, 0), "{row:?}");
        assert!(row.ewma_latency_ms >= 40, "{row:?}");
        assert!(row.healthy && row.address.ends_with(&format!(":{}", stubs[0].port())), "{row:?}");
    }
    assert_eq!(status.ready_replicas, "3/3");
    assert_eq!(condition_status(&status.conditions, "Ready").map(|c| c.status.as_str()), Some("True"));
    assert_eq!(condition_status(&status.conditions, "Degraded").map(|c| c.status.as_str()), Some("False"));

    // Metrics per agent and replica.
    assert_eq!(metric(&op, "volt_llm_calls_total", &[("agent", "rr"), ("outcome", "success")]), 30.0);
    assert_eq!(metric(&op, "volt_lb_picks_total", &[("replica", "rr-b"), ("strategy", "round_robin")]), 10.0);
    assert!(metric(&op, "volt_llm_tokens_total", &[("agent", "rr"), ("kind", "completion")]) >= 90.0);
    assert_eq!(metric(&op, "volt_llm_call_duration_seconds_count", &[("replica", "rr-c")]), 10.0);
}

/// Two replicas, one fast and one slow: `strategy` sends most calls to the fast one.
async fn faster_replica_gets_most_calls(prefix: &str, strategy: &str) {
    let e = Env::new(prefix).await;
    let _op = operator(&e).await;
    let stubs = Stub::group(&[("fast", Duration::from_millis(10)), ("slow", Duration::from_millis(600))]).await;
    running_replicas(&e, prefix, &stubs).await;
    e.apply(replicas_agent("pair", prefix, stubs[0].port(), json!({}))).await;
    agent_status(&e, "pair", |s| s.replicas.healthy == 2).await;

    e.apply(fan_out("pair-run", json!({"ref": "pair", "strategy": strategy}), 24, 4)).await;
    let s = finished(&e, "pair-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let counts = by(&children(&s, "ask"), |r| r.replica.as_ref());
    let (fast, slow) = (counts.get("fast").copied().unwrap_or(0), counts.get("slow").copied().unwrap_or(0));
    eprintln!("{strategy}: fast {fast}, slow {slow}");
    assert_eq!(fast + slow, 24);
    assert!(fast >= 2 * slow, "{strategy}: the fast replica should take most calls: fast {fast}, slow {slow}");
    assert_eq!((stubs[0].answered(), stubs[1].answered()), (fast, slow));
}

#[tokio::test]
async fn least_connections_prefers_the_faster_replica() {
    faster_replica_gets_most_calls("ag-lc", "least_connections").await;
}

#[tokio::test]
async fn performance_based_prefers_the_faster_replica() {
    faster_replica_gets_most_calls("ag-perf", "performance_based").await;
}

#[tokio::test]
async fn weighted_follows_agent_weights_across_selected_agents() {
    let e = Env::new("ag-w").await;
    let _op = operator(&e).await;
    let heavy = Stub::start("heavy", Duration::from_millis(10)).await;
    let light = Stub::start("light", Duration::from_millis(10)).await;
    e.apply(endpoint_agent("heavy", &heavy.base_url(), json!({"capabilities": ["w"], "weight": 3}))).await;
    e.apply(endpoint_agent("light", &light.base_url(), json!({"capabilities": ["w"], "weight": 1}))).await;
    e.apply(endpoint_agent("other", &light.base_url(), json!({"capabilities": ["x"], "weight": 100}))).await;
    for name in ["heavy", "light", "other"] {
        agent_status(&e, name, |s| s.replicas.healthy == 1).await;
    }

    let call = json!({"selector": {"capabilities": ["w"]}, "strategy": "weighted"});
    e.apply(fan_out("w-run", call, 40, 4)).await;
    let s = finished(&e, "w-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let agents = by(&children(&s, "ask"), |r| r.agent.as_ref());
    assert_eq!(agents, BTreeMap::from([("heavy".into(), 30), ("light".into(), 10)]));
    assert_eq!((heavy.answered(), light.answered()), (30, 10));
}

#[tokio::test]
async fn not_ready_terminating_and_crash_looping_replicas_get_no_calls() {
    let e = Env::new("ag-health").await;
    let _op = operator(&e).await;
    let ms = Duration::from_millis(20);
    let stubs = Stub::group(&[("ok", ms), ("unready", ms), ("crashing", ms), ("leaving", ms)]).await;
    for stub in &stubs {
        replica_pod(&e, stub.name(), "mixed", stub.name() == "leaving").await;
        let ready = stub.name() != "unready";
        kubelet::set_running(&e.client, &e.ns, stub.name(), &stub.ip().to_string(), ready).await.expect("running");
    }
    e.apply(replicas_agent("mixed", "mixed", stubs[0].port(), json!({}))).await;
    agent_status(&e, "mixed", |s| s.replicas.healthy == 3).await;

    // One crash loops, one is being deleted.
    kubelet::set_waiting(&e.client, &e.ns, "crashing", "CrashLoopBackOff", 4).await.expect("crash loop");
    e.pods.delete("leaving", &DeleteParams::default()).await.expect("delete");
    let agent = agent_status(&e, "mixed", |s| s.replicas.healthy == 1 && s.endpoints.len() == 4).await;
    let status = agent.status.expect("status");
    let reasons: BTreeMap<String, (bool, String)> =
        status.endpoints.iter().map(|r| (r.pod.clone(), (r.healthy, r.reason.clone()))).collect();
    assert_eq!(reasons["ok"], (true, String::new()));
    assert_eq!(reasons["unready"], (false, "NotReady".into()));
    assert_eq!(reasons["crashing"], (false, "CrashLoopBackOff (restarts: 4)".into()));
    assert_eq!(reasons["leaving"], (false, "Terminating".into()));
    assert_eq!(status.ready_replicas, "1/4");
    let degraded = condition_status(&status.conditions, "Degraded").expect("Degraded");
    assert_eq!(degraded.status, "True");
    assert!(degraded.message.contains("crashing (CrashLoopBackOff"), "{}", degraded.message);

    e.apply(fan_out("h-run", json!({"ref": "mixed"}), 12, 4)).await;
    let s = finished(&e, "h-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(stubs[0].answered(), 12);
    for stub in &stubs[1..] {
        assert_eq!(stub.requests(), 0, "{} got calls", stub.name());
    }

    // Health changes are events on the Agent.
    let notes: Vec<String> = events(&e)
        .await
        .into_iter()
        .filter(|ev| ev.reason.as_deref() == Some("ReplicaUnhealthy"))
        .filter_map(|ev| ev.message)
        .collect();
    for pod in ["crashing", "leaving"] {
        assert!(notes.iter().any(|n| n.contains(&format!("replica {pod} is unhealthy"))), "{notes:?}");
    }

    // Let the terminating pod go.
    let release = json!({"metadata": {"finalizers": null}});
    e.pods.patch("leaving", &PatchParams::default(), &Patch::Merge(&release)).await.expect("remove finalizer");
}

#[tokio::test]
async fn calls_of_a_killed_replica_are_retried_on_another_and_its_circuit_opens() {
    let e = Env::new("ag-kill").await;
    let _op = operator(&e).await;
    let ms = Duration::from_millis(300);
    let stubs = Stub::group(&[("steady", ms), ("doomed", ms)]).await;
    running_replicas(&e, "kill", &stubs).await;
    e.apply(replicas_agent("pair", "kill", stubs[0].port(), json!({}))).await;
    agent_status(&e, "pair", |s| s.replicas.healthy == 2).await;

    e.apply(fan_out("k-run", json!({"ref": "pair", "strategy": "round_robin"}), 16, 4)).await;
    // Kill the second replica while calls are in flight on it; its pod still looks Ready.
    crate::kit::wait_until("calls in flight on the doomed replica", LONG, || async {
        (stubs[1].requests() >= 1).then_some(())
    })
    .await;
    stubs[1].kill();
    let answered_before_kill = stubs[1].answered();

    let s = finished(&e, "k-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let rows = children(&s, "ask");
    assert!(rows.iter().all(|r| r.attempts == 1), "retried within the call, not as new attempts");
    let replicas = by(&rows, |r| r.replica.as_ref());
    assert_eq!(replicas.get("doomed").copied().unwrap_or(0), answered_before_kill);
    assert_eq!(stubs[0].answered() + answered_before_kill, 16);
    assert!(stubs[1].requests() > answered_before_kill, "calls were cut by the kill");

    // The replica that keeps failing leaves the rotation: Degraded, with the circuit as reason.
    let agent = agent_status(&e, "pair", |s| {
        condition_status(&s.conditions, "Degraded").is_some_and(|c| c.status == "True" && c.reason == "CircuitOpen")
    })
    .await;
    let status = agent.status.expect("status");
    let doomed = status.endpoints.iter().find(|r| r.pod == "doomed").expect("row");
    assert!(!doomed.healthy && doomed.reason.starts_with("CircuitOpen"), "{doomed:?}");
    assert!(doomed.failed >= 3, "{doomed:?}");
    assert_eq!(status.replicas.ready, 2, "the pod is still Ready");
    assert_eq!(status.replicas.healthy, 1);

    // Once the pod goes away, the agent is whole again.
    e.pods.delete("doomed", &DeleteParams::default()).await.expect("delete");
    agent_status(&e, "pair", |s| {
        s.endpoints.len() == 1 && condition_status(&s.conditions, "Degraded").is_some_and(|c| c.status == "False")
    })
    .await;
}

#[tokio::test]
async fn timeouts_and_server_errors_are_retried_on_a_healthy_replica() {
    let e = Env::new("ag-5xx").await;
    let _op = operator(&e).await;
    let stubs = Stub::group(&[
        ("fine", Duration::from_millis(20)),
        ("hangs", Duration::from_secs(30)),
        ("errors", Duration::from_millis(5)),
    ])
    .await;
    stubs[2].always(Reply::Status(503));
    running_replicas(&e, "flaky", &stubs).await;
    e.apply(replicas_agent("flaky", "flaky", stubs[0].port(), json!({"timeoutSeconds": 1}))).await;
    agent_status(&e, "flaky", |s| s.replicas.healthy == 3).await;

    e.apply(fan_out("f-run", json!({"ref": "flaky", "strategy": "round_robin"}), 12, 3)).await;
    let s = finished(&e, "f-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let rows = children(&s, "ask");
    assert!(rows.iter().all(|r| r.replica.as_deref() == Some("fine") && r.attempts == 1), "{rows:#?}");
    assert_eq!(stubs[0].answered(), 12);
    assert!(stubs[1].requests() >= 1 && stubs[2].requests() >= 1, "both bad replicas were tried");
    assert_eq!(stubs[1].answered() + stubs[2].answered(), 0);
    // Both bad replicas fail every call: their circuits open and the agent is Degraded.
    let agent = agent_status(&e, "flaky", |s| s.replicas.healthy == 1).await;
    let status = agent.status.expect("status");
    for pod in ["hangs", "errors"] {
        let row = status.endpoints.iter().find(|r| r.pod == pod).expect("row");
        assert!(row.failed >= 3 && row.reason.starts_with("CircuitOpen"), "{row:?}");
    }
}

#[tokio::test]
async fn rate_limits_with_retry_after_are_honoured() {
    let e = Env::new("ag-429").await;
    let op = operator(&e).await;
    let stub = Stub::start("limited", Duration::from_millis(5)).await;
    let wait = Duration::from_secs(1);
    stub.script([Reply::RateLimited { retry_after: wait }, Reply::RateLimited { retry_after: wait }]);
    e.apply(endpoint_agent("limited", &stub.base_url(), json!({}))).await;
    agent_status(&e, "limited", |s| s.replicas.healthy == 1).await;

    e.apply(single("rl-run", json!({"ref": "limited"}))).await;
    let s = finished(&e, "rl-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let row = &s.steps["ask"];
    assert_eq!(row.attempts, 1);
    assert_eq!(row.output.as_deref(), Some("limited: Say hello"));
    let seen = stub.seen();
    assert_eq!(seen.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 429, 200]);
    for pair in seen.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= wait - Duration::from_millis(50), "Retry-After not honoured: {gap:?}");
        assert!(gap < wait * 3, "waited far longer than asked: {gap:?}");
    }
    let replica = stub.base_url().trim_start_matches("http://").trim_end_matches("/v1").to_string();
    assert_eq!(row.replica.as_deref(), Some(replica.as_str()));
    assert_eq!(metric(&op, "volt_llm_calls_total", &[("agent", "limited"), ("outcome", "rate_limited")]), 2.0);
    assert_eq!(metric(&op, "volt_llm_retries_total", &[("agent", "limited"), ("reason", "rate_limited")]), 2.0);
}

#[tokio::test]
async fn the_api_key_comes_from_the_secret_and_a_missing_secret_fails_the_step() {
    let e = Env::new("ag-key").await;
    let _op = operator(&e).await;
    let stub = Stub::start("keyed", Duration::from_millis(5)).await;
    const KEY: &str = "sk-test-VERY-SECRET-0042";
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-creds"},
        "stringData": {"api-key": format!("{KEY}\n")}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(e.client.clone(), &e.ns).create(&PostParams::default(), &secret).await.expect("secret");
    let with_ref = |name: &str, key: &str| json!({"apiKeySecretRef": {"name": name, "key": key}});
    e.apply(endpoint_agent("nosecret", &stub.base_url(), with_ref("missing-secret", "api-key"))).await;
    e.apply(endpoint_agent("nokey", &stub.base_url(), with_ref("llm-creds", "token"))).await;
    e.apply(endpoint_agent("good", &stub.base_url(), with_ref("llm-creds", "api-key"))).await;
    for name in ["nosecret", "nokey", "good"] {
        agent_status(&e, name, |s| s.replicas.healthy == 1).await;
    }

    for (run, agent) in [("r-nosecret", "nosecret"), ("r-nokey", "nokey"), ("r-good", "good")] {
        e.apply(single(run, json!({"ref": agent}))).await;
    }
    let s = finished(&e, "r-nosecret").await;
    assert_eq!(s.phase, RunPhase::Failed);
    let row = &s.steps["ask"];
    assert_eq!(row.attempts, 1, "a missing Secret is not retried");
    assert_eq!(
        row.message,
        format!(
            "agent \"nosecret\" (spec.apiKeySecretRef): Secret \"missing-secret\" not found in namespace \"{}\"",
            e.ns
        )
    );
    let s = finished(&e, "r-nokey").await;
    assert_eq!(s.phase, RunPhase::Failed);
    assert!(s.steps["ask"].message.contains("Secret \"llm-creds\" in namespace"), "{}", s.steps["ask"].message);
    assert!(s.steps["ask"].message.contains("has no key \"token\""), "{}", s.steps["ask"].message);
    let s = finished(&e, "r-good").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");

    // Only the good agent called, with the key as bearer token.
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));

    // The key is nowhere in status or events.
    let mut everything = String::new();
    for run in e.runs.list(&ListParams::default()).await.expect("runs").items {
        everything.push_str(&serde_json::to_string(&run).expect("json"));
    }
    for agent in e.agents.list(&ListParams::default()).await.expect("agents").items {
        everything.push_str(&serde_json::to_string(&agent).expect("json"));
    }
    for ev in events(&e).await {
        everything.push_str(&serde_json::to_string(&ev).expect("json"));
    }
    assert!(everything.contains("missing-secret"), "the statuses were read");
    assert!(!everything.contains("VERY-SECRET"), "the API key leaked into status or events");
}

#[tokio::test]
async fn a_deployment_mode_agent_creates_its_deployment_and_reports_its_replicas() {
    let e = Env::new("ag-dep").await;
    let _op = operator(&e).await;
    let ms = Duration::from_millis(20);
    let stubs = Stub::group(&[("dep-0", ms), ("dep-1", ms)]).await;
    // The kubelet stand-in gives the Deployment's pods the stubs' addresses, in order.
    let ips: Vec<String> = stubs.iter().map(|s| s.ip().to_string()).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let _kubelet = Kubelet::start(
        e.client.clone(),
        &e.ns,
        Some("volt.dev/agent=coder".into()),
        kubelet::behaviour(move |_| {
            let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            PodPlan::run(ips.get(n).cloned().unwrap_or_else(|| "127.0.0.1".into()))
        }),
    );
    let agent = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "coder"},
        "spec": {"model": MODEL, "capabilities": ["code"],
                 "deployment": {"replicas": 2, "port": stubs[0].port(), "path": "/v1",
                                "template": {"metadata": {"labels": {"team": "ml"}},
                                             "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.6.0"}]}}}}});
    e.apply(agent).await;

    let deployments: Api<Deployment> = Api::namespaced(e.client.clone(), &e.ns);
    let dep = wait_for(&deployments, "coder-agent", LONG, |_| true).await;
    let owner = &dep.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("Agent", "coder", Some(true)));
    let labels = dep.spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    assert_eq!(labels.get("volt.dev/agent").map(String::as_str), Some("coder"));
    assert_eq!(labels.get("team").map(String::as_str), Some("ml"));

    // kube-controller-manager makes the pods; the stand-in runs them.
    let agent = agent_status(&e, "coder", |s| s.replicas.healthy == 2).await;
    let status = agent.status.expect("status");
    assert_eq!((status.replicas.desired, status.replicas.ready), (2, 2));
    assert_eq!(status.endpoint_kind, "deployment");
    assert_eq!(status.ready_replicas, "2/2");
    let mut addresses: Vec<String> = status.endpoints.iter().map(|r| r.address.clone()).collect();
    addresses.sort();
    let mut expected: Vec<String> = stubs.iter().map(|s| format!("{}:{}", s.ip(), s.port())).collect();
    expected.sort();
    assert_eq!(addresses, expected);
    assert!(status.endpoints.iter().all(|r| r.pod.starts_with("coder-agent-")), "{:?}", status.endpoints);

    e.apply(fan_out("d-run", json!({"selector": {"capabilities": ["code"]}}), 6, 2)).await;
    let s = finished(&e, "d-run").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!((stubs[0].answered(), stubs[1].answered()), (3, 3));

    // Scaling the Agent scales the Deployment, and the status follows.
    let scale = json!({"spec": {"deployment": {"replicas": 1}}});
    e.agents.patch("coder", &PatchParams::default(), &Patch::Merge(&scale)).await.expect("scale");
    let agent = agent_status(&e, "coder", |s| s.replicas.desired == 1 && s.endpoints.len() == 1).await;
    assert_eq!(agent.status.expect("status").ready_replicas, "1/1");
    let dep = deployments.get("coder-agent").await.expect("deployment");
    assert_eq!(dep.spec.replicas, Some(1));
}
