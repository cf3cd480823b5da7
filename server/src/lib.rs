//! retune-server
