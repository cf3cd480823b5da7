//! `[trainer]`: the trainer daemon — when it trains an adapter, how, what the
//! eval gate demands, and how a rolled-out version is watched. `[trainer.defaults]`
//! applies to every adapter; a `[[trainer.adapters]]` entry replaces whole groups
//! (`trigger`, `train`, `gate`, `watch`, `data`) for one tenant's adapter.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerSettings {
    /// Seconds between looks at the stores.
    pub poll_seconds: f64,
    /// A training lease lasts this long unless renewed (renewed while training).
    pub lease_seconds: u64,
    /// Compute threads for training and evals (0: all cores).
    pub threads: usize,
    /// Scheduling niceness of the trainer process (0..=19).
    pub nice: i32,
    /// `idle` (Linux SCHED_IDLE: the trainer gets the CPU only when serving does
    /// not want it; measured in BENCHMARKS.md) or `normal` (niceness only).
    pub priority: String,
    /// Work directory (runs' outputs); default `<adapters.root>/trainer`.
    pub work_dir: Option<PathBuf>,
    /// Also train adapters that have examples in the store but no entry below.
    pub discover: bool,
    pub defaults: LoopSettings,
    pub adapters: Vec<AdapterLoop>,
}

impl Default for TrainerSettings {
    fn default() -> Self {
        Self {
            poll_seconds: 30.0,
            lease_seconds: 300,
            threads: 0,
            nice: 10,
            priority: "idle".into(),
            work_dir: None,
            discover: true,
            defaults: LoopSettings::default(),
            adapters: Vec::new(),
        }
    }
}

/// Everything the loop needs to know about one adapter.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoopSettings {
    pub trigger: TriggerSettings,
    pub train: TrainOptions,
    pub gate: GateOptions,
    pub watch: WatchOptions,
    pub data: DataOptions,
}

/// One adapter's entry: groups given here replace the defaults' groups.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterLoop {
    pub tenant: String,
    pub name: String,
    /// `false`: the daemon leaves this adapter alone.
    #[serde(default = "yes")]
    pub enabled: bool,
    pub trigger: Option<TriggerSettings>,
    pub train: Option<TrainOptions>,
    pub gate: Option<GateOptions>,
    pub watch: Option<WatchOptions>,
    pub data: Option<DataOptions>,
}

fn yes() -> bool {
    true
}

impl AdapterLoop {
    /// This adapter's declared label set (its `data` group's, else the
    /// defaults'), borrowed: the request path asks it without resolving the rest.
    pub fn labels<'a>(&'a self, d: &'a LoopSettings) -> Option<&'a [String]> {
        self.data.as_ref().unwrap_or(&d.data).labels.as_deref()
    }

    /// This adapter's settings: its groups, else the defaults'.
    pub fn resolve(&self, d: &LoopSettings) -> LoopSettings {
        LoopSettings {
            trigger: self.trigger.clone().unwrap_or_else(|| d.trigger.clone()),
            train: self.train.clone().unwrap_or_else(|| d.train.clone()),
            gate: self.gate.clone().unwrap_or_else(|| d.gate.clone()),
            watch: self.watch.clone().unwrap_or_else(|| d.watch.clone()),
            data: self.data.clone().unwrap_or_else(|| d.data.clone()),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TriggerSettings {
    /// Train when this many new accepted examples arrived since the last run.
    pub min_new_examples: usize,
    /// Also train on a schedule (minutes since the last run) when anything is new.
    pub every_minutes: Option<f64>,
    /// A snapshot with fewer training examples is not trained on.
    pub min_examples: usize,
}

impl Default for TriggerSettings {
    fn default() -> Self {
        Self {
            min_new_examples: 200,
            every_minutes: None,
            min_examples: 50,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    pub rank: usize,
    pub alpha: f32,
    /// Any of q,k,v,o,gate,up,down, or `all`.
    pub modules: Vec<String>,
    /// LoRA on the top N layers only (none: every layer).
    pub top_layers: Option<usize>,
    pub lr: f64,
    pub epochs: f64,
    pub max_minutes: Option<f64>,
    pub batch_size: usize,
    pub max_len: usize,
    pub warmup_steps: usize,
    pub seed: u64,
    /// Eval loss every N steps (0: each epoch end) with early stopping after
    /// `patience` evals without improvement (0: off).
    pub eval_every: usize,
    pub patience: usize,
    /// How a task is learned: `auto` (a declared label task as a classifier,
    /// anything else by generating the answer), `classify`, `generate`.
    pub objective: Objective,
    /// Label smoothing of the training loss, 0 to below 1 (0: none).
    pub label_smoothing: f64,
    /// LoRA+: every `lora_B` trains at this many times the rate of its
    /// `lora_A` (1: plain LoRA).
    pub lora_plus_ratio: f64,
    /// A classifier (a label task's head) also stores the classical TF-IDF
    /// classifier trained on the same rows, its probabilities calibrated out of
    /// fold; served answers are the label likeliest under both (true by default:
    /// on Banking77 the product beats each alone, BENCHMARKS.md).
    pub classical_prior: bool,
}

/// How an adapter learns its task.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// A declared label task (`data.labels`) as a classifier, else generate.
    #[default]
    Auto,
    /// A head over the declared labels on the last prompt token (needs `data.labels`).
    Classify,
    /// Generate the answer's tokens.
    Generate,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            modules: vec!["all".into()],
            top_layers: Some(8),
            lr: 1e-3,
            epochs: 3.0,
            max_minutes: Some(25.0),
            batch_size: 16,
            max_len: 256,
            warmup_steps: 30,
            seed: 0,
            eval_every: 0,
            patience: 0,
            objective: Objective::Auto,
            label_smoothing: 0.0,
            lora_plus_ratio: 1.0,
            classical_prior: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GateOptions {
    /// `auto` (label accuracy when examples carry labels, JSON when `json_keys`
    /// is set, exact match for short answers, token F1 for long ones), `exact`,
    /// `label`, `json`, `token_f1`.
    pub metric: GateMetric,
    /// The adapter's prompt for the base-model baseline: a system prompt…
    pub system_prompt: Option<String>,
    /// …and this many examples from the train split as earlier chat turns.
    pub shots: usize,
    /// Keys a JSON answer must hold (metric `json`).
    pub json_keys: Vec<String>,
    /// The candidate's score must reach this.
    pub min_score: f64,
    /// The lower end of the 95% interval of (candidate - live) must exceed this.
    pub min_gain_over_live: f64,
    /// Likewise against the best baseline (base model + prompt, constant answer).
    pub min_gain_over_baseline: f64,
    /// A retrain that replaces a live version trained on erased data need not
    /// beat it, only not be worse by more than this (non-inferiority: the lower
    /// end of the interval above -margin).
    pub retrain_margin: f64,
    /// Mean per-token KL(base || candidate) on general prompts, in nats, at most.
    pub max_forgetting: f64,
    /// Eval examples used at most (a seeded sample of the eval split).
    pub max_eval: usize,
    pub max_new_tokens: usize,
    /// `live` (promote; the watch compares before and after) or `canary`.
    pub rollout: RolloutMode,
    pub canary_percent: u8,
    /// Bootstrap resamples for the intervals.
    pub bootstrap: usize,
    /// The classical arm of a label task (a TF-IDF classifier trained on the
    /// snapshot's train split in seconds): `require` (the default: a candidate
    /// that does not beat it is rejected), `report` (scored and reported only),
    /// `off`.
    pub classical: ClassicalMode,
}

/// How the gate scores an answer.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    /// Chosen from the eval rows (see `GateOptions::metric`).
    #[default]
    Auto,
    Exact,
    Label,
    Json,
    TokenF1,
}

/// How a version that passed the gate reaches users.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutMode {
    /// Made live; the watch compares before and after.
    Live,
    /// A share of the traffic (`canary_percent`) beside the live version.
    #[default]
    Canary,
}

/// What the gate does with its classical arm.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassicalMode {
    #[default]
    Require,
    Report,
    Off,
}

impl Default for GateOptions {
    fn default() -> Self {
        Self {
            metric: GateMetric::Auto,
            system_prompt: None,
            shots: 0,
            json_keys: Vec::new(),
            min_score: 0.0,
            min_gain_over_live: 0.0,
            min_gain_over_baseline: 0.0,
            retrain_margin: 0.02,
            max_forgetting: 1.0,
            max_eval: 1000,
            max_new_tokens: 32,
            rollout: RolloutMode::Canary,
            canary_percent: 20,
            bootstrap: 2000,
            classical: ClassicalMode::Require,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchOptions {
    pub enabled: bool,
    /// The verdict comes after this many minutes, once both versions have
    /// `min_samples` completions (one look: no peeking).
    pub window_minutes: f64,
    pub min_samples: usize,
    /// Give up (no verdict, nothing changes) after this many minutes.
    pub max_minutes: f64,
    /// One-sided significance of the two-proportion test on the bad-outcome rate
    /// (rated -1, corrected, or an error).
    pub alpha: f64,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            window_minutes: 60.0,
            min_samples: 100,
            max_minutes: 24.0 * 60.0,
            alpha: 0.01,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataOptions {
    /// Share of the input-hash space held out for the gate.
    pub eval_percent: u8,
    pub include_positive: bool,
    pub scrub: bool,
    /// Suspect labels of a label task (found at the snapshot step by the
    /// classical classifier's out-of-fold predictions): `report` (listed in
    /// the manifest), `holdout` (also left out of training), `review` (left out
    /// of training until a person gives each its label: the admin API's review
    /// queue), `off`.
    pub suspects: SuspectPolicy,
    /// A declared label task's label set (at least 2, distinct, non-empty):
    /// imported examples whose label (or answer) is not one of them are refused
    /// by line, and a label longer than `train.max_len` tokens stops a run.
    pub labels: Option<Vec<String>>,
}

/// What the snapshot step does with suspect labels.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SuspectPolicy {
    #[default]
    Report,
    Holdout,
    /// Held out of training and queued for a person's verdict (a reviewed
    /// row is trusted: it trains with the label the person gave).
    Review,
    Off,
}

impl SuspectPolicy {
    /// Whether suspect train rows stay out of training.
    pub fn holds_out(&self) -> bool {
        matches!(self, Self::Holdout | Self::Review)
    }

    pub fn is_report(&self) -> bool {
        *self == Self::Report
    }
}

impl Default for DataOptions {
    fn default() -> Self {
        Self {
            eval_percent: 10,
            include_positive: true,
            scrub: true,
            suspects: SuspectPolicy::Report,
            labels: None,
        }
    }
}

impl LoopSettings {
    pub fn validate(&self, at: &str) -> Result<(), (String, String)> {
        let bad = |f: &str, r: &str| Err((format!("{at}.{f}"), r.to_string()));
        if self.gate.metric == GateMetric::Json && self.gate.json_keys.is_empty() {
            return bad(
                "gate.json_keys",
                "the json metric needs the keys an answer must hold",
            );
        }
        if self.gate.rollout == RolloutMode::Canary
            && !(1..=100).contains(&self.gate.canary_percent)
        {
            return bad("gate.canary_percent", "must be 1 to 100");
        }
        if self.gate.max_eval == 0 || self.gate.max_new_tokens == 0 || self.gate.bootstrap < 100 {
            return bad(
                "gate.max_eval/max_new_tokens/bootstrap",
                "must be at least 1, 1 and 100",
            );
        }
        if !(self.gate.max_forgetting >= 0.0) {
            return bad("gate.max_forgetting", "must be a number >= 0");
        }
        if !(self.watch.alpha > 0.0 && self.watch.alpha < 0.5) {
            return bad("watch.alpha", "must be between 0 and 0.5");
        }
        if self.watch.min_samples == 0 || !(self.watch.window_minutes > 0.0) {
            return bad("watch.min_samples/window_minutes", "must be positive");
        }
        if self.train.rank == 0 || self.train.batch_size == 0 || self.train.max_len < 8 {
            return bad(
                "train.rank/batch_size/max_len",
                "must be at least 1, 1 and 8",
            );
        }
        if self.train.top_layers == Some(0) {
            return bad("train.top_layers", "must be at least 1");
        }
        if !(self.train.lr > 0.0) || !(self.train.epochs > 0.0) {
            return bad("train.lr/epochs", "must be positive");
        }
        if !(0.0..1.0).contains(&self.train.label_smoothing) {
            return bad("train.label_smoothing", "must be at least 0 and below 1");
        }
        if !(self.train.lora_plus_ratio.is_finite() && self.train.lora_plus_ratio > 0.0) {
            return bad("train.lora_plus_ratio", "must be finite and above 0");
        }
        if self.data.eval_percent == 0 || self.data.eval_percent > 50 {
            return bad(
                "data.eval_percent",
                "must be 1 to 50 (the gate needs held-out data)",
            );
        }
        if let Some(labels) = &self.data.labels {
            if let Err(why) = check_labels(labels) {
                return bad("data.labels", &why);
            }
        }
        if self.train.objective == Objective::Classify && self.data.labels.is_none() {
            return bad(
                "train.objective",
                "`classify` needs the task's labels declared in data.labels",
            );
        }
        if self.trigger.min_new_examples == 0 {
            return bad("trigger.min_new_examples", "must be at least 1");
        }
        Ok(())
    }
}

impl TrainerSettings {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !(self.poll_seconds > 0.0) || self.lease_seconds < 10 {
            return Err((
                "trainer.poll_seconds/lease_seconds".into(),
                "must be > 0 and at least 10".into(),
            ));
        }
        if !["idle", "normal"].contains(&self.priority.as_str()) {
            return Err(("trainer.priority".into(), "must be idle or normal".into()));
        }
        if !(0..=19).contains(&self.nice) {
            return Err(("trainer.nice".into(), "must be 0 to 19".into()));
        }
        self.defaults.validate("trainer.defaults")?;
        for (i, a) in self.adapters.iter().enumerate() {
            a.resolve(&self.defaults)
                .validate(&format!("trainer.adapters[{i}]"))?;
        }
        Ok(())
    }
}

/// A label set is at least 2 distinct, non-empty labels; the reason otherwise.
pub fn check_labels(labels: &[String]) -> Result<(), String> {
    if labels.len() < 2 {
        return Err(
            "a label task needs at least 2 labels (an empty or one-label set declares nothing to choose)"
                .into(),
        );
    }
    if let Some(i) = labels.iter().position(|l| l.trim().is_empty()) {
        return Err(format!("label {i} is empty"));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(l) = labels.iter().find(|l| !seen.insert(l.as_str())) {
        return Err(format!("`{l}` is declared twice"));
    }
    Ok(())
}
