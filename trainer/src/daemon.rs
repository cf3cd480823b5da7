//! `retune-trainer daemon`: the loop. Each pass checks every open watch, then
//! trains at most one adapter that is due — enough new accepted examples since
//! the data its last version or run was made from, its schedule, or a retrain
//! request (erasure) — under a lease, gates the candidate and registers it with
//! the gate's decision in one transaction.
//!
//! A crash anywhere leaves the registry consistent: the version row, its verdict,
//! the rollout and the watch commit together or not at all; a run left `running`
//! becomes `crashed` when its holder starts again (or its lease lapses), and the
//! next run starts from a fresh work directory.
//!
//! A stop request (SIGTERM from the kubelet, SIGINT) ends a training run at its
//! next step: the run becomes `interrupted` (not a failure: no `run-failed`
//! entry, its data still counts as new), the lease is released and the process
//! exits before the pod's grace period ends. The gate, once started, finishes.

use crate::error::{Result, TrainError};
use crate::gate::{run_gate, GateInputs, GateReport};
use crate::lora::{parse_modules, LoraSpec};
use crate::optim::AdamWConfig;
use crate::run::{run, DataSource, Job};
use crate::train::{Progress, TrainSettings};
use retune_adapters::{load_peft, AdapterRef, Via};
use retune_config::{LoopSettings, Objective, RolloutMode, Settings};
use retune_datasets::curate::Split;
use retune_datasets::{DatasetStore, Policy};
use retune_engine::{ChatTemplate, DeviceModel, Model, Tok};
use retune_registry::{
    Decision, Expect, JournalEvent, NewVersion, Registry, RegistryError, Rollout, RunStatus,
    ServedBase,
};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub const ACTOR: &str = "retune-trainer";

use retune_config::now_ms;

/// Why an adapter is trained now.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    NewExamples(usize),
    Schedule { new: usize },
    Retrain(String),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NewExamples(n) => write!(f, "{n} new accepted examples"),
            Self::Schedule { new } => write!(f, "schedule ({new} new examples)"),
            Self::Retrain(r) => write!(f, "retrain requested: {r}"),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunOutcome {
    pub run: String,
    /// Promoted, canary, rejected, failed, skipped or interrupted.
    pub status: RunStatus,
    pub version: Option<String>,
    pub reason: String,
}

pub use crate::status::{data_mark, status, AdapterStatus, Status};

pub struct Daemon {
    pub settings: Settings,
    pub reg: Registry,
    pub data: Arc<dyn DatasetStore>,
    /// The datasets store's location (a SQLite file or a PostgreSQL URL).
    db_path: String,
    work: PathBuf,
    serve: Model,
    train_model: DeviceModel,
    tok: Tok,
    template: ChatTemplate,
    base: ServedBase,
    base_name: String,
    pub holder: String,
    stop: Arc<AtomicBool>,
}

impl Daemon {
    /// Open the stores and load the base model (once for serving-exact evals,
    /// once for training); runs this holder left `running` become `crashed`.
    pub fn open(settings: Settings, holder: String) -> Result<Self> {
        let root = settings.adapters.root.clone().ok_or_else(|| {
            TrainError::Setting("adapters.root is not set: the daemon needs the data root".into())
        })?;
        let db_path = settings
            .datasets
            .location(&settings.adapters)
            .unwrap_or_else(|| root.join("datasets.db").to_string_lossy().into_owned());
        let data = retune_datasets::open(&db_path)?;
        let store = retune_registry::open_store(
            &root.join("store"),
            settings.adapters.store_url.as_deref(),
            settings.adapters.store_endpoint.as_deref(),
        )?;
        let reg = Registry::open_at(
            &settings.adapters.registry_location(&root),
            store,
            settings.adapters.max_version_bytes,
        )?;
        let work = settings
            .trainer
            .work_dir
            .clone()
            .unwrap_or_else(|| root.join("trainer"));
        let path = &settings.model.path;
        let l = retune_engine::load(path)?;
        let max_len = settings.trainer.defaults.train.max_len.max(
            settings
                .trainer
                .adapters
                .iter()
                .filter_map(|a| a.train.as_ref())
                .map(|t| t.max_len)
                .max()
                .unwrap_or(0),
        );
        let lt = retune_engine::load(path)?;
        let train_model = DeviceModel::for_training(lt.model, &candle_core::Device::Cpu, max_len)?;
        let base = ServedBase {
            shapes: l.model.base_shapes(),
            fingerprint: l.model.fingerprint(),
        };
        let d = Self {
            base_name: path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            settings,
            reg,
            data,
            db_path,
            work,
            serve: l.model,
            train_model,
            tok: l.tok,
            template: l.template,
            base,
            holder,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let n = d.reg.mark_crashed_of(&d.holder)?;
        if n > 0 {
            tracing::warn!(runs = n, holder = %d.holder, "runs left running by an earlier process of this holder are marked crashed");
        }
        d.clean_work()?;
        Ok(d)
    }

    /// Use `flag` as the stop flag, which a signal handler installed before
    /// `open` sets (a signal during the model load is not lost): a training
    /// run ends at its next step as `interrupted`, and `pass` starts nothing new.
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = flag;
        self
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Remove the work directories of runs that are not running (crashed ones
    /// leave theirs): each run has its own, so another daemon's are never touched.
    fn clean_work(&self) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.work) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            let running = matches!(self.reg.run(&id), Ok(r) if r.status == RunStatus::Running);
            if !running {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Adapters the daemon looks after, with their settings: configured ones
    /// (enabled), then, with `discover`, every other adapter with data.
    pub fn targets(&self) -> Result<Vec<(String, String, LoopSettings)>> {
        let t = &self.settings.trainer;
        let mut out: Vec<(String, String, LoopSettings)> = t
            .adapters
            .iter()
            .filter(|a| a.enabled)
            .map(|a| (a.tenant.clone(), a.name.clone(), a.resolve(&t.defaults)))
            .collect();
        if t.discover {
            for (tenant, name) in self.data.adapters()? {
                if !t
                    .adapters
                    .iter()
                    .any(|a| a.tenant == tenant && a.name == name)
                {
                    out.push((tenant, name, t.defaults.clone()));
                }
            }
        }
        Ok(out)
    }

    pub fn data_mark(&self, tenant: &str, name: &str) -> Result<i64> {
        data_mark(&self.reg, self.data.as_ref(), tenant, name)
    }

    /// Whether `tenant/name` should be trained now, and why.
    pub fn due(&self, tenant: &str, name: &str, ls: &LoopSettings) -> Result<Option<Trigger>> {
        let runs = self.reg.runs(tenant, name, 1)?;
        let last_start = runs.first().map(|r| r.started_at).unwrap_or(0);
        if let Ok(j) = self.reg.journal(tenant, name) {
            if let Some(e) = j
                .iter()
                .rev()
                .find(|e| e.event == JournalEvent::Retrain && e.at > last_start)
            {
                return Ok(Some(Trigger::Retrain(e.reason.clone())));
            }
        }
        let mark = self.data_mark(tenant, name)?;
        let new = self
            .data
            .candidates_since(tenant, name, mark, ls.data.include_positive)?;
        if new >= ls.trigger.min_new_examples {
            return Ok(Some(Trigger::NewExamples(new)));
        }
        if let (Some(every), Some(last)) = (ls.trigger.every_minutes, runs.first()) {
            let since = last.finished_at.unwrap_or(last.started_at);
            if new > 0 && (now_ms() - since) as f64 >= every * 60_000.0 {
                return Ok(Some(Trigger::Schedule { new }));
            }
        }
        Ok(None)
    }

    /// One pass: every open watch, then the first due adapter.
    pub fn pass(&self) -> Result<Vec<RunOutcome>> {
        let targets = self.targets()?;
        for w in self.reg.open_watches()? {
            let ls = targets
                .iter()
                .find(|(t, n, _)| *t == w.tenant && *n == w.name)
                .map(|x| x.2.clone())
                .unwrap_or_else(|| self.settings.trainer.defaults.clone());
            match crate::watch::tick(
                &self.reg,
                self.data.as_ref(),
                &w,
                &ls.watch,
                now_ms(),
                ACTOR,
            ) {
                Ok(status) if status != retune_registry::WatchStatus::Watching => {
                    tracing::info!(tenant = %w.tenant, adapter = %w.name, version = %w.version, %status, "watch ended")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(tenant = %w.tenant, adapter = %w.name, "watch: {e}"),
            }
        }
        let mut out = Vec::new();
        for (tenant, name, ls) in targets {
            if self.stop_requested() {
                break;
            }
            if let Some(trigger) = self.due(&tenant, &name, &ls)? {
                if let Some(o) = self.train_adapter(&tenant, &name, &ls, &trigger)? {
                    out.push(o);
                    break; // one training per pass: watches get looked at between runs
                }
            }
        }
        Ok(out)
    }

    fn train_settings(&self, ls: &LoopSettings) -> Result<TrainSettings> {
        let t = &ls.train;
        let n_layers = self.train_model.cfg.n_layer;
        Ok(TrainSettings {
            lora: LoraSpec {
                rank: t.rank,
                alpha: t.alpha,
                rslora: false,
                modules: parse_modules(&t.modules)?,
                first_layer: t
                    .top_layers
                    .map(|k| n_layers.saturating_sub(k))
                    .unwrap_or(0),
            },
            optim: AdamWConfig {
                lr: t.lr,
                ..Default::default()
            },
            warmup_steps: t.warmup_steps,
            epochs: t.epochs,
            max_minutes: t.max_minutes,
            batch_size: t.batch_size,
            max_len: t.max_len,
            eval_every: t.eval_every,
            patience: t.patience,
            seed: t.seed,
            min_examples: ls.trigger.min_examples,
            checkpoint_every: 0,
            labels: match t.objective {
                Objective::Generate => None,
                // a declared label task is learned as a classifier (config
                // validation refuses `classify` without labels)
                Objective::Auto | Objective::Classify => ls.data.labels.clone(),
            },
            // the budget binds on a slow machine: the schedule still finishes
            fit_to_budget: t.max_minutes.is_some(),
            label_smoothing: t.label_smoothing,
            lora_plus_ratio: t.lora_plus_ratio,
            classical_prior: t.classical_prior,
            ..TrainSettings::default()
        })
    }

    /// Train, gate and register one adapter under its lease. `None`: another
    /// trainer holds the lease.
    pub fn train_adapter(
        &self,
        tenant: &str,
        name: &str,
        ls: &LoopSettings,
        trigger: &Trigger,
    ) -> Result<Option<RunOutcome>> {
        let ttl = self.settings.trainer.lease_seconds as i64 * 1000;
        if !self.reg.acquire_lease(tenant, name, &self.holder, ttl)? {
            return Ok(None);
        }
        self.reg.mark_crashed(tenant, name)?;
        let run_id = format!("{tenant}.{name}.{}.{:08x}", now_ms(), rand::random::<u32>());
        self.reg.run_start(&run_id, tenant, name, &self.holder)?;
        tracing::info!(%tenant, adapter = %name, run = %run_id, %trigger, "training");
        let dir = self.work.join(&run_id);
        let res = self.run_steps(tenant, name, ls, trigger, &run_id, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        let outcome = match res {
            Ok(o) => o,
            Err(e @ TrainError::Interrupted { .. }) if self.stop_requested() => {
                let reason = format!("stopped by a signal: {e}");
                let detail = serde_json::json!({"trigger": trigger.to_string(), "reason": reason});
                self.end_run(
                    tenant,
                    name,
                    &run_id,
                    RunStatus::Interrupted,
                    None,
                    &detail,
                    reason,
                )?
            }
            Err(e) => {
                let reason = e.to_string();
                let detail = serde_json::json!({"trigger": trigger.to_string(), "reason": reason});
                self.end_run(
                    tenant,
                    name,
                    &run_id,
                    RunStatus::Failed,
                    None,
                    &detail,
                    reason,
                )?
            }
        };
        self.reg.release_lease(tenant, name, &self.holder)?;
        tracing::info!(%tenant, adapter = %name, run = %run_id, status = %outcome.status, reason = %outcome.reason, "run ended");
        Ok(Some(outcome))
    }

    /// Finish a run that registered nothing (`failed` or `skipped`): its record,
    /// a `run-failed` journal entry when it failed, and the outcome.
    #[allow(clippy::too_many_arguments)]
    fn end_run(
        &self,
        tenant: &str,
        name: &str,
        run_id: &str,
        status: RunStatus,
        snapshot: Option<&str>,
        detail: &serde_json::Value,
        reason: String,
    ) -> Result<RunOutcome> {
        self.reg
            .run_update(run_id, status, snapshot, None, detail, true)?;
        if status == RunStatus::Failed {
            let why = format!("run {run_id}: {reason}");
            self.reg
                .note(tenant, name, JournalEvent::RunFailed, None, ACTOR, &why)?;
        }
        Ok(RunOutcome {
            run: run_id.into(),
            status,
            version: None,
            reason,
        })
    }

    fn renew(&self, tenant: &str, name: &str) -> Result<()> {
        let ttl = self.settings.trainer.lease_seconds as i64 * 1000;
        Ok(self.reg.renew_lease(tenant, name, &self.holder, ttl)?)
    }

    fn run_steps(
        &self,
        tenant: &str,
        name: &str,
        ls: &LoopSettings,
        trigger: &Trigger,
        run_id: &str,
        dir: &Path,
    ) -> Result<RunOutcome> {
        let policy = Policy {
            include_positive: ls.data.include_positive,
            scrub: ls.data.scrub,
            eval_percent: ls.data.eval_percent,
            suspects: ls.data.suspects,
        };
        let m = retune_datasets::snapshot_with_suspects(self.data.as_ref(), tenant, name, &policy)?;
        let mut detail = serde_json::json!({"trigger": trigger.to_string(), "snapshot": &m});
        self.reg.run_update(
            run_id,
            RunStatus::Running,
            Some(&m.id),
            None,
            &detail,
            false,
        )?;
        // (after the snapshot is on the run: the same data is not retried)
        // a declared label that cannot fit a training example is bad input
        for l in ls.data.labels.iter().flatten() {
            let n = self.tok.encode(l, false)?.len();
            if n > ls.train.max_len {
                return Err(TrainError::Data(format!(
                    "declared label `{l}` is {n} tokens, longer than train.max_len ({})",
                    ls.train.max_len
                )));
            }
        }
        let mut skip = |status: RunStatus, reason: String| -> Result<RunOutcome> {
            detail["reason"] = serde_json::json!(reason);
            self.end_run(tenant, name, run_id, status, Some(&m.id), &detail, reason)
        };
        let already = self.reg.versions(tenant, name).ok().and_then(|vs| {
            vs.into_iter().find(|v| {
                v.metadata.get("snapshot").and_then(|s| s.as_str()) == Some(m.id.as_str())
            })
        });
        if let (Some(v), false) = (&already, matches!(trigger, Trigger::Retrain(_))) {
            return skip(
                RunStatus::Skipped,
                format!(
                    "snapshot {} was already trained on (version {})",
                    m.id, v.id
                ),
            );
        }
        if m.train == 0 && !m.conflicts.is_empty() {
            return skip(RunStatus::Failed, format!(
                "every example conflicts: {} inputs have different answers, nothing left to train on",
                m.conflicts.len()
            ));
        }
        if m.train < ls.trigger.min_examples {
            return skip(
                RunStatus::Failed,
                format!(
                    "too few examples: {} for training (at least {}), dropped {:?}",
                    m.train, ls.trigger.min_examples, m.dropped
                ),
            );
        }
        if m.eval == 0 {
            return skip(
                RunStatus::Failed,
                "no eval examples: the gate has nothing to judge on".into(),
            );
        }
        // the live version the candidate must beat
        let state = self.reg.state(tenant, name).ok();
        let live_id = state.as_ref().and_then(|s| s.live.clone());
        let live = match &live_id {
            Some(v) => {
                let info = self.reg.version(tenant, name, v)?;
                if info.base_fingerprint != self.base.fingerprint {
                    return Err(TrainError::BaseMismatch(format!(
                        "live version {v} of {tenant}/{name} is for base `{}`, the trainer's base is `{}`",
                        info.base_fingerprint, self.base.fingerprint
                    )));
                }
                let r = AdapterRef::new(tenant, name, v, Via::Live).map_err(RegistryError::from)?;
                let dir = self.reg.servable_dir(&r)?;
                Some(load_peft(&dir, &self.base.shapes, &Default::default())?)
            }
            None => None,
        };
        // train
        let mut settings = self.train_settings(ls)?;
        // a small snapshot's few steps are not all warm-up: at most a tenth of them
        let planned =
            (m.train.div_ceil(settings.batch_size.max(1)) as f64 * settings.epochs).ceil() as usize;
        settings.warmup_steps = settings.warmup_steps.min((planned / 10).max(1));
        let mut last_renew = std::time::Instant::now();
        let renew_every =
            std::time::Duration::from_secs((self.settings.trainer.lease_seconds / 4).max(1));
        let mut lease_err = None;
        let job = Job {
            model: &self.train_model,
            tok: &self.tok,
            template: &self.template,
            source: DataSource::Snapshot {
                db: self.db_path.clone(),
                tenant: tenant.into(),
                id: m.id.clone(),
            },
            settings,
            out: dir.to_path_buf(),
            init: None,
            resume: false,
            fresh: true,
            base_name: self.base_name.clone(),
        };
        let mut progress_detail = detail.clone();
        let result = run(job, |p: &Progress| {
            if self.stop_requested() {
                return ControlFlow::Break(());
            }
            if last_renew.elapsed() >= renew_every {
                last_renew = std::time::Instant::now();
                if let Err(e) = self.renew(tenant, name) {
                    lease_err = Some(e);
                    return ControlFlow::Break(());
                }
                if let Progress::Step {
                    step,
                    total,
                    loss,
                    tokens_per_s,
                    elapsed_s,
                    ..
                } = p
                {
                    tracing::info!(%tenant, adapter = %name, step, total, loss, tokens_per_s, "training");
                    progress_detail["progress"] = serde_json::json!({"step": step, "total": total, "loss": loss,
                        "tokens_per_second": tokens_per_s, "elapsed_seconds": elapsed_s});
                    // visible in `status` and the admin API while it runs
                    let _ = self.reg.run_update(
                        run_id,
                        RunStatus::Running,
                        None,
                        None,
                        &progress_detail,
                        false,
                    );
                }
            }
            ControlFlow::Continue(())
        });
        if let Some(e) = lease_err {
            return Err(e);
        }
        let result = result?;
        if self.stop_requested() {
            // trained but not yet gated: nothing is registered
            return Err(TrainError::Interrupted {
                step: result.record.steps,
                checkpoint: None,
            });
        }
        self.renew(tenant, name)?;
        // gate
        // the gate's train split as trained on (suspects held out by policy)
        let rows =
            retune_datasets::snapshot::training_rows(&m, self.data.snapshot_rows(tenant, &m.id)?);
        let (train_rows, eval_rows): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|r| r.split == Split::Train);
        let candidate = load_peft(&result.adapter_dir, &self.base.shapes, &Default::default())?;
        let mut gate_opts = ls.gate.clone();
        if matches!(trigger, Trigger::Retrain(_)) {
            // the live version is to be replaced (erased data): non-inferiority
            gate_opts.min_gain_over_live = -ls.gate.retrain_margin;
        }
        let report: GateReport = run_gate(&GateInputs {
            model: &self.serve,
            tok: &self.tok,
            template: &self.template,
            train: &train_rows,
            eval: &eval_rows,
            candidate: &candidate,
            live: live_id.as_deref().zip(live.as_ref()),
            options: &gate_opts,
            labels: ls.data.labels.as_deref(),
            seed: ls.train.seed,
            batch: 32,
        })?;
        self.renew(tenant, name)?;
        let summary = report.summary();
        detail["training"] = serde_json::to_value(&result.record).unwrap_or_default();
        detail["gate"] = serde_json::to_value(&report).unwrap_or_default();
        let decision = if report.passed {
            Decision::Pass {
                expect: live_id
                    .clone()
                    .map(Expect::Version)
                    .unwrap_or(Expect::NoLive),
                rollout: if ls.gate.rollout == RolloutMode::Canary {
                    Rollout::Canary(ls.gate.canary_percent)
                } else {
                    Rollout::Live
                },
                watch: ls.watch.enabled,
                summary: summary.clone(),
            }
        } else {
            Decision::Reject {
                reasons: summary.clone(),
            }
        };
        let metadata = serde_json::json!({
            "training": &result.record,
            "snapshot": &m.id,
            "gate": &report,
            "run": run_id,
        });
        let source = format!("trainer:{}", result.record.data_hash);
        let registered = self.reg.register_gated(
            NewVersion {
                tenant,
                name,
                dir: &result.adapter_dir,
                source: &source,
                parent: live_id.as_deref(),
                metadata,
                claimed_base: Some(&self.base.fingerprint),
                actor: ACTOR,
            },
            &self.base,
            &decision,
            &self.holder,
        );
        let (info, st) = match registered {
            Ok(x) => x,
            Err(RegistryError::Conflict { expected, actual }) => {
                return Err(TrainError::Setting(format!(
                    "the live version changed during the run (gated against {expected}, now {actual}): nothing registered; the next run gates against the new live version"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let status = if !report.passed {
            RunStatus::Rejected
        } else if st.canary.as_ref().map(|c| c.0.as_str()) == Some(info.id.as_str()) {
            RunStatus::Canary
        } else {
            RunStatus::Promoted
        };
        detail["reason"] = serde_json::json!(summary);
        self.reg
            .run_update(run_id, status, Some(&m.id), Some(&info.id), &detail, true)?;
        Ok(RunOutcome {
            run: run_id.into(),
            status,
            version: Some(info.id),
            reason: summary,
        })
    }
}
