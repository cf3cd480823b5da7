//! What chat and text completions share on the wire: the common request
//! fields, usage, logprobs, and the body of a whole answer or of a chunk.

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by chat and text completions.
#[derive(Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Non-standard (as in vLLM/llama.cpp): sample among the k likeliest tokens.
    pub top_k: Option<usize>,
    /// Token id (as a string) → bias in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    pub frequency_penalty: Option<f32>,
    /// Non-standard (vLLM, llama.cpp): see `SamplingParams::min_p`.
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    /// Non-standard (as in vLLM/llama.cpp): keep generating past end-of-sequence.
    #[serde(default)]
    pub ignore_eos: bool,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    pub response_format: Option<serde_json::Value>,
    /// Non-standard (vLLM): the output is exactly one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// Non-standard (vLLM): the output matches this regular expression.
    pub guided_regex: Option<String>,
    /// Non-standard (vLLM): the output is JSON valid under this schema.
    pub guided_json: Option<serde_json::Value>,
    /// Non-standard (vLLM, llama.cpp): see `SamplingParams::repetition_penalty`.
    pub repetition_penalty: Option<f32>,
}

#[derive(Serialize, Clone, Copy)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens: those served from the prefix cache.
#[derive(Serialize, Clone, Copy)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// A chat or text completion, whole or one chunk of its stream (`usage`
/// only on the whole response and on the stream's usage chunk).
#[derive(Serialize)]
pub struct CompletionBody<'a, C> {
    pub id: &'a str,
    /// `chat.completion`, `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One sample of a whole completion.
#[derive(Serialize)]
#[serde(untagged)]
pub enum CompletionChoice {
    Chat {
        index: usize,
        message: AssistantMessage,
        finish_reason: &'static str,
        logprobs: Option<serde_json::Value>,
    },
    Text {
        index: usize,
        text: String,
        finish_reason: &'static str,
        logprobs: Option<serde_json::Value>,
    },
}

/// One sample's piece of a streamed completion (`finish_reason` on its last).
#[derive(Serialize)]
#[serde(untagged)]
pub enum ChunkChoice<'a> {
    Chat {
        index: usize,
        delta: Delta<'a>,
        finish_reason: Option<&'static str>,
        logprobs: Option<serde_json::Value>,
    },
    Text {
        index: usize,
        text: &'a str,
        finish_reason: Option<&'static str>,
        logprobs: Option<serde_json::Value>,
    },
}

#[derive(Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// New text of a streamed chat message (`role` on the sample's first chunk).
#[derive(Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    pub content: &'a str,
}
