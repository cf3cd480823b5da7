//! `retune-bench device`: the tensor backend (GPU with a `cuda` build) at N
//! concurrent streams with 0 and several distinct LoRA adapters, against the
//! memory-traffic bound, plus time to first token and inter-token latency at 1 and
//! N streams. Adapters come from a directory of PEFT adapters (`a0`, `a1`, ...), as
//! `scripts/gpu/make_model.py` writes them, so the transformers+peft peer reads the
//! same files. See docs/gpu.md.

use anyhow::{bail, Context, Result};
use retune_adapters::{Acquire, AdapterPool, DirSource, LoadLimits, PoolConfig};
use retune_engine::device::{build_backend, build_device, parse_dtype, DeviceOptions, WeightMode};
use retune_engine::{load, Backend, Engine, EngineConfig, Event, GenerateRequest};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest |x - y| relative to the range of `x`.
fn rel_diff(x: &[f32], y: &[f32]) -> f32 {
    let range = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    x.iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / range
}

/// (argmax, gap between the top two values)
fn argmax(v: &[f32]) -> (usize, f32) {
    let mut b = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > b.1 {
            b = (i, x, b.1);
        } else if x > b.2 {
            b.2 = x;
        }
    }
    (b.0, b.1 - b.2)
}

struct Run {
    /// generated tokens per second while every stream was decoding
    decode_tps: f64,
    ttft_ms: Vec<f64>,
    /// mean gap between consecutive tokens, per stream
    itl_ms: Vec<f64>,
}

/// Submit all requests at once; one thread per stream records token times.
fn run(engine: &Engine, reqs: Vec<GenerateRequest>) -> Result<Run> {
    let generated = || engine.stats().generated_tokens;
    let start = Instant::now();
    let streams: Vec<_> = reqs
        .into_iter()
        .map(|r| engine.generate(r))
        .collect::<std::result::Result<_, _>>()?;
    let n = streams.len();
    let all_started = std::sync::Barrier::new(n + 1);
    let g0 = std::sync::Mutex::new((Instant::now(), 0usize));
    let results: Vec<Result<(f64, f64)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                let all_started = &all_started;
                sc.spawn(move || -> Result<(f64, f64)> {
                    let mut times = Vec::new();
                    let mut waited = false;
                    let mut fail = None;
                    while let Some(ev) = s.blocking_next() {
                        match ev {
                            Event::Token(_) => {
                                times.push(Instant::now());
                                if !waited {
                                    waited = true;
                                    all_started.wait();
                                }
                            }
                            Event::Done(_) => break,
                            Event::Error(e) => {
                                fail = Some(e);
                                break;
                            }
                        }
                    }
                    if !waited {
                        all_started.wait();
                    }
                    if let Some(e) = fail {
                        bail!("{e}");
                    }
                    let ttft = times
                        .first()
                        .map(|t| t.duration_since(start).as_secs_f64() * 1e3)
                        .unwrap_or(f64::NAN);
                    let itl = match (times.first(), times.last()) {
                        (Some(a), Some(b)) if times.len() > 1 => {
                            b.duration_since(*a).as_secs_f64() * 1e3 / (times.len() - 1) as f64
                        }
                        _ => f64::NAN,
                    };
                    Ok((ttft, itl))
                })
            })
            .collect();
        all_started.wait();
        if let Ok(mut g) = g0.lock() {
            *g = (Instant::now(), generated());
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stream thread panicked")))
            })
            .collect()
    });
    let (t0, gen0) = *g0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let decode_tps = (generated() - gen0) as f64 / t0.elapsed().as_secs_f64();
    let mut ttft_ms = Vec::new();
    let mut itl_ms = Vec::new();
    for r in results {
        let (a, b) = r?;
        ttft_ms.push(a);
        itl_ms.push(b);
    }
    Ok(Run {
        decode_tps,
        ttft_ms,
        itl_ms,
    })
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// `retune-bench device`: the tensor backend at N streams with 0..k distinct adapters.
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// The model (GGUF file or HF safetensors directory).
    #[arg(long)]
    model: PathBuf,
    /// Tensor-backend device: cuda, cuda:N or candle-cpu.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Weight dtype on the device: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Projection weights on the device: dense or quantized (GGUF blocks).
    #[arg(long, default_value = "dense")]
    weights: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 64)]
    streams: usize,
    /// Prompt tokens per stream.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens decoded per stream.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Directory of PEFT adapters a0, a1, ... (needed when --distinct has counts above 0).
    #[arg(long)]
    adapters_dir: Option<PathBuf>,
    /// Comma-separated numbers of distinct adapters to run.
    #[arg(long, default_value = "0,1,16,100", value_delimiter = ',')]
    distinct: Vec<usize>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run_bench(args: &DeviceArgs) -> Result<()> {
    let path = args.model.clone();
    let device = args.device.clone();
    let dtype = parse_dtype(&args.dtype)?;
    let weights = match args.weights.as_str() {
        "dense" => WeightMode::Dense,
        "quantized" => WeightMode::Quantized,
        w => bail!("--weights {w}: dense or quantized"),
    };
    let streams = args.streams;
    let prompt_tokens = args.prompt_tokens;
    let decode_tokens = args.decode_tokens;
    let adapters_dir = args.adapters_dir.clone();
    let distinct = args.distinct.clone();
    let json_out = args.json.clone();
    let max_distinct = distinct.iter().copied().max().unwrap_or(0);
    if max_distinct > 0 && adapters_dir.is_none() {
        bail!("--distinct above 0 needs --adapters-dir DIR (subdirectories a0, a1, ...)");
    }

    let t_load = Instant::now();
    let loaded = load(&path)?;
    let cfg = loaded.model.cfg.clone();
    let shapes = loaded.model.base_shapes();
    let vocab = cfg.vocab;
    // bytes one decode step reads: every projection, the output head, in the dtype
    let per_layer: usize = shapes.dims.iter().map(|(o, i)| o * i).sum();
    let base_bytes = (per_layer * cfg.n_layer + cfg.vocab * cfg.hidden) * dtype.size_in_bytes();
    let limits = LoadLimits::default();
    let mut max_rank = 1;
    let mut adapter_bytes = 0usize;
    if let Some(dir) = &adapters_dir {
        if max_distinct > 0 {
            let a = retune_adapters::load_peft(&dir.join("a0"), &shapes, &limits)
                .with_context(|| format!("loading {}", dir.join("a0").display()))?;
            max_rank = a.max_rank();
            // resident on the device in the model dtype
            adapter_bytes = a.bytes / 4 * dtype.size_in_bytes();
        }
    }
    let opts = DeviceOptions {
        dtype,
        weights,
        slots: streams,
        slot_context: prompt_tokens + decode_tokens + 16,
        adapter_slots: max_distinct.max(1),
        max_rank,
    };
    let backend = build_backend(loaded.model, &device, &opts)?;
    let pool = adapters_dir.as_ref().map(|root| {
        AdapterPool::new(
            Arc::new(DirSource { root: root.clone() }),
            shapes.clone(),
            PoolConfig {
                max_adapters: max_distinct.max(1),
                max_bytes: usize::MAX / 2,
                limits: limits.clone(),
                ..PoolConfig::default()
            },
        )
    });
    let engine = Engine::start_with_pool(
        backend,
        loaded.tok,
        EngineConfig {
            max_batch: streams,
            max_queue: streams * 2,
            prefill_chunk: 2048,
            max_kv_tokens: usize::MAX / 4,
            threads: 0,
            ..EngineConfig::default()
        },
        pool.clone(),
    )?;
    let load_s = t_load.elapsed().as_secs_f64();
    let prompt = |i: usize| -> Vec<u32> {
        (0..prompt_tokens)
            .map(|j| ((i * 7919 + j * 104_729) % (vocab.min(32_000) - 10) + 10) as u32)
            .collect()
    };
    let batch = |n: usize, distinct: usize, tokens: usize| -> Result<Vec<GenerateRequest>> {
        (0..n)
            .map(|i| {
                let mut r = crate::engine::req(prompt(i), tokens);
                r.adapter = match distinct {
                    0 => None,
                    d => Some(crate::engine::bench_adapter(&format!("a{}", i % d))?),
                };
                Ok(r)
            })
            .collect()
    };
    // warm-up: kernels loaded, allocator primed
    run(&engine, batch(streams.min(4), 0, 4)?)?;
    println!(
        "device {device}, dtype {dtype:?}, weights {weights:?}, model {} ({} layers, hidden {}), load {load_s:.1}s",
        path.display(),
        cfg.n_layer,
        cfg.hidden
    );
    let one = run(&engine, batch(1, 0, decode_tokens)?)?;
    let many = run(&engine, batch(streams, 0, decode_tokens)?)?;
    println!("\n| streams | TTFT p50 / p99 ms | inter-token mean p50 / p99 ms | decode tok/s |\n|---|---|---|---|");
    for (n, r) in [(1, &one), (streams, &many)] {
        println!(
            "| {n} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} |",
            pct(&r.ttft_ms, 0.5),
            pct(&r.ttft_ms, 0.99),
            pct(&r.itl_ms, 0.5),
            pct(&r.itl_ms, 0.99),
            r.decode_tps
        );
    }
    println!(
        "\n| {streams} streams, distinct adapters | decode tok/s | bound tok/s | vs bound |\n|---|---|---|---|"
    );
    let base_tps = many.decode_tps;
    let mut rows = vec![serde_json::json!({"distinct": 0, "tps": base_tps, "bound": base_tps})];
    println!("| 0 (base) | {base_tps:.1} | {base_tps:.1} | 1.00x |");
    for &d in distinct.iter().filter(|&&d| d > 0) {
        // load every adapter into the pool and onto the device first (not timed)
        if let Some(pool) = &pool {
            for i in 0..d {
                let h = crate::engine::bench_adapter(&format!("a{i}"))?;
                let t = Instant::now();
                loop {
                    match pool.acquire(&h) {
                        Acquire::Ready(_) => break,
                        Acquire::Pending if t.elapsed() < Duration::from_secs(600) => {
                            std::thread::sleep(Duration::from_millis(2))
                        }
                        Acquire::Pending => bail!("adapter {h} did not load in 10 minutes"),
                        Acquire::Failed(e) => bail!("adapter {h}: {e}"),
                    }
                }
            }
        }
        run(&engine, batch(streams, d, 2)?)?;
        let r = run(&engine, batch(streams, d, decode_tokens)?)?;
        let bound = base_tps * base_bytes as f64 / (base_bytes + d * adapter_bytes) as f64;
        println!(
            "| {d} | {:.1} | {bound:.1} | {:.2}x |",
            r.decode_tps,
            r.decode_tps / bound
        );
        rows.push(
            serde_json::json!({"distinct": d, "tps": r.decode_tps, "bound": bound,
            "ttft_p50_ms": pct(&r.ttft_ms, 0.5), "itl_p50_ms": pct(&r.itl_ms, 0.5)}),
        );
    }
    println!("| base bytes per step | {base_bytes} | adapter bytes (each) | {adapter_bytes} |");
    if let Some(out) = json_out {
        let j = serde_json::json!({
            "device": device, "dtype": format!("{dtype:?}"), "weights": format!("{weights:?}"),
            "model": path, "streams": streams, "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
            "load_s": load_s,
            "latency": [
                {"streams": 1, "ttft_p50_ms": pct(&one.ttft_ms, 0.5), "itl_p50_ms": pct(&one.itl_ms, 0.5), "tps": one.decode_tps},
                {"streams": streams, "ttft_p50_ms": pct(&many.ttft_ms, 0.5), "ttft_p99_ms": pct(&many.ttft_ms, 0.99),
                 "itl_p50_ms": pct(&many.itl_ms, 0.5), "itl_p99_ms": pct(&many.itl_ms, 0.99), "tps": many.decode_tps}],
            "adapters": rows,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&j)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// `retune-bench check-device`: greedy decoding of the fixture prompts on the tensor
/// backend (on `--device`) and on the native CPU engine, step by step with the same
/// input tokens; reports, per prompt, whether the greedy tokens are equal and, at a
/// first divergence, the CPU's top-2 gap there (a divergence inside a near-tie is
/// floating point), plus the largest logit difference relative to the logit range.
/// Exits non-zero if any divergence is not a near tie or logits drift past `--tol`.
/// `retune-bench check-device`: greedy decoding on the tensor backend vs the CPU engine.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// The GGUF model the fixture prompts were made for.
    #[arg(long)]
    model: PathBuf,
    /// Tensor-backend device: cuda, cuda:N or candle-cpu.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Weight dtype on the device: bf16, f16 or f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// llama.cpp fixture with the chat prompts.
    #[arg(long, default_value = "tests/fixtures/llamacpp_smollm2_q4_1.json")]
    prompts: String,
    /// Greedy steps per prompt.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Largest logit difference allowed, relative to the logit range.
    #[arg(long, default_value_t = 0.01)]
    tol: f32,
    /// A divergence where the CPU's top-2 gap is below this is a near tie (not a failure).
    #[arg(long, default_value_t = 0.05)]
    tie: f32,
    /// A PEFT adapter directory to apply on both sides.
    #[arg(long)]
    adapter: Option<String>,
    /// Also check a mixed batch (base, r4, r8, r16 rows) against each row alone.
    #[arg(long)]
    mixed: bool,
}

pub fn run_check(args: &CheckArgs) -> Result<()> {
    let path = args.model.clone();
    let device = args.device.clone();
    let dtype = parse_dtype(&args.dtype)?;
    let fixture = args.prompts.clone();
    let steps = args.tokens;
    let tol = args.tol;
    let tie = args.tie;
    let adapter = args.adapter.clone();
    let mixed = args.mixed;
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&fixture).with_context(|| format!("reading {fixture}"))?,
    )?;
    let prompts: Vec<Vec<u32>> = f["chats"]
        .as_array()
        .context("fixture has no chats")?
        .iter()
        .map(|c| {
            c["prompt_tokens"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|x| x as u32))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let host = load(&path)?.model;
    let shapes = host.base_shapes();
    let a = match &adapter {
        Some(d) => Some(retune_adapters::load_peft(
            std::path::Path::new(d),
            &shapes,
            &LoadLimits::default(),
        )?),
        None => None,
    };
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + steps + 1;
    let opts = DeviceOptions {
        dtype,
        weights: WeightMode::Dense,
        slots: 8,
        slot_context: longest,
        adapter_slots: 4,
        max_rank: a.as_ref().map_or(16, |a| a.max_rank().max(16)),
    };
    let dev = build_device(load(&path)?.model, &device, &opts)?;
    let mut failed = false;
    let mut worst = 0f32;
    println!("| prompt | tokens equal | first divergence (step, CPU top-2 gap) | max |Δlogit| / range |\n|---|---|---|---|");
    for (pi, p) in prompts.iter().enumerate() {
        let mut hk = host.new_cache();
        let mut dk = dev.new_cache()?;
        let mut feed = p.clone();
        let mut diverged = None;
        let mut rel = 0f32;
        for step in 0..steps {
            let x = host
                .forward(&mut [retune_engine::BatchItem {
                    tokens: &feed,
                    adapter: a.as_ref(),
                    kv: &mut hk,
                    want_logits: true,
                    only: None,
                }])?
                .remove(0);
            let y = dev
                .forward(&mut [retune_engine::BatchItem {
                    tokens: &feed,
                    adapter: a.as_ref(),
                    kv: &mut dk,
                    want_logits: true,
                    only: None,
                }])?
                .remove(0);
            rel = rel.max(rel_diff(&x, &y));
            let (tx, gap) = argmax(&x);
            let (ty, _) = argmax(&y);
            if tx != ty && diverged.is_none() {
                diverged = Some((step, gap));
            }
            // both continue on the CPU's token, so later steps stay comparable
            feed = vec![tx as u32];
        }
        worst = worst.max(rel);
        let explained = diverged.is_none_or(|(_, gap)| gap <= tie);
        failed |= !explained || rel > tol;
        println!(
            "| {pi} | {} | {} | {rel:.2e} |",
            diverged.is_none(),
            diverged.map_or("-".into(), |(s, g)| format!(
                "{s}, {g:.4}{}",
                if g <= tie {
                    " (near tie)"
                } else {
                    " (NOT a near tie)"
                }
            )),
        );
    }
    println!("device {device}, dtype {dtype:?}, {} prompts x {steps} steps, worst relative logit difference {worst:.2e} (tol {tol})", prompts.len());
    if mixed {
        // random adapters of three ranks; a batch of base and adapter rows on the
        // device against each row alone on the device
        let tmp = std::env::temp_dir().join(format!("retune-check-{}", std::process::id()));
        let specs: [(usize, &[usize]); 3] = [
            (4, &[0, 2]),
            (8, &[0, 1, 2, 3, 4, 5, 6]),
            (16, &[3, 4, 5, 6]),
        ];
        let mut ads = Vec::new();
        for (i, (rank, modules)) in specs.iter().enumerate() {
            let d = tmp.join(format!("r{rank}"));
            retune_engine::tiny::write_random_adapter(
                &d,
                &shapes,
                *rank,
                modules,
                40 + i as u64,
                2.0 * *rank as f32,
                0.02,
            )?;
            ads.push(retune_adapters::load_peft(
                &d,
                &shapes,
                &LoadLimits::default(),
            )?);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        let rows: Vec<(Vec<u32>, Option<&retune_adapters::LoraAdapter>)> = vec![
            (prompts[0].clone(), None),
            (prompts[1 % prompts.len()].clone(), Some(&ads[0])),
            (prompts[2 % prompts.len()].clone(), Some(&ads[1])),
            (vec![prompts[0][0]], Some(&ads[2])),
            (prompts[3 % prompts.len()].clone(), Some(&ads[1])),
        ];
        let alone: Vec<Vec<f32>> = rows
            .iter()
            .map(|(t, a)| -> Result<Vec<f32>> {
                let mut kv = dev.new_cache()?;
                Ok(dev
                    .forward(&mut [retune_engine::BatchItem {
                        tokens: t,
                        adapter: *a,
                        kv: &mut kv,
                        want_logits: true,
                        only: None,
                    }])?
                    .remove(0))
            })
            .collect::<Result<_>>()?;
        let mut caches = rows
            .iter()
            .map(|_| dev.new_cache())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut items: Vec<_> = rows
            .iter()
            .zip(caches.iter_mut())
            .map(|((t, a), kv)| retune_engine::BatchItem {
                tokens: t,
                adapter: *a,
                kv,
                want_logits: true,
                only: None,
            })
            .collect();
        let batched = dev.forward(&mut items)?;
        println!("\n| mixed batch row | adapter rank | tokens equal | max |Δlogit| / range vs alone |\n|---|---|---|---|");
        for (i, ((x, y), (_, a))) in alone.iter().zip(&batched).zip(&rows).enumerate() {
            let d = rel_diff(x, y);
            let same = argmax(x).0 == argmax(y).0;
            failed |= !same || d > tol;
            println!(
                "| {i} | {} | {same} | {d:.2e} |",
                a.map_or(0, |a| a.max_rank())
            );
        }
    }
    if failed {
        bail!("the tensor backend disagrees with the CPU engine beyond floating point");
    }
    Ok(())
}
