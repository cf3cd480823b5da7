use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The training data cannot be trained on (too few examples, none left after
    /// the length limit, an empty snapshot): the caller's input.
    #[error("training data: {0}")]
    Data(String),
    /// A setting out of range or inconsistent with the model.
    #[error("setting: {0}")]
    Setting(String),
    /// The adapter, snapshot or checkpoint was made for a different base model.
    #[error("base mismatch: {0}")]
    BaseMismatch(String),
    /// The loss or a gradient became NaN/Inf; parameters were not updated by that step.
    #[error(
        "non-finite {what} at step {step}; stopped, last good state {}",
        .checkpoint.as_ref().map(|p| format!("saved to {}", p.display())).unwrap_or_else(|| "not saved".into())
    )]
    NonFinite {
        what: &'static str,
        step: usize,
        checkpoint: Option<PathBuf>,
    },
    /// The caller stopped the run; its state is in the checkpoint (resume continues it).
    #[error(
        "interrupted after step {step}; {}",
        .checkpoint.as_ref().map(|p| format!("checkpoint in {}", p.display())).unwrap_or_else(|| "no checkpoint directory".into())
    )]
    Interrupted {
        step: usize,
        checkpoint: Option<PathBuf>,
    },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] retune_engine::EngineError),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Adapter(#[from] retune_adapters::AdapterError),
    #[error(transparent)]
    Registry(#[from] retune_registry::RegistryError),
    #[error(transparent)]
    Datasets(#[from] retune_datasets::DataError),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}
