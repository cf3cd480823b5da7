use super::plan::{LoraPlan, SlotSel};
use super::train::Mode;
use super::{DeviceKv, DeviceModel};
use crate::error::{EngineError, Result};
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
            let xn = self
                .rms_mode(
                    &x,
                    &layer.norms[crate::family::llama::ATTN_NORM],
                    Mode::Serve,
                )?
                .to_dtype(self.dtype)?;
            let mut qkv = project(li, &[0, 1, 2], &xn)?.into_iter();
            let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
                return Err(EngineError::InvalidRequest("projection count".into()));
            };
            let q = self.rope_mode(&q.to_dtype(DType::F32)?, nh, &cos, &sin, Mode::Serve)?;
            let k = self.rope_mode(&k.to_dtype(DType::F32)?, nkv, &cos, &sin, Mode::Serve)?;
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
                let p = Self::softmax_mode(&s, Mode::Serve)?.to_dtype(att)?;
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
                let p = Self::softmax_mode(&s, Mode::Serve)?.to_dtype(att)?;
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
            let xn = self
                .rms_mode(
                    &x,
                    &layer.norms[crate::family::llama::FFN_NORM],
                    Mode::Serve,
                )?
                .to_dtype(self.dtype)?;
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
            .rms_mode(
                &x.index_select(&self.u32s(&last)?, 0)?,
                &self.norm,
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
