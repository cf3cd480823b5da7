//! The chat endpoint's request, and the message and stream delta of its answer.

use crate::api::generation::types::Common;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Deserialize, Serialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, an array of content parts, or null (see `generation::fields::content_text`).
    #[serde(default)]
    pub content: serde_json::Value,
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
