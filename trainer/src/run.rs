//! A whole training job: read the data (a dataset snapshot or a JSONL file),
//! tokenize it as the server will, train, write the PEFT directory, the training
//! record and the loss plot, and optionally register the result.

use crate::error::{io, Result, TrainError};
use crate::examples::{prepare, prepare_classes, Prepared};
use crate::lora::Adapter;
use crate::plot::loss_svg;
use crate::train::{train, Progress, RunInputs, TrainSettings, TrainingRecord};
use retune_datasets::curate::Split;
use retune_datasets::ExampleBody;
use retune_engine::{ChatTemplate, DeviceModel, Tok};
use retune_registry::{NewVersion, Registry, ServedBase, VersionInfo};
use std::path::{Path, PathBuf};

/// Where the examples come from.
pub enum DataSource {
    /// A snapshot in the datasets store (a SQLite file or a PostgreSQL URL,
    /// `db`): its train and eval splits.
    Snapshot {
        db: String,
        tenant: String,
        id: String,
    },
    /// An OpenAI-format JSONL file; `eval_percent` of it (by input hash) held out.
    Jsonl { path: PathBuf, eval_percent: u8 },
}

/// The examples of a source as (train, eval) bodies plus the snapshot id.
pub fn read_source(
    src: &DataSource,
) -> Result<(Vec<ExampleBody>, Vec<ExampleBody>, Option<String>)> {
    match src {
        DataSource::Snapshot { db, tenant, id } => {
            if !retune_datasets::is_postgres_url(db) && !std::path::Path::new(db).exists() {
                return Err(TrainError::Data(format!("no datasets store at {db}")));
            }
            let store = retune_datasets::open(db)?;
            // less the suspect train rows its policy holds out
            let rows = retune_datasets::training_rows(store.as_ref(), tenant, id)?;
            if rows.is_empty() {
                return Err(TrainError::Data(format!("snapshot {id} is empty")));
            }
            let (mut tr, mut ev) = (Vec::new(), Vec::new());
            for r in rows {
                match r.split {
                    Split::Train => tr.push(r.body),
                    Split::Eval => ev.push(r.body),
                }
            }
            Ok((tr, ev, Some(id.clone())))
        }
        DataSource::Jsonl { path, eval_percent } => {
            let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    TrainError::Data(format!("{}: no such file", path.display()))
                }
                _ => TrainError::Io {
                    path: path.clone(),
                    source: e,
                },
            })?;
            let (rows, errors) = retune_datasets::parse_jsonl(&text);
            if let Some(e) = errors.first() {
                return Err(TrainError::Data(format!(
                    "{}: {} bad lines; line {}: {}",
                    path.display(),
                    errors.len(),
                    e.line,
                    e.reason
                )));
            }
            if rows.is_empty() {
                return Err(TrainError::Data(format!("{}: no examples", path.display())));
            }
            let (mut tr, mut ev) = (Vec::new(), Vec::new());
            for r in rows {
                let (input, _) = r.body.input_output();
                let key = retune_datasets::curate::input_key(&input);
                match retune_datasets::curate::split_of(&key, *eval_percent) {
                    Split::Train => tr.push(r.body),
                    Split::Eval => ev.push(r.body),
                }
            }
            Ok((tr, ev, None))
        }
    }
}

pub struct Job<'a> {
    pub model: &'a DeviceModel,
    pub tok: &'a Tok,
    pub template: &'a ChatTemplate,
    pub source: DataSource,
    pub settings: TrainSettings,
    pub out: PathBuf,
    pub init: Option<PathBuf>,
    /// Continue from `out/checkpoint`.
    pub resume: bool,
    /// Discard a checkpoint left in `out/` (without `resume` or `fresh`, one is refused).
    pub fresh: bool,
    /// `base_model_name_or_path` written into the adapter config.
    pub base_name: String,
}

pub struct JobResult {
    pub adapter_dir: PathBuf,
    pub record: TrainingRecord,
    pub record_path: PathBuf,
    pub plot_path: PathBuf,
    pub adapter: Adapter,
}

/// Tokenize both splits of a source.
pub fn prepare_source(
    src: &DataSource,
    tok: &Tok,
    template: &ChatTemplate,
    s: &TrainSettings,
) -> Result<(Prepared, Prepared, Option<String>)> {
    let (tr, ev, snap) = read_source(src)?;
    if let Some(labels) = &s.labels {
        let train = prepare_classes(&tr, tok, template, s.max_len, labels)?;
        let eval = prepare_classes(&ev, tok, template, s.max_len, labels)?;
        return Ok((train, eval, snap));
    }
    let train = prepare(&tr, tok, template, s.max_len, s.overflow)?;
    let eval = prepare(&ev, tok, template, s.max_len, s.overflow)?;
    Ok((train, eval, snap))
}

pub fn run(
    job: Job<'_>,
    progress: impl FnMut(&Progress) -> std::ops::ControlFlow<()>,
) -> Result<JobResult> {
    let (train_set, eval_set, snapshot) =
        prepare_source(&job.source, job.tok, job.template, &job.settings)?;
    let source_name = match &job.source {
        DataSource::Snapshot { tenant, id, .. } => format!("snapshot:{tenant}/{id}"),
        DataSource::Jsonl { path, .. } => format!("file:{}", path.display()),
    };
    std::fs::create_dir_all(&job.out).map_err(io(&job.out))?;
    let ckpt = job.out.join("checkpoint");
    if !job.resume && ckpt.exists() {
        if !job.fresh {
            return Err(TrainError::Setting(format!(
                "{} holds an earlier run's checkpoint: --resume continues it, --fresh discards it",
                ckpt.display()
            )));
        }
        std::fs::remove_dir_all(&ckpt).map_err(io(&ckpt))?;
    }
    let outcome = train(
        job.model,
        RunInputs {
            train: &train_set,
            eval: &eval_set,
            settings: &job.settings,
            init: job.init.as_deref(),
            checkpoint_dir: Some(&ckpt),
            out_dir: Some(&job.out),
            base_name: &job.base_name,
            snapshot,
            data_source: source_name,
            tok: Some(job.tok),
        },
        progress,
    )?;
    let adapter_dir = job.out.join("adapter");
    outcome.adapter.save_peft(&adapter_dir, &job.base_name)?;
    let record_path = job.out.join("training.json");
    let js = serde_json::to_vec_pretty(&outcome.record)
        .map_err(|e| TrainError::Setting(e.to_string()))?;
    std::fs::write(&record_path, js).map_err(io(&record_path))?;
    let plot_path = job.out.join("loss.svg");
    let title = format!(
        "{} · r={} · {} steps · {:.0} tok/s",
        outcome.record.data_source,
        job.settings.lora.rank,
        outcome.record.steps,
        outcome.record.tokens_per_second
    );
    std::fs::write(&plot_path, loss_svg(&outcome.record, &title)).map_err(io(&plot_path))?;
    // a finished run needs no checkpoint
    let _ = std::fs::remove_dir_all(&ckpt);
    Ok(JobResult {
        adapter_dir,
        record: outcome.record,
        record_path,
        plot_path,
        adapter: outcome.adapter,
    })
}

/// Where the shared stores are, when not under the data root.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stores<'a> {
    /// A PostgreSQL registry instead of `root/registry.db`.
    pub registry_url: Option<&'a str>,
    /// An S3-compatible version store (`root/store` is then its local cache).
    pub store_url: Option<&'a str>,
    pub store_endpoint: Option<&'a str>,
}

/// Register a trained adapter under `tenant/name` in the registry at `root`
/// (registry.db + store/, or the shared `stores`), refusing a base other than the one the adapter's versions so
/// far were made for. Not promoted: that is the eval gate's call.
#[allow(clippy::too_many_arguments)]
pub fn register(
    root: &Path,
    stores: &Stores<'_>,
    tenant: &str,
    name: &str,
    adapter_dir: &Path,
    record: &TrainingRecord,
    model: &DeviceModel,
    parent: Option<&str>,
) -> Result<VersionInfo> {
    let store =
        retune_registry::open_store(&root.join("store"), stores.store_url, stores.store_endpoint)?;
    let reg = match stores.registry_url {
        Some(url) => Registry::open_at(url, store, 4 << 30)?,
        None => Registry::open(&root.join("registry.db"), store, 4 << 30)?,
    };
    let base = ServedBase {
        shapes: model.base_shapes(),
        fingerprint: model.fingerprint(),
    };
    if let Ok(versions) = reg.versions(tenant, name) {
        if let Some(v) = versions
            .iter()
            .find(|v| v.base_fingerprint != base.fingerprint)
        {
            return Err(TrainError::BaseMismatch(format!(
                "{tenant}/{name} has version {} for base `{}`; this adapter was trained on `{}`",
                v.id, v.base_fingerprint, base.fingerprint
            )));
        }
    }
    let mut metadata = serde_json::json!({ "training": record });
    if let Some(s) = &record.snapshot {
        metadata["snapshot"] = serde_json::json!(s);
    }
    let source = format!("trainer:{}", record.data_hash);
    Ok(reg.register(
        NewVersion {
            tenant,
            name,
            dir: adapter_dir,
            source: &source,
            parent,
            metadata,
            claimed_base: Some(&base.fingerprint),
            actor: "retune-trainer",
        },
        &base,
    )?)
}
