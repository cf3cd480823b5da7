//! The tensor backend: the same llama-family forward as [`crate::model`], written
//! with candle tensor ops so it runs on any candle device — CUDA with the `cuda`
//! feature, or candle's CPU device (which is how CI checks it against the native
//! CPU engine).
//!
//! - Weights: dense in the chosen dtype (GGUF quants dequantized at load) or, with
//!   [`WeightMode::Quantized`], GGUF blocks kept as candle `QMatMul`s on the device.
//!   The residual stream and norms stay f32; projections run in the weight dtype.
//! - KV cache: one preallocated slab per layer for K and V,
//!   `[slots, kv_heads, slot_context, head_dim]`; a sequence owns a slot while it
//!   lives ([`DeviceKv`], returned on drop). New rows are written with one scatter
//!   per layer; decode attention runs for all decode rows in one batched matmul
//!   over the slab (masked to each slot's length); prefill chunks attend per item.
//! - LoRA: adapters are uploaded once into per-(layer, module) slabs
//!   `A: [adapter_slots, max_rank, in]`, `B: [adapter_slots, out, max_rank]`
//!   (lower ranks zero-padded, the scale folded into B) and cached by the
//!   adapter's identity. A step gathers its distinct adapters' slots and runs each
//!   module's delta as two batched matmuls over tokens grouped (and padded) per
//!   adapter: the kernel count per step does not grow with the number of adapters.

mod adapter_slots;
mod compute;
mod forward;
mod kv;
mod options;
mod plan;
mod train;
mod train_ops;

pub use compute::{Cache, Compute};
pub use kv::DeviceKv;
pub use options::{
    build_backend, build_device, options_from_settings, parse_device, parse_dtype, DeviceOptions,
    WeightMode,
};
pub use train::{
    grad_of, smoothed_nll, weighted_nll, Dropout, LoraParam, Mode, TrainBatch, TrainLora,
};

use crate::error::{EngineError, Result};
use crate::kernels_f32::{self, Kernels};
use crate::linear::{Linear, Weight};
use crate::model::{rope_tables, Model, ModelConfig};
use adapter_slots::AdapterSlots;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use forward::{DLayer, DLinear};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct DeviceModel {
    pub cfg: ModelConfig,
    device: Device,
    dtype: DType,
    kv_dtype: DType,
    embed: Tensor,
    lm_head: Option<DLinear>,
    norm: Tensor,
    layers: Vec<DLayer>,
    /// cos/sin `[context, head_dim / 2]` per rope table ([`ModelConfig::rope_bases`])
    ropes: Vec<(Tensor, Tensor)>,
    /// per layer: K and V slabs `[slots * kv_heads * slot_context, head_dim]`
    kv: Vec<(Tensor, Tensor)>,
    slots: usize,
    free_slots: Arc<Mutex<Vec<usize>>>,
    max_rank: usize,
    adapter_slot_count: usize,
    /// per layer, per module: A `[adapter_slots, max_rank, in]`, B `[adapter_slots, out, max_rank]`
    lora_a: Vec<Vec<Tensor>>,
    lora_b: Vec<Vec<Tensor>>,
    adapters: Mutex<AdapterSlots>,
    base_shapes: retune_adapters::BaseShapes,
    fingerprint: String,
    /// Training on the CPU runs fused ops (see `train_ops`); off, the composed
    /// differentiable ops every device has.
    fused_training: std::sync::atomic::AtomicBool,
}

/// The weight as dense f32 rows (consumes the host copy).
fn host_f32(k: Kernels, l: Linear) -> Result<Vec<f32>> {
    Ok(match l.weight {
        Weight::F32(w) => w,
        Weight::Packed { format, packed } => {
            let mut out = vec![0f32; l.rows * l.cols];
            for (r, o) in out.chunks_exact_mut(l.cols).enumerate() {
                packed.dequant_row(format, r, o);
            }
            out
        }
        Weight::Blocks { format, data } => {
            let rb = data.len() / l.rows.max(1);
            let mut out = vec![0f32; l.rows * l.cols];
            for (r, o) in out.chunks_exact_mut(l.cols).enumerate() {
                kernels_f32::dequant_row(k, format, &data[r * rb..(r + 1) * rb], o);
            }
            out
        }
        Weight::KBlocks { format, data } => {
            let rb = data.len() / l.rows.max(1);
            let mut out = vec![0f32; l.rows * l.cols];
            for (r, o) in out.chunks_exact_mut(l.cols).enumerate() {
                crate::kquants::dequant_row(format, &data[r * rb..(r + 1) * rb], o);
            }
            out
        }
        Weight::Candle(QMatMul::QTensor(q)) => {
            q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?
        }
        Weight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?
        }
    })
}

fn ggml_of(l: &Linear) -> Option<(GgmlDType, &[u8])> {
    if let Weight::KBlocks { format, data } = &l.weight {
        return Some((
            match format {
                crate::kquants::KFormat::Q4K => GgmlDType::Q4K,
                crate::kquants::KFormat::Q5K => GgmlDType::Q5K,
                crate::kquants::KFormat::Q6K => GgmlDType::Q6K,
            },
            data,
        ));
    }
    let (format, data) = l.blocks()?;
    Some((
        match format {
            crate::kernels::BlockFormat::Q4_0 => GgmlDType::Q4_0,
            crate::kernels::BlockFormat::Q4_1 => GgmlDType::Q4_1,
            crate::kernels::BlockFormat::Q8_0 => GgmlDType::Q8_0,
        },
        data,
    ))
}

impl DeviceModel {
    /// A norm weight of the family's block (or the final one).
    pub(super) fn norm_tensor(&self, w: crate::family::Norm) -> &Tensor {
        match w {
            crate::family::Norm::Layer(li, n) => &self.layers[li].norms[n],
            crate::family::Norm::Final => &self.norm,
        }
    }

    /// `norm` (a backend's RMS norm of rows) of every `w`-wide piece of each
    /// row of `x`: a whole row, or each head of a q/k row.
    pub(super) fn norm_pieces(
        &self,
        x: &Tensor,
        w: crate::family::Norm,
        norm: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let w = self.norm_tensor(w);
        let width = w.dim(0)?;
        let (r, c) = x.dims2()?;
        if c == width {
            return norm(x, w);
        }
        Ok(norm(&x.reshape((r * c / width, width))?, w)?.reshape((r, c))?)
    }
}

impl DeviceModel {
    /// Move a loaded model onto `device` (consumes the host weights layer by layer).
    pub fn from_model(model: Model, device: &Device, opts: &DeviceOptions) -> Result<Self> {
        if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(EngineError::InvalidRequest(format!(
                "device dtype {:?} (f32, f16 or bf16)",
                opts.dtype
            )));
        }
        if opts.slots == 0 || opts.slot_context == 0 || opts.adapter_slots == 0 {
            return Err(EngineError::InvalidRequest(
                "device slots, slot_context and adapter_slots must be at least 1".into(),
            ));
        }
        let base_shapes = model.base_shapes();
        let fingerprint = model.fingerprint();
        let k = model.kernels();
        let Model {
            cfg: host_cfg,
            embed,
            layers,
            norm,
            lm_head,
            ..
        } = model;
        let mut cfg = host_cfg.clone();
        cfg.context = host_cfg.context.min(opts.slot_context);
        let dt = opts.dtype;
        let dense = |l: Linear| -> Result<Tensor> {
            let shape = (l.rows, l.cols);
            let w = Tensor::from_vec(host_f32(k, l)?, shape, &Device::Cpu)?;
            Ok(w.to_device(device)?.to_dtype(dt)?)
        };
        let linear = |l: Linear| -> Result<DLinear> {
            let b = match &l.bias {
                Some(b) => Some(Tensor::from_slice(b, l.rows, device)?.to_dtype(dt)?),
                None => None,
            };
            if opts.weights == WeightMode::Quantized {
                if let Some((gd, data)) = ggml_of(&l) {
                    let q = qtensor_from_ggml(gd, data, vec![l.rows, l.cols], device)?;
                    return Ok(DLinear::Quant {
                        w: QMatMul::from_qtensor(q)?,
                        b,
                    });
                }
            }
            Ok(DLinear::Dense { w: dense(l)?, b })
        };
        let vec1 = |v: &[f32]| -> Result<Tensor> { Ok(Tensor::from_slice(v, v.len(), device)?) };
        let embed_t = dense(embed)?;
        let lm_head = match lm_head {
            Some(l) => Some(linear(l)?),
            None => None,
        };
        let mut dl = Vec::with_capacity(layers.len());
        for l in layers {
            dl.push(DLayer {
                norms: l.norms.iter().map(|n| vec1(n)).collect::<Result<_>>()?,
                proj: [
                    linear(l.q)?,
                    linear(l.k)?,
                    linear(l.v)?,
                    linear(l.o)?,
                    linear(l.gate)?,
                    linear(l.up)?,
                    linear(l.down)?,
                ],
            });
            // `l` (host weights of this layer) is dropped here
        }
        let half = cfg.head_dim / 2;
        let ropes = cfg
            .rope_bases()
            .into_iter()
            .map(|(theta, div)| {
                let (cos, sin) = rope_tables(&cfg, theta, div);
                Ok((
                    Tensor::from_vec(cos, (cfg.context, half), device)?,
                    Tensor::from_vec(sin, (cfg.context, half), device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        // f32 models keep an f16 cache like the CPU engine; bf16/f16 models their own dtype
        let kv_dtype = if dt == DType::F32 { DType::F16 } else { dt };
        let rows = opts.slots * cfg.n_kv_head * cfg.context;
        let mut kv = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            kv.push((
                Tensor::zeros((rows, cfg.head_dim), kv_dtype, device)?,
                Tensor::zeros((rows, cfg.head_dim), kv_dtype, device)?,
            ));
        }
        let mut lora_a = Vec::with_capacity(cfg.n_layer);
        let mut lora_b = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            let mut a = Vec::with_capacity(7);
            let mut b = Vec::with_capacity(7);
            for &(out, inp) in &base_shapes.dims {
                a.push(Tensor::zeros(
                    (opts.adapter_slots, opts.max_rank, inp),
                    dt,
                    device,
                )?);
                b.push(Tensor::zeros(
                    (opts.adapter_slots, out, opts.max_rank),
                    dt,
                    device,
                )?);
            }
            lora_a.push(a);
            lora_b.push(b);
        }
        Ok(Self {
            cfg,
            device: device.clone(),
            dtype: dt,
            kv_dtype,
            embed: embed_t,
            lm_head,
            norm: vec1(&norm)?,
            layers: dl,
            ropes,
            kv,
            slots: opts.slots,
            free_slots: Arc::new(Mutex::new((0..opts.slots).rev().collect())),
            max_rank: opts.max_rank,
            adapter_slot_count: opts.adapter_slots,
            lora_a,
            lora_b,
            adapters: Mutex::new(AdapterSlots {
                map: HashMap::new(),
                free: (0..opts.adapter_slots).rev().collect(),
                step: 0,
                uploads: 0,
            }),
            base_shapes,
            fingerprint,
            fused_training: std::sync::atomic::AtomicBool::new(true),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn base_shapes(&self) -> retune_adapters::BaseShapes {
        self.base_shapes.clone()
    }

    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// KV slots this backend holds (concurrent sequences).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The highest adapter rank the device's adapter slots hold.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Distinct adapters one forward step can run.
    pub fn adapter_slots(&self) -> usize {
        self.adapter_slot_count
    }

    /// Adapter uploads so far (a cached adapter is uploaded once).
    pub fn adapter_uploads(&self) -> u64 {
        self.adapters.lock().map(|a| a.uploads).unwrap_or(0)
    }
}
