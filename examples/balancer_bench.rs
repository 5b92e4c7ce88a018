//! Load-balancer benchmark (not a test: it prints numbers). Sends a few thousand agent calls
//! through the real call path (registry, balancer, async-openai over HTTP) to OpenAI-compatible
//! stub replicas on loopback, and prints, per strategy, the throughput against the ideal
//! (replicas x maxConcurrency / latency), the latency of calls (queue wait included), and how
//! evenly the load spread. Then the same with one replica four times slower, and the balancer
//! alone (no HTTP), to show its own overhead.
//!
//! ```text
//! cargo run --release --example balancer_bench -- --calls 2000 --replicas 4 --concurrency 8 --latency-ms 25
//! ```

#[path = "../tests/kit/mod.rs"]
mod kit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use volt_operator::agents::balancer::{AgentKey, CallResult, PickRequest, ReplicaSpec};
use volt_operator::agents::{Balancer, BalancerConfig, LlmCaller, Registry, Replica, StaticSecrets};
use volt_operator::api::{Agent, Scheme, Strategy};
use volt_operator::engine::Work;
use volt_operator::executors::AgentCaller;

use kit::openai::Stub;

/// Load-balancer benchmark.
#[derive(Parser, Debug)]
struct Args {
    /// Calls per scenario.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Stub replicas.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    /// maxConcurrency of each replica.
    #[arg(long, default_value_t = 8)]
    concurrency: u32,
    /// Latency of each stub, in milliseconds.
    #[arg(long, default_value_t = 25)]
    latency_ms: u64,
    /// Calls in flight at once from the callers in the saturated scenarios (default: twice
    /// the replicas' slots, so calls queue).
    #[arg(long)]
    callers: Option<usize>,
}

const STRATEGIES: [Strategy; 4] =
    [Strategy::RoundRobin, Strategy::LeastConnections, Strategy::Weighted, Strategy::PerformanceBased];

fn name(s: Strategy) -> &'static str {
    volt_operator::agents::caller::strategy_name(s)
}

struct Outcome {
    elapsed: Duration,
    latencies: Vec<Duration>,
    failures: usize,
}

async fn drive(caller: Arc<LlmCaller>, strategy: Strategy, calls: usize, callers: usize) -> Outcome {
    let work = Work::Agent {
        agent: Some("bench".into()),
        selector: None,
        strategy: Some(strategy),
        prompt: "hi".into(),
        llm: Default::default(),
    };
    let work = Arc::new(work);
    let start = Instant::now();
    let results: Vec<(Duration, bool)> = futures::stream::iter(0..calls)
        .map(|_| {
            let (caller, work) = (caller.clone(), work.clone());
            async move {
                let t = Instant::now();
                let ok = caller.call("bench", &work, Some(Duration::from_secs(60))).await.is_ok();
                (t.elapsed(), ok)
            }
        })
        .buffer_unordered(callers)
        .collect()
        .await;
    let elapsed = start.elapsed();
    let failures = results.iter().filter(|(_, ok)| !ok).count();
    let mut latencies: Vec<Duration> = results.into_iter().map(|(d, _)| d).collect();
    latencies.sort();
    Outcome { elapsed, latencies, failures }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Coefficient of variation of the calls each replica served (0: perfectly even).
fn spread(counts: &[usize]) -> f64 {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<usize>() as f64 / n;
    if mean == 0.0 {
        return 0.0;
    }
    let var = counts.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

fn agent(concurrency: u32) -> Agent {
    let spec = serde_json::json!({
        "model": "stub-model", "maxConcurrency": concurrency, "timeoutSeconds": 30,
        "replicas": {"selector": {"matchLabels": {"app": "bench"}}, "port": 8000}
    });
    let mut a = Agent::new("bench", serde_json::from_value(spec).unwrap_or_default());
    a.metadata.namespace = Some("bench".into());
    a
}

async fn scenario(title: &str, args: &Args, latencies: &[Duration], callers: usize) {
    let callers = callers.max(1);
    // The replicas' capacity, or what the callers can send if they are fewer (each call then
    // takes at least the fastest replica's latency).
    let capacity: f64 = latencies.iter().map(|l| f64::from(args.concurrency) / l.as_secs_f64()).sum();
    let fastest = latencies.iter().min().copied().unwrap_or(Duration::from_millis(1)).as_secs_f64();
    let ideal = capacity.min(callers as f64 / fastest);
    println!("\n## {title}");
    println!(
        "{} replicas x maxConcurrency {} (latencies {:?}), {} calls, {} callers; ideal {:.0} calls/s",
        latencies.len(),
        args.concurrency,
        latencies.iter().map(|l| l.as_millis()).collect::<Vec<_>>(),
        args.calls,
        callers,
        ideal
    );
    println!(
        "{:<18} {:>9} {:>7} {:>8} {:>8} {:>8} {:>7} {:>9}  calls per replica",
        "strategy", "calls/s", "of ideal", "p50 ms", "p99 ms", "max ms", "spread", "max busy"
    );
    for strategy in STRATEGIES {
        let specs: Vec<(String, Duration)> =
            latencies.iter().enumerate().map(|(i, l)| (format!("replica-{i}"), *l)).collect();
        let refs: Vec<(&str, Duration)> = specs.iter().map(|(n, l)| (n.as_str(), *l)).collect();
        let stubs = Stub::group(&refs).await;
        let registry = Arc::new(Registry::default());
        let replicas = stubs
            .iter()
            .map(|s| Replica::pod(s.name(), &s.ip().to_string(), i32::from(s.port()), "/v1", Scheme::Http, true, ""))
            .collect();
        registry.update(&agent(args.concurrency), replicas);
        let caller = Arc::new(LlmCaller::new(registry, Arc::new(StaticSecrets::new()), strategy));
        // Warm the connection pools so the first calls do not pay for connects.
        drive(caller.clone(), strategy, callers, callers).await;
        let warm: Vec<usize> = stubs.iter().map(Stub::answered).collect();
        let out = drive(caller, strategy, args.calls, callers).await;
        let counts: Vec<usize> = stubs.iter().zip(&warm).map(|(s, w)| s.answered() - w).collect();
        let busiest = stubs.iter().map(Stub::max_in_flight).max().unwrap_or(0);
        let rate = args.calls as f64 / out.elapsed.as_secs_f64();
        println!(
            "{:<18} {:>9.0} {:>7.0}% {:>8.1} {:>8.1} {:>8.1} {:>7.3} {:>9}  {:?}{}",
            name(strategy),
            rate,
            100.0 * rate / ideal,
            percentile(&out.latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&out.latencies, 0.99).as_secs_f64() * 1e3,
            out.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            spread(&counts),
            busiest,
            counts,
            if out.failures > 0 { format!("  ({} failed)", out.failures) } else { String::new() }
        );
    }
}

/// The balancer alone: acquire and finish, no HTTP.
async fn balancer_alone(args: &Args) {
    let picks = 200_000usize;
    let tasks = 64usize;
    println!("\n## the balancer alone (no HTTP): {picks} picks from {tasks} tasks");
    println!("{:<18} {:>12} {:>12}", "strategy", "picks/s", "ns/pick");
    for strategy in STRATEGIES {
        let b = Balancer::new(BalancerConfig::default());
        let agent = AgentKey::new("bench", "bench");
        let specs = (0..args.replicas)
            .map(|i| ReplicaSpec {
                name: format!("r{i}"),
                healthy: true,
                reason: String::new(),
                max_concurrency: args.concurrency,
                weight: 1 + i as u32,
            })
            .collect();
        b.set_replicas(&agent, specs);
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (b, agent) = (b.clone(), agent.clone());
            handles.push(tokio::spawn(async move {
                for _ in 0..picks / tasks {
                    match b.acquire(PickRequest::new(vec![agent.clone()], strategy), None).await {
                        Ok(lease) => {
                            tokio::task::yield_now().await;
                            lease.finish(CallResult::Success);
                        }
                        Err(e) => eprintln!("{e}"),
                    }
                }
            }));
        }
        for h in handles {
            let _ = h.await;
        }
        let elapsed = start.elapsed();
        let rate = picks as f64 / elapsed.as_secs_f64();
        println!("{:<18} {:>12.0} {:>12.0}", name(strategy), rate, 1e9 / rate);
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let latency = Duration::from_millis(args.latency_ms.max(1));
    println!("# volt-operator load-balancer benchmark");
    let slots = args.replicas.max(2) * args.concurrency as usize;
    let saturating = args.callers.unwrap_or(2 * slots);
    scenario("identical replicas, saturated", &args, &vec![latency; args.replicas.max(1)], saturating).await;
    let mut mixed = vec![latency; args.replicas.max(2)];
    if let Some(last) = mixed.last_mut() {
        *last = latency * 4;
    }
    scenario("one replica four times slower, saturated", &args, &mixed, saturating).await;
    // Below capacity the strategies differ: the ideal is then bounded by the callers.
    scenario("one replica four times slower, at a quarter of capacity", &args, &mixed, (slots / 4).max(1)).await;
    balancer_alone(&args).await;
}
