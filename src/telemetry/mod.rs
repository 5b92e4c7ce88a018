//! Traces: OpenTelemetry spans for runs, steps and the calls steps make (LLM, tool, HTTP),
//! exported over OTLP/HTTP when the standard `OTEL_EXPORTER_OTLP_*` variables name an
//! endpoint, in the cluster and in local mode alike.
//!
//! - [`ids`]: the trace of a run and the spans of its steps, derived from the run's UID (or
//!   the traceparent it continues), so passes, replicas and restarts agree without storing them.
//! - [`spans`]: run and step spans, written when they settle from what the status records
//!   (start and end times, attempts, tokens), and live spans around each call with the GenAI
//!   semantic-convention attributes and the `traceparent` header the call carries.
//!
//! With no endpoint (or `--telemetry=false`) nothing is set up: no span is built, no header
//! is sent, and `status.traceId` stays empty.

pub mod ids;
pub mod spans;

use std::cell::Cell;
use std::sync::OnceLock;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};

pub use ids::{RunTrace, TraceParent};
pub use spans::{CallSpan, record};

/// The annotation holding the W3C traceparent a run continues (set on child runs; users may
/// set it on runs they submit from a traced system).
pub use crate::naming::ANNOTATION_TRACEPARENT;

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{var}={value:?}: only http/protobuf and http/json are supported (OTLP over HTTP, port 4318)")]
    Protocol { var: &'static str, value: String },
    #[error("the OTLP exporter: {0}")]
    Exporter(String),
}

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer, once [`init`] has set one up.
pub(crate) fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Whether spans are being exported.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The traceparent a child run of step `key` of `run` continues: that step's span.
pub fn child_traceparent(run: &crate::engine::RunInfo, key: &str) -> String {
    RunTrace::of(&run.uid, run.traceparent.as_deref()).step_parent(key).header()
}

/// `TRACEPARENT` for what step `key` of `run` runs outside the operator (its pod, or its
/// process in local mode), so that its spans join the step's; none when traces are off.
pub fn step_traceparent(run: &crate::engine::RunInfo, key: &str) -> Option<String> {
    enabled().then(|| child_traceparent(run, key))
}

/// [`step_traceparent`] of the attempt this task runs ([`crate::agents::in_run`]).
pub fn current_step_traceparent() -> Option<String> {
    let run = crate::agents::runs::current().filter(|_| enabled())?;
    Some(RunTrace::of(&run.uid, run.traceparent.as_deref()).step_parent(&run.step).header())
}

/// Flushes and stops the exporter when dropped (the end of `main`).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            tracing::warn!(error = %e, "flushing traces");
        }
    }
}

/// Whether the environment asks for traces: an OTLP endpoint is set, the SDK is not disabled
/// and the traces exporter is not `none`.
fn wanted() -> bool {
    let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.trim().is_empty());
    let is = |v: &str, value: &str| std::env::var(v).is_ok_and(|s| s.trim().eq_ignore_ascii_case(value));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The protocol from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`;
/// `http/protobuf` by default, as the OTLP specification says.
fn protocol() -> Result<Protocol, TelemetryError> {
    for var in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        let Ok(value) = std::env::var(var) else { continue };
        return match value.trim().to_ascii_lowercase().as_str() {
            "" => continue,
            "http/protobuf" => Ok(Protocol::HttpBinary),
            "http/json" => Ok(Protocol::HttpJson),
            _ => Err(TelemetryError::Protocol { var, value }),
        };
    }
    Ok(Protocol::HttpBinary)
}

/// Sets up the exporter when `on` and the environment names an OTLP endpoint; `None` when
/// traces are off. The endpoint, headers, timeout, sampler (`OTEL_TRACES_SAMPLER`), batching
/// (`OTEL_BSP_*`) and resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) come from the
/// standard variables.
pub fn init(on: bool) -> Result<Option<Guard>, TelemetryError> {
    if !on || !wanted() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol()?)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut resource =
        Resource::builder().with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|s| s.contains("service.name="));
    if !named {
        resource = resource.with_service_name("volt-operator");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(Ids::default())
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("volt-operator");
    if TRACER.set(tracer).is_err() {
        tracing::warn!("traces were set up twice; the first exporter stays");
    }
    Ok(Some(Guard(provider)))
}

thread_local! {
    /// IDs the next span built on this thread takes (see [`with_ids`]).
    static NEXT: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Random IDs, except for spans built inside [`with_ids`]: run and step spans have IDs derived
/// from the run ([`ids`]), which the SDK's span builder has no other way to take.
#[derive(Debug, Default)]
struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT.with(Cell::get).map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        NEXT.with(Cell::get).map_or_else(|| self.0.new_span_id(), |(_, s)| s)
    }
}

/// Runs `build` (which builds one span, synchronously) with the trace and span IDs it takes.
fn with_ids<T>(trace: [u8; 16], span: [u8; 8], build: impl FnOnce() -> T) -> T {
    NEXT.with(|n| n.set(Some((TraceId::from_bytes(trace), SpanId::from_bytes(span)))));
    let built = build();
    NEXT.with(|n| n.set(None));
    built
}
