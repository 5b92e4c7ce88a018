//! Local mode end to end: the built binary on example files, with no cluster.
//!
//! Each test uses its own cache directory (`XDG_CACHE_HOME` in a temporary directory).

#[path = "kit/mod.rs"]
mod kit;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use kit::{operator_bin, repo};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn json(&self) -> Json {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

fn volt(cache: &Path, args: &[&str]) -> Run {
    volt_with(cache, args, &[])
}

/// [`volt`] with more environment variables.
fn volt_with(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let started = Instant::now();
    let out: Output = Command::new(operator_bin())
        .args(args)
        .envs(env.iter().copied())
        .env("XDG_CACHE_HOME", cache)
        .env_remove("VOLT_LOCAL_CACHE_DIR")
        .env_remove("OPENAI_API_KEY")
        .current_dir(repo(""))
        .output()
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write a test file");
    p.display().to_string()
}

const WORKFLOW: &str = "apiVersion: volt.dev/v1alpha1\nkind: Workflow\n";

#[test]
fn the_example_pipeline_succeeds_and_a_second_run_hits_the_cache() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let example = repo("examples/local/pipeline.yaml").display().to_string();

    let first = volt(tmp.path(), &["local", "run", &example, "--output", "json"]);
    assert_eq!(first.code, 0, "stderr:\n{}", first.stderr);
    let status = first.json();
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    assert_eq!(status["progress"], "6/6");
    let steps = &status["steps"];
    assert_eq!(steps["plan"]["output"], r#"["api","engine","executors","local"]"#);
    assert_eq!(steps["build"]["items"], 4);
    assert_eq!(steps["test"]["output"], "4 artifacts tested");
    assert_eq!(steps["describe"]["phase"], "Skipped");
    assert_eq!(steps["report"]["output"], "run local-demo-local Succeeded");
    assert!(steps["build[0]"]["message"].as_str().is_some_and(|m| m.contains("image alpine:3.20 not used")));
    assert_eq!(steps["build"]["cached"], Json::Null, "nothing cached on the first run");
    assert!(
        status["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
    );
    let cache_dir = tmp.path().join("volt-operator/local-cache");
    let entries = std::fs::read_dir(&cache_dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 5, "four build items and the test step are cached in {}", cache_dir.display());

    let second = volt(tmp.path(), &["local", "run", &example, "--output", "json"]);
    assert_eq!(second.code, 0, "stderr:\n{}", second.stderr);
    let again = second.json();
    for key in ["build", "build[0]", "build[3]", "test"] {
        assert_eq!(again["steps"][key]["cached"], true, "{key} comes from the cache: {again:#}");
    }
    assert_eq!(again["steps"]["notes"]["output"], steps["notes"]["output"]);
    // The first run sleeps through its container steps (about 3 s); the second runs none.
    assert!(second.took < first.took, "second {:?} vs first {:?}", second.took, first.took);
    assert!(first.took >= Duration::from_secs(2), "the first run runs its steps: {:?}", first.took);
    eprintln!("example pipeline: first run {:?}, second run (cache hits) {:?}", first.took, second.took);
}

#[test]
fn text_output_has_a_summary_table_and_plain_lines_without_a_terminal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "hello.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: hello}}\nspec:\n  params: [{{name: who, default: world}}]\n  steps:\n  \
             - {{id: greet, template: 'Hello, {{{{ params.who }}}}'}}\n  \
             - id: shout\n    dependsOn: [greet]\n    container: {{image: busybox, command: [sh, -c, 'echo \"{{{{ steps.greet.output }}}}!\" > /dev/termination-log']}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "--param", "who=you"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("STEP"), "{}", run.stdout);
    assert!(run.stdout.lines().any(|l| l.starts_with("shout") && l.contains("Succeeded")), "{}", run.stdout);
    assert!(run.stdout.contains("output: Hello, you!"), "{}", run.stdout);
    assert!(run.stdout.contains("run hello-local Succeeded"), "{}", run.stdout);
    assert!(run.stdout.contains("container steps (shout) ran as local processes; their images were not used"));
    assert!(run.stderr.contains("greet") && run.stderr.contains("Succeeded"), "plain lines on stderr: {}", run.stderr);
}

#[test]
fn a_failing_step_fails_the_run_with_exit_code_1_and_finally_still_runs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "fail.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: broken}}\nspec:\n  steps:\n  - id: flaky\n    retry: {{limit: 1, backoff: {{initialSeconds: 0.1}}}}\n    \
             container: {{image: busybox, command: [sh, -c, 'echo disk full >&2; exit 7']}}\n  \
             - {{id: after, dependsOn: [flaky], template: never}}\n  \
             - {{id: image-only, container: {{image: busybox}}, continueOnError: true}}\n  \
             finally:\n  - {{id: report, template: '{{{{ run.phase }}}}'}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let status = run.json();
    assert_eq!(status["phase"], "Failed");
    let flaky = &status["steps"]["flaky"];
    assert_eq!(flaky["attempts"], 2);
    let msg = flaky["message"].as_str().unwrap_or_default();
    assert!(msg.contains("exited with code 7") && msg.contains("disk full"), "{msg}");
    assert_eq!(status["steps"]["after"]["phase"], "Skipped");
    let image_only = status["steps"]["image-only"]["message"].as_str().unwrap_or_default();
    assert!(image_only.contains("local mode cannot run images"), "{image_only}");
    assert_eq!(status["steps"]["report"]["output"], "Failed");
}

/// By default local mode runs a fan-out as wide as its `maxParallel`: twelve processes wait
/// for each other at a barrier, which a cap below twelve would never let them reach. A step id
/// with a hyphen is read as `steps['fan-out']`.
#[test]
fn a_fan_out_runs_max_parallel_items_at_once_and_hyphenated_ids_are_read_by_subscript() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let barrier = tmp.path().join("barrier");
    std::fs::create_dir_all(&barrier).expect("barrier dir");
    let wait = format!(
        "touch {dir}/$VOLT_STEP_KEY; for i in $(seq 150); do [ $(ls {dir} | wc -l) -ge 12 ] && \\
         {{ printf ok > /dev/termination-log; exit 0; }}; sleep 0.1; done; exit 1",
        dir = barrier.display()
    );
    let file = write(
        tmp.path(),
        "wide.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: wide}}\nspec:\n  steps:\n  - id: fan-out\n    forEach: '{{{{ range(12) | list }}}}'\n    \
             maxParallel: 12\n    container: {{image: busybox, command: [sh, -c, {wait:?}]}}\n  \
             - {{id: count, dependsOn: [fan-out], template: \"{{{{ steps['fan-out'].json | length }}}} {{{{ steps['fan-out'].phase }}}}\"}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json", "--no-cache"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stderr, run.stdout);
    let status = run.json();
    assert_eq!(status["steps"]["count"]["output"], "12 Succeeded");
    assert_eq!(std::fs::read_dir(&barrier).expect("barrier").count(), 12);
}

#[test]
fn invalid_files_exit_2_naming_file_object_step_and_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "bad.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: bad}}\nspec:\n  steps:\n  - {{id: a, template: x}}\n  \
             - {{id: b, dependsOn: [a, nope], template: why}}\n  - {{id: c, template: z, retry: {{limit: 1000}}}}\n  \
             - {{id: d, dependOn: [a], template: w}}\n"
        ),
    );
    for cmd in ["validate", "run"] {
        let run = volt(tmp.path(), &["local", cmd, &file]);
        assert_eq!(run.code, 2, "{cmd}: {}", run.stderr);
        let want = format!(
            "error: {file}: Workflow/bad: step \"c\": spec.steps[2].retry.limit: 1000 is more than the maximum 100"
        );
        assert!(run.stderr.contains(&want), "{cmd}: {}", run.stderr);
        let want = format!(
            "error: {file}: Workflow/bad: step \"d\": spec.steps[3].dependOn: unknown field; did you mean \"dependsOn\"?"
        );
        assert!(run.stderr.contains(&want), "{cmd}: {}", run.stderr);
    }
    // Once the schema is right, the controller's DAG checks speak.
    let file = write(
        tmp.path(),
        "dag.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: dag}}\nspec:\n  steps:\n  - {{id: a, template: x}}\n  - {{id: b, dependsOn: [a, nope], template: why}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "validate", &file]);
    assert_eq!(run.code, 2);
    let want = format!("error: {file}: Workflow/dag: step \"b\": spec.steps[1].dependsOn: unknown step \"nope\"");
    assert!(run.stderr.contains(&want), "{}", run.stderr);
}

#[test]
fn validate_accepts_the_examples_and_checks_runs_and_params() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = volt(tmp.path(), &["local", "validate", "examples/local", "examples/spec"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.starts_with("valid: 5 files: 3 Agents, 2 Workflows, 1 WorkflowRun (1 warning)"),
        "{}",
        run.stdout
    );
    // The schedule of examples/spec is checked against its type, and said to act in a cluster only.
    assert!(
        run.stderr.contains("WorkflowSchedule/nightly-pipeline: WorkflowSchedule is checked here"),
        "{}",
        run.stderr
    );

    let file = write(
        tmp.path(),
        "run.yaml",
        "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {generateName: dev-}\n\
         spec: {workflowRef: {name: development-pipeline}, params: {technology: Go}}\n",
    );
    let spec_wf = repo("examples/spec/workflow.yaml").display().to_string();
    let run = volt(tmp.path(), &["local", "validate", &spec_wf, &file]);
    assert_eq!(run.code, 2);
    let want = format!("error: {file}: WorkflowRun/dev-*: spec.params: required parameter \"requirements\" is missing");
    assert!(run.stderr.contains(&want), "{}", run.stderr);

    // Missing parameters on the command line are invalid input too.
    let run = volt(tmp.path(), &["local", "run", &spec_wf, "--param", "technology=Go"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("required parameter \"requirements\" is missing"), "{}", run.stderr);
}

#[test]
fn multi_document_files_with_a_run_and_json_params() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(
        tmp.path(),
        "all.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: fan}}\nspec:\n  params: [{{name: items, required: true}}]\n  steps:\n  \
             - id: each\n    forEach: '{{{{ params.items }}}}'\n    container: {{image: x, command: [sh, -c, 'printf %s $(( {{{{ item }}}} * 2 )) > $VOLT_TERMINATION_LOG']}}\n  \
             - {{id: sum, dependsOn: [each], template: \"{{{{ steps.each.json | map('int') | sum }}}}\"}}\n---\n\
             apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {{name: fan-1, namespace: team}}\n\
             spec: {{workflowRef: {{name: fan}}, params: {{items: [1, 2]}}}}\n"
        ),
    );
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.json()["steps"]["sum"]["output"], "6");
    let run = volt(tmp.path(), &["local", "run", &file, "-o", "json", "--param", "items:=[1,2,3,4]"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let status = run.json();
    assert_eq!(status["steps"]["sum"]["output"], "20");
    assert_eq!(status["steps"]["each"]["items"], 4);
    assert_eq!(status["workflowName"], "fan");
}

#[cfg(unix)]
#[test]
fn ctrl_c_cancels_the_run_and_finally_steps_still_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let started = tmp.path().join("started");
    let marker = tmp.path().join("still-running");
    let file = write(
        tmp.path(),
        "slow.yaml",
        &format!(
            "{WORKFLOW}metadata: {{name: slow}}\nspec:\n  steps:\n  - id: wait\n    \
             container: {{image: x, command: [sh, -c, 'touch {}; sleep 2; touch {}; sleep 30']}}\n  \
             finally:\n  - {{id: report, template: '{{{{ run.phase }}}}'}}\n",
            started.display(),
            marker.display()
        ),
    );
    let child = Command::new(operator_bin())
        .args(["local", "run", &file, "-o", "json"])
        .env("XDG_CACHE_HOME", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    let waiting = Instant::now();
    while !started.exists() && waiting.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: signals the child process this test started.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let out = child.wait_with_output().expect("exits");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Json = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["phase"], "Cancelled");
    assert_eq!(status["steps"]["wait"]["phase"], "Cancelled");
    assert_eq!(status["steps"]["report"]["output"], "Cancelled");
    std::thread::sleep(Duration::from_millis(2000));
    assert!(!marker.exists(), "the step's process was killed");
}

/// A one-endpoint OpenAI-compatible server on loopback: answers every chat completion with
/// `reply`, and records each request's Authorization header and body.
/// (authorization header, request body) of each call the fake server received.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

fn fake_llm(reply: &'static str) -> (String, Seen) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        // Bounded: a test makes a handful of calls.
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let (mut auth, mut len) = (String::new(), 0usize);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line != "\r\n" {
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("authorization:") {
                    auth = line["authorization:".len()..].trim().to_string();
                }
                line.clear();
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            record.lock().expect("lock").push((auth, String::from_utf8_lossy(&body).into_owned()));
            let answer = serde_json::json!({"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}})
            .to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    (format!("http://{addr}/v1"), seen)
}

#[test]
fn agent_steps_call_any_openai_compatible_server_with_the_key_from_the_environment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (base_url, seen) = fake_llm("A tidy release.");
    // A second file replaces the example's `writer` Agent with one at the fake server.
    let agent = write(
        tmp.path(),
        "agent.yaml",
        &format!(
            "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata:\n  name: writer\n  annotations: {{volt.dev/api-key-env: VOLT_TEST_KEY}}\n\
             spec: {{model: fake-model, instructions: Be brief., capabilities: [prose], endpoint: {{baseUrl: '{base_url}'}}}}\n"
        ),
    );
    let example = repo("examples/local/pipeline.yaml").display().to_string();
    let args = ["local", "run", &example, &agent, "--param", "llm=true", "--param", "modules:=[\"api\"]", "-o", "json"];
    let out = Command::new(operator_bin())
        .args(args)
        .env("XDG_CACHE_HOME", tmp.path())
        .env("VOLT_TEST_KEY", "sk-local-test")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let status: Json = serde_json::from_slice(&out.stdout).expect("JSON");
    let describe = &status["steps"]["describe"];
    assert_eq!(describe["phase"], "Succeeded", "{status:#}");
    assert_eq!(describe["output"], "A tidy release.");
    assert_eq!(describe["agent"], "writer");
    assert_eq!(describe["tokens"], serde_json::json!({"prompt": 12, "completion": 4}));
    {
        let calls = seen.lock().expect("lock");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "Bearer sk-local-test");
        let body: Json = serde_json::from_str(&calls[0].1).expect("request JSON");
        assert_eq!(body["model"], "fake-model");
        assert_eq!(body["messages"][0]["content"], "Be brief.");
        assert!(body["messages"][1]["content"].as_str().is_some_and(|p| p.contains("volt release: api-")), "{body}");
    }
    // The agent step is cached too: a second run makes no call.
    let again = Command::new(operator_bin()).args(args).env("XDG_CACHE_HOME", tmp.path()).output().expect("runs");
    assert_eq!(again.status.code(), Some(0));
    let status: Json = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(status["steps"]["describe"]["cached"], true);
    assert_eq!(status["steps"]["describe"]["tokens"]["prompt"], 12);
    assert_eq!(seen.lock().expect("lock").len(), 1);
}

const CONTROL_FLOW: &str = r#"apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: flow}
spec:
  params:
  - {name: target, default: "3"}
  output: "{{ steps.rounds.output }} after {{ steps.rounds.iterations }} rounds, signed off: {{ steps['sign-off'].output }}"
  steps:
  - id: rounds
    loop:
      maxIterations: 5
      until: "steps.review.output == params.target"
      steps:
      - id: code
        container:
          image: alpine:3.20
          command: [sh, -c, "printf 'draft %s' {{ loop.iteration }} > /dev/termination-log"]
      - id: review
        dependsOn: [code]
        template: "{{ loop.iteration }}"
  - id: cool-down
    dependsOn: [rounds]
    wait: {seconds: 1}
  - id: sign-off
    dependsOn: [cool-down]
    approval: {message: "Ship {{ steps.rounds.output }}?", timeoutSeconds: 600}
"#;

#[test]
fn loops_waits_approvals_and_the_run_output_work_in_local_mode() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "flow.yaml", CONTROL_FLOW);
    let run = volt(tmp.path(), &["local", "run", &file, "--output", "json", "--approve", "sign-off=lgtm"]);
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let status = run.json();
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    let steps = &status["steps"];
    assert_eq!(steps["rounds"]["iterations"], 3);
    assert_eq!(steps["rounds.2.code"]["phase"], "Succeeded");
    assert_eq!(steps["rounds.3.review"]["output"], "3");
    assert_eq!(steps["sign-off"]["output"], "lgtm");
    assert_eq!(steps["sign-off"]["message"].as_str().map(|m| m.starts_with("approved by")), Some(true));
    assert_eq!(status["output"], "3 after 3 rounds, signed off: lgtm");
    assert!(run.took >= Duration::from_secs(1), "the wait waited");

    // Rejected on the command line: the run fails at the sign-off.
    let run = volt(tmp.path(), &["local", "run", &file, "--output", "json", "--reject", "sign-off=not now"]);
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let status = run.json();
    assert!(status["steps"]["sign-off"]["message"].as_str().is_some_and(|m| m.ends_with(": not now")), "{status:#}");

    // A decision for a step that is not an approval is refused before anything runs.
    let run = volt(tmp.path(), &["local", "run", &file, "--approve", "rounds"]);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("--approve rounds") && run.stderr.contains("not an approval step"), "{}", run.stderr);
}

#[test]
fn local_validate_names_the_step_and_field_of_bad_control_flow() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad =
        CONTROL_FLOW.replace("until: \"steps.review.output == params.target\"", "until: \"steps.sign-off.output\"");
    let file = write(tmp.path(), "bad.yaml", &bad);
    let run = volt(tmp.path(), &["local", "validate", &file]);
    assert_eq!(run.code, 2, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("spec.steps[0].loop.until") && all.contains("not a step of the loop"), "{all}");
    let file = write(tmp.path(), "bad2.yaml", &CONTROL_FLOW.replace("      maxIterations: 5\n", ""));
    let run = volt(tmp.path(), &["local", "validate", &file]);
    let all = format!("{}{}", run.stdout, run.stderr);
    assert_eq!(run.code, 2, "{all}");
    assert!(all.contains("maxIterations"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_steps_use_mcp_tools_repair_their_output_and_write_transcripts() {
    use kit::mcp::McpPeer;
    use kit::openai::{Reply, Stub};
    let tmp = tempfile::tempdir().expect("tempdir");
    let mcp = McpPeer::start(None).await;
    let stub = Stub::start("local-llm", Duration::ZERO).await;
    stub.script([
        Reply::ToolCalls(vec![("add".into(), serde_json::json!({"a": 20, "b": 22}))]),
        // Fenced, and a string where the schema wants an integer: repaired.
        Reply::Content("```json\n{\"sum\": \"42\"}\n```".into()),
        Reply::Content("{\"sum\": 42}".into()),
    ]);
    let file = write(
        tmp.path(),
        "llm.yaml",
        &format!(
            "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {{name: calc}}\n\
             spec: {{model: stub-model, endpoint: {{baseUrl: '{}'}}, tools: [{{name: math, url: '{}', allow: [add]}}]}}\n---\n\
             {WORKFLOW}metadata: {{name: sums}}\nspec:\n  steps:\n\
             \x20 - id: ask\n    agent:\n      ref: calc\n      messages: [{{role: system, content: Use the tools.}}]\n\
             \x20     prompt: What is 20 + 22?\n      tools: [add]\n      maxTurns: 2\n\
             \x20     output: {{schema: {{type: object, required: [sum], properties: {{sum: {{type: integer}}}}}}, repairAttempts: 1}}\n\
             \x20 - id: next\n    dependsOn: [ask]\n    template: \"{{{{ steps.ask.json.sum + 1 }}}}\"\n",
            stub.base_url(),
            mcp.url()
        ),
    );
    let dir = tmp.path().join("transcripts");
    let dir_arg = dir.display().to_string();
    let cache = tmp.path().to_path_buf();
    let run = tokio::task::spawn_blocking(move || {
        volt(&cache, &["local", "run", &file, "--no-cache", "-o", "json", "--transcripts", &dir_arg])
    })
    .await
    .expect("run");
    assert_eq!(run.code, 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let status = run.json();
    assert_eq!(status["steps"]["ask"]["output"], r#"{"sum":42}"#);
    assert_eq!(status["steps"]["next"]["output"], "43");
    assert_eq!(mcp.calls(), ["add auth=ok"]);
    assert_eq!(stub.requests(), 3);
    let t: Json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ask.json")).expect("transcript")).expect("json");
    assert_eq!((t["turns"].as_u64(), t["repairs"].as_u64()), (Some(1), Some(1)), "{t:#}");
    let tool = t["entries"].as_array().and_then(|e| e.iter().find(|x| x["kind"] == "tool")).cloned();
    assert_eq!(tool.map(|x| x["name"].clone()), Some(serde_json::json!("add")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_runs_export_traces_that_continue_the_callers_traceparent() {
    use kit::openai::{Reply, Stub};
    use kit::otlp::Receiver;
    let tmp = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start().await;
    let stub = Stub::start("local-traced", Duration::ZERO).await;
    stub.script([Reply::Content("hello".into())]);
    let file = write(
        tmp.path(),
        "traced.yaml",
        &format!(
            "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {{name: talker}}\n\
             spec: {{model: stub-model, endpoint: {{baseUrl: '{}'}}}}\n---\n\
             {WORKFLOW}metadata: {{name: traced}}\nspec:\n  steps:\n\
             \x20 - id: ask\n    agent: {{ref: talker, prompt: Hi}}\n\
             \x20 - id: proc\n    container:\n      image: busybox\n\
             \x20     command: [sh, -c, 'printf %s \"$TRACEPARENT\" > \"$VOLT_TERMINATION_LOG\"']\n",
            stub.base_url()
        ),
    );
    // The caller's trace (a CI job, say): the run's span becomes a child of its span.
    let (trace, caller) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{caller}-01");
    let endpoint = receiver.endpoint();
    let cache = tmp.path().to_path_buf();
    let run = tokio::task::spawn_blocking(move || {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("TRACEPARENT", traceparent.as_str()),
        ];
        volt_with(&cache, &["local", "run", &file, "--no-cache", "-o", "json"], &env)
    })
    .await
    .expect("run");
    assert_eq!(run.code, 0, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let status = run.json();
    assert_eq!(status["traceId"], trace, "{status:#}");
    // The spans were flushed before the process ended: no waiting needed.
    let spans = receiver.spans();
    assert!(receiver.requests().iter().all(|c| c.starts_with("application/json")), "{:?}", receiver.requests());
    let named = |name: &str| {
        spans.iter().find(|s| s.name == name).cloned().unwrap_or_else(|| panic!("no span {name:?} in {spans:#?}"))
    };
    let root = named("run traced");
    assert_eq!((root.trace_id.as_str(), root.parent.as_str()), (trace, caller));
    let (ask, proc) = (named("step ask"), named("step proc"));
    assert_eq!((ask.parent.as_str(), proc.parent.as_str()), (root.span_id.as_str(), root.span_id.as_str()));
    let chat = named("chat stub-model");
    assert_eq!(chat.parent, ask.span_id);
    assert_eq!(chat.attr("gen_ai.response.finish_reasons"), r#"["stop"]"#);
    // The process step got its step's span as TRACEPARENT, so its own spans would join.
    assert_eq!(status["steps"]["proc"]["output"], format!("00-{trace}-{}-01", proc.span_id), "{status:#}");

    // A protocol that is not built in is refused up front, naming the variable.
    let (cache, file) = (tmp.path().to_path_buf(), tmp.path().join("traced.yaml").display().to_string());
    let endpoint = receiver.endpoint();
    let run = tokio::task::spawn_blocking(move || {
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")];
        volt_with(&cache, &["local", "run", &file, "--no-cache", "-o", "json"], &env)
    })
    .await
    .expect("run");
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\"") && run.stderr.contains("http/protobuf"),
        "{}",
        run.stderr
    );
}

const CHILDREN: &str = r#"
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: release}
spec:
  params: [{name: version}]
  output: "{{ steps.notes.output }} / {{ steps.each.output }}"
  steps:
  - id: build
    template: "build-{{ params.version }}"
  - id: notes
    dependsOn: [build]
    workflow: {ref: testing, params: {target: "{{ steps.build.output }}", rounds: 2}}
  - id: each
    forEach: '["a", "b"]'
    workflow: {ref: testing, params: {target: "{{ item }}"}}
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: testing}
spec:
  params: [{name: target}, {name: rounds, default: 1}]
  output: "tested {{ params.target }} x{{ params.rounds }}"
  steps:
  - id: test
    template: "ok"
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: ping}
spec:
  steps:
  - id: call
    workflow: {ref: pong}
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: pong}
spec:
  steps:
  - id: call
    workflow: {ref: ping}
---
apiVersion: volt.dev/v1alpha1
kind: Workflow
metadata: {name: lost}
spec:
  steps:
  - id: call
    workflow: {ref: nowhere}
"#;

#[test]
fn workflow_steps_run_child_runs_in_process_and_cycles_and_missing_workflows_fail_naming_the_chain() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = write(tmp.path(), "children.yaml", CHILDREN);
    let run =
        volt(tmp.path(), &["local", "run", &file, "--workflow", "release", "--param", "version=7", "--output", "json"]);
    assert_eq!(run.code, 0, "stderr:\n{}", run.stderr);
    let status = run.json();
    assert_eq!(status["phase"], "Succeeded", "{status:#}");
    assert_eq!(status["steps"]["notes"]["output"], "tested build-7 x2");
    assert_eq!(status["steps"]["each[1]"]["output"], "tested b x1");
    assert_eq!(
        status["output"], "tested build-7 x2 / [\"tested a x1\",\"tested b x1\"]",
        "a fan-out of child runs gathers their outputs"
    );

    // ping -> pong -> ping: the second ping is refused, naming the chain.
    let run = volt(tmp.path(), &["local", "run", &file, "--workflow", "ping", "--output", "json"]);
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let status = run.json();
    let message = status["steps"]["call"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("cycle") && message.contains("ping -> pong -> ping"), "{status:#}");

    let run = volt(tmp.path(), &["local", "run", &file, "--workflow", "lost", "--output", "json"]);
    assert_eq!(run.code, 1, "stderr:\n{}", run.stderr);
    let message = run.json()["steps"]["call"]["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("workflow.ref") && message.contains("\"nowhere\"") && message.contains("lost -> nowhere"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_and_a_runs_own_budget_refuse_the_call_that_would_go_over() {
    use kit::openai::Stub;
    let tmp = tempfile::tempdir().expect("tempdir");
    let stub = Stub::start("local-budget", Duration::ZERO).await;
    // Each call reserves its prompt's estimate plus maxTokens (50) and uses about 10 tokens.
    let file = write(
        tmp.path(),
        "spend.yaml",
        &format!(
            "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {{name: b}}\n\
             spec: {{model: stub-model, parameters: {{maxTokens: 50}}, endpoint: {{baseUrl: '{}'}}}}\n---\n\
             apiVersion: volt.dev/v1alpha1\nkind: Budget\nmetadata: {{name: small}}\n\
             spec: {{window: Daily, maxTokens: 150, onExceeded: Suspend, selector: {{workflows: [spend], agents: [b]}}}}\n---\n\
             {WORKFLOW}metadata: {{name: spend}}\nspec:\n  steps:\n\
             \x20 - id: ask\n    forEach: '[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20]'\n    maxParallel: 1\n\
             \x20   agent: {{ref: b, prompt: 'item {{{{ item }}}}'}}\n",
            stub.base_url()
        ),
    );
    let cache = tmp.path().to_path_buf();
    let args = ["local", "run", file.as_str(), "--no-cache", "-o", "json"].map(String::from);
    let run =
        tokio::task::spawn_blocking(move || volt(&cache, &args.each_ref().map(String::as_str))).await.expect("run");
    // The step that would go over fails naming the Budget; no call went over it; and Suspend,
    // which a local run cannot do, fails the step rather than wait.
    assert_eq!(run.code, 1, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("Budget/small: onExceeded Suspend fails the step in local mode"), "{}", run.stderr);
    let status = run.json();
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("budget \"small\" (Daily window from"), "{status:#}");
    assert!(message.contains("maxTokens 150"), "{message}");
    let rows: Vec<&Json> = status["steps"].as_object().expect("steps").values().collect();
    let answered: Vec<u64> = rows
        .iter()
        .filter_map(|r| Some(r["tokens"]["prompt"].as_u64()? + r["tokens"]["completion"].as_u64()?))
        .collect();
    assert!(answered.len() >= 2 && answered.len() < 20, "some calls, not all: {answered:?}");
    assert!(answered.iter().sum::<u64>() <= 150, "never over the budget: {answered:?}");
    assert_eq!(stub.requests(), answered.len(), "a call per answered step, none refused after it was sent");

    // A WorkflowRun's own spec.budget, too small for one call: refused before it is sent.
    let before = stub.requests();
    let own = write(
        tmp.path(),
        "own.yaml",
        "apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {name: own}\n\
         spec: {workflowRef: {name: spend}, budget: {maxTokens: 10}}\n",
    );
    let cache = tmp.path().to_path_buf();
    let args = ["local", "run", file.as_str(), own.as_str(), "--no-cache", "-o", "json"].map(String::from);
    let run =
        tokio::task::spawn_blocking(move || volt(&cache, &args.each_ref().map(String::as_str))).await.expect("run");
    assert_eq!(run.code, 1, "stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    let status = run.json();
    assert!(
        status["message"].as_str().is_some_and(|m| m.contains("the run's spec.budget: 0 tokens used")),
        "{status:#}"
    );
    assert_eq!(stub.requests(), before, "no call went out");
}
