//! Cost and provider control end to end (issue 17): usage and cost in step rows, the run's
//! `status.usage` and the metrics; an Agent's `spec.rateLimit` keeping a provider that refuses
//! bursts from answering 429; Budgets that refuse the call that would go over, naming the
//! budget, whose usage survives an operator restart; a run's `spec.budget`; fallbacks.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use serde_json::json;
use volt_operator::api::{Budget, RunPhase, condition_status};

use crate::agents::{fan_out, finished, operator, single};
use crate::kit::openai::{Reply, Stub};
use crate::kit::{Env, endpoint_agent, metric_sum_where, wait_for};

const LONG: Duration = Duration::from_secs(90);

fn priced(name: &str, url: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({"maxConcurrency": 8, "parameters": {"maxTokens": 50},
        "pricing": {"inputPerMillionTokens": 1000, "outputPerMillionTokens": 2000}});
    crate::kit::objects::merge(&mut spec, extra);
    endpoint_agent(name, url, spec)
}

#[tokio::test]
async fn usage_and_cost_are_counted_and_the_rate_limit_keeps_the_provider_from_429s() {
    let e = Env::new("cost-usage").await;
    let op = operator(&e).await;
    let stub = Stub::start("priced", Duration::from_millis(5)).await;
    // The provider takes 60 a minute and refuses bursts of more than 2.
    stub.limit_rpm_burst(60, 2.0);
    e.apply(priced("priced", &stub.base_url(), json!({"rateLimit": {"requestsPerMinute": 60}}))).await;
    // 8 calls at once: without the limiter, 6 of them would meet a 429.
    e.apply(fan_out("many", json!({"ref": "priced"}), 8, 8)).await;
    let s = finished(&e, "many").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(stub.rate_limited(), 0, "no call met the provider's limit");
    assert_eq!(stub.requests(), 8);
    let (mut input, mut output, mut cost) = (0u64, 0u64, 0.0f64);
    for (key, row) in s.steps.iter().filter(|(k, _)| k.starts_with("ask[")) {
        let t = row.tokens.unwrap_or_else(|| panic!("{key} has tokens"));
        assert!(t.prompt > 0 && t.completion > 0, "{key}: {t:?}");
        let want = (t.prompt as f64 * 1000.0 + t.completion as f64 * 2000.0) / 1e6;
        assert!((t.cost - want).abs() < 1e-9, "{key}: cost {} for {t:?}", t.cost);
        input += t.prompt;
        output += t.completion;
        cost += t.cost;
    }
    let usage = s.usage.expect("status.usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (input, output));
    assert!((usage.cost - cost).abs() < 1e-6, "{usage:?} vs {cost}");
    let text = op.metrics.render();
    let metric_cost =
        metric_sum_where(&text, "volt_llm_cost_total", &[("exported_namespace", e.ns.as_str()), ("agent", "priced")]);
    assert!((metric_cost - cost).abs() < 1e-6, "metric {metric_cost} vs {cost}");
    let metric_in = metric_sum_where(
        &text,
        "volt_llm_usage_tokens_total",
        &[("exported_namespace", e.ns.as_str()), ("kind", "input")],
    );
    assert_eq!(metric_in as u64, input);
}

#[tokio::test]
async fn a_budget_refuses_the_call_that_would_go_over_and_its_usage_survives_a_restart() {
    let e = Env::new("cost-budget").await;
    let op = operator(&e).await;
    let stub = Stub::start("b", Duration::from_millis(5)).await;
    e.apply(priced("b", &stub.base_url(), json!({}))).await;
    // Each call reserves its prompt's estimate plus maxTokens (50) and uses about 10 tokens.
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Budget", "metadata": {"name": "small"},
        "spec": {"window": "Daily", "maxTokens": 150, "selector": {"agents": ["b"]}}}))
        .await;
    let budgets: Api<Budget> = Api::namespaced(e.client.clone(), &e.ns);
    wait_for(&budgets, "small", LONG, |b| b.status.as_ref().is_some_and(|s| s.observed_generation.is_some())).await;
    e.apply(fan_out("spend", json!({"ref": "b"}), 30, 1)).await;
    let s = finished(&e, "spend").await;
    assert_eq!(s.phase, RunPhase::Failed, "{s:#?}");
    assert!(s.message.contains("budget \"small\" (Daily window from"), "{}", s.message);
    assert!(s.message.contains("maxTokens 150"), "{}", s.message);
    let answered: u64 = s.steps.values().filter_map(|r| r.tokens).map(|t| t.prompt + t.completion).sum();
    assert!(answered <= 150, "never over the budget: {answered}");
    assert_eq!(stub.answered() as u64, s.steps.values().filter(|r| r.tokens.is_some()).count() as u64);
    // The usage reaches the Budget's status, with Exceeded.
    let b = wait_for(&budgets, "small", LONG, |b| b.status.as_ref().is_some_and(|s| s.used.tokens == answered)).await;
    let st = b.status.expect("status");
    let exceeded = condition_status(&st.conditions, "Exceeded").expect("Exceeded");
    assert_eq!(exceeded.status, "True", "{exceeded:?}");
    assert!(exceeded.message.contains("budget \"small\""), "{}", exceeded.message);
    assert!(st.window_start.is_some());

    // A new operator reads the usage back: the next call is refused at once.
    drop(op);
    let _op = operator(&e).await;
    let before = stub.requests();
    e.apply(single("after-restart", json!({"ref": "b"}))).await;
    let s = finished(&e, "after-restart").await;
    assert_eq!(s.phase, RunPhase::Failed, "{s:#?}");
    assert!(s.message.contains("budget \"small\""), "{}", s.message);
    assert!(s.message.contains(&format!("{answered} tokens used")), "{}", s.message);
    assert_eq!(stub.requests(), before, "no call went out");

    // A run's own budget.
    let mut run = single("own-budget", json!({"ref": "other"}));
    run["spec"]["budget"] = json!({"maxTokens": 10});
    let other = Stub::start("other", Duration::ZERO).await;
    e.apply(endpoint_agent("other", &other.base_url(), json!({}))).await;
    e.apply(run).await;
    let s = finished(&e, "own-budget").await;
    assert_eq!(s.phase, RunPhase::Failed, "{s:#?}");
    assert!(s.message.contains("the run's spec.budget: 0 tokens used"), "{}", s.message);
    assert_eq!(other.requests(), 0);
}

#[tokio::test]
async fn an_exhausted_agent_falls_back_and_the_status_and_transcript_say_why() {
    let e = Env::new("cost-fallback").await;
    let _op = operator(&e).await;
    let big = Stub::start("big", Duration::ZERO).await;
    big.always(Reply::ContextTooLong);
    let small = Stub::start("small", Duration::ZERO).await;
    e.apply(endpoint_agent("small", &small.base_url(), json!({"model": "small-model"}))).await;
    e.apply(endpoint_agent("big", &big.base_url(), json!({"fallbacks": ["small"]}))).await;
    crate::agents::agent_status(&e, "big", |s| s.replicas.healthy == 1).await;
    e.apply(single("fb", json!({"ref": "big"}))).await;
    let s = finished(&e, "fb").await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let row = &s.steps["ask"];
    assert_eq!(row.agent.as_deref(), Some("small"));
    let why = row.fallback.as_deref().unwrap_or_default();
    assert!(why.contains("small (model small-model) answered instead of big: the context is too long"), "{why}");
    assert_eq!((big.requests(), small.answered()), (1, 1));
    let cm_name = row.transcript_ref.as_ref().expect("transcript").config_map.clone();
    let cms: Api<ConfigMap> = Api::namespaced(e.client.clone(), &e.ns);
    let cm = cms.get(&cm_name).await.expect("transcript ConfigMap");
    let text = cm.data.unwrap_or_default().into_values().next().unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
    let fb =
        doc["entries"].as_array().expect("entries").iter().find(|e| e["kind"] == "fallback").expect("fallback entry");
    assert_eq!(
        (fb["from"].as_str(), fb["to"].as_str(), fb["model"].as_str()),
        (Some("big"), Some("small"), Some("small-model"))
    );
    assert!(fb["reason"].as_str().unwrap_or_default().contains("context_length_exceeded"), "{fb}");
}
