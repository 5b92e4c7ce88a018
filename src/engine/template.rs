//! One template language for prompts, bodies, commands, `when` conditions and `forEach`
//! lists: Jinja (minijinja), strict about undefined names.
//!
//! The context has `params`, `steps.<id>.{output,json,phase}`, `item` and `index` (inside a
//! `forEach`) and `run.{name,namespace,uid,phase}`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde_json::Value as Json;

/// Names a template may start from.
pub const ROOTS: &[&str] = &["params", "steps", "item", "index", "run", "loop"];

/// Whether `name` is a global of the template engine (a function such as `range`).
pub fn is_builtin(name: &str) -> bool {
    const FUNCTIONS: &[&str] = &["range", "dict", "namespace", "debug", "lipsum", "cycler", "joiner"];
    FUNCTIONS.contains(&name) || env().globals().any(|(n, _)| n == name)
}

/// A template that failed to parse, render or evaluate. The caller adds the step and field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub message: String,
}

impl TemplateError {
    fn new(source: &str, err: minijinja::Error) -> Self {
        let mut message = match err.kind() {
            minijinja::ErrorKind::UndefinedError => "undefined value".to_string(),
            _ => err.kind().to_string(),
        };
        if let Some(detail) = err.detail() {
            message.push_str(": ");
            message.push_str(detail);
        }
        message.push_str(&format!(" in {:?}", shorten(source)));
        Self { message }
    }
    fn msg(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

fn shorten(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.add_filter("fromjson", |s: String| -> Result<Value, minijinja::Error> {
            serde_json::from_str::<Json>(&s)
                .map(|v| Value::from_serialize(&v))
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("fromjson: {e}")))
        });
        env
    })
}

/// True when `s` contains template syntax at all (plain strings skip the engine).
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// Strips one pair of surrounding `{{ }}` from a condition, so `when` accepts both
/// `steps.a.phase == 'Succeeded'` and `{{ steps.a.phase == 'Succeeded' }}`.
fn bare_expression(expr: &str) -> &str {
    let t = expr.trim();
    match t.strip_prefix("{{").and_then(|r| r.strip_suffix("}}")) {
        Some(inner) if !inner.contains("{{") => inner.trim(),
        _ => t,
    }
}

/// Checks that a template parses; returns the names it reads (dotted paths).
pub fn parse_template(source: &str) -> Result<BTreeSet<String>, TemplateError> {
    if !is_template(source) {
        return Ok(BTreeSet::new());
    }
    let tmpl = env().template_from_str(source).map_err(|e| TemplateError::new(source, e))?;
    let mut names: BTreeSet<String> = tmpl.undeclared_variables(true).into_iter().collect();
    names.extend(subscripted_steps(source));
    Ok(names)
}

/// Checks that an expression parses; returns the names it reads (dotted paths).
pub fn parse_expression(source: &str) -> Result<BTreeSet<String>, TemplateError> {
    let expr = bare_expression(source);
    if expr.is_empty() {
        return Err(TemplateError::msg("empty expression"));
    }
    let compiled = env().compile_expression(expr).map_err(|e| TemplateError::new(source, e))?;
    let mut names: BTreeSet<String> = compiled.undeclared_variables(true).into_iter().collect();
    names.extend(subscripted_steps(expr));
    Ok(names)
}

/// The steps a template or expression reads, which are all of the context's steps it is given.
fn wanted_steps(names: std::collections::HashSet<String>, source: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = names.into_iter().collect();
    names.extend(subscripted_steps(source));
    referenced_steps(&names)
}

/// The dotted names of `steps['id']` reads (how a step id with a `-` is read, since
/// `steps.a-b` is `steps.a - b`), with the attribute that follows when there is one:
/// `steps['a-b'].output` and `steps["a-b"]['json']` read `steps.a-b.output` and
/// `steps.a-b.json`. The template engine reports such reads as `steps` alone.
fn subscripted_steps(source: &str) -> Vec<String> {
    /// A quoted string at the start of `s`: its text and what follows its `]`.
    fn quoted_then_bracket(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start();
        let quote = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let (text, rest) = s[1..].split_once(quote)?;
        let rest = rest.trim_start().strip_prefix(']')?;
        Some((text, rest))
    }
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("steps") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "steps".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue;
        }
        let Some((id, tail)) = after.trim_start().strip_prefix('[').and_then(quoted_then_bracket) else { continue };
        let attribute = match tail.strip_prefix('.') {
            Some(t) => Some(t.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or_default()),
            None => tail.trim_start().strip_prefix('[').and_then(quoted_then_bracket).map(|(a, _)| a),
        };
        names.push(match attribute.filter(|a| !a.is_empty()) {
            Some(a) => format!("steps.{id}.{a}"),
            None => format!("steps.{id}"),
        });
    }
    names
}

/// Step ids a set of dotted names reads through `steps.<id>`.
pub fn referenced_steps(names: &BTreeSet<String>) -> BTreeSet<String> {
    names
        .iter()
        .filter_map(|n| n.strip_prefix("steps."))
        .map(|rest| rest.split('.').next().unwrap_or(rest).to_string())
        .collect()
}

/// What templates see of a set of steps: `{id: {phase, output, json}}`.
pub fn steps_value(steps: &BTreeMap<String, StepView>) -> Json {
    let ctx = Context { steps: steps.clone(), ..Default::default() };
    serde_json::to_value(ctx.to_value(None))
        .ok()
        .and_then(|mut v| v.get_mut("steps").map(Json::take))
        .unwrap_or_default()
}

/// What a template sees of one step.
#[derive(Debug, Clone, Default)]
pub struct StepView {
    pub phase: String,
    pub output: Option<String>,
    /// Iterations of a loop step.
    pub iterations: Option<u32>,
}

/// The values templates are rendered against.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub params: BTreeMap<String, Json>,
    pub steps: BTreeMap<String, StepView>,
    pub run: BTreeMap<String, String>,
    pub item: Option<(usize, Json)>,
    /// Inside a loop: `{iteration, previous}`.
    pub loop_: Option<Json>,
}

impl Context {
    fn to_value(&self, only_steps: Option<&BTreeSet<String>>) -> Value {
        let mut steps = serde_json::Map::new();
        for (id, view) in &self.steps {
            if only_steps.is_some_and(|only| !only.contains(id)) {
                continue;
            }
            let mut m = serde_json::Map::new();
            m.insert("phase".into(), Json::String(view.phase.clone()));
            if let Some(n) = view.iterations {
                m.insert("iterations".into(), Json::from(n));
            }
            if let Some(out) = &view.output {
                m.insert("output".into(), Json::String(out.clone()));
                if let Ok(parsed) = serde_json::from_str::<Json>(out) {
                    m.insert("json".into(), parsed);
                }
            }
            steps.insert(id.clone(), Json::Object(m));
        }
        let mut root = serde_json::Map::new();
        root.insert("params".into(), serde_json::to_value(&self.params).unwrap_or_default());
        root.insert("steps".into(), Json::Object(steps));
        root.insert("run".into(), serde_json::to_value(&self.run).unwrap_or_default());
        if let Some(l) = &self.loop_ {
            root.insert("loop".into(), l.clone());
        }
        if let Some((index, item)) = &self.item {
            root.insert("item".into(), item.clone());
            root.insert("index".into(), Json::from(*index));
        }
        Value::from_serialize(&root)
    }
}

/// Renders a template to text.
pub fn render(source: &str, ctx: &Context) -> Result<String, TemplateError> {
    if !is_template(source) {
        return Ok(source.to_string());
    }
    let tmpl = env().template_from_str(source).map_err(|e| TemplateError::new(source, e))?;
    let wanted = wanted_steps(tmpl.undeclared_variables(true), source);
    tmpl.render(ctx.to_value(Some(&wanted))).map_err(|e| TemplateError::new(source, e))
}

/// Evaluates a condition to a boolean (Jinja truthiness).
pub fn eval_condition(source: &str, ctx: &Context) -> Result<bool, TemplateError> {
    let expr = bare_expression(source);
    let compiled = env().compile_expression(expr).map_err(|e| TemplateError::new(source, e))?;
    let wanted = wanted_steps(compiled.undeclared_variables(true), expr);
    let value = compiled.eval(ctx.to_value(Some(&wanted))).map_err(|e| TemplateError::new(source, e))?;
    if value.is_undefined() {
        return Err(TemplateError::msg(format!("undefined value in {:?}", shorten(source))));
    }
    Ok(value.is_true())
}

/// Evaluates a condition over one named value (`object`, the live object of a resource step).
pub fn eval_condition_on(source: &str, name: &str, value: &Json) -> Result<bool, TemplateError> {
    let expr = bare_expression(source);
    let compiled = env().compile_expression(expr).map_err(|e| TemplateError::new(source, e))?;
    let root = Value::from_serialize(serde_json::json!({ name: value }));
    let value = compiled.eval(root).map_err(|e| TemplateError::new(source, e))?;
    if value.is_undefined() {
        return Err(TemplateError::msg(format!("undefined value in {:?}", shorten(source))));
    }
    Ok(value.is_true())
}

/// Renders a template over one named value (`object`, the live object of a resource step).
pub fn render_on(source: &str, name: &str, value: &Json) -> Result<String, TemplateError> {
    let tmpl = env().template_from_str(source).map_err(|e| TemplateError::new(source, e))?;
    tmpl.render(Value::from_serialize(serde_json::json!({ name: value }))).map_err(|e| TemplateError::new(source, e))
}

/// Checks a template or expression that may read only `name` (and the built-in functions).
pub fn check_reads_only(source: &str, name: &str, is_expression: bool) -> Result<(), String> {
    let names = if is_expression { parse_expression(source) } else { parse_template(source) };
    let names = names.map_err(|e| format!("does not parse: {e}"))?;
    for n in names {
        let root = n.split('.').next().unwrap_or_default();
        if root != name && !is_builtin(root) {
            return Err(format!("reads {root:?}: only {name} is known here"));
        }
    }
    Ok(())
}

/// Evaluates a `forEach` to a list of items. A single `{{ expr }}` is evaluated as an
/// expression (so lists keep their structure); anything else is rendered and parsed as JSON.
pub fn eval_list(source: &str, ctx: &Context, max_items: usize) -> Result<Vec<Json>, TemplateError> {
    let trimmed = source.trim();
    let single = trimmed.starts_with("{{")
        && trimmed.ends_with("}}")
        && trimmed[2..trimmed.len() - 2].find("{{").is_none()
        && trimmed[2..trimmed.len() - 2].find("}}").is_none();
    let json = if single {
        let expr = bare_expression(trimmed);
        let compiled = env().compile_expression(expr).map_err(|e| TemplateError::new(source, e))?;
        let wanted = wanted_steps(compiled.undeclared_variables(true), expr);
        let value = compiled.eval(ctx.to_value(Some(&wanted))).map_err(|e| TemplateError::new(source, e))?;
        if value.is_undefined() {
            return Err(TemplateError::msg(format!("undefined value in {:?}", shorten(source))));
        }
        let json =
            serde_json::to_value(&value).map_err(|e| TemplateError::msg(format!("cannot convert to JSON: {e}")))?;
        // A string holding JSON (an output read as `.output`) is parsed.
        match json {
            Json::String(s) => serde_json::from_str(&s).unwrap_or(Json::String(s)),
            other => other,
        }
    } else {
        let text = render(source, ctx)?;
        serde_json::from_str(&text).map_err(|e| {
            TemplateError::msg(format!("forEach must render to a JSON list, got {:?}: {e}", shorten(&text)))
        })?
    };
    match json {
        Json::Array(items) if items.len() > max_items => {
            Err(TemplateError::msg(format!("forEach has {} items, more than the limit of {max_items}", items.len())))
        }
        Json::Array(items) => Ok(items),
        other => Err(TemplateError::msg(format!(
            "forEach must be a JSON list, got {}",
            match other {
                Json::Null => "null",
                Json::Bool(_) => "a boolean",
                Json::Number(_) => "a number",
                Json::String(_) => "a string",
                Json::Object(_) => "an object",
                Json::Array(_) => "a list",
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        let mut c = Context::default();
        c.params.insert("name".into(), Json::from("Ada"));
        c.params.insert("n".into(), Json::from(3));
        c.steps.insert(
            "a".into(),
            StepView { phase: "Succeeded".into(), output: Some(r#"{"tasks":["x","y"]}"#.into()), iterations: None },
        );
        c.steps.insert("b".into(), StepView { phase: "Skipped".into(), output: None, iterations: None });
        c.run.insert("name".into(), "r1".into());
        c
    }

    #[test]
    fn renders_params_steps_and_json() {
        assert_eq!(render("Hi {{ params.name }}", &ctx()).unwrap(), "Hi Ada");
        assert_eq!(render("{{ steps.a.json.tasks[1] }}", &ctx()).unwrap(), "y");
        assert_eq!(render("{{ steps.a.phase }}/{{ run.name }}", &ctx()).unwrap(), "Succeeded/r1");
        assert_eq!(render("plain text", &ctx()).unwrap(), "plain text");
    }

    #[test]
    fn undefined_names_are_errors() {
        let err = render("{{ params.missing }}", &ctx()).unwrap_err();
        assert!(err.message.contains("undefined"), "{err}");
        assert!(err.message.contains("params.missing"), "{err}");
        assert!(render("{{ steps.b.output }}", &ctx()).is_err());
        assert!(eval_condition("steps.zzz.phase == 'x'", &ctx()).is_err());
    }

    #[test]
    fn conditions() {
        assert!(eval_condition("steps.a.phase == 'Succeeded'", &ctx()).unwrap());
        assert!(eval_condition("{{ params.n > 2 }}", &ctx()).unwrap());
        assert!(!eval_condition("steps.b.phase == 'Succeeded'", &ctx()).unwrap());
    }

    #[test]
    fn lists() {
        assert_eq!(eval_list("{{ steps.a.json.tasks }}", &ctx(), 10).unwrap(), vec![Json::from("x"), Json::from("y")]);
        assert_eq!(eval_list("[1, {{ params.n }}]", &ctx(), 10).unwrap(), vec![Json::from(1), Json::from(3)]);
        assert!(eval_list("{{ params.name }}", &ctx(), 10).unwrap_err().message.contains("a string"));
        assert!(eval_list("[1,2,3]", &ctx(), 2).unwrap_err().message.contains("limit"));
        assert_eq!(eval_list("{{ steps.a.output | fromjson | attr('tasks') }}", &ctx(), 10).unwrap().len(), 2);
    }

    #[test]
    fn builtin_functions_are_not_unknown_names() {
        assert!(is_builtin("range") && is_builtin("dict") && !is_builtin("steps"));
        assert_eq!(render("{% for i in range(3) %}{{ i }}{% endfor %}", &ctx()).unwrap(), "012");
    }

    #[test]
    fn parse_reports_references_and_errors() {
        let names = parse_template("{{ steps.a.output }} {{ params.x }}").unwrap();
        assert_eq!(referenced_steps(&names), BTreeSet::from(["a".to_string()]));
        assert!(parse_template("{{ unclosed").is_err());
        assert!(parse_expression("a ==").is_err());
        assert_eq!(
            referenced_steps(&parse_expression("steps.q.phase == 'Failed'").unwrap()),
            BTreeSet::from(["q".to_string()])
        );
    }

    #[test]
    fn ids_with_a_hyphen_are_read_by_subscript() {
        let names =
            parse_template("{{ steps['first-step'].output }} {{ steps[\"b-2\"]['json'].x }} {{ mysteps['no'] }}")
                .unwrap();
        assert!(names.contains("steps.first-step.output") && names.contains("steps.b-2.json"), "{names:?}");
        assert_eq!(referenced_steps(&names), BTreeSet::from(["first-step".to_string(), "b-2".to_string()]));
        let names = parse_expression("steps['a-b'].phase == 'Succeeded'").unwrap();
        assert_eq!(referenced_steps(&names), BTreeSet::from(["a-b".to_string()]));
        let mut c = ctx();
        c.steps.insert(
            "first-step".into(),
            StepView { phase: "Succeeded".into(), output: Some("hi".into()), iterations: None },
        );
        assert_eq!(render("{{ steps['first-step'].output }}", &c).unwrap(), "hi");
    }
}
