//! Scale-out (`--shards`): runs and in-process calls per second with 1 replica and with 3
//! (each under the chart's ServiceAccount), the operators' CPU beside the API server's, the
//! time from a replica's death to its shard's runs moving again, and each replica's memory
//! with many finished runs split three ways.

use super::*;

const SHARDS: usize = 3;
/// In-process calls (HTTP steps) per run.
const CALLS: usize = 5;

/// CPU seconds of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    cpu_ticks(pid) as f64 / clock_ticks() as f64
}

/// An operator process as `sa` named `name`; with shards on Leases named `lease` when `sharded`.
async fn start(bin: &Path, sa: &ChartIdentity, lease: &str, name: &str, sharded: bool) -> OperatorProcess {
    let mut extra: Vec<String> = vec!["--max-concurrent-runs".into(), "0".into()];
    if sharded {
        extra.extend(["--shards".into(), SHARDS.to_string(), "--lease-namespace".into(), LEASE_NS.into()]);
        extra.extend(["--lease-name".into(), lease.into(), "--lease-duration".into(), "6".into()]);
        extra.extend(["--lease-grace".into(), "2".into()]);
    }
    let log = std::env::temp_dir().join(format!("volt-bench-shards-{}-{name}.log", std::process::id()));
    let mut op = OperatorProcess::builder(&sa.kubeconfig, log)
        .name(name)
        .bin(bin)
        .args(["--log-level", "warn"])
        .args(&extra)
        .env("POD_NAME", name)
        .http_timeout(Duration::from_secs(30))
        .spawn();
    op.wait_ready(Duration::from_secs(120)).await;
    op
}

/// Waits (at most a minute) until every process holds a shard.
async fn spread(ops: &[OperatorProcess]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let mut all = true;
        for op in ops {
            all &= op.metric("volt_shards_owned").await >= 1.0;
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("shards: not every replica holds a shard after a minute");
}

const LEASE_NS: &str = "volt-bench-shards";

/// The scenarios: throughput with 1 and 3 replicas, failover, memory at rest.
pub async fn shards(
    cp: &ControlPlane,
    admin: &Client,
    bin: &Path,
    procs: &Procs,
    runs: usize,
    resting: usize,
) -> Vec<Value> {
    let sa = kit::chart_identity(
        admin,
        "bench-shards",
        LEASE_NS,
        &[format!("sharding.shards={SHARDS}"), "sharding.replicas=0".into()],
    )
    .await;
    let server = hops_server().await;
    let addr = server.addr;
    let steps = chain(CALLS, |i, deps| {
        json!({"id": format!("s{i}"), "dependsOn": deps,
               "http": {"url": format!("http://{addr}/hop?run={{{{ run.name }}}}&i={i}"), "method": "GET"}})
    });
    let mut out = Vec::new();
    let mut survivors = Vec::new();
    let lease = "bench-shards";
    for n in [1, SHARDS] {
        let ns = cp.namespace(admin, &format!("bench-shards-{n}")).await;
        create_all(admin, &ns, &wf_ar(), vec![workflow("calls", steps.clone())]).await;
        let mut ops = Vec::new();
        for i in 0..n {
            ops.push(start(bin, &sa, lease, &format!("b{n}-{i}"), n > 1).await);
        }
        if n > 1 {
            spread(&ops).await;
        }
        let cpu_before: Vec<f64> = ops.iter().map(|o| cpu_secs(o.pid())).collect();
        let box_cpu = procs.sample(ops[0].pid());
        let started = Instant::now();
        create_all(admin, &ns, &run_ar(), (0..runs).map(|i| run_of(&format!("c{i}"), "calls")).collect()).await;
        let (took, done) = wait_runs(admin, &ns, runs, started, Duration::from_secs(900)).await;
        let secs = took.as_secs_f64().max(1e-3);
        let cpu: Vec<f64> = ops.iter().zip(&cpu_before).map(|(o, b)| round((cpu_secs(o.pid()) - b) / secs)).collect();
        let box_cpu = box_cpu.cores_until(&procs.sample(ops[0].pid()));
        out.push(json!({"scenario": format!("shards_throughput_{n}_replicas"), "replicas": n, "runs": runs,
                        "failed_runs": check_succeeded(&done), "seconds": round(secs),
                        "runs_per_s": round(runs as f64 / secs), "calls_per_s": round((runs * CALLS) as f64 / secs),
                        "operator_cpu_cores": cpu, "cpu_cores": box_cpu}));
        if n == 1 {
            for op in &mut ops {
                op.sigkill().await;
            }
        } else {
            survivors = ops;
        }
    }

    // Failover: kill a replica while runs are under way; the time until its shard is held again.
    let ns = cp.namespace(admin, "bench-failover").await;
    create_all(admin, &ns, &wf_ar(), vec![workflow("calls", steps.clone())]).await;
    create_all(admin, &ns, &run_ar(), (0..runs).map(|i| run_of(&format!("f{i}"), "calls")).collect()).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), LEASE_NS);
    let mut victim = survivors.remove(1);
    let killed = Instant::now();
    victim.sigkill().await;
    let prefix = format!("{}_", victim.name());
    let selector = format!("volt.dev/lease-of={lease},volt.dev/lease-role=shard");
    let mut held_again = None;
    while killed.elapsed() < Duration::from_secs(60) {
        let holders: Vec<String> = match leases.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list.items.into_iter().filter_map(|l| l.spec?.holder_identity).collect(),
            Err(_) => Vec::new(),
        };
        if holders.len() == SHARDS && !holders.iter().any(|h| h.starts_with(&prefix)) {
            held_again = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (all_done, done) = wait_runs(admin, &ns, runs, killed, Duration::from_secs(900)).await;
    let failover = held_again.map(|d| round(d.as_secs_f64()));
    out.push(json!({"scenario": "shards_failover", "lease_seconds": 6, "grace_seconds": 2,
                    "seconds_to_shard_held_again": failover, "goal_seconds": 8,
                    "met": failover.is_some_and(|f| f < 8.0),
                    "seconds_to_all_runs_done": round(all_done.as_secs_f64()), "failed_runs": check_succeeded(&done)}));

    // Memory: many runs split three ways (the two survivors and one that joins).
    survivors.push(start(bin, &sa, lease, "b3-join", true).await);
    spread(&survivors).await;
    let ns = cp.namespace(admin, "bench-resting").await;
    create_all(admin, &ns, &wf_ar(), vec![workflow("one", chain(1, template_step))]).await;
    let started = Instant::now();
    create_all(admin, &ns, &run_ar(), (0..resting).map(|i| run_of(&format!("m{i}"), "one")).collect()).await;
    let (_, done) = wait_runs(admin, &ns, resting, started, Duration::from_secs(1800)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss: Vec<Value> = survivors
        .iter()
        .map(|o| {
            let (now, peak) = rss_of(o.pid());
            json!({"replica": o.name(), "rss_mb": round(now), "peak_rss_mb": round(peak)})
        })
        .collect();
    out.push(
        json!({"scenario": "shards_memory", "runs": resting, "replicas": rss, "failed_runs": check_succeeded(&done)}),
    );
    for op in &mut survivors {
        op.sigkill().await;
    }
    out
}
