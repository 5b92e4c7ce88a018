//! The local run loop on real processes, templates and the disk cache.

use super::*;
use crate::api::RunPhase;
use crate::local::cache::{DiskCache, NoCache};

struct Recorder(Vec<String>);
impl Observer for Recorder {
    fn update(&mut self, transitions: &[Transition], _: &WorkflowRunStatus) {
        for t in transitions {
            self.0.push(format!("{}={}", t.key.as_deref().unwrap_or("run"), t.phase));
        }
    }
}

fn plan(yaml: &str) -> Plan {
    let spec: WorkflowSpec = serde_saphyr::from_str(yaml).expect("spec parses");
    let dag = engine::validate(&spec).expect("valid");
    let params = engine::params::resolve(&spec, &BTreeMap::new()).expect("params");
    Plan {
        spec,
        dag,
        workflow_name: "w".into(),
        params,
        run: RunInfo { name: "w-local".into(), namespace: "default".into(), uid: "u".into(), ..Default::default() },
        timeout: Duration::from_secs(60),
        agents: vec![],
        budgets: vec![],
        decisions: BTreeMap::new(),
        workflows: Default::default(),
    }
}

fn executors(cache: Arc<dyn StepCache>, scratch: PathBuf) -> Executors {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Executors {
        http: HttpExecutor::new(),
        agents: None,
        agents_unavailable: "agent steps need a client".into(),
        cache,
        scratch,
        parallelism: 4,
        settings: Settings::default(),
        ask: None,
    }
}

const PIPELINE: &str = r#"
params: [{name: n, default: 3}]
steps:
- id: list
  template: "[{% for i in range(params.n) %}{{ i }}{% if not loop.last %},{% endif %}{% endfor %}]"
- id: square
  dependsOn: [list]
  forEach: "{{ steps.list.json }}"
  maxParallel: 2
  cache: {enabled: true, ttlSeconds: 60}
  container: {image: busybox, command: [sh, -c, 'printf %s $(( {{ item }} * {{ item }} )) > /dev/termination-log']}
- id: total
  dependsOn: [square]
  template: "{{ steps.square.json | map('int') | sum }}"
finally:
- id: report
  template: "{{ run.phase }}"
"#;

#[tokio::test]
async fn runs_fan_out_processes_and_templates_then_hits_the_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache: Arc<dyn StepCache> = Arc::new(DiskCache::open(dir.path().join("cache")));
    let p = plan(PIPELINE);
    let exec = executors(cache, dir.path().join("scratch"));
    let mut rec = Recorder(vec![]);
    let (status, stats) = run(&p, &exec, &mut rec, CancellationToken::new()).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{}", status.message);
    let out = |k: &str| status.steps.get(k).and_then(|r| r.output.clone()).unwrap_or_default();
    assert_eq!(out("square"), r#"["0","1","4"]"#);
    assert_eq!(out("total"), "5");
    assert_eq!(out("report"), "Succeeded");
    assert_eq!(status.progress, "4/4");
    assert_eq!((stats.cache_hits, stats.cache_misses, stats.cache_stores), (0, 3, 3));
    assert!(status.steps["square[1]"].message.contains("image busybox not used"));
    assert!(rec.0.contains(&"run=Succeeded".to_string()), "{:?}", rec.0);

    let (again, stats) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
    assert_eq!(again.phase, RunPhase::Succeeded);
    assert_eq!(stats.cache_hits, 3);
    assert!(again.steps["square"].cached && again.steps["square[2]"].cached);
    assert_eq!(again.steps["total"].output.as_deref(), Some("5"));
}

#[tokio::test]
async fn retries_then_fails_and_finally_still_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(
        r#"
steps:
- id: flaky
  retry: {limit: 1, backoff: {initialSeconds: 0.01}}
  container: {image: alpine, command: [sh, -c, 'echo nope >&2; exit 1']}
- id: after
  dependsOn: [flaky]
  template: x
- id: ask
  agent: {ref: writer, prompt: hi}
  continueOnError: true
finally:
- id: report
  template: "{{ run.phase }}"
"#,
    );
    let exec = executors(Arc::new(NoCache), dir.path().to_path_buf());
    let (status, _) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
    assert_eq!(status.phase, RunPhase::Failed);
    let flaky = &status.steps["flaky"];
    assert_eq!((flaky.phase, flaky.attempts), (StepPhase::Failed, 2));
    assert!(flaky.message.contains("failed after 2 attempts") && flaky.message.contains("nope"), "{}", flaky.message);
    assert_eq!(status.steps["after"].phase, StepPhase::Skipped);
    assert_eq!(status.steps["ask"].message, "agent steps need a client");
    assert_eq!(status.steps["report"].output.as_deref(), Some("Failed"));
    assert!(status.conditions.iter().any(|c| c.type_ == "Stalled" && c.status == "True"));
}

#[tokio::test]
async fn step_timeouts_and_cancellation_stop_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(
        r#"
steps:
- id: slow
  timeoutSeconds: 1
  container: {image: alpine, command: [sleep, "30"]}
"#,
    );
    let exec = executors(Arc::new(NoCache), dir.path().to_path_buf());
    let t = std::time::Instant::now();
    let (status, _) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
    assert_eq!(status.phase, RunPhase::Failed);
    assert!(status.steps["slow"].message.contains("timed out after 1s"), "{}", status.steps["slow"].message);
    assert!(t.elapsed() < Duration::from_secs(10));

    let p = plan(
        "steps:\n- id: slow\n  container: {image: alpine, command: [sleep, \"30\"]}\nfinally:\n- id: f\n  template: \"{{ run.phase }}\"\n",
    );
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c2.cancel();
    });
    let t = std::time::Instant::now();
    let (status, _) = run(&p, &exec, &mut Recorder(vec![]), cancel).await;
    assert_eq!(status.phase, RunPhase::Cancelled);
    assert_eq!(status.steps["f"].output.as_deref(), Some("Cancelled"));
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// A person at the terminal: asked about each waiting approval, answers with `answer`.
#[tokio::test]
async fn waiting_approvals_are_asked_and_the_answer_decides_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(
        r#"
steps:
- id: build
  template: "v1"
- id: gate
  dependsOn: [build]
  approval: {message: "ship {{ steps.build.output }}?", timeoutSeconds: 1, onTimeout: reject}
- id: after
  dependsOn: [gate]
  template: "{{ steps.gate.output }}"
"#,
    );
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ask = |answer: Option<crate::api::DecisionKind>| -> super::Ask {
        let asked = asked.clone();
        Arc::new(move |key: String, message: String| {
            asked.lock().unwrap_or_else(|e| e.into_inner()).push((key, message));
            Box::pin(async move {
                answer.map(|decision| crate::api::StepDecision {
                    decision,
                    comment: Some("from the terminal".into()),
                    by: Some("ada".into()),
                })
            })
        })
    };
    let mut exec = executors(Arc::new(crate::local::cache::NoCache), dir.path().join("scratch"));
    exec.ask = Some(ask(Some(crate::api::DecisionKind::Approve)));
    let (status, _) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
    assert_eq!(status.phase, RunPhase::Succeeded, "{}", status.message);
    assert_eq!(status.steps["after"].output.as_deref(), Some("from the terminal"));
    assert_eq!(status.steps["gate"].message, "approved by ada");
    assert_eq!(asked.lock().unwrap_or_else(|e| e.into_inner()).clone(), [("gate".to_string(), "ship v1?".to_string())]);

    // No answer (end of input): the approval waits for its timeout.
    exec.ask = Some(ask(None));
    let (status, _) = run(&p, &exec, &mut Recorder(vec![]), CancellationToken::new()).await;
    assert_eq!(status.phase, RunPhase::Failed);
    assert!(status.steps["gate"].message.contains("onTimeout: reject"), "{}", status.steps["gate"].message);
}
