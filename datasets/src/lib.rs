//! retune's data layer: every completion captured with what replays it, feedback
//! (ratings, corrections, labels, the person the data is about) with its history.
//! It knows no HTTP and no tensors; the server writes it, the trainer reads it.
//! The store sits behind [`DatasetStore`], written once over the one SQL layer:
//! SQLite embedded, PostgreSQL shared ([`open`] picks by location).

pub mod capture;
pub use retune_classical as classical;
pub mod curate;
pub mod error;
pub mod import;
pub mod record;
pub mod review;
mod rows;
mod schema;
pub mod snapshot;
pub mod store;

pub use capture::{CaptureStats, CaptureWriter};
pub use error::DataError;
pub use import::{label_of, parse_jsonl, parse_jsonl_for, LineError};
pub use record::{
    CapturedCompletion, ExampleBody, Feedback, FeedbackState, Finish, ImportRow, Message, Rating,
};
pub use schema::PG_SCHEMA_VERSION;
pub use snapshot::{Manifest, Policy, SnapshotRow, SuspectPolicy, Suspects};
pub use store::SqlStore;

/// Curate a snapshot ([`DatasetStore::snapshot`]) and, for a label task whose
/// policy looks for them, find its suspect labels once (outside the store's
/// transaction: seconds of classifier training never hold its lock) and record
/// them in the manifest.
pub fn snapshot_with_suspects(
    store: &dyn DatasetStore,
    tenant: &str,
    adapter: &str,
    policy: &Policy,
) -> Result<Manifest, DataError> {
    let m = store.snapshot(tenant, adapter, policy)?;
    if policy.suspects == snapshot::SuspectPolicy::Off
        || m.suspects.is_some()
        || m.labels.is_empty()
    {
        return Ok(m);
    }
    let rows = store.snapshot_rows(tenant, &m.id)?;
    let s = snapshot::find_snapshot_suspects(&rows, policy.suspects);
    store.set_suspects(tenant, &m.id, &s)
}

/// The rows of a snapshot to train on: less its suspect train rows when its
/// policy holds them out ([`snapshot::training_rows`]).
pub fn training_rows(
    store: &dyn DatasetStore,
    tenant: &str,
    id: &str,
) -> Result<Vec<SnapshotRow>, DataError> {
    let m = store.manifest(tenant, id)?;
    Ok(snapshot::training_rows(
        &m,
        store.snapshot_rows(tenant, id)?,
    ))
}

pub use retune_sql::is_postgres_url;

/// Open the store at `location`: a `postgres://` URL, or a SQLite file path.
pub fn open(location: &str) -> Result<std::sync::Arc<dyn DatasetStore>, DataError> {
    Ok(std::sync::Arc::new(SqlStore::open(location)?))
}

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

/// Live signals of one adapter version over a time range, from captured
/// completions and their feedback.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Signals {
    pub completions: usize,
    /// Completions whose current rating is -1.
    pub rated_down: usize,
    /// Completions with a correction.
    pub corrected: usize,
    /// Completions that ended in an error.
    pub errors: usize,
    /// Completions with any of the three: the rate the watch tests.
    pub bad: usize,
}

impl Signals {
    /// Count one completion: ended in an error, rated down, corrected.
    pub(crate) fn count(&mut self, err: bool, down: bool, corrected: bool) {
        self.completions += 1;
        self.errors += err as usize;
        self.rated_down += down as usize;
        self.corrected += corrected as usize;
        self.bad += (err || down || corrected) as usize;
    }
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
    /// Record the suspect labels found in a stored snapshot (its manifest).
    fn set_suspects(
        &self,
        tenant: &str,
        id: &str,
        suspects: &snapshot::Suspects,
    ) -> Result<Manifest, DataError>;
    /// The snapshots holding rows about `subject`.
    fn lineage(&self, tenant: &str, subject: &str) -> Result<Lineage, DataError>;
    /// Delete everything about `subject`, from snapshots too.
    fn erase(&self, tenant: &str, subject: &str) -> Result<Erased, DataError>;
    /// Retention: delete `tenant`'s captured completions created before
    /// `before_ms` (Unix ms), with their feedback; returns how many.
    fn purge_before(&self, tenant: &str, before_ms: i64) -> Result<usize, DataError>;
    /// Examples of `tenant/adapter` that became candidates after `since_ms`:
    /// imports, and captured completions whose feedback (a correction, or a +1
    /// rating when `include_positive`) arrived since. Before curation (duplicates
    /// and conflicts are counted), so a trigger, not a count of snapshot rows.
    fn candidates_since(
        &self,
        tenant: &str,
        adapter: &str,
        since_ms: i64,
        include_positive: bool,
    ) -> Result<usize, DataError>;
    /// Signals of completions served by `version` of `tenant/adapter` created in
    /// `[from_ms, to_ms)`.
    fn signals(
        &self,
        tenant: &str,
        adapter: &str,
        version: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Signals, DataError>;
    /// Every (tenant, adapter) with imported examples or captured completions.
    fn adapters(&self) -> Result<Vec<(String, String)>, DataError>;
    /// The input keys a person has ruled on for `tenant/adapter` (review
    /// verdicts: [`snapshot::REVIEW_SOURCE`] examples).
    fn reviewed_keys(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<std::collections::BTreeSet<String>, DataError>;
}
