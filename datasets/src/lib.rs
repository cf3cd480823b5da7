//! retune's data layer: every completion captured with what replays it, feedback
//! (ratings, corrections, labels, the person the data is about) with its history.
//! It knows no HTTP and no tensors; the server writes it, the trainer reads it.
//! Stores sit behind [`DatasetStore`]: SQLite embedded, PostgreSQL later.

pub mod capture;
pub mod curate;
pub mod error;
pub mod record;
pub mod sqlite;

pub use capture::{CaptureStats, CaptureWriter};
pub use error::DataError;
pub use record::{CapturedCompletion, Feedback, FeedbackState, Rating};
pub use sqlite::SqliteStore;

/// The examples store.
pub trait DatasetStore: Send + Sync {
    /// Record captured completions (one transaction; an id seen before is ignored).
    fn record(&self, batch: &[CapturedCompletion]) -> Result<(), DataError>;
    /// A completion of `tenant`; another tenant's id is `NotFound` like an unknown one.
    fn completion(&self, tenant: &str, id: &str) -> Result<CapturedCompletion, DataError>;
    /// Append feedback to a completion of `tenant`, durably; returns the new state.
    fn add_feedback(&self, tenant: &str, fb: &Feedback) -> Result<FeedbackState, DataError>;
    /// The current feedback state of a completion of `tenant`.
    fn feedback(&self, tenant: &str, completion_id: &str) -> Result<FeedbackState, DataError>;
}
