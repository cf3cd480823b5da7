//! What shapes a training run and what it records: its settings (recorded with
//! the adapter), its progress events, its inputs and its record.

use crate::examples::{Overflow, Prepared};
use crate::lora::{Adapter, LoraSpec};
use crate::optim::AdamWConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Everything that shapes a run (recorded with the adapter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub lora: LoraSpec,
    /// LoRA dropout on the adapter's input (0 = none).
    pub dropout: f32,
    pub optim: AdamWConfig,
    pub warmup_steps: usize,
    /// Passes over the training split (the schedule's length unless `max_steps`).
    pub epochs: f64,
    pub max_steps: Option<usize>,
    /// Stop (keeping what was learned) after this much training time.
    pub max_minutes: Option<f64>,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (steps run over the epoch boundary: the
    /// batch order is a function of the global micro-batch index).
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub max_len: usize,
    pub overflow: Overflow,
    /// Eval loss every this many steps (0: at the end of each epoch).
    pub eval_every: usize,
    /// Stop after this many evals without a better eval loss (0: never).
    pub patience: usize,
    pub seed: u64,
    pub min_examples: usize,
    /// Checkpoint every this many steps (0: never; an interrupted or non-finite
    /// run still saves its last good state).
    pub checkpoint_every: usize,
    /// Keep the frozen layers' outputs below the lowest LoRA layer across epochs.
    pub cache_frozen: bool,
    /// Also save the adapter as it is after these many minutes of training.
    pub save_at_minutes: Vec<f64>,
    /// A label task trained as a classifier: a head over these labels on the last
    /// prompt token's final hidden state (PEFT `SEQ_CLS`), instead of generating
    /// the label's tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// With `max_minutes`: the cosine decays by whichever is further along, the
    /// steps or the time budget, so a run the budget cuts ends annealed (the
    /// schedule then depends on the machine's speed: not resumable to the same bytes).
    #[serde(default)]
    pub fit_to_budget: bool,
    /// Compute the tokens every row of a micro-batch starts with once per batch
    /// (exact; off only to measure what it saves).
    #[serde(default = "yes")]
    pub share_prefix: bool,
    /// Label smoothing of the training loss (0: none): the target puts
    /// `1 − eps` on the answer and `eps` evenly over every class (eval loss
    /// stays the plain NLL).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_smoothing: f64,
    /// LoRA+ (arXiv 2402.12354): the rate of every `lora_B` is this many
    /// times the rate of its `lora_A` (1: plain LoRA).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub lora_plus_ratio: f64,
    /// A classifier also stores the classical TF-IDF classifier trained on the
    /// same rows (calibrated out of fold); answers are the label likeliest
    /// under the product of the two.
    #[serde(default = "yes")]
    pub classical_prior: bool,
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

fn yes() -> bool {
    true
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            lora: LoraSpec {
                rank: 16,
                alpha: 32.0,
                rslora: false,
                modules: (0..7).collect(),
                first_layer: 0,
            },
            dropout: 0.0,
            optim: AdamWConfig::default(),
            warmup_steps: 30,
            epochs: 1.0,
            max_steps: None,
            max_minutes: None,
            batch_size: 16,
            grad_accum: 1,
            max_grad_norm: 1.0,
            max_len: 512,
            overflow: Overflow::Drop,
            eval_every: 0,
            patience: 0,
            seed: 0,
            min_examples: 8,
            checkpoint_every: 0,
            cache_frozen: true,
            save_at_minutes: Vec::new(),
            labels: None,
            fit_to_budget: false,
            share_prefix: true,
            label_smoothing: 0.0,
            lora_plus_ratio: 1.0,
            classical_prior: true,
        }
    }
}

/// What a run reports as it goes.
#[derive(Clone, Debug)]
pub enum Progress {
    Step {
        step: usize,
        total: usize,
        loss: f32,
        lr: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
    },
    Eval {
        step: usize,
        loss: f32,
    },
    Saved {
        path: PathBuf,
    },
}

/// The training record stored as the version's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub settings: TrainSettings,
    pub snapshot: Option<String>,
    pub data_source: String,
    pub data_hash: String,
    pub base_fingerprint: String,
    pub seed: u64,
    pub examples: usize,
    pub eval_examples: usize,
    pub dropped: BTreeMap<String, usize>,
    pub truncated: usize,
    pub steps: usize,
    pub planned_steps: usize,
    pub epochs_done: f64,
    /// mean loss per optimizer step
    pub loss_curve: Vec<f32>,
    /// (step, eval loss)
    pub eval_curve: Vec<(usize, f32)>,
    pub best_eval: Option<(usize, f32)>,
    pub stopped: String,
    pub wall_seconds: f64,
    /// real (unpadded) tokens through forward+backward per second
    pub tokens_per_second: f64,
    pub trained_tokens: u64,
    /// tokens per second after the first two steps (how the peer benchmark counts)
    pub steady_tokens_per_second: Option<f64>,
    pub peak_rss_mib: f64,
    pub threads: usize,
    pub resumed_from: Option<usize>,
    /// A classifier's classical prior: what was trained, or why none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classical_prior: Option<String>,
}

/// A run's inputs besides the model.
pub struct RunInputs<'a> {
    pub train: &'a Prepared,
    pub eval: &'a Prepared,
    pub settings: &'a TrainSettings,
    /// Start from this adapter instead of PEFT's init.
    pub init: Option<&'a Path>,
    /// Where checkpoints live (resumed from when present and matching).
    pub checkpoint_dir: Option<&'a Path>,
    /// Where `save_at_minutes` adapters go (`<dir>/at-<m>min`).
    pub out_dir: Option<&'a Path>,
    pub base_name: &'a str,
    pub snapshot: Option<String>,
    pub data_source: String,
    /// The tokenizer (a classification head starts from its labels' tokens).
    pub tok: Option<&'a retune_engine::Tok>,
}

pub struct Outcome {
    pub adapter: Adapter,
    pub record: TrainingRecord,
}
