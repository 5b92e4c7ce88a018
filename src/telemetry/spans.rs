//! The spans: a run's and its steps', written when they settle, and live spans around the
//! calls an attempt makes.
//!
//! A trace reads run -> step -> call: the run's span (root, or the child of the span its
//! traceparent names), a span per step covering all its attempts, and under a step the LLM
//! calls (`chat <model>`, GenAI semantic conventions), tool calls (`execute_tool <tool>`) and
//! HTTP calls (`GET`, HTTP conventions) of its in-process attempts, each tagged with the
//! attempt. Run and step spans are built from the status when a pass records their end, so a
//! step that outlives an operator restart still gets one span with its real start.

use std::borrow::Cow;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use super::ids::{RunTrace, TraceParent};
use crate::agents::runs::RunRef;
use crate::api::{RunPhase, StepKind, StepPhase, StepStatus, WorkflowRunStatus};
use crate::engine::{Phase, RunInfo, Transition};

/// Writes the spans of the steps and the run that `transitions` settle, from `status`.
pub fn record(
    run: &RunInfo,
    kind_of: impl Fn(&str) -> Option<StepKind>,
    transitions: &[Transition],
    status: &WorkflowRunStatus,
) {
    let Some(tracer) = super::tracer() else { return };
    let trace = RunTrace::of(&run.uid, run.traceparent.as_deref());
    for t in transitions {
        match (&t.key, t.phase) {
            (Some(key), Phase::Step(StepPhase::Succeeded | StepPhase::Failed | StepPhase::Cancelled)) => {
                if let Some(row) = status.steps.get(key) {
                    step_span(tracer, &trace, run, key, kind_of(key), row);
                }
            }
            (None, Phase::Run(phase)) if phase.is_finished() => run_span(tracer, &trace, run, status, phase),
            _ => {}
        }
    }
}

fn remote(trace_id: [u8; 16], span_id: [u8; 8]) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

fn run_attributes(run: &RunInfo) -> Vec<KeyValue> {
    vec![
        KeyValue::new("volt.run.uid", run.uid.clone()),
        KeyValue::new("volt.run.name", run.name.clone()),
        KeyValue::new("k8s.namespace.name", run.namespace.clone()),
    ]
}

fn run_span(tracer: &SdkTracer, trace: &RunTrace, run: &RunInfo, status: &WorkflowRunStatus, phase: RunPhase) {
    let end = status.finished_at.as_ref().map_or_else(SystemTime::now, |t| t.0.into());
    let start = status.started_at.as_ref().map_or(end, |t| t.0.into());
    let mut attributes = run_attributes(run);
    attributes.push(KeyValue::new("volt.workflow", status.workflow_name.clone()));
    attributes.push(KeyValue::new("volt.run.phase", phase.as_str()));
    if let Some(u) = &status.usage {
        attributes.push(KeyValue::new("gen_ai.usage.input_tokens", u.input_tokens as i64));
        attributes.push(KeyValue::new("gen_ai.usage.output_tokens", u.output_tokens as i64));
        if u.cost > 0.0 {
            attributes.push(KeyValue::new("volt.cost", u.cost));
        }
    }
    let workflow = if status.workflow_name.is_empty() { &run.name } else { &status.workflow_name };
    let builder = SpanBuilder::from_name(format!("run {workflow}"))
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes);
    let parent = match trace.parent {
        Some(p) => remote(trace.trace_id, p),
        None => Context::new(),
    };
    let mut span = super::with_ids(trace.trace_id, trace.run_span, || tracer.build_with_context(builder, &parent));
    if phase == RunPhase::Failed {
        span.set_status(Status::error(status.message.clone()));
    }
    span.end_with_timestamp(end);
}

fn step_span(tracer: &SdkTracer, trace: &RunTrace, run: &RunInfo, key: &str, kind: Option<StepKind>, row: &StepStatus) {
    let Some(end) = row.finished_at.as_ref().or(row.started_at.as_ref()).map(|t| SystemTime::from(t.0)) else {
        return;
    };
    let start = row.started_at.as_ref().map_or(end, |t| t.0.into());
    let mut attributes = run_attributes(run);
    attributes.extend([
        KeyValue::new("volt.step.key", key.to_string()),
        KeyValue::new("volt.step.kind", kind.map_or("unknown", |k| k.as_str())),
        KeyValue::new("volt.step.phase", row.phase.as_str()),
        KeyValue::new("volt.step.attempts", i64::from(row.attempts)),
    ]);
    if row.cached {
        attributes.push(KeyValue::new("volt.step.cached", true));
    }
    let optional = [
        ("volt.agent", &row.agent),
        ("volt.replica", &row.replica),
        ("k8s.pod.name", &row.pod),
        ("volt.step.object", &row.object),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            attributes.push(KeyValue::new(name, v.clone()));
        }
    }
    if let Some(t) = &row.tokens {
        attributes.push(KeyValue::new("gen_ai.usage.input_tokens", t.prompt as i64));
        attributes.push(KeyValue::new("gen_ai.usage.output_tokens", t.completion as i64));
        if t.cost > 0.0 {
            attributes.push(KeyValue::new("volt.cost", t.cost));
        }
    }
    let builder = SpanBuilder::from_name(format!("step {key}"))
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes);
    let parent = remote(trace.trace_id, trace.run_span);
    let mut span =
        super::with_ids(trace.trace_id, trace.step_span(key), || tracer.build_with_context(builder, &parent));
    if row.phase == StepPhase::Failed {
        span.set_status(Status::error(row.message.clone()));
    }
    span.end_with_timestamp(end);
}

/// A live span around one call an attempt makes; it ends when dropped. Inert (and free) when
/// traces are off or the call is not made by a run's attempt.
pub struct CallSpan {
    span: Option<Span>,
}

impl CallSpan {
    fn start(current: Option<RunRef>, name: String, kind: SpanKind, mut attributes: Vec<KeyValue>) -> CallSpan {
        let (Some(tracer), Some(run)) = (super::tracer(), current) else { return CallSpan { span: None } };
        let trace = RunTrace::of(&run.uid, run.traceparent.as_deref());
        attributes.extend([
            KeyValue::new("volt.run.uid", run.uid),
            KeyValue::new("volt.run.name", run.name),
            KeyValue::new("k8s.namespace.name", run.namespace),
            KeyValue::new("volt.step.key", run.step.clone()),
            KeyValue::new("volt.step.attempt", i64::from(run.attempt)),
        ]);
        let builder = SpanBuilder::from_name(name).with_kind(kind).with_attributes(attributes);
        let span = tracer.build_with_context(builder, &remote(trace.trace_id, trace.step_span(&run.step)));
        CallSpan { span: Some(span) }
    }

    /// A chat completion (`chat <model>`, a client span) on a replica at `base_url`.
    pub fn llm(model: &str, agent: &str, replica: &str, base_url: &str) -> CallSpan {
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            // The API spoken (OpenAI's chat completions), whoever serves it.
            KeyValue::new("gen_ai.system", "openai"),
            KeyValue::new("gen_ai.provider.name", "openai"),
            KeyValue::new("gen_ai.request.model", model.to_string()),
            KeyValue::new("volt.agent", agent.to_string()),
            KeyValue::new("volt.replica", replica.to_string()),
        ];
        attributes.extend(server(base_url));
        CallSpan::start(crate::agents::runs::current(), format!("chat {model}"), SpanKind::Client, attributes)
    }

    /// A tool call the model asked for (`execute_tool <tool>`).
    pub fn tool(tool: &str, call_id: &str, agent: &str) -> CallSpan {
        let attributes = vec![
            KeyValue::new("gen_ai.operation.name", "execute_tool"),
            KeyValue::new("gen_ai.tool.name", tool.to_string()),
            KeyValue::new("gen_ai.tool.call.id", call_id.to_string()),
            KeyValue::new("gen_ai.tool.type", "extension"),
            KeyValue::new("volt.agent", agent.to_string()),
        ];
        CallSpan::start(crate::agents::runs::current(), format!("execute_tool {tool}"), SpanKind::Internal, attributes)
    }

    /// An HTTP step's request (named by its method, a client span). The URL is recorded
    /// without its query and credentials, which may hold secrets.
    pub fn http(method: &str, url: &reqwest::Url) -> CallSpan {
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("url.full", shown.to_string()),
        ];
        attributes.extend(server(url.as_str()));
        CallSpan::start(crate::agents::runs::current(), method.to_string(), SpanKind::Client, attributes)
    }

    /// The `traceparent` header the call sends: this span as the caller.
    pub fn traceparent(&self) -> Option<String> {
        let span = self.span.as_ref()?;
        let cx = span.span_context();
        cx.is_valid().then(|| {
            TraceParent {
                trace_id: cx.trace_id().to_bytes(),
                span_id: cx.span_id().to_bytes(),
                sampled: cx.is_sampled(),
            }
            .header()
        })
    }

    /// Whether the span records (traces are on and this is a run's call).
    pub fn recording(&self) -> bool {
        self.span.is_some()
    }

    /// Sets an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// Sets a string-array attribute (`gen_ai.response.finish_reasons`).
    pub fn set_strings(&mut self, key: &'static str, values: impl IntoIterator<Item = String>) {
        if let Some(span) = &mut self.span {
            let values: Vec<StringValue> = values.into_iter().map(StringValue::from).collect();
            span.set_attribute(KeyValue::new(key, Value::Array(Array::String(values))));
        }
    }

    /// Marks the call failed: `error.type` (a short class) and the status message.
    pub fn fail(&mut self, error_type: impl Into<Cow<'static, str>>, message: &str) {
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new("error.type", Value::String(error_type.into().into())));
            span.set_status(Status::error(crate::text::clip(message, 500).to_string()));
        }
    }
}

/// `server.address` and `server.port` of a URL.
fn server(url: &str) -> Vec<KeyValue> {
    let Ok(url) = reqwest::Url::parse(url) else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(host) = url.host_str() {
        out.push(KeyValue::new("server.address", host.to_string()));
    }
    if let Some(port) = url.port_or_known_default() {
        out.push(KeyValue::new("server.port", i64::from(port)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_outside_a_run_or_with_traces_off_are_inert() {
        let mut span = CallSpan::llm("m", "a", "r", "http://127.0.0.1:9/v1");
        assert!(!span.recording());
        assert_eq!(span.traceparent(), None);
        span.set("gen_ai.usage.input_tokens", 3_i64);
        span.fail("timeout", "no answer");
    }

    #[test]
    fn servers_are_named_by_host_and_port() {
        let kv = server("https://api.example.com/v1");
        assert_eq!(kv[0], KeyValue::new("server.address", "api.example.com"));
        assert_eq!(kv[1], KeyValue::new("server.port", 443_i64));
        assert!(server("not a url").is_empty());
    }
}
