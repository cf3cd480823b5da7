//! Typed errors of the engine. The server maps them to HTTP; nothing here panics on bad input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model file {path}: {reason}")]
    InvalidModel { path: PathBuf, reason: String },
    #[error("unsupported architecture `{0}` (served: {families})", families = crate::family::SERVED)]
    UnsupportedArchitecture(String),
    #[error("unsupported tensor type {dtype} for `{tensor}`")]
    UnsupportedQuantization { tensor: String, dtype: String },
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("prompt has {prompt} tokens but the context holds {context} (with {max_tokens} tokens to generate)")]
    PromptTooLong {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A fault of the server (a bug, a broken template, a poisoned lock): never the client's.
    #[error("internal: {0}")]
    Internal(String),
    #[error("engine overloaded: {0} requests already queued")]
    Overloaded(usize),
    #[error("engine has shut down")]
    ShutDown,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::InvalidModel {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
