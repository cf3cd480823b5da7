use super::plan::{LoraPlan, SlotSel};
use super::train::Mode;
use super::{DeviceKv, DeviceModel};
use crate::error::{EngineError, Result};
use crate::family::{Act, Attn, Norm, Ops, Proj};
use crate::model::BatchItem;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

pub(super) enum DLinear {
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

pub(super) struct DLayer {
    /// The family's norms, in its order.
    pub(super) norms: Vec<Tensor>,
    /// q, k, v, o, gate, up, down (the adapters' module order).
    pub(super) proj: [DLinear; 7],
}

impl DeviceModel {
    fn u32s(&self, v: &[u32]) -> Result<Tensor> {
        Ok(Tensor::from_slice(v, v.len(), &self.device)?)
    }

    /// The slab of one layer as `[slots, kv_heads, context, head_dim]`.
    fn slab4(&self, t: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        Ok(t.reshape((self.slots, c.n_kv_head, c.context, c.head_dim))?)
    }

    /// Run the batch; returns f32 logits for each item with `want_logits`, in item order.
    pub fn forward(&self, items: &mut [BatchItem<'_, DeviceKv>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (hd, nkv) = (c.head_dim, c.n_kv_head);
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
        let pos_t = self.u32s(&pos)?;
        let ropes = self
            .ropes
            .iter()
            .map(|(cos, sin)| {
                Ok((
                    cos.index_select(&pos_t, 0)?.unsqueeze(1)?,
                    sin.index_select(&pos_t, 0)?.unsqueeze(1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = self
            .embed
            .index_select(&self.u32s(&toks)?, 0)?
            .to_dtype(DType::F32)?;
        if let Some(s) = crate::family::embed_scale(c) {
            x = (x * s as f64)?;
        }

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
            let slot_ids: Vec<u32> = dec_slot.iter().map(|&s| s as u32).collect();
            let seen: Vec<(usize, usize)> = items
                .iter()
                .filter(|it| it.tokens.len() == 1)
                .map(|it| (it.kv.slot, it.kv.len))
                .collect();
            Some(DecodePlan {
                hi,
                lmax,
                seen,
                tok: self.u32s(&dec_tok)?,
                slots: self.u32s(&slot_ids)?,
            })
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
        let mut step = DeviceStep {
            m: self,
            t,
            ropes,
            kv_idx,
            dec: dec_plan,
            prefill,
            inverse,
            lora,
            masks: Vec::new(),
        };
        for li in 0..c.n_layer {
            x = c.arch.block(&mut step, c, li, x)?;
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
            .rms_mode(
                &x.index_select(&self.u32s(&last)?, 0)?,
                self.norm_tensor(Norm::Final),
                Mode::Serve,
            )?
            .to_dtype(self.dtype)?;
        let logits = match &self.lm_head {
            Some(l) => l.forward(&xl)?,
            None => xl.matmul(&self.embed.t()?)?,
        };
        let mut out: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        // a classifier adapter's rows read its head (on the host: a few labels)
        let heads = crate::model::heads_of(items);
        if heads.iter().any(Option::is_some) {
            let hidden: Vec<Vec<f32>> = xl.to_dtype(DType::F32)?.to_vec2()?;
            for (r, h) in heads.iter().enumerate() {
                if let (Some(h), Some(x)) = (h, hidden.get(r)) {
                    out[r] = crate::lora::class_logits(h, x);
                }
            }
        }
        Ok(out)
    }
}

/// The decode rows of a step: one new token each, attended batched over
/// their slots.
struct DecodePlan {
    /// slots `0..hi` take part; keys `0..lmax`
    hi: usize,
    lmax: usize,
    /// (slot, cached positions before this token) of each decode item
    seen: Vec<(usize, usize)>,
    /// token row of each decode item, and its slot
    tok: Tensor,
    slots: Tensor,
}

/// One serving step on the device as the [`Ops`] a family's block runs on:
/// activations are f32 `[t, width]` rows, projections run in the model dtype.
struct DeviceStep<'a> {
    m: &'a DeviceModel,
    t: usize,
    /// per rope table: cos/sin `[t, 1, half]` at each row's position
    ropes: Vec<(Tensor, Tensor)>,
    /// KV slab rows this step writes, `[t · kv_heads, head_dim]`
    kv_idx: Tensor,
    dec: Option<DecodePlan>,
    /// (token start, n, slot, cache len before) of each prefill item
    prefill: Vec<(usize, usize, usize, usize)>,
    /// attention parts' row order → token order
    inverse: Tensor,
    lora: Option<LoraPlan>,
    /// per window seen: the decode mask and each prefill item's mask
    masks: Vec<(Option<usize>, Option<Tensor>, Vec<Tensor>)>,
}

impl DeviceStep<'_> {
    fn masks(&mut self, window: Option<usize>) -> Result<(Option<Tensor>, Vec<Tensor>)> {
        if let Some((_, d, p)) = self.masks.iter().find(|(w, _, _)| *w == window) {
            return Ok((d.clone(), p.clone()));
        }
        let dev = &self.m.device;
        let group = self.m.cfg.n_head / self.m.cfg.n_kv_head;
        // a token at position i sees i and the window − 1 before it
        let first = |i: usize| window.map_or(0, |w| (i + 1).saturating_sub(w));
        let dec = match &self.dec {
            None => None,
            Some(d) => {
                // slots not decoding this step see position 0 only (finite, unused)
                let mut mask = vec![f32::NEG_INFINITY; d.hi * d.lmax];
                for s in 0..d.hi {
                    mask[s * d.lmax] = 0.0;
                }
                for &(s, len) in &d.seen {
                    mask[s * d.lmax..s * d.lmax + len + 1].fill(f32::NEG_INFINITY);
                    mask[s * d.lmax + first(len)..s * d.lmax + len + 1].fill(0.0);
                }
                Some(Tensor::from_vec(mask, (d.hi, 1, 1, d.lmax), dev)?)
            }
        };
        let prefill = self
            .prefill
            .iter()
            .map(|&(_, n, _, len)| {
                let l = len + n;
                // rows are (query head within its kv group, token): token j sees
                // positions up to len + j
                let mut m = vec![f32::NEG_INFINITY; group * n * l];
                for r in 0..group * n {
                    let i = len + r % n;
                    m[r * l + first(i)..r * l + i + 1].fill(0.0);
                }
                Ok(Tensor::from_vec(m, (1, group * n, l), dev)?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.masks.push((window, dec.clone(), prefill.clone()));
        Ok((dec, prefill))
    }
}

impl Ops for DeviceStep<'_> {
    type X = Tensor;

    fn norm(&mut self, x: &Tensor, w: Norm) -> Result<Tensor> {
        let m = self.m;
        m.norm_pieces(x, w, |x, w| m.rms_mode(x, w, Mode::Serve))
    }

    fn linear(&mut self, li: usize, ps: &[Proj], x: &Tensor) -> Result<Vec<Tensor>> {
        let m = self.m;
        let layer = &m.layers[li];
        let xin = x.to_dtype(m.dtype)?;
        let xg = match &self.lora {
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
        let mut outs = Vec::with_capacity(ps.len());
        for p in ps {
            let mi = p.index();
            let mut y = layer.proj[mi].forward(&xin)?;
            if let (Some(xg), Some(plan)) = (&xg, &self.lora) {
                let (a, b) = match &plan.slots {
                    SlotSel::Run(s0) => (
                        m.lora_a[li][mi].narrow(0, *s0, plan.n_ad)?,
                        m.lora_b[li][mi].narrow(0, *s0, plan.n_ad)?,
                    ),
                    SlotSel::Gather(ix) => (
                        m.lora_a[li][mi].index_select(ix, 0)?,
                        m.lora_b[li][mi].index_select(ix, 0)?,
                    ),
                }; // A [n_ad, r, in], B [n_ad, out, r]
                let xa = xg.matmul(&a.transpose(1, 2)?)?; // [n_ad, g, r]
                let d = xa.matmul(&b.transpose(1, 2)?)?; // [n_ad, g, out]
                let rows = d.dim(2)?;
                let d = d.reshape((plan.n_ad * plan.gmax, rows))?;
                let delta = match &plan.scatter {
                    Some(sc) => {
                        let zero = Tensor::zeros((1, rows), d.dtype(), &m.device)?;
                        Tensor::cat(&[&d, &zero], 0)?.index_select(sc, 0)?
                    }
                    None => d,
                };
                y = (y + delta)?;
            }
            outs.push(y.to_dtype(DType::F32)?);
        }
        Ok(outs)
    }

    fn rope(&mut self, x: Tensor, rope: usize) -> Result<Tensor> {
        let heads = x.dim(1)? / self.m.cfg.head_dim;
        let (cos, sin) = &self.ropes[rope];
        self.m.rope_mode(&x, heads, cos, sin, Mode::Serve)
    }

    fn attention(&mut self, li: usize, q: Tensor, k: Tensor, v: Tensor, a: Attn) -> Result<Tensor> {
        let (dec_mask, prefill_masks) = self.masks(a.window)?;
        let m = self.m;
        let c = &m.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.n_head, c.n_kv_head);
        let group = nh / nkv;
        let t = self.t;
        let dev = &m.device;
        let scale = a.scale as f64;
        // attention matmuls: f32 for f32 models (as the CPU engine: f16 cache rows
        // widened), else directly on the bf16/f16 cache (no copy of the slab)
        let att = if m.dtype == DType::F32 {
            DType::F32
        } else {
            m.kv_dtype
        };
        let (ks, vs) = &m.kv[li];
        ks.scatter_set(
            &self.kv_idx,
            &k.to_dtype(m.kv_dtype)?.reshape((t * nkv, hd))?,
            0,
        )?;
        vs.scatter_set(
            &self.kv_idx,
            &v.to_dtype(m.kv_dtype)?.reshape((t * nkv, hd))?,
            0,
        )?;
        let k4 = m.slab4(ks)?;
        let v4 = m.slab4(vs)?;
        let mut parts = Vec::with_capacity(1 + self.prefill.len());
        if let (Some(d), Some(mask)) = (&self.dec, &dec_mask) {
            let (hi, lmax) = (d.hi, d.lmax);
            // queries placed at their slot: [hi, nkv, group, hd]
            let qd = q.index_select(&d.tok, 0)?.to_dtype(att)?;
            let qs = Tensor::zeros((hi, nh * hd), att, dev)?
                .index_add(&d.slots, &qd, 0)?
                .reshape((hi, nkv, group, hd))?;
            // strided views of the slab (copied only when the dtype changes)
            let kk = k4.narrow(0, 0, hi)?.narrow(2, 0, lmax)?.to_dtype(att)?;
            let vv = v4.narrow(0, 0, hi)?.narrow(2, 0, lmax)?.to_dtype(att)?;
            let s = qs.matmul(&kk.transpose(2, 3)?)?.to_dtype(DType::F32)?;
            let s = (s * scale)?.broadcast_add(mask)?;
            let p = DeviceModel::softmax_mode(&s, Mode::Serve)?.to_dtype(att)?;
            let o = p.matmul(&vv)?.to_dtype(DType::F32)?; // [hi, nkv, group, hd]
            parts.push(o.reshape((hi, nh * hd))?.index_select(&d.slots, 0)?);
        }
        for (&(s0, n, slot, len), mask) in self.prefill.iter().zip(&prefill_masks) {
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
            let p = DeviceModel::softmax_mode(&s, Mode::Serve)?.to_dtype(att)?;
            let o = p.matmul(&vv)?.to_dtype(DType::F32)?; // [nkv, group * n, hd]
            parts.push(
                o.reshape((nkv, group, n, hd))?
                    .permute((2, 0, 1, 3))?
                    .reshape((n, nh * hd))?,
            );
        }
        Ok(Tensor::cat(&parts, 0)?.index_select(&self.inverse, 0)?)
    }

    fn gated(&mut self, gate: Tensor, up: Tensor, act: Act) -> Result<Tensor> {
        Ok(match act {
            Act::Silu => (gate.silu()? * up)?,
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
