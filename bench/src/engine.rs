//! `retune-bench engine`: prefill, single-stream decode, aggregate decode at 8/32/64
//! concurrent sequences and peak RSS on one model; optionally runs llama.cpp's
//! `llama-bench -t 2` on the same GGUF in the same run and prints ratios.

use anyhow::{bail, Context, Result};
use retune_adapters::{AdapterRef, Via};
use retune_engine::{load, Backend, Engine, EngineConfig, Event, GenerateRequest, SamplingParams};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The adapter in directory `name` of a `DirSource`.
pub(crate) fn bench_adapter(name: &str) -> Result<AdapterRef> {
    Ok(AdapterRef::new("bench", name, "v1", Via::Pinned)?)
}

pub(crate) fn req(prompt: Vec<u32>, n: usize) -> GenerateRequest {
    GenerateRequest::new(
        prompt,
        SamplingParams {
            stop_on_eos: false,
            ..SamplingParams::greedy(n)
        },
    )
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// (seconds to first token, seconds for the rest, tokens)
fn timed(engine: &Engine, r: GenerateRequest) -> Result<(f64, f64, usize)> {
    let start = Instant::now();
    let mut s = engine.generate(r)?;
    let mut first = None;
    let mut n = 0;
    while let Some(ev) = s.blocking_next() {
        match ev {
            Event::Token(_) => {
                n += 1;
                first.get_or_insert_with(|| start.elapsed().as_secs_f64());
            }
            Event::Done(_) => break,
            Event::Error(e) => bail!("{e}"),
        }
    }
    let total = start.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    Ok((ttft, total - ttft, n))
}

/// N concurrent greedy streams. Returns (decode tok/s, end-to-end tok/s): decode
/// counts the engine's generated tokens between the moment every stream has its
/// first token (all prefills done) and the last token; end-to-end is all tokens
/// over the whole wall time, prefill included.
fn aggregate(engine: &Engine, n: usize, tokens: usize) -> Result<(f64, f64)> {
    let reqs = (0..n).map(|i| req(prompt16(i), tokens)).collect();
    aggregate_reqs(engine, reqs)
}

/// A distinct 16-token prompt per stream.
fn prompt16(i: usize) -> Vec<u32> {
    (0..16)
        .map(|j| (100 + i * 37 + j * 11) as u32 % 40_000 + 50)
        .collect()
}

fn aggregate_reqs(engine: &Engine, reqs: Vec<GenerateRequest>) -> Result<(f64, f64)> {
    let generated = || engine.stats().generated_tokens;
    let start = Instant::now();
    let mut streams: Vec<_> = reqs
        .into_iter()
        .map(|r| engine.generate(r))
        .collect::<std::result::Result<_, _>>()?;
    let mut total = 0;
    for s in streams.iter_mut() {
        match s.blocking_next() {
            Some(Event::Token(_)) => total += 1,
            other => bail!("stream ended before its first token: {other:?}"),
        }
    }
    let (t0, g0) = (Instant::now(), generated());
    for mut s in streams {
        while let Some(ev) = s.blocking_next() {
            match ev {
                Event::Token(_) => total += 1,
                Event::Done(_) => break,
                Event::Error(e) => bail!("{e}"),
            }
        }
    }
    let decode = (generated() - g0) as f64 / t0.elapsed().as_secs_f64();
    Ok((decode, total as f64 / start.elapsed().as_secs_f64()))
}

/// llama-bench's average tok/s for pp512 and tg128.
fn llama_bench(bin: &Path, model: &Path) -> Result<(f64, f64)> {
    let out = std::process::Command::new(bin)
        .args(["-m", &model.to_string_lossy(), "-t", "2", "-o", "json"])
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "llama-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("llama-bench json")?;
    let mut pp = f64::NAN;
    let mut tg = f64::NAN;
    for t in v.as_array().into_iter().flatten() {
        let ts = t["avg_ts"].as_f64().unwrap_or(f64::NAN);
        if t["n_prompt"].as_u64().unwrap_or(0) > 0 && t["n_gen"].as_u64() == Some(0) {
            pp = ts;
        } else if t["n_gen"].as_u64().unwrap_or(0) > 0 {
            tg = ts;
        }
    }
    Ok((pp, tg))
}

/// `retune-bench engine`: the native CPU engine against llama.cpp on one GGUF.
#[derive(clap::Args)]
pub struct EngineArgs {
    /// The model (GGUF file or HF safetensors directory).
    #[arg(long)]
    model: PathBuf,
    /// llama.cpp's `llama-bench` binary, run on the same model in the same run.
    #[arg(long, env = "LLAMA_BENCH")]
    llama_bench: Option<String>,
    /// Tokens decoded per stream.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Also measure multi-LoRA decode (64 synthetic adapters per shape).
    #[arg(long)]
    lora: bool,
    /// Measure prefill and decode on every kernel path this machine has
    /// (AVX2, AVX-512, AVX-512 VNNI), one after the other in this process, instead of the
    /// full table.
    #[arg(long)]
    all_kernels: bool,
    /// Alternate retune's single-stream decode and prefill with `llama-bench`
    /// this many times (needs --llama-bench) and report each round's ratios
    /// and their medians, instead of the full table: one llama-bench run
    /// moves by ±15% on this machine kind.
    #[arg(long)]
    alternate: Option<usize>,
    /// Keep the synthetic adapters in this directory (with --lora).
    #[arg(long)]
    keep_adapters: Option<PathBuf>,
}

pub fn run(args: &EngineArgs) -> Result<()> {
    let path = args.model.clone();
    let llama = args.llama_bench.clone();
    let decode_tokens = args.decode_tokens;
    let lora = args.lora;
    let keep_adapters = args.keep_adapters.clone();
    let loaded = load(&path)?;
    let vocab = loaded.model.cfg.vocab as u32;
    // the prompt repeats: with the prefix cache on, prefill would measure the cache
    let cfg = EngineConfig {
        prefix_cache: retune_engine::PrefixConfig {
            max_tokens: 0,
            ..Default::default()
        },
        ..EngineConfig::default()
    };
    let prompt: Vec<u32> = (0..512u32)
        .map(|i| (i * 7919) % (vocab - 100) + 50)
        .collect();
    if args.all_kernels {
        // an engine of its own per path
        drop(loaded);
        return compare_kernels(&prompt, decode_tokens, llama.as_deref(), &path);
    }
    let engine = Engine::start(loaded.model, loaded.tok, cfg)?;
    // warm-up
    timed(&engine, req(prompt[..64].to_vec(), 8))?;
    if let Some(rounds) = args.alternate {
        let Some(b) = &llama else {
            bail!("--alternate needs --llama-bench (or LLAMA_BENCH)");
        };
        return alternate(&engine, &prompt, decode_tokens, Path::new(b), &path, rounds);
    }
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..3 {
        let (ttft, _, _) = timed(&engine, req(prompt.clone(), 1))?;
        pp.push(512.0 / ttft);
        let (_, rest, n) = timed(&engine, req(prompt[..16].to_vec(), decode_tokens))?;
        tg.push((n - 1) as f64 / rest);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (pp, tg) = (med(&mut pp), med(&mut tg));
    println!("| metric | retune | llama.cpp | ratio |\n|---|---|---|---|");
    let theirs = match &llama {
        Some(b) => Some(llama_bench(Path::new(b), &path)?),
        None => None,
    };
    let row = |name: &str, ours: f64, peer: Option<f64>| match peer {
        Some(p) => println!("| {name} | {ours:.1} | {p:.1} | {:.2}x |", ours / p),
        None => println!("| {name} | {ours:.1} | – | – |"),
    };
    row("prefill tok/s (512-token prompt)", pp, theirs.map(|t| t.0));
    row("decode tok/s, 1 stream", tg, theirs.map(|t| t.1));
    for n in [8, 32, 64] {
        let (decode, e2e) = aggregate(&engine, n, 128)?;
        println!(
            "| aggregate decode tok/s, {n} streams | {decode:.1} | | {:.2}x single |",
            decode / tg
        );
        println!(
            "| end-to-end tok/s, {n} streams (16-token prompts, 128 tokens each) | {e2e:.1} | | |"
        );
    }
    println!("| peak RSS MB | {:.0} | | |", peak_rss_mb());
    if lora {
        drop(engine);
        lora_bench(&path, decode_tokens, keep_adapters)?;
    }
    Ok(())
}

/// Prefill, single-stream and 32-stream decode on each kernel path, in turns
/// (path A, path B, path A, ...), medians over 3 turns each.
fn compare_kernels(
    prompt: &[u32],
    decode_tokens: usize,
    llama: Option<&str>,
    model: &Path,
) -> Result<()> {
    use retune_engine::kernels_f32::{available_paths, Kernels};
    println!("{}", retune_engine::cpu::describe());
    let paths = available_paths();
    // an engine per path, its model loaded for that path and warmed on it:
    // the int8 paths pack the weights in their own layouts (the grouped one
    // for AVX2 int8); each model runs the kernels of its own path
    let cfg = || EngineConfig {
        prefix_cache: retune_engine::PrefixConfig {
            max_tokens: 0,
            ..Default::default()
        },
        ..EngineConfig::default()
    };
    let mut engines = Vec::new();
    for p in &paths {
        let mut loaded = load(model)?;
        loaded
            .model
            .set_kernels(Kernels::new(*p).map_err(anyhow::Error::msg)?);
        let e = Engine::start(loaded.model, loaded.tok, cfg())?;
        timed(&e, req(prompt[..64].to_vec(), 8))?;
        engines.push(e);
    }
    let mut res: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); paths.len()];
    for _ in 0..3 {
        for (i, _) in paths.iter().enumerate() {
            let engine = &engines[i];
            let (ttft, _, _) = timed(engine, req(prompt.to_vec(), 1))?;
            res[i].0.push(prompt.len() as f64 / ttft);
            let (_, rest, n) = timed(engine, req(prompt[..16].to_vec(), decode_tokens))?;
            res[i].1.push((n - 1) as f64 / rest);
            let (decode, _) = aggregate(engine, 32, 64)?;
            res[i].2.push(decode);
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let theirs = match llama {
        Some(b) => Some(llama_bench(Path::new(b), model)?),
        None => None,
    };
    println!("\n| kernel path | prefill tok/s (512) | decode tok/s, 1 stream | aggregate decode tok/s, 32 streams |\n|---|---|---|---|");
    for (p, r) in paths.iter().zip(&res) {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} |",
            p.name(),
            med(&r.0),
            med(&r.1),
            med(&r.2)
        );
    }
    if let Some((pp, tg)) = theirs {
        println!("| llama.cpp (llama-bench, same run) | {pp:.1} | {tg:.1} | |");
    }
    Ok(())
}

/// Rounds of (retune, then llama-bench): prefill 512 and single-stream decode
/// each, the ratio per round, and the medians.
fn alternate(
    engine: &Engine,
    prompt: &[u32],
    decode_tokens: usize,
    llama: &Path,
    model: &Path,
    rounds: usize,
) -> Result<()> {
    println!("{}", retune_engine::cpu::describe());
    println!("\n| round | retune prefill tok/s | llama.cpp prefill | ratio | retune decode tok/s | llama.cpp decode | ratio |\n|---|---|---|---|---|---|---|");
    let (mut pr, mut dr) = (Vec::new(), Vec::new());
    for i in 0..rounds.max(1) {
        let (ttft, _, _) = timed(engine, req(prompt.to_vec(), 1))?;
        let pp = prompt.len() as f64 / ttft;
        let (_, rest, n) = timed(engine, req(prompt[..16].to_vec(), decode_tokens))?;
        let tg = (n - 1) as f64 / rest;
        let (lpp, ltg) = llama_bench(llama, model)?;
        pr.push(pp / lpp);
        dr.push(tg / ltg);
        println!(
            "| {} | {pp:.1} | {lpp:.1} | {:.2}x | {tg:.1} | {ltg:.1} | {:.2}x |",
            i + 1,
            pp / lpp,
            tg / ltg
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lo, hi) = (
        dr.iter().copied().fold(f64::INFINITY, f64::min),
        dr.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "\nmedian ratios: prefill {:.2}x, decode {:.2}x (decode range {lo:.2}x to {hi:.2}x)",
        med(&mut pr),
        med(&mut dr)
    );
    Ok(())
}

/// Bytes a base-only decode step reads: every projection once plus the output layer.
fn base_bytes(m: &retune_engine::Model) -> usize {
    use retune_engine::linear::{Linear, Weight};
    let size = |l: &Linear| match &l.weight {
        Weight::Blocks { data, .. } | Weight::KBlocks { data, .. } => data.len(),
        Weight::Packed { packed, .. } => packed.data.len(),
        Weight::F32(w) => w.len() * 4,
        Weight::Candle(_) => 0,
    };
    let layers: usize = m
        .layers
        .iter()
        .map(|l| {
            [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                .iter()
                .map(|x| size(x))
                .sum::<usize>()
        })
        .sum();
    layers + size(m.lm_head.as_ref().unwrap_or(&m.embed))
}

/// 64 streams over 0/1/8/64 distinct adapters, against the memory-traffic bound.
fn lora_bench(path: &Path, tokens: usize, keep: Option<PathBuf>) -> Result<()> {
    use retune_adapters::{AdapterPool, DirSource, PoolConfig};
    let loaded = load(path)?;
    let shapes = loaded.model.base_shapes();
    let base = base_bytes(&loaded.model);
    let root = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("retune-lora-bench-{}", std::process::id()))
    });
    let shapes_list: [(&str, usize, &[usize]); 2] = [
        ("r16-all7", 16, &[0, 1, 2, 3, 4, 5, 6]),
        ("r8-qv", 8, &[0, 2]),
    ];
    for (name, rank, modules) in shapes_list {
        for i in 0..64 {
            retune_engine::tiny::write_random_adapter(
                &root.join(format!("{name}-{i}")),
                &shapes,
                rank,
                modules,
                i as u64,
                2.0 * rank as f32,
                0.02,
            )?;
        }
    }
    let pool = AdapterPool::new(
        Arc::new(DirSource { root: root.clone() }),
        shapes,
        PoolConfig {
            max_adapters: 256,
            max_bytes: 8 << 30,
            ..PoolConfig::default()
        },
    );
    let engine = Engine::start_with_pool(
        loaded.model,
        loaded.tok,
        EngineConfig::default(),
        Some(pool.clone()),
    )?;
    // cold loads from local disk (page cache warm from writing them), per adapter shape
    let mut cold = Vec::new();
    for (name, _, _) in shapes_list {
        let before = pool.stats().loads.load(Ordering::Relaxed);
        let mut lat = Vec::new();
        for i in 0..64 {
            let h = bench_adapter(&format!("{name}-{i}"))?;
            let t1 = Instant::now();
            while matches!(pool.acquire(&h), retune_adapters::Acquire::Pending) {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
            lat.push(t1.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        let loads = pool.stats().loads.load(Ordering::Relaxed) - before;
        cold.push((name, lat[lat.len() / 2], lat[(lat.len() * 99) / 100], loads));
    }
    println!(
        "\n| adapters (64 streams) | decode tok/s | bound tok/s | vs bound | end-to-end tok/s |\n|---|---|---|---|---|"
    );
    let streams = 64;
    let run = |name: &str, distinct: usize| -> Result<(f64, f64)> {
        let reqs: Vec<GenerateRequest> = (0..streams)
            .map(|i| {
                let mut r = req(prompt16(i), tokens);
                r.adapter = match distinct {
                    0 => None,
                    d => Some(bench_adapter(&format!("{name}-{}", i % d))?),
                };
                Ok(r)
            })
            .collect::<Result<_>>()?;
        aggregate_reqs(&engine, reqs)
    };
    let (base_tps, base_e2e) = run("", 0)?;
    println!("| base only | {base_tps:.1} | {base_tps:.1} | 1.00x | {base_e2e:.1} |");
    for (name, rank, modules) in shapes_list {
        let a = pool.acquire(&bench_adapter(&format!("{name}-0"))?);
        let abytes = match a {
            retune_adapters::Acquire::Ready(a) => a.bytes,
            _ => 0,
        };
        for distinct in [1, 8, 64] {
            let (tps, e2e) = run(name, distinct)?;
            let bound = base_tps * base as f64 / (base + distinct * abytes) as f64;
            println!(
                "| {name} (r={rank}, {} modules), {distinct} distinct | {tps:.1} | {bound:.1} | {:.2}x | {e2e:.1} |",
                modules.len(),
                tps / bound
            );
        }
        println!("| {name}: resident bytes per adapter | {abytes} | | |");
    }
    println!("| base bytes read per decode step | {base} | | |");
    for (name, p50, p99, loads) in cold {
        println!("| {name}: cold load p50 / p99 ({loads} loads, page cache warm) | {p50:.2} ms / {p99:.2} ms | | |");
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
