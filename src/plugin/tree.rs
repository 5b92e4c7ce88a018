//! A run as a tree of steps: loop iterations, fan-out items and child runs nested under their
//! step, in the workflow's order. Pure: the caller gives the statuses of child runs.

use std::time::Duration;

use serde::Serialize;

use crate::api::{Step, StepPhase, StepStatus, WorkflowRunStatus, WorkflowSpec};
use crate::naming;
use crate::text::clip;

/// Child runs nest at most this deep in a tree (runs nest at most 5 deep).
const MAX_DEPTH: usize = 8;

/// One line of the tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// What the line shows: a step id, `[3]` (an item), `iteration 2`, `run <name>`.
    pub label: String,
    /// The status key (empty for iteration and run lines).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub key: String,
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Why it failed, waits or was skipped; else the start of its output.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub info: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
}

/// The child run a row runs as, if any (`WorkflowRun.v1alpha1.volt.dev/<name>`).
pub fn child_run(row: &StepStatus) -> Option<&str> {
    row.object.as_deref().filter(|o| o.starts_with("WorkflowRun.")).and_then(|o| o.split_once('/')).map(|(_, n)| n)
}

/// The tree of a run's steps. `child` gives the status of a child run by name.
pub fn tree(status: &WorkflowRunStatus, child: &dyn Fn(&str) -> Option<WorkflowRunStatus>) -> Vec<Node> {
    build(status, child, 0)
}

fn build(status: &WorkflowRunStatus, child: &dyn Fn(&str) -> Option<WorkflowRunStatus>, depth: usize) -> Vec<Node> {
    let spec = status.workflow.clone().unwrap_or_default();
    let mut nodes = steps(&spec.steps, "", status, child, depth);
    nodes.extend(steps(&spec.finally, "", status, child, depth));
    // Rows the snapshot does not explain (no snapshot yet, say): listed as they are.
    if status.workflow.is_none() {
        nodes = status.steps.iter().map(|(k, r)| line(k, k, Some(r))).collect();
    }
    nodes
}

fn steps(
    list: &[Step],
    prefix: &str,
    status: &WorkflowRunStatus,
    child: &dyn Fn(&str) -> Option<WorkflowRunStatus>,
    depth: usize,
) -> Vec<Node> {
    list.iter()
        .map(|step| {
            let key = format!("{prefix}{}", step.id);
            let row = status.steps.get(&key);
            let mut node = line(&step.id, &key, row);
            if let (Some(l), Some(n)) = (&step.loop_, row.and_then(|r| r.iterations)) {
                let body = WorkflowSpec { steps: l.steps.clone(), ..Default::default() };
                for it in 1..=n {
                    let p = naming::loop_prefix(&key, it);
                    let inner = steps(&body.steps, &p, status, child, depth);
                    let phase = iteration_phase(&inner);
                    node.children.push(Node {
                        label: format!("iteration {it}"),
                        phase,
                        children: inner,
                        ..Default::default()
                    });
                }
            }
            if let Some(n) = row.and_then(|r| r.items) {
                for i in 0..n as usize {
                    let k = naming::child_key(&key, i);
                    let mut item = line(&format!("[{i}]"), &k, status.steps.get(&k));
                    nest_child(&mut item, status.steps.get(&k), child, depth);
                    node.children.push(item);
                }
            }
            nest_child(&mut node, row, child, depth);
            node
        })
        .collect()
}

fn nest_child(
    node: &mut Node,
    row: Option<&StepStatus>,
    child: &dyn Fn(&str) -> Option<WorkflowRunStatus>,
    depth: usize,
) {
    let Some(name) = row.and_then(child_run) else { return };
    let mut run = Node { label: format!("run {name}"), phase: "Unknown".into(), ..Default::default() };
    if depth < MAX_DEPTH
        && let Some(s) = child(name)
    {
        run.phase = s.phase.as_str().to_string();
        run.info = clip(&s.message, 80);
        run.children = build(&s, child, depth + 1);
    }
    node.children.push(run);
}

/// The phase of an iteration: the first of Failed, Running, Waiting... among its steps.
fn iteration_phase(inner: &[Node]) -> String {
    for p in ["Failed", "Running", "Waiting", "Retrying", "Pending", "Cancelled"] {
        if inner.iter().any(|n| n.phase == p) {
            return p.to_string();
        }
    }
    "Succeeded".to_string()
}

fn line(label: &str, key: &str, row: Option<&StepStatus>) -> Node {
    let Some(r) = row else {
        return Node { label: label.to_string(), key: key.to_string(), phase: "Pending".into(), ..Default::default() };
    };
    let seconds = match (&r.started_at, &r.finished_at) {
        (Some(s), Some(f)) => Some(duration(s.0, f.0)),
        (Some(s), None) if r.phase == StepPhase::Running => Some(duration(s.0, jiff::Timestamp::now())),
        _ => None,
    };
    let info = if !r.message.is_empty() {
        r.message.clone()
    } else if let Some(o) = &r.output {
        format!("output: {}", o.lines().next().unwrap_or_default())
    } else if let Some(o) = &r.output_ref {
        format!("output: {} bytes in ConfigMap {}", o.size, o.config_map)
    } else {
        String::new()
    };
    Node {
        label: label.to_string(),
        key: key.to_string(),
        phase: r.phase.as_str().to_string(),
        seconds: seconds.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
        tokens: r.tokens.map(|t| t.prompt + t.completion),
        info: clip(&info, 100),
        children: vec![],
    }
}

fn duration(a: jiff::Timestamp, b: jiff::Timestamp) -> Duration {
    Duration::from_millis((b.as_millisecond() - a.as_millisecond()).max(0) as u64)
}

/// The tree as text: a column of names drawn as a tree, then phase, duration, tokens and
/// what to know. `colour` paints phases (for a terminal).
pub fn render(nodes: &[Node], colour: bool) -> String {
    let mut rows: Vec<(String, &Node)> = Vec::new();
    fn walk<'a>(nodes: &'a [Node], indent: &str, rows: &mut Vec<(String, &'a Node)>, top: bool) {
        for (i, n) in nodes.iter().enumerate() {
            let last = i + 1 == nodes.len();
            let (here, below) = match (top, last) {
                (true, _) => (String::new(), String::new()),
                (false, false) => (format!("{indent}├─ "), format!("{indent}│  ")),
                (false, true) => (format!("{indent}└─ "), format!("{indent}   ")),
            };
            rows.push((format!("{here}{}", n.label), n));
            walk(&n.children, &below, rows, false);
        }
    }
    walk(nodes, "", &mut rows, true);
    let width = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(4).max(4);
    let mut out = format!("{:width$}  {:<10} {:>8} {:>8}  {}\n", "STEP", "PHASE", "DURATION", "TOKENS", "MESSAGE");
    for (label, n) in rows {
        let pad = width - label.chars().count();
        let phase = format!("{:<10}", n.phase);
        let phase = if colour { paint(&n.phase, &phase) } else { phase };
        let secs = n.seconds.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "-".into());
        let tokens = n.tokens.map(|t| t.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!("{label}{}  {phase} {secs:>8} {tokens:>8}  {}\n", " ".repeat(pad), n.info));
    }
    out
}

fn paint(phase: &str, text: &str) -> String {
    let code = match phase {
        "Succeeded" => "32",
        "Failed" | "Cancelled" => "31",
        "Running" | "Retrying" => "36",
        "Waiting" | "Suspended" => "33",
        "Skipped" | "Pending" => "2",
        _ => return text.to_string(),
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(yaml: &str) -> WorkflowRunStatus {
        serde_saphyr::from_str(yaml).expect("a status")
    }

    #[test]
    fn loops_fan_outs_and_child_runs_nest_under_their_step() {
        let parent = status(
            r#"
phase: Running
workflow:
  steps:
  - {id: build, template: x}
  - {id: rounds, loop: {maxIterations: 3, until: "true", steps: [{id: code, template: c}, {id: fan, forEach: "[1]", template: f}]}}
  - {id: test, workflow: {ref: testing}}
  finally:
  - {id: report, template: r}
steps:
  build: {phase: Succeeded, output: "v1\nmore", startedAt: "2026-01-01T00:00:00.000000Z", finishedAt: "2026-01-01T00:00:01.500000Z"}
  rounds: {phase: Running, iterations: 2}
  rounds.1.code: {phase: Succeeded, tokens: {prompt: 10, completion: 5}}
  rounds.1.fan: {phase: Succeeded, items: 1}
  rounds.1.fan[0]: {phase: Succeeded}
  rounds.2.code: {phase: Failed, message: boom}
  test: {phase: Running, object: WorkflowRun.v1alpha1.volt.dev/r-test-1}
"#,
        );
        let child = status(
            r#"
phase: Running
message: "waiting for approval: gate"
workflow: {steps: [{id: gate, approval: {}}]}
steps:
  gate: {phase: Waiting, message: "ship it?"}
"#,
        );
        let nodes = tree(&parent, &|name| (name == "r-test-1").then(|| child.clone()));
        let labels: Vec<&str> = nodes.iter().map(|n| n.label.as_str()).collect();
        assert_eq!(labels, ["build", "rounds", "test", "report"]);
        assert_eq!(nodes[0].seconds, Some(1.5));
        assert_eq!(nodes[0].info, "output: v1");
        let rounds = &nodes[1];
        assert_eq!(rounds.children.len(), 2);
        assert_eq!(rounds.children[0].phase, "Succeeded");
        assert_eq!(rounds.children[1].phase, "Failed");
        assert_eq!(rounds.children[0].children[0].tokens, Some(15));
        assert_eq!(rounds.children[0].children[1].children[0].key, "rounds.1.fan[0]");
        let run = &nodes[2].children[0];
        assert_eq!(run.label, "run r-test-1");
        assert_eq!(run.children[0].phase, "Waiting");
        assert_eq!(nodes[3].phase, "Pending");

        let text = render(&nodes, false);
        assert!(text.contains("├─ iteration 1"), "{text}");
        assert!(text.contains("│  ├─ code"), "{text}");
        assert!(text.contains("└─ run r-test-1"), "{text}");
        assert!(text.lines().any(|l| l.contains("gate") && l.contains("Waiting") && l.contains("ship it?")), "{text}");
        assert!(!text.contains('\x1b'), "no colour unless asked");
        assert!(render(&nodes, true).contains("\x1b[31mFailed"));
    }
}
