//! The text completions endpoint's request.

use crate::api::generation::types::Common;
use serde::Deserialize;

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub prompt: String,
    /// Legacy completions: number of top logprobs.
    pub logprobs: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
}
