//! retune-config
