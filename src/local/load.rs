//! Reading Agents, Workflows, WorkflowRuns and Budgets from YAML files (several documents per file,
//! directories of `*.yaml`/`*.yml`, `-` for standard input), with the API server's schema
//! checks. Every problem names the file, the object, the step and the field.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value as Json;

use crate::api::{Agent, Budget, GROUP, VERSION, Workflow, WorkflowRun};

use super::schema;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The input cannot be run or applied as it is.
    Error,
    /// Worth knowing; nothing stops.
    Warning,
}

/// One problem in the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// The file, as given on the command line.
    pub file: String,
    /// `Kind/name`, or `document N` when the document has no usable kind or name.
    pub object: Option<String>,
    /// The step's id, when the problem is in a step.
    pub step: Option<String>,
    /// The field, as a path from the object (`spec.steps[1].dependsOn`).
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn error(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            file: file.into(),
            object: None,
            step: None,
            field: None,
            message: message.into(),
        }
    }
    pub fn warning(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self { severity: Severity::Warning, ..Self::error(file, message) }
    }
    pub fn object(mut self, object: impl Into<String>) -> Self {
        self.object = Some(object.into());
        self
    }
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub fn step(mut self, step: Option<String>) -> Self {
        self.step = step;
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.severity {
            Severity::Error => "error: ",
            Severity::Warning => "warning: ",
        })?;
        if !self.file.is_empty() {
            write!(f, "{}: ", self.file)?;
        }
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if let Some(s) = &self.step {
            write!(f, "step {s:?}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// An object read from a file.
#[derive(Debug, Clone)]
pub struct Loaded<T> {
    pub object: T,
    pub name: String,
    pub file: String,
    /// The object as written (for naming steps in later problems).
    pub raw: Json,
}

impl<T> Loaded<T> {
    /// The object as `Kind/name`.
    pub fn label(&self, kind: &str) -> String {
        format!("{kind}/{}", self.name)
    }
}

/// Everything read from the files.
#[derive(Debug, Default)]
pub struct Bundle {
    pub agents: Vec<Loaded<Agent>>,
    pub workflows: Vec<Loaded<Workflow>>,
    pub runs: Vec<Loaded<WorkflowRun>>,
    /// Budgets: the run's agent calls count against those that select them.
    pub budgets: Vec<Loaded<Budget>>,
    pub problems: Vec<Problem>,
    /// Files read, as given (directories expanded).
    pub files: Vec<String>,
}

impl Bundle {
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(Problem::is_error)
    }
}

/// Reads every file (directories: their `*.yaml` and `*.yml` files, sorted; `-`: stdin).
pub fn load(paths: &[PathBuf]) -> Bundle {
    let mut bundle = Bundle::default();
    for path in paths {
        for (file, text) in read_inputs(path, &mut bundle.problems) {
            bundle.files.push(file.clone());
            load_text(&file, &text, &mut bundle);
        }
    }
    if bundle.files.is_empty() && !bundle.has_errors() {
        bundle.problems.push(Problem::error("", "no YAML files given"));
    }
    bundle
}

fn read_inputs(path: &Path, problems: &mut Vec<Problem>) -> Vec<(String, String)> {
    let shown = path.display().to_string();
    if shown == "-" {
        let mut text = String::new();
        return match std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            Ok(_) => vec![("<stdin>".into(), text)],
            Err(e) => {
                problems.push(Problem::error("<stdin>", format!("cannot read standard input: {e}")));
                Vec::new()
            }
        };
    }
    if path.is_dir() {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect(),
            Err(e) => {
                problems.push(Problem::error(shown, format!("cannot read the directory: {e}")));
                return Vec::new();
            }
        };
        files.sort();
        if files.is_empty() {
            problems.push(Problem::warning(shown, "the directory has no .yaml or .yml files"));
        }
        return files.iter().flat_map(|f| read_inputs(f, problems)).collect();
    }
    match std::fs::read_to_string(path) {
        Ok(text) => vec![(shown, text)],
        Err(e) => {
            problems.push(Problem::error(shown, format!("cannot read the file: {e}")));
            Vec::new()
        }
    }
}

/// Reads the documents of one file into `bundle`.
pub fn load_text(file: &str, text: &str, bundle: &mut Bundle) {
    let docs: Vec<Json> = match serde_saphyr::from_multiple(text) {
        Ok(docs) => docs,
        Err(e) => {
            bundle.problems.push(Problem::error(file, format!("not valid YAML: {e}")));
            return;
        }
    };
    for (i, doc) in docs.into_iter().enumerate() {
        load_doc(file, i + 1, doc, bundle);
    }
}

fn load_doc(file: &str, n: usize, doc: Json, bundle: &mut Bundle) {
    let at_doc = format!("document {n}");
    let err = |m: String| Problem::error(file, m).object(at_doc.clone());
    let Some(map) = doc.as_object() else {
        bundle.problems.push(err(format!("must be a mapping with apiVersion and kind, not {}", short_type(&doc))));
        return;
    };
    let kind = map.get("kind").and_then(Json::as_str).unwrap_or_default().to_string();
    let api_version = map.get("apiVersion").and_then(Json::as_str).unwrap_or_default();
    let want_version = format!("{GROUP}/{VERSION}");
    let volt_kind = matches!(kind.as_str(), "Agent" | "Workflow" | "WorkflowRun" | "Budget");
    if kind.is_empty() {
        bundle.problems.push(err("kind is missing".into()).field("kind"));
        return;
    }
    // A kind only a cluster acts on: checked against its type, not run.
    if kind == "WorkflowSchedule" && api_version == want_version {
        let name = doc.pointer("/metadata/name").and_then(Json::as_str).unwrap_or_default();
        let label = format!("{kind}/{name}");
        let mut problems = Vec::new();
        if typed::<crate::api::WorkflowSchedule>(file, &label, &doc, &mut problems).is_some() {
            problems.push(
                Problem::warning(file, format!("{kind} is checked here and acted on in a cluster only")).object(label),
            );
        }
        bundle.problems.extend(problems);
        return;
    }
    if !volt_kind {
        if api_version.starts_with(&format!("{GROUP}/")) {
            bundle.problems.push(
                err(format!("unknown kind {kind:?}: expected Agent, Workflow, WorkflowRun or Budget")).field("kind"),
            );
        } else {
            bundle.problems.push(
                Problem::warning(file, format!("ignored: {api_version} {kind} is not a volt.dev kind"))
                    .object(at_doc.clone()),
            );
        }
        return;
    }
    let meta = map.get("metadata").and_then(Json::as_object);
    let name = meta.and_then(|m| m.get("name")).and_then(Json::as_str).unwrap_or_default().to_string();
    let generate = meta.and_then(|m| m.get("generateName")).and_then(Json::as_str).unwrap_or_default();
    let label = if !name.is_empty() {
        format!("{kind}/{name}")
    } else if !generate.is_empty() {
        format!("{kind}/{generate}*")
    } else {
        format!("{kind} ({at_doc})")
    };
    let mut problems = Vec::new();
    let obj_err = |m: String| Problem::error(file, m).object(label.clone());
    if api_version != want_version {
        problems.push(obj_err(format!("must be {want_version:?}, not {api_version:?}")).field("apiVersion"));
    }
    let generated = kind == "WorkflowRun" && !generate.is_empty();
    if name.is_empty() && !generated {
        let what = if kind == "WorkflowRun" { "set metadata.name or metadata.generateName" } else { "is missing" };
        problems.push(obj_err(what.into()).field("metadata.name"));
    } else if !name.is_empty() && !valid_object_name(&name) {
        problems.push(
            obj_err(format!(
                "{name:?} is not a valid name (lower-case letters, digits, '-' and '.', at most 253 characters)"
            ))
            .field("metadata.name"),
        );
    }
    for key in map.keys() {
        if !matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "spec" | "status") {
            problems.push(obj_err("unknown field".into()).field(key.clone()));
        }
    }
    match map.get("spec") {
        None | Some(Json::Null) => problems.push(obj_err("required field is missing".into()).field("spec")),
        Some(spec) => {
            for issue in schema::check_spec(&kind, spec, "spec") {
                let step = step_for_path(&doc, &issue.path);
                problems.push(obj_err(issue.message).field(issue.path).step(step));
            }
        }
    }
    if map.get("status").is_some_and(|s| !s.is_null()) {
        bundle
            .problems
            .push(Problem::warning(file, "status is ignored: it is written by the operator").object(label.clone()));
    }
    if problems.iter().any(Problem::is_error) {
        bundle.problems.extend(problems);
        return;
    }
    let shown_name = if name.is_empty() { format!("{generate}*") } else { name.clone() };
    match kind.as_str() {
        "Agent" => typed::<Agent>(file, &label, &doc, &mut problems)
            .map(|object| bundle.agents.push(Loaded { object, name: shown_name, file: file.into(), raw: doc.clone() })),
        "Workflow" => typed::<Workflow>(file, &label, &doc, &mut problems).map(|object| {
            bundle.workflows.push(Loaded { object, name: shown_name, file: file.into(), raw: doc.clone() })
        }),
        "Budget" => typed::<Budget>(file, &label, &doc, &mut problems).map(|object| {
            bundle.budgets.push(Loaded { object, name: shown_name, file: file.into(), raw: doc.clone() })
        }),
        _ => typed::<WorkflowRun>(file, &label, &doc, &mut problems)
            .map(|object| bundle.runs.push(Loaded { object, name: shown_name, file: file.into(), raw: doc.clone() })),
    };
    bundle.problems.extend(problems);
}

fn typed<T: DeserializeOwned>(file: &str, label: &str, doc: &Json, problems: &mut Vec<Problem>) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(doc.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            let path = e.path().to_string();
            let step = step_for_path(doc, &path);
            let mut p = Problem::error(file, e.inner().to_string()).object(label).step(step);
            if path != "." {
                p = p.field(path);
            }
            problems.push(p);
            None
        }
    }
}

/// The id of the step a field path is in (`spec.steps[2].x`, `spec.workflow.finally[0].y`).
pub fn step_for_path(doc: &Json, path: &str) -> Option<String> {
    for list in ["spec.steps[", "spec.finally[", "spec.workflow.steps[", "spec.workflow.finally["] {
        if let Some(rest) = path.strip_prefix(list) {
            let index: usize = rest.split(']').next()?.parse().ok()?;
            let pointer = format!("/{}/{index}/id", list.trim_end_matches('[').replace('.', "/"));
            return doc.pointer(&pointer).and_then(Json::as_str).map(str::to_string);
        }
    }
    None
}

/// A Kubernetes object name (a DNS subdomain).
pub fn valid_object_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn short_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "an empty document",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(text: &str) -> Bundle {
        let mut b = Bundle::default();
        load_text("f.yaml", text, &mut b);
        b
    }

    #[test]
    fn reads_several_documents_of_each_kind() {
        let b = bundle(
            "apiVersion: volt.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\nspec: {model: m, endpoint: {baseUrl: 'http://x/v1'}}\n---\n\
             apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: w}\nspec: {steps: [{id: s, template: hi}]}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n\
             apiVersion: volt.dev/v1alpha1\nkind: WorkflowRun\nmetadata: {generateName: w-}\nspec: {workflowRef: {name: w}}\n",
        );
        assert_eq!((b.agents.len(), b.workflows.len(), b.runs.len()), (1, 1, 1), "{:?}", b.problems);
        assert!(!b.has_errors(), "{:?}", b.problems);
        assert!(b.problems.iter().any(|p| p.message.contains("ConfigMap is not a volt.dev kind")));
        assert_eq!(b.runs[0].name, "w-*");
    }

    #[test]
    fn problems_name_file_object_step_and_field() {
        let b = bundle(
            "apiVersion: volt.dev/v1alpha1\nkind: Workflow\nmetadata: {name: w}\n\
             spec: {steps: [{id: a, template: hi}, {id: b, template: x, retry: {limit: many}}]}\n",
        );
        let p = b.problems.iter().find(|p| p.is_error()).expect("an error");
        assert_eq!(
            p.to_string(),
            "error: f.yaml: Workflow/w: step \"b\": spec.steps[1].retry.limit: must be an integer, not a string (\"many\")"
        );
    }

    #[test]
    fn bad_yaml_and_bad_documents() {
        let b = bundle("kind: [unclosed\n");
        assert!(b.problems[0].message.starts_with("not valid YAML"), "{:?}", b.problems);
        let b = bundle("- a\n- b\n");
        assert!(b.problems[0].to_string().contains("document 1: must be a mapping"), "{:?}", b.problems);
        let b = bundle("apiVersion: volt.dev/v1\nkind: Workflow\nmetadata: {name: Bad_Name}\nspec: {steps: []}\n");
        let all: Vec<String> = b.problems.iter().map(|p| p.to_string()).collect();
        assert!(all.iter().any(|p| p.contains("apiVersion: must be \"volt.dev/v1alpha1\"")), "{all:?}");
        assert!(all.iter().any(|p| p.contains("metadata.name: \"Bad_Name\" is not a valid name")), "{all:?}");
    }

    #[test]
    fn step_of_a_path() {
        let doc = serde_json::json!({"spec": {"steps": [{"id": "a"}], "workflow": {"finally": [{"id": "z"}]}}});
        assert_eq!(step_for_path(&doc, "spec.steps[0].when"), Some("a".into()));
        assert_eq!(step_for_path(&doc, "spec.workflow.finally[0]"), Some("z".into()));
        assert_eq!(step_for_path(&doc, "spec.params"), None);
    }
}
