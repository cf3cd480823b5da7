#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("not found: {0}")]
    NotFound(String),
    /// Bad input, naming the field.
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("dataset database: {0}")]
    Db(String),
}

impl DataError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<rusqlite::Error> for DataError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(e.to_string())
    }
}
