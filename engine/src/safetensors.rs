//! HF safetensors directories (`config.json` + `*.safetensors`, f32/f16/bf16).

use crate::error::{EngineError, Result};
use crate::linear::{Linear, Weight};
use crate::model::{Arch, Layer, Model, ModelConfig};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    // Gemma 3
    query_pre_attn_scalar: Option<f32>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
    /// transformers 5 writes the rope bases per layer type here
    rope_parameters: Option<serde_json::Value>,
    hidden_activation: Option<String>,
    final_logit_softcapping: Option<f32>,
    attn_logit_softcapping: Option<f32>,
}
fn default_eps() -> f32 {
    1e-5
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_ctx() -> usize {
    4096
}

pub fn read_config(dir: &Path) -> Result<(ModelConfig, bool)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::NotFound(path.clone()),
        _ => EngineError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let hf: HfConfig = serde_json::from_str(&text)
        .map_err(|e| EngineError::invalid(&path, format!("config.json: {e}")))?;
    let arch = Arch::parse(&hf.model_type)?;
    let head_dim = hf
        .head_dim
        .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
    let rope_freq_divisors = match &hf.rope_scaling {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(rs) => {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let num = |k: &str| rs.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
            let factor = num("factor")
                .ok_or_else(|| EngineError::invalid(&path, "rope_scaling.factor missing"))?;
            match kind {
                "default" => Vec::new(),
                "linear" => vec![factor; head_dim / 2],
                "llama3" => crate::model::llama3_rope_divisors(
                    hf.rope_theta,
                    head_dim,
                    factor,
                    num("low_freq_factor").unwrap_or(1.0),
                    num("high_freq_factor").unwrap_or(4.0),
                    num("original_max_position_embeddings").unwrap_or(8192.0),
                ),
                other => {
                    return Err(EngineError::invalid(
                        &path,
                        format!("rope_scaling type `{other}` is not supported"),
                    ))
                }
            }
        }
    };
    let mut cfg = ModelConfig {
        rope_freq_divisors,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window: None,
        swa_pattern: 0,
        rope_theta_swa: None,
        arch,
        n_layer: hf.num_hidden_layers,
        hidden: hf.hidden_size,
        ffn: hf.intermediate_size,
        n_head: hf.num_attention_heads,
        n_kv_head: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        vocab: hf.vocab_size,
        rms_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta,
        context: hf.max_position_embeddings,
    };
    if arch == Arch::Gemma3 {
        gemma3_config(&hf, &mut cfg).map_err(|r| EngineError::invalid(&path, r))?;
    }
    cfg.validate()?;
    // Gemma ties its output head to the embedding unless it says otherwise
    let tied = hf.tie_word_embeddings.unwrap_or(arch == Arch::Gemma3);
    Ok((cfg, tied))
}

/// Gemma 3's own keys: the attention scale, the sliding window and its layers'
/// rope base; what the engine does not run (soft-capping, another activation,
/// an irregular layer pattern) is refused by name.
fn gemma3_config(hf: &HfConfig, cfg: &mut ModelConfig) -> std::result::Result<(), String> {
    if let Some(s) = hf.query_pre_attn_scalar {
        cfg.attn_scale = 1.0 / s.sqrt();
    }
    if let Some(a) = hf.hidden_activation.as_deref() {
        if a != "gelu_pytorch_tanh" {
            return Err(format!("hidden_activation `{a}` is not supported"));
        }
    }
    if hf.final_logit_softcapping.is_some() || hf.attn_logit_softcapping.is_some() {
        return Err("logit soft-capping is not supported".into());
    }
    cfg.sliding_window = hf.sliding_window.filter(|&w| w > 0);
    let theta = |kind: &str| {
        hf.rope_parameters
            .as_ref()
            .and_then(|p| p.get(kind)?.get("rope_theta")?.as_f64())
            .map(|t| t as f32)
    };
    if let Some(t) = theta("full_attention") {
        cfg.rope_theta = t;
    }
    cfg.rope_theta_swa = Some(
        theta("sliding_attention")
            .or(hf.rope_local_base_freq)
            .unwrap_or(10_000.0),
    );
    cfg.swa_pattern = match &hf.layer_types {
        Some(types) => {
            // the first global layer gives the period; every layer must follow it
            let n = types
                .iter()
                .position(|t| t == "full_attention")
                .map_or(0, |i| i + 1);
            let fits = types.len() == cfg.n_layer
                && types.iter().enumerate().all(|(i, t)| {
                    let slides = n == 0 || i % n < n - 1;
                    t == if slides {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                });
            if !fits {
                return Err(format!("layer_types {types:?} is not a regular pattern"));
            }
            n
        }
        None => hf
            .sliding_window_pattern
            .unwrap_or(crate::family::gemma3::SWA_PATTERN),
    };
    Ok(())
}

struct Tensors {
    map: HashMap<String, Tensor>,
}

impl Tensors {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        if t.dims() != shape {
            return Err(EngineError::ShapeMismatch {
                name: name.into(),
                got: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            }
            other => Err(EngineError::UnsupportedQuantization {
                tensor: name.into(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    fn linear(&mut self, prefix: &str, rows: usize, cols: usize) -> Result<Linear> {
        let w = self.take(&format!("{prefix}.weight"), &[rows, cols])?;
        let bname = format!("{prefix}.bias");
        let bias = if self.map.contains_key(&bname) {
            Some(self.take(&bname, &[rows])?)
        } else {
            None
        };
        Linear::new(rows, cols, Weight::F32(w), bias)
    }
}

pub fn load_model(dir: &Path) -> Result<Model> {
    let (cfg, tied) = read_config(dir)?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::invalid(dir, "no .safetensors files"));
    }
    let mut map = HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| EngineError::invalid(f, format!("unreadable safetensors: {e}")))?;
        map.extend(part);
    }
    let mut ts = Tensors { map };
    let (h, qd, kd, ff) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
    let embed = Linear::new(
        cfg.vocab,
        h,
        Weight::F32(ts.take("model.embed_tokens.weight", &[cfg.vocab, h])?),
        None,
    )?;
    let mut layers = Vec::with_capacity(cfg.n_layer);
    let family = cfg.arch.family();
    // HF keeps w of a norm x·(1+w); the engine reads 1+w, as GGUF stores it
    let plus = |mut w: Vec<f32>| {
        if family.norm_plus_one {
            w.iter_mut().for_each(|v| *v += 1.0);
        }
        w
    };
    for i in 0..cfg.n_layer {
        let p = format!("model.layers.{i}");
        let norms = family
            .norms
            .iter()
            .map(|n| {
                ts.take(&format!("{p}.{}.weight", n.hf), &[n.len(&cfg)])
                    .map(plus)
            })
            .collect::<Result<Vec<_>>>()?;
        layers.push(Layer {
            norms,
            q: ts.linear(&format!("{p}.self_attn.q_proj"), qd, h)?,
            k: ts.linear(&format!("{p}.self_attn.k_proj"), kd, h)?,
            v: ts.linear(&format!("{p}.self_attn.v_proj"), kd, h)?,
            o: ts.linear(&format!("{p}.self_attn.o_proj"), h, qd)?,
            gate: ts.linear(&format!("{p}.mlp.gate_proj"), ff, h)?,
            up: ts.linear(&format!("{p}.mlp.up_proj"), ff, h)?,
            down: ts.linear(&format!("{p}.mlp.down_proj"), h, ff)?,
        });
    }
    let norm = plus(ts.take("model.norm.weight", &[h])?);
    let lm_head = if !tied || ts.map.contains_key("lm_head.weight") {
        Some(Linear::new(
            cfg.vocab,
            h,
            Weight::F32(ts.take("lm_head.weight", &[cfg.vocab, h])?),
            None,
        )?)
    } else {
        None
    };
    Model::new(cfg, embed, layers, norm, lm_head)
}
