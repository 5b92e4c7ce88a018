//! A run's parameters, checked against the Workflow's declarations.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::api::WorkflowSpec;

/// Applies defaults and checks that required parameters are given and unknown ones are not.
pub fn resolve(spec: &WorkflowSpec, given: &BTreeMap<String, Json>) -> Result<BTreeMap<String, Json>, String> {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for p in &spec.params {
        match (given.get(&p.name), &p.default) {
            (Some(v), _) => {
                out.insert(p.name.clone(), v.clone());
            }
            (None, Some(d)) => {
                out.insert(p.name.clone(), d.clone());
            }
            (None, None) if p.required => {
                problems.push(format!("spec.params: required parameter {:?} is missing", p.name))
            }
            (None, None) => {
                out.insert(p.name.clone(), Json::String(String::new()));
            }
        }
    }
    for name in given.keys() {
        if !spec.params.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = spec.params.iter().map(|p| p.name.as_str()).collect();
            problems.push(format!(
                "spec.params.{name}: the workflow has no parameter {name:?} (it has: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ));
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ParamSpec;

    #[test]
    fn defaults_required_and_unknown() {
        let spec = WorkflowSpec {
            params: vec![
                ParamSpec { name: "req".into(), required: true, ..Default::default() },
                ParamSpec { name: "tech".into(), default: Some(Json::from("Rust")), ..Default::default() },
            ],
            ..Default::default()
        };
        let given = BTreeMap::from([("req".to_string(), Json::from("x"))]);
        let out = resolve(&spec, &given).unwrap();
        assert_eq!(out["tech"], Json::from("Rust"));
        let err = resolve(&spec, &BTreeMap::from([("other".to_string(), Json::from(1))])).unwrap_err();
        assert!(err.contains("required parameter \"req\" is missing"), "{err}");
        assert!(err.contains("spec.params.other"), "{err}");
    }
}
