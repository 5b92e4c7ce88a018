//! `get`, `watch`, `submit`, `retry`.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Api;
use kube::api::PostParams;
use serde_json::Value as Json;

use crate::api::{RunPhase, StepPhase, WorkflowRun, WorkflowRunSpec, WorkflowRunStatus, WorkflowSpec};

use super::act::get_run;
use super::tree::{self, Node};
use super::{Ctx, Error, Format, Result};

/// The run's tree, with its child runs read from the API.
async fn tree_of(ctx: &Ctx, status: &WorkflowRunStatus) -> Vec<Node> {
    let api: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    // Child runs, read once each (to the nesting bound), then the tree from what was read.
    let mut children: BTreeMap<String, WorkflowRunStatus> = BTreeMap::new();
    let mut todo: Vec<String> = status.steps.values().filter_map(|r| tree::child_run(r).map(str::to_string)).collect();
    while let Some(name) = todo.pop() {
        if children.contains_key(&name) || children.len() > 100 {
            continue;
        }
        if let Ok(Some(r)) = api.get_opt(&name).await {
            let s = r.status.unwrap_or_default();
            todo.extend(s.steps.values().filter_map(|r| tree::child_run(r).map(str::to_string)));
            children.insert(name, s);
        }
    }
    tree::tree(status, &|name| children.get(name).cloned())
}

fn header(r: &WorkflowRun) -> String {
    let s = r.status.clone().unwrap_or_default();
    let workflow = if s.workflow_name.is_empty() { "(inline)".to_string() } else { s.workflow_name.clone() };
    let mut out = format!(
        "Run {}  Workflow {workflow}  Phase {}  Progress {}\n",
        kube::ResourceExt::name_any(r),
        s.phase.as_str(),
        if s.progress.is_empty() { "-" } else { &s.progress }
    );
    if !s.message.is_empty() {
        out.push_str(&format!("Message: {}\n", s.message));
    }
    if let Some(o) = &s.output {
        out.push_str(&format!("Output: {}\n", crate::text::clip(o, 200)));
    }
    if !s.trace_id.is_empty() {
        out.push_str(&format!("Trace: {}\n", s.trace_id));
    }
    out
}

pub(super) async fn get(ctx: &Ctx, name: &str, format: Format) -> Result<u8> {
    let r = get_run(ctx, name).await?;
    let status = r.status.clone().unwrap_or_default();
    let nodes = tree_of(ctx, &status).await;
    match format {
        Format::Text => print!("{}\n{}", header(&r), tree::render(&nodes, ctx.colour)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&nodes).map_err(|e| Error::Usage(e.to_string()))?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(&nodes).map_err(|e| Error::Usage(e.to_string()))?),
    }
    Ok(0)
}

fn exit_code(phase: RunPhase) -> u8 {
    if phase == RunPhase::Succeeded { 0 } else { 1 }
}

/// Redraws the tree as the run changes (every second at most) until it ends.
pub(super) async fn watch(ctx: &Ctx, name: &str) -> Result<u8> {
    let terminal = ctx.colour;
    let mut last = String::new();
    loop {
        let r = get_run(ctx, name).await?;
        let status = r.status.clone().unwrap_or_default();
        let text = format!("{}\n{}", header(&r), tree::render(&tree_of(ctx, &status).await, ctx.colour));
        if text != last {
            if terminal {
                print!("\x1b[2J\x1b[H");
            } else if !last.is_empty() {
                println!("---");
            }
            print!("{text}");
            last = text;
        }
        if status.phase.is_finished() {
            return Ok(exit_code(status.phase));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn create(ctx: &Ctx, run: WorkflowRun, watch_it: bool) -> Result<u8> {
    let api: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let made = api.create(&PostParams::default(), &run).await.map_err(Error::from_api)?;
    let name = kube::ResourceExt::name_any(&made);
    println!("workflowrun.volt.dev/{name} created");
    if watch_it { watch(ctx, &name).await } else { Ok(0) }
}

pub(super) async fn submit(ctx: &Ctx, workflow: &str, params: Vec<(String, Json)>, watch_it: bool) -> Result<u8> {
    let mut run = WorkflowRun::new(
        "",
        WorkflowRunSpec {
            workflow_ref: Some(crate::api::WorkflowRef { name: workflow.to_string() }),
            params: params.into_iter().collect(),
            ..Default::default()
        },
    );
    run.metadata.name = None;
    run.metadata.generate_name = Some(format!("{workflow}-"));
    create(ctx, run, watch_it).await
}

/// A new run of the same workflow (the old run's snapshot, inline). With `from`, every step
/// that succeeded and does not depend on `from` (nor is it) gives its recorded output as a
/// template step, so only `from` and what follows run again: fork and replay.
pub(super) async fn retry(ctx: &Ctx, name: &str, from: Option<&str>, watch_it: bool) -> Result<u8> {
    let old = get_run(ctx, name).await?;
    let status = old.status.clone().unwrap_or_default();
    let Some(mut spec) = status.workflow.clone() else {
        return Err(Error::Usage(format!("run {name} has not started: there is nothing to retry")));
    };
    let mut reused = Vec::new();
    if let Some(from) = from {
        reused = replay(&mut spec, &status, from)?;
    }
    let mut run = WorkflowRun::new(
        "",
        WorkflowRunSpec {
            workflow: Some(spec),
            params: status.params.clone(),
            priority: old.spec.priority,
            timeout_seconds: old.spec.timeout_seconds,
            ..Default::default()
        },
    );
    run.metadata.name = None;
    run.metadata.generate_name = Some(format!("{}-retry-", name.split("-retry-").next().unwrap_or(name)));
    run.metadata.labels = Some(BTreeMap::from([("volt.dev/retry-of".to_string(), crate::naming::label_value(name))]));
    if !reused.is_empty() {
        println!("reusing the recorded outputs of: {}", reused.join(", "));
    }
    create(ctx, run, watch_it).await
}

/// Turns the steps that need not run again into template steps giving their recorded outputs;
/// the ids it turned.
fn replay(spec: &mut WorkflowSpec, status: &WorkflowRunStatus, from: &str) -> Result<Vec<String>> {
    let dag = crate::engine::validate(spec).map_err(|e| Error::Usage(format!("the run's workflow: {e}")))?;
    let Some(start) = dag.index_of(from) else {
        return Err(Error::Usage(format!("--from {from}: the run's workflow has no step {from:?}")));
    };
    // `from` and everything downstream of it run again.
    let mut again = vec![false; dag.len()];
    let mut todo = vec![start];
    while let Some(i) = todo.pop() {
        if !std::mem::replace(&mut again[i], true) {
            todo.extend(dag.dependents(i));
        }
    }
    let mut reused = Vec::new();
    for (i, step) in spec.steps.iter_mut().enumerate() {
        let row = status.steps.get(&step.id);
        let Some(output) = row.filter(|r| r.phase == StepPhase::Succeeded && !again[i]).and_then(|r| r.output.clone())
        else {
            continue;
        };
        let template = format!("{{% raw %}}{output}{{% endraw %}}");
        *step = crate::api::Step {
            id: step.id.clone(),
            depends_on: step.depends_on.clone(),
            template: Some(template),
            ..Default::default()
        };
        reused.push(step.id.clone());
    }
    Ok(reused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_what_comes_before_the_step_and_runs_it_and_what_follows() {
        let mut spec: WorkflowSpec = serde_saphyr::from_str(
            r#"
steps:
- {id: a, template: "{{ 'x' }}"}
- {id: b, dependsOn: [a], http: {url: "http://x/{{ steps.a.output }}"}}
- {id: c, dependsOn: [b], template: "{{ steps.b.output }}"}
- {id: d, dependsOn: [a], template: "d"}
"#,
        )
        .expect("spec");
        let status: WorkflowRunStatus = serde_saphyr::from_str(
            r#"
steps:
  a: {phase: Succeeded, output: "{{ not a template }}"}
  b: {phase: Failed, message: boom}
  c: {phase: Skipped}
  d: {phase: Succeeded, output: "d"}
"#,
        )
        .expect("status");
        let reused = replay(&mut spec, &status, "b").expect("replay");
        assert_eq!(reused, ["a", "d"]);
        assert_eq!(spec.steps[0].template.as_deref(), Some("{% raw %}{{ not a template }}{% endraw %}"));
        assert!(spec.steps[1].http.is_some() && spec.steps[2].template.as_deref() == Some("{{ steps.b.output }}"));
        // The recorded output comes back as it was.
        let ctx = crate::engine::template::Context::default();
        let text = crate::engine::template::render(spec.steps[0].template.as_deref().unwrap_or_default(), &ctx);
        assert_eq!(text.expect("renders"), "{{ not a template }}");
        assert!(replay(&mut spec, &status, "zz").is_err());
    }
}
