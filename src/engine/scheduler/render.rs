//! Rendering a step's work: the templates in its agent, container, http, workflow or resource
//! fields.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use crate::api::Step;

use super::{DEFAULT_MAX_TURNS, LlmWork, Work};
use crate::engine::template::{self, Context, TemplateError};

/// Renders a step's work; `Ok(None)` for template steps (rendered by the caller).
pub(super) fn render_work(step: &Step, ctx: &Context) -> Result<Option<Work>, (String, TemplateError)> {
    let r = |field: &str, s: &str| template::render(s, ctx).map_err(|e| (field.to_string(), e));
    if let Some(a) = &step.agent {
        return Ok(Some(Work::Agent {
            agent: a.ref_.clone(),
            selector: a.selector.clone(),
            strategy: a.strategy,
            prompt: r("agent.prompt", &a.prompt)?,
            llm: LlmWork {
                messages: a
                    .messages
                    .iter()
                    .enumerate()
                    .map(|(j, m)| Ok((m.role, r(&format!("agent.messages[{j}].content"), &m.content)?)))
                    .collect::<Result<_, _>>()?,
                schema: a.output.as_ref().map(|o| o.schema.clone()),
                repair_attempts: a.output.as_ref().map_or(0, |o| o.repair_attempts),
                tools: a.tools.clone(),
                max_turns: a.max_turns.unwrap_or(DEFAULT_MAX_TURNS),
                decisions: BTreeMap::new(),
            },
        }));
    }
    if let Some(c) = &step.container {
        let command = c
            .command
            .iter()
            .enumerate()
            .map(|(j, s)| r(&format!("container.command[{j}]"), s))
            .collect::<Result<_, _>>()?;
        let args =
            c.args.iter().enumerate().map(|(j, s)| r(&format!("container.args[{j}]"), s)).collect::<Result<_, _>>()?;
        let mut env = c.env.clone();
        for (j, e) in env.iter_mut().enumerate() {
            if let Some(v) = &e.value {
                e.value = Some(r(&format!("container.env[{j}].value"), v)?);
            }
        }
        return Ok(Some(Work::Container {
            image: c.image.clone(),
            command,
            args,
            env,
            resources: c.resources.clone(),
            working_dir: c.working_dir.clone(),
            service_account_name: c.service_account_name.clone(),
            pod: Box::new(c.pod.clone()),
        }));
    }
    if let Some(h) = &step.http {
        let mut headers = BTreeMap::new();
        for (k, v) in &h.headers {
            headers.insert(k.clone(), r(&format!("http.headers.{k}"), v)?);
        }
        return Ok(Some(Work::Http {
            method: h.method,
            url: r("http.url", &h.url)?,
            headers,
            body: h.body.as_deref().map(|b| r("http.body", b)).transpose()?,
            success_codes: h.success_codes.clone(),
        }));
    }
    if let Some(w) = &step.workflow {
        let mut params = w.params.clone();
        for (k, v) in params.iter_mut() {
            render_strings(v, &format!("workflow.params.{k}"), &r)?;
        }
        return Ok(Some(Work::Workflow { workflow: w.ref_.clone(), params }));
    }
    if let Some(res) = &step.resource {
        let mut manifest = res.manifest.clone();
        render_strings(&mut manifest, "resource.manifest", &r)?;
        return Ok(Some(Work::Resource {
            manifest,
            success_when: res.success_when.clone(),
            failure_when: res.failure_when.clone(),
            output: res.output.clone(),
        }));
    }
    Ok(None)
}

/// A field's template rendered, or the field and why not.
type Rendered = Result<String, (String, TemplateError)>;

/// Renders every string in `value` (a JSON tree) as a template; `field` names where it is.
fn render_strings(
    value: &mut Json,
    field: &str,
    r: &dyn Fn(&str, &str) -> Rendered,
) -> Result<(), (String, TemplateError)> {
    match value {
        Json::String(s) => *s = r(field, s)?,
        Json::Array(items) => {
            for (j, v) in items.iter_mut().enumerate() {
                render_strings(v, &format!("{field}[{j}]"), r)?;
            }
        }
        Json::Object(map) => {
            for (k, v) in map.iter_mut() {
                render_strings(v, &format!("{field}.{k}"), r)?;
            }
        }
        _ => {}
    }
    Ok(())
}
