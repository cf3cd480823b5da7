//! PEFT LoRA adapters.
//!
//! Tensor names: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
//! (A is `[r, in]`, B is `[out, r]`); the delta of a module is `s · B · A` with
//! `s = alpha / r` (or `alpha / √r` with rsLoRA). Every tensor is checked against
//! the base model's shapes before use; unsupported PEFT features are refused by name.

use crate::error::AdapterError;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::peft_config::{compile_patterns, first_match};
pub use crate::peft_config::{AdapterConfig, TargetModules, MAX_ALPHA};

/// The projections LoRA may target, in the engine's order.
pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn module_path(m: usize) -> &'static str {
    if m < 4 {
        "self_attn"
    } else {
        "mlp"
    }
}

/// Largest weight magnitude accepted in `lora_A`/`lora_B` (trained adapters hold
/// values of order 1; 3e38 overflowed the forward to NaN).
pub const MAX_WEIGHT: f32 = 1e4;

/// `(out, in)` of each of [`MODULES`] and the layer count of the base model.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseShapes {
    pub n_layers: usize,
    pub dims: [(usize, usize); 7],
}

#[derive(Clone, Debug)]
pub struct LoadLimits {
    pub max_rank: usize,
    pub max_file_bytes: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_rank: 256,
            max_file_bytes: 2 << 30,
        }
    }
}

/// One module's low-rank update, f32, row-major.
#[derive(Clone, Debug)]
pub struct LoraPair {
    pub rank: usize,
    pub scale: f32,
    /// `[rank, in]`
    pub a: Vec<f32>,
    /// `[out, rank]`
    pub b: Vec<f32>,
}

pub use crate::head::{ClassHead, HEAD_TENSOR, LABELS_METADATA, MAX_LABELS};

/// A loaded adapter: per layer, per module of [`MODULES`], an optional pair.
#[derive(Debug)]
pub struct LoraAdapter {
    pub layers: Vec<[Option<LoraPair>; 7]>,
    /// A classification adapter's head (answers are its labels).
    pub head: Option<ClassHead>,
    /// Bytes held by the weights.
    pub bytes: usize,
    pub config: AdapterConfig,
    /// Process-unique identity of this loaded copy (never reused), so a device
    /// backend can cache its uploaded weights safely.
    id: u64,
    /// The content id of the files this copy was loaded from, when the pool
    /// checked them against it (a content-addressed store).
    content: Option<String>,
}

/// Weight buffers of dropped adapters, kept for the next load: a load into
/// memory the process already touched costs no page faults (under a busy
/// decode on a VM, a fresh 19.5 MB adapter's ~4,800 faults measured 85 ms;
/// glibc hands a per-thread arena that emptied back to the kernel whatever its
/// trim settings). Bounded; buffers are matched by exact length.
pub(crate) mod recycle {
    use std::sync::Mutex;

    /// Bytes kept at most: a few r=16 all-module adapters of a 135M model.
    const KEEP_BYTES: usize = 96 << 20;

    static BIN: Mutex<(usize, Vec<(usize, Vec<Vec<f32>>)>)> = Mutex::new((0, Vec::new()));

    fn lock() -> std::sync::MutexGuard<'static, (usize, Vec<(usize, Vec<Vec<f32>>)>)> {
        BIN.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty vector with room for exactly `n` values, recycled when one is kept.
    pub fn take(n: usize) -> Vec<f32> {
        let mut bin = lock();
        let (bytes, lists) = &mut *bin;
        if let Some((_, list)) = lists.iter_mut().find(|(len, _)| *len == n) {
            if let Some(v) = list.pop() {
                *bytes -= n * 4;
                return v;
            }
        }
        drop(bin);
        Vec::with_capacity(n)
    }

    /// Keep these buffers (emptied) while there is room.
    pub fn put(bufs: Vec<Vec<f32>>) {
        let mut bin = lock();
        let (bytes, lists) = &mut *bin;
        for mut v in bufs {
            let n = v.capacity();
            if n == 0 || *bytes + n * 4 > KEEP_BYTES {
                continue;
            }
            v.clear();
            *bytes += n * 4;
            match lists.iter_mut().find(|(len, _)| *len == n) {
                Some((_, list)) => list.push(v),
                None => lists.push((n, vec![v])),
            }
        }
    }
}

impl Drop for LoraAdapter {
    fn drop(&mut self) {
        let bufs: Vec<Vec<f32>> = self
            .layers
            .iter_mut()
            .flatten()
            .flatten()
            .flat_map(|p| [std::mem::take(&mut p.a), std::mem::take(&mut p.b)])
            .collect();
        recycle::put(bufs);
    }
}

impl Clone for LoraAdapter {
    /// A clone is a new loaded copy: it gets a fresh identity, since its weights
    /// may be changed independently.
    fn clone(&self) -> Self {
        let mut c = Self::new(self.layers.clone(), self.bytes, self.config.clone());
        c.head = self.head.clone();
        c
    }
}

impl LoraAdapter {
    pub fn new(layers: Vec<[Option<LoraPair>; 7]>, bytes: usize, config: AdapterConfig) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            layers,
            head: None,
            bytes,
            config,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            content: None,
        }
    }

    /// Mark this copy as loaded from files checked against content id `id`.
    pub fn with_content_id(mut self, id: &str) -> Self {
        self.content = Some(id.to_string());
        self
    }

    /// What identifies these weights for caches keyed by them (the prefix
    /// cache): the checked content id, else this loaded copy's identity (a
    /// copy loaded again from unchecked files never shares entries).
    pub fn cache_key(&self) -> String {
        match &self.content {
            Some(c) => format!("content:{c}"),
            None => format!("copy:{}", self.id),
        }
    }

    /// Process-unique identity of this loaded copy.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn pair(&self, layer: usize, module: usize) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|l| l[module].as_ref())
    }

    pub fn max_rank(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.rank)
            .max()
            .unwrap_or(0)
    }
}

fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, AdapterError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AdapterError::NotFound(path.to_path_buf()),
        _ => AdapterError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if meta.len() > max {
        return Err(AdapterError::TooLarge {
            path: path.to_path_buf(),
            bytes: meta.len(),
            max,
        });
    }
    std::fs::read(path).map_err(|e| AdapterError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Map the weights file read-only (adapter versions are immutable files: the store
/// writes new versions by rename, never in place).
fn map_limited(path: &Path, max: u64) -> Result<memmap2::Mmap, AdapterError> {
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AdapterError::NotFound(path.to_path_buf()),
        _ => AdapterError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let len = file
        .metadata()
        .map_err(|e| AdapterError::Io {
            path: path.to_path_buf(),
            source: e,
        })?
        .len();
    if len > max {
        return Err(AdapterError::TooLarge {
            path: path.to_path_buf(),
            bytes: len,
            max,
        });
    }
    // SAFETY: the mapping is only read while `load_peft` runs and the file is an
    // immutable adapter version (see above).
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| AdapterError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

pub(crate) fn to_f32(
    name: &str,
    t: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>, AdapterError> {
    let d = t.data();
    let v: Vec<f32> = match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(AdapterError::Tensor {
                name: name.into(),
                reason: format!("dtype {other:?} (need f32/f16/bf16)"),
            })
        }
    };
    if v.iter().any(|x| !x.is_finite()) {
        return Err(AdapterError::NonFinite { name: name.into() });
    }
    if let Some(x) = v.iter().find(|x| x.abs() > MAX_WEIGHT) {
        return Err(AdapterError::Tensor {
            name: name.into(),
            reason: format!("holds {x:e}: LoRA weights above {MAX_WEIGHT:e} in magnitude are not a trained adapter"),
        });
    }
    Ok(v)
}

/// Parse `base_model.model.model.layers.N.<path>.<module>.lora_{A,B}[.default].weight`.
fn parse_name(name: &str) -> Option<(usize, usize, bool)> {
    let rest = name.strip_prefix("base_model.model.")?;
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    let rest = rest.strip_prefix("layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module_path_name, which) = rest.rsplit_once('.')?;
    let is_a = match which {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    let (sub, module) = module_path_name.split_once('.')?;
    let m = MODULES.iter().position(|x| *x == module)?;
    (sub == module_path(m)).then_some((layer, m, is_a))
}

/// Load and validate a PEFT LoRA adapter directory against the base model.
pub fn load_peft(
    dir: &Path,
    base: &BaseShapes,
    limits: &LoadLimits,
) -> Result<LoraAdapter, AdapterError> {
    let cfg_path = dir.join("adapter_config.json");
    let cfg_bytes = read_limited(&cfg_path, 1 << 20)?;
    let config: AdapterConfig =
        serde_json::from_slice(&cfg_bytes).map_err(|e| AdapterError::Config {
            field: "(file)".into(),
            reason: e.to_string(),
        })?;
    config.validate()?;
    // every pattern compiled once per load, not once per module
    let target = config.target_regex()?;
    let rank_patterns = compile_patterns(&config.rank_pattern)?;
    let alpha_patterns = compile_patterns(&config.alpha_pattern)?;
    let st_path: PathBuf = dir.join("adapter_model.safetensors");
    if !st_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(AdapterError::Unsupported {
            field: "adapter_model.bin".into(),
            reason: "pickle checkpoints are not loaded; save with safe_serialization=True".into(),
        });
    }
    let bytes = map_limited(&st_path, limits.max_file_bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| AdapterError::Corrupt {
        path: st_path.clone(),
        reason: e.to_string(),
    })?;

    let mut halves: HashMap<(usize, usize), (Option<Vec<f32>>, Option<Vec<f32>>, usize)> =
        HashMap::new();
    let wants_head = config.task_type.as_deref() == Some("SEQ_CLS");
    let mut head = None;
    let mut prior = None;
    for (name, view) in st.tensors() {
        if name == HEAD_TENSOR && wants_head {
            head = Some(crate::head::load_head(
                &bytes, &st_path, &name, &view, base,
            )?);
            continue;
        }
        if name == crate::head::PRIOR_TENSOR && wants_head {
            prior = Some(view);
            continue;
        }
        let Some((layer, m, is_a)) = parse_name(&name) else {
            return Err(AdapterError::Unsupported {
                field: name.clone(),
                reason: "only lora_A/lora_B of q,k,v,o,gate,up,down projections are supported"
                    .into(),
            });
        };
        if layer >= base.n_layers {
            return Err(AdapterError::Shape {
                name,
                got: vec![layer],
                expected: vec![base.n_layers],
            });
        }
        let (out, inp) = base.dims[m];
        let shape = view.shape().to_vec();
        let rank = if is_a {
            shape.first().copied()
        } else {
            shape.get(1).copied()
        }
        .unwrap_or(0);
        let expected = if is_a {
            vec![rank, inp]
        } else {
            vec![out, rank]
        };
        if shape.len() != 2 || shape != expected || rank == 0 {
            return Err(AdapterError::Shape {
                name,
                got: shape,
                expected,
            });
        }
        let module_name = format!("model.layers.{layer}.{}.{}", module_path(m), MODULES[m]);
        if !config.targets(target.as_ref(), &module_name, MODULES[m]) {
            return Err(AdapterError::Config {
                field: "target_modules".into(),
                reason: format!(
                    "weights present for `{module_name}`, which target_modules does not name"
                ),
            });
        }
        if rank > limits.max_rank {
            return Err(AdapterError::RankTooLarge {
                module: module_name,
                rank,
                max: limits.max_rank,
            });
        }
        let data = to_f32(&name, &view)?;
        let e = halves.entry((layer, m)).or_insert((None, None, rank));
        if e.2 != rank {
            return Err(AdapterError::Shape {
                name,
                got: vec![rank],
                expected: vec![e.2],
            });
        }
        if is_a {
            e.0 = Some(data);
        } else {
            e.1 = Some(data);
        }
    }
    if halves.is_empty() {
        return Err(AdapterError::Corrupt {
            path: st_path,
            reason: "no LoRA tensors".into(),
        });
    }
    let mut layers: Vec<[Option<LoraPair>; 7]> =
        (0..base.n_layers).map(|_| Default::default()).collect();
    let mut total = 0;
    for ((layer, m), (a, b, rank)) in halves {
        let module_name = format!("model.layers.{layer}.{}.{}", module_path(m), MODULES[m]);
        let (Some(a), Some(b)) = (a, b) else {
            return Err(AdapterError::Tensor {
                name: module_name,
                reason: "lora_A and lora_B must both be present".into(),
            });
        };
        let r_cfg = first_match(&rank_patterns, &module_name).unwrap_or(config.r);
        if r_cfg != rank {
            return Err(AdapterError::Config {
                field: "r/rank_pattern".into(),
                reason: format!(
                    "`{module_name}` has rank {rank} in its weights but {r_cfg} in the config"
                ),
            });
        }
        let alpha = first_match(&alpha_patterns, &module_name).unwrap_or(config.lora_alpha);
        let scale = if config.use_rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        };
        total += (a.len() + b.len()) * 4;
        layers[layer][m] = Some(LoraPair { rank, scale, a, b });
    }
    if wants_head && head.is_none() {
        return Err(AdapterError::Tensor {
            name: HEAD_TENSOR.into(),
            reason: "a SEQ_CLS adapter must hold its head".into(),
        });
    }
    if let (Some(h), Some(v)) = (&mut head, &prior) {
        h.prior = Some(std::sync::Arc::new(crate::head::load_prior(
            &bytes, &st_path, v, &h.labels,
        )?));
    }
    if let Some(h) = &head {
        total += h.bytes();
    }
    let mut a = LoraAdapter::new(layers, total, config);
    a.head = head;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn parses_peft_tensor_names() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, 0, true))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, 6, false))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.mlp.q_proj.lora_B.weight"),
            None
        );
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(
            parse_name("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"),
            None
        );
    }

    #[test]
    fn patterns_follow_peft_suffix_rule() {
        let mut p = BTreeMap::new();
        p.insert("q_proj".to_string(), 4usize);
        p.insert(r"layers\.1\.mlp\.down_proj".to_string(), 16usize);
        assert_eq!(
            AdapterConfig::pattern_value(&p, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(4)
        );
        assert_eq!(
            AdapterConfig::pattern_value(&p, "model.layers.1.mlp.down_proj").unwrap(),
            Some(16)
        );
        assert_eq!(
            AdapterConfig::pattern_value(&p, "model.layers.2.mlp.down_proj").unwrap(),
            None
        );
        assert_eq!(
            AdapterConfig::pattern_value(&p, "model.layers.0.self_attn.xq_proj").unwrap(),
            None
        );
    }
}
