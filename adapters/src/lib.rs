//! LoRA adapters at run time: the PEFT on-disk format (`adapter_config.json` +
//! `adapter_model.safetensors`) validated against the base model's shapes, the
//! packed form, resolved references and the pool the engine loads them through.
//! The registry and store of versions are `retune-registry`.

pub mod error;
pub mod files;
pub mod head;
pub mod names;
pub mod packed;
pub mod peft;
mod peft_config;
pub mod pool;

pub use error::{AdapterError, NameError};
pub use head::{ClassHead, LabelPrior, HEAD_TENSOR, LABELS_METADATA, MAX_LABELS, PRIOR_TENSOR};
pub use names::{check_name, AdapterRef, Via};
pub use peft::{load_peft, AdapterConfig, BaseShapes, LoadLimits, LoraAdapter, LoraPair, MODULES};
pub use pool::{Acquire, AdapterPool, AdapterSource, DirSource, PoolConfig, PoolStats};
