//! Local mode: run and validate Workflows on one machine, with no cluster.
//!
//! `volt-operator local run FILE...` reads Agents, a Workflow and optionally a WorkflowRun from
//! YAML files and runs it with the cluster's engine ([`crate::engine::advance`]), templating,
//! retries, timeouts and cache keys, keeping the run's state in memory:
//! - template steps render inside the engine; http steps run in-process with the operator's
//!   [`crate::executors::http::HttpExecutor`]; agent steps call the Agents' `endpoint.baseUrl`
//!   through an [`crate::executors::AgentCaller`] ([`agents`]);
//! - container steps run their `command` as a local process ([`process`]); the image is not
//!   used, and a step without a command fails saying so;
//! - steps with `cache.enabled` are memoized on disk under the user's cache directory
//!   ([`cache`]), so a second run hits.
//!
//! `volt-operator local validate FILE...` makes the API server's schema checks ([`schema`]) and
//! the controller's ([`check`]), naming the file, object, step and field of each problem.
//!
//! Exit codes: 0 the run succeeded (or the files are valid), 1 the run failed or was
//! cancelled, 2 the input is invalid.

pub mod agents;
pub mod cache;
pub mod check;
pub mod child;
pub mod cli;
pub mod load;
pub mod process;
pub mod runner;
pub mod schema;
pub mod view;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use crate::api::{Agent, DecisionKind, RunPhase, StepDecision};
use crate::engine::{self, RunInfo, Settings};
use crate::executors::http::HttpExecutor;

pub use cli::{LocalCommand, LocalRunArgs, LocalValidateArgs, OutputFormat};
use load::{Bundle, Problem};
use runner::{Executors, Plan};

/// Exit code of a run that succeeded, or of valid files.
pub const EXIT_OK: u8 = 0;
/// Exit code of a run that failed or was cancelled.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of invalid input (files, flags, parameters).
pub const EXIT_INVALID: u8 = 2;
/// Namespace of a run whose files set none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Timeout of a run that sets none (the operator's `--default-workflow-timeout`).
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Entry point of `volt-operator local ...`.
pub fn main(cmd: LocalCommand, log_level: &str, json_logs: bool) -> ExitCode {
    init_logging(log_level, json_logs);
    let code = match cmd {
        LocalCommand::Validate(args) => validate(&args),
        // Traces as in the cluster: exported when OTEL_EXPORTER_OTLP_* names an endpoint
        // (VOLT_TELEMETRY=false turns them off), flushed when the guard drops.
        LocalCommand::Run(args) => {
            match crate::telemetry::init(std::env::var("VOLT_TELEMETRY").as_deref() != Ok("false")) {
                Ok(traces) => {
                    let code = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                        Ok(rt) => rt.block_on(run(args)),
                        Err(e) => {
                            eprintln!("error: starting the runtime: {e}");
                            EXIT_FAILED
                        }
                    };
                    drop(traces);
                    code
                }
                Err(e) => {
                    eprintln!("error: traces (OTEL_EXPORTER_OTLP_*): {e}");
                    EXIT_FAILED
                }
            }
        }
    };
    ExitCode::from(code)
}

/// Logs go to stderr; at the default level only warnings, so they do not break the live view.
fn init_logging(log_level: &str, json: bool) {
    let level = if log_level == "info" { "warn" } else { log_level };
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// Writes each step's transcript to `dir/<step key>.json`.
fn write_transcripts(dir: &std::path::Path, status: &crate::api::WorkflowRunStatus) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (key, row) in &status.steps {
        if let Some(t) = &row.transcript {
            let name: String = key.chars().map(|c| if c == '/' { '_' } else { c }).collect();
            std::fs::write(dir.join(format!("{name}.json")), t.as_bytes())?;
        }
    }
    Ok(())
}

fn print_problems(problems: &[Problem]) {
    let mut err = std::io::stderr().lock();
    for p in problems {
        let _ = writeln!(err, "{p}");
    }
}

/// `local validate`: 0 when the files are valid, 2 otherwise.
pub fn validate(args: &LocalValidateArgs) -> u8 {
    let mut bundle = load::load(&args.files);
    check::check_bundle(&mut bundle);
    print_problems(&bundle.problems);
    let errors = bundle.problems.iter().filter(|p| p.is_error()).count();
    let warnings = bundle.problems.len() - errors;
    let mut counts = format!(
        "{}: {}, {}, {}",
        plural(bundle.files.len(), "file"),
        plural(bundle.agents.len(), "Agent"),
        plural(bundle.workflows.len(), "Workflow"),
        plural(bundle.runs.len(), "WorkflowRun")
    );
    if !bundle.budgets.is_empty() {
        counts.push_str(&format!(", {}", plural(bundle.budgets.len(), "Budget")));
    }
    if errors > 0 {
        eprintln!("invalid: {}, {} ({counts})", plural(errors, "error"), plural(warnings, "warning"));
        EXIT_INVALID
    } else {
        let w = if warnings > 0 { format!(" ({})", plural(warnings, "warning")) } else { String::new() };
        println!("valid: {counts}{w}");
        EXIT_OK
    }
}

/// Chooses the Workflow to run, its parameters and the run's identity.
pub fn plan(bundle: &Bundle, args: &LocalRunArgs) -> Result<Plan, Vec<Problem>> {
    let workflows = check::last_of_each(&bundle.workflows);
    let agents = check::last_of_each(&bundle.agents);
    let run = match bundle.runs.as_slice() {
        [] => None,
        [one] => Some(one),
        many => {
            let names: Vec<String> = many.iter().map(|r| format!("{} ({})", r.name, r.file)).collect();
            return Err(vec![Problem::error(
                "",
                format!("the files hold {} WorkflowRuns ({}); local run runs one", many.len(), names.join(", ")),
            )]);
        }
    };
    let names = || workflows.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", ");
    // (workflow name, spec, where it came from)
    let (workflow_name, spec, origin) = match (run, &args.workflow) {
        (Some(r), _) if r.object.spec.workflow.is_some() => (
            String::new(),
            r.object.spec.workflow.clone().unwrap_or_default(),
            (r.file.clone(), r.label("WorkflowRun")),
        ),
        (Some(r), _) => {
            let want = r.object.spec.workflow_ref.as_ref().map(|w| w.name.clone()).unwrap_or_default();
            match workflows.iter().find(|w| w.name == want) {
                Some(w) => (w.name.clone(), w.object.spec.clone(), (w.file.clone(), w.label("Workflow"))),
                None => {
                    return Err(vec![
                        Problem::error(
                            &r.file,
                            format!("Workflow {want:?} is not in the files (they have: {})", or_none(&names())),
                        )
                        .object(r.label("WorkflowRun"))
                        .field("spec.workflowRef.name"),
                    ]);
                }
            }
        }
        (None, Some(want)) => match workflows.iter().find(|w| &w.name == want) {
            Some(w) => (w.name.clone(), w.object.spec.clone(), (w.file.clone(), w.label("Workflow"))),
            None => {
                return Err(vec![Problem::error(
                    "",
                    format!("--workflow {want}: no such Workflow in the files (they have: {})", or_none(&names())),
                )]);
            }
        },
        (None, None) => match workflows.as_slice() {
            [w] => (w.name.clone(), w.object.spec.clone(), (w.file.clone(), w.label("Workflow"))),
            [] => {
                return Err(vec![Problem::error(
                    "",
                    "no Workflow in the files, and no WorkflowRun with an inline one",
                )]);
            }
            _ => {
                return Err(vec![Problem::error(
                    "",
                    format!(
                        "the files hold several Workflows ({}): choose one with --workflow NAME, or add a WorkflowRun",
                        names()
                    ),
                )]);
            }
        },
    };
    let dag = engine::validate(&spec).map_err(|invalid| {
        invalid
            .0
            .into_iter()
            .map(|e| {
                Problem::error(&origin.0, e.message).object(&origin.1).field(format!("spec.{}", e.field)).step(e.step)
            })
            .collect::<Vec<_>>()
    })?;
    let mut given: BTreeMap<String, Json> = run.map(|r| r.object.spec.params.clone()).unwrap_or_default();
    for (k, v) in &args.params {
        given.insert(k.clone(), v.clone());
    }
    let params = engine::params::resolve(&spec, &given).map_err(|e| {
        let hint = if args.params.is_empty() { "" } else { " (with --param)" };
        vec![Problem::error(&origin.0, format!("{e}{hint}")).object(&origin.1)]
    })?;
    let namespace = run
        .and_then(|r| r.object.namespace())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    let name = match run {
        Some(r) if r.object.metadata.name.as_ref().is_some_and(|n| !n.is_empty()) => r.object.name_any(),
        Some(r) => format!("{}{}", r.object.metadata.generate_name.clone().unwrap_or_default(), suffix()),
        None if workflow_name.is_empty() => "local".to_string(),
        None => format!("{workflow_name}-local"),
    };
    let timeout = args
        .timeout
        .or_else(|| run.and_then(|r| r.object.spec.timeout_seconds).map(|s| Duration::from_secs(u64::from(s))))
        .unwrap_or(DEFAULT_RUN_TIMEOUT);
    // Local mode has one namespace: the run's.
    let agents: Vec<Agent> = agents.into_iter().map(|a| in_namespace(a.object, &namespace)).collect();
    let budgets =
        check::last_of_each(&bundle.budgets).into_iter().map(|b| in_namespace(b.object, &namespace)).collect();
    let decisions = decisions_of(run.map(|r| (r.file.as_str(), &r.object.spec.decisions)), args, &spec, &dag)?;
    let chain = if workflow_name.is_empty() { vec![] } else { vec![workflow_name.clone()] };
    let workflows = Arc::new(workflows.iter().map(|w| (w.name.clone(), w.object.spec.clone())).collect());
    // Its priority and `spec.budget` from the WorkflowRun, if any; a run of a named Workflow
    // counts under Budgets that select it, as in the cluster.
    let meta = engine::RunMeta {
        workflow: Some(workflow_name.clone()).filter(|w| !w.is_empty()),
        ..run.map(|r| engine::RunMeta::of(&r.object.spec, None)).unwrap_or_default()
    };
    Ok(Plan {
        spec,
        dag,
        workflow_name,
        params,
        // `TRACEPARENT`: the run joins the trace of whatever started it (a CI job, a script).
        run: RunInfo {
            name,
            namespace,
            uid: uuid(),
            chain,
            traceparent: std::env::var("TRACEPARENT").ok(),
            shard: None,
            meta,
        },
        timeout,
        agents,
        budgets,
        decisions,
        workflows,
    })
}

/// `object`, moved into namespace `ns`.
fn in_namespace<K: kube::Resource>(mut object: K, ns: &str) -> K {
    object.meta_mut().namespace = Some(ns.to_string());
    object
}

/// The run's decisions: its WorkflowRun's `spec.decisions`, then `--approve` and `--reject`.
fn decisions_of(
    run: Option<(&str, &BTreeMap<String, StepDecision>)>,
    args: &LocalRunArgs,
    spec: &crate::api::WorkflowSpec,
    dag: &engine::Dag,
) -> Result<BTreeMap<String, StepDecision>, Vec<Problem>> {
    let mut decisions = run.map(|(_, d)| d.clone()).unwrap_or_default();
    if let Err(e) = engine::dag::check_decisions(spec, dag, decisions.keys()) {
        return Err(vec![Problem::error(run.map(|(f, _)| f).unwrap_or_default(), e).field("spec.decisions")]);
    }
    let by = Some(std::env::var("USER").unwrap_or_else(|_| "local".into()));
    for (flag, list, decision) in
        [("--approve", &args.approve, DecisionKind::Approve), ("--reject", &args.reject, DecisionKind::Reject)]
    {
        for given in list {
            let (key, comment) = match given.split_once('=') {
                Some((k, c)) => (k.to_string(), Some(c.to_string())),
                None => (given.clone(), None),
            };
            if let Err(e) = engine::dag::check_decisions(spec, dag, [&key]) {
                return Err(vec![Problem::error("", format!("{flag} {key}: {e}"))]);
            }
            decisions.insert(key, StepDecision { decision, comment, by: by.clone() });
        }
    }
    Ok(decisions)
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 { format!("1 {word}") } else { format!("{n} {word}s") }
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "none" } else { s }
}

/// Five characters as `generateName` adds.
fn suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5).map(|_| CHARS[rand::random_range(0..CHARS.len())] as char).collect()
}

/// A random (version 4) UUID.
fn uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// `local run`: 0 when the run succeeded, 1 when it failed or was cancelled, 2 for invalid input.
pub async fn run(args: LocalRunArgs) -> u8 {
    let started = Instant::now();
    let mut bundle = load::load(&args.files);
    check::check_bundle(&mut bundle);
    print_problems(&bundle.problems);
    if bundle.has_errors() {
        eprintln!("invalid input: nothing was run");
        return EXIT_INVALID;
    }
    let plan = match plan(&bundle, &args) {
        Ok(p) => p,
        Err(problems) => {
            print_problems(&problems);
            eprintln!("invalid input: nothing was run");
            return EXIT_INVALID;
        }
    };
    let uses_agents = plan.spec.steps.iter().chain(&plan.spec.finally).any(|s| s.agent.is_some());
    let setup = agents::setup(&plan.agents, &plan.budgets, crate::api::Strategy::default());
    if uses_agents {
        for n in &setup.notes {
            eprintln!("note: {n}");
        }
    }
    let cache: Arc<dyn cache::StepCache> = match (args.no_cache, args.cache_dir.clone().or_else(cache::default_dir)) {
        (true, _) => Arc::new(cache::NoCache),
        (false, Some(dir)) => Arc::new(cache::DiskCache::open(dir)),
        (false, None) => {
            eprintln!("warning: no cache directory (set XDG_CACHE_HOME or HOME, or --cache-dir); the cache is off");
            Arc::new(cache::NoCache)
        }
    };
    let scratch = std::env::temp_dir().join(format!("volt-local-{}-{}", std::process::id(), &plan.run.uid[..8]));
    let mut exec = Executors {
        http: HttpExecutor::new(),
        agents: setup.caller,
        agents_unavailable: setup.unavailable,
        cache: cache.clone(),
        scratch: scratch.clone(),
        parallelism: args.parallelism,
        settings: Settings::default(),
        ask: None,
    };
    let tty = std::io::stderr().is_terminal();
    let mode = match (args.output, tty, args.watch) {
        (OutputFormat::Json, false, _) => view::Mode::Quiet,
        (_, false, _) => view::Mode::Lines,
        (_, true, true) => view::Mode::Table,
        (_, true, false) => view::Mode::Bar,
    };
    if mode != view::Mode::Quiet {
        let what = if plan.workflow_name.is_empty() {
            "an inline Workflow".into()
        } else {
            format!("Workflow/{}", plan.workflow_name)
        };
        eprintln!(
            "running {what} as {} ({} steps) on this machine; cache: {}",
            plan.run.name,
            plan.dag.len(),
            cache.describe()
        );
    }
    let cancel = CancellationToken::new();
    let signals = interrupts(cancel.clone());
    let mut live = view::View::new(mode, &plan);
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        exec.ask = Some(terminal_ask(live.pause()));
    }
    let (status, stats) = runner::run(&plan, &exec, &mut live, cancel).await;
    live.finish();
    if let Some(s) = signals {
        s.abort();
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(dir) = &args.transcripts
        && let Err(e) = write_transcripts(dir, &status)
    {
        eprintln!("error: writing transcripts to {}: {e}", dir.display());
    }
    let mut out = std::io::stdout().lock();
    let written = match args.output {
        OutputFormat::Json => {
            serde_json::to_string_pretty(&status).map_err(std::io::Error::other).and_then(|s| writeln!(out, "{s}"))
        }
        OutputFormat::Text => {
            write!(out, "{}", view::summary(&plan, &status, &stats, &cache.describe(), started.elapsed()))
        }
    };
    if let Err(e) = written
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing the result: {e}");
    }
    if status.phase == RunPhase::Succeeded { EXIT_OK } else { EXIT_FAILED }
}

/// Asks on the terminal for the decision on a waiting approval, one question at a time:
/// `y [comment]` approves, `n [comment]` rejects; end of input leaves it waiting.
fn terminal_ask(pause: view::Pause) -> runner::Ask {
    let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
    Arc::new(move |key: String, message: String| {
        let (turn, pause) = (one_at_a_time.clone(), pause.clone());
        Box::pin(async move {
            let _turn = turn.lock().await;
            tokio::task::spawn_blocking(move || pause.suspend(|| ask_line(&key, &message))).await.ok().flatten()
        })
    })
}

fn ask_line(key: &str, message: &str) -> Option<StepDecision> {
    let by = Some(std::env::var("USER").unwrap_or_else(|_| "local".into()));
    loop {
        eprint!("\napproval {key}: {message}\n  approve? y [comment] / n [comment]: ");
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim();
        let (word, comment) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let comment = Some(comment.trim().to_string()).filter(|c| !c.is_empty());
        let decision = match word.to_lowercase().as_str() {
            "y" | "yes" => DecisionKind::Approve,
            "n" | "no" => DecisionKind::Reject,
            _ => continue,
        };
        return Some(StepDecision { decision, comment, by });
    }
}

/// First Ctrl-C (or SIGTERM, SIGHUP): cancel the run (running steps stop, finally steps run).
/// Second: kill every step process and exit at once. The handlers are in place when this
/// returns (step processes run in their own process groups and do not get these signals).
#[cfg(unix)]
fn interrupts(cancel: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).ok()?;
    let mut term = signal(SignalKind::terminate()).ok()?;
    let mut hup = signal(SignalKind::hangup()).ok()?;
    Some(tokio::spawn(async move {
        for round in 0..2 {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            if round == 0 {
                cancel.cancel();
            }
        }
        process::kill_all();
        eprintln!("interrupted");
        std::process::exit(130);
    }))
}

#[cfg(not(unix))]
fn interrupts(cancel: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    Some(tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.cancel();
        }
        if tokio::signal::ctrl_c().await.is_ok() {
            process::kill_all();
            std::process::exit(130);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> LocalRunArgs {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: LocalRunArgs,
        }
        let mut argv = vec!["t", "x.yaml"];
        argv.extend_from_slice(extra);
        T::parse_from(argv).a
    }

    fn bundle(text: &str) -> Bundle {
        let mut b = Bundle::default();
        load::load_text("f.yaml", text, &mut b);
        check::check_bundle(&mut b);
        assert!(!b.has_errors(), "{:?}", b.problems);
        b
    }

    const WF: &str = "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: hello}\n\
                      spec: {params: [{name: who, default: world}], steps: [{id: greet, template: 'Hello {{ params.who }}'}]}\n";

    #[test]
    fn a_single_workflow_runs_with_params_from_flags_and_run() {
        let b = bundle(WF);
        let p = plan(&b, &args(&["--param", "who=you"])).expect("plan");
        assert_eq!((p.run.name.as_str(), p.run.namespace.as_str()), ("hello-local", "default"));
        assert_eq!(p.params["who"], Json::from("you"));
        assert_eq!(p.timeout, DEFAULT_RUN_TIMEOUT);
        let err = plan(&b, &args(&["--param", "whom=x"])).expect_err("unknown param");
        assert!(err[0].to_string().contains("spec.params.whom: the workflow has no parameter"), "{}", err[0]);

        let with_run = format!(
            "{WF}---\napiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {{generateName: hi-, namespace: team}}\n\
             spec: {{workflowRef: {{name: hello}}, params: {{who: run}}, timeoutSeconds: 5}}\n"
        );
        let p = plan(&bundle(&with_run), &args(&[])).expect("plan");
        assert!(p.run.name.starts_with("hi-") && p.run.name.len() == 8, "{}", p.run.name);
        assert_eq!((p.run.namespace.as_str(), p.timeout), ("team", Duration::from_secs(5)));
        assert_eq!(p.params["who"], Json::from("run"));
    }

    #[test]
    fn several_workflows_need_a_choice() {
        let two = format!("{WF}---\n{}", WF.replace("name: hello", "name: other"));
        let b = bundle(&two);
        let err = plan(&b, &args(&[])).expect_err("ambiguous");
        assert!(err[0].message.contains("--workflow NAME"), "{}", err[0]);
        assert_eq!(plan(&b, &args(&["--workflow", "other"])).expect("chosen").workflow_name, "other");
    }

    #[test]
    fn uuids_look_like_uuids() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
    }
}
