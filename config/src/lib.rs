//! Settings for every retune process: a TOML file plus `RETUNE_<SECTION>__<KEY>`
//! environment overrides, validated once at startup.

#[cfg(feature = "postgres")]
pub mod pg;

/// Milliseconds since the Unix epoch (0 if the clock is before it): the
/// timestamps every store and journal writes.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
mod load;
mod trainer;

use serde::Deserialize;
use std::path::{Path, PathBuf};
pub use trainer::{
    check_labels, AdapterLoop, ClassicalMode, DataOptions, GateMetric, GateOptions, LoopSettings,
    Objective, RolloutMode, SuspectPolicy, TrainOptions, TrainerSettings, TriggerSettings,
    WatchOptions,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read settings file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("settings: {0}")]
    Parse(String),
    #[error("settings: `{field}` {reason}")]
    Invalid { field: String, reason: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    pub model: ModelSettings,
    #[serde(default)]
    pub engine: EngineSettings,
    #[serde(default)]
    pub adapters: AdapterSettings,
    #[serde(default)]
    pub auth: AuthSettings,
    #[serde(default)]
    pub datasets: DatasetSettings,
    #[serde(default)]
    pub tenants: Vec<TenantSettings>,
    #[serde(default)]
    pub trainer: TrainerSettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    /// Seconds in-flight streams get to finish after SIGTERM.
    pub drain_seconds: u64,
    /// Distinct adapters with their own metric series (the rest share `other`).
    pub max_metric_adapters: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 1 << 20,
            drain_seconds: 30,
            max_metric_adapters: 256,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub path: PathBuf,
    /// The id clients use for the base model.
    #[serde(default = "default_model_id")]
    pub id: String,
}

fn default_model_id() -> String {
    "base".into()
}

/// The names `engine.kernels` takes (the engine resolves them against the
/// CPU at start).
pub const KERNEL_CHOICES: [&str; 7] = [
    "auto",
    "int8",
    "f32",
    "avx2",
    "avx2int8",
    "avx512",
    "avx512vnni",
];

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    pub max_batch: usize,
    pub max_queue: usize,
    pub prefill_chunk: usize,
    /// While sequences decode: prompt work per step, in token equivalents
    /// (a token deep in a long context counts for more), so a long prompt does
    /// not stretch everyone's inter-token latency.
    pub prefill_chunk_decoding: usize,
    pub max_kv_tokens: usize,
    pub threads: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_cap: usize,
    /// Largest `n` (samples of one prompt) a request may ask for.
    pub max_n: usize,
    /// Where the model runs: `cpu` (native quantized CPU kernels), `cuda` / `cuda:N`
    /// (the tensor backend on a GPU; needs a `--features cuda` build) or
    /// `candle-cpu` (the tensor backend on candle's CPU device, for checks).
    pub device: String,
    /// Tensor backend: weight dtype (`bf16`, `f16`, `f32`).
    pub dtype: String,
    /// Tensor backend: `dense` (GGUF quants dequantized at load) or `quantized`
    /// (GGUF blocks kept as candle quantized matmuls).
    pub weights: String,
    /// Tensor backend: positions per KV slot (one slot per `max_batch` sequence,
    /// preallocated on the device).
    pub slot_context: usize,
    /// Tensor backend: adapters resident on the device at once.
    pub device_adapter_slots: usize,
    /// Tensor backend: largest LoRA rank the device adapter slabs hold.
    pub device_max_rank: usize,
    /// Prompt positions the prefix cache may hold (0: off). It never holds more
    /// than the KV budget (`max_kv_tokens`) running sequences leave free.
    pub prefix_cache_tokens: usize,
    /// Positions per prefix-cache block: prompts share whole blocks.
    pub prefix_cache_block: usize,
    /// Percent of `prefix_cache_tokens` one tenant may hold, so one tenant
    /// cannot evict everyone's entries.
    pub prefix_cache_tenant_percent: u32,
    /// The CPU weight kernels (`device = "cpu"`): `auto` (the machine's best,
    /// chosen at run time: VNNI, else AVX2 with int8 activations), `int8`
    /// (the best path with int8 activations: the same), `f32` (the best with
    /// f32 activations), or one path:
    /// `avx2`, `avx2int8`, `avx512`, `avx512vnni`. A path the CPU or its OS
    /// lacks is refused at start.
    pub kernels: String,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_queue: 256,
            prefill_chunk: 512,
            prefill_chunk_decoding: 64,
            max_kv_tokens: 65_536,
            threads: 0,
            max_tokens_cap: 4096,
            max_n: 8,
            device: "cpu".into(),
            dtype: "bf16".into(),
            weights: "dense".into(),
            slot_context: 4096,
            device_adapter_slots: 64,
            device_max_rank: 16,
            prefix_cache_tokens: 16_384,
            prefix_cache_block: 16,
            prefix_cache_tenant_percent: 50,
            kernels: "auto".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterSettings {
    /// Registry root (registry.db + store/). None: no adapters.
    pub root: Option<PathBuf>,
    /// A PostgreSQL URL (`postgres://user:pass@host:port/db`) for the registry
    /// replicas share; when set, it is the registry and `root/registry.db` is
    /// not used (the version files stay in `root/store`).
    pub registry_url: Option<String>,
    /// An S3-compatible bucket (`s3://bucket[/prefix]`) for the version files
    /// replicas share; `root/store` is then this replica's verified local cache.
    /// Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`), never from this file.
    pub store_url: Option<String>,
    /// The endpoint of an S3-compatible server (`http://host:port`); unset: AWS.
    pub store_endpoint: Option<String>,
    pub max_resident: usize,
    pub max_resident_bytes: usize,
    pub max_rank: usize,
    pub max_version_bytes: u64,
    /// How often the server polls the registry's journal for changes other
    /// processes made (the trainer's rollouts and rollbacks), milliseconds.
    /// Changes made through the server itself are seen at once.
    pub alias_poll_ms: u64,
    /// Adapter loads run in parallel on this many threads.
    pub loaders: usize,
    /// Register-from-path reads only under this directory (symlinks resolved);
    /// unset, only uploads register versions.
    pub import_dir: Option<PathBuf>,
    /// How often the server records in the registry which versions it served,
    /// milliseconds (`retune adapters gc` keeps versions served recently).
    pub served_flush_ms: u64,
    /// Adapters (`tenant/name`) kept resident: the versions they route to
    /// (live and canary) are loaded at start and never evicted. Refused at
    /// start when they do not fit `max_resident` / `max_resident_bytes`.
    pub pinned: Vec<String>,
}

impl Default for AdapterSettings {
    fn default() -> Self {
        Self {
            root: None,
            registry_url: None,
            store_url: None,
            store_endpoint: None,
            max_resident: 64,
            max_resident_bytes: 2 << 30,
            max_rank: 256,
            max_version_bytes: 1 << 30,
            alias_poll_ms: 250,
            loaders: 2,
            import_dir: None,
            served_flush_ms: 5000,
            pinned: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// sha256 (hex) of the operator's admin key: every tenant, journal actor
    /// `admin`. With no admin keys at all the admin API is off.
    pub admin_key_sha256: Option<String>,
    /// Tenant-scoped management keys; each key's `name` is the actor the
    /// journal records for its changes.
    pub admins: Vec<AdminKey>,
    /// sha256 (hex) of the key Prometheus scrapes `/metrics` with (an operator
    /// admin key works too). `/metrics` names every tenant and adapter: it is
    /// closed without a key unless `public_metrics` (a separate, private network).
    pub metrics_key_sha256: Option<String>,
    pub public_metrics: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    pub name: String,
    pub key_sha256: String,
    /// The tenants this key manages.
    pub tenants: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    pub name: String,
    /// sha256 (hex) of each API key of this tenant.
    pub key_sha256: Vec<String>,
    #[serde(default)]
    pub capture: CaptureSettings,
    /// What follows when an erasure taints a live version: `report` (flag it),
    /// `rollback` (to the newest untainted version), `retrain` (ask the trainer).
    #[serde(default = "report")]
    pub on_tainted_live: String,
    /// Weight in the fair shares of the engine's queue, KV budget and prefill
    /// budget (default 1: equal shares).
    #[serde(default = "one")]
    pub weight: u32,
    /// Share this tenant's prompt prefixes with the other tenants that set this
    /// (the public scope of the prefix cache). Off by default: a shared cache
    /// tells, through time to first token, whether another tenant sent a prompt.
    #[serde(default)]
    pub public_prefixes: bool,
}

fn one() -> u32 {
    1
}

fn report() -> String {
    "report".into()
}

/// What of a tenant's traffic is recorded (on by default).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSettings {
    pub enabled: bool,
    /// Share of completions recorded, 0..=1.
    pub sample_rate: f64,
    /// Days a captured completion (and its feedback) is kept; none = kept until erased.
    pub retention_days: Option<u32>,
    /// Replace emails, phone numbers, cards and IBANs before storing (the output
    /// token ids, which would carry them, are then not stored).
    pub scrub: bool,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_rate: 1.0,
            retention_days: None,
            scrub: false,
        }
    }
}

/// The examples store (captured completions, feedback).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetSettings {
    /// SQLite file; default `<adapters.root>/datasets.db`; no file, no capture.
    pub path: Option<PathBuf>,
    /// A PostgreSQL URL (`postgres://user:pass@host:port/db`) shared by replicas;
    /// when set, it is the store and `path` is not used.
    pub url: Option<String>,
    /// Records waiting for the writer before new ones are dropped (and counted);
    /// while the store is unavailable as many again (plus one batch) are held
    /// and retried.
    pub capture_queue: usize,
}

impl Default for DatasetSettings {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            capture_queue: 4096,
        }
    }
}

impl AdapterSettings {
    /// The registry to open: the PostgreSQL URL when set, else `root/registry.db`.
    pub fn registry_location(&self, root: &Path) -> String {
        self.registry_url
            .clone()
            .unwrap_or_else(|| root.join("registry.db").to_string_lossy().into_owned())
    }
}

impl DatasetSettings {
    /// Where the store is, given the settings around it.
    pub fn resolved_path(&self, adapters: &AdapterSettings) -> Option<PathBuf> {
        self.path
            .clone()
            .or_else(|| adapters.root.as_ref().map(|r| r.join("datasets.db")))
    }

    /// The store to open: the PostgreSQL URL when set, else the SQLite file.
    pub fn location(&self, adapters: &AdapterSettings) -> Option<String> {
        self.url.clone().or_else(|| {
            self.resolved_path(adapters)
                .map(|p| p.to_string_lossy().into_owned())
        })
    }
}
