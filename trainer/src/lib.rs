//! retune-trainer
