//! Real servers for tests and benchmarks, never in a product build: a fresh
//! PostgreSQL database per test ([`pg`]) and an S3-compatible server per test
//! ([`s3`]). Only tests, `retune-bench` and dev-dependencies use this crate.

pub mod pg;
pub mod s3;
