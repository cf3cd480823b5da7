//! LoRA adapters: the PEFT on-disk format (`adapter_config.json` +
//! `adapter_model.safetensors`), validated against the base model's shapes, and
//! (next issue) the registry and store of adapter versions.

pub mod error;
pub mod peft;
pub mod pool;
pub mod registry;
pub mod store;

pub use error::AdapterError;
pub use peft::{load_peft, AdapterConfig, BaseShapes, LoadLimits, LoraAdapter, LoraPair, MODULES};
pub use pool::{Acquire, AdapterPool, AdapterSource, DirSource, PoolConfig, PoolStats};
pub use registry::{
    AdapterState, AliasChange, Expect, JournalEntry, NewVersion, Registry, RegistryError,
    ServedBase, VersionInfo,
};
pub use store::{BlobStore, LocalStore};
