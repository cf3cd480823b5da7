//! `retune-trainer train` and `retune-trainer tokenize`.

use super::*;

#[derive(Args)]
pub(super) struct TrainArgs {
    #[command(flatten)]
    pub(super) common: Common,
    /// Output directory.
    #[arg(long)]
    pub(super) out: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub(super) rank: usize,
    #[arg(long, default_value_t = 32.0)]
    pub(super) alpha: f32,
    /// Scale by alpha/sqrt(rank) (rsLoRA).
    #[arg(long)]
    pub(super) rslora: bool,
    /// Target modules (any of q,k,v,o,gate,up,down; `all`).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    pub(super) modules: Vec<String>,
    /// LoRA on the top N layers only (default: every layer).
    #[arg(long)]
    pub(super) top_layers: Option<usize>,
    #[arg(long, default_value_t = 0.0)]
    pub(super) dropout: f32,
    #[arg(long, default_value_t = 5e-4)]
    pub(super) lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub(super) weight_decay: f64,
    #[arg(long, default_value_t = 30)]
    pub(super) warmup: usize,
    #[arg(long, default_value_t = 1.0)]
    pub(super) epochs: f64,
    #[arg(long)]
    pub(super) max_steps: Option<usize>,
    /// Stop after this many minutes of training (the best adapter so far is kept).
    #[arg(long)]
    pub(super) max_minutes: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub(super) grad_accum: usize,
    /// Clip gradients to this global norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub(super) max_grad_norm: f64,
    /// Eval loss every N steps (0: at each epoch end).
    #[arg(long, default_value_t = 0)]
    pub(super) eval_every: usize,
    /// Early stop after N evals without improvement (0: off).
    #[arg(long, default_value_t = 0)]
    pub(super) patience: usize,
    #[arg(long, default_value_t = 8)]
    pub(super) min_examples: usize,
    /// Checkpoint every N steps (resume with --resume).
    #[arg(long, default_value_t = 50)]
    pub(super) checkpoint_every: usize,
    /// Resume from OUT/checkpoint when it matches these settings and data.
    #[arg(long, conflicts_with = "fresh")]
    pub(super) resume: bool,
    /// Discard a checkpoint an earlier run left in OUT.
    #[arg(long)]
    pub(super) fresh: bool,
    /// Start from this PEFT adapter instead of a fresh init.
    #[arg(long)]
    pub(super) init: Option<PathBuf>,
    /// Recompute the frozen layers below the LoRA layers every epoch.
    #[arg(long)]
    pub(super) no_cache_frozen: bool,
    /// Also save the adapter after these minutes of training (OUT/at-<m>min).
    #[arg(long, value_delimiter = ',')]
    pub(super) save_at_minutes: Vec<f64>,
    /// Train a classifier over these labels (a JSON file: a list of strings, the
    /// head's row order): a head on the last prompt token instead of generating
    /// the answer; examples whose answer is not one of them are left out.
    #[arg(long)]
    pub(super) labels: Option<PathBuf>,
    /// With --max-minutes: decay the learning rate by the time spent as well as
    /// by the steps, so a run the budget cuts ends annealed.
    #[arg(long)]
    pub(super) fit_to_budget: bool,
    /// Run every row of a micro-batch whole, even the tokens all rows start with
    /// (by default those are computed once per batch; exact either way).
    #[arg(long)]
    pub(super) whole_rows: bool,
    /// Label smoothing of the training loss (0 to below 1; 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub(super) label_smoothing: f64,
    /// LoRA+: every lora_B trains at this many times the rate of its lora_A (1: plain LoRA).
    #[arg(long, default_value_t = 1.0)]
    pub(super) lora_plus_ratio: f64,
    /// A classifier without the classical TF-IDF prior stored beside its head
    /// (its answers then come from the head alone).
    #[arg(long)]
    pub(super) no_classical_prior: bool,
}

pub(super) fn settings(a: &TrainArgs, n_layers: usize) -> anyhow::Result<TrainSettings> {
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
        lora_plus_ratio: a.lora_plus_ratio,
        classical_prior: !a.no_classical_prior,
    })
}

pub(super) fn train_cmd(a: TrainArgs) -> anyhow::Result<()> {
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

pub(super) fn tokenize_cmd(c: Common, out: PathBuf, epochs: u64) -> anyhow::Result<()> {
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

/// `retune-trainer prior`: see its help.
pub(super) fn prior_cmd(
    adapter: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    seed: u64,
) -> anyhow::Result<()> {
    let st_path = adapter.join("adapter_model.safetensors");
    let st = std::fs::read(&st_path).with_context(|| format!("reading {}", st_path.display()))?;
    let cfg_path = adapter.join("adapter_config.json");
    let cfg =
        std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?;
    let text =
        std::fs::read_to_string(data).with_context(|| format!("reading {}", data.display()))?;
    let (rows, errors) = retune_datasets::parse_jsonl(&text);
    if let Some(e) = errors.first() {
        anyhow::bail!("{}: line {}: {}", data.display(), e.line, e.reason);
    }
    let texts: Vec<String> = rows
        .iter()
        .map(|r| retune_datasets::snapshot::classifier_text(&r.body))
        .collect();
    let labels: Vec<String> = rows.iter().map(retune_datasets::label_of).collect();
    let t = std::time::Instant::now();
    let prior = retune_datasets::classical::TextClassifier::train_calibrated(
        &texts.iter().map(String::as_str).collect::<Vec<_>>(),
        &labels.iter().map(String::as_str).collect::<Vec<_>>(),
        5,
        &retune_datasets::classical::ClassicalOptions {
            seed,
            ..Default::default()
        },
    )?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = retune_adapters::head::with_prior(&st, &prior)?;
    retune_trainer::lora::write_dir_atomic(
        out,
        &[
            ("adapter_model.safetensors", &bytes),
            ("adapter_config.json", &cfg),
        ],
    )?;
    println!(
        "{}: a TF-IDF prior over {} labels from {} rows ({secs:.1} s, temperature {})",
        out.display(),
        prior.labels().len(),
        rows.len(),
        prior.temperature()
    );
    Ok(())
}
