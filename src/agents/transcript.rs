//! The transcript of one attempt of an agent step: the messages sent and received, tool calls
//! and their results, the replica of each model call, latencies, token usage and repairs.
//! It rides with the attempt's result ([`TaskInfo::transcript`](crate::engine::TaskInfo)) as
//! JSON; the run controller stores it in a ConfigMap owned by the run (`transcriptRef`), local
//! mode next to its state. Secrets (the API key, MCP header values) are taken out, and the JSON
//! is bounded: long contents are cut, and when it is still too large the oldest middle entries
//! are dropped (and counted). Every entry carries `atMs`, the milliseconds from the attempt's
//! first entry to the entry (for a call or a tool call: to its end), so the gaps between model
//! calls and tool calls can be read off a transcript.

use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::api::TokenUsage;

use super::mcp::redact_all;

/// Largest transcript kept, in bytes of JSON.
pub const MAX_TRANSCRIPT_BYTES: usize = 128 * 1024;
/// Longest content of one entry kept in a transcript.
const MAX_CONTENT_CHARS: usize = 16 * 1024;

/// One thing that happened in a step's conversation. Kinds and fields are camelCase in JSON
/// (`latencyMs`, `httpMs`, `waitedMs`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase", tag = "kind")]
pub enum Entry {
    /// A message of the conversation (system, user, assistant with its tool calls, tool).
    Message { message: Value },
    /// A model call: who answered, how long it took, what it cost.
    Call {
        agent: String,
        /// The model the agent asked for.
        #[serde(skip_serializing_if = "String::is_empty")]
        model: String,
        replica: String,
        /// The whole attempt: replica pick, request, reply, parsing.
        latency_ms: f64,
        /// The HTTP exchange alone (sending the request to the end of the reply).
        http_ms: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        tokens: Option<TokenUsage>,
    },
    /// A tool call the operator ran.
    Tool {
        name: String,
        latency_ms: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A reply failed the output schema; the model is asked again.
    Repair { attempt: u32, problem: String },
    /// The step's agent was exhausted: its fallback `to` is asked instead.
    Fallback { from: String, to: String, model: String, reason: String },
    /// The call waited for room under the agent's `spec.rateLimit`.
    RateLimitWait { agent: String, waited_ms: f64 },
}

/// A transcript being written.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Entries with the time they were pushed.
    entries: Vec<(Instant, Entry)>,
    tokens: TokenUsage,
    repairs: u32,
    turns: u32,
    /// Values to take out (API keys, header values).
    secrets: Vec<String>,
}

impl Transcript {
    pub fn push(&mut self, entry: Entry) {
        if let Entry::Call { tokens: Some(t), .. } = &entry {
            self.tokens.prompt += t.prompt;
            self.tokens.completion += t.completion;
            self.tokens.cost += t.cost;
        }
        if matches!(entry, Entry::Repair { .. }) {
            self.repairs += 1;
        }
        self.entries.push((Instant::now(), entry));
    }

    pub fn message(&mut self, message: &Value) {
        self.push(Entry::Message { message: message.clone() });
    }

    pub fn turn(&mut self) {
        self.turns += 1;
    }

    pub fn tokens(&self) -> TokenUsage {
        self.tokens
    }

    /// Takes `secret` out of the transcript when it is written.
    pub fn hide(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_string());
        }
    }

    /// The transcript as JSON, redacted and at most [`MAX_TRANSCRIPT_BYTES`].
    pub fn finish(&self, outcome: &str, error: Option<&str>) -> String {
        let start = self.entries.first().map(|(at, _)| *at);
        let entries: Vec<Value> = self
            .entries
            .iter()
            .map(|(at, e)| {
                let mut v = clip_strings(json!(e));
                if let (Some(o), Some(start)) = (v.as_object_mut(), start) {
                    let us = at.saturating_duration_since(start).as_micros();
                    o.insert("atMs".into(), json!(us as f64 / 1000.0));
                }
                v
            })
            .collect();
        let mut dropped = 0usize;
        let render = |entries: &[Value], dropped: usize| {
            let mut doc = json!({
                "version": 1,
                "outcome": outcome,
                "turns": self.turns,
                "repairs": self.repairs,
                "usage": usage_json(&self.tokens),
                "entries": entries,
            });
            if let Some(e) = error {
                doc["error"] = json!(e);
            }
            if dropped > 0 {
                doc["droppedEntries"] = json!(dropped);
            }
            redact_all(&doc.to_string(), &self.secrets)
        };
        let mut kept = entries;
        let mut out = render(&kept, dropped);
        // Keep the first entries (the task) and the last (the answer); drop from the middle.
        while out.len() > MAX_TRANSCRIPT_BYTES && kept.len() > 2 {
            let n = (kept.len() / 4).max(1);
            let mid = kept.len() / 2;
            let start = mid.saturating_sub(n / 2).max(1);
            let end = (start + n).min(kept.len() - 1);
            kept.drain(start..end);
            dropped += end - start;
            out = render(&kept, dropped);
        }
        if out.len() > MAX_TRANSCRIPT_BYTES {
            out = render(&[], dropped + kept.len());
        }
        out
    }
}

/// `value` with every string cut to [`MAX_CONTENT_CHARS`].
fn clip_strings(value: Value) -> Value {
    match value {
        Value::String(s) if s.len() > MAX_CONTENT_CHARS => {
            let mut cut: String = s.chars().take(MAX_CONTENT_CHARS).collect();
            cut.push_str(&format!("… [{} more bytes]", s.len() - cut.len()));
            Value::String(cut)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(clip_strings).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, clip_strings(v))).collect()),
        other => other,
    }
}

fn usage_json(t: &TokenUsage) -> Value {
    let mut u = json!({"prompt": t.prompt, "completion": t.completion});
    if t.cost > 0.0 {
        u["cost"] = json!(crate::engine::usage::round_cost(t.cost));
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_are_redacted_and_bounded() {
        let mut t = Transcript::default();
        t.hide("sk-secret-key");
        t.message(&json!({"role": "user", "content": "my key is sk-secret-key"}));
        for i in 0..200 {
            t.message(&json!({"role": "tool", "content": format!("{i} {}", "x".repeat(4000))}));
        }
        t.push(Entry::Call {
            agent: "a".into(),
            model: String::new(),
            replica: "r".into(),
            latency_ms: 3.0,
            http_ms: 2.5,
            tokens: Some(TokenUsage { prompt: 2, completion: 1, cost: 0.0 }),
        });
        t.message(&json!({"role": "assistant", "content": "done"}));
        let out = t.finish("Succeeded", None);
        assert!(out.len() <= MAX_TRANSCRIPT_BYTES, "{}", out.len());
        assert!(!out.contains("sk-secret-key"));
        let v: Value = serde_json::from_str(&out).expect("json");
        assert!(v["droppedEntries"].as_u64().unwrap_or(0) > 0);
        assert_eq!(v["entries"][0]["message"]["content"], "my key is [redacted]");
        assert_eq!(
            v["entries"].as_array().and_then(|e| e.last()).map(|e| e["message"]["content"].clone()),
            Some(json!("done"))
        );
        assert_eq!(v["usage"], json!({"prompt": 2, "completion": 1}));
    }

    #[test]
    fn fields_are_camel_case_and_entries_are_timed() {
        let mut t = Transcript::default();
        t.message(&json!({"role": "user", "content": "hi"}));
        t.push(Entry::Call {
            agent: "a".into(),
            model: "m".into(),
            replica: "r".into(),
            latency_ms: 3.0,
            http_ms: 2.5,
            tokens: None,
        });
        t.push(Entry::Tool { name: "add".into(), latency_ms: 1.5, error: None });
        t.push(Entry::RateLimitWait { agent: "a".into(), waited_ms: 4.0 });
        let v: Value = serde_json::from_str(&t.finish("Succeeded", None)).expect("json");
        let e = &v["entries"];
        assert_eq!(
            (e[1]["kind"].as_str(), e[1]["latencyMs"].as_f64(), e[1]["httpMs"].as_f64()),
            (Some("call"), Some(3.0), Some(2.5))
        );
        assert_eq!(e[2]["latencyMs"].as_f64(), Some(1.5));
        assert_eq!((e[3]["kind"].as_str(), e[3]["waitedMs"].as_f64()), (Some("rateLimitWait"), Some(4.0)));
        assert_eq!(e[0]["atMs"].as_f64(), Some(0.0));
        let at: Vec<f64> = e.as_array().into_iter().flatten().filter_map(|x| x["atMs"].as_f64()).collect();
        assert_eq!(at.len(), 4);
        assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    }
}
