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

mod loop_cmds;
mod train_cmds;

use loop_cmds::{daemon_cmd, eval_cmd, status_cmd};
use train_cmds::{prior_cmd, tokenize_cmd, train_cmd, TrainArgs};

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
    /// Give a classifier adapter (PEFT SEQ_CLS) the classical prior trained on
    /// these labelled rows (JSONL; replacing any it has): writes OUT, a copy of
    /// ADAPTER with the prior. `train` does this itself unless told not to.
    Prior {
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
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
        Cmd::Daemon { .. } | Cmd::Status { .. } | Cmd::Prior { .. } => None,
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
        Cmd::Prior {
            adapter,
            data,
            out,
            seed,
        } => prior_cmd(&adapter, &data, &out, seed),
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
