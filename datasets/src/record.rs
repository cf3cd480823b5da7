//! What is stored: captured completions and feedback.

use crate::error::DataError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One completion as served: enough to replay it (`params` holds the seed used)
/// and to tie a correction to the adapter version that produced the output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapturedCompletion {
    pub id: String,
    pub tenant: String,
    /// `None` = the base model.
    pub adapter: Option<String>,
    pub version: Option<String>,
    pub base_fingerprint: String,
    /// The request's messages or prompt, as sent.
    pub request: serde_json::Value,
    /// Sampling parameters, `seed` the seed actually used.
    pub params: serde_json::Value,
    /// Exactly the text the client received.
    pub output_text: String,
    pub output_ids: Vec<u32>,
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// The request's `user` field.
    pub user: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// How a captured completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// End of sequence, a stop token or a stop string.
    Stop,
    /// `max_tokens`, or the context was full.
    Length,
    /// The generation failed (no output): the watch counts it as bad.
    Error,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Error => "error",
        }
    }
}

impl std::str::FromStr for Finish {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "stop" => Ok(Self::Stop),
            "length" => Ok(Self::Length),
            "error" => Ok(Self::Error),
            other => Err(DataError::Db(format!("a stored finish `{other}`"))),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rating {
    Up,
    Down,
}

impl Rating {
    pub fn from_i64(v: i64) -> Result<Self, DataError> {
        match v {
            1 => Ok(Self::Up),
            -1 => Ok(Self::Down),
            _ => Err(DataError::invalid("rating", "must be 1 or -1")),
        }
    }

    pub fn as_i64(self) -> i64 {
        match self {
            Self::Up => 1,
            Self::Down => -1,
        }
    }
}

/// One feedback event for a completion; every field is optional but one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Feedback {
    pub completion_id: String,
    pub rating: Option<Rating>,
    /// The right answer (the assistant's text).
    pub correction: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The person the data is about (for erasure).
    pub subject_id: Option<String>,
    pub comment: Option<String>,
}

/// Limits on what feedback may hold.
pub const MAX_CORRECTION_BYTES: usize = 256 * 1024;
pub const MAX_LABELS: usize = 64;
pub const MAX_FIELD_BYTES: usize = 1024;

impl Feedback {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.completion_id.is_empty() || self.completion_id.len() > 128 {
            return Err(DataError::invalid(
                "completion_id",
                "must be 1 to 128 bytes",
            ));
        }
        if self.rating.is_none()
            && self.correction.is_none()
            && self.labels.is_empty()
            && self.subject_id.is_none()
            && self.comment.is_none()
        {
            return Err(DataError::invalid(
                "rating",
                "feedback needs at least one of rating, correction, labels, subject_id, comment",
            ));
        }
        if self
            .correction
            .as_ref()
            .is_some_and(|c| c.len() > MAX_CORRECTION_BYTES)
        {
            return Err(DataError::invalid(
                "correction",
                format!("longer than {MAX_CORRECTION_BYTES} bytes"),
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(DataError::invalid(
                "labels",
                format!("more than {MAX_LABELS} labels"),
            ));
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > MAX_FIELD_BYTES || v.len() > MAX_FIELD_BYTES {
                return Err(DataError::invalid(
                    "labels",
                    format!("keys must be 1 to {MAX_FIELD_BYTES} bytes, values at most {MAX_FIELD_BYTES}"),
                ));
            }
        }
        for (field, v) in [("subject_id", &self.subject_id), ("comment", &self.comment)] {
            if v.as_ref()
                .is_some_and(|s| s.is_empty() || s.len() > MAX_FIELD_BYTES)
            {
                return Err(DataError::invalid(
                    field,
                    format!("must be 1 to {MAX_FIELD_BYTES} bytes"),
                ));
            }
        }
        Ok(())
    }
}

/// The current state of a completion's feedback: each field as last given,
/// labels merged (a later value of a key wins), and how many events made it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FeedbackState {
    pub completion_id: String,
    pub rating: Option<i64>,
    pub correction: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub subject_id: Option<String>,
    pub comment: Option<String>,
    /// Feedback events so far (the history is kept).
    pub events: usize,
    /// Unix milliseconds of the last event.
    pub updated_at: Option<i64>,
}

impl FeedbackState {
    pub(crate) fn apply(&mut self, fb: &Feedback, at: i64) {
        if let Some(r) = fb.rating {
            self.rating = Some(r.as_i64());
        }
        if let Some(c) = &fb.correction {
            self.correction = Some(c.clone());
        }
        for (k, v) in &fb.labels {
            self.labels.insert(k.clone(), v.clone());
        }
        if let Some(s) = &fb.subject_id {
            self.subject_id = Some(s.clone());
        }
        if let Some(c) = &fb.comment {
            self.comment = Some(c.clone());
        }
        self.events += 1;
        self.updated_at = Some(at);
    }
}

/// One chat message of an example (OpenAI fine-tuning format; `weight` 0 or 1 on
/// assistant messages says whether to train on it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

/// A training example in one of the two formats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExampleBody {
    Chat { messages: Vec<Message> },
    Text { prompt: String, completion: String },
}

impl ExampleBody {
    /// The input as one normalised string (roles kept) and the target output.
    pub fn input_output(&self) -> (String, String) {
        use crate::curate::normalise;
        match self {
            Self::Chat { messages } => {
                let (last, before) = match messages.split_last() {
                    Some((l, b)) if l.role == "assistant" => (normalise(&l.content), b),
                    _ => (String::new(), &messages[..]),
                };
                let input = before
                    .iter()
                    .map(|m| format!("{}: {}", m.role, normalise(&m.content)))
                    .collect::<Vec<_>>()
                    .join("\n");
                (input, last)
            }
            Self::Text { prompt, completion } => (normalise(prompt), normalise(completion)),
        }
    }
}

/// An example to import, with what curation and erasure need.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportRow {
    pub body: ExampleBody,
    pub subject_id: Option<String>,
    pub label: Option<String>,
}
