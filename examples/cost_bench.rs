//! Cost and provider control under load (issue 17; `make bench` runs it after the operator
//! benchmarks). The real call path (registry, balancer, limiter, budget ledger, async-openai
//! over HTTP) against the OpenAI-compatible stub of the test kit, limited like a provider to
//! `--rpm` requests a minute (a bucket of two seconds' worth, so bursts meet 429s):
//!
//! - `--calls` calls from `--runs` runs of equal priority, each run a task that sends its calls
//!   one after the other: the measured rate against the limit, the 429s the provider sent and
//!   those that reached steps (failed calls), and the spread of the runs' shares of the calls
//!   answered in the first half of the time ((max - min) / mean);
//! - a Budget of `--budget-tokens` tokens, 8 calls at a time until it refuses: by how many calls
//!   the settled usage went over it;
//! - the limiter and budget check alone, with room (no waiting): added latency p50 and p99.
//!
//! ```text
//! cargo run --release --example cost_bench -- --scale 0.1
//! ```

#[path = "../tests/kit/mod.rs"]
mod kit;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use volt_operator::agents::budget::{CallScope, Spend};
use volt_operator::agents::limits::Need;
use volt_operator::agents::{AgentKey, BalancerConfig, Budgets, Limits, LlmCaller, Registry, StaticSecrets, in_run};
use volt_operator::api::{Agent, BudgetSpec, BudgetWindow, RateLimit, Strategy};
use volt_operator::engine::{RunInfo, Work};
use volt_operator::executors::AgentCaller;

use kit::openai::Stub;

#[derive(Parser, Debug)]
struct Args {
    /// Multiply the number of calls by this (0.1 for a quick look).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// The provider's (and the Agent's) requests per minute.
    #[arg(long, default_value_t = 600)]
    rpm: u32,
    #[arg(long, default_value_t = 2000)]
    budget_tokens: u64,
}

fn agent(name: &str, url: &str, rpm: u32) -> Agent {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "volt.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"model": "m", "endpoint": {"baseUrl": url}, "maxConcurrency": 64, "timeoutSeconds": 30,
                 "parameters": {"maxTokens": 20},
                 "rateLimit": {"requestsPerMinute": rpm}}
    }))
    .expect("agent")
}

fn work(name: &str) -> Work {
    Work::Agent {
        agent: Some(name.into()),
        selector: None,
        strategy: None,
        prompt: "hi there".into(),
        llm: Default::default(),
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let calls = ((args.calls as f64 * args.scale).round() as usize).max(args.runs);
    let runs = args.runs;

    // 1. Rate, 429s and shares.
    let stub = Stub::start("provider", Duration::from_millis(5)).await;
    stub.limit_rpm_burst(args.rpm, 2.0);
    let registry = Registry::from_agents([agent("limited", &stub.base_url(), args.rpm)], BalancerConfig::default())
        .expect("registry");
    let caller = Arc::new(LlmCaller::new(Arc::new(registry), Arc::new(StaticSecrets::new()), Strategy::RoundRobin));
    let done = Arc::new(AtomicUsize::new(0));
    let shares: Arc<Vec<AtomicUsize>> = Arc::new((0..runs).map(|_| AtomicUsize::new(0)).collect());
    let half_shares: Arc<std::sync::Mutex<Option<Vec<usize>>>> = Arc::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for r in 0..runs {
        let per = calls / runs + usize::from(r < calls % runs);
        let (caller, done, shares, half, failed) =
            (caller.clone(), done.clone(), shares.clone(), half_shares.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let run = RunInfo {
                name: format!("run-{r}"),
                namespace: "bench".into(),
                uid: format!("uid-{r}"),
                ..Default::default()
            };
            let w = work("limited");
            for i in 0..per {
                let out =
                    in_run(&run, &format!("ask[{i}]"), 1, caller.call("bench", &w, Some(Duration::from_secs(600))))
                        .await;
                if out.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                shares[r].fetch_add(1, Ordering::Relaxed);
                if done.fetch_add(1, Ordering::Relaxed) + 1 == calls / 2 {
                    *half.lock().expect("lock") = Some(shares.iter().map(|s| s.load(Ordering::Relaxed)).collect());
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The first second's burst goes at once; the rest at the limit.
    let rate = (calls as f64 - f64::from(args.rpm) / 60.0) / elapsed * 60.0;
    let half = half_shares.lock().expect("lock").clone().unwrap_or_default();
    let mean = half.iter().sum::<usize>() as f64 / half.len().max(1) as f64;
    let spread = (half.iter().max().copied().unwrap_or(0) as f64 - half.iter().min().copied().unwrap_or(0) as f64)
        / mean.max(1e-9);

    // 2. Budget overshoot.
    let stub2 = Stub::start("budgeted", Duration::from_millis(5)).await;
    let budgets = Arc::new(Budgets::default());
    let spec = BudgetSpec { window: BudgetWindow::Total, max_tokens: Some(args.budget_tokens), ..Default::default() };
    budgets.upsert("bench", "b", &spec, None, jiff::Timestamp::now());
    let registry = Registry::from_agents([agent("budgeted", &stub2.base_url(), 1_000_000)], BalancerConfig::default())
        .expect("registry");
    let caller2 = Arc::new(
        LlmCaller::new(Arc::new(registry), Arc::new(StaticSecrets::new()), Strategy::RoundRobin)
            .with_budgets(budgets.clone()),
    );
    let mut tasks = Vec::new();
    for t in 0..8 {
        let caller = caller2.clone();
        tasks.push(tokio::spawn(async move {
            let run = RunInfo {
                name: format!("b-{t}"),
                namespace: "bench".into(),
                uid: format!("b-{t}"),
                ..Default::default()
            };
            let w = work("budgeted");
            while in_run(&run, "ask", 1, caller.call("bench", &w, Some(Duration::from_secs(60)))).await.is_ok() {}
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let used = budgets.snapshot("bench", "b").map(|s| s.used.tokens).unwrap_or(0);
    let answered = stub2.answered() as u64;
    let per_call = used as f64 / answered.max(1) as f64;
    let over_calls =
        if used > args.budget_tokens { ((used - args.budget_tokens) as f64 / per_call).ceil() } else { 0.0 };

    // 3. The limiter and budget check alone, with room.
    let limits = Limits::default();
    let key = AgentKey::new("bench", "fast");
    let limiter = limits
        .for_agent(
            &key,
            Some(&RateLimit { requests_per_minute: Some(u32::MAX / 2), tokens_per_minute: Some(u64::MAX / 4) }),
        )
        .expect("limiter");
    let ledger = Arc::new(Budgets::default());
    ledger.upsert(
        "bench",
        "big",
        &BudgetSpec { max_tokens: Some(u64::MAX / 4), ..Default::default() },
        None,
        jiff::Timestamp::now(),
    );
    let scope = CallScope { namespace: "bench".into(), agent: "fast".into(), ..Default::default() };
    let mut lat = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        let r = ledger.try_reserve(&scope, Spend { tokens: 100, cost: 0.0 }).expect("room");
        let p = limiter.acquire(Need { requests: 1.0, tokens: 100.0 }, 0, None).await.expect("permit");
        p.settle(50);
        r.settle(Spend { tokens: 50, cost: 0.0 });
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);

    println!(
        "## cost and provider control: {calls} calls from {runs} runs, provider limited to {} requests/min",
        args.rpm
    );
    println!("{:<44} {:>12} {:>12}", "figure", "measured", "target");
    println!(
        "{:<44} {:>12.1} {:>12}",
        "rate, requests/min (after the first second)",
        rate,
        format!("{} ±5%", args.rpm)
    );
    println!("{:<44} {:>12.2} {:>12}", "rate / limit", rate / f64::from(args.rpm), "0.95..1.05");
    println!("{:<44} {:>12} {:>12}", "429s sent by the provider", stub.rate_limited(), "-");
    println!("{:<44} {:>12} {:>12}", "calls failed (429s reaching steps)", failed.load(Ordering::Relaxed), "0");
    println!("{:<44} {:>12.3} {:>12}", "spread of runs' shares at half time", spread, "small");
    println!("{:<44} {:>12} {:>12}", "budget: tokens used / max", format!("{used}/{}", args.budget_tokens), "-");
    println!("{:<44} {:>12} {:>12}", "budget overshoot, calls", over_calls, "<= 1");
    println!("{:<44} {:>12.1} {:>12}", "limiter + budget check p50, µs", pct(&lat, 0.5), "-");
    println!("{:<44} {:>12.1} {:>12}", "limiter + budget check p99, µs", pct(&lat, 0.99), "< 1000");
    println!(
        "{}",
        serde_json::json!({"scenario": "cost", "calls": calls, "runs": runs, "rpm": args.rpm, "rate": rate,
            "provider_429": stub.rate_limited(), "failed": failed.load(Ordering::Relaxed), "share_spread": spread,
            "budget_used": used, "budget_max": args.budget_tokens, "overshoot_calls": over_calls,
            "check_p50_us": pct(&lat, 0.5), "check_p99_us": pct(&lat, 0.99), "seconds": elapsed})
    );
}
