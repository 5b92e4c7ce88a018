//! LLM endpoint faults and flapping replicas, end to end (issue 9).
//!
//! - Endpoints that never answer, drip their reply, answer with something that is not a chat
//!   completion or with megabytes, fail with 500 or rate limit for longer than the step may wait:
//!   the agent step fails within a bound, with a message that names the step, the agent and the
//!   problem, while a healthy run in the same operator finishes as fast as it does alone.
//! - The same faults on replicas of an agent that has a healthy one: every call ends there.
//! - Replicas that go NotReady, CrashLoopBackOff or away and come back during a run: no call
//!   reaches a replica that is down (beyond the time the health change takes to reach the
//!   balancer, measured), and the run succeeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube::api::DeleteParams;
use serde_json::{Value, json};
use volt_operator::agents::caller::MAX_REPLY_BYTES;
use volt_operator::api::{RunPhase, WorkflowRunStatus};

use crate::agents::{
    agent_status, by, children, fan_out, finished, operator, replica_pod, replicas_agent, running_replicas, single,
};
use crate::kit::kubelet;
use crate::kit::openai::{Reply, Stub};
use crate::kit::{Env, endpoint_agent, wait_until};

const LONG: Duration = Duration::from_secs(60);

/// Applies `run` and waits for its end; returns its status and how long it took.
async fn timed(e: &Env, run: Value) -> (WorkflowRunStatus, Duration) {
    let name = run["metadata"]["name"].as_str().expect("name").to_string();
    let start = Instant::now();
    e.apply(run).await;
    let status = finished(e, &name).await;
    (status, start.elapsed())
}

/// A fan-out of 10 calls, 5 at a time, to the healthy agent `good`.
fn healthy_run(name: &str) -> Value {
    fan_out(name, json!({"ref": "good"}), 10, 5)
}

fn assert_succeeded(s: &WorkflowRunStatus, what: &str) {
    assert_eq!(s.phase, RunPhase::Succeeded, "{what}: {s:#?}");
}

/// The run failed, its message names the step and the agent and contains `problem`; returns
/// the message.
fn assert_failed_with(s: &WorkflowRunStatus, agent: &str, problem: &str) -> String {
    assert_eq!(s.phase, RunPhase::Failed, "{agent}: {s:#?}");
    let m = &s.message;
    assert!(m.starts_with("step \"ask\" failed: "), "{agent}: the message names the step: {m}");
    assert!(m.contains(agent), "{agent}: the message names the agent: {m}");
    assert!(m.contains(problem), "{agent}: the message says {problem:?}: {m}");
    m.clone()
}

/// The healthy agent `good`, alone, and how long its run takes with nothing else going on.
async fn good_agent_and_baseline(e: &Env) -> (Stub, Duration) {
    let good = Stub::start("good", Duration::from_millis(20)).await;
    e.apply(endpoint_agent("good", &good.base_url(), json!({"maxConcurrency": 8}))).await;
    agent_status(e, "good", |s| s.replicas.healthy == 1).await;
    let (s, baseline) = timed(e, healthy_run("baseline")).await;
    assert_succeeded(&s, "baseline");
    (good, baseline)
}

#[tokio::test]
async fn silent_and_dripping_endpoints_fail_within_the_attempt_timeouts_and_other_runs_go_on() {
    let e = Env::new("llm-slow").await;
    let _op = operator(&e).await;
    let (good, baseline) = good_agent_and_baseline(&e).await;

    let hang = Stub::start("hang", Duration::ZERO).await;
    hang.always(Reply::Hang);
    let drip = Stub::start("drip", Duration::ZERO).await;
    drip.always(Reply::Drip { total: Duration::from_secs(20) });
    // 16 calls at once that never get an answer, for 3 s each.
    let crowd = Stub::start("crowd", Duration::ZERO).await;
    crowd.always(Reply::Hang);
    let one_second = json!({"timeoutSeconds": 1, "maxConcurrency": 16});
    e.apply(endpoint_agent("hang", &hang.base_url(), one_second.clone())).await;
    e.apply(endpoint_agent("drip", &drip.base_url(), one_second)).await;
    e.apply(endpoint_agent("crowd", &crowd.base_url(), json!({"timeoutSeconds": 3, "maxConcurrency": 16}))).await;
    for name in ["hang", "drip", "crowd"] {
        agent_status(&e, name, |s| s.replicas.healthy == 1).await;
    }

    let start = Instant::now();
    e.apply(fan_out("crowd-run", json!({"ref": "crowd"}), 16, 16)).await;
    let runs = [("hang", "hang-run"), ("drip", "drip-run")];
    let tasks: Vec<_> = runs
        .iter()
        .map(|(agent, run)| {
            let e = e.clone();
            let run = single(run, json!({"ref": agent}));
            tokio::spawn(async move { timed(&e, run).await })
        })
        .collect();

    // While 18 calls hang or drip, a healthy run goes as fast as alone.
    wait_until("16 calls hanging on crowd", LONG, || async { (crowd.requests() >= 16).then_some(()) }).await;
    let (s, during) = timed(&e, healthy_run("during")).await;
    assert_succeeded(&s, "healthy run during the faults");
    let crowd_run = e.runs.get("crowd-run").await.expect("crowd run").status.unwrap_or_default();
    assert!(!crowd_run.phase.is_finished(), "the healthy run overlapped the hanging calls: {crowd_run:#?}");
    eprintln!("healthy run: {baseline:?} alone, {during:?} during the faults");
    assert!(during < baseline + Duration::from_secs(2), "healthy run slowed: {baseline:?} alone, {during:?}");
    assert_eq!(good.answered(), 20);

    // Each attempt lasts the agent's timeoutSeconds (1 s): 3 failed attempts open the replica's
    // circuit, and the step fails at once, with the circuit and the last attempt's reason.
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("run task"));
    }
    let (hang_run, hang_took) = &results[0];
    let m = assert_failed_with(hang_run, "hang", "no answer within 1.0s");
    eprintln!("hang: failed after {hang_took:?}, {} requests: {m}", hang.requests());
    let (drip_run, drip_took) = &results[1];
    let m = assert_failed_with(drip_run, "drip", "reply not complete within 1.0s (HTTP 200, ");
    eprintln!("drip: failed after {drip_took:?}, {} requests: {m}", drip.requests());
    for (stub, took, run) in [(&hang, hang_took, hang_run), (&drip, drip_took, drip_run)] {
        assert_eq!(stub.requests(), 3, "{}: 3 attempts open the circuit", stub.name());
        assert!(run.message.contains("no healthy replica: ") && run.message.contains("(circuit open for "));
        assert!(*took >= Duration::from_secs(3), "{}: {took:?} for 3 attempts of 1 s", stub.name());
        // 3 attempts of 1 s, backoff under 0.6 s, and the operator's reconcile passes.
        assert!(*took < Duration::from_secs(6), "{}: took {took:?}", stub.name());
    }
    // The drip's headers and first bytes came (unlike the hang's): only the attempt's bound cut it.
    assert!(drip.body_bytes_sent() > 0);

    // 16 calls time out together; the circuit opens and their retries fail at once.
    let (s, crowd_took) = (finished(&e, "crowd-run").await, start.elapsed());
    let m = assert_failed_with(&s, "crowd", "no answer within 3.0s");
    eprintln!("crowd: 16 hanging calls failed after {crowd_took:?}, {} requests: {m}", crowd.requests());
    assert_eq!(crowd.requests(), 16, "no call was sent again to the open circuit");
    // One 3 s timeout, then failures at once; a retry waiting out the circuit (5 s and more)
    // would pass 8 s. The margin is for a loaded 2-core box (6.1 s seen under two builds).
    assert!(crowd_took < Duration::from_secs(8), "crowd took {crowd_took:?}");
}

#[tokio::test]
async fn bad_answers_fail_with_a_clear_message_and_other_runs_go_on() {
    let e = Env::new("llm-bad").await;
    let _op = operator(&e).await;
    let (good, baseline) = good_agent_and_baseline(&e).await;

    // (agent, reply, what the message says)
    let faults = [
        ("malformed", Reply::Malformed, "reply is not valid JSON: EOF while parsing"),
        ("wrongshape", Reply::WrongShape, "reply is not a chat completion: missing field"),
        ("huge", Reply::Huge { bytes: 64 << 20 }, "reply larger than 1048576 bytes"), // MAX_REPLY_BYTES
        ("fivehundred", Reply::Status(500), "HTTP 500: stub fivehundred fails on purpose"),
        (
            "limited",
            Reply::RateLimited { retry_after: Duration::from_secs(30) },
            "HTTP 429: Rate limit reached for requests; gave up after 1 rate-limited attempts (the replica asks to wait 30.0s)",
        ),
    ];
    let mut stubs = BTreeMap::new();
    for (name, reply, _) in &faults {
        let stub = Stub::start(name, Duration::ZERO).await;
        stub.always(reply.clone());
        e.apply(endpoint_agent(name, &stub.base_url(), json!({"timeoutSeconds": 2}))).await;
        stubs.insert(*name, stub);
    }
    for (name, ..) in &faults {
        agent_status(&e, name, |s| s.replicas.healthy == 1).await;
    }

    // Every fault at once, each as a single agent step with a 5 s step timeout, and a healthy run.
    let start = Instant::now();
    for (name, ..) in &faults {
        let mut run = single(&format!("{name}-run"), json!({"ref": name}));
        run["spec"]["workflow"]["steps"][0]["timeoutSeconds"] = json!(5);
        e.apply(run).await;
    }
    let (s, during) = timed(&e, healthy_run("during")).await;
    assert_succeeded(&s, "healthy run during the faults");
    eprintln!("healthy run: {baseline:?} alone, {during:?} during the faults");
    assert!(during < baseline + Duration::from_secs(2), "healthy run slowed: {baseline:?} alone, {during:?}");
    assert_eq!(good.answered(), 20);

    for (name, _, problem) in &faults {
        let s = finished(&e, &format!("{name}-run")).await;
        let took = start.elapsed();
        let m = assert_failed_with(&s, name, problem);
        let stub = &stubs[name];
        eprintln!("{name}: failed within {took:?}, {} requests: {m}", stub.requests());
        // Well within the step's 5 s: three quick failures open the circuit, a 429 asking
        // for longer than the step has left is given up at once.
        assert!(took < Duration::from_secs(3), "{name}: {took:?}");
        let expected = if *name == "limited" { 1 } else { 3 };
        assert_eq!(stub.requests(), expected, "{name}: attempts");
    }

    // The 64 MiB replies were cut at the bound: the stub could write the bound and what the
    // sockets buffer, not the body.
    let huge = &stubs["huge"];
    let per_attempt = huge.body_bytes_sent() / huge.requests().max(1);
    eprintln!("huge: {} attempts, {per_attempt} bytes sent per attempt of a 64 MiB body", huge.requests());
    assert!(per_attempt > MAX_REPLY_BYTES, "the replies were read up to the bound");
    assert!(per_attempt < 24 << 20, "{per_attempt} bytes sent per attempt: the body was read past the bound");
}

#[tokio::test]
async fn a_healthy_replica_takes_every_call_from_misbehaving_ones() {
    let e = Env::new("llm-failover").await;
    let _op = operator(&e).await;
    let stubs = Stub::group(&[
        ("healthy", Duration::from_millis(20)),
        ("silent", Duration::ZERO),
        ("dripping", Duration::ZERO),
        ("garbled", Duration::ZERO),
    ])
    .await;
    stubs[1].always(Reply::Hang);
    stubs[2].always(Reply::Drip { total: Duration::from_secs(20) });
    // Not JSON, JSON of another API, 16 MiB, in turn.
    let garbage = [Reply::Malformed, Reply::WrongShape, Reply::Huge { bytes: 16 << 20 }];
    stubs[3].script(garbage.iter().cycle().take(30).cloned());
    running_replicas(&e, "failover", &stubs).await;
    e.apply(replicas_agent("mixed", "failover", stubs[0].port(), json!({"timeoutSeconds": 1}))).await;
    agent_status(&e, "mixed", |s| s.replicas.healthy == 4).await;

    // A call's retries go to replicas it has not tried: with 3 bad replicas, its 4 attempts
    // always reach the healthy one.
    let (s, took) = timed(&e, fan_out("fo-run", json!({"ref": "mixed", "strategy": "round_robin"}), 12, 4)).await;
    assert_succeeded(&s, "failover run");
    let rows = children(&s, "ask");
    assert_eq!(rows.len(), 12);
    assert_eq!(by(&rows, |r| r.replica.as_ref()), BTreeMap::from([("healthy".into(), 12)]));
    assert!(rows.iter().all(|r| r.attempts == 1), "retried within the call, not as new step attempts");
    assert_eq!(stubs[0].answered(), 12);
    let tried: Vec<(String, usize)> = stubs[1..].iter().map(|s| (s.name().to_string(), s.requests())).collect();
    eprintln!("failover: {took:?}; bad replicas tried {tried:?}");
    assert!(tried.iter().all(|(_, n)| *n >= 1), "every bad replica was tried: {tried:?}");
    // Each bad replica leaves the rotation after 3 failures; the silent and dripping ones take
    // their 1 s timeout to fail.
    assert!(took < Duration::from_secs(10), "{took:?}");
    let agent = agent_status(&e, "mixed", |s| s.replicas.healthy == 1).await;
    let status = agent.status.expect("status");
    for row in status.endpoints.iter().filter(|r| r.pod != "healthy") {
        assert!(row.reason.starts_with("CircuitOpen"), "{row:?}");
    }
}

/// How a replica goes down during the flapping test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Down {
    NotReady,
    CrashLoop,
    Deleted,
}

/// One time a replica was down: from the write that took it down (returned) to just before the
/// write that brought it back; `known` is when the Agent's status first showed it down (the
/// operator updates the balancer before it writes that status).
#[derive(Debug)]
struct Outage {
    pod: String,
    how: Down,
    from: Instant,
    known: Option<Instant>,
    until: Instant,
}

/// Whether the Agent `flap`'s status shows `pod` down (unhealthy or gone).
async fn shown_down(e: &Env, pod: &str) -> bool {
    let Ok(agent) = e.agents.get("flap").await else { return false };
    let rows = agent.status.map(|s| s.endpoints).unwrap_or_default();
    rows.iter().find(|r| r.pod == pod).is_none_or(|r| !r.healthy)
}

/// Takes `pods` down and up in turn (one at a time), cycling through the ways to go down, until
/// `stop`; each stays down `hold`.
async fn flap(
    e: Env,
    pods: Vec<(String, String)>,
    offset: usize,
    hold: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Outage> {
    let modes = [Down::NotReady, Down::CrashLoop, Down::Deleted];
    let mut outages = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let (pod, ip) = &pods[i % pods.len()];
        let how = modes[(i / pods.len() + offset) % modes.len()];
        match how {
            Down::NotReady => {
                kubelet::set_running(&e.client, &e.ns, pod, ip, false).await.expect("not ready");
            }
            Down::CrashLoop => {
                kubelet::set_waiting(&e.client, &e.ns, pod, "CrashLoopBackOff", i as i32 + 1).await.expect("crash");
            }
            Down::Deleted => {
                e.pods.delete(pod, &DeleteParams::default()).await.expect("delete");
            }
        }
        let from = Instant::now();
        let mut known = None;
        while from.elapsed() < hold {
            if known.is_none() && shown_down(&e, pod).await {
                known = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let until = Instant::now();
        if how == Down::Deleted {
            replica_pod(&e, pod, "flap", false).await;
        }
        kubelet::set_running(&e.client, &e.ns, pod, ip, true).await.expect("ready again");
        outages.push(Outage { pod: pod.clone(), how, from, known, until });
        tokio::time::sleep(hold / 4).await;
        i += 1;
    }
    outages
}

#[tokio::test]
async fn flapping_replicas_get_no_calls_while_down_and_the_run_finishes() {
    let e = Env::new("llm-flap").await;
    let _op = operator(&e).await;
    let latency = Duration::from_millis(500);
    let stubs = Stub::group(&[("f0", latency), ("f1", latency), ("f2", latency), ("f3", latency)]).await;
    running_replicas(&e, "flap", &stubs).await;
    e.apply(replicas_agent("flap", "flap", stubs[0].port(), json!({"timeoutSeconds": 5}))).await;
    agent_status(&e, "flap", |s| s.replicas.healthy == 4).await;

    // Two flappers, each with two replicas, one down at a time: at least two are up.
    let stop = Arc::new(AtomicBool::new(false));
    let hold = Duration::from_millis(800);
    let pods: Vec<(String, String)> = stubs.iter().map(|s| (s.name().to_string(), s.ip().to_string())).collect();
    let flappers: Vec<_> = [(&pods[0..2], 0), (&pods[2..4], 1)]
        .into_iter()
        .map(|(mine, offset)| {
            let e = e.clone();
            tokio::spawn(flap(e, mine.to_vec(), offset, hold, stop.clone()))
        })
        .collect();

    let (s, took) = timed(&e, fan_out("flap-run", json!({"ref": "flap"}), 30, 3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut outages = Vec::new();
    for f in flappers {
        outages.extend(f.await.expect("flapper"));
    }
    assert_succeeded(&s, "flapping run");
    let rows = children(&s, "ask");
    assert_eq!(rows.len(), 30);
    assert_eq!(stubs.iter().map(Stub::answered).sum::<usize>(), 30);

    // Every outage reached the Agent's status well within the hold: the balancer knew.
    let mut propagation: Vec<Duration> = Vec::new();
    for o in &outages {
        let known = o.known.unwrap_or_else(|| panic!("{} ({:?}) never showed as down within {hold:?}", o.pod, o.how));
        propagation.push(known - o.from);
    }
    propagation.sort();
    // Calls that reached a replica while it was down: within the time the change took to reach
    // the status (plus 100 ms for a call picked just before, in transit), or later.
    let slack = Duration::from_millis(100);
    let mut late = Vec::new();
    let mut in_window = 0;
    for o in &outages {
        let window = o.known.map_or(Duration::ZERO, |k| k - o.from) + slack;
        let stub = stubs.iter().find(|s| s.name() == o.pod).expect("stub");
        for call in stub.seen().iter().filter(|c| c.at >= o.from && c.at < o.until) {
            let after = call.at - o.from;
            if after > window {
                late.push(format!(
                    "{} ({:?}): a call {after:?} after it went down (known after {window:?})",
                    o.pod, o.how
                ));
            } else {
                in_window += 1;
            }
        }
    }
    let mut kinds: BTreeMap<Down, usize> = BTreeMap::new();
    for o in &outages {
        *kinds.entry(o.how).or_default() += 1;
    }
    let calls: Vec<usize> = stubs.iter().map(Stub::requests).collect();
    eprintln!(
        "flapping: run took {took:?}; {} outages {kinds:?}; calls per replica {calls:?}; \
         down to status: median {:?}, max {:?}; {in_window} calls arrived in that window",
        outages.len(),
        propagation[propagation.len() / 2],
        propagation[propagation.len() - 1],
    );
    assert!(late.is_empty(), "calls reached replicas that were down: {late:#?}");
    assert!(outages.len() >= 6, "the run outlasted several outages: {outages:#?}");
    for how in [Down::NotReady, Down::CrashLoop, Down::Deleted] {
        assert!(kinds.get(&how).copied().unwrap_or(0) >= 1, "no {how:?} outage: {kinds:?}");
    }
    assert!(calls.iter().all(|n| *n >= 1), "every replica served between outages: {calls:?}");
    // All four are back.
    agent_status(&e, "flap", |s| s.replicas.healthy == 4).await;
}
