//! The checks the API server makes of a custom resource against its CRD's OpenAPI schema, on
//! the JSON of one object: types, required fields, ranges, lengths, patterns, enums, `oneOf`
//! of required fields, and unknown fields (which `kubectl apply` rejects with its default
//! strict field validation, and which would otherwise be dropped silently).
//!
//! The schema is the one `volt-operator crd` prints, so local mode and the cluster agree.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value as Json;

/// One violation, at a field path such as `spec.steps[2].retry.limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

/// The `spec` schema of each kind, from the generated CRDs.
fn spec_schemas() -> &'static HashMap<String, Json> {
    static SCHEMAS: OnceLock<HashMap<String, Json>> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut out = HashMap::new();
        for crd in crate::api::crds() {
            let kind = crd.spec.names.kind.clone();
            let Some(version) = crd.spec.versions.first() else { continue };
            let Some(schema) = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()) else { continue };
            if let Ok(json) = serde_json::to_value(schema)
                && let Some(spec) = json.pointer("/properties/spec")
            {
                out.insert(kind, spec.clone());
            }
        }
        out
    })
}

/// Checks the `spec` of an object of `kind` (`value` is the spec itself, at `path`).
pub fn check_spec(kind: &str, value: &Json, path: &str) -> Vec<Issue> {
    let mut out = Vec::new();
    if let Some(schema) = spec_schemas().get(kind) {
        check(schema, value, path, &mut out);
    }
    out
}

fn type_name(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_f64() => "a number",
        Json::Number(_) => "an integer",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "a mapping",
    }
}

fn type_matches(ty: &str, v: &Json) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0 && f.is_finite()),
        _ => true,
    }
}

fn expected(ty: &str) -> &'static str {
    match ty {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "boolean" => "a boolean (true or false)",
        "number" => "a number",
        "integer" => "an integer",
        _ => "a value",
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn short(v: &Json) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 { format!("{}...", s.chars().take(60).collect::<String>()) } else { s }
}

fn check(s: &Json, v: &Json, path: &str, out: &mut Vec<Issue>) {
    let mut issue = |message: String| out.push(Issue { path: path.to_string(), message });
    // A null is an absent value to the API server (it prunes nulls of non-nullable fields).
    if v.is_null() {
        return;
    }
    if s.get("x-kubernetes-int-or-string").and_then(Json::as_bool) == Some(true) {
        if !(v.is_string() || type_matches("integer", v)) {
            issue(format!("must be an integer or a string, not {}", type_name(v)));
        }
        return;
    }
    if let Some(ty) = s.get("type").and_then(Json::as_str)
        && !type_matches(ty, v)
    {
        issue(format!("must be {}, not {} ({})", expected(ty), type_name(v), short(v)));
        return;
    }
    if let Some(allowed) = s.get("enum").and_then(Json::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> =
            allowed.iter().map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string)).collect();
        issue(format!("{} is not one of: {}", short(v), list.join(", ")));
    }
    match v {
        Json::String(text) => {
            let n = text.chars().count() as u64;
            if let Some(min) = s.get("minLength").and_then(Json::as_u64)
                && n < min
            {
                issue(if min == 1 { "must not be empty".into() } else { format!("must be at least {min} characters") });
            }
            if let Some(max) = s.get("maxLength").and_then(Json::as_u64)
                && n > max
            {
                issue(format!("must be at most {max} characters (it has {n})"));
            }
            if let Some(pattern) = s.get("pattern").and_then(Json::as_str)
                && let Some(re) = compiled(pattern)
                && !re.is_match(text)
            {
                issue(format!("{} does not match the pattern {pattern}", short(v)));
            }
        }
        Json::Number(num) => {
            let x = num.as_f64().unwrap_or(0.0);
            if let Some(min) = s.get("minimum").and_then(Json::as_f64)
                && x < min
            {
                issue(format!("{num} is less than the minimum {}", Json::from(min)));
            }
            if let Some(max) = s.get("maximum").and_then(Json::as_f64)
                && x > max
            {
                issue(format!("{num} is more than the maximum {}", Json::from(max)));
            }
        }
        Json::Array(items) => {
            if let Some(min) = s.get("minItems").and_then(Json::as_u64)
                && (items.len() as u64) < min
            {
                issue(if min == 1 { "must not be empty".into() } else { format!("must have at least {min} items") });
            }
            if let Some(max) = s.get("maxItems").and_then(Json::as_u64)
                && items.len() as u64 > max
            {
                issue(format!("must have at most {max} items (it has {})", items.len()));
            }
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Json::Object(map) => check_object(s, map, path, out),
        _ => {}
    }
}

fn check_object(s: &Json, map: &serde_json::Map<String, Json>, path: &str, out: &mut Vec<Issue>) {
    let present = |k: &str| map.get(k).is_some_and(|v| !v.is_null());
    if let Some(required) = s.get("required").and_then(Json::as_array) {
        for r in required.iter().filter_map(Json::as_str) {
            if !present(r) {
                out.push(Issue { path: child(path, r), message: "required field is missing".into() });
            }
        }
    }
    if let Some(alternatives) = s.get("oneOf").and_then(Json::as_array) {
        let groups: Vec<Vec<&str>> = alternatives
            .iter()
            .filter_map(|a| a.get("required").and_then(Json::as_array))
            .map(|r| r.iter().filter_map(Json::as_str).collect())
            .collect();
        if groups.len() == alternatives.len() && !groups.is_empty() {
            let satisfied = groups.iter().filter(|g| g.iter().all(|k| present(k))).count();
            if satisfied != 1 {
                let names: Vec<String> = groups.iter().map(|g| g.join("+")).collect();
                let how = if satisfied == 0 { "none is set" } else { "several are set" };
                out.push(Issue {
                    path: path.to_string(),
                    message: format!("set exactly one of {} ({how})", names.join(", ")),
                });
            }
        }
    }
    let props = s.get("properties").and_then(Json::as_object);
    let additional = s.get("additionalProperties");
    let preserve = s.get("x-kubernetes-preserve-unknown-fields").and_then(Json::as_bool) == Some(true);
    for (k, v) in map {
        match props.and_then(|p| p.get(k)) {
            Some(ps) => check(ps, v, &child(path, k), out),
            None => match additional {
                Some(a) if a.is_object() => check(a, v, &child(path, k), out),
                Some(Json::Bool(true)) => {}
                _ if preserve => {}
                _ => {
                    let known: Vec<&str> = props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                    let hint = closest(k, &known).map(|c| format!("; did you mean {c:?}?")).unwrap_or_default();
                    out.push(Issue { path: child(path, k), message: format!("unknown field{hint}") });
                }
            },
        }
    }
}

fn compiled(pattern: &str) -> Option<regex::Regex> {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<String, Option<regex::Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(pattern.to_string()).or_insert_with(|| regex::Regex::new(pattern).ok()).clone()
}

/// The known name closest to `name`, when it is close enough to be a typo.
pub fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = name.to_lowercase();
    known
        .iter()
        .map(|k| (distance(&lower, &k.to_lowercase()), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn issues(kind: &str, spec: Json) -> Vec<String> {
        check_spec(kind, &spec, "spec").into_iter().map(|i| format!("{}: {}", i.path, i.message)).collect()
    }

    #[test]
    fn a_valid_workflow_has_no_issues() {
        let spec = json!({"params": [{"name": "who", "default": "x"}],
            "steps": [{"id": "a", "template": "hi", "retry": {"limit": 2}},
                      {"id": "b", "dependsOn": ["a"], "container": {"image": "busybox", "command": ["sh"],
                       "env": [{"name": "X", "value": "1"}], "resources": {"limits": {"cpu": "1"}}}}]});
        assert_eq!(issues("Workflow", spec), Vec::<String>::new());
    }

    #[test]
    fn types_ranges_patterns_and_unknown_fields() {
        let spec = json!({"steps": [
            {"id": "Bad_Id", "template": "x", "retry": {"limit": 500}, "dependOn": ["a"]},
            {"id": "b", "timeoutSeconds": "soon", "http": {"url": "http://x", "method": "FETCH"}}]});
        let got = issues("Workflow", spec);
        let has = |s: &str| got.iter().any(|g| g.contains(s));
        assert!(has("spec.steps[0].id: \"Bad_Id\" does not match"), "{got:?}");
        assert!(has("spec.steps[0].retry.limit: 500 is more than the maximum 100"), "{got:?}");
        assert!(has("spec.steps[0].dependOn: unknown field; did you mean \"dependsOn\"?"), "{got:?}");
        assert!(has("spec.steps[1].timeoutSeconds: must be an integer, not a string"), "{got:?}");
        assert!(has("spec.steps[1].http.method: \"FETCH\" is not one of"), "{got:?}");
    }

    #[test]
    fn one_of_and_required() {
        let got = issues("Agent", json!({"model": "m", "endpoint": {"baseUrl": "ftp://x"}, "replicas": {"port": 1}}));
        assert!(got.iter().any(|g| g.contains("spec: set exactly one of endpoint, replicas, deployment")), "{got:?}");
        assert!(got.iter().any(|g| g.contains("spec.endpoint.baseUrl: \"ftp://x\" does not match")), "{got:?}");
        assert!(got.iter().any(|g| g.contains("spec.replicas.selector: required field is missing")), "{got:?}");
        let got = issues("WorkflowRun", json!({"params": {"a": [1, 2]}}));
        assert!(got.iter().any(|g| g.contains("set exactly one of workflowRef, workflow (none is set)")), "{got:?}");
    }

    #[test]
    fn typo_hints() {
        assert_eq!(closest("dependOn", &["dependsOn", "when"]), Some("dependsOn"));
        assert_eq!(closest("zzz", &["dependsOn", "when"]), None);
    }
}
