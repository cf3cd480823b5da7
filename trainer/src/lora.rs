//! The adapter being trained: PEFT's initialisation from a seed, loading an
//! existing PEFT adapter as the starting point, and saving in PEFT's format
//! (`adapter_config.json` + `adapter_model.safetensors`) byte-for-byte
//! reproducibly.

use crate::error::{io, Result, TrainError};
use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use retune_adapters::{BaseShapes, LoadLimits, MODULES};
use retune_engine::{LoraParam, TrainLora};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What is trained: rank, scale and where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA: scale `alpha / sqrt(rank)` instead of `alpha / rank`.
    pub rslora: bool,
    /// Indices into [`MODULES`] (q, k, v, o, gate, up, down).
    pub modules: Vec<usize>,
    /// Layers holding LoRA: `first_layer..n_layers`.
    pub first_layer: usize,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha as f64 / (self.rank as f64).sqrt()
        } else {
            self.alpha as f64 / self.rank as f64
        }
    }

    pub fn check(&self, shapes: &BaseShapes) -> Result<()> {
        let bad = |m: String| Err(TrainError::Setting(m));
        if self.rank == 0 || self.rank > 256 {
            return bad(format!("rank {} (1..=256)", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("alpha {} must be positive", self.alpha));
        }
        if self.modules.is_empty() || self.modules.iter().any(|&m| m >= 7) {
            return bad("modules: a non-empty subset of q,k,v,o,gate,up,down".into());
        }
        if self.first_layer >= shapes.n_layers {
            return bad(format!(
                "first LoRA layer {} but the model has {} layers",
                self.first_layer, shapes.n_layers
            ));
        }
        Ok(())
    }
}

/// LoRA parameters plus their spec and the base's layer count.
pub struct Adapter {
    pub spec: LoraSpec,
    pub n_layers: usize,
    pub lora: TrainLora,
    /// Recorded in the saved config (PEFT's `lora_dropout`).
    pub dropout: f32,
    /// A classification head over the final hidden state (a label task).
    pub head: Option<ClassHead>,
    /// The classical classifier stored beside the head (see
    /// [`retune_adapters::LabelPrior`]); not trained by gradient.
    pub prior: Option<retune_datasets::classical::TextClassifier>,
}

/// A linear classification head on the last token's final hidden state: PEFT's
/// `SEQ_CLS` `score` module (no bias), one row per label.
pub struct ClassHead {
    pub labels: Vec<String>,
    /// `[labels, hidden]`
    pub weight: Var,
}

/// The head's tensor name in a PEFT `SEQ_CLS` adapter (`modules_to_save = ["score"]`).
pub const HEAD_TENSOR: &str = retune_adapters::HEAD_TENSOR;

impl ClassHead {
    /// Row `i` starts as the mean input embedding of label `i`'s tokens, so the
    /// untrained head already prefers labels whose words the hidden state is near
    /// (the tied output projection's geometry).
    pub fn init(
        labels: &[String],
        model: &retune_engine::DeviceModel,
        tok: &retune_engine::Tok,
    ) -> Result<Self> {
        let mut rows = Vec::with_capacity(labels.len());
        for l in labels {
            let ids = tok.encode(l, false)?;
            if ids.is_empty() {
                return Err(TrainError::Data(format!("label `{l}` has no tokens")));
            }
            rows.push(model.embedding_rows(&ids)?.mean_keepdim(0)?);
        }
        let w = Tensor::cat(&rows, 0)?;
        Ok(Self {
            labels: labels.to_vec(),
            weight: Var::from_tensor(&w)?,
        })
    }
}

fn module_path(layer: usize, m: usize) -> String {
    let group = if m < 4 { "self_attn" } else { "mlp" };
    format!(
        "base_model.model.model.layers.{layer}.{group}.{}",
        MODULES[m]
    )
}

impl Adapter {
    /// PEFT's default init: A ~ Kaiming-uniform(a=√5) = U(±1/√in), B = 0, from `seed`.
    pub fn init(spec: &LoraSpec, shapes: &BaseShapes, seed: u64, dev: &Device) -> Result<Self> {
        spec.check(shapes)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(shapes.n_layers);
        for l in 0..shapes.n_layers {
            let mut row: [Option<LoraParam>; 7] = Default::default();
            if l >= spec.first_layer {
                for &m in &spec.modules {
                    let (out, inp) = shapes.dims[m];
                    let bound = 1.0 / (inp as f32).sqrt();
                    let a: Vec<f32> = (0..spec.rank * inp)
                        .map(|_| rng.gen_range(-bound..bound))
                        .collect();
                    row[m] = Some(LoraParam {
                        a: Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), dev)?)?,
                        b: Var::zeros((out, spec.rank), candle_core::DType::F32, dev)?,
                        scale: spec.scale(),
                    });
                }
            }
            layers.push(row);
        }
        Ok(Self {
            spec: spec.clone(),
            n_layers: shapes.n_layers,
            lora: TrainLora { layers },
            dropout: 0.0,
            head: None,
            prior: None,
        })
    }

    /// Start from an existing PEFT adapter (validated against the base's shapes);
    /// all its pairs must share one rank and scale.
    pub fn from_peft(dir: &Path, shapes: &BaseShapes, dev: &Device) -> Result<Self> {
        let a = retune_adapters::load_peft(dir, shapes, &LoadLimits::default())?;
        if !a.config.rank_pattern.is_empty() || !a.config.alpha_pattern.is_empty() {
            return Err(TrainError::Setting(format!(
                "{}: adapters with rank_pattern/alpha_pattern cannot be trained further",
                dir.display()
            )));
        }
        let mut spec: Option<LoraSpec> = None;
        let mut layers = Vec::with_capacity(shapes.n_layers);
        let mut first = None;
        let mut modules = std::collections::BTreeSet::new();
        for (l, row) in a.layers.iter().enumerate() {
            let mut out: [Option<LoraParam>; 7] = Default::default();
            for (m, p) in row.iter().enumerate() {
                let Some(p) = p else { continue };
                let (o, i) = shapes.dims[m];
                first.get_or_insert(l);
                modules.insert(m);
                // the loader folds the scale into nothing: A and B are as stored
                out[m] = Some(LoraParam {
                    a: Var::from_tensor(&Tensor::from_slice(&p.a, (p.rank, i), dev)?)?,
                    b: Var::from_tensor(&Tensor::from_slice(&p.b, (o, p.rank), dev)?)?,
                    scale: p.scale as f64,
                });
                let s = LoraSpec {
                    rank: p.rank,
                    alpha: a.config.lora_alpha,
                    rslora: a.config.use_rslora,
                    modules: Vec::new(),
                    first_layer: 0,
                };
                match &spec {
                    None => spec = Some(s),
                    Some(prev) if prev.rank != s.rank => {
                        return Err(TrainError::Setting(format!(
                            "{}: mixed ranks ({} and {}) cannot be trained further",
                            dir.display(),
                            prev.rank,
                            s.rank
                        )))
                    }
                    _ => {}
                }
            }
            layers.push(out);
        }
        let mut spec = spec.ok_or_else(|| {
            TrainError::Setting(format!("{}: the adapter has no LoRA pairs", dir.display()))
        })?;
        spec.modules = modules.into_iter().collect();
        spec.first_layer = first.unwrap_or(0);
        let head = match &a.head {
            Some(h) => Some(ClassHead {
                labels: h.labels.clone(),
                weight: Var::from_tensor(&Tensor::from_slice(
                    &h.weight,
                    (h.labels.len(), h.hidden),
                    dev,
                )?)?,
            }),
            None => None,
        };
        Ok(Self {
            spec,
            n_layers: shapes.n_layers,
            lora: TrainLora { layers },
            dropout: 0.0,
            head,
            prior: None,
        })
    }

    /// Every trained variable: the LoRA pairs, then the head.
    pub fn vars(&self) -> Vec<&Var> {
        let mut v: Vec<&Var> = self.lora.vars().collect();
        if let Some(h) = &self.head {
            v.push(&h.weight);
        }
        v
    }

    /// (PEFT tensor name, var) in a fixed order (that of [`Adapter::vars`]).
    pub fn named(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (l, row) in self.lora.layers.iter().enumerate() {
            for (m, p) in row.iter().enumerate() {
                if let Some(p) = p {
                    let base = module_path(l, m);
                    out.push((format!("{base}.lora_A.weight"), &p.a));
                    out.push((format!("{base}.lora_B.weight"), &p.b));
                }
            }
        }
        if let Some(h) = &self.head {
            out.push((HEAD_TENSOR.to_string(), &h.weight));
        }
        out
    }

    pub fn config_json(&self, base_name: &str) -> serde_json::Value {
        // the module names, or a regex naming the layers too when LoRA does not
        // cover every layer
        let names: Vec<&str> = self.spec.modules.iter().map(|&m| MODULES[m]).collect();
        let mut target = serde_json::json!(names);
        if self.spec.first_layer > 0 {
            let layers: Vec<String> = (self.spec.first_layer..self.n_layers)
                .map(|l| l.to_string())
                .collect();
            target = serde_json::json!(format!(
                r".*\.layers\.({})\.(self_attn|mlp)\.({})",
                layers.join("|"),
                names.join("|")
            ));
        }
        let (task, save) = match &self.head {
            Some(_) => ("SEQ_CLS", serde_json::json!(["score"])),
            None => ("CAUSAL_LM", serde_json::Value::Null),
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": task,
            "base_model_name_or_path": base_name,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "use_rslora": self.spec.rslora,
            "target_modules": target,
            "lora_dropout": self.dropout,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": save,
            "use_dora": false,
        })
    }

    /// Write the PEFT directory (replaced whole: written beside, then renamed).
    pub fn save_peft(&self, dir: &Path, base_name: &str) -> Result<()> {
        let named = self.named();
        let mut data = Vec::with_capacity(named.len());
        for (name, v) in &named {
            let t = v.as_tensor().to_device(&Device::Cpu)?;
            let shape = t.dims().to_vec();
            let vals: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let bytes: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
            data.push((name.clone(), shape, bytes));
        }
        let mut data: Vec<_> = data
            .into_iter()
            .map(|(n, s, b)| (n, s, safetensors::Dtype::F32, b))
            .collect();
        // a head's labels travel in the weights file's metadata, in row order
        let mut meta = match &self.head {
            Some(h) => Some(std::collections::HashMap::from([(
                retune_adapters::LABELS_METADATA.to_string(),
                serde_json::to_string(&h.labels).map_err(|e| TrainError::Setting(e.to_string()))?,
            )])),
            None => None,
        };
        if let (Some(m), Some(p)) = (&mut meta, &self.prior) {
            let ((key, json), shape, dtype, bytes) = retune_adapters::head::prior_parts(p);
            m.insert(key, json);
            data.push((
                retune_adapters::PRIOR_TENSOR.to_string(),
                shape,
                dtype,
                bytes,
            ));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, d, b)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| TrainError::Setting(format!("safetensors view: {e}")))
            })
            .collect::<Result<_>>()?;
        let st = safetensors::serialize(views, meta)
            .map_err(|e| TrainError::Setting(format!("safetensors: {e}")))?;
        let st = retune_adapters::head::sorted_metadata(st)
            .map_err(|e| TrainError::Setting(format!("safetensors: {e}")))?;
        let cfg = serde_json::to_vec_pretty(&self.config_json(base_name))
            .map_err(|e| TrainError::Setting(e.to_string()))?;
        write_dir_atomic(
            dir,
            &[
                ("adapter_model.safetensors", &st),
                ("adapter_config.json", &cfg),
            ],
        )
    }

    /// Copies of the current values (for the best-so-far adapter).
    pub fn values(&self) -> Result<Vec<Tensor>> {
        Ok(self
            .vars()
            .into_iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?)
    }

    pub fn set_values(&self, vals: &[Tensor]) -> Result<()> {
        for (v, t) in self.vars().into_iter().zip(vals) {
            v.set(t)?;
        }
        Ok(())
    }
}

/// Write files into `dir` so a reader sees the old directory or the new one, never a mix.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for (f, bytes) in files {
        let p = tmp.join(f);
        std::fs::write(&p, bytes).map_err(io(&p))?;
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io(&p))?;
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Module indices (into [`retune_adapters::MODULES`] order: q,k,v,o,gate,up,down)
/// from names (`q`, `q_proj`, …, or `all`), sorted and deduplicated.
pub fn parse_modules(names: &[String]) -> crate::Result<Vec<usize>> {
    let mut out = Vec::new();
    for n in names {
        let n = n.trim().trim_end_matches("_proj");
        if n == "all" {
            out.extend(0..7);
            continue;
        }
        let i = ["q", "k", "v", "o", "gate", "up", "down"]
            .iter()
            .position(|m| *m == n)
            .ok_or_else(|| crate::TrainError::Setting(format!("unknown module `{n}`")))?;
        out.push(i);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(crate::TrainError::Setting("no target modules".into()));
    }
    Ok(out)
}
