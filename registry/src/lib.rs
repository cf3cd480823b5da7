//! The control plane of adapter versions: the registry (versions, aliases,
//! journal, runs, leases, watches) over SQLite or PostgreSQL, the version store
//! (a directory, or S3-compatible), and the alias snapshots the request path reads.

pub mod aliases;
pub mod control;
pub mod error;
mod lifecycle;
pub mod registry;
mod rows;
pub mod s3;
mod sql;
pub mod states;
pub mod store;
mod watches;

pub use aliases::{AliasCache, Routed, Snapshot};
pub use control::{Decision, LoopCounts, Rollout, RunInfo};
pub use error::RegistryError;
pub use registry::{
    AdapterState, AliasChange, Expect, JournalEntry, NewVersion, Registry, ServedBase, VersionInfo,
};
pub use s3::{S3Options, S3Store};
pub use sql::{is_postgres_url, PG_SCHEMA_VERSION};
pub use states::{Alias, JournalEvent, RunStatus, WatchMode, WatchStatus};
pub use store::{BlobStore, LocalStore};
pub use watches::{WatchEnd, WatchInfo};

use std::path::Path;

/// The version store: the S3-compatible bucket at `url` (with `dir` as this
/// replica's verified cache), or the directory `dir` itself.
pub fn open_store(
    dir: &Path,
    url: Option<&str>,
    endpoint: Option<&str>,
) -> Result<std::sync::Arc<dyn BlobStore>, RegistryError> {
    Ok(match url {
        Some(url) => std::sync::Arc::new(S3Store::open(
            &S3Options {
                url: url.into(),
                endpoint: endpoint.map(str::to_string),
                region: None,
            },
            dir,
        )?),
        None => std::sync::Arc::new(LocalStore::new(dir)?),
    })
}
