//! retune's trainer: LoRA fine-tuning on the served base model, in Rust on
//! candle, through the engine's own forward in its training mode.
//!
//! - [`examples`]: examples tokenized exactly as the server renders prompts,
//!   loss on assistant tokens;
//! - [`batches`]: length-bucketed, seeded batches;
//! - [`lora`]: PEFT's init, PEFT directories in and out;
//! - [`optim`]: AdamW, warm-up + cosine, clipping;
//! - [`train`]: the loop (accumulation, eval loss, early stopping, checkpoints);
//! - [`run`]: a whole job from a snapshot or JSONL file to a registered version.

pub mod batches;
mod checkpoint;
pub mod daemon;
pub mod error;
pub mod eval;
pub mod examples;
pub mod gate;
pub mod lora;
pub mod optim;
pub mod plot;
pub mod run;
pub mod scoring;
pub mod settings;
pub mod stats;
mod status;
pub mod train;
pub mod watch;

pub use error::{Result, TrainError};
pub use examples::{encode, prepare, Encoded, Overflow, Prepared};
pub use lora::{Adapter, LoraSpec};
pub use optim::{AdamW, AdamWConfig};
pub use run::{register, run, DataSource, Job, JobResult, Stores};
pub use train::{train, Progress, RunInputs, TrainSettings, TrainingRecord};
