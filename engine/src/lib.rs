//! retune's inference engine: llama-family and Gemma 3 models from GGUF or HF safetensors,
//! quantized CPU kernels, tokenizer and chat template, sampling, and a
//! continuous-batching scheduler on its own compute threads.

pub mod backend;
pub mod chat;
pub mod cpu;
pub mod device;
pub mod error;
pub mod fairness;
pub mod family;
pub mod gguf;
pub mod guide;
pub mod kernels;
pub mod kernels_f32;
pub mod kernels_q8;
pub mod kquants;
pub mod kv;
pub mod linear;
pub mod load;
pub mod lora;
pub mod model;
pub mod prefix;
pub mod safetensors;
pub mod sampler;
pub mod scheduler;
pub mod stream;
pub mod team;
#[cfg(feature = "test-utils")]
pub mod testing;
#[cfg(feature = "test-utils")]
pub mod tiny;
pub mod tokenizer;

pub use backend::{
    Backend, BackendStats, Completion, ErrorKind, Event, EventSender, FinishReason, GenError,
    GenerationStream, Health, PrefixCounters, Timings, TokenEvent, ValidRequest,
};
pub use chat::{ChatMessage, ChatTemplate, Rendered};
pub use device::{
    grad_of, smoothed_nll, weighted_nll, Cache, Compute, DeviceModel, DeviceOptions, Dropout,
    LoraParam, Mode, TrainBatch, TrainLora, WeightMode,
};
pub use error::{EngineError, Result};
pub use load::{load, Loaded};
pub use model::{Arch, BatchItem, Model, ModelConfig};
pub use prefix::{PrefixConfig, PrefixStats};
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::{Engine, EngineConfig, GenerateRequest, Generated};
pub use tokenizer::Tok;
