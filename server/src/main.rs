//! `retune` command line: `generate` (one prompt, chat template applied) and
//! `bench` (engine throughput; see BENCHMARKS.md).

use anyhow::{bail, Context, Result};
use retune_engine::{
    load, ChatMessage, Engine, EngineConfig, Event, GenerateRequest, SamplingParams,
};
use std::io::Write;
use std::path::PathBuf;

mod adapters_cli;
mod bench;
mod bench_device;

const USAGE: &str = "usage:
  retune generate --model PATH [--max-tokens N] [--temperature T] [--seed S] [--system TEXT] [--threads N] [--raw] PROMPT
  retune serve --config FILE   (settings: TOML + RETUNE_SECTION__KEY env overrides)
  retune serve --model PATH    (embedded defaults: 127.0.0.1:8080, API key `local`)
  retune adapters --root DIR list|show|register|promote|rollback|canary|retire|gc ...
  retune bench --model PATH [--llama-bench PATH] [--decode-tokens N] [--lora [--keep-adapters DIR]]
  retune bench-device --model PATH [--device cuda] [--dtype bf16] [--weights dense|quantized] [--streams 64]
      [--prompt-tokens 128] [--decode-tokens 128] [--adapters-dir DIR --distinct 0,1,16,100] [--json FILE]
  retune check-device --model GGUF [--device cuda] [--dtype f32] [--prompts FIXTURE] [--tokens 32] [--adapter DIR]";

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != name);
        before != self.rest.len()
    }
    fn opt(&mut self, name: &str) -> Result<Option<String>> {
        match self.rest.iter().position(|a| a == name) {
            Some(i) if i + 1 < self.rest.len() => {
                let v = self.rest.remove(i + 1);
                self.rest.remove(i);
                Ok(Some(v))
            }
            Some(_) => bail!("{name} needs a value\n{USAGE}"),
            None => Ok(None),
        }
    }
    fn parsed<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.opt(name)?
            .map(|v| {
                v.parse::<T>()
                    .with_context(|| format!("bad value for {name}"))
            })
            .transpose()
    }
}

fn main() -> Result<()> {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        bail!("{USAGE}");
    }
    let cmd = argv.remove(0);
    let mut args = Args { rest: argv };
    match cmd.as_str() {
        "generate" => generate(&mut args),
        "bench" => bench::run(&mut args),
        "bench-device" => bench_device::run_bench(&mut args),
        "check-device" => bench_device::run_check(&mut args),
        "adapters" => adapters_cli::run(&mut args),
        "serve" => serve(&mut args),
        _ => bail!("unknown command `{cmd}`\n{USAGE}"),
    }
}

fn serve(args: &mut Args) -> Result<()> {
    let settings = match (args.opt("--config")?, args.opt("--model")?) {
        (Some(path), _) => {
            retune_config::Settings::load(std::path::Path::new(&path), std::env::vars())?
        }
        // embedded defaults: the model, local port 8080, no tenants but an open local key
        (None, Some(model)) => {
            let toml = format!(
                "[model]\npath = {model:?}\nid = \"smollm2-135m-instruct\"\n[[tenants]]\nname = \"local\"\nkey_sha256 = [\"{}\"]\n",
                retune_server::auth::hash_key("local")
            );
            retune_config::Settings::from_toml(&toml, std::env::vars())?
        }
        (None, None) => bail!("serve needs --config FILE or --model PATH\n{USAGE}"),
    };
    let app = retune_server::Application::build(settings)?;
    eprintln!("retune listening on port {}", app.port());
    actix_web::rt::System::new().block_on(app.run_until_stopped())?;
    Ok(())
}

fn model_path(args: &mut Args) -> Result<PathBuf> {
    match args.opt("--model")? {
        Some(p) => Ok(PathBuf::from(p)),
        None => bail!("--model PATH is required\n{USAGE}"),
    }
}

fn generate(args: &mut Args) -> Result<()> {
    let path = model_path(args)?;
    let raw = args.flag("--raw");
    let max_tokens = args.parsed::<usize>("--max-tokens")?.unwrap_or(128);
    let temperature = args.parsed::<f32>("--temperature")?.unwrap_or(0.0);
    let seed = args.parsed::<u64>("--seed")?;
    let system = args.opt("--system")?;
    let threads = args.parsed::<usize>("--threads")?.unwrap_or(0);
    let prompt = args.rest.join(" ");
    if prompt.is_empty() {
        bail!("a PROMPT is required\n{USAGE}");
    }
    let loaded = load(&path).with_context(|| format!("loading {}", path.display()))?;
    let text = if raw {
        prompt
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(ChatMessage::new("system", &s));
        }
        msgs.push(ChatMessage::new("user", &prompt));
        loaded.template.render(&msgs, true)?
    };
    let ids = loaded.tok.encode(&text, true)?;
    let engine = Engine::start(
        loaded.model,
        loaded.tok,
        EngineConfig {
            threads,
            ..EngineConfig::default()
        },
    )?;
    let params = SamplingParams {
        temperature,
        seed,
        ..SamplingParams::greedy(max_tokens)
    };
    let start = std::time::Instant::now();
    let mut stream = engine.submit(GenerateRequest::new(ids.clone(), params))?;
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
                    "[{} prompt tokens, {} generated, finish {:?}, first token {:.0} ms, decode {:.1} tok/s]",
                    c.prompt_tokens,
                    c.completion_tokens,
                    c.finish,
                    ttft.as_secs_f64() * 1e3,
                    (c.completion_tokens.saturating_sub(1)) as f64 / decode.max(1e-9)
                );
                return Ok(());
            }
            Event::Error(e) => bail!("generation failed: {e}"),
        }
    }
    bail!("engine stopped")
}
