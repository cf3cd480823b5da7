//! LoRA adapters: the PEFT on-disk format (`adapter_config.json` +
//! `adapter_model.safetensors`) validated against the base model's shapes, the
//! registry and store of adapter versions, resolved references, and the pool.

pub mod aliases;
pub mod control;
pub mod error;
pub mod names;
pub mod packed;
pub mod peft;
pub mod pool;
pub mod registry;
pub mod s3;
mod sql;
pub mod states;
pub mod store;

pub use aliases::{AliasCache, Routed, Snapshot};
pub use control::{Decision, LoopCounts, Rollout, RunInfo, WatchEnd, WatchInfo};
pub use error::{AdapterError, RegistryError};
pub use names::{check_name, AdapterRef, Via};
pub use peft::{
    load_peft, AdapterConfig, BaseShapes, ClassHead, LoadLimits, LoraAdapter, LoraPair,
    HEAD_TENSOR, LABELS_METADATA, MAX_LABELS, MODULES,
};
pub use pool::{Acquire, AdapterPool, AdapterSource, DirSource, PoolConfig, PoolStats};
pub use registry::{
    AdapterState, AliasChange, Expect, JournalEntry, NewVersion, Registry, ServedBase, VersionInfo,
};
pub use s3::{S3Options, S3Store};
pub use sql::{is_postgres_url, PG_SCHEMA_VERSION};
pub use states::{Alias, JournalEvent, RunStatus, WatchMode, WatchStatus};
pub use store::{open_store, BlobStore, LocalStore};
