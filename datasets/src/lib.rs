//! retune's data layer: every completion captured with what replays it, feedback
//! (ratings, corrections, labels, the person the data is about) with its history.
//! It knows no HTTP and no tensors; the server writes it, the trainer reads it.
//! Stores sit behind [`DatasetStore`]: SQLite embedded, PostgreSQL later.

pub mod capture;
pub mod curate;
pub mod error;
pub mod import;
pub mod record;
pub mod snapshot;
pub mod sqlite;

pub use capture::{CaptureStats, CaptureWriter};
pub use error::DataError;
pub use import::{parse_jsonl, LineError};
pub use record::{
    CapturedCompletion, ExampleBody, Feedback, FeedbackState, ImportRow, Message, Rating,
};
pub use snapshot::{Manifest, Policy, SnapshotRow};
pub use sqlite::SqliteStore;

/// The snapshots of a tenant that hold rows about one subject.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Lineage {
    pub snapshots: Vec<String>,
}

/// What an erasure removed.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Erased {
    pub completions: usize,
    pub feedback: usize,
    pub examples: usize,
    pub snapshot_rows: usize,
    /// Snapshots that lost rows: every adapter version trained on one is tainted.
    pub snapshots: Vec<String>,
}

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
    /// Import examples for `tenant/adapter` (one transaction); returns how many.
    fn import(
        &self,
        tenant: &str,
        adapter: &str,
        source: &str,
        rows: &[ImportRow],
    ) -> Result<usize, DataError>;
    /// Curate the examples of `tenant/adapter` into an immutable snapshot.
    fn snapshot(&self, tenant: &str, adapter: &str, policy: &Policy)
        -> Result<Manifest, DataError>;
    fn manifest(&self, tenant: &str, id: &str) -> Result<Manifest, DataError>;
    fn snapshots(&self, tenant: &str, adapter: Option<&str>) -> Result<Vec<Manifest>, DataError>;
    fn snapshot_rows(&self, tenant: &str, id: &str) -> Result<Vec<SnapshotRow>, DataError>;
    /// The snapshots holding rows about `subject`.
    fn lineage(&self, tenant: &str, subject: &str) -> Result<Lineage, DataError>;
    /// Delete everything about `subject`, from snapshots too.
    fn erase(&self, tenant: &str, subject: &str) -> Result<Erased, DataError>;
    /// Retention: delete `tenant`'s captured completions created before
    /// `before_ms` (Unix ms), with their feedback; returns how many.
    fn purge_before(&self, tenant: &str, before_ms: i64) -> Result<usize, DataError>;
}
