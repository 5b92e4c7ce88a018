//! The trace and span IDs of runs and steps, derived from what the run object holds so that
//! every pass, every replica and a restarted operator name the same spans without storing
//! them: a run's trace is its `volt.dev/traceparent` annotation's (a child run, or a run
//! submitted from a traced system) or else derived from its UID; its span and its steps'
//! spans are hashes of the UID and the step key. Pure: no exporter is involved.

use sha2::{Digest, Sha256};

/// A W3C trace context: 16-byte trace ID and the 8-byte ID of the parent span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` header value (version 00): `00-<32 hex>-<16 hex>-<2 hex>`.
    /// All-zero IDs are invalid, as the W3C recommendation says.
    pub fn parse(value: &str) -> Result<TraceParent, String> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        let [version, trace, span, flags] = parts.as_slice() else {
            return Err(format!("{value:?} is not a W3C traceparent (00-<trace id>-<span id>-<flags>)"));
        };
        if *version != "00" {
            return Err(format!("traceparent version {version:?} is not supported (only 00)"));
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flag = [0u8; 1];
        hex::decode_to_slice(trace, &mut trace_id).map_err(|_| format!("trace id {trace:?} is not 32 hex digits"))?;
        hex::decode_to_slice(span, &mut span_id).map_err(|_| format!("span id {span:?} is not 16 hex digits"))?;
        hex::decode_to_slice(flags, &mut flag).map_err(|_| format!("flags {flags:?} are not 2 hex digits"))?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err("traceparent has an all-zero trace or span id".into());
        }
        Ok(TraceParent { trace_id, span_id, sampled: flag[0] & 1 == 1 })
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(self.span_id), u8::from(self.sampled))
    }
}

/// The spans of one run: its trace, the span it continues (if any), its own span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunTrace {
    pub trace_id: [u8; 16],
    /// The span the run's span is a child of: the parent run's step, or the caller's span.
    pub parent: Option<[u8; 8]>,
    pub run_span: [u8; 8],
    uid: String,
}

impl RunTrace {
    /// The trace of the run with this UID, continuing `traceparent` when it is a valid one
    /// (an invalid one is ignored: the run gets a trace of its own).
    pub fn of(uid: &str, traceparent: Option<&str>) -> RunTrace {
        let parent = traceparent.and_then(|t| TraceParent::parse(t).ok());
        let trace_id = match parent {
            Some(p) => p.trace_id,
            None => {
                let mut id = [0u8; 16];
                id.copy_from_slice(&digest(&["trace", uid])[..16]);
                id
            }
        };
        RunTrace { trace_id, parent: parent.map(|p| p.span_id), run_span: span_id(&["run", uid]), uid: uid.into() }
    }

    /// The trace ID as 32 hex digits (what `status.traceId` shows and backends search by).
    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The span of step `key` (all its attempts; calls made by an attempt are its children).
    pub fn step_span(&self, key: &str) -> [u8; 8] {
        span_id(&["step", &self.uid, key])
    }

    /// The trace context a child of step `key` continues (a child run's annotation, a pod's
    /// `TRACEPARENT`).
    pub fn step_parent(&self, key: &str) -> TraceParent {
        TraceParent { trace_id: self.trace_id, span_id: self.step_span(key), sampled: true }
    }
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// A non-zero span ID from `parts`.
fn span_id(parts: &[&str]) -> [u8; 8] {
    let d = digest(parts);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_named() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = TraceParent::parse(v).unwrap();
        assert!(p.sampled);
        assert_eq!(p.header(), v);
        assert!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").is_ok_and(|p| !p.sampled)
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert!(TraceParent::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_run_names_the_same_spans_every_time_and_continues_its_parent() {
        let a = RunTrace::of("uid-1", None);
        assert_eq!(a, RunTrace::of("uid-1", None));
        assert_ne!(a.trace_id, RunTrace::of("uid-2", None).trace_id);
        assert_eq!(a.parent, None);
        assert_ne!(a.step_span("a"), a.step_span("b"));
        assert_ne!(a.step_span("a"), a.run_span);
        assert_eq!(a.trace_hex().len(), 32);

        // A child run continues its parent's step span, in the parent's trace.
        let link = a.step_parent("review").header();
        let child = RunTrace::of("uid-child", Some(&link));
        assert_eq!(child.trace_id, a.trace_id);
        assert_eq!(child.parent, Some(a.step_span("review")));
        assert_ne!(child.run_span, a.run_span);
        // An invalid annotation gives the run a trace of its own.
        assert_eq!(RunTrace::of("uid-1", Some("garbage")), a);
    }
}
