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

/// Why a registry or store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: expected live version {expected}, found {actual}")]
    Conflict { expected: String, actual: String },
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("rejected: {0}")]
    Rejected(String),
    /// A version's files are well-formed but cannot be served (shapes, values,
    /// limits, another base): refused at register or promote.
    #[error("invalid adapter: {0}")]
    Invalid(String),
    /// The trainer's lease on the adapter expired or passed to another trainer.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    #[error("invalid adapter: {0}")]
    Adapter(#[from] AdapterError),
    #[error("registry database: {0}")]
    Db(String),
    /// The shared registry database cannot be reached now: nothing was written.
    #[error("registry database unavailable: {0}")]
    Unavailable(String),
    /// The database's schema is newer than this build.
    #[error("registry schema: {0}")]
    Schema(String),
    #[error("i/o: {0}")]
    Io(String),
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(e.to_string())
    }
}
