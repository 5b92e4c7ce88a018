//! Validation of a Workflow spec and its DAG, done the same way by the controller, by local
//! mode's `validate` and by every run before it starts.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::api::{STEP_ID_MAX_LEN, Step, WorkflowSpec};

use super::template::{self, ROOTS};

/// One problem in a Workflow spec, naming the step and field it is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ValidationError {
    /// The step's id, when the problem is in a step.
    pub step: Option<String>,
    /// The field, as a path (`steps[2].dependsOn`, `params`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.step {
            Some(step) => write!(f, "step {step:?}: {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// All problems of a spec, in one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<ValidationError>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 10;
        for (i, e) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, "; and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// A validated DAG: steps indexed in spec order (DAG steps, then `finally`), with edges.
#[derive(Debug, Clone)]
pub struct Dag {
    ids: Vec<String>,
    index: HashMap<String, usize>,
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    finally_start: usize,
    topo: Vec<usize>,
    reads: Vec<Vec<usize>>,
    /// The body of each loop step, by the loop's index.
    bodies: HashMap<usize, Arc<Body>>,
}

/// The steps of a loop, validated as a small workflow of their own (with the workflow's
/// defaults, and no `finally`).
#[derive(Debug, Clone)]
pub struct Body {
    pub spec: WorkflowSpec,
    pub dag: Dag,
}

/// What a loop body's templates may read besides its own steps.
struct Outer<'a> {
    /// Steps of the workflow upstream of the loop.
    upstream: BTreeSet<&'a str>,
    /// Every step id of the workflow.
    all: BTreeSet<&'a str>,
    params: BTreeSet<&'a str>,
}

impl Dag {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
    /// The kind of the step a status key (`id`, `id[index]`, `loop.iteration.id`) belongs to.
    pub fn kind_of(&self, spec: &WorkflowSpec, key: &str) -> Option<crate::api::StepKind> {
        self.step_of_key(spec, key).and_then(Step::kind)
    }
    /// The step a status key belongs to (inside a loop: the loop's inner step).
    pub fn step_of_key<'a>(&'a self, spec: &'a WorkflowSpec, key: &str) -> Option<&'a Step> {
        if let Some((loop_id, _, inner)) = crate::naming::parse_loop_key(key) {
            let body = self.body(self.index_of(loop_id)?)?;
            return body.dag.step_of_key(&body.spec, inner);
        }
        self.index_of(crate::naming::step_id_of(key)).map(|i| step_at(spec, i))
    }
    /// The body of loop step `i`.
    pub fn body(&self, i: usize) -> Option<&Body> {
        self.bodies.get(&i).map(|b| &**b)
    }
    pub fn deps(&self, i: usize) -> &[usize] {
        &self.deps[i]
    }
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }
    pub fn is_finally(&self, i: usize) -> bool {
        i >= self.finally_start
    }
    /// Steps in a topological order (dependencies first), DAG steps before `finally` steps.
    pub fn topo_order(&self) -> &[usize] {
        &self.topo
    }
    /// The DAG steps (not `finally`).
    pub fn dag_steps(&self) -> std::ops::Range<usize> {
        0..self.finally_start
    }
    /// The `finally` steps.
    pub fn finally_steps(&self) -> std::ops::Range<usize> {
        self.finally_start..self.ids.len()
    }
    /// The steps whose `steps.<id>` the templates of step `i` read, in index order.
    pub fn reads(&self, i: usize) -> &[usize] {
        &self.reads[i]
    }
}

/// The step at DAG index `i`.
pub fn step_at(spec: &WorkflowSpec, i: usize) -> &Step {
    if i < spec.steps.len() { &spec.steps[i] } else { &spec.finally[i - spec.steps.len()] }
}

fn field_of(spec: &WorkflowSpec, i: usize) -> String {
    if i < spec.steps.len() { format!("steps[{i}]") } else { format!("finally[{}]", i - spec.steps.len()) }
}

/// Validates a spec: ids, kinds, dependencies, cycles, templates and the names they read.
#[allow(clippy::needless_range_loop)]
pub fn validate(spec: &WorkflowSpec) -> Result<Dag, InvalidSpec> {
    validate_scoped(spec, None)
}

#[allow(clippy::needless_range_loop)]
fn validate_scoped(spec: &WorkflowSpec, outer: Option<&Outer>) -> Result<Dag, InvalidSpec> {
    let mut errors = Vec::new();
    let err = |errors: &mut Vec<ValidationError>, step: Option<&str>, field: String, message: String| {
        errors.push(ValidationError { step: step.map(str::to_string), field, message });
    };

    let n = spec.steps.len() + spec.finally.len();
    if spec.steps.is_empty() {
        err(&mut errors, None, "steps".into(), "a workflow needs at least one step".into());
    }

    // Parameters.
    let mut param_names: BTreeSet<&str> = outer.map(|o| o.params.clone()).unwrap_or_default();
    for (i, p) in spec.params.iter().enumerate() {
        if !param_names.insert(p.name.as_str()) {
            err(&mut errors, None, format!("params[{i}].name"), format!("duplicate parameter {:?}", p.name));
        }
        if p.required && p.default.is_some() {
            err(
                &mut errors,
                None,
                format!("params[{i}]"),
                format!("parameter {:?} is required and also has a default", p.name),
            );
        }
    }

    // Ids and kinds.
    let mut ids = Vec::with_capacity(n);
    let mut index = HashMap::with_capacity(n);
    for i in 0..n {
        let step = step_at(spec, i);
        let field = field_of(spec, i);
        let id = step.id.as_str();
        if !valid_step_id(id) {
            err(
                &mut errors,
                Some(id),
                format!("{field}.id"),
                format!("must be a DNS label (lower-case letters, digits, '-'), 1 to {STEP_ID_MAX_LEN} characters"),
            );
        }
        if index.insert(id.to_string(), i).is_some() {
            err(&mut errors, Some(id), format!("{field}.id"), "duplicate step id".into());
        }
        ids.push(id.to_string());
        match step.kinds().len() {
            1 => {}
            0 => err(&mut errors, Some(id), field.clone(), format!("no kind: set exactly one of {KINDS}")),
            _ => err(
                &mut errors,
                Some(id),
                field.clone(),
                format!(
                    "several kinds ({}): set exactly one of {KINDS}",
                    step.kinds().iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ),
        }
        check_kind_fields(step, &field, &mut errors);
        if outer.is_some_and(|o| o.all.contains(id)) {
            err(
                &mut errors,
                Some(id),
                format!("{field}.id"),
                "a step of a loop cannot share an id with a step of the workflow".into(),
            );
        }
        if outer.is_some() && step.loop_.is_some() {
            err(&mut errors, Some(id), format!("{field}.loop"), "loops do not nest".into());
        }
        if step.max_parallel.is_some() && step.for_each.is_none() {
            err(&mut errors, Some(id), format!("{field}.maxParallel"), "maxParallel needs forEach".into());
        }
    }

    // Edges (index loops: `i` names a step in several tables at once).
    let finally_start = spec.steps.len();
    let mut deps = vec![Vec::new(); n];
    let mut dependents = vec![Vec::new(); n];
    for i in 0..n {
        let step = step_at(spec, i);
        let field = field_of(spec, i);
        let mut seen = BTreeSet::new();
        for d in &step.depends_on {
            if !seen.insert(d.as_str()) {
                err(&mut errors, Some(&step.id), format!("{field}.dependsOn"), format!("{d:?} is listed twice"));
                continue;
            }
            match index.get(d.as_str()) {
                None => err(&mut errors, Some(&step.id), format!("{field}.dependsOn"), format!("unknown step {d:?}")),
                Some(&j) if i < finally_start && j >= finally_start => err(
                    &mut errors,
                    Some(&step.id),
                    format!("{field}.dependsOn"),
                    format!("{d:?} is a finally step; DAG steps cannot depend on finally steps"),
                ),
                Some(&j) if i >= finally_start && j < finally_start => err(
                    &mut errors,
                    Some(&step.id),
                    format!("{field}.dependsOn"),
                    format!(
                        "{d:?} is a DAG step; finally steps run after the whole DAG and may depend only on other finally steps"
                    ),
                ),
                Some(&j) => {
                    deps[i].push(j);
                    dependents[j].push(i);
                }
            }
        }
    }

    // Cycles.
    let topo = match topo_sort(&deps) {
        Ok(order) => order,
        Err(cycle) => {
            let names: Vec<&str> = cycle.iter().map(|&i| ids[i].as_str()).collect();
            err(
                &mut errors,
                Some(names[0]),
                format!("{}.dependsOn", field_of(spec, cycle[0])),
                format!("dependency cycle: {}", names.join(" -> ")),
            );
            Vec::new()
        }
    };

    // Templates, and the names they read (needs the DAG to know what is upstream).
    let mut reads = Vec::new();
    let mut bodies = HashMap::new();
    if errors.is_empty() {
        let ancestors = ancestors(&deps, &topo);
        reads = (0..n)
            .map(|i| check_templates(spec, i, &index, &ancestors[i], finally_start, &param_names, outer, &mut errors))
            .collect();
        for i in 0..n {
            let step = step_at(spec, i);
            let Some(l) = &step.loop_ else { continue };
            let field = format!("{}.loop", field_of(spec, i));
            let scope = Outer {
                upstream: ancestors[i].iter().map(|&j| ids[j].as_str()).collect(),
                all: ids.iter().map(String::as_str).collect(),
                params: param_names.clone(),
            };
            // A loop reads what its steps read of the workflow: any upstream step.
            reads[i] = ancestors[i].iter().copied().collect();
            let body = WorkflowSpec { steps: l.steps.clone(), defaults: spec.defaults.clone(), ..Default::default() };
            let body_ids: BTreeSet<&str> = l.steps.iter().map(|s| s.id.as_str()).collect();
            check_until(&step.id, &field, &l.until, &body_ids, &param_names, &mut errors);
            match validate_scoped(&body, Some(&scope)) {
                Ok(dag) => {
                    bodies.insert(i, Arc::new(Body { spec: body, dag }));
                }
                Err(InvalidSpec(errs)) => errors.extend(errs.into_iter().map(|mut e| {
                    e.field = format!("{field}.{}", e.field);
                    e.step = Some(format!("{}.{}", step.id, e.step.unwrap_or_default()));
                    e
                })),
            }
        }
        if outer.is_none()
            && let Some(output) = &spec.output
        {
            check_output(output, &index, &param_names, &mut errors);
        }
    }

    if errors.is_empty() {
        Ok(Dag { ids, index, deps, dependents, finally_start, topo, reads, bodies })
    } else {
        errors.sort();
        errors.dedup();
        Err(InvalidSpec(errors))
    }
}

/// Checks a run's `spec.decisions` against its workflow: a key names an approval step by its
/// status key (`sign-off`, `review.2.sign-off` inside a loop), or is `<stepKey>/<name>` for a
/// decision another kind of step waits on (a tool call of an agent step, say).
pub fn check_decisions<'a>(
    spec: &WorkflowSpec,
    dag: &Dag,
    keys: impl IntoIterator<Item = &'a String>,
) -> Result<(), String> {
    for key in keys {
        if let Some((step_key, tool)) = key.split_once('/') {
            let tools = dag.step_of_key(spec, step_key).and_then(|s| s.agent.as_ref()).map(|a| &a.tools);
            if !tools.is_some_and(|t| t.iter().any(|t| t == tool)) {
                return Err(format!(
                    "spec.decisions: {key:?} names no tool of an agent step (a tool call's key is <step key>/<tool>, the tool in the step's agent.tools)"
                ));
            }
            continue;
        }
        let ok = dag.step_of_key(spec, key).is_some_and(|s| s.approval.is_some());
        if !ok {
            let approvals: Vec<&str> = (0..dag.len())
                .map(|i| step_at(spec, i))
                .filter(|s| s.approval.is_some())
                .map(|s| s.id.as_str())
                .collect();
            return Err(format!(
                "spec.decisions: {key:?} is not an approval step of the workflow (approval steps: {})",
                if approvals.is_empty() { "none".to_string() } else { approvals.join(", ") }
            ));
        }
    }
    Ok(())
}

/// Whether `id` is a valid step id.
pub fn valid_step_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= STEP_ID_MAX_LEN
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The step kinds, as validation messages list them.
const KINDS: &str = "agent, container, http, template, loop, approval, wait, workflow, resource";

/// Checks a loop's `until`: it parses, and reads only the loop's own steps.
fn check_until(
    loop_id: &str,
    field: &str,
    until: &str,
    body: &BTreeSet<&str>,
    params: &BTreeSet<&str>,
    errors: &mut Vec<ValidationError>,
) {
    let mut push = |message: String| {
        errors.push(ValidationError { step: Some(loop_id.to_string()), field: format!("{field}.until"), message })
    };
    let names = match template::parse_expression(until) {
        Ok(names) => names,
        Err(e) => return push(format!("does not parse: {e}")),
    };
    for name in names {
        let mut parts = name.split('.');
        match (parts.next().unwrap_or_default(), parts.next()) {
            ("steps", Some(s)) if !body.contains(s) => push(format!(
                "until reads steps.{s}, which is not a step of the loop (until reads the steps of the iteration that just ended: {})",
                body.iter().copied().collect::<Vec<_>>().join(", ")
            )),
            ("params", Some(p)) if !params.contains(p) => push(format!("unknown parameter {p:?}")),
            ("steps" | "params" | "run" | "loop", _) => {}
            (root, _) if template::is_builtin(root) => {}
            (root, _) => push(format!("unknown name {root:?} (until can read steps, params, run, loop)")),
        }
    }
}

/// Checks a workflow's `output`: it parses and reads known steps and parameters.
fn check_output(
    output: &str,
    index: &HashMap<String, usize>,
    params: &BTreeSet<&str>,
    errors: &mut Vec<ValidationError>,
) {
    let mut push = |message: String| errors.push(ValidationError { step: None, field: "output".into(), message });
    let names = match template::parse_template(output) {
        Ok(names) => names,
        Err(e) => return push(format!("template does not parse: {e}")),
    };
    for name in names {
        let mut parts = name.split('.');
        match (parts.next().unwrap_or_default(), parts.next()) {
            ("steps", Some(s)) if !index.contains_key(s) => push(format!("unknown step {s:?}")),
            ("params", Some(p)) if !params.contains(p) => push(format!("unknown parameter {p:?}")),
            ("steps" | "params" | "run", _) => {}
            (root, _) if template::is_builtin(root) => {}
            (root, _) => push(format!("unknown name {root:?} (output can read steps, params, run)")),
        }
    }
}

fn check_kind_fields(step: &Step, field: &str, errors: &mut Vec<ValidationError>) {
    let mut push =
        |f: String, m: &str| errors.push(ValidationError { step: Some(step.id.clone()), field: f, message: m.into() });
    if step.for_each.is_some() && (step.loop_.is_some() || step.approval.is_some() || step.wait.is_some()) {
        push(
            format!("{field}.forEach"),
            "forEach works on agent, container, http, template, workflow and resource steps",
        );
    }
    if (step.workflow.is_some() || step.resource.is_some()) && step.cache.as_ref().is_some_and(|c| c.enabled) {
        push(
            format!("{field}.cache"),
            "workflow and resource steps are not memoized (the steps of a child Workflow can be)",
        );
    }
    if let Some(w) = &step.workflow
        && w.ref_.trim().is_empty()
    {
        push(format!("{field}.workflow.ref"), "must name a Workflow");
    }
    if let Some(r) = &step.resource {
        for part in ["apiVersion", "kind"] {
            if r.manifest.get(part).and_then(|v| v.as_str()).is_none_or(|s| s.trim().is_empty()) {
                push(format!("{field}.resource.manifest.{part}"), "required (a non-empty string)");
            }
        }
        if !r.manifest.is_object() {
            push(format!("{field}.resource.manifest"), "must be an object");
        }
        let checks = [
            ("successWhen", Some(&r.success_when), true),
            ("failureWhen", r.failure_when.as_ref(), true),
            ("output", r.output.as_ref(), false),
        ];
        for (name, source, is_expr) in checks {
            if let Some(source) = source
                && let Err(e) = template::check_reads_only(source, "object", is_expr)
            {
                push(format!("{field}.resource.{name}"), &e);
            }
        }
    }
    if let Some(l) = &step.loop_
        && l.steps.is_empty()
    {
        push(format!("{field}.loop.steps"), "a loop needs at least one step");
    }
    if let Some(w) = &step.wait {
        match (&w.seconds, &w.until) {
            (None, None) | (Some(_), Some(_)) => push(format!("{field}.wait"), "set exactly one of seconds and until"),
            (None, Some(u)) if !template::is_template(u) && u.trim().parse::<jiff::Timestamp>().is_err() => push(
                format!("{field}.wait.until"),
                "must be an RFC 3339 time (such as 2030-01-01T00:00:00Z) or a template rendering to one",
            ),
            _ => {}
        }
    }
    if let Some(a) = &step.agent {
        match (&a.ref_, &a.selector) {
            (None, None) => push(format!("{field}.agent"), "set ref or selector"),
            (Some(_), Some(_)) => push(format!("{field}.agent"), "set ref or selector, not both"),
            (Some(r), None) if r.is_empty() => push(format!("{field}.agent.ref"), "must not be empty"),
            (None, Some(s)) if s.capabilities.is_empty() => {
                push(format!("{field}.agent.selector.capabilities"), "must list at least one capability")
            }
            _ => {}
        }
        if a.prompt.trim().is_empty() && a.messages.is_empty() {
            push(format!("{field}.agent.prompt"), "must not be empty (or give messages)");
        }
        for (j, m) in a.messages.iter().enumerate() {
            if m.content.trim().is_empty() {
                push(format!("{field}.agent.messages[{j}].content"), "must not be empty");
            }
        }
        if let Some(o) = &a.output
            && let Err(e) = super::output_schema::compile(&o.schema)
        {
            push(format!("{field}.agent.output.schema"), &format!("not a valid JSON Schema: {e}"));
        }
        for (j, t) in a.tools.iter().enumerate() {
            if t.trim().is_empty() {
                push(format!("{field}.agent.tools[{j}]"), "must not be empty");
            } else if a.tools[..j].contains(t) {
                push(format!("{field}.agent.tools[{j}]"), &format!("tool {t:?} is listed twice"));
            }
        }
        if a.max_turns.is_some() && a.tools.is_empty() {
            push(format!("{field}.agent.maxTurns"), "only means something with tools");
        }
    }
    if let Some(c) = &step.container
        && c.image.trim().is_empty()
    {
        push(format!("{field}.container.image"), "must not be empty");
    }
    if let Some(h) = &step.http
        && h.url.trim().is_empty()
    {
        push(format!("{field}.http.url"), "must not be empty");
    }
}

/// The templated fields of a step, as (field path, source, is an expression).
pub fn templated_fields(step: &Step, field: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    if let Some(w) = &step.when {
        out.push((format!("{field}.when"), w.clone(), true));
    }
    if let Some(f) = &step.for_each {
        out.push((format!("{field}.forEach"), f.clone(), false));
    }
    if let Some(a) = &step.agent {
        out.push((format!("{field}.agent.prompt"), a.prompt.clone(), false));
        for (j, m) in a.messages.iter().enumerate() {
            out.push((format!("{field}.agent.messages[{j}].content"), m.content.clone(), false));
        }
    }
    if let Some(t) = &step.template {
        out.push((format!("{field}.template"), t.clone(), false));
    }
    if let Some(m) = step.approval.as_ref().and_then(|a| a.message.as_ref()) {
        out.push((format!("{field}.approval.message"), m.clone(), false));
    }
    if let Some(u) = step.wait.as_ref().and_then(|w| w.until.as_ref()) {
        out.push((format!("{field}.wait.until"), u.clone(), false));
    }
    if let Some(w) = &step.workflow {
        for (k, v) in &w.params {
            json_strings(v, &format!("{field}.workflow.params.{k}"), &mut out);
        }
    }
    if let Some(r) = &step.resource {
        json_strings(&r.manifest, &format!("{field}.resource.manifest"), &mut out);
    }
    if let Some(h) = &step.http {
        out.push((format!("{field}.http.url"), h.url.clone(), false));
        if let Some(b) = &h.body {
            out.push((format!("{field}.http.body"), b.clone(), false));
        }
        for (k, v) in &h.headers {
            out.push((format!("{field}.http.headers.{k}"), v.clone(), false));
        }
    }
    if let Some(c) = &step.container {
        for (j, s) in c.command.iter().enumerate() {
            out.push((format!("{field}.container.command[{j}]"), s.clone(), false));
        }
        for (j, s) in c.args.iter().enumerate() {
            out.push((format!("{field}.container.args[{j}]"), s.clone(), false));
        }
        for (j, e) in c.env.iter().enumerate() {
            if let Some(v) = &e.value {
                out.push((format!("{field}.container.env[{j}].value"), v.clone(), false));
            }
        }
    }
    out
}

/// The strings of a JSON tree, as templated fields.
fn json_strings(value: &serde_json::Value, field: &str, out: &mut Vec<(String, String, bool)>) {
    match value {
        serde_json::Value::String(s) => out.push((field.to_string(), s.clone(), false)),
        serde_json::Value::Array(items) => {
            for (j, v) in items.iter().enumerate() {
                json_strings(v, &format!("{field}[{j}]"), out);
            }
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                json_strings(v, &format!("{field}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Checks the templates of step `i`; returns the steps they read.
#[allow(clippy::too_many_arguments)]
fn check_templates(
    spec: &WorkflowSpec,
    i: usize,
    index: &HashMap<String, usize>,
    upstream: &BTreeSet<usize>,
    finally_start: usize,
    params: &BTreeSet<&str>,
    outer: Option<&Outer>,
    errors: &mut Vec<ValidationError>,
) -> Vec<usize> {
    let step = step_at(spec, i);
    let field = field_of(spec, i);
    let mut reads = BTreeSet::new();
    for (path, source, is_expr) in templated_fields(step, &field) {
        let parsed = if is_expr { template::parse_expression(&source) } else { template::parse_template(&source) };
        let names = match parsed {
            Ok(names) => names,
            Err(e) => {
                errors.push(ValidationError {
                    step: Some(step.id.clone()),
                    field: path,
                    message: format!("template does not parse: {e}"),
                });
                continue;
            }
        };
        // `item` and `index` exist in a forEach step's work, not in its `forEach` or its `when`
        // (evaluated once for the whole step, before the fan-out).
        let before_fan_out = path == format!("{field}.forEach") || path == format!("{field}.when");
        let in_for_each = step.for_each.is_some() && !before_fan_out;
        reads.extend(template::referenced_steps(&names).iter().filter_map(|s| index.get(s)));
        for name in names {
            let mut parts = name.split('.');
            let root = parts.next().unwrap_or_default();
            let problem = match root {
                _ if template::is_builtin(root) => None,
                _ if !ROOTS.contains(&root) => Some(format!(
                    "unknown name {root:?} (templates can read {}){}",
                    ROOTS.join(", "),
                    hyphen_hint(index.keys().filter(|id| id.contains(&format!("-{root}"))))
                )),
                "item" | "index" if !in_for_each && step.for_each.is_some() => Some(format!(
                    "{root:?} is not defined in the forEach or when of a step, only in its work (they are evaluated once, before the fan-out)"
                )),
                "item" | "index" if !in_for_each => Some(format!("{root:?} is only defined inside a forEach step")),
                "loop" if outer.is_none() => Some("\"loop\" is only defined inside a loop's steps".to_string()),
                "params" => match parts.next() {
                    Some(p) if !params.contains(p) => Some(format!("unknown parameter {p:?}")),
                    _ => None,
                },
                "steps" => match parts.next() {
                    Some(s) => match index.get(s) {
                        None if outer.is_some_and(|o| o.upstream.contains(s)) => None,
                        None if outer.is_some_and(|o| o.all.contains(s)) => {
                            Some(format!("steps.{s} is not upstream of the loop: add {s:?} to the loop's dependsOn"))
                        }
                        None => Some(format!(
                            "unknown step {s:?}{}",
                            hyphen_hint(index.keys().filter(|id| id.starts_with(&format!("{s}-"))))
                        )),
                        Some(&j) if j == i => Some(format!("a step cannot read its own output (steps.{s})")),
                        // finally steps may read every DAG step and their upstream finally steps.
                        Some(&j) if i >= finally_start && j < finally_start => None,
                        Some(&j) if !upstream.contains(&j) => Some(format!(
                            "steps.{s} is not upstream of this step: add {s:?} to dependsOn (directly or through another step)"
                        )),
                        Some(&j) => match parts.next() {
                            None | Some("output" | "json" | "phase") => None,
                            Some("iterations") if step_at(spec, j).loop_.is_some() => None,
                            Some(other) => Some(format!(
                                "steps.{s}.{other}: a step has output, json and phase (and a loop, iterations)"
                            )),
                        },
                    },
                    None => None,
                },
                _ => None,
            };
            if let Some(message) = problem {
                errors.push(ValidationError { step: Some(step.id.clone()), field: path.clone(), message });
            }
        }
    }
    reads.into_iter().collect()
}

/// Kahn's algorithm; on a cycle, returns one cycle as a path that ends where it starts.
fn topo_sort(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut indegree: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut dependents = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            dependents[d].push(i);
        }
    }
    let mut ready: std::collections::VecDeque<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &j in &dependents[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push_back(j);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every step left has an unfinished dependency that is also left: walk them until one
    // repeats, and that stretch of the walk is a cycle.
    let left: BTreeSet<usize> = (0..n).filter(|i| indegree[*i] > 0).collect();
    let start = *left.iter().next().unwrap_or(&0);
    let mut path = vec![start];
    let mut pos = HashMap::from([(start, 0usize)]);
    let mut cur = start;
    loop {
        let next = deps[cur].iter().copied().find(|d| left.contains(d)).unwrap_or(start);
        if let Some(&p) = pos.get(&next) {
            let mut cycle: Vec<usize> = path[p..].to_vec();
            // Present the cycle in dependency order: a -> b means b depends on a.
            cycle.reverse();
            cycle.push(cycle[0]);
            return Err(cycle);
        }
        pos.insert(next, path.len());
        path.push(next);
        cur = next;
    }
}

/// For each step, every step it transitively depends on.
fn ancestors(deps: &[Vec<usize>], topo: &[usize]) -> Vec<BTreeSet<usize>> {
    let mut out = vec![BTreeSet::new(); deps.len()];
    for &i in topo {
        let mut set = BTreeSet::new();
        for &d in &deps[i] {
            set.insert(d);
            set.extend(out[d].iter().copied());
        }
        out[i] = set;
    }
    out
}

/// For a name that is part of a step id with a `-` (`steps.first-step` is `steps.first - step`):
/// how to read that step.
fn hyphen_hint<'a>(ids: impl Iterator<Item = &'a String>) -> String {
    match ids.min() {
        Some(id) => format!("; a step id with '-' is read as steps['{id}']"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_id_with_a_hyphen_is_read_by_subscript_and_the_dotted_form_says_how() {
        let mut s = spec(vec![t("first-step", &[], "x"), t("b", &["first-step"], "{{ steps['first-step'].output }}")]);
        let dag = validate(&s).expect("subscript reads are references");
        assert_eq!(dag.reads(1).to_vec(), vec![0]);
        s.steps[1].template = Some("{{ steps.first-step.output }}".into());
        let m = validate(&s).expect_err("dotted form").to_string();
        assert!(m.contains("a step id with '-' is read as steps['first-step']"), "{m}");
        // Not upstream: the subscript form is checked like the dotted one.
        let s = spec(vec![t("first-step", &[], "x"), t("b", &[], "{{ steps['first-step'].output }}")]);
        let m = validate(&s).expect_err("not upstream").to_string();
        assert!(m.contains("steps.first-step is not upstream"), "{m}");
    }
    use crate::api::{AgentStep, ContainerStep, ParamSpec};

    fn t(id: &str, deps: &[&str], template: &str) -> Step {
        Step {
            id: id.into(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            template: Some(template.into()),
            ..Default::default()
        }
    }

    fn spec(steps: Vec<Step>) -> WorkflowSpec {
        WorkflowSpec { steps, ..Default::default() }
    }

    fn messages(spec: &WorkflowSpec) -> String {
        validate(spec).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_diamond() {
        let s = spec(vec![
            t("a", &[], "x"),
            t("b", &["a"], "{{ steps.a.output }}"),
            t("c", &["a"], "y"),
            t("d", &["b", "c"], "{{ steps.a.output }}{{ steps.b.output }}"),
        ]);
        let dag = validate(&s).unwrap();
        assert_eq!(dag.len(), 4);
        let pos = |id: &str| dag.topo_order().iter().position(|&i| dag.id(i) == id).unwrap();
        assert!(pos("a") < pos("b") && pos("b") < pos("d") && pos("c") < pos("d"));
    }

    #[test]
    fn names_the_cycle() {
        let s = spec(vec![t("a", &["c"], "x"), t("b", &["a"], "x"), t("c", &["b"], "x"), t("d", &[], "x")]);
        let m = messages(&s);
        assert!(m.contains("dependency cycle"), "{m}");
        for id in ["a", "b", "c"] {
            assert!(m.contains(id), "{m}");
        }
        assert!(!m.contains("\"d\""), "{m}");
        let m = messages(&spec(vec![t("a", &["a"], "x")]));
        assert!(m.contains("a -> a"), "{m}");
    }

    #[test]
    fn duplicates_unknown_deps_and_kinds() {
        let mut both = t("k", &[], "x");
        both.container = Some(ContainerStep { image: "busybox".into(), ..Default::default() });
        let none = Step { id: "z".into(), ..Default::default() };
        let s = spec(vec![t("a", &[], "x"), t("a", &[], "y"), t("b", &["nope"], "x"), both, none]);
        let m = messages(&s);
        assert!(m.contains(r#"step "a": steps[1].id: duplicate step id"#), "{m}");
        assert!(m.contains(r#"step "b": steps[2].dependsOn: unknown step "nope""#), "{m}");
        assert!(m.contains(r#"step "k": steps[3]: several kinds (container, template)"#), "{m}");
        assert!(m.contains(r#"step "z": steps[4]: no kind"#), "{m}");
    }

    #[test]
    fn templates_must_parse_and_read_upstream_only() {
        let s = spec(vec![t("a", &[], "x"), t("b", &[], "{{ steps.a.output }}"), t("c", &["a"], "{{ broken")]);
        let m = messages(&s);
        assert!(m.contains(r#"step "b": steps[1].template: steps.a is not upstream"#), "{m}");
        assert!(m.contains(r#"step "c": steps[2].template: template does not parse"#), "{m}");
        let s = spec(vec![t("a", &[], "{{ params.nope }} {{ item }} {{ foo }}")]);
        let m = messages(&s);
        assert!(m.contains("unknown parameter \"nope\""), "{m}");
        assert!(m.contains("only defined inside a forEach"), "{m}");
        assert!(m.contains("unknown name \"foo\""), "{m}");
    }

    #[test]
    fn finally_reads_everything_but_depends_only_on_finally() {
        let mut s = spec(vec![t("a", &[], "x")]);
        s.params.push(ParamSpec { name: "p".into(), ..Default::default() });
        s.finally = vec![t("report", &[], "{{ run.phase }} {{ steps.a.output }} {{ params.p }}")];
        assert!(validate(&s).is_ok());
        s.finally.push(t("bad", &["a"], "x"));
        assert!(messages(&s).contains("finally steps run after the whole DAG"));
    }

    #[test]
    fn agent_fields_are_checked() {
        let s = spec(vec![Step {
            id: "ask".into(),
            agent: Some(AgentStep { prompt: " ".into(), ..Default::default() }),
            ..Default::default()
        }]);
        let m = messages(&s);
        assert!(m.contains("steps[0].agent: set ref or selector"), "{m}");
        assert!(m.contains("steps[0].agent.prompt: must not be empty"), "{m}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn arb_template() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z ]{0,12}",
            Just("{{ params.p }}".to_string()),
            Just("{{ steps.s0.output }}".to_string()),
            Just("{{ steps.s1.json.x }}".to_string()),
            Just("{{ nope }}".to_string()),
            Just("{{ unclosed".to_string()),
            Just("{% for i in range(3) %}{{ i }}{% endfor %}".to_string()),
            ".{0,20}",
        ]
    }

    fn arb_spec() -> impl Strategy<Value = WorkflowSpec> {
        (1usize..12).prop_flat_map(|n| {
            proptest::collection::vec(
                (proptest::collection::vec(0usize..n + 2, 0..4), arb_template(), any::<bool>(), 0u8..4),
                n,
            )
            .prop_map(move |rows| {
                let steps = rows
                    .into_iter()
                    .enumerate()
                    .map(|(i, (deps, template, dup, kinds))| Step {
                        id: if dup && i > 0 { "s0".to_string() } else { format!("s{i}") },
                        depends_on: deps.into_iter().map(|d| format!("s{d}")).collect(),
                        template: (kinds != 0).then_some(template),
                        http: (kinds == 2)
                            .then(|| crate::api::HttpStep { url: "http://x".into(), ..Default::default() }),
                        ..Default::default()
                    })
                    .collect();
                WorkflowSpec {
                    params: vec![crate::api::ParamSpec { name: "p".into(), ..Default::default() }],
                    steps,
                    ..Default::default()
                }
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Validation never panics; a valid DAG's order puts dependencies first; every error
        /// names a step or a field.
        #[test]
        fn validation_is_total_and_sound(spec in arb_spec()) {
            match validate(&spec) {
                Ok(dag) => {
                    let pos: HashMap<usize, usize> = dag.topo_order().iter().enumerate().map(|(p, &i)| (i, p)).collect();
                    prop_assert_eq!(pos.len(), dag.len());
                    for i in 0..dag.len() {
                        for &d in dag.deps(i) {
                            prop_assert!(pos[&d] < pos[&i]);
                        }
                    }
                }
                Err(e) => {
                    prop_assert!(!e.0.is_empty());
                    for err in &e.0 {
                        prop_assert!(err.step.is_some() || !err.field.is_empty(), "{err}");
                    }
                }
            }
        }

        /// Rendering arbitrary text against a context never panics.
        #[test]
        fn rendering_is_total(src in ".{0,40}", item in ".{0,10}") {
            let ctx = template::Context { item: Some((0, serde_json::Value::String(item))), ..Default::default() };
            let _ = template::render(&src, &ctx);
            let _ = template::eval_condition(&src, &ctx);
            let _ = template::eval_list(&src, &ctx, 100);
            let _ = template::parse_template(&src);
        }
    }
}

#[cfg(test)]
mod control_flow_tests {
    use super::*;
    use crate::api::{LoopStep, WaitStep};

    fn body_step(id: &str, deps: &[&str], template: &str) -> Step {
        Step {
            id: id.into(),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            template: Some(template.into()),
            ..Default::default()
        }
    }

    fn looping(until: &str, steps: Vec<Step>) -> Step {
        Step {
            id: "rl".into(),
            depends_on: vec!["a".into()],
            loop_: Some(LoopStep { max_iterations: 3, until: until.into(), on_max: Default::default(), steps }),
            ..Default::default()
        }
    }

    fn messages(steps: Vec<Step>) -> String {
        validate(&WorkflowSpec { steps, ..Default::default() }).unwrap_err().to_string()
    }

    #[test]
    fn loops_read_their_steps_upstream_steps_and_loop() {
        let s = WorkflowSpec {
            steps: vec![
                body_step("a", &[], "x"),
                body_step("free", &[], "y"),
                looping(
                    "steps.r.output == 'ok' and loop.iteration > 1",
                    vec![
                        body_step("c", &[], "{{ steps.a.output }} {{ loop.iteration }} {{ loop.previous }}"),
                        body_step("r", &["c"], "{{ steps.c.output }}"),
                    ],
                ),
                body_step("after", &["rl"], "{{ steps.rl.output }} {{ steps.rl.iterations }}"),
            ],
            output: Some("{{ steps.after.output }}".into()),
            ..Default::default()
        };
        let dag = validate(&s).expect("valid");
        let body = dag.body(2).expect("a body");
        assert_eq!(body.dag.len(), 2);
        assert_eq!(dag.kind_of(&s, "rl.2.r"), Some(crate::api::StepKind::Template));
        assert_eq!(dag.kind_of(&s, "rl"), Some(crate::api::StepKind::Loop));
    }

    #[test]
    fn bad_loops_are_named_by_step_and_field() {
        let m =
            messages(vec![body_step("a", &[], "x"), looping("steps.a.output == 'x'", vec![body_step("c", &[], "x")])]);
        assert!(
            m.contains("step \"rl\": steps[1].loop.until: until reads steps.a, which is not a step of the loop"),
            "{m}"
        );
        let m = messages(vec![body_step("a", &[], "x"), looping("steps.c.output ==", vec![body_step("c", &[], "x")])]);
        assert!(m.contains("steps[1].loop.until: does not parse"), "{m}");
        let m = messages(vec![
            body_step("a", &[], "x"),
            body_step("z", &[], "x"),
            looping("true", vec![body_step("c", &[], "{{ steps.z.output }}")]),
        ]);
        assert!(
            m.contains("step \"rl.c\": steps[2].loop.steps[0].template: steps.z is not upstream of the loop"),
            "{m}"
        );
        let m = messages(vec![body_step("a", &[], "{{ loop.iteration }}")]);
        assert!(m.contains("\"loop\" is only defined inside a loop"), "{m}");
        let m = messages(vec![
            body_step("a", &[], "x"),
            looping("true", vec![looping("true", vec![body_step("d", &[], "x")])]),
        ]);
        assert!(m.contains("loops do not nest"), "{m}");
        let m = messages(vec![body_step("a", &[], "x"), looping("true", vec![])]);
        assert!(m.contains("steps[1].loop.steps: a loop needs at least one step"), "{m}");
    }

    #[test]
    fn bad_waits_and_outputs_are_named() {
        let w = |seconds, until: Option<&str>| Step {
            id: "w".into(),
            wait: Some(WaitStep { seconds, until: until.map(str::to_string) }),
            ..Default::default()
        };
        assert!(
            messages(vec![w(None, Some("tomorrow"))])
                .contains("step \"w\": steps[0].wait.until: must be an RFC 3339 time")
        );
        assert!(
            messages(vec![w(Some(1), Some("2030-01-01T00:00:00Z"))])
                .contains("steps[0].wait: set exactly one of seconds and until")
        );
        assert!(
            validate(&WorkflowSpec { steps: vec![w(None, Some("2030-01-01T00:00:00Z"))], ..Default::default() })
                .is_ok()
        );
        let s = WorkflowSpec {
            steps: vec![body_step("a", &[], "x")],
            output: Some("{{ steps.b.output }}".into()),
            ..Default::default()
        };
        assert!(validate(&s).unwrap_err().to_string().contains("output: unknown step \"b\""));
    }

    #[test]
    fn child_and_resource_steps_are_checked_and_their_templates_read_upstream_steps() {
        let child = |params: serde_json::Value| Step {
            id: "c".into(),
            depends_on: vec!["a".into()],
            workflow: Some(crate::api::WorkflowStep {
                ref_: "testing".into(),
                params: serde_json::from_value(params).expect("params"),
            }),
            ..Default::default()
        };
        let ok = vec![body_step("a", &[], "x"), child(serde_json::json!({"target": "{{ steps.a.output }}", "n": 2}))];
        let dag = validate(&WorkflowSpec { steps: ok, ..Default::default() }).expect("valid");
        assert_eq!(dag.kind_of(&WorkflowSpec::default(), "nothing"), None);
        let bad = vec![body_step("a", &[], "x"), child(serde_json::json!({"target": "{{ steps.zz.output }}"}))];
        assert!(messages(bad).contains("steps[1].workflow.params.target"), "names the param");

        let res = |manifest: serde_json::Value, success: &str, failure: Option<&str>| Step {
            id: "r".into(),
            resource: Some(crate::api::ResourceStep {
                manifest,
                success_when: success.into(),
                failure_when: failure.map(str::to_string),
                output: None,
            }),
            ..Default::default()
        };
        let job = serde_json::json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "{{ run.name }}"}});
        assert!(
            validate(&WorkflowSpec {
                steps: vec![res(job.clone(), "object.status.succeeded >= 1", None)],
                ..Default::default()
            })
            .is_ok()
        );
        let m = messages(vec![res(serde_json::json!({"apiVersion": "batch/v1"}), "true", None)]);
        assert!(m.contains("steps[0].resource.manifest.kind: required"), "{m}");
        let m = messages(vec![res(job.clone(), "params.x", None)]);
        assert!(m.contains("steps[0].resource.successWhen: reads \"params\""), "{m}");
        let m = messages(vec![res(job, "true", Some("object.status =="))]);
        assert!(m.contains("steps[0].resource.failureWhen: does not parse"), "{m}");
    }

    #[test]
    fn a_child_refuses_cycles_and_deep_nesting_naming_the_chain() {
        let run = |chain: &[&str]| crate::engine::RunInfo {
            chain: chain.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(run(&["a", "b"]).refuse_child("c"), None);
        assert_eq!(
            run(&["a", "b"]).refuse_child("a").as_deref(),
            Some("Workflows call each other in a cycle: a -> b -> a")
        );
        assert_eq!(
            run(&["a", "b", "c", "d", "e"]).refuse_child("f").as_deref(),
            Some("runs nest deeper than 5: a -> b -> c -> d -> e -> f")
        );
    }
}
