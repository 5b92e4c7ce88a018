//! `logs`: what each step said. Container steps: their pod's log, through the API (as
//! `kubectl logs` reads it). Agent steps: the transcript (messages, tool calls, usage). Other
//! steps: their output (an HTTP body, a rendered template). Child runs: their own steps, under
//! the run's name.

use std::time::Duration;

use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::Api;
use kube::api::LogParams;
use serde_json::Value as Json;

use crate::api::{StepPhase, StepStatus, WorkflowRun, WorkflowRunStatus};

use super::act::get_run;
use super::tree::child_run;
use super::{Ctx, Error, Result};

/// Whether status key `key` is `step` or inside it (its items, iterations).
fn under(key: &str, step: &str) -> bool {
    key == step || key.starts_with(&format!("{step}[")) || key.starts_with(&format!("{step}."))
}

pub(super) async fn logs(ctx: &Ctx, run: &str, step: Option<&str>, follow: bool) -> Result<u8> {
    let r = get_run(ctx, run).await?;
    let status = r.status.clone().unwrap_or_default();
    if let Some(s) = step
        && !status.steps.keys().any(|k| under(k, s))
    {
        let known: Vec<&str> = status.steps.keys().map(String::as_str).collect();
        return Err(Error::Usage(format!("run {run} has no step {s:?} (it has: {})", known.join(", "))));
    }
    if !follow {
        print_run(ctx, run, &status, step, 0).await?;
        return Ok(0);
    }
    // Follow: a running pod streams; else each step is printed as it ends.
    let mut printed = std::collections::BTreeSet::new();
    loop {
        let r: WorkflowRun = get_run(ctx, run).await?;
        let status = r.status.clone().unwrap_or_default();
        for (key, row) in status.steps.iter().filter(|(k, _)| step.is_none_or(|s| under(k, s))) {
            if printed.contains(key) || row.items.is_some() || row.iterations.is_some() {
                continue;
            }
            if row.phase == StepPhase::Running
                && let Some(pod) = &row.pod
            {
                println!("==> {key} (pod {pod}) <==");
                stream_pod(ctx, pod).await?;
                printed.insert(key.clone());
                continue;
            }
            if row.phase.is_finished() {
                print_step(ctx, run, key, row, 0).await?;
                printed.insert(key.clone());
            }
        }
        if status.phase.is_finished() {
            return Ok(if status.phase == crate::api::RunPhase::Succeeded { 0 } else { 1 });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn print_run<'a>(
    ctx: &'a Ctx,
    run: &'a str,
    status: &'a WorkflowRunStatus,
    step: Option<&'a str>,
    depth: usize,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        for (key, row) in status.steps.iter().filter(|(k, _)| step.is_none_or(|s| under(k, s))) {
            // The rows of items and iterations are printed; their parents hold only a summary.
            if row.items.is_some() || row.iterations.is_some() {
                continue;
            }
            print_step(ctx, run, key, row, depth).await?;
        }
        Ok(())
    })
}

async fn print_step(ctx: &Ctx, run: &str, key: &str, row: &StepStatus, depth: usize) -> Result<()> {
    let indent = "  ".repeat(depth);
    println!("{indent}==> {key} ({}) <==", row.phase.as_str());
    if let Some(child) = child_run(row) {
        if depth < 6
            && let Ok(c) = get_run(ctx, child).await
        {
            println!("{indent}  run {child}:");
            print_run(ctx, child, &c.status.unwrap_or_default(), None, depth + 1).await?;
        }
        return Ok(());
    }
    if let Some(pod) = &row.pod {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        match pods.logs(pod, &LogParams::default()).await {
            Ok(text) => print!("{text}"),
            Err(kube::Error::Api(s)) if s.code == 404 => println!("{indent}(pod {pod} is gone)"),
            Err(e) => return Err(Error::from_api(e)),
        }
        return Ok(());
    }
    if let Some(t) = &row.transcript_ref {
        let text = config_map_value(ctx, &t.config_map, &t.key).await?;
        match serde_json::from_str::<Json>(&text) {
            Ok(json) => print!("{}", transcript_text(&json)),
            Err(_) => println!("{text}"),
        }
        return Ok(());
    }
    let output = match (&row.output, &row.output_ref) {
        (Some(o), _) => o.clone(),
        (None, Some(r)) => config_map_value(ctx, &r.config_map, &r.key).await?,
        _ => String::new(),
    };
    if !row.message.is_empty() {
        println!("{indent}{}", row.message);
    }
    if !output.is_empty() {
        println!("{output}");
    }
    let _ = run;
    Ok(())
}

async fn config_map_value(ctx: &Ctx, name: &str, key: &str) -> Result<String> {
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let cm = cms.get(name).await.map_err(Error::from_api)?;
    Ok(cm.data.and_then(|mut d| d.remove(key)).unwrap_or_default())
}

async fn stream_pod(ctx: &Ctx, pod: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let params = LogParams { follow: true, ..Default::default() };
    let mut lines = pods.log_stream(pod, &params).await.map_err(Error::from_api)?.lines();
    while let Some(line) = lines.try_next().await? {
        println!("{line}");
    }
    Ok(())
}

/// A transcript (`agents::transcript` JSON) as lines: messages (role: content, tool calls),
/// model calls (agent, replica, latency, tokens), tool calls, repairs, then the outcome.
pub fn transcript_text(t: &Json) -> String {
    let mut out = String::new();
    let s = |v: &Json, k: &str| match v.get(k) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    for e in t.get("entries").and_then(Json::as_array).into_iter().flatten() {
        match s(e, "kind").as_str() {
            "message" => {
                let m = e.get("message").cloned().unwrap_or_default();
                let role = s(&m, "role");
                let content = s(&m, "content");
                if !content.is_empty() {
                    out.push_str(&format!("[{role}] {content}\n"));
                }
                for call in m.get("tool_calls").and_then(Json::as_array).into_iter().flatten() {
                    let f = call.get("function").cloned().unwrap_or_default();
                    out.push_str(&format!("[{role}] asks for {}({})\n", s(&f, "name"), s(&f, "arguments")));
                }
            }
            "call" => out.push_str(&format!(
                "  (model call: {} replica {}, {} ms, tokens {})\n",
                s(e, "agent"),
                s(e, "replica"),
                s(e, "latencyMs"),
                e.get("tokens").map(|t| t.to_string()).unwrap_or_else(|| "-".into())
            )),
            "tool" => {
                let err = s(e, "error");
                let how = if err.is_empty() { "ok".to_string() } else { format!("failed: {err}") };
                out.push_str(&format!("  (tool {}: {how}, {} ms)\n", s(e, "name"), s(e, "latencyMs")));
            }
            "repair" => out.push_str(&format!("  (repair {}: {})\n", s(e, "attempt"), s(e, "problem"))),
            _ => out.push_str(&format!("  {e}\n")),
        }
    }
    out.push_str(&format!(
        "outcome: {}; turns {}; repairs {}; usage {}{}\n",
        s(t, "outcome"),
        s(t, "turns"),
        s(t, "repairs"),
        t.get("usage").map(|u| u.to_string()).unwrap_or_default(),
        Some(s(t, "error")).filter(|e| !e.is_empty()).map(|e| format!("; error: {e}")).unwrap_or_default()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transcript_reads_as_a_conversation() {
        let t = serde_json::json!({"version": 1, "outcome": "Succeeded", "turns": 1, "repairs": 0,
        "usage": {"prompt": 12, "completion": 3},
        "entries": [
            {"kind": "message", "message": {"role": "user", "content": "find it"}},
            {"kind": "call", "agent": "a", "replica": "r0", "latencyMs": 4.0, "httpMs": 3.0, "tokens": {"prompt": 12, "completion": 3}},
            {"kind": "message", "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "search", "arguments": "{\"q\":\"x\"}"}}]}},
            {"kind": "tool", "name": "search", "latencyMs": 1.5},
            {"kind": "message", "message": {"role": "assistant", "content": "found"}}
        ]});
        let text = transcript_text(&t);
        assert!(text.contains("[user] find it\n"), "{text}");
        assert!(text.contains("[assistant] asks for search({\"q\":\"x\"})"), "{text}");
        assert!(text.contains("(tool search: ok, 1.5 ms)"), "{text}");
        assert!(text.contains("[assistant] found"), "{text}");
        assert!(text.contains("outcome: Succeeded; turns 1"), "{text}");
    }
}
