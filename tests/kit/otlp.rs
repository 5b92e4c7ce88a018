//! An OTLP/HTTP trace receiver for the tests: it takes what an exporter POSTs to `/v1/traces`
//! (protobuf, the OTLP default, or JSON), decodes it with the OpenTelemetry protocol's own
//! message types, and keeps the spans ([`Receiver::spans`], [`Receiver::wait_for`]).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde_json::Value;

/// One span as received.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    /// OTLP's SpanKind: 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, Value>,
    /// OTLP's StatusCode: 0 unset, 1 ok, 2 error.
    pub status: i32,
    pub status_message: String,
    /// The resource's `service.name`.
    pub service: String,
}

impl Span {
    /// Attribute `key` as text (strings as they are, other values as JSON).
    pub fn attr(&self, key: &str) -> String {
        match self.attributes.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        }
    }
}

/// A running receiver; stops with the test's runtime.
pub struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn value(v: &Option<AnyValue>) -> Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::from(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(|v| value(&Some(v.clone()))).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => Value::Object(attributes(&l.values).into_iter().collect()),
        Some(any_value::Value::BytesValue(b)) => Value::from(hex::encode(b)),
        _ => Value::Null,
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, Value> {
    kvs.iter().map(|kv| (kv.key.clone(), value(&kv.value))).collect()
}

fn decode(headers: &HeaderMap, body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    let json =
        headers.get("content-type").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if json {
        serde_json::from_slice(body).map_err(|e| format!("JSON: {e}"))
    } else {
        ExportTraceServiceRequest::decode(body).map_err(|e| format!("protobuf: {e}"))
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (into, seen) = (spans.clone(), requests.clone());
        let router = axum::Router::new().route(
            "/v1/traces",
            post(move |headers: HeaderMap, body: Bytes| {
                let (into, seen) = (into.clone(), seen.clone());
                async move {
                    let kind = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(kind);
                    let request = match decode(&headers, &body) {
                        Ok(r) => r,
                        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
                    };
                    let mut out = into.lock().unwrap_or_else(|p| p.into_inner());
                    for rs in request.resource_spans {
                        let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
                        let service = resource.get("service.name").and_then(Value::as_str).unwrap_or("").to_string();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                let status = s.status.clone().unwrap_or_default();
                                out.push(Span {
                                    trace_id: hex::encode(&s.trace_id),
                                    span_id: hex::encode(&s.span_id),
                                    parent: hex::encode(&s.parent_span_id),
                                    name: s.name.clone(),
                                    kind: s.kind,
                                    start_ns: s.start_time_unix_nano,
                                    end_ns: s.end_time_unix_nano,
                                    attributes: attributes(&s.attributes),
                                    status: status.code,
                                    status_message: status.message,
                                    service: service.clone(),
                                });
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    (StatusCode::OK, [("content-type", "application/x-protobuf")], Vec::<u8>::new()).into_response()
                }
            }),
        );
        let addr = super::net::serve(router).await;
        Receiver { addr, spans, requests }
    }

    /// `http://127.0.0.1:<port>`: the value of `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The content type of each export request.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `done` holds for the spans received; gives them.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if tokio::time::Instant::now() >= until {
                let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
                panic!("spans not received within {timeout:?}; got {names:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
