//! An agent step's conversation (messages, tools offered, response format, transcript), what one
//! attempt sends, the chat completion request of a turn, the answer read from a reply, and the
//! worst case a call is reserved for.

use crate::text::clip;
use std::sync::Arc;
use std::time::Duration;

use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, StopConfiguration,
};

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::api::{ChatRole, TokenUsage};
use crate::engine::output_schema;
use crate::engine::{LlmWork, TaskInfo};

use crate::agents::balancer::AgentKey;
use crate::agents::limits::estimate_tokens;
use crate::agents::registry::{AgentEntry, Replica};
use crate::agents::secrets::ApiKey;
use crate::agents::transcript::Transcript;
use crate::telemetry::CallSpan;

use super::errors::FailureKind;

/// Completion tokens reserved for a call whose Agent sets no `parameters.maxTokens`.
pub const DEFAULT_COMPLETION_RESERVE: u64 = 4096;

/// The worst case of the next call of `conv` to `entry`: the prompt's estimate plus
/// `maxTokens`, in tokens and at the agent's prices.
pub(super) fn worst_case(entry: &AgentEntry, conv: &Conversation) -> (u64, f64) {
    let chars = entry.spec.instructions.len()
        + conv.sizes.messages
        + conv.sizes.tool_defs.get(&entry.key).copied().unwrap_or(0)
        + conv.sizes.response_format;
    let prompt = estimate_tokens(chars);
    let completion = entry.spec.parameters.max_tokens.map_or(DEFAULT_COMPLETION_RESERVE, u64::from);
    let cost = entry.spec.pricing.as_ref().map_or(0.0, |p| p.cost(prompt, completion));
    (prompt + completion, cost)
}

pub(super) struct Attempt<'a> {
    pub(super) entry: &'a AgentEntry,
    pub(super) replica: &'a Replica,
    pub(super) key: Option<&'a ApiKey>,
    pub(super) turn: Turn<'a>,
    pub(super) timeout: Duration,
    /// The timeout is what is left of the step's time, not the agent's `timeoutSeconds`: its
    /// expiry says nothing about the replica.
    pub(super) step_bound: bool,
}

/// What one model call sends besides the agent's instructions and parameters.
#[derive(Clone, Copy)]
pub(super) struct Turn<'a> {
    /// The conversation so far, as OpenAI messages.
    pub(super) messages: &'a [Value],
    /// Tool definitions (`tools` of the request).
    pub(super) tools: &'a [Value],
    pub(super) response_format: Option<&'a Value>,
}

/// A successful chat completion.
pub(super) struct Answer {
    pub(super) text: String,
    pub(super) tokens: Option<TokenUsage>,
    /// The assistant message, as sent back in the next turn.
    pub(super) message: Value,
    pub(super) tool_calls: Vec<ToolCall>,
    /// The agent that answered.
    pub(super) agent: Option<AgentKey>,
    /// The HTTP exchange with the replica (the model's time, as the operator sees it).
    pub(super) http: Duration,
}

/// A tool call the model asks for.
pub(super) struct ToolCall {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) arguments: String,
}

/// An agent step's conversation: its messages, the tools offered (by agent), the response
/// format, and its transcript.
pub(super) struct Conversation {
    pub(super) messages: Vec<Value>,
    pub(super) tool_defs: HashMap<AgentKey, Vec<Value>>,
    pub(super) response_format: Option<Value>,
    pub(super) transcript: Transcript,
    /// Lengths of the JSON of the above, kept as they are added, so that estimating a call's
    /// tokens does not serialise the whole conversation at every turn.
    sizes: Sizes,
}

#[derive(Default)]
struct Sizes {
    messages: usize,
    tool_defs: HashMap<AgentKey, usize>,
    response_format: usize,
}

impl Conversation {
    pub(super) fn new(llm: &LlmWork, prompt: &str) -> Self {
        let mut conv = Conversation {
            messages: Vec::new(),
            tool_defs: HashMap::new(),
            response_format: llm.schema.as_ref().map(|schema| {
                json!({"type": "json_schema", "json_schema": {
                    "name": "output", "schema": schema, "strict": output_schema::strict_compatible(schema),
                }})
            }),
            transcript: Transcript::default(),
            sizes: Sizes::default(),
        };
        conv.sizes.response_format = conv.response_format.as_ref().map_or(0, |f| f.to_string().len());
        for (role, content) in &llm.messages {
            let role = match role {
                ChatRole::System => "system",
                ChatRole::User => "user",
                ChatRole::Assistant => "assistant",
            };
            conv.push(json!({"role": role, "content": content}));
        }
        if !prompt.is_empty() {
            conv.push(json!({"role": "user", "content": prompt}));
        }
        conv
    }

    pub(super) fn push(&mut self, message: Value) {
        self.sizes.messages += message.to_string().len();
        self.transcript.message(&message);
        self.messages.push(message);
    }

    /// Offers `defs` (tool definitions) when calling `agent`.
    pub(super) fn offer_tools(&mut self, agent: AgentKey, defs: Vec<Value>) {
        self.sizes.tool_defs.insert(agent.clone(), defs.iter().map(|d| d.to_string().len()).sum());
        self.tool_defs.insert(agent, defs);
    }

    /// `info` with the transcript of the attempt.
    pub(super) fn info(&self, mut info: TaskInfo, outcome: &str, error: Option<&str>) -> TaskInfo {
        info.transcript = Some(Arc::new(self.transcript.finish(outcome, error)));
        info
    }
}

/// The chat completion request of a turn of a step: the agent's instructions as the first
/// system message, then the conversation; its tools and response format.
#[allow(deprecated)] // `max_tokens` and `seed`: what self-hosted servers (vLLM, Ollama, llama.cpp) read.
pub(super) fn build_request(entry: &AgentEntry, turn: &Turn<'_>) -> Result<CreateChatCompletionRequest, String> {
    let spec = &entry.spec;
    let mut messages: Vec<ChatCompletionRequestMessage> = Vec::with_capacity(turn.messages.len() + 1);
    if !spec.instructions.is_empty() {
        messages
            .push(ChatCompletionRequestSystemMessage { content: spec.instructions.clone().into(), name: None }.into());
    }
    for (i, m) in turn.messages.iter().enumerate() {
        messages.push(serde_json::from_value(m.clone()).map_err(|e| format!("message {i}: {e}"))?);
    }
    let tools = (!turn.tools.is_empty())
        .then(|| serde_json::from_value(Value::Array(turn.tools.to_vec())))
        .transpose()
        .map_err(|e| format!("tools: {e}"))?;
    let response_format = turn
        .response_format
        .map(|f| serde_json::from_value(f.clone()))
        .transpose()
        .map_err(|e| format!("response_format: {e}"))?;
    let p = &spec.parameters;
    let f = |v: Option<f64>| v.map(|x| x as f32);
    if p.stop.len() > 4 {
        return Err(format!("spec.parameters.stop has {} sequences; at most 4 are allowed", p.stop.len()));
    }
    Ok(CreateChatCompletionRequest {
        messages,
        model: spec.model.clone(),
        temperature: f(p.temperature),
        top_p: f(p.top_p),
        max_tokens: p.max_tokens,
        presence_penalty: f(p.presence_penalty),
        frequency_penalty: f(p.frequency_penalty),
        stop: (!p.stop.is_empty()).then(|| StopConfiguration::StringArray(p.stop.clone())),
        seed: p.seed,
        tools,
        response_format,
        ..Default::default()
    })
}

pub(super) fn answer_of(response: CreateChatCompletionResponse) -> Result<Answer, (String, FailureKind)> {
    let tokens = response.usage.as_ref().map(|u| TokenUsage {
        prompt: u64::from(u.prompt_tokens),
        completion: u64::from(u.completion_tokens),
        cost: 0.0,
    });
    let Some(choice) = response.choices.into_iter().next() else {
        return Err(("the answer has no choices".into(), FailureKind::Transient));
    };
    if choice.finish_reason == Some(async_openai::types::chat::FinishReason::ContentFilter) {
        return Err((
            "the reply was withheld by the content filter (finish_reason content_filter)".into(),
            FailureKind::Rejected,
        ));
    }
    let mut message = serde_json::to_value(&choice.message).unwrap_or_else(|_| json!({}));
    let tool_calls: Vec<ToolCall> = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .map(|c| ToolCall {
                    id: c["id"].as_str().unwrap_or_default().to_string(),
                    name: c["function"]["name"].as_str().unwrap_or_default().to_string(),
                    arguments: c["function"]["arguments"].as_str().unwrap_or_default().to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    // What is sent back: role, content and tool calls (not annotations, audio or refusals).
    if let Some(m) = message.as_object_mut() {
        m.retain(|k, _| matches!(k.as_str(), "role" | "content" | "tool_calls"));
    }
    match (choice.message.content, choice.message.refusal) {
        (Some(text), _) => Ok(Answer { text, tokens, message, tool_calls, agent: None, http: Duration::ZERO }),
        (None, Some(refusal)) if tool_calls.is_empty() => {
            Err((format!("the model refused: {}", clip(&refusal, 300)), FailureKind::Rejected))
        }
        (None, _) => Ok(Answer { text: String::new(), tokens, message, tool_calls, agent: None, http: Duration::ZERO }),
    }
}

/// The GenAI attributes of an answer: the model that answered, its ID, why it stopped, and
/// the tokens used.
pub(super) fn note_response(span: &mut CallSpan, response: &CreateChatCompletionResponse) {
    if !span.recording() {
        return;
    }
    span.set("gen_ai.response.model", response.model.clone());
    span.set("gen_ai.response.id", response.id.clone());
    let reasons = response
        .choices
        .iter()
        .filter_map(|c| c.finish_reason.as_ref())
        .filter_map(|r| serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_string)));
    span.set_strings("gen_ai.response.finish_reasons", reasons);
    if let Some(u) = &response.usage {
        span.set("gen_ai.usage.input_tokens", i64::from(u.prompt_tokens));
        span.set("gen_ai.usage.output_tokens", i64::from(u.completion_tokens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_instructions_prompt_model_and_parameters() {
        let spec: crate::api::AgentSpec = serde_json::from_value(serde_json::json!({
            "model": "m", "instructions": "be brief",
            "parameters": {"temperature": 0.5, "maxTokens": 64, "stop": ["END"], "seed": 7}
        }))
        .expect("spec");
        let entry = AgentEntry {
            key: crate::agents::balancer::AgentKey::new("ns", "a"),
            spec,
            labels: Default::default(),
            replicas: vec![],
            invalid: None,
        };
        let messages = [serde_json::json!({"role": "user", "content": "hello"})];
        let turn = Turn { messages: &messages, tools: &[], response_format: None };
        let req = build_request(&entry, &turn).expect("request");
        let json = serde_json::to_value(&req).expect("json");
        assert_eq!(json["model"], "m");
        assert_eq!(json["messages"][0], serde_json::json!({"role": "system", "content": "be brief"}));
        assert_eq!(json["messages"][1], serde_json::json!({"role": "user", "content": "hello"}));
        assert_eq!(json["temperature"], 0.5);
        assert_eq!(json["max_tokens"], 64);
        assert_eq!(json["stop"], serde_json::json!(["END"]));
        assert_eq!(json["seed"], 7);
        assert!(json.get("stream").is_none());
    }

    #[test]
    fn the_worst_case_counts_the_whole_conversation() {
        let spec: crate::api::AgentSpec = serde_json::from_value(
            serde_json::json!({"model": "m", "instructions": "be brief", "parameters": {"maxTokens": 10}}),
        )
        .expect("spec");
        let key = crate::agents::balancer::AgentKey::new("ns", "a");
        let entry = AgentEntry { key: key.clone(), spec, labels: Default::default(), replicas: vec![], invalid: None };
        let llm = LlmWork {
            schema: Some(serde_json::json!({"type": "object"})),
            messages: vec![(ChatRole::System, "hi".into())],
            ..Default::default()
        };
        let mut conv = Conversation::new(&llm, "go");
        conv.offer_tools(key, vec![serde_json::json!({"type": "function", "function": {"name": "add"}})]);
        conv.push(serde_json::json!({"role": "tool", "tool_call_id": "c", "content": "x".repeat(4000)}));
        let chars = "be brief".len()
            + conv.messages.iter().map(|m| m.to_string().len()).sum::<usize>()
            + conv.tool_defs.values().flatten().map(|d| d.to_string().len()).sum::<usize>()
            + conv.response_format.as_ref().map_or(0, |f| f.to_string().len());
        assert_eq!(worst_case(&entry, &conv).0, estimate_tokens(chars) + 10);
    }
}
