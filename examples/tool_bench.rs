//! Tool-loop benchmark (not a test: it prints numbers). Agent steps with tools through the
//! real call path (registry, balancer, async-openai over HTTP to an OpenAI-compatible stub on
//! loopback, and the official Rust MCP SDK to a real MCP server from the Python SDK).
//!
//! 1. The operator's overhead per tool round trip, excluding the model and the tool: steps run
//!    one at a time with 5 tool round trips; each round trip, from the end of one model call
//!    to the end of the next (`atMs` of the transcript's `call` entries), minus the tool call
//!    between (`latencyMs` of its `tool` entry) and the next call's HTTP exchange with the
//!    model (`httpMs`), is one sample. The step's own costs (resolving agents, the MCP session,
//!    the first call) are outside every round trip. Also printed: each step's whole overhead
//!    (its time minus every HTTP exchange and tool call) with 1 and with 5 round trips.
//! 2. Memory with N concurrent tool-using steps: the process's RSS after each of several rounds
//!    of N steps at once; it must not keep growing from round to round. The OpenAI stub runs in
//!    this process and keeps every request it sees: its log is emptied after each round, so
//!    that the figures are the operator's.
//!
//! ```text
//! cargo run --release --example tool_bench -- --steps 200 --rounds 4
//! ```

#[path = "../tests/kit/mod.rs"]
mod kit;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use volt_operator::agents::{BalancerConfig, LlmCaller, Registry, StaticSecrets};
use volt_operator::api::{Agent, Strategy};
use volt_operator::engine::{LlmWork, Work};
use volt_operator::executors::AgentCaller;

use kit::mcp::McpPeer;
use kit::openai::{Reply, Stub};

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent tool-using steps in each memory round.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Memory rounds.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Steps of each kind for the overhead measure.
    #[arg(long, default_value_t = 40)]
    samples: usize,
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn work(turns: usize) -> Work {
    Work::Agent {
        agent: Some(format!("bench-{turns}")),
        selector: None,
        strategy: None,
        prompt: "add things".into(),
        llm: LlmWork { tools: vec!["add".into()], max_turns: 8, ..Default::default() },
    }
}

/// A transcript's `call` and `tool` entries as (kind, atMs, httpMs or latencyMs). Panics when
/// a field is missing: a measure that silently read zeros would be wrong.
fn timed(transcript: &str) -> Vec<(&'static str, f64, f64)> {
    let t: Value = serde_json::from_str(transcript).expect("transcript JSON");
    let mut out = Vec::new();
    for e in t["entries"].as_array().into_iter().flatten() {
        let (kind, field) = match e["kind"].as_str() {
            Some("call") => ("call", "httpMs"),
            Some("tool") => ("tool", "latencyMs"),
            _ => continue,
        };
        let at = e["atMs"].as_f64().expect("atMs");
        let took = e[field].as_f64().unwrap_or_else(|| panic!("{kind} entry without {field}: {e}"));
        out.push((kind, at, took));
    }
    out
}

/// A step's time not spent in the model's HTTP exchanges or the tool calls, in ms.
fn overhead_ms(wall: Duration, transcript: &str) -> f64 {
    wall.as_secs_f64() * 1000.0 - timed(transcript).iter().map(|(_, _, took)| took).sum::<f64>()
}

/// The operator's time in each tool round trip of a step, in ms: from the end of one model call
/// to the end of the next, minus the tool calls between and the next call's HTTP exchange.
fn round_trips_ms(transcript: &str) -> Vec<f64> {
    let entries = timed(transcript);
    let mut out = Vec::new();
    let mut last_call: Option<f64> = None;
    let mut tools = 0.0;
    for (kind, at, took) in entries {
        match kind {
            "tool" => tools += took,
            _ => {
                if let Some(prev) = last_call {
                    out.push(at - prev - tools - took);
                }
                last_call = Some(at);
                tools = 0.0;
            }
        }
    }
    out
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

async fn one(caller: &LlmCaller, work: &Work) -> (Duration, String) {
    let t = Instant::now();
    let out = caller.call("bench", work, Some(Duration::from_secs(120))).await;
    let wall = t.elapsed();
    match out {
        Ok(o) => (wall, o.info.transcript.map(|t| t.to_string()).unwrap_or_default()),
        Err(f) => panic!("a step failed: {}", f.message),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mcp = McpPeer::start(None).await;
    let mut stubs = Vec::new();
    let mut agents = Vec::new();
    for turns in [1usize, 5] {
        let stub = Stub::start(&format!("bench-{turns}"), Duration::ZERO).await;
        stub.always(Reply::ToolLoop { name: "add".into(), args: json!({"a": 1, "b": 2}), turns });
        let spec = json!({"model": "stub-model", "maxConcurrency": 10000, "timeoutSeconds": 120,
            "endpoint": {"baseUrl": stub.base_url()},
            "tools": [{"name": "math", "url": mcp.url(), "allow": ["add"]}]});
        let mut a = Agent::new(&format!("bench-{turns}"), serde_json::from_value(spec).expect("spec"));
        a.metadata.namespace = Some("bench".into());
        agents.push(a);
        stubs.push(stub);
    }
    let registry = Registry::from_agents(agents, BalancerConfig::default()).expect("registry");
    let caller = LlmCaller::new(Arc::new(registry), Arc::new(StaticSecrets::new()), Strategy::RoundRobin);

    // 1. Overhead per tool round trip, one step at a time.
    let (w1, w5) = (work(1), work(5));
    for _ in 0..3 {
        one(&caller, &w1).await;
        one(&caller, &w5).await;
    }
    let (mut o1, mut o5, mut per) = (Vec::new(), Vec::new(), Vec::new());
    let (mut model, mut tool) = (Vec::new(), Vec::new());
    for _ in 0..args.samples {
        let (wall, t) = one(&caller, &w1).await;
        o1.push(overhead_ms(wall, &t));
        let (wall, t) = one(&caller, &w5).await;
        o5.push(overhead_ms(wall, &t));
        let trips = round_trips_ms(&t);
        assert_eq!(trips.len(), 5, "a step of 5 round trips: {t}");
        per.extend(trips);
        for (kind, _, took) in timed(&t) {
            if kind == "call" { model.push(took) } else { tool.push(took) }
        }
    }
    for v in [&mut o1, &mut o5, &mut per, &mut model, &mut tool] {
        v.sort_by(f64::total_cmp);
    }
    println!(
        "overhead per tool round trip (ms, {} samples): p50 {:.3}  p99 {:.3}  max {:.3}",
        per.len(),
        quantile(&per, 0.5),
        quantile(&per, 0.99),
        per.last().copied().unwrap_or(0.0),
    );
    println!(
        "step overhead (ms, p50 / p99): 1 round trip {:.3} / {:.3}; 5 round trips {:.3} / {:.3}   [excluded: model HTTP p50 {:.3} ms, MCP tool call p50 {:.3} ms]",
        quantile(&o1, 0.5),
        quantile(&o1, 0.99),
        quantile(&o5, 0.5),
        quantile(&o5, 0.99),
        quantile(&model, 0.5),
        quantile(&tool, 0.5)
    );

    // 2. Memory with N concurrent tool-using steps.
    for s in &stubs {
        s.forget_seen();
    }
    let mut rss = vec![rss_kib()];
    let mut transcript_bytes = 0usize;
    for round in 0..args.rounds {
        let t = Instant::now();
        let results = futures::future::join_all((0..args.steps).map(|_| one(&caller, &w1))).await;
        transcript_bytes = results.iter().map(|(_, t)| t.len()).sum();
        drop(results);
        // The stub keeps every request it saw (whole); that is the bench's memory, not the
        // operator's.
        for s in &stubs {
            s.forget_seen();
        }
        rss.push(rss_kib());
        println!(
            "round {}: {} concurrent tool-using steps in {:.2}s, RSS {} KiB (transcripts of the round: {} KiB; MCP sessions kept: {})",
            round + 1,
            args.steps,
            t.elapsed().as_secs_f64(),
            rss.last().copied().unwrap_or(0),
            transcript_bytes / 1024,
            caller.mcp_sessions().len()
        );
    }
    let growth = rss.last().copied().unwrap_or(0) as i64 - rss.get(1).copied().unwrap_or(0) as i64;
    println!(
        "{}",
        json!({"scenario": "tool_loop", "overhead_p50_ms": quantile(&per, 0.5), "overhead_p99_ms": quantile(&per, 0.99),
               "step_overhead_p50_ms": [quantile(&o1, 0.5), quantile(&o5, 0.5)],
               "steps": args.steps, "rounds": args.rounds, "rss_kib": rss, "rss_growth_after_first_round_kib": growth,
               "transcripts_kib_per_round": transcript_bytes / 1024})
    );
}
