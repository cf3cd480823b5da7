//! The chat endpoint's request.

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
