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

use crate::error::{EngineError, Result};
use crate::kernels_f32;
use crate::kv::KvCache;
use crate::linear::{Linear, Weight};
use crate::model::{rope_tables, BatchItem, Model, ModelConfig};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};
use retune_adapters::LoraAdapter;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How projection weights are held on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightMode {
    /// Dense matrices in the model dtype (GGUF quants dequantized at load).
    Dense,
    /// GGUF Q4_0/Q4_1/Q8_0 (and other ggml quants) as candle `QMatMul`s; other
    /// weights dense.
    Quantized,
}

#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Weight / projection dtype (F32, F16 or BF16).
    pub dtype: DType,
    pub weights: WeightMode,
    /// Concurrent sequences (KV slots); the scheduler's `max_batch` must not exceed it.
    pub slots: usize,
    /// Positions per KV slot (capped at the model's context).
    pub slot_context: usize,
    /// Adapters resident on the device at once.
    pub adapter_slots: usize,
    /// Largest LoRA rank the device slabs hold.
    pub max_rank: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            weights: WeightMode::Dense,
            slots: 64,
            slot_context: 4096,
            adapter_slots: 128,
            max_rank: 16,
        }
    }
}

/// Parse a device name: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let bad =
        || EngineError::InvalidRequest(format!("unknown device `{name}` (cpu, cuda, cuda:N)"));
    let n = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => {
            let n = name.strip_prefix("cuda:").ok_or_else(bad)?;
            n.parse().map_err(|_| bad())?
        }
    };
    Device::new_cuda(n).map_err(|e| match e {
        candle_core::Error::NotCompiledWithCudaSupport => EngineError::InvalidRequest(format!(
            "device `{name}`: this binary was built without CUDA (build with `--features cuda`)"
        )),
        e => EngineError::InvalidRequest(format!("device `{name}`: {e}")),
    })
}

/// Parse a dtype name: `f32`, `f16`, `bf16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(EngineError::InvalidRequest(format!(
            "unknown dtype `{name}` (f32, f16, bf16)"
        ))),
    }
}

/// Tensor-backend options from the engine settings.
pub fn options_from_settings(e: &retune_config::EngineSettings) -> Result<DeviceOptions> {
    Ok(DeviceOptions {
        dtype: parse_dtype(&e.dtype)?,
        weights: match e.weights.as_str() {
            "dense" => WeightMode::Dense,
            "quantized" => WeightMode::Quantized,
            w => {
                return Err(EngineError::InvalidRequest(format!(
                    "unknown weights mode `{w}` (dense, quantized)"
                )))
            }
        },
        slots: e.max_batch,
        slot_context: e.slot_context,
        adapter_slots: e.device_adapter_slots,
        max_rank: e.device_max_rank,
    })
}

/// The backend a device setting names: `cpu` = the native CPU engine; `candle-cpu`
/// = the tensor backend on candle's CPU device; `cuda` / `cuda:N` = the tensor
/// backend on that GPU (a clear error when the build has no CUDA or no GPU is found).
pub fn build_backend(model: Model, device: &str, opts: &DeviceOptions) -> Result<Backend> {
    match device {
        "cpu" => Ok(Backend::Host(model)),
        "candle-cpu" => Ok(Backend::Device(DeviceModel::from_model(
            model,
            &Device::Cpu,
            opts,
        )?)),
        name => {
            let dev = parse_device(name)?;
            Ok(Backend::Device(DeviceModel::from_model(model, &dev, opts)?))
        }
    }
}

enum DLinear {
    Dense { w: Tensor, b: Option<Tensor> },
    Quant { w: QMatMul, b: Option<Tensor> },
}

impl DLinear {
    /// `x`: `[t, in]` in the model dtype → `[t, out]` in the model dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, b) = match self {
            Self::Dense { w, b } => (x.matmul(&w.t()?)?, b),
            Self::Quant { w, b } => {
                let dt = x.dtype();
                (w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dt)?, b)
            }
        };
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct DLayer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// q, k, v, o, gate, up, down (the adapters' module order).
    proj: [DLinear; 7],
}

/// A sequence's KV slot on the device. Dropping it frees the slot.
#[derive(Debug)]
pub struct DeviceKv {
    slot: usize,
    len: usize,
    bytes_per_pos: usize,
    free: Arc<Mutex<Vec<usize>>>,
}

impl DeviceKv {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes of slab this sequence's positions occupy.
    pub fn bytes(&self) -> usize {
        self.len * self.bytes_per_pos
    }
}

impl Drop for DeviceKv {
    fn drop(&mut self) {
        if let Ok(mut f) = self.free.lock() {
            f.push(self.slot);
        }
    }
}

/// Which device adapter slots a step uses.
enum SlotSel {
    /// `n_ad` consecutive slots from this one (a view of the slab)
    Run(usize),
    Gather(Tensor),
}

struct LoraPlan {
    n_ad: usize,
    gmax: usize,
    /// `[n_ad * gmax]` token row per grouped row; `None` = the batch order already is
    gather: Option<Tensor>,
    /// `[t]` grouped row per token (`n_ad * gmax` = no adapter: a zero row)
    scatter: Option<Tensor>,
    slots: SlotSel,
}

struct AdapterSlots {
    /// adapter identity → (slot, last step it was used)
    map: HashMap<u64, (usize, u64)>,
    free: Vec<usize>,
    step: u64,
    uploads: u64,
}

pub struct DeviceModel {
    pub cfg: ModelConfig,
    device: Device,
    dtype: DType,
    kv_dtype: DType,
    embed: Tensor,
    lm_head: Option<DLinear>,
    norm: Tensor,
    layers: Vec<DLayer>,
    cos: Tensor,
    sin: Tensor,
    /// per layer: K and V slabs `[slots * kv_heads * slot_context, head_dim]`
    kv: Vec<(Tensor, Tensor)>,
    slots: usize,
    free_slots: Arc<Mutex<Vec<usize>>>,
    max_rank: usize,
    /// per layer, per module: A `[adapter_slots, max_rank, in]`, B `[adapter_slots, out, max_rank]`
    lora_a: Vec<Vec<Tensor>>,
    lora_b: Vec<Vec<Tensor>>,
    adapters: Mutex<AdapterSlots>,
    base_shapes: retune_adapters::BaseShapes,
    fingerprint: String,
}

/// The weight as dense f32 rows (consumes the host copy).
fn host_f32(l: Linear) -> Result<Vec<f32>> {
    Ok(match l.weight {
        Weight::F32(w) => w,
        Weight::Blocks { format, data } => {
            let rb = data.len() / l.rows.max(1);
            let mut out = vec![0f32; l.rows * l.cols];
            for (r, o) in out.chunks_exact_mut(l.cols).enumerate() {
                kernels_f32::dequant_row(format, &data[r * rb..(r + 1) * rb], o);
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
    match &l.weight {
        Weight::Blocks { format, data } => Some((
            match format {
                crate::kernels::BlockFormat::Q4_0 => GgmlDType::Q4_0,
                crate::kernels::BlockFormat::Q4_1 => GgmlDType::Q4_1,
                crate::kernels::BlockFormat::Q8_0 => GgmlDType::Q8_0,
            },
            data,
        )),
        _ => None,
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
            let w = Tensor::from_vec(host_f32(l)?, shape, &Device::Cpu)?;
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
                attn_norm: vec1(&l.attn_norm)?,
                ffn_norm: vec1(&l.ffn_norm)?,
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
        let (cos, sin) = rope_tables(&cfg);
        let half = cfg.head_dim / 2;
        let cos = Tensor::from_vec(cos, (cfg.context, half), device)?;
        let sin = Tensor::from_vec(sin, (cfg.context, half), device)?;
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
            cos,
            sin,
            kv,
            slots: opts.slots,
            free_slots: Arc::new(Mutex::new((0..opts.slots).rev().collect())),
            max_rank: opts.max_rank,
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

    /// Adapter uploads so far (a cached adapter is uploaded once).
    pub fn adapter_uploads(&self) -> u64 {
        self.adapters.lock().map(|a| a.uploads).unwrap_or(0)
    }

    /// Take a free KV slot for a new sequence.
    pub fn new_cache(&self) -> Result<DeviceKv> {
        let slot = self
            .free_slots
            .lock()
            .map_err(|_| EngineError::InvalidRequest("kv slot list poisoned".into()))?
            .pop()
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "all {} device KV slots are in use",
                    self.slots
                ))
            })?;
        let c = &self.cfg;
        Ok(DeviceKv {
            slot,
            len: 0,
            bytes_per_pos: 2 * c.n_layer * c.kv_dim() * self.kv_dtype.size_in_bytes(),
            free: self.free_slots.clone(),
        })
    }

    fn slot_row(&self, slot: usize, head: usize, pos: usize) -> usize {
        (slot * self.cfg.n_kv_head + head) * self.cfg.context + pos
    }

    /// Upload (or find) each distinct adapter of the batch; returns per item its
    /// group index into the returned slot list.
    fn adapter_groups(
        &self,
        items: &[BatchItem<'_, DeviceKv>],
    ) -> Result<(Vec<Option<usize>>, Vec<usize>)> {
        let mut st = self
            .adapters
            .lock()
            .map_err(|_| EngineError::InvalidRequest("adapter slot table poisoned".into()))?;
        st.step += 1;
        let step = st.step;
        let mut ids: Vec<u64> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        let mut group = Vec::with_capacity(items.len());
        for it in items {
            let Some(a) = it.adapter else {
                group.push(None);
                continue;
            };
            if let Some(g) = ids.iter().position(|&i| i == a.id()) {
                group.push(Some(g));
                continue;
            }
            let slot = match st.map.get_mut(&a.id()) {
                Some(e) => {
                    e.1 = step;
                    e.0
                }
                None => {
                    let slot = match st.free.pop() {
                        Some(s) => s,
                        None => {
                            // evict the least recently used adapter not in this step
                            let victim = st
                                .map
                                .iter()
                                .filter(|(_, (_, used))| *used < step)
                                .min_by_key(|(_, (_, used))| *used)
                                .map(|(id, (s, _))| (*id, *s));
                            let Some((vid, vs)) = victim else {
                                return Err(EngineError::InvalidRequest(format!(
                                    "more distinct adapters in one step than the {} device adapter slots",
                                    st.map.len()
                                )));
                            };
                            st.map.remove(&vid);
                            vs
                        }
                    };
                    self.upload(a, slot)?;
                    st.uploads += 1;
                    st.map.insert(a.id(), (slot, step));
                    slot
                }
            };
            ids.push(a.id());
            slots.push(slot);
            group.push(Some(ids.len() - 1));
        }
        Ok((group, slots))
    }

    fn upload(&self, a: &LoraAdapter, slot: usize) -> Result<()> {
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

    fn u32s(&self, v: &[u32]) -> Result<Tensor> {
        Ok(Tensor::from_slice(v, v.len(), &self.device)?)
    }

    /// RMS norm of f32 rows (candle's fused kernel: one launch).
    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, self.cfg.rms_eps)?)
    }

    /// Neox (half-split) rope on `[t, heads * head_dim]` f32 rows, each row at its
    /// own position: cos/sin are `[t, 1, half]` (candle's fused kernel, with every
    /// token as its own batch entry).
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = self.cfg.head_dim;
        let t = x.dim(0)?;
        let x = x.reshape((t, heads, 1, hd))?;
        Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?.reshape((t, heads * hd))?)
    }

    /// Softmax over the last dim in f32 (masked entries are -inf; fused kernel).
    fn softmax(x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::softmax_last_dim(x)?)
    }

    /// The slab of one layer as `[slots, kv_heads, context, head_dim]`.
    fn slab4(&self, t: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        Ok(t.reshape((self.slots, c.n_kv_head, c.context, c.head_dim))?)
    }

    /// Run the batch; returns f32 logits for each item with `want_logits`, in item order.
    pub fn forward(&self, items: &mut [BatchItem<'_, DeviceKv>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.n_head, c.n_kv_head);
        let group = nh / nkv;
        let t: usize = items.iter().map(|it| it.tokens.len()).sum();
        if t == 0 {
            return Ok(Vec::new());
        }
        let mut toks = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        for it in items.iter() {
            if it.kv.len + it.tokens.len() > c.context {
                return Err(EngineError::PromptTooLong {
                    prompt: it.kv.len + it.tokens.len(),
                    max_tokens: 0,
                    context: c.context,
                });
            }
            for (i, &tok) in it.tokens.iter().enumerate() {
                if tok as usize >= c.vocab {
                    return Err(EngineError::InvalidRequest(format!(
                        "token id {tok} out of vocabulary"
                    )));
                }
                toks.push(tok);
                pos.push((it.kv.len + i) as u32);
            }
        }
        let dev = &self.device;
        let pos_t = self.u32s(&pos)?;
        let cos = self.cos.index_select(&pos_t, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(&pos_t, 0)?.unsqueeze(1)?;
        let mut x = self
            .embed
            .index_select(&self.u32s(&toks)?, 0)?
            .to_dtype(DType::F32)?;

        // KV rows this step writes: for token i, head j → slab row
        let mut kv_rows = Vec::with_capacity(t * nkv);
        for it in items.iter() {
            for i in 0..it.tokens.len() {
                for j in 0..nkv {
                    kv_rows.push(self.slot_row(it.kv.slot, j, it.kv.len + i) as u32);
                }
            }
        }
        let kv_idx = self
            .u32s(&kv_rows)?
            .unsqueeze(1)?
            .broadcast_as((t * nkv, hd))?
            .contiguous()?;

        // attention plan: decode rows (one new token) batched over slots, the rest per item
        let mut dec_tok = Vec::new(); // token row of each decode item
        let mut dec_slot = Vec::new();
        let mut prefill = Vec::new(); // (token start, n, slot, cache len before)
        let mut start = 0;
        for it in items.iter() {
            let n = it.tokens.len();
            if n == 1 {
                dec_tok.push(start as u32);
                dec_slot.push(it.kv.slot);
            } else {
                prefill.push((start, n, it.kv.slot, it.kv.len));
            }
            start += n;
        }
        let dec_plan = if dec_tok.is_empty() {
            None
        } else {
            let hi = dec_slot.iter().max().map_or(0, |s| s + 1);
            let lmax = items
                .iter()
                .filter(|it| it.tokens.len() == 1)
                .map(|it| it.kv.len + 1)
                .max()
                .unwrap_or(1);
            // slots not decoding this step see position 0 only (finite, unused)
            let mut mask = vec![f32::NEG_INFINITY; hi * lmax];
            for s in 0..hi {
                mask[s * lmax] = 0.0;
            }
            for it in items.iter().filter(|it| it.tokens.len() == 1) {
                let s = it.kv.slot;
                mask[s * lmax..s * lmax + it.kv.len + 1].fill(0.0);
            }
            let mask = Tensor::from_vec(mask, (hi, 1, 1, lmax), dev)?;
            let slot_ids: Vec<u32> = dec_slot.iter().map(|&s| s as u32).collect();
            Some((hi, lmax, mask, self.u32s(&dec_tok)?, self.u32s(&slot_ids)?))
        };
        // output order of attention parts → token order
        let mut order: Vec<u32> = dec_tok.clone();
        for &(s, n, _, _) in &prefill {
            order.extend((s..s + n).map(|v| v as u32));
        }
        let mut inverse = vec![0u32; t];
        for (k, &tok) in order.iter().enumerate() {
            inverse[tok as usize] = k as u32;
        }
        let inverse = self.u32s(&inverse)?;
        let prefill_masks: Vec<Tensor> = prefill
            .iter()
            .map(|&(_, n, _, len)| {
                let l = len + n;
                // rows are (query head within its kv group, token): token j sees 0..=len+j
                let mut m = vec![f32::NEG_INFINITY; group * n * l];
                for r in 0..group * n {
                    let j = r % n;
                    m[r * l..r * l + len + j + 1].fill(0.0);
                }
                Tensor::from_vec(m, (1, group * n, l), dev)
            })
            .collect::<candle_core::Result<_>>()?;

        // LoRA plan: tokens grouped per distinct adapter, padded to the largest group
        let (groups, ad_slots) = self.adapter_groups(items)?;
        let lora = if ad_slots.is_empty() {
            None
        } else {
            let n_ad = ad_slots.len();
            let mut members: Vec<Vec<u32>> = vec![Vec::new(); n_ad];
            let mut start = 0u32;
            for (it, g) in items.iter().zip(&groups) {
                let n = it.tokens.len() as u32;
                if let Some(g) = g {
                    members[*g].extend(start..start + n);
                }
                start += n;
            }
            let gmax = members.iter().map(Vec::len).max().unwrap_or(0);
            // padding rows gather any real row: their results are never scattered back
            let mut gather = vec![0u32; n_ad * gmax];
            let mut scatter = vec![(n_ad * gmax) as u32; t];
            for (g, m) in members.iter().enumerate() {
                for (k, &tok) in m.iter().enumerate() {
                    gather[g * gmax + k] = tok;
                    scatter[tok as usize] = (g * gmax + k) as u32;
                }
            }
            // every row in one adapter group, in order (e.g. one adapter for the
            // whole batch): no gather and no scatter
            let identity =
                n_ad * gmax == t && scatter.iter().enumerate().all(|(i, &s)| s as usize == i);
            // adapter slots in ascending runs (the usual case when adapters were first
            // used in batch order): a view of the slab instead of a gather
            let run = ad_slots.windows(2).all(|w| w[1] == w[0] + 1);
            let slots: Vec<u32> = ad_slots.iter().map(|&s| s as u32).collect();
            Some(LoraPlan {
                n_ad,
                gmax,
                gather: if identity {
                    None
                } else {
                    Some(self.u32s(&gather)?)
                },
                scatter: if identity {
                    None
                } else {
                    Some(self.u32s(&scatter)?)
                },
                slots: if run {
                    SlotSel::Run(ad_slots[0])
                } else {
                    SlotSel::Gather(self.u32s(&slots)?)
                },
            })
        };
        // base projection + per-row adapter deltas for modules sharing input `xin`
        let project = |li: usize, modules: &[usize], xin: &Tensor| -> Result<Vec<Tensor>> {
            let layer = &self.layers[li];
            let xg = match &lora {
                Some(p) => {
                    let cols = xin.dim(1)?;
                    let x = match &p.gather {
                        Some(g) => xin.index_select(g, 0)?,
                        None => xin.clone(),
                    };
                    Some(x.reshape((p.n_ad, p.gmax, cols))?)
                }
                None => None,
            };
            let mut outs = Vec::with_capacity(modules.len());
            for &m in modules {
                let mut y = layer.proj[m].forward(xin)?;
                if let (Some(xg), Some(p)) = (&xg, &lora) {
                    let (a, b) = match &p.slots {
                        SlotSel::Run(s0) => (
                            self.lora_a[li][m].narrow(0, *s0, p.n_ad)?,
                            self.lora_b[li][m].narrow(0, *s0, p.n_ad)?,
                        ),
                        SlotSel::Gather(ix) => (
                            self.lora_a[li][m].index_select(ix, 0)?,
                            self.lora_b[li][m].index_select(ix, 0)?,
                        ),
                    }; // A [n_ad, r, in], B [n_ad, out, r]
                    let xa = xg.matmul(&a.transpose(1, 2)?)?; // [n_ad, g, r]
                    let d = xa.matmul(&b.transpose(1, 2)?)?; // [n_ad, g, out]
                    let rows = d.dim(2)?;
                    let d = d.reshape((p.n_ad * p.gmax, rows))?;
                    let delta = match &p.scatter {
                        Some(sc) => {
                            let zero = Tensor::zeros((1, rows), d.dtype(), dev)?;
                            Tensor::cat(&[&d, &zero], 0)?.index_select(sc, 0)?
                        }
                        None => d,
                    };
                    y = (y + delta)?;
                }
                outs.push(y);
            }
            Ok(outs)
        };

        let scale = 1.0 / (hd as f64).sqrt();
        // attention matmuls: f32 for f32 models (as the CPU engine: f16 cache rows
        // widened), else directly on the bf16/f16 cache (no copy of the slab)
        let att = if self.dtype == DType::F32 {
            DType::F32
        } else {
            self.kv_dtype
        };
        for li in 0..c.n_layer {
            let layer = &self.layers[li];
            let xn = self.rms(&x, &layer.attn_norm)?.to_dtype(self.dtype)?;
            let mut qkv = project(li, &[0, 1, 2], &xn)?.into_iter();
            let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(EngineError::InvalidRequest("projection count".into()));
            };
            let q = self.rope(&q.to_dtype(DType::F32)?, nh, &cos, &sin)?;
            let k = self.rope(&k.to_dtype(DType::F32)?, nkv, &cos, &sin)?;
            let (ks, vs) = &self.kv[li];
            ks.scatter_set(
                &kv_idx,
                &k.to_dtype(self.kv_dtype)?.reshape((t * nkv, hd))?,
                0,
            )?;
            vs.scatter_set(
                &kv_idx,
                &v.to_dtype(self.kv_dtype)?.reshape((t * nkv, hd))?,
                0,
            )?;
            let k4 = self.slab4(ks)?;
            let v4 = self.slab4(vs)?;
            let mut parts = Vec::with_capacity(1 + prefill.len());
            if let Some((hi, lmax, mask, dec_tok, dec_slots)) = &dec_plan {
                // queries placed at their slot: [hi, nkv, group, hd]
                let qd = q.index_select(dec_tok, 0)?.to_dtype(att)?;
                let qs = Tensor::zeros((*hi, nh * hd), att, dev)?
                    .index_add(dec_slots, &qd, 0)?
                    .reshape((*hi, nkv, group, hd))?;
                // strided views of the slab (copied only when the dtype changes)
                let kk = k4.narrow(0, 0, *hi)?.narrow(2, 0, *lmax)?.to_dtype(att)?;
                let vv = v4.narrow(0, 0, *hi)?.narrow(2, 0, *lmax)?.to_dtype(att)?;
                let s = qs.matmul(&kk.transpose(2, 3)?)?.to_dtype(DType::F32)?;
                let s = (s * scale)?.broadcast_add(mask)?;
                let p = Self::softmax(&s)?.to_dtype(att)?;
                let o = p.matmul(&vv)?.to_dtype(DType::F32)?; // [hi, nkv, group, hd]
                parts.push(o.reshape((*hi, nh * hd))?.index_select(dec_slots, 0)?);
            }
            for (&(s0, n, slot, len), mask) in prefill.iter().zip(&prefill_masks) {
                let l = len + n;
                let qi = q
                    .narrow(0, s0, n)?
                    .reshape((n, nkv, group, hd))?
                    .permute((1, 2, 0, 3))?
                    .contiguous()?
                    .reshape((nkv, group * n, hd))?
                    .to_dtype(att)?;
                let kk = k4
                    .narrow(0, slot, 1)?
                    .squeeze(0)?
                    .narrow(1, 0, l)?
                    .to_dtype(att)?;
                let vv = v4
                    .narrow(0, slot, 1)?
                    .squeeze(0)?
                    .narrow(1, 0, l)?
                    .to_dtype(att)?;
                let s = qi.matmul(&kk.transpose(1, 2)?)?.to_dtype(DType::F32)?;
                let s = (s * scale)?.broadcast_add(mask)?;
                let p = Self::softmax(&s)?.to_dtype(att)?;
                let o = p.matmul(&vv)?.to_dtype(DType::F32)?; // [nkv, group * n, hd]
                parts.push(
                    o.reshape((nkv, group, n, hd))?
                        .permute((2, 0, 1, 3))?
                        .reshape((n, nh * hd))?,
                );
            }
            let attn = Tensor::cat(&parts, 0)?.index_select(&inverse, 0)?;
            let o = project(li, &[3], &attn.to_dtype(self.dtype)?)?;
            x = (x + o[0].to_dtype(DType::F32)?)?;
            let xn = self.rms(&x, &layer.ffn_norm)?.to_dtype(self.dtype)?;
            let gu = project(li, &[4, 5], &xn)?;
            let act = (gu[0].silu()? * &gu[1])?;
            let down = project(li, &[6], &act)?;
            x = (x + down[0].to_dtype(DType::F32)?)?;
        }
        for it in items.iter_mut() {
            it.kv.len += it.tokens.len();
        }
        let mut last = Vec::new();
        let mut end = 0u32;
        for it in items.iter() {
            end += it.tokens.len() as u32;
            if it.want_logits {
                last.push(end - 1);
            }
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let xl = self
            .rms(&x.index_select(&self.u32s(&last)?, 0)?, &self.norm)?
            .to_dtype(self.dtype)?;
        let logits = match &self.lm_head {
            Some(l) => l.forward(&xl)?,
            None => xl.matmul(&self.embed.t()?)?,
        };
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }
}

/// What the scheduler runs: the native CPU engine or the tensor backend.
pub enum Backend {
    Host(Model),
    Device(DeviceModel),
}

impl From<Model> for Backend {
    fn from(m: Model) -> Self {
        Self::Host(m)
    }
}

impl From<DeviceModel> for Backend {
    fn from(m: DeviceModel) -> Self {
        Self::Device(m)
    }
}

/// A sequence's cache in whichever backend runs it.
pub enum Cache {
    Host(KvCache),
    Device(DeviceKv),
}

impl Cache {
    pub fn len(&self) -> usize {
        match self {
            Self::Host(c) => c.len(),
            Self::Device(c) => c.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        match self {
            Self::Host(c) => c.bytes(),
            Self::Device(c) => c.bytes(),
        }
    }
}

impl Backend {
    pub fn cfg(&self) -> &ModelConfig {
        match self {
            Self::Host(m) => &m.cfg,
            Self::Device(m) => &m.cfg,
        }
    }

    pub fn new_cache(&self) -> Result<Cache> {
        Ok(match self {
            Self::Host(m) => Cache::Host(m.new_cache()),
            Self::Device(m) => Cache::Device(m.new_cache()?),
        })
    }

    /// Concurrent sequences the backend can hold (`None` = limited by memory only).
    pub fn max_sequences(&self) -> Option<usize> {
        match self {
            Self::Host(_) => None,
            Self::Device(m) => Some(m.slots()),
        }
    }

    pub fn forward(&self, items: &mut [BatchItem<'_, Cache>]) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Host(m) => m.forward(&mut view(items, |c| match c {
                Cache::Host(kv) => Some(kv),
                Cache::Device(_) => None,
            })?),
            Self::Device(m) => m.forward(&mut view(items, |c| match c {
                Cache::Device(kv) => Some(kv),
                Cache::Host(_) => None,
            })?),
        }
    }
}

/// The batch with each item's cache narrowed to one backend's type.
fn view<'a, 'b, C>(
    items: &'a mut [BatchItem<'b, Cache>],
    pick: impl Fn(&'a mut Cache) -> Option<&'a mut C>,
) -> Result<Vec<BatchItem<'a, C>>> {
    items
        .iter_mut()
        .map(|it| {
            Ok(BatchItem {
                tokens: it.tokens,
                adapter: it.adapter,
                want_logits: it.want_logits,
                kv: pick(&mut *it.kv).ok_or_else(|| {
                    EngineError::InvalidRequest("cache from another backend".into())
                })?,
            })
        })
        .collect()
}
