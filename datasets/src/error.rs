#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("not found: {0}")]
    NotFound(String),
    /// Bad input, naming the field.
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("dataset database: {0}")]
    Db(String),
    /// The store cannot be reached now (a shared database down or refusing
    /// connections): nothing was written; the caller may retry.
    #[error("dataset store unavailable: {0}")]
    Unavailable(String),
    /// The store's schema is not one this build can use.
    #[error("dataset store schema: {0}")]
    Schema(String),
}

impl DataError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
