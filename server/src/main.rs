//! `retune`: serve the OpenAI API, generate from one prompt, manage the adapter
//! registry. Benchmarks live in the `retune-bench` binary.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use retune_engine::SamplingParams;
use retune_engine::{load, Backend, ChatMessage, Engine, EngineConfig, Event};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod adapters_cli;
mod data_cli;

const EXIT_CODES: &str = "Exit codes:
  0  success
  1  runtime failure: bad settings (the message names the key), model load, bind, registry, generation
  2  usage error: unknown command or flag, missing or malformed argument";

#[derive(Parser)]
#[command(
    name = "retune",
    version,
    about = "One base LLM, many LoRA adapters per request and tenant: the OpenAI API server",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (and the admin API) until SIGTERM/SIGINT.
    #[command(after_help = EXIT_CODES)]
    Serve(ServeArgs),
    /// Generate from one prompt on the CPU engine (the chat template is applied unless --raw).
    #[command(after_help = EXIT_CODES)]
    Generate(GenerateArgs),
    /// The adapter registry: list, show, register, promote, rollback, canary, retire, gc.
    #[command(after_help = EXIT_CODES)]
    Adapters(adapters_cli::AdaptersArgs),
    /// The datasets store: import, export, snapshot, show, list, erase.
    #[command(after_help = EXIT_CODES)]
    Data(data_cli::DataArgs),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ServeArgs {
    /// Settings file (TOML); RETUNE_<SECTION>__<KEY> environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve this model on embedded defaults: 127.0.0.1:8080, one tenant `local` with API key `local`.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The model: a GGUF file or an HF safetensors directory.
    #[arg(long)]
    model: PathBuf,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampler (drawn when not given; printed at the end).
    #[arg(long)]
    seed: Option<u64>,
    /// A system message before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// Compute threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Feed the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// The prompt (several words are joined with spaces).
    #[arg(required = true)]
    prompt: Vec<String>,
}

fn main() -> ExitCode {
    retune_engine::cpu::require_build_features();
    let cli = Cli::parse(); // usage errors exit 2
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Generate(a) => generate(a),
        Command::Adapters(a) => adapters_cli::run(&a),
        Command::Data(a) => data_cli::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match (args.config, args.model) {
        (Some(path), _) => retune_config::Settings::load(&path, std::env::vars())?,
        // embedded defaults: the model, local port 8080, one tenant with the key `local`
        (None, Some(model)) => {
            let toml = format!(
                "[model]\npath = {:?}\nid = \"smollm2-135m-instruct\"\n[[tenants]]\nname = \"local\"\nkey_sha256 = [\"{}\"]\n",
                model.to_string_lossy(),
                retune_server::auth::hash_key("local")
            );
            retune_config::Settings::from_toml(&toml, std::env::vars())?
        }
        (None, None) => bail!("serve needs --config FILE or --model PATH"),
    };
    let app = retune_server::Application::build(settings)?;
    eprintln!("retune listening on port {}", app.port());
    actix_web::rt::System::new().block_on(app.run_until_stopped())?;
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let prompt = a.prompt.join(" ");
    let loaded = load(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let text = if a.raw {
        prompt
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &prompt));
        loaded.template.render(&msgs, true)?
    };
    let ids = loaded.tok.encode(&text, true)?;
    let engine = Engine::start(
        loaded.model,
        loaded.tok,
        EngineConfig {
            threads: a.threads,
            ..EngineConfig::default()
        },
    )?;
    let params = SamplingParams {
        temperature: a.temperature,
        seed: a.seed,
        ..SamplingParams::greedy(a.max_tokens)
    };
    let start = std::time::Instant::now();
    let valid = engine.validate(ids, params, None)?;
    let mut stream = engine.submit(valid)?;
    let mut out = std::io::stdout().lock();
    let mut first = None;
    while let Some(ev) = stream.blocking_next() {
        match ev {
            Event::Token(t) => {
                first.get_or_insert_with(|| start.elapsed());
                write!(out, "{}", t.text)?;
                out.flush()?;
            }
            Event::Done(c) => {
                writeln!(out, "{}", c.tail)?;
                let total = start.elapsed();
                let ttft = first.unwrap_or(total);
                let decode = (total - ttft).as_secs_f64();
                eprintln!(
                    "[{} prompt tokens, {} generated, finish {:?}, seed {}, first token {:.0} ms, decode {:.1} tok/s]",
                    c.prompt_tokens(),
                    c.completion_tokens(),
                    c.finish,
                    c.seed().unwrap_or_default(),
                    ttft.as_secs_f64() * 1e3,
                    (c.completion_tokens().saturating_sub(1)) as f64 / decode.max(1e-9)
                );
                return Ok(());
            }
            Event::Error(e) => bail!("generation failed: {}", e.message),
        }
    }
    bail!("engine stopped")
}
