use super::DeviceModel;
use crate::error::{EngineError, Result};
use candle_core::Tensor;
use retune_adapters::LoraAdapter;
use std::collections::HashMap;

pub(super) struct AdapterSlots {
    /// adapter identity → (slot, last step it was used)
    pub(super) map: HashMap<u64, (usize, u64)>,
    pub(super) free: Vec<usize>,
    pub(super) step: u64,
    pub(super) uploads: u64,
}

impl DeviceModel {
    pub(super) fn upload(&self, a: &LoraAdapter, slot: usize) -> Result<()> {
        if a.layers.len() != self.cfg.n_layer {
            return Err(EngineError::InvalidRequest(format!(
                "adapter has {} layers, the model {}",
                a.layers.len(),
                self.cfg.n_layer
            )));
        }
        let r = self.max_rank;
        for (li, layer) in a.layers.iter().enumerate() {
            for (m, pair) in layer.iter().enumerate() {
                let (out, inp) = self.base_shapes.dims[m];
                let mut ah = vec![0f32; r * inp];
                let mut bh = vec![0f32; out * r];
                if let Some(p) = pair {
                    if p.rank > r {
                        return Err(EngineError::InvalidRequest(format!(
                            "adapter rank {} exceeds the device's max_rank {r}",
                            p.rank
                        )));
                    }
                    if p.a.len() != p.rank * inp || p.b.len() != out * p.rank {
                        return Err(EngineError::ShapeMismatch {
                            name: format!("adapter layer {li} module {m}"),
                            got: vec![p.a.len(), p.b.len()],
                            expected: vec![p.rank * inp, out * p.rank],
                        });
                    }
                    ah[..p.rank * inp].copy_from_slice(&p.a);
                    for (o, row) in p.b.chunks_exact(p.rank).enumerate() {
                        for (k, v) in row.iter().enumerate() {
                            bh[o * r + k] = v * p.scale;
                        }
                    }
                }
                let at = Tensor::from_vec(ah, (1, r, inp), &self.device)?.to_dtype(self.dtype)?;
                let bt = Tensor::from_vec(bh, (1, out, r), &self.device)?.to_dtype(self.dtype)?;
                self.lora_a[li][m].slice_set(&at, 0, slot)?;
                self.lora_b[li][m].slice_set(&bt, 0, slot)?;
            }
        }
        Ok(())
    }
}
