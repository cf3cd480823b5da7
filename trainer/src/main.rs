//! `retune-trainer`: train a LoRA adapter on the served base model.
//!
//! Exit codes: 0 done, 2 bad input (data, settings, base mismatch), 1 any other
//! failure.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use retune_trainer::batches::epoch_batches;
use retune_trainer::run::prepare_source;
use retune_trainer::{
    register, run, DataSource, Job, LoraSpec, Overflow, Progress, TrainError, TrainSettings,
};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "retune-trainer",
    version,
    about = "LoRA fine-tuning for retune"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train an adapter: writes OUT/adapter (PEFT), OUT/training.json, OUT/loss.svg.
    Train(TrainArgs),
    /// Exact-match accuracy of greedy answers on chat examples (JSONL), for the
    /// base model and each adapter, with the serving engine's forward.
    Eval {
        #[arg(long, env = "RETUNE_MODEL")]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// PEFT adapter directories (none: the base model alone).
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// First N examples only.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 24)]
        max_new: usize,
        #[arg(long)]
        threads: Option<usize>,
        /// Write each example's answer (JSONL, one adapter: the last) here.
        #[arg(long)]
        answers: Option<PathBuf>,
        /// A declared label task's labels (a JSON list of strings): answers are
        /// only these, as the task is served (a classifier answers its own).
        #[arg(long)]
        labels: Option<PathBuf>,
    },
    /// The loop: watch the examples store, train adapters that are due, gate
    /// them, roll out the ones that pass, watch them and roll back regressions.
    Daemon {
        #[command(flatten)]
        at: SettingsArgs,
        /// One pass (watches, then at most one training), then exit.
        #[arg(long)]
        once: bool,
        /// Lease holder name (default: $HOSTNAME, else `retune-trainer`). A
        /// restarted daemon with the same name takes its leases back at once.
        #[arg(long, env = "RETUNE_TRAINER_HOLDER")]
        holder: Option<String>,
    },
    /// Every adapter the daemon looks after: aliases, lease, last runs, watch.
    Status {
        #[command(flatten)]
        at: SettingsArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write the micro-batches a run would train on (JSONL: input_ids and labels
    /// with -100 where no loss is read), for peers measured on the same data.
    Tokenize {
        #[command(flatten)]
        common: Common,
        /// Output JSONL file.
        #[arg(long)]
        out: PathBuf,
        /// Epochs of batches to write.
        #[arg(long, default_value_t = 1)]
        epochs: u64,
    },
}

#[derive(Args)]
#[group(required = true, multiple = true)]
struct SettingsArgs {
    /// The settings file the server reads (TOML; RETUNE_<SECTION>__<KEY> overrides).
    #[arg(long, conflicts_with_all = ["model", "root"])]
    config: Option<PathBuf>,
    /// Embedded defaults instead: this model…
    #[arg(long, requires = "root")]
    model: Option<PathBuf>,
    /// …and this data root (registry.db, store/, datasets.db).
    #[arg(long, requires = "model")]
    root: Option<PathBuf>,
}

impl SettingsArgs {
    fn load(&self) -> anyhow::Result<retune_config::Settings> {
        Ok(match (&self.config, &self.model, &self.root) {
            (Some(p), _, _) => retune_config::Settings::load(p, std::env::vars())?,
            (None, Some(m), Some(r)) => retune_config::Settings::from_toml(
                &format!(
                    "[model]\npath = {:?}\n[adapters]\nroot = {:?}\n",
                    m.to_string_lossy(),
                    r.to_string_lossy()
                ),
                std::env::vars(),
            )?,
            _ => anyhow::bail!("--config FILE, or --model PATH with --root DIR"),
        })
    }
}

#[derive(Args)]
struct Common {
    /// The base model: the served GGUF file or HF safetensors directory.
    #[arg(long, env = "RETUNE_MODEL")]
    model: PathBuf,
    /// Train on this dataset snapshot (from ROOT/datasets.db).
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    snapshot: Option<String>,
    /// Tenant of the snapshot (default: the tenant of --register).
    #[arg(long)]
    tenant: Option<String>,
    /// Train on an OpenAI-format JSONL file (chat or prompt/completion).
    #[arg(long)]
    data: Option<PathBuf>,
    /// With --data: percent of examples (by input hash) held out for eval loss.
    #[arg(long, default_value_t = 10)]
    eval_percent: u8,
    /// Data root (the server's `adapters.root`: registry.db, store/, datasets.db).
    #[arg(long, env = "RETUNE_ROOT", default_value = "data")]
    root: PathBuf,
    /// With --snapshot: a PostgreSQL datasets store (`datasets.url`) instead of
    /// ROOT/datasets.db.
    #[arg(long, env = "RETUNE_DATASETS__URL")]
    datasets_url: Option<String>,
    /// With --register: a PostgreSQL registry (`adapters.registry_url`) instead
    /// of ROOT/registry.db.
    #[arg(long, env = "RETUNE_ADAPTERS__REGISTRY_URL")]
    registry_url: Option<String>,
    /// With --register: an S3-compatible version store (`adapters.store_url`)
    /// instead of ROOT/store alone (credentials from AWS_ACCESS_KEY_ID /
    /// AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "RETUNE_ADAPTERS__STORE_URL")]
    store_url: Option<String>,
    /// Its endpoint (`adapters.store_endpoint`).
    #[arg(long, env = "RETUNE_ADAPTERS__STORE_ENDPOINT")]
    store_endpoint: Option<String>,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Longer examples are dropped or truncated (counted either way).
    #[arg(long, value_enum, default_value_t = Overflow::Drop)]
    overflow: Overflow,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Register the result as a new version of TENANT/NAME (not promoted).
    #[arg(long, value_name = "TENANT/NAME")]
    register: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    /// Scale by alpha/sqrt(rank) (rsLoRA).
    #[arg(long)]
    rslora: bool,
    /// Target modules (any of q,k,v,o,gate,up,down; `all`).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    modules: Vec<String>,
    /// LoRA on the top N layers only (default: every layer).
    #[arg(long)]
    top_layers: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 30)]
    warmup: usize,
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    #[arg(long)]
    max_steps: Option<usize>,
    /// Stop after this many minutes of training (the best adapter so far is kept).
    #[arg(long)]
    max_minutes: Option<f64>,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Eval loss every N steps (0: at each epoch end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Early stop after N evals without improvement (0: off).
    #[arg(long, default_value_t = 0)]
    patience: usize,
    #[arg(long, default_value_t = 8)]
    min_examples: usize,
    /// Checkpoint every N steps (resume with --resume).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Resume from OUT/checkpoint when it matches these settings and data.
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// Discard a checkpoint an earlier run left in OUT.
    #[arg(long)]
    fresh: bool,
    /// Start from this PEFT adapter instead of a fresh init.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Recompute the frozen layers below the LoRA layers every epoch.
    #[arg(long)]
    no_cache_frozen: bool,
    /// Also save the adapter after these minutes of training (OUT/at-<m>min).
    #[arg(long, value_delimiter = ',')]
    save_at_minutes: Vec<f64>,
    /// Train a classifier over these labels (a JSON file: a list of strings, the
    /// head's row order): a head on the last prompt token instead of generating
    /// the answer; examples whose answer is not one of them are left out.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// With --max-minutes: decay the learning rate by the time spent as well as
    /// by the steps, so a run the budget cuts ends annealed.
    #[arg(long)]
    fit_to_budget: bool,
    /// Run every row of a micro-batch whole, even the tokens all rows start with
    /// (by default those are computed once per batch; exact either way).
    #[arg(long)]
    whole_rows: bool,
    /// Label smoothing of the training loss (0 to below 1; 0: none).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
}

/// A label set from a JSON file (a list of at least 2 distinct, non-empty strings).
fn read_labels(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::Setting(format!("--labels {}: {e}", path.display())))?;
    let v: Vec<String> = serde_json::from_str(&text).map_err(|e| {
        TrainError::Setting(format!(
            "--labels {}: not a JSON list of strings: {e}",
            path.display()
        ))
    })?;
    retune_config::check_labels(&v)
        .map_err(|e| TrainError::Setting(format!("--labels {}: {e}", path.display())))?;
    Ok(v)
}

fn modules(names: &[String]) -> anyhow::Result<Vec<usize>> {
    Ok(retune_trainer::lora::parse_modules(names)?)
}

fn split_ref(r: &str) -> anyhow::Result<(String, String)> {
    match r.split_once('/') {
        Some((t, n)) if !t.is_empty() && !n.is_empty() => Ok((t.into(), n.into())),
        _ => Err(TrainError::Setting(format!("--register `{r}`: expected TENANT/NAME")).into()),
    }
}

fn source(c: &Common) -> anyhow::Result<DataSource> {
    if let Some(id) = &c.snapshot {
        let tenant = match (&c.tenant, &c.register) {
            (Some(t), _) => t.clone(),
            (None, Some(r)) => split_ref(r)?.0,
            (None, None) => {
                return Err(TrainError::Setting(
                    "--snapshot needs --tenant (or --register TENANT/NAME)".into(),
                )
                .into())
            }
        };
        return Ok(DataSource::Snapshot {
            db: c
                .datasets_url
                .clone()
                .unwrap_or_else(|| c.root.join("datasets.db").to_string_lossy().into_owned()),
            tenant,
            id: id.clone(),
        });
    }
    let path = c
        .data
        .clone()
        .ok_or_else(|| TrainError::Setting("--snapshot or --data is required".into()))?;
    if c.eval_percent > 50 {
        return Err(TrainError::Setting("--eval-percent at most 50".into()).into());
    }
    Ok(DataSource::Jsonl {
        path,
        eval_percent: c.eval_percent,
    })
}

struct Loaded {
    model: retune_engine::DeviceModel,
    tok: retune_engine::Tok,
    template: retune_engine::ChatTemplate,
    base_name: String,
}

fn load(c: &Common, max_len: usize) -> anyhow::Result<Loaded> {
    let l =
        retune_engine::load(&c.model).with_context(|| format!("loading {}", c.model.display()))?;
    let dev = retune_engine::device::parse_device(&c.device)?;
    let model = retune_engine::DeviceModel::for_training(l.model, &dev, max_len)?;
    Ok(Loaded {
        model,
        tok: l.tok,
        template: l.template,
        base_name: c
            .model
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
    })
}

fn settings(a: &TrainArgs, n_layers: usize) -> anyhow::Result<TrainSettings> {
    let first_layer = match a.top_layers {
        Some(0) => {
            return Err(TrainError::Setting("--top-layers must be at least 1".into()).into())
        }
        Some(k) => n_layers.saturating_sub(k),
        None => 0,
    };
    let c = &a.common;
    Ok(TrainSettings {
        lora: LoraSpec {
            rank: a.rank,
            alpha: a.alpha,
            rslora: a.rslora,
            modules: modules(&a.modules)?,
            first_layer,
        },
        dropout: a.dropout,
        optim: retune_trainer::AdamWConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        warmup_steps: a.warmup,
        epochs: a.epochs,
        max_steps: a.max_steps,
        max_minutes: a.max_minutes,
        batch_size: c.batch_size,
        grad_accum: a.grad_accum,
        max_grad_norm: a.max_grad_norm,
        max_len: c.max_len,
        overflow: c.overflow,
        eval_every: a.eval_every,
        patience: a.patience,
        seed: c.seed,
        min_examples: a.min_examples,
        checkpoint_every: a.checkpoint_every,
        cache_frozen: !a.no_cache_frozen,
        save_at_minutes: a.save_at_minutes.clone(),
        labels: a.labels.as_deref().map(read_labels).transpose()?,
        fit_to_budget: a.fit_to_budget,
        share_prefix: !a.whole_rows,
        label_smoothing: a.label_smoothing,
    })
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let reg = c.register.as_deref().map(split_ref).transpose()?;
    let src = source(c)?;
    let l = load(c, c.max_len)?;
    let s = settings(&a, l.model.cfg.n_layer)?;
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(1);
    if tty {
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  elapsed {elapsed_precise}  eta {eta_precise}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_log = std::time::Instant::now();
    let mut last_eval = String::new();
    let job = Job {
        model: &l.model,
        tok: &l.tok,
        template: &l.template,
        source: src,
        settings: s,
        out: a.out.clone(),
        init: a.init.clone(),
        resume: a.resume,
        fresh: a.fresh,
        base_name: l.base_name.clone(),
    };
    let res = run(job, |p| match p {
        Progress::Step {
            step,
            total,
            loss,
            lr,
            tokens_per_s,
            elapsed_s,
        } => {
            bar.set_length(*total as u64);
            bar.set_position(*step as u64);
            bar.set_message(format!(
                "loss {loss:.4}{last_eval}  {tokens_per_s:.0} tok/s  lr {lr:.2e}"
            ));
            if !tty && (last_log.elapsed().as_secs() >= 10 || step == total) {
                last_log = std::time::Instant::now();
                let eta = elapsed_s / *step as f64 * (*total - *step) as f64;
                eprintln!(
                    "step {step}/{total} loss {loss:.4}{last_eval} {tokens_per_s:.0} tok/s lr {lr:.2e} elapsed {elapsed_s:.0}s eta {eta:.0}s"
                );
            }
            std::ops::ControlFlow::Continue(())
        }
        Progress::Eval { step, loss } => {
            last_eval = format!("  eval {loss:.4}");
            if !tty {
                eprintln!("eval at step {step}: {loss:.4}");
            }
            std::ops::ControlFlow::Continue(())
        }
        Progress::Saved { path } => {
            bar.println(format!("saved {}", path.display()));
            std::ops::ControlFlow::Continue(())
        }
    })?;
    bar.finish_and_clear();
    let r = &res.record;
    println!(
        "trained {} steps ({:.2} epochs, {}) on {} examples ({} eval; dropped {:?}, truncated {}): {:.0} tokens/s, peak {:.0} MiB, {:.0} s",
        r.steps,
        r.epochs_done,
        r.stopped,
        r.examples,
        r.eval_examples,
        r.dropped,
        r.truncated,
        r.tokens_per_second,
        r.peak_rss_mib,
        r.wall_seconds
    );
    if let Some(t) = r.steady_tokens_per_second {
        println!("after the first two steps: {t:.0} tokens/s");
    }
    if let Some((s, e)) = r.best_eval {
        println!("best eval loss {e:.4} at step {s}");
    }
    println!("adapter: {}", res.adapter_dir.display());
    println!("record:  {}", res.record_path.display());
    println!("plot:    {}", res.plot_path.display());
    if let Some((tenant, name)) = reg {
        let v = register(
            &c.root,
            &retune_trainer::Stores {
                registry_url: c.registry_url.as_deref(),
                store_url: c.store_url.as_deref(),
                store_endpoint: c.store_endpoint.as_deref(),
            },
            &tenant,
            &name,
            &res.adapter_dir,
            r,
            &l.model,
            None,
        )?;
        println!("registered {tenant}/{name} version {} (not promoted)", v.id);
    }
    Ok(())
}

fn tokenize_cmd(c: Common, out: PathBuf, epochs: u64) -> anyhow::Result<()> {
    let src = source(&c)?;
    let l =
        retune_engine::load(&c.model).with_context(|| format!("loading {}", c.model.display()))?;
    let s = TrainSettings {
        max_len: c.max_len,
        overflow: c.overflow,
        batch_size: c.batch_size,
        seed: c.seed,
        ..Default::default()
    };
    let (train, _, _) = prepare_source(&src, &l.tok, &l.template, &s)?;
    let lengths: Vec<usize> = train.examples.iter().map(|e| e.tokens.len()).collect();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?,
    );
    let mut n = 0;
    for epoch in 0..epochs {
        for ids in epoch_batches(&lengths, c.batch_size, c.seed, epoch) {
            let refs: Vec<_> = ids.iter().map(|&i| &train.examples[i]).collect();
            let input_ids: Vec<&[u32]> = refs.iter().map(|e| e.tokens.as_slice()).collect();
            let labels: Vec<Vec<i64>> = refs
                .iter()
                .map(|e| {
                    e.tokens
                        .iter()
                        .zip(&e.weights)
                        .map(|(&t, &w)| if w > 0.0 { t as i64 } else { -100 })
                        .collect()
                })
                .collect();
            serde_json::to_writer(
                &mut f,
                &serde_json::json!({"input_ids": input_ids, "labels": labels}),
            )?;
            f.write_all(b"\n")?;
            n += 1;
        }
    }
    f.flush()?;
    println!(
        "{n} batches of {} examples ({} tokens per epoch; dropped {:?}) → {}",
        train.examples.len(),
        train.tokens(),
        train.dropped,
        out.display()
    );
    Ok(())
}

fn daemon_cmd(at: &SettingsArgs, once: bool, holder: Option<String>) -> anyhow::Result<()> {
    let settings = at.load()?;
    let t = &settings.trainer;
    // before any thread exists, so every thread inherits them
    if t.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", t.threads.to_string());
    }
    #[cfg(target_os = "linux")]
    unsafe {
        // serving on the same node wins the CPU when both want it
        libc::setpriority(libc::PRIO_PROCESS, 0, t.nice);
        if t.priority == "idle" {
            let p = libc::sched_param { sched_priority: 0 };
            if libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) != 0 {
                tracing::warn!(
                    "SCHED_IDLE refused ({}); running at nice {}",
                    std::io::Error::last_os_error(),
                    t.nice
                );
            }
        }
    }
    let holder = holder
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "retune-trainer".into());
    let poll = std::time::Duration::from_secs_f64(t.poll_seconds);
    // SIGTERM (the kubelet; as PID 1 in a container an unhandled one is
    // ignored) and SIGINT: end the run at its next step, release the lease,
    // exit. Installed before the model loads, so an early stop is not lost.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let flag = stop.clone();
        // SAFETY: the action only stores to an atomic (async-signal-safe)
        let installed = unsafe {
            signal_hook_registry::register(sig, move || {
                flag.store(true, std::sync::atomic::Ordering::Relaxed)
            })
        };
        if let Err(e) = installed {
            tracing::error!(
                "cannot install a handler for signal {sig}: {e}; a stop will kill a run"
            );
        }
    }
    let d = retune_trainer::daemon::Daemon::open(settings, holder)?.with_stop_flag(stop);
    eprintln!(
        "retune-trainer daemon: holder {}, looking every {:?}",
        d.holder, poll
    );
    loop {
        if d.stop_requested() {
            eprintln!("retune-trainer daemon: stopped");
            return Ok(());
        }
        match d.pass() {
            Ok(outcomes) => {
                for o in outcomes {
                    println!("{}", serde_json::to_string(&o)?);
                }
            }
            // a failing pass (a store briefly unavailable) is retried next pass
            Err(e) if !once => tracing::error!("pass failed: {e}"),
            Err(e) => return Err(e.into()),
        }
        if once {
            return Ok(());
        }
        let until = std::time::Instant::now() + poll;
        while !d.stop_requested() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(100).min(poll));
        }
    }
}

fn status_cmd(at: &SettingsArgs, json: bool) -> anyhow::Result<()> {
    let settings = at.load()?;
    let root = settings
        .adapters
        .root
        .clone()
        .ok_or_else(|| TrainError::Setting("adapters.root is not set".into()))?;
    let st = retune_trainer::daemon::status(&settings, &root)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    let c = &st.counts;
    println!(
        "runs {:?}; gate passes {}, fails {}; automatic rollbacks {}; watching {}",
        c.runs, c.gate_passes, c.gate_fails, c.auto_rollbacks, c.watching
    );
    for a in &st.adapters {
        println!(
            "{}/{}: live {}, canary {}, lease {}, {} new examples since the last data mark",
            a.tenant,
            a.name,
            a.live.as_deref().unwrap_or("-"),
            a.canary
                .as_ref()
                .map(|c| format!("{} at {}%", c.0, c.1))
                .unwrap_or_else(|| "-".into()),
            a.lease.as_deref().unwrap_or("free"),
            a.new_examples
        );
        for r in &a.runs {
            println!(
                "  run {} {}{}: {}",
                r.id,
                r.status,
                r.version
                    .as_ref()
                    .map(|v| format!(" → {v}"))
                    .unwrap_or_default(),
                r.detail
                    .get("reason")
                    .and_then(|x| x.as_str())
                    .unwrap_or("")
            );
        }
        if let Some(w) = &a.watch {
            println!(
                "  watch {} ({}): {} {}",
                w.version,
                w.mode,
                w.status,
                w.verdict
                    .get("state")
                    .and_then(|x| x.as_str())
                    .unwrap_or("")
            );
        }
    }
    Ok(())
}

/// Keep freed memory in the process: training allocates and frees the same
/// activation-sized buffers every step, and glibc's defaults hand each large one
/// back to the kernel (the next step then pays a page fault per 4 KiB; measured
/// at ≈ 15% of a step's time on SmolLM2).
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // up to 1 GiB of freed memory stays mapped (peak RSS unchanged: 4.3 GB on
        // SmolLM2 batch 16 either way; 167 → 201 tokens/s)
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn eval_cmd(
    model: &std::path::Path,
    data: &std::path::Path,
    adapters: &[PathBuf],
    limit: Option<usize>,
    (batch, max_new): (usize, usize),
    answers: Option<&std::path::Path>,
    labels: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let labels = labels.map(read_labels).transpose()?;
    let l = retune_engine::load(model).with_context(|| format!("loading {}", model.display()))?;
    let text =
        std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let (rows, errors) = retune_datasets::parse_jsonl(&text);
    if let Some(e) = errors.first() {
        return Err(
            TrainError::Data(format!("{}: line {}: {}", data.display(), e.line, e.reason)).into(),
        );
    }
    let mut bodies: Vec<_> = rows.into_iter().map(|r| r.body).collect();
    if let Some(n) = limit {
        bodies.truncate(n);
    }
    let mut runs: Vec<(String, Option<retune_adapters::LoraAdapter>)> = Vec::new();
    if adapters.is_empty() {
        runs.push(("base".into(), None));
    }
    for a in adapters {
        let la = retune_adapters::load_peft(a, &l.model.base_shapes(), &Default::default())
            .with_context(|| format!("loading adapter {}", a.display()))?;
        runs.push((a.display().to_string(), Some(la)));
    }
    for (name, a) in &runs {
        let acc = retune_trainer::eval::exact_match(
            &l.model,
            &l.tok,
            &l.template,
            a.as_ref(),
            &bodies,
            (max_new, batch),
            labels.as_deref(),
        )?;
        println!(
            "{}",
            serde_json::json!({"adapter": name, "accuracy": acc.accuracy, "correct": acc.correct, "total": acc.total, "seconds": acc.seconds})
        );
        if let Some(path) = answers {
            let lines: String = acc
                .answers
                .iter()
                .map(|a| format!("{}\n", serde_json::json!({ "answer": a.trim() })))
                .collect();
            std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

fn main() {
    retune_engine::cpu::require_build_features();
    if std::env::var_os("RETUNE_MALLOPT").is_some() {
        keep_freed_memory();
    }
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Train(a) => a.common.threads,
        Cmd::Tokenize { common, .. } => common.threads,
        Cmd::Eval { threads, .. } => *threads,
        Cmd::Daemon { .. } | Cmd::Status { .. } => None,
    };
    if let Some(t) = threads {
        // before anything starts rayon: candle and gemm size their work by it
        std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let res = match cli.cmd {
        Cmd::Train(a) => train_cmd(a),
        Cmd::Tokenize {
            common,
            out,
            epochs,
        } => tokenize_cmd(common, out, epochs),
        Cmd::Eval {
            model,
            data,
            adapter,
            limit,
            batch,
            max_new,
            answers,
            labels,
            ..
        } => eval_cmd(
            &model,
            &data,
            &adapter,
            limit,
            (batch, max_new),
            answers.as_deref(),
            labels.as_deref(),
        ),
        Cmd::Daemon { at, once, holder } => daemon_cmd(&at, once, holder),
        Cmd::Status { at, json } => status_cmd(&at, json),
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        let bad_input = e.downcast_ref::<TrainError>().is_some_and(|t| {
            matches!(
                t,
                TrainError::Data(_)
                    | TrainError::Datasets(
                        retune_datasets::DataError::NotFound(_)
                            | retune_datasets::DataError::Invalid { .. }
                    )
                    | TrainError::Setting(_)
                    | TrainError::BaseMismatch(_)
                    | TrainError::Adapter(_)
                    | TrainError::Checkpoint { .. }
            )
        });
        std::process::exit(if bad_input { 2 } else { 1 });
    }
}
