//! Scale-out (`--shards`): operator processes under the chart's rights split the runs by shard;
//! one is SIGKILLed and another joins mid-way, then one is stopped and another started (a
//! rolling update); every run finishes, no step pod is created twice
//! for one attempt, and no in-process step is called by two replicas at once. A Budget counts
//! the calls of every replica and refuses on every shard once they have spent it together; an
//! Agent's rate limit holds for the replicas together. Sharding turned on under runs that are
//! under way takes them over.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use volt_operator::api::{Budget, RunPhase, WorkflowRun, condition_status};

use crate::kit::control_plane;
use crate::kit::openai::Stub;
use crate::kit::{
    self, LogDir, OperatorProcess, apply, container, endpoint_agent, helm_install_for_operator_user, wait_for,
    wait_until,
};

const SHARDS: u32 = 3;
/// Runs of the first part (a replica killed, another joining).
const RUNS: usize = 200;
/// Runs of the second part (a rolling update: a replica stopped, another started).
const MORE: usize = 100;
const ALL: usize = RUNS + MORE;
const LONG: Duration = Duration::from_secs(600);

/// An operator process with `--shards`, identity `name`, on the Leases of `lease` in `ns`.
fn replica(name: &str, ns: &str, lease: &str, dir: &LogDir) -> OperatorProcess {
    OperatorProcess::builder(control_plane::shared().operator_kubeconfig_path(), dir.join(format!("{name}.log")))
        .name(name)
        .namespaces(&[ns])
        .args(["--shards", &SHARDS.to_string(), "--lease-namespace", ns, "--lease-name", lease])
        .args(["--lease-duration", "6", "--lease-grace", "2", "--max-concurrent-runs", "0"])
        .args(["--health-check-interval", "1", "--log-format", "text", "--log-level", "info"])
        .args(["--budget-flush-interval", "1"])
        .env("POD_NAME", name)
        .spawn()
}

/// A run of one of four shapes: agent calls, a pod then an agent, a child run, a fan-out.
fn mixed_run(i: usize) -> Value {
    let ask = |id: &str, deps: &[&str]| json!({"id": id, "dependsOn": deps, "agent": {"ref": "model", "prompt": format!("{{{{ run.name }}}}/{id}")}});
    let steps = match i % 4 {
        0 => json!([ask("plan", &[]), ask("write", &["plan"]),
                    {"id": "sum", "dependsOn": ["write"], "template": "{{ steps.write.output }}"}]),
        1 => json!([{"id": "build", "container": container("built")}, ask("review", &["build"])]),
        2 => json!([ask("plan", &[]), {"id": "sub", "dependsOn": ["plan"], "workflow": {"ref": "child"}}]),
        _ => json!([{"id": "items", "template": "[1,2,3]"},
                    {"id": "each", "dependsOn": ["items"], "forEach": "{{ steps.items.json }}",
                     "agent": {"ref": "model", "prompt": "{{ run.name }}/each/{{ item }}"}}]),
    };
    kit::run_obj(&format!("mixed-{i:03}"), json!({"steps": steps}))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until `count` runs (not counting child runs) have finished; else panics showing the
/// runs that have not and the replicas' logs.
async fn until_finished(runs: &Api<WorkflowRun>, count: usize, replicas: &[OperatorProcess]) {
    let deadline = Instant::now() + LONG;
    loop {
        let list = runs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        let parents: Vec<&WorkflowRun> =
            list.iter().filter(|r| !r.labels().contains_key("volt.dev/parent-run")).collect();
        let open: Vec<&&WorkflowRun> =
            parents.iter().filter(|r| !r.status.as_ref().is_some_and(|s| s.phase.is_finished())).collect();
        if parents.len() - open.len() >= count {
            return;
        }
        if Instant::now() > deadline {
            let stuck: Vec<String> = open
                .iter()
                .take(20)
                .map(|r| {
                    let s = r.status.clone().unwrap_or_default();
                    let steps: Vec<String> = s
                        .steps
                        .iter()
                        .filter(|(_, row)| !row.phase.is_finished())
                        .map(|(k, row)| format!("{k}={:?}", row.phase))
                        .collect();
                    format!(
                        "{} slot {:?}: {} {} [{}]",
                        r.name_any(),
                        r.labels().get("volt.dev/shard"),
                        s.phase.as_str(),
                        s.progress,
                        steps.join(" ")
                    )
                })
                .collect();
            let logs: Vec<String> = replicas.iter().map(|p| format!("--- {}\n{}", p.name(), p.log_tail())).collect();
            panic!(
                "{} of {count} runs unfinished after {LONG:?}:\n{}\n{}",
                open.len(),
                stuck.join("\n"),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits (a minute at most) until each replica holds one shard.
async fn one_shard_each(replicas: &[OperatorProcess], what: &str) {
    wait_until(what, Duration::from_secs(60), || async {
        for r in replicas {
            if owned(r).await != 1.0 {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// The shards each process holds (`volt_shards_owned`).
async fn owned(p: &OperatorProcess) -> f64 {
    p.metric("volt_shards_owned").await
}

/// A new namespace `prefix-*` with the chart installed for the operator user, shards on.
struct Fixture {
    client: kube::Client,
    ns: String,
    /// The replicas' `--lease-name`.
    lease: String,
    dir: LogDir,
}

async fn fixture(prefix: &str) -> Fixture {
    let cp = control_plane::shared();
    let client = cp.client().await;
    let ns = cp.namespace(&client, prefix).await;
    let rel = format!("vs-{:04x}", rand::random::<u16>());
    helm_install_for_operator_user(&rel, &ns, &[format!("sharding.shards={SHARDS}")]).await;
    Fixture { client, ns, lease: format!("{rel}-volt-operator"), dir: LogDir::new(prefix) }
}

impl Fixture {
    fn replica(&self, name: &str) -> OperatorProcess {
        replica(name, &self.ns, &self.lease, &self.dir)
    }

    /// The `mixed_run`s' peers: a kubelet stand-in whose pods take `pod`, an LLM stub that
    /// answers in `llm`, its Agent, and the Workflow of the child runs.
    async fn mixed_peers(&self, pod: Duration, llm: Duration) -> (kit::kubelet::Kubelet, Stub) {
        let kubelet =
            kit::kubelet::Kubelet::start(self.client.clone(), &self.ns, None, kit::kubelet::scripted(move |_| pod));
        let stub = Stub::start("model", llm).await;
        apply(&self.client, &self.ns, endpoint_agent("model", &stub.base_url(), json!({}))).await;
        let child = json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "child"},
               "spec": {"steps": [{"id": "ask", "agent": {"ref": "model", "prompt": "{{ run.name }}/child"}}]}});
        apply(&self.client, &self.ns, child).await;
        (kubelet, stub)
    }
}

/// Every pod ever created in a namespace, by name, with each UID it had: a name with two UIDs
/// is a step's pod created twice for one attempt (pod names are per run, step and attempt).
struct PodLog {
    seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodLog {
    fn start(client: &kube::Client, ns: &str) -> PodLog {
        let seen: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
        let (api, log) = (Api::<Pod>::namespaced(client.clone(), ns), seen.clone());
        let task = tokio::spawn(watcher(api, watcher::Config::default().labels("volt.dev/run")).for_each(move |e| {
            if let Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = e {
                lock(&log).entry(p.name_any()).or_default().insert(p.uid().unwrap_or_default());
            }
            futures::future::ready(())
        }));
        PodLog { seen, task }
    }
}

/// After `runs` `mixed_run`s: each succeeded with a shard label (a child with its parent's), no
/// pod was created twice, no LLM step was called by two replicas at once, every one was called.
async fn each_mixed_run_done_once(client: &kube::Client, ns: &str, runs: usize, pods: PodLog, stub: &Stub) {
    let all = Api::<WorkflowRun>::namespaced(client.clone(), ns).list(&ListParams::default()).await.expect("runs");
    let children = all.items.iter().filter(|r| r.labels().contains_key("volt.dev/parent-run")).count();
    assert_eq!((all.items.len() - children, children), (runs, runs / 4), "runs and child runs");
    for r in &all.items {
        let s = r.status.as_ref().expect("status");
        assert_eq!(s.phase, RunPhase::Succeeded, "{} {}: {}", r.name_any(), s.phase.as_str(), s.message);
        let slot = r.labels().get("volt.dev/shard").unwrap_or_else(|| panic!("{} has no shard label", r.name_any()));
        if let Some(parent) = r.labels().get("volt.dev/parent-run") {
            let p = all.items.iter().find(|p| &p.name_any() == parent).expect("the parent run");
            assert_eq!(p.labels().get("volt.dev/shard"), Some(slot), "a child shares its parent's shard");
        }
    }
    pods.task.abort();
    let seen = lock(&pods.seen).clone();
    let twice: Vec<(&String, usize)> =
        seen.iter().filter(|(_, uids)| uids.len() > 1).map(|(name, uids)| (name, uids.len())).collect();
    assert!(twice.is_empty(), "pods created more than once: {twice:?}");
    assert_eq!(seen.len(), runs / 4, "one pod per build step");
    // One request in flight per prompt: two at once would be a step run on two replicas at once.
    assert_eq!(stub.overlapping(), Vec::<String>::new(), "LLM steps called twice at once");
    let prompts: BTreeSet<String> = stub.seen().into_iter().map(|s| s.user).collect();
    // Per four runs: 2 (plan, write) + 1 (review) + 2 (plan, the child's ask) + 3 (each).
    assert_eq!(prompts.len(), runs / 4 * 8, "every LLM step was called");
}

#[tokio::test]
async fn shards_split_runs_and_hand_over_without_running_a_step_twice() {
    let f = fixture("shards").await;
    let (client, ns) = (f.client.clone(), f.ns.clone());
    let pods = PodLog::start(&client, &ns);
    let (_kubelet, stub) = f.mixed_peers(Duration::from_millis(400), Duration::from_millis(300)).await;

    // Three replicas: a shard each.
    let mut replicas: Vec<OperatorProcess> = (0..3).map(|i| f.replica(&format!("r{i}"))).collect();
    for r in &mut replicas {
        r.wait_ready(Duration::from_secs(60)).await;
    }
    one_shard_each(&replicas, "a shard on each replica").await;

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    for i in 0..RUNS {
        apply(&client, &ns, mixed_run(i)).await;
    }
    let finished = || async {
        let list = runs.list(&ListParams::default()).await.ok()?;
        let parents = list.items.iter().filter(|r| !r.labels().contains_key("volt.dev/parent-run"));
        Some(parents.filter(|r| r.status.as_ref().is_some_and(|s| s.phase.is_finished())).count())
    };
    wait_until("a third of the runs to finish", LONG, || async {
        finished().await.filter(|n| *n >= RUNS / 3).map(|_| ())
    })
    .await;

    // One replica dies; another joins.
    let mut dead = replicas.remove(1);
    let killed_at = Instant::now();
    dead.sigkill().await;
    let mut joiner = f.replica("r3");
    joiner.wait_ready(Duration::from_secs(60)).await;
    replicas.push(joiner);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let taken_over = wait_until("the dead replica's shard to be held again", LONG, || async {
        let list = leases.list(&ListParams::default().labels("volt.dev/lease-role=shard")).await.ok()?;
        let holders: Vec<String> = list.items.iter().filter_map(|l| l.spec.as_ref()?.holder_identity.clone()).collect();
        (holders.len() == SHARDS as usize && holders.iter().all(|h| !h.starts_with("r1_"))).then(|| killed_at.elapsed())
    })
    .await;
    println!("failover: the killed replica's shard was held again {taken_over:?} after SIGKILL (lease 6 s)");

    until_finished(&runs, RUNS, &replicas).await;
    one_shard_each(&replicas, "one shard per live replica").await;
    let acquired = replicas[2].metric_by_label("volt_shard_changes_total", "change").await;
    assert!(acquired.get("acquired").copied().unwrap_or_default() >= 1.0, "the joiner took a shard: {acquired:?}");

    // A rolling update mid-run: one replica stops (SIGTERM: it hands its shard over at once),
    // then a new one starts and takes a shard from the busiest.
    for i in RUNS..ALL {
        apply(&client, &ns, mixed_run(i)).await;
    }
    wait_until("some of the new runs to finish", LONG, || async {
        finished().await.filter(|n| *n >= RUNS + MORE / 5).map(|_| ())
    })
    .await;
    let mut leaving = replicas.remove(0);
    let stopped_at = Instant::now();
    let code = leaving.stop(Duration::from_secs(20)).await;
    assert!(code.success(), "a stopped replica exits 0: {code:?}\n{}", leaving.log_tail());
    let released = leaving.log_text().contains("released a shard");
    assert!(released, "the stopped replica released its shard:\n{}", leaving.log_tail());
    let moved = wait_until("the stopped replica's shard to be held again", LONG, || async {
        let mut total = 0.0;
        for r in &replicas {
            total += owned(r).await;
        }
        (total == f64::from(SHARDS)).then(|| stopped_at.elapsed())
    })
    .await;
    println!("rolling update: the stopped replica's shard was held again {moved:?} after SIGTERM");
    let mut newcomer = f.replica("r4");
    newcomer.wait_ready(Duration::from_secs(60)).await;
    replicas.push(newcomer);
    until_finished(&runs, ALL, &replicas).await;
    each_mixed_run_done_once(&client, &ns, ALL, pods, &stub).await;

    // The newcomer took a shard from the replica that held two: one each again.
    one_shard_each(&replicas, "one shard per live replica after the rolling update").await;
    let mut released = 0.0;
    for r in &replicas {
        released +=
            r.metric_by_label("volt_shard_changes_total", "change").await.get("released").copied().unwrap_or(0.0);
    }
    assert!(released >= 1.0, "a replica over its share handed a shard to the newcomer");
    let mut paused = 0.0;
    for r in &replicas {
        paused += r.metric_by_label("volt_shard_changes_total", "change").await.get("paused").copied().unwrap_or(0.0);
    }
    println!("renewals back after the fence's deadline (the live replicas): {paused}");
    for r in &mut replicas {
        r.assert_alive("after the runs");
        r.assert_no_panic();
    }
    // SIGTERM releases the shards: the Leases have no holder afterwards.
    for r in &mut replicas {
        r.stop(Duration::from_secs(20)).await;
    }
    let list = leases.list(&ListParams::default().labels("volt.dev/lease-role=shard")).await.expect("leases");
    let held: Vec<String> = list.items.iter().filter_map(|l| l.spec.as_ref()?.holder_identity.clone()).collect();
    assert!(held.is_empty(), "shard Leases still held after every replica stopped: {held:?}");
}

/// The shard of a run, from its label.
fn shard_of(run: &WorkflowRun) -> u32 {
    let slot = run.labels().get("volt.dev/shard").and_then(|l| l.parse::<u32>().ok());
    slot.unwrap_or_else(|| panic!("{} has no shard label", run.name_any())) % SHARDS
}

/// Waits until the runs named `prefix-*` have all finished; returns them.
async fn all_finished(runs: &Api<WorkflowRun>, prefix: &str, count: usize) -> Vec<WorkflowRun> {
    wait_until(&format!("{count} runs {prefix}-* to finish"), LONG, || async {
        let list = runs.list(&ListParams::default()).await.ok()?;
        let mine: Vec<WorkflowRun> =
            list.items.into_iter().filter(|r| r.name_any().starts_with(&format!("{prefix}-"))).collect();
        let done = mine.iter().filter(|r| r.status.as_ref().is_some_and(|s| s.phase.is_finished())).count();
        (done == count).then_some(mine)
    })
    .await
}

/// Three replicas with shards in a new namespace `prefix-*`, under the chart's rights, a shard
/// each; with their fixture (which keeps their logs).
async fn three_replicas(prefix: &str) -> (Fixture, Vec<OperatorProcess>) {
    let f = fixture(prefix).await;
    let mut replicas: Vec<OperatorProcess> = (0..3).map(|i| f.replica(&format!("{prefix}-{i}"))).collect();
    for r in &mut replicas {
        r.wait_ready(Duration::from_secs(60)).await;
    }
    one_shard_each(&replicas, "a shard on each replica").await;
    (f, replicas)
}

/// A run `prefix-i` of one call to `agent`.
fn ask(agent: &str, prefix: &str, i: usize) -> Value {
    let step = json!({"id": "ask", "agent": {"ref": agent, "prompt": format!("{prefix}/{i}")}});
    kit::run_obj(&format!("{prefix}-{i:02}"), json!({"steps": [step]}))
}

#[tokio::test]
async fn a_budget_counts_the_calls_of_every_replica_and_refuses_on_every_shard() {
    let stub = Stub::start("model", Duration::from_millis(20)).await;
    let (f, mut replicas) = three_replicas("shard-budget").await;
    let (client, ns) = (f.client.clone(), f.ns.clone());
    apply(&client, &ns, endpoint_agent("model", &stub.base_url(), json!({}))).await;
    apply(
        &client,
        &ns,
        json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Budget", "metadata": {"name": "team"},
               "spec": {"window": "Total", "maxTokens": 1_000_000_000u64, "selector": {"agents": ["model"]}}}),
    )
    .await;
    let budgets: Api<Budget> = Api::namespaced(client.clone(), &ns);
    wait_for(&budgets, "team", LONG, |b| b.status.as_ref().is_some_and(|s| s.observed_generation.is_some())).await;

    // 40 runs of one call each, spread over the shards (and so over the replicas).
    for i in 0..40 {
        apply(&client, &ns, ask("model", "spend", i)).await;
    }
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let spent_runs = all_finished(&runs, "spend", 40).await;
    let mut spent = 0;
    for r in &spent_runs {
        let s = r.status.as_ref().expect("status");
        assert_eq!(s.phase, RunPhase::Succeeded, "{}: {}", r.name_any(), s.message);
        let usage = s.usage.expect("usage");
        spent += usage.input_tokens + usage.output_tokens;
    }
    let shards: BTreeSet<u32> = spent_runs.iter().map(shard_of).collect();
    assert_eq!(shards.len(), SHARDS as usize, "40 runs on every shard: {shards:?}");
    // The Budget shows every replica's calls: one share per shard, summed.
    let b = wait_for(&budgets, "team", LONG, |b| b.status.as_ref().is_some_and(|s| s.used.tokens == spent)).await;
    let st = b.status.expect("status");
    let shares: BTreeMap<&str, u64> = st.shards.iter().map(|(k, s)| (k.as_str(), s.tokens)).collect();
    assert_eq!(shares.len(), SHARDS as usize, "a share per shard: {shares:?}");
    assert!(shares.values().all(|t| *t > 0), "every shard spent: {shares:?}");
    assert_eq!(shares.values().sum::<u64>(), spent, "the shares add up: {shares:?}");

    // Spent in full: no replica may call again, though none of them spent it alone.
    let patch = json!({"spec": {"maxTokens": spent}});
    let b = budgets.patch("team", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("lower the budget");
    let generation = b.metadata.generation;
    wait_for(&budgets, "team", LONG, |b| b.status.as_ref().is_some_and(|s| s.observed_generation == generation)).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the other replicas' watches
    let before = stub.requests();
    for i in 0..12 {
        apply(&client, &ns, ask("model", "over", i)).await;
    }
    let refused = all_finished(&runs, "over", 12).await;
    for r in &refused {
        let s = r.status.as_ref().expect("status");
        assert_eq!(s.phase, RunPhase::Failed, "{} (shard {}): {}", r.name_any(), shard_of(r), s.message);
        assert!(s.message.contains("budget \"team\""), "{}", s.message);
        assert!(s.message.contains(&format!("{spent} tokens used")), "{}", s.message);
    }
    let shards: BTreeSet<u32> = refused.iter().map(shard_of).collect();
    assert!(shards.len() >= 2, "refused on more than one shard: {shards:?}");
    assert_eq!(stub.requests(), before, "no call went out");
    let b = wait_for(&budgets, "team", LONG, |b| {
        b.status
            .as_ref()
            .is_some_and(|s| condition_status(&s.conditions, "Exceeded").is_some_and(|c| c.status == "True"))
    })
    .await;
    assert_eq!(b.status.expect("status").used.tokens, spent, "refused calls spend nothing");
    for r in &mut replicas {
        r.assert_no_panic();
        r.stop(Duration::from_secs(20)).await;
    }
}

#[tokio::test]
async fn an_agents_rate_limit_holds_for_the_replicas_together() {
    // The provider takes 60 a minute and bursts of 3 (and half a second of slack for the
    // network): three replicas that each took the whole limit would send three times that.
    let stub = Stub::start("limited", Duration::from_millis(5)).await;
    stub.limit_rpm_burst(60, 3.5);
    let (f, mut replicas) = three_replicas("shard-rate").await;
    let (client, ns) = (f.client.clone(), f.ns.clone());
    let agent = endpoint_agent("limited", &stub.base_url(), json!({"rateLimit": {"requestsPerMinute": 60}}));
    apply(&client, &ns, agent).await;
    for i in 0..24 {
        apply(&client, &ns, ask("limited", "calls", i)).await;
    }
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let done = all_finished(&runs, "calls", 24).await;
    for r in &done {
        let s = r.status.as_ref().expect("status");
        assert_eq!(s.phase, RunPhase::Succeeded, "{}: {}", r.name_any(), s.message);
    }
    let shards: BTreeSet<u32> = done.iter().map(shard_of).collect();
    assert!(shards.len() >= 2, "calls from more than one replica: {shards:?}");
    let seen: Vec<String> = stub.seen().iter().map(|s| format!("{} {}", s.user, s.status)).collect();
    assert_eq!(stub.rate_limited(), 0, "no call met the provider's limit: {seen:#?}");
    // Every step called; a call sent again (at least once: a timeout under load) is shown.
    let prompts: BTreeSet<String> = stub.seen().into_iter().map(|s| s.user).collect();
    assert_eq!(prompts.len(), 24, "every step was called: {seen:#?}");
    if stub.requests() != 24 {
        println!("{} requests for 24 steps: {seen:#?}", stub.requests());
    }
    for r in &mut replicas {
        r.assert_no_panic();
        r.stop(Duration::from_secs(20)).await;
    }
}

#[tokio::test]
async fn turning_shards_on_takes_over_the_runs_under_way() {
    let f = fixture("shard-on").await;
    let (client, ns) = (f.client.clone(), f.ns.clone());
    let pods = PodLog::start(&client, &ns);
    let (_kubelet, stub) = f.mixed_peers(Duration::from_millis(1500), Duration::from_millis(600)).await;

    // One operator without shards starts the runs...
    let mut single =
        OperatorProcess::builder(control_plane::shared().operator_kubeconfig_path(), f.dir.join("single.log"))
            .name("single")
            .namespaces(&[ns.as_str()])
            .args(["--max-concurrent-runs", "0", "--log-format", "text"])
            .spawn();
    single.wait_ready(Duration::from_secs(60)).await;
    const RUNS: usize = 40;
    for i in 0..RUNS {
        apply(&client, &ns, mixed_run(i)).await;
    }
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns);
    let started = || async {
        let list = runs.list(&ListParams::default()).await.ok()?;
        Some(list.items.iter().filter(|r| r.status.as_ref().is_some_and(|s| s.started_at.is_some())).count())
    };
    wait_until("every run to start", LONG, || async { started().await.filter(|n| *n >= RUNS).map(|_| ()) }).await;
    // ...and is replaced by three with shards (a `helm upgrade` turning sharding on).
    let code = single.stop(Duration::from_secs(20)).await;
    assert!(code.success(), "{code:?}\n{}", single.log_tail());
    let list = runs.list(&ListParams::default()).await.expect("runs");
    let under_way = list.items.iter().filter(|r| !r.status.as_ref().is_some_and(|s| s.phase.is_finished())).count();
    assert!(under_way > 0, "runs under way when sharding is turned on");
    assert!(list.items.iter().all(|r| !r.labels().contains_key("volt.dev/shard")), "no shards yet");
    let mut replicas: Vec<OperatorProcess> = (0..3).map(|i| f.replica(&format!("on-{i}"))).collect();
    for r in &mut replicas {
        r.wait_ready(Duration::from_secs(60)).await;
    }
    until_finished(&runs, RUNS, &replicas).await;
    println!("sharding turned on with {under_way} of {RUNS} runs under way");
    // Runs that had finished before sharding was turned on are labelled too (their TTL sweep
    // belongs to their shard), by the labeller, not by a pass: wait for it, do not race it.
    wait_until("every run, finished ones included, to carry a shard label", LONG, || async {
        let list = runs.list(&ListParams::default()).await.ok()?;
        list.items.iter().all(|r| r.labels().contains_key("volt.dev/shard")).then_some(())
    })
    .await;

    each_mixed_run_done_once(&client, &ns, RUNS, pods, &stub).await;
    for r in &mut replicas {
        r.assert_no_panic();
        r.stop(Duration::from_secs(20)).await;
    }
}
