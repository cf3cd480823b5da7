//! The training loop: micro-batches through the engine's training forward, loss
//! on assistant tokens, gradient accumulation, clipping, AdamW on a warm-up +
//! cosine schedule, eval loss with early stopping, checkpoints that resume to the
//! same bytes, and a record of the run.

use crate::batches::{epoch_batches, MicroBatch};
use crate::checkpoint::{checkpoint_key, load_checkpoint, save_checkpoint, CheckpointMeta};
use crate::error::{Result, TrainError};
use crate::examples::{Encoded, Prepared};
use crate::lora::Adapter;
use crate::optim::{clip, global_norm, lr_at, lr_at_fraction, AdamW};
use candle_core::{Device, Tensor};
use retune_engine::{grad_of, smoothed_nll, DeviceModel, Dropout};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

pub use crate::settings::{Outcome, Progress, RunInputs, TrainSettings, TrainingRecord};

fn data_hash(train: &Prepared, eval: &Prepared) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (tag, set) in [("train", train), ("eval", eval)] {
        h.update(tag.as_bytes());
        for e in &set.examples {
            h.update((e.tokens.len() as u64).to_le_bytes());
            for (t, w) in e.tokens.iter().zip(&e.weights) {
                h.update(t.to_le_bytes());
                h.update(w.to_le_bytes());
            }
            if let Some(c) = e.class {
                h.update(b"class");
                h.update(c.to_le_bytes());
            }
        }
    }
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Peak resident memory of this process (MiB), from `/proc/self/status`.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Frozen layers' outputs per example (rows of `hidden` floats), filled lazily.
struct FrozenCache {
    hidden: usize,
    rows: Vec<Option<Vec<f32>>>,
}

/// Largest frozen-layer cache kept in memory (f32 rows of every training token).
const FROZEN_CACHE_MAX_BYTES: u64 = 4 << 30;

/// Pad-token id for batch rows (never attended to by real tokens).
const PAD: u32 = 0;

struct Ctx<'a> {
    model: &'a DeviceModel,
    adapter: &'a Adapter,
    settings: &'a TrainSettings,
    first: usize,
    cache: Option<FrozenCache>,
}

impl Ctx<'_> {
    /// Residual stream entering the lowest LoRA layer for `ids`' examples.
    fn entry(&mut self, examples: &[Encoded], ids: &[usize], mb: &MicroBatch) -> Result<Tensor> {
        let dev = self.model.device().clone();
        let x = self.model.train_embed(&mb.batch)?;
        if self.first == 0 {
            return Ok(x);
        }
        let Some(cache) = &mut self.cache else {
            return Ok(self
                .model
                .train_layers(x, &mb.batch, None, 0..self.first, None, 0)?);
        };
        let h = cache.hidden;
        let batch = &mb.batch;
        // each example's rows are kept whole (its copy of a shared prefix too):
        // the batches it meets, and so what they share, change every epoch
        if ids.iter().any(|&i| cache.rows[i].is_none()) {
            let y = self
                .model
                .train_layers(x, batch, None, 0..self.first, None, 0)?;
            let y: Vec<f32> = y.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
            for (b, &i) in ids.iter().enumerate() {
                let n = examples[i].tokens.len();
                let mut r = Vec::with_capacity(n * h);
                for pos in 0..n {
                    let at = batch.row(b, pos) * h;
                    r.extend_from_slice(&y[at..at + h]);
                }
                cache.rows[i] = Some(r);
            }
        }
        let mut flat = vec![0f32; batch.stream_rows() * h];
        for (b, &i) in ids.iter().enumerate() {
            if let Some(r) = &cache.rows[i] {
                let from = if b == 0 { 0 } else { batch.prefix };
                for pos in from..examples[i].tokens.len() {
                    let at = batch.row(b, pos) * h;
                    flat[at..at + h].copy_from_slice(&r[pos * h..(pos + 1) * h]);
                }
            }
        }
        Ok(Tensor::from_vec(flat, (batch.stream_rows(), h), &dev)?)
    }

    /// Loss tensor of one micro-batch, normalised by `norm`.
    fn loss(
        &mut self,
        examples: &[Encoded],
        ids: &[usize],
        norm: f64,
        dropout: Option<Dropout>,
        salt: u64,
    ) -> Result<(Tensor, usize, f64)> {
        let refs: Vec<&Encoded> = ids.iter().map(|&i| &examples[i]).collect();
        let mb = if self.settings.share_prefix {
            MicroBatch::new(&refs, PAD)
        } else {
            MicroBatch::unshared(&refs, PAD)
        };
        let x = self.entry(examples, ids, &mb)?;
        let n = self.model.cfg.n_layer;
        let x = self.model.train_layers(
            x,
            &mb.batch,
            Some(&self.adapter.lora),
            self.first..n,
            dropout,
            salt,
        )?;
        let logits = output_logits(self.model, self.adapter, &x, &mb.rows)?;
        Ok((
            smoothed_nll(
                &logits,
                &mb.targets,
                &mb.weights,
                norm,
                self.settings.label_smoothing,
            )?,
            mb.tokens,
            mb.weight(),
        ))
    }

    /// Weighted mean NLL over `set` (no update).
    fn eval_loss(&mut self, set: &Prepared) -> Result<Option<f32>> {
        if set.examples.is_empty() {
            return Ok(None);
        }
        let mut order: Vec<usize> = (0..set.examples.len()).collect();
        order.sort_by_key(|&i| set.examples[i].tokens.len());
        let mut total = 0f64;
        let mut weight = 0f64;
        let saved = self.cache.take();
        for chunk in order.chunks(self.settings.batch_size.max(1)) {
            let (l, _, w) = self.loss(&set.examples, chunk, 1.0, None, 0)?;
            total += l.to_scalar::<f32>()? as f64;
            weight += w;
        }
        self.cache = saved;
        Ok(Some((total / weight.max(1e-12)) as f32))
    }
}

/// What the loss reads at `rows` of the last layer's output `x`: the classifier
/// head's label scores when the adapter has one, else the vocabulary's logits.
pub fn output_logits(
    model: &DeviceModel,
    adapter: &Adapter,
    x: &Tensor,
    rows: &[u32],
) -> Result<Tensor> {
    Ok(match &adapter.head {
        Some(h) => model
            .train_final_hidden(x, rows)?
            .matmul(&h.weight.as_tensor().t()?)?,
        None => model.train_head(x, rows)?,
    })
}

/// Train an adapter on `model` (built with [`DeviceModel::for_training`]).
pub fn train(
    model: &DeviceModel,
    inp: RunInputs<'_>,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<Outcome> {
    let s = inp.settings;
    let shapes = model.base_shapes();
    let dev = model.device().clone();
    let train = inp.train;
    if train.examples.is_empty() {
        return Err(TrainError::Data(format!(
            "no training examples left (dropped: {:?})",
            train.dropped
        )));
    }
    if train.examples.len() < s.min_examples {
        return Err(TrainError::Data(format!(
            "{} training examples, at least {} needed (--min-examples)",
            train.examples.len(),
            s.min_examples
        )));
    }
    if s.batch_size == 0 || s.grad_accum == 0 {
        return Err(TrainError::Setting(
            "batch size and accumulation must be ≥ 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&s.dropout) {
        return Err(TrainError::Setting(format!(
            "dropout {} (0 ≤ p < 1)",
            s.dropout
        )));
    }
    if !(s.lora_plus_ratio.is_finite() && s.lora_plus_ratio > 0.0) {
        return Err(TrainError::Setting(format!(
            "LoRA+ ratio {} (finite, above 0)",
            s.lora_plus_ratio
        )));
    }
    if !(0.0..1.0).contains(&s.label_smoothing) {
        return Err(TrainError::Setting(format!(
            "label smoothing {} (0 ≤ eps < 1)",
            s.label_smoothing
        )));
    }
    let adapter = match inp.init {
        Some(dir) => {
            let a = Adapter::from_peft(dir, &shapes, &dev)?;
            if a.spec != s.lora {
                return Err(TrainError::Setting(format!(
                    "the starting adapter is {:?}; the settings say {:?} (give the same rank, alpha, rsLoRA, modules and layers)",
                    a.spec, s.lora
                )));
            }
            a
        }
        None => Adapter::init(&s.lora, &shapes, s.seed, &dev)?,
    };
    let mut adapter = adapter;
    adapter.dropout = s.dropout;
    match (&s.labels, &adapter.head) {
        (Some(labels), None) => {
            let tok = inp.tok.ok_or_else(|| {
                TrainError::Setting("a classification head needs the tokenizer".into())
            })?;
            adapter.head = Some(crate::lora::ClassHead::init(labels, model, tok)?);
        }
        (Some(labels), Some(h)) if &h.labels != labels => {
            return Err(TrainError::Setting(
                "the starting adapter's head has other labels (or another order) than the task's"
                    .into(),
            ))
        }
        (None, Some(_)) => {
            return Err(TrainError::Setting(
                "the starting adapter is a classifier; the settings name no labels".into(),
            ))
        }
        _ => {}
    }
    let prior_note = match (&s.labels, &adapter.head) {
        (Some(labels), Some(_)) if s.classical_prior => {
            let (prior, note) = classical_prior(&train.examples, labels, s.seed);
            adapter.prior = prior;
            Some(note)
        }
        _ => None,
    };
    let classes = s.labels.as_ref().map_or(0, Vec::len) as u32;
    if train
        .examples
        .iter()
        .chain(&inp.eval.examples)
        .any(|e| e.class.is_some() != (classes > 0) || e.class.is_some_and(|c| c >= classes))
    {
        return Err(TrainError::Setting(
            "examples and settings disagree on the task: classification examples need labels, and their classes must be among them".into(),
        ));
    }
    let longest = train
        .examples
        .iter()
        .chain(&inp.eval.examples)
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(0);
    if longest > model.cfg.context {
        return Err(TrainError::Setting(format!(
            "an example has {longest} tokens but the model trains on at most {} (max_len above the model's context?)",
            model.cfg.context
        )));
    }
    let first = adapter.lora.lowest_layer().unwrap_or(0);
    let vars: Vec<_> = adapter.vars().into_iter().cloned().collect();
    let var_refs: Vec<&candle_core::Var> = vars.iter().collect();
    // LoRA+: every B at `lora_plus_ratio` times the rate (A and the head at 1)
    let scales = adapter
        .named()
        .iter()
        .map(|(name, _)| {
            if name.ends_with("lora_B.weight") {
                s.lora_plus_ratio
            } else {
                1.0
            }
        })
        .collect();
    let mut opt = AdamW::new(s.optim.clone(), &var_refs)?.with_scales(scales)?;

    let lengths: Vec<usize> = train.examples.iter().map(|e| e.tokens.len()).collect();
    let per_epoch = lengths.len().div_ceil(s.batch_size);
    let steps_per_epoch = per_epoch.div_ceil(s.grad_accum).max(1);
    let total = s
        .max_steps
        .unwrap_or_else(|| ((s.epochs * steps_per_epoch as f64).ceil() as usize).max(1));
    let dhash = data_hash(train, inp.eval);
    let fingerprint = model.fingerprint();
    let key = checkpoint_key(s, &dhash, &fingerprint);
    let mut ctx = Ctx {
        model,
        adapter: &adapter,
        settings: s,
        first,
        cache: (s.cache_frozen && first > 0 && {
            let bytes = train.tokens() as u64 * model.cfg.hidden as u64 * 4;
            let ok = bytes <= FROZEN_CACHE_MAX_BYTES;
            if !ok {
                tracing::warn!(
                    bytes,
                    "frozen-layer cache would exceed {FROZEN_CACHE_MAX_BYTES} bytes: recomputing instead"
                );
            }
            ok
        })
        .then(|| FrozenCache {
            hidden: model.cfg.hidden,
            rows: vec![None; train.examples.len()],
        }),
    };

    let mut step = 0usize;
    let mut loss_curve = Vec::new();
    let mut eval_curve: Vec<(usize, f32)> = Vec::new();
    let mut best_eval: Option<(usize, f32)> = None;
    let mut best_vals: Option<Vec<Tensor>> = None;
    let mut since_best = 0usize;
    let mut trained_tokens = 0u64;
    let mut prior_seconds = 0f64;
    let mut resumed_from = None;
    if let Some(dir) = inp.checkpoint_dir {
        if let Some(r) = load_checkpoint(dir, &key, &adapter, &mut opt, &dev)? {
            step = r.meta.step;
            resumed_from = Some(step);
            loss_curve = r.meta.loss_curve;
            eval_curve = r.meta.eval_curve;
            best_eval = r.meta.best_eval;
            since_best = r.meta.since_best;
            trained_tokens = r.meta.trained_tokens;
            prior_seconds = r.meta.train_seconds;
            best_vals = r.best;
        }
    }

    let started = Instant::now();
    let elapsed = |prior: f64| prior + started.elapsed().as_secs_f64();
    let mut save_marks: Vec<f64> = s.save_at_minutes.clone();
    save_marks.sort_by(|a, b| a.total_cmp(b));
    save_marks.retain(|&m| m * 60.0 > prior_seconds);
    let mut epoch_cache: Option<(u64, Vec<Vec<usize>>)> = None;
    let dropout = (s.dropout > 0.0).then_some(Dropout {
        p: s.dropout,
        seed: s.seed,
    });
    let mut stopped = "completed the schedule".to_string();
    let mut tokens_window = (Instant::now(), 0u64);
    // (elapsed, trained tokens) after this run's second step
    let mut after_warmup: Option<(f64, u64)> = None;
    let first_step = step;
    let save_ckpt = |step: usize,
                     opt: &AdamW,
                     best_vals: &Option<Vec<Tensor>>,
                     loss_curve: &[f32],
                     eval_curve: &[(usize, f32)],
                     best_eval: Option<(usize, f32)>,
                     since_best: usize,
                     trained_tokens: u64,
                     secs: f64|
     -> Result<Option<PathBuf>> {
        let Some(dir) = inp.checkpoint_dir else {
            return Ok(None);
        };
        let meta = CheckpointMeta {
            key: key.clone(),
            step,
            loss_curve: loss_curve.to_vec(),
            eval_curve: eval_curve.to_vec(),
            best_eval,
            since_best,
            trained_tokens,
            train_seconds: secs,
        };
        save_checkpoint(dir, &adapter, opt, best_vals.as_deref(), &meta)?;
        Ok(Some(dir.to_path_buf()))
    };

    // the run's state as of now into the checkpoint directory
    macro_rules! ckpt {
        ($secs:expr) => {
            save_ckpt(
                step,
                &opt,
                &best_vals,
                &loss_curve,
                &eval_curve,
                best_eval,
                since_best,
                trained_tokens,
                $secs,
            )
        };
    }
    while step < total {
        // this step's micro-batches
        let mut micro = Vec::with_capacity(s.grad_accum);
        for k in 0..s.grad_accum {
            let g = step * s.grad_accum + k;
            let epoch = (g / per_epoch) as u64;
            if epoch_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
                epoch_cache = Some((epoch, epoch_batches(&lengths, s.batch_size, s.seed, epoch)));
            }
            if let Some((_, b)) = &epoch_cache {
                micro.push(b[g % per_epoch].clone());
            }
        }
        let norm: f64 = micro
            .iter()
            .flat_map(|ids| ids.iter())
            .map(|&i| {
                let e = &train.examples[i];
                match e.class {
                    Some(_) => 1.0,
                    None => e.weights[1..].iter().map(|&w| w as f64).sum::<f64>(),
                }
            })
            .sum();
        let mut grads: Vec<Tensor> = Vec::new();
        let mut loss = 0f32;
        let mut toks = 0usize;
        for (k, ids) in micro.iter().enumerate() {
            let salt = (step * s.grad_accum + k) as u64;
            let (l, n, _) = ctx.loss(&train.examples, ids, norm.max(1e-12), dropout, salt)?;
            toks += n;
            let lv = l.to_scalar::<f32>()?;
            if !lv.is_finite() {
                let cp = ckpt!(elapsed(prior_seconds))?;
                return Err(TrainError::NonFinite {
                    what: "loss",
                    step,
                    checkpoint: cp,
                });
            }
            loss += lv;
            let gs = l.backward()?;
            for (i, v) in vars.iter().enumerate() {
                let g = grad_of(&gs, v)?;
                if grads.len() <= i {
                    grads.push(g);
                } else {
                    grads[i] = grads[i].add(&g)?;
                }
            }
        }
        let gnorm = global_norm(&grads)?;
        if !gnorm.is_finite() {
            let cp = ckpt!(elapsed(prior_seconds))?;
            return Err(TrainError::NonFinite {
                what: "gradient",
                step,
                checkpoint: cp,
            });
        }
        if s.max_grad_norm > 0.0 {
            clip(&mut grads, gnorm, s.max_grad_norm)?;
        }
        let lr = match (s.fit_to_budget, s.max_minutes) {
            (true, Some(m)) => lr_at_fraction(
                step,
                s.warmup_steps,
                total,
                s.optim.lr,
                elapsed(prior_seconds) / (m * 60.0).max(1e-9),
            ),
            _ => lr_at(step, s.warmup_steps, total, s.optim.lr),
        };
        opt.step(&var_refs, &grads, lr)?;
        step += 1;
        trained_tokens += toks as u64;
        tokens_window.1 += toks as u64;
        loss_curve.push(loss);
        if step == first_step + 2 {
            after_warmup = Some((elapsed(prior_seconds), trained_tokens));
        }
        let tps = tokens_window.1 as f64 / tokens_window.0.elapsed().as_secs_f64().max(1e-9);
        let flow = progress(&Progress::Step {
            step,
            total,
            loss,
            lr,
            tokens_per_s: tps,
            elapsed_s: elapsed(prior_seconds),
        });
        let epoch_end = step % steps_per_epoch == 0;
        let eval_due = !inp.eval.examples.is_empty()
            && ((s.eval_every > 0 && step % s.eval_every == 0)
                || (s.eval_every == 0 && epoch_end)
                || step == total);
        if eval_due {
            if let Some(el) = ctx.eval_loss(inp.eval)? {
                if !el.is_finite() {
                    return Err(TrainError::NonFinite {
                        what: "eval loss",
                        step,
                        checkpoint: None,
                    });
                }
                eval_curve.push((step, el));
                let _ = progress(&Progress::Eval { step, loss: el });
                if best_eval.is_none_or(|(_, b)| el < b) {
                    best_eval = Some((step, el));
                    best_vals = Some(adapter.values()?);
                    since_best = 0;
                } else {
                    since_best += 1;
                    if s.patience > 0 && since_best >= s.patience {
                        stopped =
                            format!("early stop: eval loss did not improve for {since_best} evals");
                        break;
                    }
                }
            }
        }
        let secs = elapsed(prior_seconds);
        while let Some(&m) = save_marks.first() {
            if secs < m * 60.0 {
                break;
            }
            save_marks.remove(0);
            if let Some(out) = inp.out_dir {
                let p = out.join(format!("at-{m}min"));
                adapter.save_peft(&p, inp.base_name)?;
                let _ = progress(&Progress::Saved { path: p });
            }
        }
        if s.checkpoint_every > 0 && step % s.checkpoint_every == 0 && step < total {
            if let Some(p) = ckpt!(secs)? {
                let _ = progress(&Progress::Saved { path: p });
            }
        }
        // an interruption lands after this step's eval and saves, so a resumed run
        // continues exactly where this one would have
        if flow.is_break() {
            let cp = ckpt!(secs)?;
            return Err(TrainError::Interrupted {
                step,
                checkpoint: cp,
            });
        }
        if s.max_minutes.is_some_and(|m| secs >= m * 60.0) {
            stopped = format!("time budget of {} minutes", s.max_minutes.unwrap_or(0.0));
            break;
        }
    }
    // a stopped run evaluates what it has, so the best is chosen on the same terms
    if !inp.eval.examples.is_empty() && eval_curve.last().is_none_or(|(st, _)| *st != step) {
        if let Some(el) = ctx.eval_loss(inp.eval)?.filter(|e| e.is_finite()) {
            eval_curve.push((step, el));
            let _ = progress(&Progress::Eval { step, loss: el });
            if best_eval.is_none_or(|(_, b)| el < b) {
                best_eval = Some((step, el));
                best_vals = None;
            }
        }
    }
    if let Some(b) = &best_vals {
        adapter.set_values(b)?;
    }
    let wall = elapsed(prior_seconds);
    let record = TrainingRecord {
        classical_prior: prior_note,
        settings: s.clone(),
        snapshot: inp.snapshot.clone(),
        data_source: inp.data_source.clone(),
        data_hash: dhash,
        base_fingerprint: fingerprint,
        seed: s.seed,
        examples: train.examples.len(),
        eval_examples: inp.eval.examples.len(),
        dropped: train.dropped.clone(),
        truncated: train.truncated,
        steps: step,
        planned_steps: total,
        epochs_done: step as f64 / steps_per_epoch as f64,
        loss_curve,
        eval_curve,
        best_eval,
        stopped,
        wall_seconds: wall,
        tokens_per_second: trained_tokens as f64 / wall.max(1e-9),
        trained_tokens,
        steady_tokens_per_second: after_warmup.and_then(|(t0, n0)| {
            let dt = wall - t0;
            (dt > 0.0 && trained_tokens > n0).then(|| (trained_tokens - n0) as f64 / dt)
        }),
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        resumed_from,
    };
    drop(ctx);
    Ok(Outcome { adapter, record })
}

/// Weighted mean NLL of `set` under `adapter` (the eval loss a run reports).
pub fn eval_loss_of(
    model: &DeviceModel,
    adapter: &Adapter,
    set: &Prepared,
    batch_size: usize,
) -> Result<f32> {
    let settings = TrainSettings {
        batch_size,
        ..TrainSettings::default()
    };
    let mut ctx = Ctx {
        model,
        adapter,
        settings: &settings,
        first: adapter.lora.lowest_layer().unwrap_or(0),
        cache: None,
    };
    ctx.eval_loss(set)?
        .ok_or_else(|| TrainError::Data("no eval examples".into()))
}

/// The classical classifier a head is stored with: trained on the training
/// rows' texts (calibrated on 5 folds of them), or `None` with the reason.
fn classical_prior(
    examples: &[crate::examples::Encoded],
    labels: &[String],
    seed: u64,
) -> (Option<retune_datasets::classical::TextClassifier>, String) {
    use retune_datasets::classical::{ClassicalOptions, TextClassifier};
    let rows: Vec<(&str, &str)> = examples
        .iter()
        .filter_map(|e| {
            let label = labels.get(e.class? as usize)?;
            Some((e.text.as_deref()?, label.as_str()))
        })
        .collect();
    let t = std::time::Instant::now();
    let texts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.1).collect();
    let o = ClassicalOptions {
        seed,
        ..ClassicalOptions::default()
    };
    match TextClassifier::train_calibrated(&texts, &names, 5, &o) {
        Ok(c) => {
            let note = format!(
                "a TF-IDF classifier over {} labels trained on {} rows in {:.1} s, temperature {} (5-fold)",
                c.labels().len(),
                rows.len(),
                t.elapsed().as_secs_f64(),
                c.temperature()
            );
            (Some(c), note)
        }
        Err(e) => (None, format!("none: {e}")),
    }
}
