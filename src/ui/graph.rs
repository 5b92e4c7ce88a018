//! What the run page draws: the DAG of a run's Workflow snapshot as nodes (loops with their
//! inner steps, fan-outs as one node) and, for each node, its state from the run's status rows
//! (a fan-out's items and a loop's iterations counted, a child run named). Pure functions; the
//! page lays the nodes out and colours them ([`super::assets`]).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::{StepPhase, StepStatus, WorkflowRunStatus, WorkflowSpec};

/// A step of the picture.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// The step's status key (`build`; `review/code` for step `code` of loop `review`).
    pub key: String,
    /// The step's id.
    pub id: String,
    pub kind: &'static str,
    /// Keys of the nodes it depends on.
    pub deps: Vec<String>,
    /// A `finally` step.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub finally: bool,
    /// A fan-out (`forEach`): one node for all its items.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fan_out: bool,
    /// The loop it belongs to, for a step inside a loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The nodes of `spec`, in order: each step, and after a loop its inner steps.
pub fn nodes(spec: &WorkflowSpec) -> Vec<Node> {
    let mut out = Vec::new();
    for (steps, finally) in [(&spec.steps, false), (&spec.finally, true)] {
        for step in steps {
            out.push(Node {
                key: step.id.clone(),
                id: step.id.clone(),
                kind: step.kind().map_or("invalid", |k| k.as_str()),
                deps: step.depends_on.clone(),
                finally,
                fan_out: step.for_each.is_some(),
                parent: None,
            });
            if let Some(lp) = &step.loop_ {
                for inner in &lp.steps {
                    let key = |id: &str| format!("{}/{id}", step.id);
                    out.push(Node {
                        key: key(&inner.id),
                        id: inner.id.clone(),
                        kind: inner.kind().map_or("invalid", |k| k.as_str()),
                        deps: inner.depends_on.iter().map(|d| key(d)).collect(),
                        finally: false,
                        fan_out: inner.for_each.is_some(),
                        parent: Some(step.id.clone()),
                    });
                }
            }
        }
    }
    out
}

/// A node's state, from the run's status rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub phase: StepPhase,
    /// Of a fan-out: items finished and in all (rows seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<(u32, u32)>,
    /// Of a loop, and of the steps inside it: the latest iteration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// The status key whose row the panel shows (`review.2.code` for a step in a loop).
    pub row: String,
    /// The child run of a `workflow` step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child: Option<String>,
}

/// Rows whose key starts with `prefix`.
fn rows_with_prefix<'a>(
    steps: &'a BTreeMap<String, StepStatus>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a StepStatus)> + 'a {
    steps.range(prefix.to_string()..).take_while(move |(k, _)| k.starts_with(prefix))
}

/// The state of each node that has a status row (others are still to come).
pub fn states(nodes: &[Node], status: &WorkflowRunStatus) -> BTreeMap<String, NodeState> {
    let steps = &status.steps;
    let mut out = BTreeMap::new();
    for node in nodes {
        // Inside a loop: the row of the latest iteration, `loop.<n>.<id>`.
        let (row_key, iteration) = match &node.parent {
            Some(lp) => {
                let iteration = steps.get(lp).and_then(|r| r.iterations).unwrap_or(1).max(1);
                let mut found = None;
                for n in (1..=iteration).rev() {
                    let key = crate::naming::loop_key(lp, n, &node.id);
                    if steps.contains_key(&key) {
                        found = Some((key, Some(n)));
                        break;
                    }
                }
                match found {
                    Some(f) => f,
                    None => continue,
                }
            }
            None => (node.key.clone(), None),
        };
        let row = steps.get(&row_key);
        let items = node.fan_out.then(|| {
            let prefix = format!("{row_key}[");
            let (mut done, mut all) = (0, 0);
            for (_, r) in rows_with_prefix(steps, &prefix) {
                all += 1;
                done += u32::from(r.phase.is_finished());
            }
            (done, all.max(row.and_then(|r| r.items).unwrap_or(0)))
        });
        let Some(row) = row else { continue };
        let iteration = iteration.or(if node.kind == "loop" { row.iterations } else { None });
        let child = (node.kind == "workflow").then(|| row.object.clone()).flatten();
        out.insert(node.key.clone(), NodeState { phase: row.phase, items, iteration, row: row_key, child });
    }
    out
}

/// The entries of `new` that differ from `old` (what a stream sends after its first message).
pub fn changed(old: &BTreeMap<String, NodeState>, new: &BTreeMap<String, NodeState>) -> BTreeMap<String, NodeState> {
    new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> WorkflowSpec {
        serde_json::from_value(json!({"steps": [
            {"id": "plan", "template": "x"},
            {"id": "fan", "dependsOn": ["plan"], "forEach": "[1,2,3]", "template": "{{ item }}"},
            {"id": "review", "dependsOn": ["fan"], "loop": {"maxIterations": 3, "until": "true", "steps": [
                {"id": "code", "template": "c"},
                {"id": "check", "dependsOn": ["code"], "template": "r"}
            ]}},
            {"id": "child", "dependsOn": ["review"], "workflow": {"ref": "other"}}
        ], "finally": [{"id": "report", "template": "done"}]}))
        .expect("spec")
    }

    fn row(phase: StepPhase) -> StepStatus {
        StepStatus { phase, ..Default::default() }
    }

    #[test]
    fn nodes_group_loops_and_fan_outs() {
        let nodes = nodes(&spec());
        let keys: Vec<&str> = nodes.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(keys, ["plan", "fan", "review", "review/code", "review/check", "child", "report"]);
        assert!(nodes[1].fan_out && nodes[6].finally);
        assert_eq!(nodes[4].deps, ["review/code"]);
        assert_eq!(nodes[4].parent.as_deref(), Some("review"));
        assert_eq!((nodes[2].kind, nodes[5].kind), ("loop", "workflow"));
    }

    #[test]
    fn states_count_items_and_follow_the_latest_iteration() {
        let nodes = nodes(&spec());
        let mut status = WorkflowRunStatus::default();
        status.steps.insert("plan".into(), row(StepPhase::Succeeded));
        let mut fan = row(StepPhase::Running);
        fan.items = Some(3);
        status.steps.insert("fan".into(), fan);
        status.steps.insert("fan[0]".into(), row(StepPhase::Succeeded));
        status.steps.insert("fan[1]".into(), row(StepPhase::Running));
        let mut review = row(StepPhase::Running);
        review.iterations = Some(2);
        status.steps.insert("review".into(), review);
        status.steps.insert(crate::naming::loop_key("review", 1, "code"), row(StepPhase::Succeeded));
        status.steps.insert(crate::naming::loop_key("review", 2, "code"), row(StepPhase::Running));
        let mut child = row(StepPhase::Running);
        child.object = Some("run-1-child".into());
        status.steps.insert("child".into(), child);
        let s = states(&nodes, &status);
        assert_eq!(s["fan"].items, Some((1, 3)));
        assert_eq!(s["fan"].phase, StepPhase::Running);
        assert_eq!((s["review"].iteration, s["review/code"].iteration), (Some(2), Some(2)));
        assert_eq!(s["review/code"].phase, StepPhase::Running);
        assert_eq!(s["review/code"].row, crate::naming::loop_key("review", 2, "code"));
        assert!(!s.contains_key("review/check") && !s.contains_key("report"), "no rows yet");
        assert_eq!(s["child"].child.as_deref(), Some("run-1-child"));

        let before = s.clone();
        status.steps.insert("plan".into(), row(StepPhase::Succeeded));
        status.steps.insert("fan[1]".into(), row(StepPhase::Succeeded));
        let diff = changed(&before, &states(&nodes, &status));
        assert_eq!(diff.keys().collect::<Vec<_>>(), ["fan"], "only what changed");
    }
}
