//! LLM steps that do agent work, end to end with the real async-openai client: structured
//! output with repair, multi-turn messages, transcripts in ConfigMaps owned by the run, and
//! tools from a real MCP server (the official Python SDK) in a bounded tool loop. The model is
//! the OpenAI-compatible stub, scripted to answer with fenced, invalid and valid JSON and to
//! ask for tool calls.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use volt_operator::api::{RunPhase, StepPhase, WorkflowRunStatus};

use crate::kit::mcp::McpPeer;
use crate::kit::openai::{Reply, Stub};
use crate::kit::{Env, Operator, endpoint_agent, kubectl, run_obj, step, wait_for};

const LONG: Duration = Duration::from_secs(90);
const API_KEY: &str = "sk-e2e-llm-0123456789abcdef";
const MCP_TOKEN: &str = "Bearer mcp-e2e-token-7f3a9c";

async fn secret(e: &Env, name: &str, data: Value) {
    let s: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name}, "stringData": data}))
    .expect("secret");
    Api::<Secret>::namespaced(e.client.clone(), &e.ns).create(&PostParams::default(), &s).await.expect("create secret");
}

/// The transcript of step `key`, read from the ConfigMap its row names; checks the ConfigMap
/// is owned by the run.
async fn transcript(e: &Env, run: &str, s: &WorkflowRunStatus, key: &str) -> (String, Value) {
    let r = step(s, key).transcript_ref.clone().unwrap_or_else(|| panic!("no transcriptRef on {key}: {s:#?}"));
    let cm = Api::<ConfigMap>::namespaced(e.client.clone(), &e.ns).get(&r.config_map).await.expect("transcript cm");
    let owners = cm.owner_references();
    assert!(owners.iter().any(|o| o.kind == "WorkflowRun" && o.name == run), "{owners:?}");
    let text = cm.data.and_then(|mut d| d.remove(&r.key)).expect("transcript key");
    assert_eq!(text.len() as u64, r.size);
    let v: Value = serde_json::from_str(&text).expect("transcript json");
    (text, v)
}

/// Everything of the run a user sees (status, events, ConfigMaps of the namespace), as text.
async fn everything(e: &Env, run: &str) -> String {
    let status = e.runs.get(run).await.expect("run").status;
    let events = Api::<Event>::namespaced(e.client.clone(), &e.ns).list(&ListParams::default()).await.expect("events");
    let cms = Api::<ConfigMap>::namespaced(e.client.clone(), &e.ns).list(&ListParams::default()).await.expect("cms");
    format!(
        "{}\n{}\n{}",
        serde_json::to_string(&status).unwrap_or_default(),
        events.items.iter().map(|e| e.message.clone().unwrap_or_default()).collect::<Vec<_>>().join("\n"),
        serde_json::to_string(&cms.items).unwrap_or_default()
    )
}

#[tokio::test]
async fn output_schema_repairs_invalid_replies_and_the_transcript_records_it() {
    let e = Env::new("llm-schema").await;
    let _op = Operator::start(&e.ns).await;
    let stub = Stub::start("planner", Duration::ZERO).await;
    // A fenced reply of the wrong shape (which also echoes the API key), then a fenced valid one.
    stub.script([
        Reply::Content(format!("Sure ({API_KEY}):\n```json\n{{\"tasks\": [1, 2]}}\n```")),
        Reply::Content("```json\n{\"tasks\": [\"write\", \"test\"]}\n```".into()),
    ]);
    secret(&e, "openai", json!({"api-key": API_KEY})).await;
    e.apply(endpoint_agent(
        "planner",
        &stub.base_url(),
        json!({"instructions": "You plan.", "apiKeySecretRef": {"name": "openai", "key": "api-key"}}),
    ))
    .await;
    let schema = json!({"type": "object", "required": ["tasks"],
                        "properties": {"tasks": {"type": "array", "items": {"type": "string"}}}});
    e.apply(run_obj(
        "plan",
        json!({"params": [{"name": "tone", "default": "terse"}], "steps": [
            {"id": "tasks", "agent": {"ref": "planner",
                "messages": [{"role": "system", "content": "Be {{ params.tone }}."},
                             {"role": "user", "content": "We build a CLI."},
                             {"role": "assistant", "content": "Noted."}],
                "prompt": "List the tasks.",
                "output": {"schema": schema, "repairAttempts": 2}}},
            {"id": "count", "dependsOn": ["tasks"], "template": "{{ steps.tasks.json.tasks | length }}"}
        ]}),
    ))
    .await;
    let s = e.finished("plan", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "tasks").output.as_deref(), Some(r#"{"tasks":["write","test"]}"#));
    assert_eq!(step(&s, "count").output.as_deref(), Some("2"));

    // The repair re-asked: two requests, the second carrying the validation error.
    let seen = stub.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let first = &seen[0].body;
    assert_eq!(first["response_format"]["type"], "json_schema");
    assert_eq!(first["response_format"]["json_schema"]["schema"], schema);
    let roles: Vec<&str> =
        first["messages"].as_array().expect("messages").iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(roles, ["system", "system", "user", "assistant", "user"]);
    assert_eq!(first["messages"][1]["content"], "Be terse.");
    assert_eq!(first["messages"][4]["content"], "List the tasks.");
    let second = seen[1].body["messages"].as_array().expect("messages").clone();
    let repair = second.last().and_then(|m| m["content"].as_str()).unwrap_or_default();
    assert!(repair.contains("at /tasks/0") && repair.contains("schema path /properties/tasks/items/type"), "{repair}");

    // The transcript: messages, the call, the repair; no API key anywhere.
    let (text, t) = transcript(&e, "plan", &s, "tasks").await;
    assert_eq!(t["outcome"], "Succeeded");
    assert_eq!(t["repairs"], 1);
    let kinds: Vec<&str> =
        t["entries"].as_array().expect("entries").iter().filter_map(|x| x["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "call").count(), 2, "{kinds:?}");
    assert!(kinds.contains(&"repair"), "{kinds:?}");
    assert!(text.contains("[redacted]"), "{text}");
    assert!(!everything(&e, "plan").await.contains(API_KEY));
    assert!(step(&s, "tasks").tokens.is_some());
}

#[tokio::test]
async fn a_reply_that_never_fits_fails_naming_the_schema_path() {
    let e = Env::new("llm-schema-fail").await;
    let _op = Operator::start(&e.ns).await;
    let stub = Stub::start("stubborn", Duration::ZERO).await;
    stub.always(Reply::Content(r#"{"tasks": "not a list"}"#.into()));
    e.apply(endpoint_agent("stubborn", &stub.base_url(), json!({}))).await;
    e.apply(run_obj(
        "never",
        json!({"steps": [{"id": "tasks", "retry": {"limit": 0}, "agent": {"ref": "stubborn", "prompt": "List",
            "output": {"schema": {"type": "object", "properties": {"tasks": {"type": "array"}}}, "repairAttempts": 1}}}]}),
    ))
    .await;
    let s = e.finished("never", LONG).await;
    assert_eq!(s.phase, RunPhase::Failed);
    let row = step(&s, "tasks");
    assert_eq!(row.phase, StepPhase::Failed);
    assert!(row.message.contains("no valid reply after 1 repair attempts"), "{}", row.message);
    assert!(row.message.contains("schema path /properties/tasks/type"), "{}", row.message);
    assert_eq!(stub.requests(), 2);
    let (_, t) = transcript(&e, "never", &s, "tasks").await;
    assert_eq!(t["outcome"], "Failed");
}

#[tokio::test]
async fn the_tool_loop_calls_a_real_mcp_server_with_headers_from_a_secret() {
    let e = Env::new("llm-tools").await;
    let _op = Operator::start(&e.ns).await;
    let mcp = McpPeer::start(Some(("Authorization", MCP_TOKEN))).await;
    let stub = Stub::start("tooler", Duration::ZERO).await;
    stub.script([
        Reply::ToolCalls(vec![("search_docs".into(), json!({"query": "transcripts"})), ("whoami".into(), json!({}))]),
        Reply::ToolCalls(vec![("add".into(), json!({"a": 2, "b": 40}))]),
        Reply::EchoTool,
    ]);
    secret(&e, "docs-mcp", json!({"Authorization": MCP_TOKEN})).await;
    e.apply(endpoint_agent(
        "tooler",
        &stub.base_url(),
        json!({"tools": [{"name": "docs", "url": mcp.url(), "headersFrom": {"secretRef": {"name": "docs-mcp"}},
                          "allow": ["search_docs", "whoami", "add", "hang"]}]}),
    ))
    .await;
    e.apply(run_obj(
        "tools",
        json!({"steps": [{"id": "ask", "agent": {"ref": "tooler", "prompt": "Find out", "tools": ["search_docs", "whoami", "add"], "maxTurns": 4}}]}),
    ))
    .await;
    let s = e.finished("tools", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    assert_eq!(step(&s, "ask").output.as_deref(), Some("tool said: 42"));
    // The server saw each call, with the header from the Secret.
    assert_eq!(mcp.calls(), ["search_docs auth=ok", "whoami auth=ok", "add auth=ok"]);
    // The model was offered the three tools with their schemas, and got the results back.
    let seen = stub.seen();
    assert_eq!(seen.len(), 3);
    let tools: Vec<&str> = seen[0].body["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert_eq!(tools, ["add", "search_docs", "whoami"]);
    let add = seen[0].body["tools"].as_array().and_then(|t| t.iter().find(|t| t["function"]["name"] == "add")).cloned();
    assert_eq!(add.map(|t| t["function"]["parameters"]["properties"]["a"]["type"].clone()), Some(json!("integer")));
    let results: Vec<String> = seen[1].body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results[0].contains("docs for transcripts"), "{results:?}");
    // A tool that echoes the header does not leak it to the model, the transcript or anywhere.
    assert_eq!(results[1], "you sent: [redacted]");
    let (_, t) = transcript(&e, "tools", &s, "ask").await;
    assert_eq!(t["turns"], 2);
    let tool_entries = t["entries"].as_array().expect("entries").iter().filter(|x| x["kind"] == "tool").count();
    assert_eq!(tool_entries, 3);
    let all = everything(&e, "tools").await;
    assert!(!all.contains("mcp-e2e-token"), "the MCP header leaked");
}

#[tokio::test]
async fn tool_failures_are_clear() {
    let e = Env::new("llm-tool-fail").await;
    let _op = Operator::start(&e.ns).await;
    let mcp = McpPeer::start(None).await;
    let cases: [(&str, Reply, Value); 5] = [
        ("unknown", Reply::ToolCalls(vec![("rm_rf".into(), json!({}))]), json!({})),
        ("error", Reply::ToolCalls(vec![("fail".into(), json!({"reason": "disk full"}))]), json!({})),
        ("huge", Reply::ToolCalls(vec![("huge".into(), json!({"n": 200000}))]), json!({})),
        ("hang", Reply::ToolCalls(vec![("hang".into(), json!({}))]), json!({"agentTimeout": 2, "timeoutSeconds": 20})),
        ("turns", Reply::ToolCalls(vec![("add".into(), json!({"a": 1, "b": 1}))]), json!({"maxTurns": 2})),
    ];
    let mut stubs = Vec::new();
    let mut steps = Vec::new();
    for (name, reply, extra) in cases {
        let stub = Stub::start(name, Duration::ZERO).await;
        stub.always(reply);
        // A tool call lasts at most the Agent's timeoutSeconds (and what is left of the step's).
        let agent_timeout = extra.get("agentTimeout").cloned().unwrap_or(json!(10));
        e.apply(endpoint_agent(
            name,
            &stub.base_url(),
            json!({"timeoutSeconds": agent_timeout,
                   "tools": [{"name": "t", "url": mcp.url(), "allow": ["fail", "huge", "hang", "add", "whoami"],
                              "requireApproval": ["whoami"]}]}),
        ))
        .await;
        let mut agent = json!({"ref": name, "prompt": "go", "tools": ["fail", "huge", "hang", "add", "whoami"]});
        let mut step = json!({"id": name, "retry": {"limit": 0}, "continueOnError": true});
        if let Some(t) = extra.get("timeoutSeconds") {
            step["timeoutSeconds"] = t.clone();
        }
        if let Some(m) = extra.get("maxTurns") {
            agent["maxTurns"] = m.clone();
        }
        step["agent"] = agent;
        steps.push(step);
        stubs.push(stub);
    }
    e.apply(run_obj("fails", json!({"steps": steps}))).await;
    let s = e.finished("fails", LONG).await;
    let msg = |k: &str| {
        let r = step(&s, k);
        assert_eq!(r.phase, StepPhase::Failed, "{k}: {r:#?}");
        r.message.clone()
    };
    let m = msg("unknown");
    assert!(m.contains("the model asked for tool \"rm_rf\", which the step does not offer"), "{m}");
    let m = msg("error");
    assert!(m.contains("tool \"fail\" (MCP server \"t\") failed") && m.contains("disk full"), "{m}");
    let m = msg("huge");
    assert!(m.contains("tool \"huge\" (MCP server \"t\") returned") && m.contains("over the bound of 65536"), "{m}");
    let m = msg("hang");
    assert!(m.contains("tool \"hang\" (MCP server \"t\") did not answer within 2.0s"), "{m}");
    let m = msg("turns");
    assert!(m.contains("stopped after maxTurns=2 model <-> tool round trips"), "{m}");
    // Every failed step still has its transcript.
    for k in ["unknown", "error", "huge", "hang", "turns"] {
        let (_, t) = transcript(&e, "fails", &s, k).await;
        assert_eq!(t["outcome"], "Failed", "{k}");
    }
}

#[tokio::test]
async fn tool_calls_in_require_approval_wait_for_a_decision_and_a_rejection_reaches_the_model() {
    let e = Env::new("llm-tool-approval").await;
    let _op = Operator::start(&e.ns).await;
    let mcp = McpPeer::start(None).await;
    let stub = Stub::start("gated", Duration::ZERO).await;
    // Asks for whoami until the conversation holds its result, then repeats the result.
    stub.always(Reply::ToolLoop { name: "whoami".into(), args: json!({}), turns: 1 });
    e.apply(endpoint_agent(
        "gated",
        &stub.base_url(),
        json!({"tools": [{"name": "t", "url": mcp.url(), "allow": ["whoami"], "requireApproval": ["whoami"]}]}),
    ))
    .await;
    let agent = json!({"ref": "gated", "prompt": "who are you?", "tools": ["whoami"]});
    e.apply(run_obj("gated", json!({"steps": [{"id": "yes", "agent": agent}, {"id": "no", "agent": agent}]}))).await;
    let r = wait_for(&e.runs, "gated", LONG, |r| {
        r.status.as_ref().is_some_and(|s| {
            ["yes", "no"].iter().all(|k| s.steps.get(*k).is_some_and(|x| x.phase == StepPhase::Waiting))
        })
    })
    .await;
    let s = r.status.unwrap_or_default();
    assert_eq!(step(&s, "yes").decision_key.as_deref(), Some("yes/whoami"));
    assert!(step(&s, "yes").message.contains("waiting for approval of tool \"whoami\""), "{s:#?}");
    assert_eq!(s.message, "waiting for approval: no/whoami, yes/whoami");
    let calls_before = stub.requests();

    let patch = json!({"spec": {"decisions": {
        "yes/whoami": {"decision": "Approve", "by": "ada"},
        "no/whoami": {"decision": "Reject", "comment": "not today", "by": "bob"}
    }}});
    let ran = kubectl(&["patch", "wfr", "gated", "-n", &e.ns, "--type", "merge", "-p", &patch.to_string()]);
    assert!(ran.ok, "{}", ran.stderr);
    let s = e.finished("gated", LONG).await;
    assert_eq!(s.phase, RunPhase::Succeeded, "{s:#?}");
    // Approved: the tool ran and the model got its result.
    let yes = step(&s, "yes");
    assert!(yes.output.as_deref().is_some_and(|o| o.starts_with("tool said:") && !o.contains("rejected")), "{yes:#?}");
    assert_eq!(yes.attempts, 2, "the decision starts the step over");
    // Rejected: the model was told, and answered without it.
    let no = step(&s, "no").output.clone().unwrap_or_default();
    assert!(no.contains("The call of tool whoami was rejected by bob: not today"), "{no}");
    assert!(stub.requests() > calls_before);
}
