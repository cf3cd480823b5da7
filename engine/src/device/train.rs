//! The tensor backend's training mode: the same layers, weights and module order
//! as the serving forward in `forward.rs`, run over whole sequences without a KV
//! cache, with LoRA A/B as trainable [`Var`]s.
//!
//! candle 0.11 has no backward for its fused `rms_norm`, `rope*`,
//! `softmax_last_dim` or `QMatMul` (the gradient is silently cut), so training
//! uses differentiable forms of each ([`Mode::Train`]) and dense f32 weights.
//! Frozen projections run through [`FrozenLinear`], whose backward computes only
//! the input gradient (candle's matmul backward would also compute a weight-sized
//! gradient nobody reads). Sequences whose LoRA starts at layer `k` build no
//! graph below `k` (nothing there is a variable), so backward stops there.

use super::forward::DLinear;
use super::train_ops::{f32s, gemm_nt, tensor_f32, LoraLinear, RmsNorm, Rope, SwiGlu};
use super::{DeviceModel, DeviceOptions, WeightMode};
use crate::error::{EngineError, Result};
use crate::family::{Act, Attn, Norm, Ops, Proj};
use crate::model::Model;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var, D};

/// Which forms of the norm, rope and softmax a forward uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// candle's fused kernels (no backward).
    Serve,
    /// differentiable compositions of elementary ops.
    Train,
}

/// One LoRA pair being trained: `delta = dropout(x) · Aᵀ · Bᵀ · scale`.
pub struct LoraParam {
    /// `[rank, in]`
    pub a: Var,
    /// `[out, rank]`
    pub b: Var,
    pub scale: f64,
}

/// The trainable adapter: per layer, per module (q, k, v, o, gate, up, down).
pub struct TrainLora {
    pub layers: Vec<[Option<LoraParam>; 7]>,
}

impl TrainLora {
    /// The lowest layer holding a LoRA pair (where backward stops).
    pub fn lowest_layer(&self) -> Option<usize> {
        self.layers
            .iter()
            .position(|l| l.iter().any(Option::is_some))
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .flat_map(|p| [&p.a, &p.b])
    }
}

/// Right-padded rows of token ids, `batch × len` (padding is never attended to by
/// real tokens: attention is causal).
///
/// When every row starts with the same `prefix` tokens (a chat template's
/// system prompt), those are computed once: the residual stream holds the
/// prefix's rows, then each row's other `len - prefix` positions
/// ([`TrainBatch::row`]). Attention is causal, so a prefix's states do not depend
/// on what follows it: the result equals running each row whole.
pub struct TrainBatch {
    pub tokens: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    /// Leading tokens every row shares (`< len`; 0: none shared).
    pub prefix: usize,
}

impl TrainBatch {
    /// Rows of the residual stream: the shared prefix once, then each row's rest.
    pub fn stream_rows(&self) -> usize {
        self.prefix + self.batch * (self.len - self.prefix)
    }

    /// The stream row of position `i` of batch row `b`.
    pub fn row(&self, b: usize, i: usize) -> usize {
        if i < self.prefix {
            i
        } else {
            self.prefix + b * (self.len - self.prefix) + (i - self.prefix)
        }
    }

    /// The longest prefix every row's first `lens[b]` tokens share, leaving each
    /// row at least one position of its own (0 for a single row, where nothing
    /// is shared).
    pub fn shared_prefix(tokens: &[u32], len: usize, lens: &[usize]) -> usize {
        if lens.len() < 2 || len == 0 {
            return 0;
        }
        let mut p = lens.iter().copied().min().unwrap_or(0).saturating_sub(1);
        let first = &tokens[..len];
        for b in 1..lens.len() {
            let row = &tokens[b * len..(b + 1) * len];
            p = p.min(first.iter().zip(row).take_while(|(x, y)| x == y).count());
        }
        p
    }
}

/// Inverted-dropout masks on each LoRA input, drawn from a seed (reproducible).
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// A frozen `x · Wᵀ` whose backward returns the input gradient only.
struct FrozenLinear {
    /// `[out, in]`, contiguous f32 on the CPU
    w: Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (n, wk) = self.w.dims2()?;
        if wk != k {
            candle_core::bail!("frozen-linear: input has {k} columns, weight {wk}");
        }
        let x = f32s(s, l, "frozen-linear input")?;
        let (ws, wl) = self.w.storage_and_layout();
        let w = tensor_f32(&ws, wl, "frozen-linear weight")?;
        let mut y = vec![0f32; m * n];
        gemm_nt(&mut y, x, w, m, n, k, false, 1.0);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// `x · Wᵀ` with a frozen `W`: on the CPU the input-gradient-only op, elsewhere
/// candle's matmul (correct, with an unused weight gradient).
fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        Ok(x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() })?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

impl DLinear {
    fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense { w, b } => {
                let y = frozen_matmul(x, w)?;
                Ok(match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
            Self::Quant { .. } => Err(EngineError::InvalidRequest(
                "training needs dense base weights (quantized blocks have no backward)".into(),
            )),
        }
    }
}

/// A reproducible keep-mask `[rows, cols]` scaled by `1 / (1 - p)`.
fn dropout_mask(rows: usize, cols: usize, d: Dropout, salt: u64, dev: &Device) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(d.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keep = 1.0 / (1.0 - d.p);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| if rng.gen::<f32>() < d.p { 0.0 } else { keep })
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), dev)?)
}

impl DLinear {
    /// `x · Wᵀ (+ bias) + lora` as one fused op (CPU, dense f32).
    fn forward_lora_fused(&self, x: &Tensor, p: &LoraParam) -> Result<Tensor> {
        let Self::Dense { w, b } = self else {
            return Err(EngineError::InvalidRequest(
                "training needs dense base weights (quantized blocks have no backward)".into(),
            ));
        };
        let y = x.contiguous()?.apply_op3(
            p.a.as_tensor(),
            p.b.as_tensor(),
            LoraLinear {
                w: w.clone(),
                scale: p.scale,
            },
        )?;
        Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl DeviceModel {
    /// Whether training runs the fused CPU ops (default) or the composed
    /// differentiable ops (what other devices run; tests compare the two).
    pub fn set_fused_training(&self, on: bool) {
        self.fused_training
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn fused(&self) -> bool {
        self.device.is_cpu()
            && self
                .fused_training
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn rms_train(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.fused() {
            Ok(x.contiguous()?.apply_op1(RmsNorm {
                w: w.clone(),
                eps: self.cfg.rms_eps,
            })?)
        } else {
            self.rms_mode(x, w, Mode::Train)
        }
    }

    /// A copy of `model` for training: dense f32 weights on `device`, rope tables for
    /// `max_len` positions, a one-slot cache (the serving forward stays usable, e.g.
    /// to compare logits).
    pub fn for_training(model: Model, device: &Device, max_len: usize) -> Result<Self> {
        let max_len = max_len.min(model.cfg.context).max(1);
        let opts = DeviceOptions {
            dtype: DType::F32,
            weights: WeightMode::Dense,
            slots: 1,
            slot_context: max_len,
            adapter_slots: 1,
            max_rank: 1,
        };
        Self::from_model(model, device, &opts)
    }

    /// RMS norm of f32 rows.
    pub(super) fn rms_mode(&self, x: &Tensor, w: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Serve => Ok(candle_nn::ops::rms_norm(x, w, self.cfg.rms_eps)?),
            Mode::Train => {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                let inv = (ms + self.cfg.rms_eps as f64)?.sqrt()?.recip()?;
                Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
            }
        }
    }

    /// Neox (half-split) rope on `[t, heads * head_dim]` rows; `cos`/`sin` are
    /// `[t, 1, half]` (each row at its own position).
    pub(super) fn rope_mode(
        &self,
        x: &Tensor,
        heads: usize,
        cos: &Tensor,
        sin: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let hd = self.cfg.head_dim;
        let t = x.dim(0)?;
        match mode {
            Mode::Serve => {
                let x = x.reshape((t, heads, 1, hd))?;
                Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?.reshape((t, heads * hd))?)
            }
            Mode::Train => {
                let half = hd / 2;
                let x = x.reshape((t, heads, hd))?;
                let x1 = x.narrow(2, 0, half)?;
                let x2 = x.narrow(2, half, half)?;
                let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
                let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
                Ok(Tensor::cat(&[r1, r2], 2)?.reshape((t, heads * hd))?)
            }
        }
    }

    /// Softmax over the last dim in f32 (masked entries are -inf).
    pub(super) fn softmax_mode(x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Serve => Ok(candle_nn::ops::softmax_last_dim(x)?),
            Mode::Train => Ok(candle_nn::ops::softmax(x, D::Minus1)?),
        }
    }

    /// The embedding rows of `batch` (the input of layer 0), f32
    /// `[stream_rows, hidden]`: the shared prefix once, then each row's rest.
    pub fn train_embed(&self, batch: &TrainBatch) -> Result<Tensor> {
        self.check_batch(batch)?;
        let (p, len) = (batch.prefix, batch.len);
        let mut stream = Vec::with_capacity(batch.stream_rows());
        stream.extend_from_slice(&batch.tokens[..p]);
        for b in 0..batch.batch {
            stream.extend_from_slice(&batch.tokens[b * len + p..(b + 1) * len]);
        }
        let ids = Tensor::from_slice(&stream, stream.len(), &self.device)?;
        let x = self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        Ok(match crate::family::embed_scale(&self.cfg) {
            Some(s) => (x * s as f64)?,
            None => x,
        })
    }

    fn check_batch(&self, b: &TrainBatch) -> Result<()> {
        if b.batch == 0 || b.len == 0 || b.tokens.len() != b.batch * b.len {
            return Err(EngineError::InvalidRequest(format!(
                "training batch of {} tokens is not {} rows of {}",
                b.tokens.len(),
                b.batch,
                b.len
            )));
        }
        if b.prefix >= b.len
            || (1..b.batch)
                .any(|r| b.tokens[r * b.len..r * b.len + b.prefix] != b.tokens[..b.prefix])
        {
            return Err(EngineError::InvalidRequest(format!(
                "training batch: its rows do not share a {}-token prefix shorter than {}",
                b.prefix, b.len
            )));
        }
        if b.len > self.cfg.context {
            return Err(EngineError::PromptTooLong {
                prompt: b.len,
                max_tokens: 0,
                context: self.cfg.context,
            });
        }
        if let Some(&t) = b.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {t} out of vocabulary"
            )));
        }
        Ok(())
    }

    /// Run layers `from..to` over whole sequences. `x`: the residual stream entering
    /// layer `from`, `[stream_rows, hidden]` f32 ([`TrainBatch::row`]). LoRA pairs in
    /// `lora` apply where present.
    pub fn train_layers(
        &self,
        x: Tensor,
        batch: &TrainBatch,
        lora: Option<&TrainLora>,
        layers: std::ops::Range<usize>,
        dropout: Option<Dropout>,
        step_salt: u64,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.n_head, c.n_kv_head);
        let group = nh / nkv;
        let (bsz, len, pre) = (batch.batch, batch.len, batch.prefix);
        // each row's own positions after the shared prefix
        let own = len - pre;
        let t = batch.stream_rows();
        if x.dim(0)? != t {
            return Err(EngineError::InvalidRequest(format!(
                "training stream of {} rows, the batch has {t}",
                x.dim(0)?
            )));
        }
        let dev = &self.device;
        let half = hd / 2;
        // each stream row's position: [t, 1, half]
        let pos: Vec<u32> = (0..pre as u32)
            .chain((0..bsz).flat_map(|_| pre as u32..len as u32))
            .collect();
        let pos = Tensor::from_vec(pos, t, dev)?;
        let fused = self.fused();
        let mut ropes = Vec::with_capacity(self.ropes.len());
        for (cos, sin) in &self.ropes {
            let cos = cos.index_select(&pos, 0)?.reshape((t, 1, half))?;
            let sin = sin.index_select(&pos, 0)?.reshape((t, 1, half))?;
            // [t, half] tables for the fused rope
            let flat = if fused {
                Some((
                    cos.reshape((t, half))?.contiguous()?,
                    sin.reshape((t, half))?.contiguous()?,
                ))
            } else {
                None
            };
            ropes.push(((cos, sin), flat));
        }
        let mut step = TrainStep {
            m: self,
            lora,
            dropout,
            salt: step_salt.wrapping_mul(1_000_003),
            fused,
            ropes,
            masks: Vec::new(),
            bsz,
            len,
            pre,
            own,
            group,
        };
        let mut x = x;
        for li in layers {
            x = c.arch.block(&mut step, c, li, x)?;
        }
        Ok(x)
    }

    /// Final norm and output projection of the residual-stream rows `rows` of `x`
    /// (only where a loss is read): f32 logits `[rows, vocab]`.
    pub fn train_head(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let xl = self.train_final_hidden(x, rows)?;
        match &self.lm_head {
            Some(l) => l.forward_frozen(&xl),
            None => frozen_matmul(&xl, &self.embed),
        }
    }

    /// The final norm of the residual-stream rows `rows` of `x`: what the output
    /// projection (or a classification head) reads, f32 `[rows, hidden]`.
    pub fn train_final_hidden(&self, x: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(rows, rows.len(), &self.device)?;
        self.rms_train(&x.index_select(&idx, 0)?, self.norm_tensor(Norm::Final))
    }

    /// The input-embedding rows of `ids`, f32 `[ids, hidden]` (e.g. to start a
    /// classification head from its labels' tokens).
    pub fn embedding_rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {t} out of vocabulary"
            )));
        }
        let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(self.embed.index_select(&idx, 0)?.to_dtype(DType::F32)?)
    }

    /// Whole training forward: logits at stream rows `rows` ([`TrainBatch::row`]).
    pub fn train_logits(
        &self,
        batch: &TrainBatch,
        lora: Option<&TrainLora>,
        rows: &[u32],
        dropout: Option<Dropout>,
        step_salt: u64,
    ) -> Result<Tensor> {
        let x = self.train_embed(batch)?;
        let x = self.train_layers(x, batch, lora, 0..self.cfg.n_layer, dropout, step_salt)?;
        self.train_head(&x, rows)
    }
}

/// The training forward as the [`Ops`] a family's block runs on: whole
/// sequences (the shared prefix once, then each row's own positions), every
/// op differentiable (fused on the CPU, `train_ops`).
struct TrainStep<'a> {
    m: &'a DeviceModel,
    lora: Option<&'a TrainLora>,
    dropout: Option<Dropout>,
    salt: u64,
    fused: bool,
    /// per rope table: cos/sin `[t, 1, half]`, and `[t, half]` for the fused op
    ropes: Vec<((Tensor, Tensor), Option<(Tensor, Tensor)>)>,
    /// per window seen: (window, the prefix over itself, the rows' own
    /// positions over the prefix and themselves)
    masks: Vec<(Option<usize>, Option<Tensor>, Tensor)>,
    bsz: usize,
    len: usize,
    pre: usize,
    own: usize,
    group: usize,
}

impl TrainStep<'_> {
    /// Masks over rows (query head within its group, position): queries of
    /// `q` positions starting at `at` over `k` keys from position 0, each
    /// seeing itself and the `window − 1` positions before it.
    fn causal(&self, q: usize, k: usize, at: usize, window: Option<usize>) -> Result<Tensor> {
        let g = self.group;
        let mut m = vec![f32::NEG_INFINITY; g * q * k];
        for r in 0..g * q {
            let i = at + r % q;
            let first = window.map_or(0, |w| (i + 1).saturating_sub(w));
            m[r * k + first..r * k + i + 1].fill(0.0);
        }
        Ok(Tensor::from_vec(m, (g * q, k), &self.m.device)?)
    }

    fn masks(&mut self, window: Option<usize>) -> Result<(Option<Tensor>, Tensor)> {
        if let Some((_, pre, own)) = self.masks.iter().find(|(w, _, _)| *w == window) {
            return Ok((pre.clone(), own.clone()));
        }
        let (pre, own, len) = (self.pre, self.own, self.len);
        let mask_pre = (pre > 0)
            .then(|| self.causal(pre, pre, 0, window))
            .transpose()?;
        let mask = self.causal(own, len, pre, window)?;
        self.masks.push((window, mask_pre.clone(), mask.clone()));
        Ok((mask_pre, mask))
    }

    /// One projection with its LoRA pair (dropout on the pair's input).
    fn project(&mut self, li: usize, m: usize, xin: &Tensor) -> Result<Tensor> {
        let layer = &self.m.layers[li];
        let pair = self
            .lora
            .and_then(|l| l.layers.get(li))
            .and_then(|p| p[m].as_ref());
        let no_dropout = self.dropout.is_none_or(|d| d.p <= 0.0);
        if let (Some(p), true, true) = (pair, self.fused, no_dropout) {
            return layer.proj[m].forward_lora_fused(xin, p);
        }
        let y = layer.proj[m].forward_frozen(xin)?;
        match pair {
            None => Ok(y),
            Some(p) => {
                self.salt = self.salt.wrapping_add(1);
                let xi = match self.dropout {
                    Some(d) if d.p > 0.0 => {
                        let (r, cols) = xin.dims2()?;
                        (xin * dropout_mask(r, cols, d, self.salt, &self.m.device)?)?
                    }
                    _ => xin.clone(),
                };
                let xa = xi.matmul(&p.a.as_tensor().t()?)?;
                let d = (xa.matmul(&p.b.as_tensor().t()?)? * p.scale)?;
                Ok((y + d)?)
            }
        }
    }
}

impl Ops for TrainStep<'_> {
    type X = Tensor;

    fn norm(&mut self, x: &Tensor, w: Norm) -> Result<Tensor> {
        let m = self.m;
        m.norm_pieces(x, w, |x, w| m.rms_train(x, w))
    }

    fn linear(&mut self, li: usize, ps: &[Proj], x: &Tensor) -> Result<Vec<Tensor>> {
        ps.iter().map(|p| self.project(li, p.index(), x)).collect()
    }

    fn rope(&mut self, x: Tensor, rope: usize) -> Result<Tensor> {
        let heads = x.dim(1)? / self.m.cfg.head_dim;
        let ((cos, sin), flat) = &self.ropes[rope];
        match flat {
            Some((cos2, sin2)) => Ok(x.contiguous()?.apply_op1(Rope {
                cos: cos2.clone(),
                sin: sin2.clone(),
                heads,
            })?),
            None => self.m.rope_mode(&x, heads, cos, sin, Mode::Train),
        }
    }

    fn attention(
        &mut self,
        _li: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        a: Attn,
    ) -> Result<Tensor> {
        let c = &self.m.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.n_head, c.n_kv_head);
        let group = self.group;
        let (bsz, len, pre, own) = (self.bsz, self.len, self.pre, self.own);
        let (mask_pre, mask) = self.masks(a.window)?;
        let scale = a.scale as f64;
        // queries `[b·n, nh·hd]` as [b, nkv, group·n, hd]; keys and values
        // `[b·n, nkv·hd]` as [b, nkv, n, hd]
        let heads_q = |x: &Tensor, b: usize, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, n, nkv, group, hd))?
                .permute((0, 2, 3, 1, 4))?
                .contiguous()?
                .reshape((b, nkv, group * n, hd))?)
        };
        let heads_kv = |x: &Tensor, b: usize, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, n, nkv, hd))?.transpose(1, 2)?.contiguous()?)
        };
        // softmax(q·kᵀ·scale + mask)·v back to rows `[b·n, nh·hd]`
        let attend = |q: &Tensor,
                      k: &Tensor,
                      v: &Tensor,
                      mask: &Tensor,
                      b: usize,
                      n: usize|
         -> Result<Tensor> {
            let s = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?;
            let s = s.broadcast_add(mask)?;
            let p = DeviceModel::softmax_mode(&s, Mode::Train)?;
            Ok(p.matmul(v)?
                .reshape((b, nkv, group, n, hd))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((b * n, nh * hd))?)
        };
        match &mask_pre {
            None => attend(
                &heads_q(&q, bsz, len)?,
                &heads_kv(&k, bsz, len)?,
                &heads_kv(&v, bsz, len)?,
                &mask,
                bsz,
                len,
            ),
            Some(mask_pre) => {
                let (kp, vp) = (
                    heads_kv(&k.narrow(0, 0, pre)?, 1, pre)?,
                    heads_kv(&v.narrow(0, 0, pre)?, 1, pre)?,
                );
                let op = attend(
                    &heads_q(&q.narrow(0, 0, pre)?, 1, pre)?,
                    &kp,
                    &vp,
                    mask_pre,
                    1,
                    pre,
                )?;
                // each row's keys: the shared prefix's, then its own
                let with_prefix = |shared: &Tensor, x: &Tensor| -> Result<Tensor> {
                    let own_kv = heads_kv(&x.narrow(0, pre, bsz * own)?, bsz, own)?;
                    let shared = shared.broadcast_as((bsz, nkv, pre, hd))?.contiguous()?;
                    Ok(Tensor::cat(&[&shared, &own_kv], 2)?)
                };
                let os = attend(
                    &heads_q(&q.narrow(0, pre, bsz * own)?, bsz, own)?,
                    &with_prefix(&kp, &k)?,
                    &with_prefix(&vp, &v)?,
                    &mask,
                    bsz,
                    own,
                )?;
                Ok(Tensor::cat(&[&op, &os], 0)?)
            }
        }
    }

    fn gated(&mut self, gate: Tensor, up: Tensor, act: Act) -> Result<Tensor> {
        Ok(match act {
            Act::Silu if self.fused => gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
            Act::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            Act::GeluTanh => (gate.gelu()? * up)?,
        })
    }

    fn add(&mut self, x: Tensor, y: Tensor) -> Result<Tensor> {
        Ok((x + y)?)
    }

    fn scale(&mut self, x: Tensor, s: f32) -> Result<Tensor> {
        Ok((x * s as f64)?)
    }
}

/// Weighted mean negative log-likelihood of `targets` under `logits` `[n, vocab]`:
/// `Σ wᵢ·nllᵢ / norm`.
pub fn weighted_nll(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    norm: f64,
) -> Result<Tensor> {
    smoothed_nll(logits, targets, weights, norm, 0.0)
}

/// [`weighted_nll`] with label smoothing `eps` (Szegedy et al. 2016, PyTorch's
/// `label_smoothing`): each row's target is `1 − eps` on its class and `eps`
/// spread evenly over all `vocab` classes, so its loss is
/// `(1 − eps)·nllᵢ + eps·mean_k(−log pᵢₖ)`.
pub fn smoothed_nll(
    logits: &Tensor,
    targets: &[u32],
    weights: &[f32],
    norm: f64,
    eps: f64,
) -> Result<Tensor> {
    let dev = logits.device();
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), dev)?;
    let mut picked = lp.gather(&idx, 1)?.squeeze(1)?;
    if eps != 0.0 {
        picked = ((picked * (1.0 - eps))? + (lp.mean(D::Minus1)? * eps)?)?;
    }
    let w = Tensor::from_slice(weights, weights.len(), dev)?;
    Ok(((picked * w)?.sum_all()? * (-1.0 / norm))?)
}

/// The gradient of `var` from a backward pass, zeros when nothing reached it.
pub fn grad_of(grads: &GradStore, var: &Var) -> Result<Tensor> {
    Ok(match grads.get(var.as_tensor()) {
        Some(g) => g.clone(),
        None => var.as_tensor().zeros_like()?,
    })
}
