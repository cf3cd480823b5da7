//! Checkpoints that resume a run to the same bytes: the adapter, the optimizer's
//! moments and where the run stood, under a key of its settings, data and base.

use crate::error::{io, Result, TrainError};
use crate::lora::{write_dir_atomic, Adapter};
use crate::optim::AdamW;
use crate::settings::TrainSettings;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Serialize, Deserialize)]
pub(crate) struct CheckpointMeta {
    pub(crate) key: String,
    pub(crate) step: usize,
    pub(crate) loss_curve: Vec<f32>,
    pub(crate) eval_curve: Vec<(usize, f32)>,
    pub(crate) best_eval: Option<(usize, f32)>,
    pub(crate) since_best: usize,
    pub(crate) trained_tokens: u64,
    pub(crate) train_seconds: f64,
}

pub(crate) fn checkpoint_key(settings: &TrainSettings, data: &str, base: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut s = settings.clone();
    // how long a run may take does not change what it computes
    s.max_minutes = None;
    s.save_at_minutes.clear();
    s.checkpoint_every = 0;
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&s).unwrap_or_default());
    h.update(data.as_bytes());
    h.update(base.as_bytes());
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn save_checkpoint(
    dir: &Path,
    adapter: &Adapter,
    opt: &AdamW,
    best: Option<&[Tensor]>,
    meta: &CheckpointMeta,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let vals = adapter.values()?;
    for (i, ((name, _), v)) in adapter.named().into_iter().zip(vals).enumerate() {
        tensors.push((format!("p.{name}"), v));
        tensors.push((format!("m.{name}"), opt.m[i].clone()));
        tensors.push((format!("v.{name}"), opt.v[i].clone()));
        if let Some(b) = best {
            tensors.push((format!("b.{name}"), b[i].clone()));
        }
    }
    let map: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| v.to_device(&Device::Cpu).map(|v| (k, v)))
        .collect::<candle_core::Result<_>>()?;
    let tmp = dir.with_extension("state.tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    let st = std::fs::read(&tmp).map_err(io(&tmp))?;
    let _ = std::fs::remove_file(&tmp);
    let js = serde_json::to_vec_pretty(meta).map_err(|e| TrainError::Setting(e.to_string()))?;
    write_dir_atomic(dir, &[("state.safetensors", &st), ("state.json", &js)])
}

pub(crate) struct Resumed {
    pub(crate) meta: CheckpointMeta,
    pub(crate) best: Option<Vec<Tensor>>,
}

pub(crate) fn load_checkpoint(
    dir: &Path,
    key: &str,
    adapter: &Adapter,
    opt: &mut AdamW,
    dev: &Device,
) -> Result<Option<Resumed>> {
    let js = dir.join("state.json");
    if !js.exists() {
        return Ok(None);
    }
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let meta: CheckpointMeta = serde_json::from_slice(&std::fs::read(&js).map_err(io(&js))?)
        .map_err(|e| bad(e.to_string()))?;
    if meta.key != key {
        return Err(bad(
            "made with other settings, data or base model; remove it or use another --out".into(),
        ));
    }
    let st = candle_core::safetensors::load(dir.join("state.safetensors"), dev)?;
    let get = |k: String| {
        st.get(&k)
            .cloned()
            .ok_or_else(|| bad(format!("missing {k}")))
    };
    let mut best = Vec::new();
    for (i, (name, var)) in adapter.named().into_iter().enumerate() {
        var.set(&get(format!("p.{name}"))?)?;
        opt.m[i] = get(format!("m.{name}"))?;
        opt.v[i] = get(format!("v.{name}"))?;
        if let Some(b) = st.get(&format!("b.{name}")) {
            best.push(b.clone());
        }
    }
    opt.t = meta.step as u64;
    let best = (!best.is_empty()).then_some(best);
    Ok(Some(Resumed { meta, best }))
}
