//! `retune-bench`: the engine's benchmarks and the device check, apart from the
//! server binary. Results and how to read them: BENCHMARKS.md, docs/gpu.md.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod adapters;
mod datasets;
mod device;
mod engine;
mod prefix;
mod stores;

#[derive(Parser)]
#[command(
    name = "retune-bench",
    version,
    about = "retune's benchmarks and device check"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill, decode at 1/8/32/64 streams, multi-LoRA decode and RSS of the CPU
    /// engine; ratios against llama.cpp's llama-bench when given.
    Engine(engine::EngineArgs),
    /// The tensor backend (GPU with a cuda build): TTFT, inter-token latency and
    /// decode tok/s with 0..k distinct adapters against the memory-traffic bound.
    Device(device::DeviceArgs),
    /// Greedy decoding of the llama.cpp fixture prompts on the tensor backend vs the
    /// native CPU engine, step by step; non-zero exit on an unexplained divergence.
    CheckDevice(device::CheckArgs),
    /// The prefix cache: a classification workload (one long system prompt) and
    /// one without shared prefixes, each with the cache off and on.
    Prefix(prefix::PrefixArgs),
    /// Adapters at scale: cold loads (compute form vs PEFT files) and Zipf
    /// requests over many adapters against 8.
    Adapters(adapters::AdaptersArgs),
    /// The examples store: import rows/s, snapshot time, durable feedback writes/s.
    Datasets(datasets::DatasetsArgs),
    /// The shared PostgreSQL stores against SQLite: promotion-to-served latency
    /// and the per-request overhead on serving (the `retune` binary, 32 streams).
    Stores(stores::StoresArgs),
}

fn main() -> ExitCode {
    retune_engine::cpu::require_build_features();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Engine(a) => engine::run(a),
        Command::Device(a) => device::run_bench(a),
        Command::CheckDevice(a) => device::run_check(a),
        Command::Datasets(a) => datasets::run(a),
        Command::Prefix(a) => prefix::run(a),
        Command::Adapters(a) => adapters::run(a),
        Command::Stores(a) => stores::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
