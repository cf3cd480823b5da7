//! `retune-bench adapters`: adapters at scale, through the registry and its
//! store (content-addressed versions, compute forms written at register).
//!
//! - Cold loads of r=16 adapters on all 7 modules, from `acquire` to ready,
//!   page cache warm: from the compute form, and the same versions loaded from
//!   their PEFT files with the full check (sha256 against the content id, parse,
//!   widen, NaN scan), idle and while 32 streams decode.
//! - Zipf-distributed requests over many adapters against the same run over 8:
//!   throughput, time to first token, loads, and the pool's memory against its
//!   limits.

use anyhow::{bail, Result};
use retune_adapters::{
    Acquire, AdapterError, AdapterPool, AdapterRef, AdapterSource, PoolConfig, Via,
};
use retune_engine::{load, Backend, Engine, EngineConfig, Event, SamplingParams};
use retune_registry::{LocalStore, NewVersion, Registry, ServedBase};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct AdaptersArgs {
    /// The model (GGUF file or HF safetensors directory).
    #[arg(long)]
    model: PathBuf,
    /// Registry and store directory; kept, and reused when it holds the
    /// adapters already (registering 1,000 takes minutes).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Distinct adapters of the many-adapter run.
    #[arg(long, default_value_t = 1000)]
    adapters: usize,
    /// Zipf exponent of the adapter popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Concurrent streams.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Requests per Zipf run.
    #[arg(long, default_value_t = 512)]
    requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Resident adapters (the pool's count limit).
    #[arg(long, default_value_t = 64)]
    resident: usize,
    /// Resident bytes (the pool's byte limit).
    #[arg(long, default_value_t = 2 << 30)]
    resident_bytes: usize,
    /// Loads per cold-load measurement.
    #[arg(long, default_value_t = 64)]
    cold_loads: usize,
    /// Skip the Zipf runs.
    #[arg(long)]
    cold_only: bool,
}

const TENANT: &str = "bench";

fn name_of(i: usize) -> String {
    format!("z{i:04}")
}

/// The same stored versions, loaded the slow way: the content-id check and the
/// PEFT parse on every load, no compute form.
struct FilesOnly {
    root: PathBuf,
}

impl AdapterSource for FilesOnly {
    fn locate(&self, a: &AdapterRef) -> Result<PathBuf, AdapterError> {
        Ok(self.root.join(a.name()).join(a.version()))
    }
    fn content_addressed(&self) -> bool {
        true
    }
}

/// Register adapters `0..n` (r=16, all 7 modules, f16) unless the registry
/// has them; their refs, in order.
fn ensure_adapters(
    reg: &Registry,
    base: &ServedBase,
    dir: &Path,
    n: usize,
) -> Result<Vec<AdapterRef>> {
    let mut refs = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        let name = name_of(i);
        let existing = reg.versions(TENANT, &name).unwrap_or_default();
        let id = match existing.first() {
            Some(v) => v.id.clone(),
            None => {
                let up = dir.join("upload");
                let _ = std::fs::remove_dir_all(&up);
                retune_engine::tiny::write_random_adapter_as(
                    &up,
                    &base.shapes,
                    16,
                    &[0, 1, 2, 3, 4, 5, 6],
                    1000 + i as u64,
                    (32.0, 0.02),
                    retune_engine::tiny::DType::F16,
                )?;
                let v = reg.register(
                    NewVersion {
                        tenant: TENANT,
                        name: &name,
                        dir: &up,
                        source: "bench",
                        parent: None,
                        metadata: serde_json::json!({}),
                        claimed_base: None,
                        actor: "bench",
                    },
                    base,
                )?;
                if (i + 1) % 100 == 0 {
                    eprintln!(
                        "registered {} adapters in {:.0} s",
                        i + 1,
                        t.elapsed().as_secs_f64()
                    );
                }
                v.id
            }
        };
        refs.push(AdapterRef::new(TENANT, &name, &id, Via::Pinned)?);
    }
    Ok(refs)
}

fn wait_ready(pool: &AdapterPool, r: &AdapterRef) -> Result<()> {
    let t = Instant::now();
    loop {
        match pool.acquire(r) {
            Acquire::Ready(_) => return Ok(()),
            Acquire::Failed(e) => bail!("{r}: {e}"),
            Acquire::Pending => {
                if t.elapsed() > Duration::from_secs(60) {
                    bail!("{r}: no load in 60 s");
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Load each of `refs` once into a fresh pool, timing acquire to ready (ms).
fn cold(
    source: Arc<dyn AdapterSource>,
    base: &ServedBase,
    refs: &[AdapterRef],
) -> Result<Vec<f64>> {
    let pool = AdapterPool::new(
        source,
        base.shapes.clone(),
        PoolConfig {
            max_adapters: refs.len() + 1,
            max_bytes: usize::MAX,
            ..PoolConfig::default()
        },
    );
    let mut lat = Vec::new();
    for r in refs {
        let t = Instant::now();
        wait_ready(&pool, r)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        pool.forget(r);
    }
    if let Some((p50, p99)) = pool.load_latency_us() {
        eprintln!(
            "  on the loader thread: p50 {:.2} ms, p99 {:.2} ms; acquire to ready: {:?}",
            p50 as f64 / 1e3,
            p99 as f64 / 1e3,
            {
                let mut v = lat.clone();
                v.sort_by(f64::total_cmp);
                v.iter()
                    .rev()
                    .take(5)
                    .map(|x| (x * 10.0).round() / 10.0)
                    .collect::<Vec<_>>()
            }
        );
    }
    Ok(lat)
}

struct Run {
    wall: f64,
    ttft: Vec<f64>,
    generated: usize,
}

/// Keep `streams` requests in flight; request i uses `pick[i]`.
fn drive(
    engine: &Engine,
    picks: &[Option<AdapterRef>],
    streams: usize,
    max_tokens: usize,
) -> Result<Run> {
    let params = SamplingParams {
        stop_on_eos: false,
        ..SamplingParams::greedy(max_tokens)
    };
    let start = Instant::now();
    let mut next = 0;
    let mut open = VecDeque::new();
    let mut run = Run {
        wall: 0.0,
        ttft: Vec::new(),
        generated: 0,
    };
    while next < picks.len() || !open.is_empty() {
        while open.len() < streams && next < picks.len() {
            // 32-token prompts, distinct per request
            let prompt: Vec<u32> = (0..32)
                .map(|j| 100 + ((next * 37 + j * 11) % 3000) as u32)
                .collect();
            let v = engine.validate(prompt, params.clone(), picks[next].clone())?;
            open.push_back(engine.submit(v)?);
            next += 1;
        }
        let Some(mut s) = open.pop_front() else { break };
        loop {
            match s.blocking_next() {
                Some(Event::Token(_)) => {}
                Some(Event::Done(c)) => {
                    run.ttft.push(c.timings.first_token.as_secs_f64() * 1e3);
                    run.generated += c.output.len();
                    break;
                }
                Some(Event::Error(e)) => bail!("{e}"),
                None => bail!("stream ended"),
            }
        }
    }
    run.wall = start.elapsed().as_secs_f64();
    Ok(run)
}

/// Zipf(s) over `n` items: request i's item, deterministic.
fn zipf_picks(n: usize, s: f64, count: usize, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            cdf.partition_point(|&c| c < u).min(n - 1)
        })
        .collect()
}

pub fn run(a: &AdaptersArgs) -> Result<()> {
    let base = ServedBase {
        shapes: load(&a.model)?.model.base_shapes(),
        fingerprint: "bench".into(),
    };
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("retune-adapters-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(LocalStore::new(&dir.join("store"))?);
    let reg = Arc::new(Registry::open(&dir.join("registry.db"), store, 1 << 30)?);
    let n = if a.cold_only {
        a.cold_loads
    } else {
        a.adapters.max(a.cold_loads)
    };
    let refs = ensure_adapters(&reg, &base, &dir, n)?;
    println!("{}", retune_engine::cpu::describe());

    // cold loads: compute form vs PEFT files, idle and under decode load
    let files = dir.join("files-only");
    for r in &refs[..a.cold_loads] {
        let from = reg.servable_dir(r)?;
        let to = files.join(r.name()).join(r.version());
        std::fs::create_dir_all(&to)?;
        for f in retune_registry::store::FILES {
            std::fs::copy(from.join(f), to.join(f))?;
        }
    }
    let cold_refs = &refs[..a.cold_loads];
    let files_src: Arc<dyn AdapterSource> = Arc::new(FilesOnly {
        root: files.clone(),
    });
    // warm the page cache for both forms
    cold(reg.clone(), &base, cold_refs)?;
    cold(files_src.clone(), &base, cold_refs)?;
    let mut rows = Vec::new();
    rows.push(("compute form, idle", cold(reg.clone(), &base, cold_refs)?));
    rows.push((
        "PEFT files + content-id check, idle",
        cold(files_src.clone(), &base, cold_refs)?,
    ));
    {
        // 32 base-model streams decoding on the engine's threads meanwhile
        let l = load(&a.model)?;
        let engine = Arc::new(Engine::start(
            l.model,
            l.tok,
            EngineConfig {
                max_batch: a.streams,
                ..EngineConfig::default()
            },
        )?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bg = {
            let (engine, stop, streams) = (engine.clone(), stop.clone(), a.streams);
            std::thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    drive(&engine, &vec![None; streams], streams, 32)?;
                }
                Ok(())
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        rows.push((
            "compute form, 32 streams decoding",
            cold(reg.clone(), &base, cold_refs)?,
        ));
        rows.push((
            "PEFT files + content-id check, 32 streams decoding",
            cold(files_src.clone(), &base, cold_refs)?,
        ));
        stop.store(true, Ordering::Relaxed);
        bg.join()
            .map_err(|_| anyhow::anyhow!("decode thread panicked"))??;
    }
    let _ = std::fs::remove_dir_all(&files);
    println!("\n| cold load, r=16 × 7 modules, f16 stored ({} loads) | p50 ms | p99 ms | max ms |\n|---|---|---|---|", a.cold_loads);
    for (name, lat) in &rows {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            pct(lat, 0.5),
            pct(lat, 0.99),
            pct(lat, 1.0)
        );
    }
    if a.cold_only {
        return Ok(());
    }

    // Zipf over many adapters against Zipf over 8, same engine settings
    let mut results = Vec::new();
    for n_adapters in [8, a.adapters] {
        let pool = AdapterPool::new(
            reg.clone(),
            base.shapes.clone(),
            PoolConfig {
                max_adapters: a.resident,
                max_bytes: a.resident_bytes,
                ..PoolConfig::default()
            },
        );
        let l = load(&a.model)?;
        let engine = Engine::start_with_pool(
            l.model,
            l.tok,
            EngineConfig {
                max_batch: a.streams,
                max_queue: a.streams * 4,
                ..EngineConfig::default()
            },
            Some(pool.clone()),
        )?;
        drive(&engine, &[None], 1, 2)?;
        let picks: Vec<Option<AdapterRef>> = zipf_picks(n_adapters, a.zipf, a.requests, 7)
            .into_iter()
            .map(|i| Some(refs[i].clone()))
            .collect();
        let distinct = {
            let mut d: Vec<&str> = picks.iter().flatten().map(|r| r.name()).collect();
            d.sort_unstable();
            d.dedup();
            d.len()
        };
        // the pool's bytes, sampled while the run goes
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (pool, peak, stop) = (pool.clone(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(
                        pool.stats().bytes.load(Ordering::Relaxed),
                        Ordering::Relaxed,
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        let r = drive(&engine, &picks, a.streams, a.max_tokens)?;
        stop.store(true, Ordering::Relaxed);
        sampler.join().ok();
        let s = pool.stats();
        let loads = s.loads.load(Ordering::Relaxed);
        eprintln!(
            "{n_adapters} adapters: {:.1} s, {distinct} distinct requested, {loads} loads",
            r.wall
        );
        results.push((
            n_adapters,
            distinct,
            r.generated as f64 / r.wall,
            pct(&r.ttft, 0.5),
            pct(&r.ttft, 0.99),
            loads,
            s.evictions.load(Ordering::Relaxed),
            peak.load(Ordering::Relaxed),
            pool.load_latency_us(),
        ));
    }
    println!(
        "\n| Zipf(s={}) over | distinct requested | tok/s | TTFT p50 ms | TTFT p99 ms | loads | evictions | peak resident bytes | load p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|",
        a.zipf
    );
    for (n, d, tps, p50, p99, loads, ev, peak, lat) in &results {
        let lat = lat
            .map(|(p50, p99)| format!("{:.2} / {:.2}", p50 as f64 / 1e3, p99 as f64 / 1e3))
            .unwrap_or_default();
        println!("| {n} adapters | {d} | {tps:.1} | {p50:.0} | {p99:.0} | {loads} | {ev} | {peak} | {lat} |");
    }
    let (few, many) = (&results[0], &results[1]);
    println!(
        "\n{} adapters against 8: throughput {:.2}x, TTFT p99 {:.2}x; pool limit {} adapters / {} bytes",
        a.adapters,
        many.2 / few.2,
        many.4 / few.4,
        a.resident,
        a.resident_bytes
    );
    Ok(())
}
