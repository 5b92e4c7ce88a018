//! Traces, end to end: the operator binary (under the chart's rights) exports OTLP/HTTP to a
//! receiver of the test, which decodes the spans. One run has an agent step with a tool loop
//! (the OpenAI-compatible stub and the official Python MCP SDK), an HTTP step and a child run;
//! the test checks the tree run -> step -> call, the GenAI attributes, that every call carried
//! its span's `traceparent` (LLM and HTTP headers, the MCP request's `_meta`), and that the
//! child run's spans join the parent's trace under the step that started it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::get;
use kube::ResourceExt;
use serde_json::json;
use volt_operator::api::RunPhase;

use crate::kit::mcp::McpPeer;
use crate::kit::openai::{Reply, Stub, next_ip};
use crate::kit::otlp::{Receiver, Span};
use crate::kit::{Env, LogDir, OperatorProcess, control_plane, endpoint_agent, grant_operator, run_obj, serve_on};

const LONG: Duration = Duration::from_secs(90);

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(
        found.len(),
        1,
        "one span {name:?} expected; got {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    found[0]
}

fn header(s: &Span) -> String {
    format!("00-{}-{}-01", s.trace_id, s.span_id)
}

#[tokio::test]
async fn runs_steps_and_their_calls_are_traced_over_otlp_with_genai_attributes_and_traceparent() {
    let e = Env::new("traces").await;
    grant_operator(&e.client, &e.ns).await;
    let receiver = Receiver::start().await;
    let dir = LogDir::new("traces");
    let op = OperatorProcess::builder(control_plane::shared().operator_kubeconfig_path(), dir.join("operator.log"))
        .namespaces(&[e.ns.as_str()])
        .args(["--health-check-interval", "1", "--log-format", "text"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .start(LONG)
        .await;

    // The model asks for a tool, then answers; the tool is a real MCP server.
    let mcp = McpPeer::start(None).await;
    let stub = Stub::start("tracer", Duration::from_millis(20)).await;
    stub.script([Reply::ToolCalls(vec![("add".into(), json!({"a": 2, "b": 40}))]), Reply::EchoTool]);
    e.apply(endpoint_agent(
        "tracer",
        &stub.base_url(),
        json!({"tools": [{"name": "calc", "url": mcp.url(), "allow": ["add"]}]}),
    ))
    .await;
    // The HTTP step's server records the traceparent it gets.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    // On an address of its own: 127.0.0.1 is the cluster API's, which HTTP steps may not reach.
    let http = serve_on(
        next_ip(),
        axum::Router::new().route(
            "/data",
            get(move |headers: HeaderMap| {
                let record = record.clone();
                async move {
                    let tp = headers.get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    record.lock().unwrap_or_else(|p| p.into_inner()).push(tp);
                    "data"
                }
            }),
        ),
    )
    .await;
    e.apply(json!({"apiVersion": "volt.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "leaf"},
        "spec": {"steps": [{"id": "echo", "template": "leaf of {{ params.from }}"}], "params": [{"name": "from"}],
                 "output": "{{ steps.echo.output }}"}}))
        .await;
    e.apply(run_obj(
        "traced",
        json!({"steps": [
            {"id": "ask", "agent": {"ref": "tracer", "prompt": "Add", "tools": ["add"], "maxTurns": 3}},
            {"id": "fetch", "http": {"url": format!("http://{http}/data?token=secret-in-query")}},
            {"id": "child", "dependsOn": ["fetch"], "workflow": {"ref": "leaf", "params": {"from": "{{ steps.fetch.output }}"}}}
        ]}),
    ))
    .await;
    let s = e.finished("traced", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    let run = e.runs.get("traced").await.expect("run");
    let uid = run.uid().expect("uid");
    let trace = s.trace_id.clone();
    assert_eq!(trace.len(), 32, "status.traceId: {s:#?}");
    let child = e.runs.get("traced-child-1").await.expect("child run");
    assert_eq!(child.status.as_ref().map(|s| s.trace_id.as_str()), Some(trace.as_str()), "the child shares the trace");

    // Wait for both runs' spans (the child ends first, the parent last).
    let spans = receiver
        .wait_for(LONG, |spans| spans.iter().filter(|s| s.trace_id == trace && s.name.starts_with("run ")).count() >= 2)
        .await;
    let spans: Vec<Span> = spans.into_iter().filter(|s| s.trace_id == trace).collect();
    assert!(spans.iter().all(|s| s.service == "volt-operator"), "service.name");

    // The run's span is the root; each step's span is its child.
    let root = spans.iter().find(|s| s.name.starts_with("run ") && s.parent.is_empty()).expect("the run's root span");
    assert_eq!(root.attr("volt.run.uid"), uid);
    assert_eq!(root.attr("volt.run.phase"), "Succeeded");
    assert_eq!(root.attr("k8s.namespace.name"), e.ns);
    let ask = one(&spans, "step ask");
    let fetch = one(&spans, "step fetch");
    let child_step = one(&spans, "step child");
    for step in [ask, fetch, child_step] {
        assert_eq!(step.parent, root.span_id, "{} is the run's child", step.name);
        assert!(step.start_ns >= root.start_ns && step.end_ns <= root.end_ns, "{} within the run", step.name);
        assert_eq!(step.attr("volt.step.phase"), "Succeeded");
    }
    assert_eq!(ask.attr("volt.step.kind"), "agent");
    assert!(ask.attr("gen_ai.usage.input_tokens").parse::<u64>().is_ok_and(|t| t > 0), "{ask:#?}");

    // Two model calls under the agent step, with the GenAI attributes; each sent its traceparent.
    let chats: Vec<&Span> = spans.iter().filter(|s| s.name == "chat stub-model").collect();
    assert_eq!(chats.len(), 2, "{spans:#?}");
    for c in &chats {
        assert_eq!(c.parent, ask.span_id);
        assert_eq!(c.kind, 3, "a client span");
        assert_eq!(c.attr("gen_ai.operation.name"), "chat");
        assert_eq!(c.attr("gen_ai.system"), "openai");
        assert_eq!(c.attr("gen_ai.request.model"), "stub-model");
        assert_eq!(c.attr("gen_ai.response.model"), "stub-model");
        assert!(c.attr("gen_ai.usage.input_tokens").parse::<u64>().is_ok(), "{c:#?}");
        assert!(c.attr("gen_ai.usage.output_tokens").parse::<u64>().is_ok(), "{c:#?}");
        assert_eq!(c.attr("volt.run.uid"), uid);
        assert_eq!(c.attr("volt.step.attempt"), "1");
        assert_eq!(c.attr("server.address"), stub.ip().to_string());
    }
    let mut reasons: Vec<String> = chats.iter().map(|c| c.attr("gen_ai.response.finish_reasons")).collect();
    reasons.sort();
    assert_eq!(reasons, [r#"["stop"]"#, r#"["tool_calls"]"#]);
    let mut sent: Vec<String> = stub.seen().iter().map(|r| r.traceparent.clone().unwrap_or_default()).collect();
    let mut expected: Vec<String> = chats.iter().map(|c| header(c)).collect();
    sent.sort();
    expected.sort();
    assert_eq!(sent, expected, "each LLM request carries its span's traceparent");

    // The tool call, under the agent step; the MCP server got its traceparent in `_meta`.
    let tool = one(&spans, "execute_tool add");
    assert_eq!(tool.parent, ask.span_id);
    assert_eq!(tool.attr("gen_ai.tool.name"), "add");
    assert_eq!(tool.attr("gen_ai.operation.name"), "execute_tool");
    assert!(!tool.attr("gen_ai.tool.call.id").is_empty());
    assert_eq!(mcp.traces(), [format!("add {}", header(tool))]);

    // The HTTP call, under its step, with the query (a secret, here) left out of the URL.
    let get = one(&spans, "GET");
    assert_eq!(get.parent, fetch.span_id);
    assert_eq!(get.attr("http.request.method"), "GET");
    assert_eq!(get.attr("http.response.status_code"), "200");
    assert_eq!(get.attr("url.full"), format!("http://{http}/data"));
    assert_eq!(*seen.lock().unwrap_or_else(|p| p.into_inner()), [header(get)]);

    // The child run's span continues the parent's trace under the step that started it.
    let leaf = one(&spans, "run leaf");
    assert_eq!(leaf.parent, child_step.span_id);
    assert_eq!(leaf.attr("volt.run.name"), "traced-child-1");
    let echo = one(&spans, "step echo");
    assert_eq!(echo.parent, leaf.span_id);
    assert!(spans.iter().all(|s| !s.attributes.values().any(|v| v.to_string().contains("secret-in-query"))));
    op.assert_no_panic();
}
