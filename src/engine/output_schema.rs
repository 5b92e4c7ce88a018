//! Structured output of agent steps: the JSON Schema of `agent.output.schema`, the JSON read
//! out of a model's reply (code fences and prose around it allowed), and validation errors
//! that name the schema path that failed. Pure code, used by validation and the agent caller.

use crate::text::clip;
use serde_json::Value;

/// Most validation errors reported (to the model when re-asking, and in the final message).
const MAX_ERRORS: usize = 8;

/// Compiles `schema`, or says why it is not a JSON Schema.
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err("must be an object".into());
    }
    jsonschema::options().should_validate_formats(true).build(schema).map_err(|e| e.to_string())
}

/// One way a reply failed its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// Where in the reply (a JSON pointer, empty for the whole value).
    pub instance_path: String,
    /// Which rule of the schema (a JSON pointer into the schema).
    pub schema_path: String,
    pub message: String,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.instance_path.is_empty() { "/" } else { &self.instance_path };
        write!(f, "at {at}: {} (schema path {})", self.message, self.schema_path)
    }
}

/// Why a reply is not the output asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyProblem {
    /// No JSON value could be read from the reply.
    NotJson(String),
    /// JSON, but not valid against the schema.
    Invalid(Vec<SchemaError>),
}

impl std::fmt::Display for ReplyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyProblem::NotJson(e) => write!(f, "the reply is not JSON: {e}"),
            ReplyProblem::Invalid(errors) => {
                write!(f, "the reply does not match the output schema: ")?;
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

/// The JSON value of a reply: the whole text, else the inside of a Markdown code fence, else
/// the span from the first `{` or `[` to the last `}` or `]`.
pub fn extract_json(text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    let first_err = match serde_json::from_str::<Value>(trimmed) {
        Ok(v) => return Ok(v),
        Err(e) => e.to_string(),
    };
    if let Some(start) = trimmed.find("```") {
        let rest = &trimmed[start + 3..];
        // Skip the info string (`json`) up to the end of the line.
        let body = rest.find('\n').map_or("", |nl| &rest[nl + 1..]);
        let body = body.rfind("```").map_or(body, |end| &body[..end]);
        if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
            return Ok(v);
        }
    }
    let open = trimmed.find(['{', '[']);
    let close = trimmed.rfind(['}', ']']);
    if let (Some(o), Some(c)) = (open, close)
        && o < c
        && let Ok(v) = serde_json::from_str::<Value>(&trimmed[o..=c])
    {
        return Ok(v);
    }
    Err(first_err)
}

/// Reads and validates a reply against `validator`.
pub fn check(validator: &jsonschema::Validator, text: &str) -> Result<Value, ReplyProblem> {
    let value = extract_json(text).map_err(ReplyProblem::NotJson)?;
    let errors: Vec<SchemaError> = validator
        .iter_errors(&value)
        .take(MAX_ERRORS)
        .map(|e| SchemaError {
            instance_path: e.instance_path().as_str().to_string(),
            schema_path: e.schema_path().as_str().to_string(),
            message: clip(&e.to_string(), 300),
        })
        .collect();
    if errors.is_empty() { Ok(value) } else { Err(ReplyProblem::Invalid(errors)) }
}

/// Whether `schema` can be sent as an OpenAI strict schema: every object lists all its
/// properties as required and forbids others. Servers reject `strict: true` otherwise.
pub fn strict_compatible(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("object") || map.contains_key("properties") {
                let props = map.get("properties").and_then(Value::as_object);
                let required: Vec<&str> = map
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let closed = map.get("additionalProperties") == Some(&Value::Bool(false));
                let all_required = props.is_none_or(|p| p.keys().all(|k| required.contains(&k.as_str())));
                if !closed || !all_required {
                    return false;
                }
            }
            map.values().all(strict_compatible)
        }
        Value::Array(items) => items.iter().all(strict_compatible),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tasks() -> jsonschema::Validator {
        compile(&json!({"type": "object", "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "items": {"type": "string"}}}}))
        .expect("schema")
    }

    #[test]
    fn fenced_and_wrapped_json_is_read() {
        let v = tasks();
        assert_eq!(check(&v, r#"{"tasks": ["a"]}"#), Ok(json!({"tasks": ["a"]})));
        assert_eq!(check(&v, "```json\n{\"tasks\": [\"a\", \"b\"]}\n```"), Ok(json!({"tasks": ["a", "b"]})));
        assert_eq!(check(&v, "Here you go:\n```\n{\"tasks\": []}\n```\nDone."), Ok(json!({"tasks": []})));
        assert_eq!(check(&v, "Sure! {\"tasks\": [\"x\"]} Hope it helps"), Ok(json!({"tasks": ["x"]})));
    }

    #[test]
    fn failures_name_the_schema_path() {
        let v = tasks();
        let err = check(&v, r#"{"tasks": [1]}"#).expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("at /tasks/0"), "{text}");
        assert!(text.contains("schema path /properties/tasks/items/type"), "{text}");
        let err = check(&v, r#"{"todo": []}"#).expect_err("missing");
        assert!(err.to_string().contains("schema path /required"), "{err}");
        assert!(matches!(check(&v, "no json here"), Err(ReplyProblem::NotJson(_))));
    }

    #[test]
    fn bad_schemas_are_refused() {
        assert!(compile(&json!({"type": "objekt"})).is_err());
        assert!(compile(&json!("string")).is_err());
        assert!(compile(&json!({"type": "object"})).is_ok());
    }

    #[test]
    fn strictness_follows_openai_rules() {
        assert!(!strict_compatible(&json!({"type": "object", "properties": {"a": {"type": "string"}}})));
        assert!(strict_compatible(&json!({"type": "object", "required": ["a"], "additionalProperties": false,
            "properties": {"a": {"type": "array", "items": {"type": "string"}}}})));
    }
}
