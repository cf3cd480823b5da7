use retune_adapters::{AdapterError, NameError};

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

impl From<NameError> for RegistryError {
    /// A bad name is refused as it always was: forbidden.
    fn from(e: NameError) -> Self {
        Self::Forbidden(e.0)
    }
}
