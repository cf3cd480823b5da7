//! retune-adapters
