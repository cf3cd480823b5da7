//! `retune-bench prefix`: the prefix cache on a classification workload (one
//! system prompt listing the Banking77 labels, short user messages from the
//! dataset, N concurrent streams) and on a workload with no shared prefixes,
//! each run with the cache off and on in the same process, one after the
//! other. Prints time to first token, throughput, and whether the outputs of
//! the two runs are the same tokens.

use anyhow::{bail, Context, Result};
use retune_engine::{
    load, Backend, ChatMessage, Engine, EngineConfig, Event, PrefixConfig, SamplingParams,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct PrefixArgs {
    /// The model (GGUF file or HF safetensors directory).
    #[arg(long)]
    model: PathBuf,
    /// The Banking77 directory (`categories.json`, `train.csv`).
    #[arg(long, default_value = "../shared/data/banking77")]
    data: PathBuf,
    /// Concurrent streams.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Requests per run.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Tokens of each prompt of the workload without shared prefixes.
    #[arg(long, default_value_t = 256)]
    distinct_tokens: usize,
    /// Only the workload without shared prefixes.
    #[arg(long)]
    distinct_only: bool,
    /// Runs of each setting, alternating which goes first; the run of median
    /// wall time of each setting is reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

struct RunStats {
    wall: f64,
    ttft: Vec<f64>,
    outputs: Vec<Vec<u32>>,
    generated: usize,
    cached: usize,
    prompt: usize,
}

/// Run `prompts` through `engine` keeping `streams` in flight.
fn drive(
    engine: &Engine,
    prompts: &[Vec<u32>],
    streams: usize,
    max_tokens: usize,
) -> Result<RunStats> {
    let params = SamplingParams {
        stop_on_eos: false,
        ..SamplingParams::greedy(max_tokens)
    };
    let start = Instant::now();
    let mut next = 0;
    let mut open = VecDeque::new();
    let mut out = RunStats {
        wall: 0.0,
        ttft: Vec::new(),
        outputs: vec![Vec::new(); prompts.len()],
        generated: 0,
        cached: 0,
        prompt: 0,
    };
    while next < prompts.len() || !open.is_empty() {
        while open.len() < streams && next < prompts.len() {
            let v = engine.validate(prompts[next].clone(), params.clone(), None)?;
            open.push_back((next, engine.submit(v)?));
            next += 1;
        }
        let Some((i, mut s)) = open.pop_front() else {
            break;
        };
        loop {
            match s.blocking_next() {
                Some(Event::Token(_)) => {}
                Some(Event::Done(c)) => {
                    out.ttft.push(c.timings.first_token.as_secs_f64());
                    out.generated += c.output.len();
                    out.cached += c.cached_tokens;
                    out.prompt += c.prompt.len();
                    out.outputs[i] = c.output;
                    break;
                }
                Some(Event::Error(e)) => bail!("{e}"),
                None => bail!("stream ended"),
            }
        }
    }
    out.wall = start.elapsed().as_secs_f64();
    Ok(out)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn engine_with(model: &PathBuf, streams: usize, cache: bool) -> Result<Engine> {
    let loaded = load(model)?;
    let cfg = EngineConfig {
        max_batch: streams,
        max_queue: streams * 4,
        prefix_cache: if cache {
            PrefixConfig::default()
        } else {
            PrefixConfig {
                max_tokens: 0,
                ..PrefixConfig::default()
            }
        },
        ..EngineConfig::default()
    };
    Ok(Engine::start(loaded.model, loaded.tok, cfg)?.with_template(loaded.template))
}

/// Both settings of one workload: (off, on), each the run of median wall
/// time over `rounds` runs, the order alternating between rounds.
fn compare(a: &PrefixArgs, name: &str, prompts: &[Vec<u32>]) -> Result<(RunStats, RunStats)> {
    let mut runs: [Vec<RunStats>; 2] = [Vec::new(), Vec::new()];
    for round in 0..a.rounds.max(1) {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for cache in order {
            let engine = engine_with(&a.model, a.streams, cache)?;
            // the same warm-up on both: one request with another workload's prompt
            drive(&engine, &[vec![1, 2, 3, 4, 5, 6, 7, 8]], 1, 2)?;
            let r = drive(&engine, prompts, a.streams, a.max_tokens)?;
            eprintln!(
                "{name}, cache {}: {:.1} s, {} prompt tokens, {} from the cache",
                if cache { "on" } else { "off" },
                r.wall,
                r.prompt,
                r.cached
            );
            runs[usize::from(cache)].push(r);
        }
    }
    let [mut off, mut on] = runs;
    let median = |v: &mut Vec<RunStats>| -> Result<RunStats> {
        v.sort_by(|x, y| x.wall.total_cmp(&y.wall));
        let mid = v.len() / 2;
        Ok(v.swap_remove(mid))
    };
    Ok((median(&mut off)?, median(&mut on)?))
}

fn report(name: &str, a: &PrefixArgs, off: &RunStats, on: &RunStats) {
    let same = off.outputs == on.outputs;
    let tput = |r: &RunStats| r.ttft.len() as f64 / r.wall;
    println!("\n**{name}** ({} requests, {} streams, {} tokens each; outputs with and without the cache identical: {})\n", a.requests, a.streams, a.max_tokens, if same { "yes" } else { "NO" });
    println!("| metric | cache off | cache on | ratio |\n|---|---|---|---|");
    let row = |m: &str, x: f64, y: f64, better_low: bool| {
        let r = if better_low { x / y } else { y / x };
        println!("| {m} | {x:.3} | {y:.3} | {r:.2}x |");
    };
    row(
        "time to first token p50, s",
        pct(&off.ttft, 0.5),
        pct(&on.ttft, 0.5),
        true,
    );
    row(
        "time to first token p99, s",
        pct(&off.ttft, 0.99),
        pct(&on.ttft, 0.99),
        true,
    );
    row("requests/s", tput(off), tput(on), false);
    row(
        "generated tok/s",
        off.generated as f64 / off.wall,
        on.generated as f64 / on.wall,
        false,
    );
    println!(
        "| prompt tokens from the cache | {} of {} | {} of {} | |",
        off.cached, off.prompt, on.cached, on.prompt
    );
}

pub fn run(a: &PrefixArgs) -> Result<()> {
    let labels: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(a.data.join("categories.json")).context("categories.json")?,
    )?;
    let texts: Vec<String> = std::fs::read_to_string(a.data.join("train.csv"))
        .context("train.csv")?
        .lines()
        .skip(1)
        .filter_map(|l| {
            l.rsplit_once(',')
                .map(|(t, _)| t.trim_matches('"').to_string())
        })
        .step_by(97)
        .take(a.requests)
        .collect();
    if texts.len() < a.requests {
        bail!("only {} messages in the data", texts.len());
    }
    let loaded = load(&a.model)?;
    let system = format!(
        "You are the ticket router of a bank's support desk. Read the customer's message and \
         answer with exactly one label from this list, and nothing else. Labels: {}. If several \
         labels seem to fit, choose the one that names the customer's main problem. Never invent \
         a label, never explain.",
        labels.join(", ")
    );
    let mut prompts = Vec::new();
    for t in &texts {
        let msgs = [
            ChatMessage::new("system", &system),
            ChatMessage::new("user", t),
        ];
        let text = loaded.template.render(&msgs, true)?;
        prompts.push(loaded.tok.encode(&text, true)?);
    }
    let sys_tokens = prompts.iter().map(Vec::len).min().unwrap_or(0);
    eprintln!(
        "classification prompts: {} to {} tokens",
        sys_tokens,
        prompts.iter().map(Vec::len).max().unwrap_or(0)
    );
    let vocab = loaded.model.cfg.vocab as u32;
    drop(loaded);
    println!(
        "retune-bench prefix: {}; CPU: {}",
        a.model.display(),
        retune_engine::cpu::describe()
    );
    if !a.distinct_only {
        let (off, on) = compare(a, "classification", &prompts)?;
        report(
        &format!(
            "Classification: one system prompt with the 77 labels, Banking77 messages, prompts of {}–{} tokens",
            sys_tokens,
            prompts.iter().map(Vec::len).max().unwrap_or(0)
        ),
        a,
        &off,
        &on,
    );
    }
    // no shared prefix: every prompt differs from its first token
    let distinct: Vec<Vec<u32>> = (0..a.requests)
        .map(|i| {
            (0..a.distinct_tokens)
                .map(|j| ((i * 7919 + j * 104_729 + 13) as u32) % (vocab - 200) + 100)
                .collect()
        })
        .collect();
    let (off, on) = compare(a, "distinct", &distinct)?;
    report(
        &format!(
            "No shared prefixes: {}-token prompts, each distinct",
            a.distinct_tokens
        ),
        a,
        &off,
        &on,
    );
    Ok(())
}
