//! Agent steps in local mode: any OpenAI-compatible server, MCP tools, structured output,
//! transcripts, traces, Budgets.

use super::*;

/// (authorization header, request body) of each call the fake server received.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A one-endpoint OpenAI-compatible server on loopback: answers every chat completion with
/// `reply`, and records each request's Authorization header and body.
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
