//! End-to-end benchmarks of the operator (not a test: it prints numbers). `make bench` runs it.
//!
//! It starts a real control plane on loopback (etcd, kube-apiserver, kube-controller-manager,
//! the same fixture as the end-to-end tests), installs the Helm chart's RBAC and runs the
//! release build of `volt-operator run` as a separate process under the chart's
//! ServiceAccount (so API Priority and Fairness applies to it as in a cluster). The benchmark
//! plays the kubelet (pod status) and serves OpenAI-compatible replicas and an HTTP endpoint on
//! loopback. For every scenario it prints one JSON line, and a table at the end, with:
//! - the scenario's figures and its goal (from issue 8);
//! - the box's own ceiling measured in the same run: raw ConfigMap creates and patches per
//!   second against the same apiserver, as the same ServiceAccount, and each figure's ratio to
//!   it (this machine is shared and noisy; ratios travel better than absolute numbers);
//! - API requests per step by verb, from the operator's own client metrics;
//! - CPU used (in cores) by the apiserver, etcd, the controller manager, the operator and the
//!   benchmark itself (which includes the kubelet stand-in), to show which side is the limit.
//!
//! ```text
//! make bench                                   # everything, full size
//! cargo run --release --example bench -- --scale 0.1 --only inprocess,pods
//! ```

#[path = "../tests/kit/mod.rs"]
mod kit;
#[path = "bench/shards.rs"]
mod shards;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use volt_operator::api::{RunPhase, WorkflowRun};

use kit::control_plane::{self, ControlPlane};
use kit::kubelet::{self, Kubelet};
use kit::openai::{self, Stub};
use kit::{ChartIdentity, OperatorProcess};

/// Benchmarks of the operator against a real control plane.
#[derive(Parser, Debug)]
struct Args {
    /// Multiply every scenario's size by this (0.1 for a quick look).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Run only these scenarios (comma-separated): inprocess, dispatch, pods, agents, big, loop,
    /// shards, rest.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The operator binary (default: target/release/volt-operator next to this example).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Exit with status 1 if a run of any scenario did not succeed (for a smoke run in CI).
    #[arg(long)]
    check: bool,
    /// Extra arguments for `volt-operator run` (repeatable), e.g. `--operator-arg=--status-flush-interval=0`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
}

const CREATE_CONCURRENCY: usize = 32;

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let bin = args.operator.clone().unwrap_or_else(default_operator);
    if !bin.exists() {
        eprintln!("{} not found: build it first (cargo build --release)", bin.display());
        std::process::exit(2);
    }
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let n = |x: usize| ((x as f64 * args.scale).round() as usize).max(1);

    eprintln!("starting the control plane...");
    let cp = control_plane::shared();
    let admin = cp.client().await;
    let machine = machine();
    eprintln!("machine: {machine}");
    let procs = Procs::find(cp.dir());
    // The chart (no operator pod: replicaCount 0) for its ServiceAccount and RBAC.
    let sa = kit::chart_identity(&admin, "bench", "volt-bench", &["replicaCount=0".into()]).await;
    let sa_client = kit::kube_client(&sa.kubeconfig).await;

    let mut results: Vec<Value> = Vec::new();
    let ceiling = Ceiling::measure(cp, &admin, &sa_client, n(1000)).await;
    eprintln!("ceiling: {:.0} ConfigMap creates/s, {:.0} patches/s", ceiling.creates, ceiling.patches);
    results.push(json!({"scenario": "ceiling", "configmap_creates_per_s": round(ceiling.creates),
                        "configmap_patches_per_s": round(ceiling.patches)}));
    println!("{}", results.last().unwrap_or(&Value::Null));

    let (mut op, ready_in) = start_operator(&bin, &sa.kubeconfig, &args.operator_args).await;
    eprintln!("operator ready in {:.2}s (pid {})", ready_in.as_secs_f64(), op.pid());

    if want("inprocess") {
        let r = inprocess(cp, &admin, &op, &procs, &ceiling, n(500)).await;
        record(&mut results, r);
    }
    if want("dispatch") {
        let r = dispatch_inprocess(cp, &admin, &op, &procs, n(30)).await;
        record(&mut results, r);
        let r = dispatch_pods(cp, &admin, &op, &procs, n(20)).await;
        record(&mut results, r);
    }
    if want("pods") {
        let r = pod_churn(cp, &admin, &op, &procs, &ceiling, n(200)).await;
        record(&mut results, r);
    }
    if want("agents") {
        let r = agents(cp, &admin, &op, &procs, n(2000)).await;
        record(&mut results, r);
    }
    if want("big") {
        let r = big_workflow(cp, &admin, &op, &procs, 2000).await;
        record(&mut results, r);
    }
    if want("loop") {
        // Always 100 iterations (the most a loop has): the size of the run is the figure.
        let r = loop_iterations(cp, &admin, &op, &procs, 100).await;
        record(&mut results, r);
    }
    let rss = rss_of(op.pid());
    results.push(json!({"scenario": "operator_after_load", "rss_mb": round(rss.0), "peak_rss_mb": round(rss.1)}));
    println!("{}", results.last().unwrap_or(&Value::Null));
    op.sigkill().await;
    if want("shards") {
        for r in shards::shards(cp, &admin, &bin, &procs, n(1000), n(30_000)).await {
            record(&mut results, r);
        }
    }
    if want("rest") {
        let r = at_rest(cp, &admin, &bin, &sa, &args.operator_args, &procs, n(10_000), n(1_000)).await;
        record(&mut results, r);
    }
    let again = Ceiling::measure(cp, &admin, &sa_client, n(1000)).await;
    results.push(json!({"scenario": "ceiling_end", "configmap_creates_per_s": round(again.creates),
                        "configmap_patches_per_s": round(again.patches)}));
    println!("{}", results.last().unwrap_or(&Value::Null));
    print_table(&machine, &results);
    let failed: u64 = results.iter().filter_map(|r| r["failed_runs"].as_u64()).sum();
    if args.check && failed > 0 {
        eprintln!("{failed} runs did not succeed");
        std::process::exit(1);
    }
}

/// Prints a scenario's JSON line and keeps it for the table.
fn record(results: &mut Vec<Value>, r: Value) {
    println!("{r}");
    results.push(r);
}

fn default_operator() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/release/examples/bench -> target/release/volt-operator
    exe.parent().and_then(Path::parent).map(|d| d.join("volt-operator")).unwrap_or_default()
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .unwrap_or(0);
    format!("{cpus} cores ({model}), {} GiB", mem / 1024 / 1024)
}

// ---------------------------------------------------------------------------------------------
// Processes and their CPU

/// The control plane's processes, found by their data directory on the command line.
struct Procs {
    by_name: Vec<(&'static str, u32)>,
}

impl Procs {
    fn find(dir: &Path) -> Procs {
        let dir = dir.to_string_lossy().to_string();
        let mut by_name = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if !cmd.contains(&dir) {
                continue;
            }
            let exe = cmd.split_whitespace().next().unwrap_or("");
            for name in ["kube-apiserver", "etcd", "kube-controller-manager"] {
                if exe.ends_with(name) {
                    by_name.push((name, pid));
                }
            }
        }
        Procs { by_name }
    }

    fn sample(&self, operator: u32) -> CpuSample {
        let mut ticks = BTreeMap::new();
        for (name, pid) in &self.by_name {
            ticks.insert(name.to_string(), cpu_ticks(*pid));
        }
        ticks.insert("operator".into(), cpu_ticks(operator));
        ticks.insert("bench".into(), cpu_ticks(std::process::id()));
        CpuSample { at: Instant::now(), ticks }
    }
}

struct CpuSample {
    at: Instant,
    ticks: BTreeMap<String, u64>,
}

impl CpuSample {
    /// Cores used by each process since `self`.
    fn cores_until(&self, later: &CpuSample) -> Value {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let hz = clock_ticks() as f64;
        let mut out = serde_json::Map::new();
        for (name, t) in &later.ticks {
            let before = self.ticks.get(name).copied().unwrap_or(0);
            out.insert(name.clone(), json!(round(t.saturating_sub(before) as f64 / hz / secs)));
        }
        Value::Object(out)
    }
}

fn clock_ticks() -> i64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v } else { 100 }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let get = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(14) + get(15)
}

/// (VmRSS, VmHWM) of a process in MB.
fn rss_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// The box's ceiling

struct Ceiling {
    creates: f64,
    patches: f64,
}

impl Ceiling {
    /// ConfigMap creates, then merge patches, per second, `CREATE_CONCURRENCY` at once, as the
    /// operator's ServiceAccount.
    async fn measure(cp: &ControlPlane, admin: &Client, sa: &Client, count: usize) -> Ceiling {
        let ns = cp.namespace(admin, "ceiling").await;
        let api: Api<ConfigMap> = Api::namespaced(sa.clone(), &ns);
        // Warm up (connections, caches), untimed.
        let warm = cp.namespace(admin, "ceiling-warm").await;
        let warm: Api<ConfigMap> = Api::namespaced(sa.clone(), &warm);
        futures::stream::iter(0..count.min(200))
            .map(|i| {
                let api = warm.clone();
                async move {
                    let cm: ConfigMap =
                        serde_json::from_value(json!({"metadata": {"name": format!("w-{i}")}})).expect("configmap");
                    let _ = api.create(&PostParams::default(), &cm).await;
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let started = Instant::now();
        futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                async move {
                    let cm: ConfigMap =
                        serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}, "data": {"v": "0"}}))
                            .expect("configmap");
                    api.create(&PostParams::default(), &cm).await.expect("create a ConfigMap");
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let creates = count as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.patch(&format!("cm-{i}"), &PatchParams::default(), &Patch::Merge(json!({"data": {"v": "1"}})))
                        .await
                        .expect("patch a ConfigMap");
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let patches = count as f64 / started.elapsed().as_secs_f64();
        Ceiling { creates, patches }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator process

/// `volt-operator run` (`bin`) with the identity of `kubeconfig`, its log appended to
/// `volt-bench-operator-<pid>.log` in the temp dir; once ready, and how long that took.
async fn start_operator(bin: &Path, kubeconfig: &Path, extra: &[String]) -> (OperatorProcess, Duration) {
    let log = std::env::temp_dir().join(format!("volt-bench-operator-{}.log", std::process::id()));
    let mut op = OperatorProcess::builder(kubeconfig, log)
        .bin(bin)
        .args(["--log-level", &std::env::var("VOLT_BENCH_LOG").unwrap_or_else(|_| "warn".into())])
        .args(extra)
        .append_log()
        .http_timeout(Duration::from_secs(30))
        .spawn();
    let ready_in = op.wait_ready(Duration::from_secs(120)).await;
    (op, ready_in)
}

/// `volt_kube_api_requests_total` by verb.
async fn requests(op: &OperatorProcess) -> BTreeMap<String, f64> {
    op.metric_by_label("volt_kube_api_requests_total", "verb").await
}

/// Request counts once the operator has stopped sending writes (its status writes and Events
/// lag the runs by up to the flush interval and event window), at most 15 s.
async fn settled_requests(op: &OperatorProcess) -> BTreeMap<String, f64> {
    let writes = |m: &BTreeMap<String, f64>| {
        ["create", "patch", "update", "delete"].iter().map(|v| m.get(*v).copied().unwrap_or(0.0)).sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = requests(op).await;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = requests(op).await;
        if writes(&now) == writes(&last) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Per-verb request counts between two snapshots, divided by `steps`; and writes per step.
fn per_step(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, steps: usize) -> (Value, f64, f64) {
    let mut by_verb = serde_json::Map::new();
    let mut writes = 0.0;
    for (verb, v) in after {
        let d = v - before.get(verb).copied().unwrap_or(0.0);
        if d > 0.0 {
            by_verb.insert(verb.clone(), json!(round(d / steps as f64)));
        }
        if matches!(verb.as_str(), "create" | "patch" | "update" | "delete") {
            writes += d;
        }
    }
    (Value::Object(by_verb), writes / steps as f64, writes)
}

// ---------------------------------------------------------------------------------------------
// Objects

fn run_ar() -> ApiResource {
    ApiResource::erase::<WorkflowRun>(&())
}

fn wf_ar() -> ApiResource {
    ApiResource::erase::<volt_operator::api::Workflow>(&())
}

async fn create_all(client: &Client, ns: &str, ar: &ApiResource, objects: Vec<Value>) {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    futures::stream::iter(objects)
        .map(|obj| {
            let api = api.clone();
            async move {
                let o: DynamicObject = serde_json::from_value(obj).expect("object");
                let mut tries = 0;
                loop {
                    match api.create(&PostParams::default(), &o).await {
                        Ok(_) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            eprintln!("create {}: {e}; retrying", o.name_any());
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("create {}: {e}", o.name_any()),
                    }
                }
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
}

fn workflow(name: &str, steps: Vec<Value>) -> Value {
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": name}, "spec": {"steps": steps}})
}

fn run_of(name: &str, workflow: &str) -> Value {
    json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
           "spec": {"workflowRef": {"name": workflow}}})
}

/// A chain of `n` steps made by `step(i, deps)`.
fn chain(n: usize, step: impl Fn(usize, Vec<String>) -> Value) -> Vec<Value> {
    (0..n).map(|i| step(i, if i == 0 { vec![] } else { vec![format!("s{}", i - 1)] })).collect()
}

/// One root, `n - 2` branches, one join: `n` steps.
fn fan(n: usize, step: impl Fn(usize, Vec<String>) -> Value) -> Vec<Value> {
    let mut steps = vec![step(0, vec![])];
    for i in 1..n - 1 {
        steps.push(step(i, vec!["s0".into()]));
    }
    steps.push(step(n - 1, (1..n - 1).map(|i| format!("s{i}")).collect()));
    steps
}

fn template_step(i: usize, deps: Vec<String>) -> Value {
    let text = if deps.is_empty() { "0".to_string() } else { format!("{{{{ steps.{}.output }}}}+{i}", deps[0]) };
    json!({"id": format!("s{i}"), "dependsOn": deps, "template": text})
}

fn container_step(i: usize, deps: Vec<String>) -> Value {
    json!({"id": format!("s{i}"), "dependsOn": deps,
           "container": {"image": "busybox", "command": ["true"], "env": [{"name": "OUTPUT", "value": format!("out-{i}")}]}})
}

/// Waits until `count` runs of `ns` are finished; the time it took since `since` and the runs.
async fn wait_runs(
    client: &Client,
    ns: &str,
    count: usize,
    since: Instant,
    timeout: Duration,
) -> (Duration, Vec<WorkflowRun>) {
    let api: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let mut finished: HashMap<String, WorkflowRun> = HashMap::new();
    let mut stream = std::pin::pin!(watcher::watcher(api.clone(), watcher::Config::default()));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.try_next()).await {
            Ok(Ok(Some(ev))) => ev,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                eprintln!("watch: {e}");
                continue;
            }
            Err(_) => {
                let phases = api.list(&ListParams::default()).await.map(|l| {
                    let mut m: BTreeMap<String, usize> = BTreeMap::new();
                    for r in l.items {
                        *m.entry(r.status.map(|s| s.phase.as_str().to_string()).unwrap_or_default()).or_default() += 1;
                    }
                    m
                });
                panic!("{ns}: only {} of {count} runs finished in {timeout:?}: {phases:?}", finished.len());
            }
        };
        if let watcher::Event::Apply(r) | watcher::Event::InitApply(r) = next
            && r.status.as_ref().is_some_and(|s| s.phase.is_finished())
        {
            finished.insert(r.name_any(), r);
            if finished.len() >= count {
                break;
            }
        }
    }
    let took = since.elapsed();
    (took, finished.into_values().collect())
}

fn check_succeeded(runs: &[WorkflowRun]) -> usize {
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| r.status.as_ref().map(|s| s.phase) != Some(RunPhase::Succeeded))
        .map(|r| format!("{}: {}", r.name_any(), r.status.as_ref().map(|s| s.message.as_str()).unwrap_or("")))
        .collect();
    if !failed.is_empty() {
        eprintln!("{} runs did not succeed, e.g. {:?}", failed.len(), &failed[..failed.len().min(3)]);
    }
    failed.len()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// 1 + 3: `runs` runs of 10 template steps (half chains, half fan-outs) created at once.
async fn inprocess(
    cp: &ControlPlane,
    admin: &Client,
    op: &OperatorProcess,
    procs: &Procs,
    ceiling: &Ceiling,
    runs: usize,
) -> Value {
    let ns = cp.namespace(admin, "bench-inproc").await;
    create_all(
        admin,
        &ns,
        &wf_ar(),
        vec![workflow("chain", chain(10, template_step)), workflow("fan", fan(10, template_step))],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let objects: Vec<Value> =
        (0..runs).map(|i| run_of(&format!("r{i}"), if i % 2 == 0 { "chain" } else { "fan" })).collect();
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    create_all(admin, &ns, &run_ar(), objects).await;
    let created_in = started.elapsed();
    let (took, done) = wait_runs(admin, &ns, runs, started, Duration::from_secs(600)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let steps = runs * 10;
    let (by_verb, writes_per_step, _) = per_step(&before, &settled_requests(op).await, steps);
    let rate = steps as f64 / took.as_secs_f64();
    json!({"scenario": "inprocess_throughput", "runs": runs, "steps": steps, "failed_runs": check_succeeded(&done),
           "seconds": round(took.as_secs_f64()), "create_seconds": round(created_in.as_secs_f64()),
           "steps_per_s": round(rate), "goal_steps_per_s": 300, "met": rate >= 300.0,
           "ratio_to_configmap_creates": round(rate / ceiling.creates),
           "writes_per_step": round(writes_per_step), "goal_writes_per_step": 0.5, "writes_met": writes_per_step <= 0.5,
           "requests_per_step": by_verb, "cpu_cores": cpu})
}

/// (run, index) -> (arrived, answered)
type HopTimes = Arc<Mutex<HashMap<(String, usize), (Instant, Instant)>>>;

/// An HTTP endpoint that records when each request arrived and when it was answered.
struct Hops {
    addr: SocketAddr,
    seen: HopTimes,
}

async fn hops_server() -> Hops {
    use axum::extract::{Query, State};
    let seen: HopTimes = Arc::default();
    async fn hop(State(seen): State<HopTimes>, Query(q): Query<HashMap<String, String>>) -> &'static str {
        let arrived = Instant::now();
        let run = q.get("run").cloned().unwrap_or_default();
        let i = q.get("i").and_then(|v| v.parse().ok()).unwrap_or(0);
        seen.lock().unwrap_or_else(|p| p.into_inner()).insert((run, i), (arrived, Instant::now()));
        "ok"
    }
    let app = axum::Router::new().route("/hop", axum::routing::get(hop)).with_state(seen.clone());
    let addr = kit::serve_on(openai::next_ip(), app).await;
    Hops { addr, seen }
}

/// 2a: in-process dispatch latency: chains of 10 HTTP steps; from the answer to step i to the
/// request of step i+1, as the endpoint sees them.
async fn dispatch_inprocess(
    cp: &ControlPlane,
    admin: &Client,
    op: &OperatorProcess,
    procs: &Procs,
    runs: usize,
) -> Value {
    let ns = cp.namespace(admin, "bench-hops").await;
    let hops = hops_server().await;
    let addr = hops.addr;
    let steps = chain(10, |i, deps| {
        json!({"id": format!("s{i}"), "dependsOn": deps,
               "http": {"url": format!("http://{addr}/hop?run={{{{ run.name }}}}&i={i}"), "method": "GET"}})
    });
    create_all(admin, &ns, &wf_ar(), vec![workflow("hops", steps)]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    create_all(admin, &ns, &run_ar(), (0..runs).map(|i| run_of(&format!("h{i}"), "hops")).collect()).await;
    let (took, done) = wait_runs(admin, &ns, runs, started, Duration::from_secs(300)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let (by_verb, writes_per_step, _) = per_step(&before, &settled_requests(op).await, runs * 10);
    let seen = hops.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut lat: Vec<f64> = Vec::new();
    for r in 0..runs {
        for i in 0..9 {
            let (Some(a), Some(b)) = (seen.get(&(format!("h{r}"), i)), seen.get(&(format!("h{r}"), i + 1))) else {
                continue;
            };
            lat.push(b.0.saturating_duration_since(a.1).as_secs_f64() * 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    json!({"scenario": "dispatch_inprocess", "runs": runs, "samples": lat.len(), "failed_runs": check_succeeded(&done),
           "seconds": round(took.as_secs_f64()),
           "p50_ms": round(p50), "p99_ms": round(p99), "max_ms": round(lat.last().copied().unwrap_or(f64::NAN)),
           "goal_p50_ms": 5, "goal_p99_ms": 50, "met": p50 < 5.0 && p99 < 50.0,
           "writes_per_step": round(writes_per_step), "requests_per_step": by_verb, "cpu_cores": cpu})
}

/// When each pod was first seen created and first seen Succeeded, by a watch.
#[derive(Default)]
struct PodTimes {
    created: HashMap<String, Instant>,
    succeeded: HashMap<String, Instant>,
}

fn watch_pods(client: &Client, ns: &str) -> (Arc<Mutex<PodTimes>>, tokio::task::JoinHandle<()>) {
    let times: Arc<Mutex<PodTimes>> = Arc::default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let t = times.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
        while let Some(ev) = stream.next().await {
            let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev else { continue };
            let now = Instant::now();
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.created.entry(p.name_any()).or_insert(now);
            if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded") {
                t.succeeded.entry(p.name_any()).or_insert(now);
            }
        }
    });
    (times, task)
}

/// The kubelet stand-in for step pods: Succeeded at once with their `OUTPUT`.
fn pod_kubelet(client: &Client, ns: &str) -> Kubelet {
    Kubelet::start(client.clone(), ns, Some("volt.dev/run".into()), kubelet::scripted(|_| Duration::ZERO))
}

/// 2b: pod dispatch latency: chains of 10 container steps; from a pod seen Succeeded to the
/// next step's pod seen created.
async fn dispatch_pods(cp: &ControlPlane, admin: &Client, op: &OperatorProcess, procs: &Procs, runs: usize) -> Value {
    let ns = cp.namespace(admin, "bench-podlat").await;
    let (times, watch) = watch_pods(admin, &ns);
    let _kubelet = pod_kubelet(admin, &ns);
    create_all(admin, &ns, &wf_ar(), vec![workflow("pods", chain(10, container_step))]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    create_all(admin, &ns, &run_ar(), (0..runs).map(|i| run_of(&format!("p{i}"), "pods")).collect()).await;
    let (took, done) = wait_runs(admin, &ns, runs, started, Duration::from_secs(300)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let (by_verb, writes_per_step, writes) = per_step(&before, &settled_requests(op).await, runs * 10);
    watch.abort();
    let t = times.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat = Vec::new();
    for r in 0..runs {
        for i in 0..9 {
            let prev = volt_operator::naming::pod_name(&format!("p{r}"), &format!("s{i}"), 1);
            let next = volt_operator::naming::pod_name(&format!("p{r}"), &format!("s{}", i + 1), 1);
            if let (Some(a), Some(b)) = (t.succeeded.get(&prev), t.created.get(&next)) {
                lat.push(b.saturating_duration_since(*a).as_secs_f64() * 1000.0);
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let steps = runs * 10;
    json!({"scenario": "dispatch_pods", "runs": runs, "samples": lat.len(), "failed_runs": check_succeeded(&done),
           "seconds": round(took.as_secs_f64()),
           "p50_ms": round(p50), "p99_ms": round(p99), "max_ms": round(lat.last().copied().unwrap_or(f64::NAN)),
           "goal_p50_ms": 50, "goal_p99_ms": 250, "met": p50 < 50.0 && p99 < 250.0,
           "writes_per_step": round(writes_per_step),
           "writes_per_step_besides_pod": round((writes - steps as f64) / steps as f64),
           "requests_per_step": by_verb, "cpu_cores": cpu})
}

/// 4 + 3: `runs` runs of 10 container steps (half chains, half fan-outs), created at once.
async fn pod_churn(
    cp: &ControlPlane,
    admin: &Client,
    op: &OperatorProcess,
    procs: &Procs,
    ceiling: &Ceiling,
    runs: usize,
) -> Value {
    let ns = cp.namespace(admin, "bench-pods").await;
    let (times, watch) = watch_pods(admin, &ns);
    let _kubelet = pod_kubelet(admin, &ns);
    create_all(
        admin,
        &ns,
        &wf_ar(),
        vec![workflow("chain", chain(10, container_step)), workflow("fan", fan(10, container_step))],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    let objects = (0..runs).map(|i| run_of(&format!("c{i}"), if i % 2 == 0 { "chain" } else { "fan" })).collect();
    create_all(admin, &ns, &run_ar(), objects).await;
    let (took, done) = wait_runs(admin, &ns, runs, started, Duration::from_secs(900)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let steps = runs * 10;
    let (by_verb, writes_per_step, writes) = per_step(&before, &settled_requests(op).await, steps);
    watch.abort();
    let t = times.lock().unwrap_or_else(|p| p.into_inner());
    let pods = t.created.len();
    let first = t.created.values().min().copied().unwrap_or(started);
    let last = t.created.values().max().copied().unwrap_or(started);
    let pods_per_s = pods as f64 / last.duration_since(first).as_secs_f64().max(1e-3);
    let besides = (writes - pods as f64) / steps as f64;
    json!({"scenario": "pod_churn", "runs": runs, "steps": steps, "pods": pods, "failed_runs": check_succeeded(&done),
           "seconds": round(took.as_secs_f64()), "pods_per_s": round(pods_per_s),
           "ratio_to_configmap_creates": round(pods_per_s / ceiling.creates),
           "writes_per_step": round(writes_per_step), "writes_per_step_besides_pod": round(besides),
           "goal_writes_per_step_besides_pod": 1, "writes_met": besides <= 1.0,
           "requests_per_step": by_verb, "cpu_cores": cpu})
}

/// 5: `calls` agent calls through the balancer to 4 replicas (50 ms, maxConcurrency 8 each).
async fn agents(cp: &ControlPlane, admin: &Client, op: &OperatorProcess, procs: &Procs, calls: usize) -> Value {
    let ns = cp.namespace(admin, "bench-agents").await;
    let latency = Duration::from_millis(50);
    let stubs = Stub::group(&[("llm-0", latency), ("llm-1", latency), ("llm-2", latency), ("llm-3", latency)]).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    for stub in &stubs {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": stub.name(), "labels": {"app": "llm"}},
            "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.6.0"}]}
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod).await.expect("create a replica pod");
        kubelet::set_running(admin, &ns, stub.name(), &stub.ip().to_string(), true).await.expect("running");
    }
    let agent = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Agent", "metadata": {"name": "llm"},
        "spec": {"model": "stub-model", "maxConcurrency": 8, "timeoutSeconds": 30,
                 "replicas": {"selector": {"matchLabels": {"app": "llm"}}, "port": stubs[0].port(), "path": "/v1"}}});
    create_all(admin, &ns, &ApiResource::erase::<volt_operator::api::Agent>(&()), vec![agent]).await;
    let agents: Api<volt_operator::api::Agent> = Api::namespaced(admin.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    while agents.get("llm").await.ok().and_then(|a| a.status).is_none_or(|s| s.replicas.healthy != 4) {
        assert!(Instant::now() < deadline, "the agent's 4 replicas were not healthy in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runs = 20.min(calls);
    let per_run = calls / runs;
    let list = serde_json::to_string(&(0..per_run).collect::<Vec<_>>()).expect("json");
    let wf = workflow(
        "ask",
        vec![
            json!({"id": "items", "template": list}),
            json!({"id": "ask", "dependsOn": ["items"], "forEach": "{{ steps.items.json }}", "maxParallel": per_run,
                   "agent": {"ref": "llm", "prompt": "item {{ item }}"}}),
        ],
    );
    create_all(admin, &ns, &wf_ar(), vec![wf]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    create_all(admin, &ns, &run_ar(), (0..runs).map(|i| run_of(&format!("a{i}"), "ask")).collect()).await;
    let (took, done) = wait_runs(admin, &ns, runs, started, Duration::from_secs(600)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let total = runs * per_run;
    let (by_verb, writes_per_step, _) = per_step(&before, &settled_requests(op).await, total);
    let seen: Vec<Instant> = stubs.iter().flat_map(|s| s.seen().into_iter().map(|r| r.at)).collect();
    let first = seen.iter().min().copied().unwrap_or(started);
    let last = seen.iter().max().copied().unwrap_or(started) + latency;
    let window = last.duration_since(first).as_secs_f64();
    let ideal = 4.0 * 8.0 / latency.as_secs_f64();
    let rate = total as f64 / window;
    let counts: Vec<usize> = stubs.iter().map(|s| s.answered()).collect();
    let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
    let sd = (counts.iter().map(|c| (*c as f64 - mean).powi(2)).sum::<f64>() / counts.len() as f64).sqrt();
    let max_in_flight: Vec<usize> = stubs.iter().map(|s| s.max_in_flight()).collect();
    json!({"scenario": "agent_calls", "calls": total, "failed_runs": check_succeeded(&done),
           "seconds_end_to_end": round(took.as_secs_f64()), "seconds_calling": round(window),
           "calls_per_s": round(rate), "ideal_calls_per_s": ideal, "fraction_of_ideal": round(rate / ideal),
           "goal_fraction": 0.9, "met": rate / ideal >= 0.9,
           "calls_per_replica": counts, "spread_cv": round(sd / mean.max(1.0)), "max_in_flight_per_replica": max_in_flight,
           "writes_per_step": round(writes_per_step), "requests_per_step": by_verb, "cpu_cores": cpu})
}

/// 7: one run of `steps` template steps.
async fn big_workflow(cp: &ControlPlane, admin: &Client, op: &OperatorProcess, procs: &Procs, steps: usize) -> Value {
    let ns = cp.namespace(admin, "bench-big").await;
    let list: Vec<Value> = (0..steps)
        .map(|i| {
            let mut deps: Vec<String> = [i / 2, i / 3].iter().filter(|&&d| d < i).map(|d| format!("s{d}")).collect();
            deps.dedup();
            json!({"id": format!("s{i}"), "dependsOn": deps, "template": format!("{i}")})
        })
        .collect();
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    let run = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "big"},
                     "spec": {"workflow": {"steps": list}}});
    create_all(admin, &ns, &run_ar(), vec![run]).await;
    let (took, done) = wait_runs(admin, &ns, 1, started, Duration::from_secs(300)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let (by_verb, _, writes) = per_step(&before, &settled_requests(op).await, steps);
    let api: Api<WorkflowRun> = Api::namespaced(admin.clone(), &ns);
    let size = serde_json::to_vec(&api.get("big").await.expect("the run")).map(|v| v.len()).unwrap_or(0);
    let progress = done.first().and_then(|r| r.status.as_ref()).map(|s| s.progress.clone()).unwrap_or_default();
    json!({"scenario": "big_workflow", "steps": steps, "failed_runs": check_succeeded(&done), "progress": progress,
           "seconds": round(took.as_secs_f64()), "object_bytes": size, "goal_bytes": 1_048_576,
           "met": size < 1_048_576, "writes": writes, "requests_per_step": by_verb, "cpu_cores": cpu})
}

/// Issue 14: a loop of `iterations` iterations of two template steps (each output ~500 bytes):
/// the per-iteration overhead, API writes per iteration (status patches; Events are creates)
/// and the size of the finished run object, whose status has a row per step per iteration.
async fn loop_iterations(
    cp: &ControlPlane,
    admin: &Client,
    op: &OperatorProcess,
    procs: &Procs,
    iterations: usize,
) -> Value {
    let ns = cp.namespace(admin, "bench-loop").await;
    let filler = "x".repeat(480);
    let body = json!([
        {"id": "work", "template": format!("iteration {{{{ loop.iteration }}}} {filler}")},
        {"id": "check", "dependsOn": ["work"], "template": "{{ loop.iteration }}"}
    ]);
    let until = format!("steps.check.output == '{iterations}'");
    let run = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "loop"},
                     "spec": {"workflow": {"steps": [{"id": "l", "loop": {"maxIterations": iterations,
                              "until": until, "steps": body}}]}}});
    let before = settled_requests(op).await;
    let cpu = procs.sample(op.pid());
    let started = Instant::now();
    create_all(admin, &ns, &run_ar(), vec![run]).await;
    let (took, done) = wait_runs(admin, &ns, 1, started, Duration::from_secs(300)).await;
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let (by_verb, writes_per_iteration, writes) = per_step(&before, &settled_requests(op).await, iterations);
    let api: Api<WorkflowRun> = Api::namespaced(admin.clone(), &ns);
    let size = serde_json::to_vec(&api.get("loop").await.expect("the run")).map(|v| v.len()).unwrap_or(0);
    let done_iterations =
        done.first().and_then(|r| r.status.as_ref()).and_then(|s| s.steps.get("l")).and_then(|r| r.iterations);
    let per_iteration_ms = took.as_secs_f64() * 1000.0 / iterations as f64;
    json!({"scenario": "loop_iterations", "iterations": iterations, "done_iterations": done_iterations,
           "failed_runs": check_succeeded(&done), "seconds": round(took.as_secs_f64()),
           "ms_per_iteration": round(per_iteration_ms), "goal_ms_per_iteration": 2.0,
           "writes": writes, "writes_per_iteration": round(writes_per_iteration),
           "requests_per_iteration": by_verb, "object_bytes": size, "goal_bytes": 524_288,
           "met": per_iteration_ms < 2.0 && size < 524_288, "cpu_cores": cpu})
}

/// 6: `runs` finished WorkflowRuns and `workflows` Workflows at rest; a fresh operator's time to
/// Ready and its memory.
#[allow(clippy::too_many_arguments)]
async fn at_rest(
    cp: &ControlPlane,
    admin: &Client,
    bin: &Path,
    sa: &ChartIdentity,
    extra: &[String],
    procs: &Procs,
    runs: usize,
    workflows: usize,
) -> Value {
    let ns = cp.namespace(admin, "bench-rest").await;
    let steps = chain(10, template_step);
    let spec = json!({"steps": steps});
    let started = Instant::now();
    create_all(admin, &ns, &wf_ar(), (0..workflows).map(|i| workflow(&format!("w{i}"), steps.clone())).collect()).await;
    create_all(
        admin,
        &ns,
        &run_ar(),
        (0..runs)
            .map(|i| {
                // As the operator leaves a finished run: labelled volt.dev/finished.
                let mut r = run_of(&format!("r{i}"), &format!("w{}", i % workflows));
                r["metadata"]["labels"] = json!({"volt.dev/finished": "Succeeded"});
                r
            })
            .collect(),
    )
    .await;
    // Their status, as a finished run of this workflow has it.
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &run_ar());
    let now = jiff::Timestamp::now().to_string();
    futures::stream::iter(0..runs)
        .map(|i| {
            let api = api.clone();
            let spec = spec.clone();
            let now = now.clone();
            async move {
                let rows: serde_json::Map<String, Value> = (0..10)
                    .map(|s| {
                        (format!("s{s}"), json!({"phase": "Succeeded", "attempts": 1, "output": format!("{s}"),
                                                 "startedAt": now, "finishedAt": now}))
                    })
                    .collect();
                let status = json!({"status": {"phase": "Succeeded", "progress": "10/10", "message": "run succeeded",
                    "startedAt": now, "finishedAt": now, "workflowName": format!("w{}", i % workflows),
                    "workflow": spec, "steps": rows,
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded", "message": "run succeeded",
                                    "lastTransitionTime": now}]}});
                api.patch_status(&format!("r{i}"), &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .unwrap_or_else(|e| panic!("status of r{i}: {e}"));
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let loaded_in = started.elapsed();
    eprintln!("{runs} finished runs and {workflows} workflows created in {:.1}s", loaded_in.as_secs_f64());
    // A first start writes what an operator writes once (the Workflows' status); the
    // measured start is the next one, as after an upgrade or a crash.
    let (mut first, first_ready) = start_operator(bin, &sa.kubeconfig, extra).await;
    // Until it has written all of it (settled: no write for 1.5 s), at most 3 minutes.
    for _ in 0..12 {
        let before = requests(&first).await;
        let after = settled_requests(&first).await;
        if before == after {
            break;
        }
    }
    first.sigkill().await;
    let cpu = procs.sample(0);
    let (mut op, ready) = start_operator(bin, &sa.kubeconfig, extra).await;
    let rss_ready = rss_of(op.pid());
    let before = requests(&op).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = rss_of(op.pid());
    let after = requests(&op).await;
    let (by_verb, _, writes_at_rest) = per_step(&before, &after, 1);
    let cpu = cpu.cores_until(&procs.sample(op.pid()));
    let list: Api<WorkflowRun> = Api::namespaced(admin.clone(), &ns);
    let present = list.list_metadata(&ListParams::default()).await.map(|l| l.items.len()).unwrap_or(0);
    op.sigkill().await;
    json!({"scenario": "at_rest", "runs": present, "workflows": workflows, "load_seconds": round(loaded_in.as_secs_f64()),
           "ready_seconds": round(ready.as_secs_f64()), "goal_ready_seconds": 10,
           "first_start_ready_seconds": round(first_ready.as_secs_f64()),
           "rss_mb_at_ready": round(rss_ready.0), "rss_mb_after_10s": round(rss.0), "peak_rss_mb": round(rss.1),
           "goal_rss_mb": 150, "met": ready.as_secs_f64() < 10.0 && rss.1 < 150.0,
           "requests_in_10s_after_ready": by_verb, "writes_in_10s_after_ready": writes_at_rest, "cpu_cores": cpu})
}

// ---------------------------------------------------------------------------------------------
// The table

fn print_table(machine: &str, results: &[Value]) {
    let get = |s: &str| results.iter().find(|r| r["scenario"] == s);
    let f = |v: &Value| match v {
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => {
            if *b {
                "yes".into()
            } else {
                "NO".into()
            }
        }
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!();
    println!("volt-operator benchmarks on {machine}");
    println!("{:<34} {:>14} {:>14} {:>6}", "figure", "measured", "goal", "met");
    let row = |name: &str, v: &Value, goal: &str, met: &Value| {
        println!("{name:<34} {:>14} {goal:>14} {:>6}", f(v), f(met));
    };
    if let Some(c) = get("ceiling") {
        row("ConfigMap creates/s (ceiling)", &c["configmap_creates_per_s"], "", &Value::Null);
        row("ConfigMap patches/s (ceiling)", &c["configmap_patches_per_s"], "", &Value::Null);
    }
    if let Some(r) = get("inprocess_throughput") {
        row("in-process steps/s", &r["steps_per_s"], ">= 300", &r["met"]);
        row("  ratio to ConfigMap creates/s", &r["ratio_to_configmap_creates"], "", &Value::Null);
        row("  API writes per in-process step", &r["writes_per_step"], "<= 0.5", &r["writes_met"]);
    }
    if let Some(r) = get("dispatch_inprocess") {
        row("in-process dispatch p50 ms", &r["p50_ms"], "< 5", &r["met"]);
        row("in-process dispatch p99 ms", &r["p99_ms"], "< 50", &r["met"]);
    }
    if let Some(r) = get("dispatch_pods") {
        row("pod dispatch p50 ms", &r["p50_ms"], "< 50", &r["met"]);
        row("pod dispatch p99 ms", &r["p99_ms"], "< 250", &r["met"]);
    }
    if let Some(r) = get("pod_churn") {
        row("pods created/s", &r["pods_per_s"], "", &Value::Null);
        row("  2,000 pod steps, seconds", &r["seconds"], "", &Value::Null);
        row("  API writes per pod step besides pod", &r["writes_per_step_besides_pod"], "<= 1", &r["writes_met"]);
    }
    if let Some(r) = get("agent_calls") {
        row("agent calls/s", &r["calls_per_s"], "", &Value::Null);
        row("  fraction of ideal (640/s)", &r["fraction_of_ideal"], ">= 0.9", &r["met"]);
        row("  spread (CV of calls per replica)", &r["spread_cv"], "", &Value::Null);
    }
    if let Some(r) = get("loop_iterations") {
        row("loop: ms per iteration", &r["ms_per_iteration"], "< 2", &Value::Null);
        row("loop: API writes per iteration", &r["writes_per_iteration"], "<= 1 (status)", &Value::Null);
        row("loop: 100-iteration run bytes", &r["object_bytes"], "< 524288", &r["met"]);
    }
    if let Some(r) = get("big_workflow") {
        row("2,000-step run object bytes", &r["object_bytes"], "< 1048576", &r["met"]);
        row("  seconds to finish", &r["seconds"], "", &Value::Null);
    }
    if let Some(r) = get("at_rest") {
        row("Ready with 10k runs, seconds", &r["ready_seconds"], "< 10", &r["met"]);
        row("  peak RSS MB", &r["peak_rss_mb"], "< 150", &r["met"]);
    }
    if let Some(r) = get("operator_after_load") {
        row("operator RSS MB after the load", &r["rss_mb"], "", &Value::Null);
    }
}
