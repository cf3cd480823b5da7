//! `retune-bench stores`: what the shared PostgreSQL stores cost against the
//! embedded SQLite ones, in one run:
//! - promotion-to-served: a promotion through one registry handle until another
//!   handle's alias cache (the request path's view, default poll) resolves it;
//! - the per-request overhead on serving: `retune serve` (the real binary) with
//!   each pair of stores, the same adapter, 32 client streams, rounds alternated.

use anyhow::{bail, Context, Result};
use retune_registry::{AliasCache, Expect, LocalStore, NewVersion, Registry, ServedBase};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct StoresArgs {
    /// The model (GGUF file).
    #[arg(long)]
    model: PathBuf,
    /// An empty PostgreSQL database for the shared stores.
    #[arg(long, env = "RETUNE_BENCH_PG_URL")]
    postgres_url: String,
    /// The `retune` binary (default: beside this one).
    #[arg(long)]
    retune: Option<PathBuf>,
    /// Promotions timed per backend.
    #[arg(long, default_value_t = 100)]
    promotions: usize,
    /// The alias poll the request path runs with (the server's default).
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    /// Concurrent client streams.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Seconds per serving measurement.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Serving rounds (each: SQLite, then PostgreSQL).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Work directory (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const TENANT: &str = "bench";
const KEY: &str = "bench-key";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Two versions of bench/tickets registered in `reg`, the first live.
fn two_versions(reg: &Registry, base: &ServedBase, dir: &Path) -> Result<(String, String)> {
    let mut ids = Vec::new();
    for seed in [1u64, 2] {
        let up = dir.join(format!("upload-{seed}"));
        let _ = std::fs::remove_dir_all(&up);
        retune_engine::tiny::write_random_adapter_as(
            &up,
            &base.shapes,
            16,
            &[0, 1, 2, 3, 4, 5, 6],
            seed,
            (32.0, 0.02),
            retune_engine::tiny::DType::F16,
        )?;
        ids.push(
            reg.register(
                NewVersion {
                    tenant: TENANT,
                    name: "tickets",
                    dir: &up,
                    source: "bench",
                    parent: None,
                    metadata: serde_json::json!({}),
                    claimed_base: None,
                    actor: "bench",
                },
                base,
            )?
            .id,
        );
    }
    reg.promote(TENANT, "tickets", &ids[0], Expect::Any, "bench", "")?;
    Ok((ids[0].clone(), ids[1].clone()))
}

/// Promotion through `writer` until `reader`'s cache serves it: ms per promotion.
fn promotion_to_served(
    writer: &Registry,
    reader: &Registry,
    ids: &(String, String),
    n: usize,
    poll: Duration,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let cache = AliasCache::attach(reader, poll)?;
    let (mut served, mut committed) = (Vec::new(), Vec::new());
    for i in 0..n {
        let next = if i % 2 == 0 { &ids.1 } else { &ids.0 };
        let t = Instant::now();
        writer.promote(TENANT, "tickets", next, Expect::Any, "bench", "")?;
        committed.push(t.elapsed().as_secs_f64() * 1e3);
        while cache.resolve(TENANT, "tickets", 0)?.version() != next.as_str() {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("promotion {i} not served within 10 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        served.push(t.elapsed().as_secs_f64() * 1e3);
        // spread the promotions over the poll's phase
        let poll_ms = poll.as_millis().max(1) as u64;
        std::thread::sleep(Duration::from_millis((i as u64 * 97) % poll_ms));
    }
    Ok((served, committed))
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(bin: &Path, cfg: &Path) -> Result<Server> {
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(cfg)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut err = BufReader::new(child.stderr.take().context("no stderr")?);
    let mut line = String::new();
    while !line.contains("listening on port") {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            bail!("the server exited before listening");
        }
    }
    let port = line.trim().rsplit(' ').next().unwrap_or("").parse()?;
    std::thread::spawn(move || {
        let mut sink = String::new();
        while err.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Ok(Server(child, port))
}

/// One chat completion; its completion tokens.
fn request(port: u16, i: u64) -> Result<u64> {
    let body = format!(
        r#"{{"model":"tickets","messages":[{{"role":"user","content":"Where is my card? Ticket {i}."}}],"max_tokens":16,"temperature":0}}"#
    );
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!("{}", out.lines().next().unwrap_or(""));
    }
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body)?;
    Ok(v["usage"]["completion_tokens"].as_u64().unwrap_or(0))
}

/// `streams` clients for `secs`: (requests/s, tokens/s).
fn load(port: u16, streams: usize, secs: u64) -> Result<(f64, f64)> {
    // warm: the adapter loaded, the first batches formed
    for i in 0..4 {
        request(port, i)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (reqs, toks, errs) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let t = Instant::now();
    let hs: Vec<_> = (0..streams)
        .map(|k| {
            let (stop, reqs, toks, errs) = (stop.clone(), reqs.clone(), toks.clone(), errs.clone());
            std::thread::spawn(move || {
                let mut i = k as u64 * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match request(port, i) {
                        Ok(n) => {
                            reqs.fetch_add(1, Ordering::Relaxed);
                            toks.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    let el = t.elapsed().as_secs_f64();
    if errs.load(Ordering::Relaxed) > 0 {
        bail!("{} requests failed", errs.load(Ordering::Relaxed));
    }
    Ok((
        reqs.load(Ordering::Relaxed) as f64 / el,
        toks.load(Ordering::Relaxed) as f64 / el,
    ))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run(a: &StoresArgs) -> Result<()> {
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("retune-bench-stores-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bin = match &a.retune {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("retune"),
    };
    let m = retune_engine::load(&a.model)?.model;
    let base = ServedBase {
        shapes: m.base_shapes(),
        fingerprint: m.fingerprint(),
    };
    drop(m);
    let poll = Duration::from_millis(a.poll_ms);
    let backends = [
        ("SQLite", dir.join("sqlite")),
        ("PostgreSQL", dir.join("postgres")),
    ];
    let mut configs = Vec::new();
    for (name, root) in &backends {
        std::fs::create_dir_all(root)?;
        let store =
            || -> Result<Arc<LocalStore>> { Ok(Arc::new(LocalStore::new(&root.join("store"))?)) };
        let at = if *name == "SQLite" {
            root.join("registry.db").to_string_lossy().into_owned()
        } else {
            a.postgres_url.clone()
        };
        let writer = Registry::open_at(&at, store()?, 1 << 30)?;
        let reader = Registry::open_at(&at, store()?, 1 << 30)?;
        let ids = two_versions(&writer, &base, &dir)?;
        let (mut served, mut committed) =
            promotion_to_served(&writer, &reader, &ids, a.promotions, poll)?;
        println!(
            "{name:>10} promotion-to-served (poll {} ms, {} promotions): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             the promotion's commit p50 {:.2} ms, p99 {:.2} ms",
            a.poll_ms,
            served.len(),
            pct(&mut served, 0.5),
            pct(&mut served, 0.99),
            pct(&mut served, 1.0),
            pct(&mut committed, 0.5),
            pct(&mut committed, 0.99),
        );
        writer.promote(TENANT, "tickets", &ids.0, Expect::Any, "bench", "")?;
        let shared = if *name == "SQLite" {
            String::new()
        } else {
            format!(
                "registry_url = {:?}\n[datasets]\nurl = {:?}\n",
                a.postgres_url, a.postgres_url
            )
        };
        let cfg = root.join("retune.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nport = 0\n[model]\npath = {:?}\nid = \"base\"\n[adapters]\nroot = {:?}\n{shared}\
                 [[tenants]]\nname = \"{TENANT}\"\nkey_sha256 = [\"{}\"]\n",
                a.model.to_string_lossy(),
                root.to_string_lossy(),
                hex(&Sha256::digest(KEY.as_bytes())),
            ),
        )?;
        configs.push((*name, cfg));
    }
    let mut results: Vec<(&str, Vec<(f64, f64)>)> =
        configs.iter().map(|(n, _)| (*n, Vec::new())).collect();
    for round in 0..a.rounds {
        for (k, (name, cfg)) in configs.iter().enumerate() {
            let s = serve(&bin, cfg)?;
            let (rps, tps) = load(s.1, a.streams, a.seconds)?;
            drop(s);
            println!(
                "round {}: {name:>10} stores, {} streams: {rps:.2} requests/s, {tps:.1} tokens/s",
                round + 1,
                a.streams
            );
            results[k].1.push((rps, tps));
        }
    }
    let mean = |v: &[(f64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
    let (sq, pg) = (mean(&results[0].1), mean(&results[1].1));
    println!(
        "serving with the PostgreSQL stores: {:.3}x the SQLite stores' tokens/s ({pg:.1} vs {sq:.1}; overhead {:+.1}%)",
        pg / sq,
        (1.0 - pg / sq) * 100.0
    );
    Ok(())
}
