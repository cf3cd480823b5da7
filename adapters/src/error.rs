use std::path::PathBuf;

/// Why one adapter could not be loaded. Never affects the base or other adapters.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adapter_config.json: field `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("unsupported adapter feature `{field}`: {reason}")]
    Unsupported { field: String, reason: String },
    #[error("corrupt adapter weights {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("adapter file {path} is {bytes} bytes, above the {max} byte limit")]
    TooLarge { path: PathBuf, bytes: u64, max: u64 },
    #[error("tensor `{name}` has shape {got:?}, the base model needs {expected:?} (adapter for another base?)")]
    Shape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("tensor `{name}` holds NaN or infinite values")]
    NonFinite { name: String },
    /// The version's files cannot be fetched now (a shared store is unreachable):
    /// a retry may succeed.
    #[error("adapter files unavailable: {0}")]
    Unavailable(String),
    #[error("rank {rank} of `{module}` exceeds the configured maximum {max}")]
    RankTooLarge {
        module: String,
        rank: usize,
        max: usize,
    },
}

/// A tenant, adapter or version name that cannot be used (see [`crate::check_name`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);
