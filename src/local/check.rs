//! The controller's checks on what was loaded: each Workflow's DAG and templates
//! ([`engine::validate`]), each WorkflowRun's workflow and parameters
//! ([`engine::params::resolve`]), agent references against the Agents in the files, and
//! duplicate names.

use std::collections::HashMap;

use kube::ResourceExt;
use serde_json::Value as Json;

use crate::api::{Agent, WorkflowSpec};
use crate::engine;

use super::load::{Bundle, Loaded, Problem, step_for_path};

/// Adds the problems of every object in `bundle` to it.
pub fn check_bundle(bundle: &mut Bundle) {
    let mut problems = duplicates(bundle);
    for wf in &bundle.workflows {
        problems.extend(check_workflow(
            &wf.file,
            &wf.label("Workflow"),
            &wf.raw,
            &wf.object.spec,
            "spec",
            &bundle.agents,
        ));
    }
    let names: Vec<&str> = bundle.workflows.iter().map(|w| w.name.as_str()).collect();
    let specs = bundle.workflows.iter().map(|w| (&w.file, w.label("Workflow"), &w.object.spec, "spec"));
    let inline = bundle
        .runs
        .iter()
        .filter_map(|r| r.object.spec.workflow.as_ref().map(|s| (&r.file, r.label("WorkflowRun"), s, "spec.workflow")));
    for (file, label, spec, prefix) in specs.chain(inline) {
        problems.extend(missing_children(file, &label, spec, prefix, &names));
    }
    for run in &bundle.runs {
        let label = run.label("WorkflowRun");
        let spec = &run.object.spec;
        let workflow = match (&spec.workflow, &spec.workflow_ref) {
            (Some(inline), _) => {
                let found = check_workflow(&run.file, &label, &run.raw, inline, "spec.workflow", &bundle.agents);
                let ok = !found.iter().any(Problem::is_error);
                problems.extend(found);
                ok.then_some(inline)
            }
            (None, Some(r)) => match bundle.workflows.iter().rev().find(|w| w.name == r.name) {
                Some(w) => Some(&w.object.spec),
                None => {
                    problems.push(
                        Problem::warning(
                            &run.file,
                            format!("Workflow {:?} is not in the files; its parameters are not checked", r.name),
                        )
                        .object(&label)
                        .field("spec.workflowRef.name"),
                    );
                    None
                }
            },
            (None, None) => None, // the schema check reported it
        };
        if let Some(wf) = workflow
            && engine::validate(wf).is_ok()
            && let Err(e) = engine::params::resolve(wf, &spec.params)
        {
            problems.push(Problem::error(&run.file, e).object(&label));
        }
    }
    for budget in &bundle.budgets {
        problems.extend(unselected(budget, bundle));
    }
    bundle.problems.extend(problems);
}

/// What a Budget's selector names that is not in the files (in a cluster: its `Ready=False`).
fn unselected(budget: &Loaded<crate::api::Budget>, bundle: &Bundle) -> Vec<Problem> {
    let sel = &budget.object.spec.selector;
    let lists = [
        ("workflows", "Workflow", &sel.workflows, &bundle.workflows.iter().map(|w| &w.name).collect::<Vec<_>>()),
        ("agents", "Agent", &sel.agents, &bundle.agents.iter().map(|a| &a.name).collect::<Vec<_>>()),
    ];
    let mut out = Vec::new();
    for (field, kind, names, known) in lists {
        for (i, name) in names.iter().enumerate() {
            if !known.contains(&name) {
                out.push(
                    Problem::warning(&budget.file, format!("no {kind} {name:?} in the files: it counts nothing"))
                        .object(budget.label("Budget"))
                        .field(format!("spec.selector.{field}[{i}]")),
                );
            }
        }
    }
    out
}

/// Problems of one Workflow spec (`prefix` is where the spec is in its object).
pub fn check_workflow(
    file: &str,
    label: &str,
    raw: &Json,
    spec: &WorkflowSpec,
    prefix: &str,
    agents: &[Loaded<Agent>],
) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Err(invalid) = engine::validate(spec) {
        for e in invalid.0 {
            let field = format!("{prefix}.{}", e.field);
            let step = e.step.or_else(|| step_for_path(raw, &field));
            out.push(Problem::error(file, e.message).object(label).field(field).step(step));
        }
        return out;
    }
    let steps = spec.steps.iter().enumerate().map(|(i, s)| (format!("{prefix}.steps[{i}]"), s));
    let finally = spec.finally.iter().enumerate().map(|(i, s)| (format!("{prefix}.finally[{i}]"), s));
    let mut unchecked = false;
    for (field, step) in steps.chain(finally) {
        let Some(a) = &step.agent else { continue };
        if agents.is_empty() {
            unchecked = true;
            continue;
        }
        let step_id = Some(step.id.clone());
        if let Some(name) = &a.ref_
            && !agents.iter().any(|ag| &ag.name == name)
        {
            let known: Vec<&str> = agents.iter().map(|ag| ag.name.as_str()).collect();
            let hint =
                super::schema::closest(name, &known).map(|c| format!("; did you mean {c:?}?")).unwrap_or_default();
            out.push(
                Problem::error(file, format!("no Agent {name:?} in the files (they have: {}){hint}", known.join(", ")))
                    .object(label)
                    .field(format!("{field}.agent.ref"))
                    .step(step_id.clone()),
            );
        }
        if let Some(sel) = &a.selector
            && !agents.iter().any(|ag| selects(sel, &ag.object))
        {
            out.push(
                Problem::error(
                    file,
                    format!("no Agent in the files offers every capability of [{}]", sel.capabilities.join(", ")),
                )
                .object(label)
                .field(format!("{field}.agent.selector"))
                .step(step_id),
            );
        }
    }
    if unchecked {
        out.push(
            Problem::warning(file, "agent steps are not checked against Agents: there are none in the files")
                .object(label),
        );
    }
    out
}

/// `workflow` steps (loops' included) whose Workflow is not in the files: local mode fails them,
/// and a cluster needs that Workflow applied before they start.
fn missing_children(file: &str, label: &str, spec: &WorkflowSpec, prefix: &str, names: &[&str]) -> Vec<Problem> {
    let mut out = Vec::new();
    let steps = spec.steps.iter().enumerate().map(|(i, s)| (format!("{prefix}.steps[{i}]"), s));
    let finally = spec.finally.iter().enumerate().map(|(i, s)| (format!("{prefix}.finally[{i}]"), s));
    for (field, step) in steps.chain(finally) {
        let inner = step.loop_.iter().flat_map(|l| l.steps.iter().enumerate());
        let inner = inner.map(|(j, s)| (format!("{field}.loop.steps[{j}]"), s));
        for (field, step) in std::iter::once((field.clone(), step)).chain(inner) {
            let Some(w) = &step.workflow else { continue };
            if !names.contains(&w.ref_.as_str()) {
                out.push(
                    Problem::warning(
                        file,
                        format!(
                            "Workflow {:?} is not in the files: local run fails this step, and a cluster needs it applied (the files have: {})",
                            w.ref_,
                            if names.is_empty() { "none".to_string() } else { names.join(", ") }
                        ),
                    )
                    .object(label)
                    .field(format!("{field}.workflow.ref"))
                    .step(Some(step.id.clone())),
                );
            }
        }
    }
    out
}

/// Whether a capability selector selects an Agent.
pub fn selects(sel: &crate::api::CapabilitySelector, agent: &Agent) -> bool {
    sel.capabilities.iter().all(|c| agent.spec.capabilities.contains(c))
        && sel.match_labels.iter().all(|(k, v)| agent.labels().get(k) == Some(v))
}

/// Objects of one kind with one name: an error within a file, a warning across files (the
/// later file's object replaces the earlier one, as a later `kubectl apply` would).
fn duplicates(bundle: &Bundle) -> Vec<Problem> {
    let mut out = Vec::new();
    fn scan<T>(kind: &str, items: &[Loaded<T>], out: &mut Vec<Problem>) {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for it in items {
            if let Some(first) = seen.insert(&it.name, &it.file) {
                let p = if first == it.file {
                    Problem::error(&it.file, format!("{kind} {:?} is defined twice in this file", it.name))
                } else {
                    Problem::warning(&it.file, format!("replaces the {kind} of the same name from {first}"))
                };
                out.push(p.object(it.label(kind)).field("metadata.name"));
            }
        }
    }
    scan("Agent", &bundle.agents, &mut out);
    scan("Workflow", &bundle.workflows, &mut out);
    scan("Budget", &bundle.budgets, &mut out);
    out
}

/// The last object of each name (later files replace earlier ones).
pub fn last_of_each<T: Clone>(items: &[Loaded<T>]) -> Vec<Loaded<T>> {
    let mut out: Vec<Loaded<T>> = Vec::new();
    for it in items {
        match out.iter_mut().find(|o| o.name == it.name) {
            Some(o) => *o = it.clone(),
            None => out.push(it.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::load::load_text;

    fn checked(text: &str) -> Vec<String> {
        let mut b = Bundle::default();
        load_text("w.yaml", text, &mut b);
        check_bundle(&mut b);
        b.problems.iter().map(|p| p.to_string()).collect()
    }

    const HEAD: &str = "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: w}\n";

    #[test]
    fn dag_errors_name_file_object_step_and_field() {
        let got = checked(&format!("{HEAD}spec: {{steps: [{{id: a, template: x, dependsOn: [nope]}}]}}\n"));
        assert_eq!(got, vec!["error: w.yaml: Workflow/w: step \"a\": spec.steps[0].dependsOn: unknown step \"nope\""]);
        let got = checked(&format!(
            "{HEAD}spec: {{steps: [{{id: a, template: \"{{{{ steps.b.output }}}}\"}}, {{id: b, template: x}}]}}\n"
        ));
        assert!(got[0].contains("step \"a\": spec.steps[0].template:"), "{got:?}");
    }

    #[test]
    fn agent_references_and_run_params() {
        let agent = "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {name: writer}\n\
                     spec: {model: m, capabilities: [prose], endpoint: {baseUrl: 'http://127.0.0.1:1/v1'}}\n---\n";
        let got = checked(&format!(
            "{agent}{HEAD}spec:\n  params: [{{name: topic, required: true}}]\n  steps:\n  - {{id: a, agent: {{ref: writr, prompt: hi}}}}\n  \
             - {{id: b, agent: {{selector: {{capabilities: [code]}}, prompt: hi}}}}\n---\n\
             apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {{name: r}}\nspec: {{workflowRef: {{name: w}}}}\n"
        ));
        assert!(got.iter().any(|p| p.contains("step \"a\": spec.steps[0].agent.ref: no Agent \"writr\" in the files (they have: writer); did you mean \"writer\"?")), "{got:?}");
        assert!(got.iter().any(|p| p.contains("step \"b\": spec.steps[1].agent.selector: no Agent")), "{got:?}");
        assert!(
            got.iter().any(|p| p.contains("WorkflowRun/r: spec.params: required parameter \"topic\" is missing")),
            "{got:?}"
        );
    }

    #[test]
    fn duplicates_in_one_file_are_errors() {
        let wf = format!("{HEAD}spec: {{steps: [{{id: a, template: x}}]}}\n");
        let got = checked(&format!("{wf}---\n{wf}"));
        assert!(got.iter().any(|p| p.starts_with("error:") && p.contains("defined twice")), "{got:?}");
    }
}
