//! The host engine's decoder over a batch of sequences, each with its own KV
//! cache: the weights of any served family (`family/`), whose block runs on
//! the host kernels through `HostStep`. Q/K are held in the HF row layout
//! (GGUF's llama.cpp permutation is undone at load), so rope is the "neox"
//! half-split form for every source and LoRA deltas in HF layout apply as-is.

use crate::error::{EngineError, Result};
use crate::kernels;
use crate::kernels_f32::Kernels;
use crate::kv::KvCache;
use crate::linear::{matmul_many, Linear, Weight};
use crate::lora::{self, Span};
use half::f16;
use rayon::prelude::*;
use std::sync::Mutex;

pub use crate::family::Arch;
use crate::family::{Act, Attn, Norm, Ops, Proj};

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Per-frequency divisors from rope scaling (Llama 3.1 `rope_freqs`, linear
    /// scaling); empty = none.
    pub rope_freq_divisors: Vec<f32>,
    pub context: usize,
    /// Attention score scale (`1/√head_dim` unless the family says otherwise).
    pub attn_scale: f32,
    /// Sliding-window layers see this many positions (themselves included).
    pub sliding_window: Option<usize>,
    /// With a window: every `swa_pattern`-th layer is global, the rest slide
    /// (llama.cpp's pattern: layer `i` slides iff `i % n < n − 1`).
    pub swa_pattern: usize,
    /// The sliding layers' own rope base (rope table 1), if they have one.
    pub rope_theta_swa: Option<f32>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
    /// How layer `li` attends.
    pub fn layer_attn(&self, li: usize) -> Attn {
        let slides = self.sliding_window.is_some()
            && (self.swa_pattern == 0 || li % self.swa_pattern < self.swa_pattern - 1);
        Attn {
            rope: usize::from(slides && self.rope_theta_swa.is_some()),
            window: if slides { self.sliding_window } else { None },
            scale: self.attn_scale,
        }
    }

    /// The rope tables' (base, per-frequency divisors): the global one, then
    /// the sliding layers' own if they have one.
    pub fn rope_bases(&self) -> Vec<(f32, &[f32])> {
        let mut v = vec![(self.rope_theta, self.rope_freq_divisors.as_slice())];
        if let Some(t) = self.rope_theta_swa {
            v.push((t, &[]));
        }
        v
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = self.n_layer == 0
            || !(self.attn_scale.is_finite() && self.attn_scale > 0.0)
            || self.sliding_window == Some(0)
            || self.hidden == 0
            || self.n_head == 0
            || self.n_kv_head == 0
            || self.n_head % self.n_kv_head != 0
            || self.head_dim % 2 != 0
            || self.vocab == 0
            || self.context == 0
            || !(self.rope_freq_divisors.is_empty()
                || self.rope_freq_divisors.len() == self.head_dim / 2)
            || self
                .rope_freq_divisors
                .iter()
                .any(|d| !(d.is_finite() && *d > 0.0));
        if bad {
            return Err(EngineError::InvalidRequest(format!(
                "inconsistent model config {self:?}"
            )));
        }
        Ok(())
    }
}

pub struct Layer {
    /// The family's per-layer norm weights, in its [`crate::family::Family::norms`] order.
    pub norms: Vec<Vec<f32>>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Layer {
    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<Linear>,
    /// (cos, sin) per rope table ([`ModelConfig::rope_bases`]).
    ropes: Vec<(Vec<f32>, Vec<f32>)>,
    fingerprint: String,
    /// The kernel path its forward runs on (the process default when it was
    /// built; [`Model::set_kernels`] before it runs).
    kernels: Kernels,
}

/// One sequence's slice of a batched forward: new tokens appended after what its
/// cache already holds.
pub struct BatchItem<'a, C = KvCache> {
    pub tokens: &'a [u32],
    /// LoRA adapter applied to this sequence's projections (`None` = base model).
    pub adapter: Option<&'a retune_adapters::LoraAdapter>,
    /// The sequence's KV cache (host, or a device backend's).
    pub kv: &'a mut C,
    /// Whether logits for the last token are wanted (false for non-final prefill chunks).
    pub want_logits: bool,
    /// The only tokens whose logits are wanted (a grammar's allowed set), the
    /// rest of the row −∞: the host engine computes just these rows of the
    /// output projection when they are few ([`SPARSE_HEAD_FRACTION`]); `None`:
    /// every token. Other backends may compute them all.
    pub only: Option<&'a [u32]>,
}

/// A row computes only its allowed tokens' logits when they are at most
/// this fraction of the vocabulary.
pub const SPARSE_HEAD_FRACTION: usize = 16;

/// Rows the host engine has answered with [`BatchItem::only`]'s logits alone,
/// in this process (what a test reads to see the path taken).
static SPARSE_HEAD_ROWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn sparse_head_rows() -> u64 {
    SPARSE_HEAD_ROWS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Which wanted-logit rows read a classifier head instead of the vocabulary:
/// each wanted item's head (in item order).
pub fn heads_of<'a, C>(items: &[BatchItem<'a, C>]) -> Vec<Option<&'a retune_adapters::ClassHead>> {
    items
        .iter()
        .filter(|it| it.want_logits)
        .map(|it| it.adapter.and_then(|a| a.head.as_ref()))
        .collect()
}

impl Model {
    pub fn new(
        cfg: ModelConfig,
        embed: Linear,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        cfg.validate()?;
        let n_norms = cfg.arch.family().norms.len();
        for (i, l) in layers.iter().enumerate() {
            if l.norms.len() != n_norms {
                return Err(EngineError::Internal(format!(
                    "layer {i} has {} norms where {} has {n_norms}",
                    l.norms.len(),
                    cfg.arch
                )));
            }
        }
        let ropes = cfg
            .rope_bases()
            .into_iter()
            .map(|(theta, div)| rope_tables(&cfg, theta, div))
            .collect();
        let mut m = Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            ropes,
            fingerprint: String::new(),
            kernels: Kernels::process_default(),
        };
        m.fingerprint = m.compute_fingerprint()?;
        Ok(m)
    }

    /// The kernel path this model runs on.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Run on path `k` from now on. Call before the model first runs (or
    /// [`Model::prepare_kernels`]): a weight keeps the layout of the path
    /// it was first packed for.
    pub fn set_kernels(&mut self, k: Kernels) {
        self.kernels = k;
    }

    /// Build what its kernel path needs (the int8 paths' packed
    /// weights, dropping the GGUF bytes) now, not at the first request. Done
    /// when the model becomes the host backend (`Box::<dyn Compute>::from`), so a model
    /// bound for a device backend is never packed; a model run without it
    /// packs each linear at its first use and keeps the GGUF bytes beside.
    pub fn prepare_kernels(&mut self) {
        let k = self.kernels;
        let mut lins: Vec<&mut Linear> = vec![&mut self.embed];
        lins.extend(self.lm_head.as_mut());
        for l in &mut self.layers {
            lins.extend([
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ]);
        }
        // every linear: `any` would stop at the first one repacked
        let repacked = lins
            .into_par_iter()
            .map(|l| l.prepare(k))
            .filter(|&r| r)
            .count()
            > 0;
        // the dropped GGUF bytes lie between live blocks of the heap, where
        // glibc keeps them resident until asked to give them back
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if repacked {
            // SAFETY: malloc_trim only returns free pages to the OS.
            unsafe { libc::malloc_trim(0) };
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        let _ = repacked;
    }

    /// Projection shapes LoRA adapters are validated against (HF module order).
    pub fn base_shapes(&self) -> retune_adapters::BaseShapes {
        let c = &self.cfg;
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        retune_adapters::BaseShapes {
            n_layers: c.n_layer,
            dims: [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f)],
        }
    }

    /// Identifies the served base: its architecture and shapes and a hash of
    /// every weight as loaded (each tensor in the form the kernels read: a
    /// requantized or otherwise changed file is another base). Adapters record
    /// it; computed once, when the model is built.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn compute_fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let c = &self.cfg;
        let mut h = Sha256::new();
        h.update(format!(
            "{}:{}:{}:{}:{}:{}:{}",
            c.arch, c.n_layer, c.hidden, c.ffn, c.n_head, c.n_kv_head, c.vocab
        ));
        fn floats(h: &mut Sha256, v: &[f32]) {
            for chunk in v.chunks(4096) {
                let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
                h.update(&bytes);
            }
        }
        fn linear(h: &mut Sha256, name: &str, l: &Linear) -> Result<()> {
            h.update(format!("{name}:{}x{}", l.rows, l.cols));
            match &l.weight {
                // the GGUF bytes, whichever form the weight is kept in
                Weight::Blocks { .. } | Weight::Packed { .. } => {
                    if let Some((format, data)) = l.blocks() {
                        h.update(format!("{format:?}"));
                        h.update(data);
                    }
                }
                Weight::KBlocks { format, data } => {
                    h.update(format!("{format:?}"));
                    h.update(data);
                }
                Weight::F32(w) => floats(h, w),
                Weight::Candle(candle_core::quantized::QMatMul::QTensor(q)) => {
                    h.update(format!("{:?}", q.dtype()));
                    h.update(&*q.data()?);
                }
                Weight::Candle(
                    candle_core::quantized::QMatMul::Tensor(t)
                    | candle_core::quantized::QMatMul::TensorF16(t),
                ) => {
                    let v: Vec<f32> = t
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1()?;
                    floats(h, &v);
                }
            }
            if let Some(b) = &l.bias {
                floats(h, b);
            }
            Ok(())
        }
        linear(&mut h, "embed", &self.embed)?;
        for (i, l) in self.layers.iter().enumerate() {
            for n in &l.norms {
                floats(&mut h, n);
            }
            for (n, p) in [
                ("q", &l.q),
                ("k", &l.k),
                ("v", &l.v),
                ("o", &l.o),
                ("gate", &l.gate),
                ("up", &l.up),
                ("down", &l.down),
            ] {
                linear(&mut h, &format!("{i}.{n}"), p)?;
            }
        }
        floats(&mut h, &self.norm);
        match &self.lm_head {
            Some(l) => linear(&mut h, "lm_head", l)?,
            None => h.update(b"tied"),
        }
        let hex: String = h
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(format!("{}-{}x{}-{hex}", c.arch, c.n_layer, c.hidden))
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layer, self.cfg.kv_dim())
    }

    /// Run the batch; returns logits (`vocab` floats) for each item with `want_logits`,
    /// in item order.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let h = c.hidden;
        let t: usize = items.iter().map(|it| it.tokens.len()).sum();
        if t == 0 {
            return Ok(Vec::new());
        }
        // positions and per-token item index
        let mut pos = Vec::with_capacity(t);
        for it in items.iter() {
            if it.kv.len() + it.tokens.len() > c.context {
                return Err(EngineError::PromptTooLong {
                    prompt: it.kv.len() + it.tokens.len(),
                    max_tokens: 0,
                    context: c.context,
                });
            }
            pos.extend(it.kv.len()..it.kv.len() + it.tokens.len());
        }
        let k = self.kernels;
        let mut x = vec![0f32; t * h];
        let mut off = 0;
        for it in items.iter() {
            for &tok in it.tokens {
                if tok as usize >= c.vocab {
                    return Err(EngineError::InvalidRequest(format!(
                        "token id {tok} out of vocabulary"
                    )));
                }
                self.embed
                    .row_f32(k, tok as usize, &mut x[off * h..(off + 1) * h])?;
                off += 1;
            }
        }
        for it in items.iter_mut() {
            it.kv.reserve(it.tokens.len());
        }
        let mut spans = Vec::with_capacity(items.len());
        let mut start = 0;
        for it in items.iter() {
            spans.push(Span {
                start,
                len: it.tokens.len(),
                adapter: it.adapter,
            });
            start += it.tokens.len();
        }
        let any_lora = spans.iter().any(|s| s.adapter.is_some());
        let mut step = HostStep {
            model: self,
            items,
            spans: &spans,
            any_lora,
            pos: &pos,
            t,
        };
        let mut x = x;
        if let Some(s) = crate::family::embed_scale(c) {
            x.iter_mut().for_each(|v| *v *= s);
        }
        for li in 0..c.n_layer {
            x = c.arch.block(&mut step, c, li, x)?;
        }
        let items = step.items;
        for it in items.iter_mut() {
            it.kv.commit(it.tokens.len());
        }
        // final norm + lm_head only for the rows whose logits are wanted
        let mut rows = Vec::new();
        let mut end = 0;
        for it in items.iter() {
            end += it.tokens.len();
            if it.want_logits {
                rows.extend_from_slice(&x[(end - 1) * h..end * h]);
            }
        }
        let n = rows.len() / h;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut normed = vec![0f32; n * h];
        rms_norm_rows(&rows, self.norm_weight(Norm::Final), c.rms_eps, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        // a classifier adapter's rows read its head; a row a grammar narrows to
        // a few tokens computes their logits alone; the rest the vocabulary
        let heads = heads_of(items);
        let only: Vec<Option<&[u32]>> = items
            .iter()
            .filter(|it| it.want_logits)
            .map(|it| it.only)
            .collect();
        let sparse = |r: usize| only[r].filter(|ids| ids.len() * SPARSE_HEAD_FRACTION <= head.rows);
        let dense: Vec<usize> = (0..n)
            .filter(|&r| heads[r].is_none() && sparse(r).is_none())
            .collect();
        let dense_logits = if dense.is_empty() {
            Vec::new()
        } else if dense.len() == n {
            head.forward(self.kernels, &normed, n)?
        } else {
            let rows: Vec<f32> = dense
                .iter()
                .flat_map(|&r| normed[r * h..(r + 1) * h].iter().copied())
                .collect();
            head.forward(self.kernels, &rows, dense.len())?
        };
        let mut dense_logits = dense_logits.chunks_exact(head.rows).map(<[f32]>::to_vec);
        let mut out = Vec::with_capacity(n);
        for r in 0..n {
            let x = &normed[r * h..(r + 1) * h];
            out.push(match (heads[r], sparse(r)) {
                (Some(ch), _) => crate::lora::class_logits(ch, x),
                (None, Some(ids)) => {
                    SPARSE_HEAD_ROWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sparse_logits(self.kernels, head, ids, x)?
                }
                (None, None) => dense_logits.next().unwrap_or_default(),
            });
        }
        Ok(out)
    }

    fn norm_weight(&self, w: Norm) -> &[f32] {
        match w {
            Norm::Layer(li, n) => &self.layers[li].norms[n],
            Norm::Final => &self.norm,
        }
    }

    fn rope(&self, x: &mut [f32], table: usize, pos: &[usize]) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        let (cos_t, sin_t) = &self.ropes[table];
        let width = x.len() / pos.len().max(1);
        for (row, &p) in x.chunks_exact_mut(width).zip(pos) {
            let cos = &cos_t[p * half..(p + 1) * half];
            let sin = &sin_t[p * half..(p + 1) * half];
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }

    /// Causal attention of every new token over its own sequence's cache.
    fn attention(
        &self,
        items: &[BatchItem<'_>],
        layer: usize,
        q: &[f32],
        pos: &[usize],
        a: Attn,
    ) -> Vec<f32> {
        let c = &self.cfg;
        let (hd, nh) = (c.head_dim, c.n_head);
        let group = nh / c.n_kv_head;
        let kd = c.kv_dim();
        let scale = a.scale;
        let mut owner = Vec::with_capacity(pos.len());
        for (i, it) in items.iter().enumerate() {
            owner.extend(std::iter::repeat(i).take(it.tokens.len()));
        }
        let mut out = vec![0f32; q.len()];
        // (token, kv head) groups, the query heads of a kv head side by side
        // (heads `kvh·group..` are contiguous), in a few chunks per thread,
        // each with one scores buffer
        let nkv = nh / group;
        let units = q.len() / (hd * group);
        let per = units.div_ceil(4 * rayon::current_num_threads()).max(1);
        let chunks: Vec<&mut [f32]> = out.chunks_mut(per * group * hd).collect();
        let chunks: Vec<Mutex<&mut [f32]>> = chunks.into_iter().map(Mutex::new).collect();
        crate::team::for_each(chunks.len(), |c| {
            let mut o = chunks[c].lock().unwrap_or_else(|e| e.into_inner());
            let mut scores = Vec::new();
            for (k, o) in o.chunks_exact_mut(group * hd).enumerate() {
                let unit = c * per + k;
                let (ti, kvh) = (unit / nkv, unit % nkv);
                let (keys, vals) = items[owner[ti]].kv.layer(layer);
                let at = unit * group * hd;
                // positions first..=pos: all of them, or the window's
                let first = a.window.map_or(0, |w| (pos[ti] + 1).saturating_sub(w));
                attend_group(
                    &q[at..at + group * hd],
                    group,
                    &keys[first * kd..],
                    &vals[first * kd..],
                    kd,
                    kvh * hd,
                    pos[ti] + 1 - first,
                    scale,
                    &mut scores,
                    o,
                );
            }
        });
        drop(chunks);
        out
    }
}

/// One batched forward on the host kernels: the [`Ops`] a family's block runs
/// on, over `[t, width]` row-major activations.
struct HostStep<'m, 'i, 'a> {
    model: &'m Model,
    items: &'i mut [BatchItem<'a>],
    spans: &'i [Span<'a>],
    any_lora: bool,
    pos: &'i [usize],
    t: usize,
}

impl Ops for HostStep<'_, '_, '_> {
    type X = Vec<f32>;

    fn norm(&mut self, x: &Vec<f32>, w: Norm) -> Result<Vec<f32>> {
        let w = self.model.norm_weight(w);
        let mut out = vec![0f32; x.len()];
        rms_norm_rows(x, w, self.model.cfg.rms_eps, &mut out);
        Ok(out)
    }

    fn linear(&mut self, li: usize, ps: &[Proj], x: &Vec<f32>) -> Result<Vec<Vec<f32>>> {
        // base projection for the whole batch, then per-row adapter deltas
        let k = self.model.kernels;
        let layer = &self.model.layers[li];
        let lins: Vec<&Linear> = ps.iter().map(|&p| layer.proj(p)).collect();
        let mut outs = matmul_many(k, &lins, x, self.t)?;
        if self.any_lora {
            for ((out, l), p) in outs.iter_mut().zip(&lins).zip(ps) {
                lora::add_deltas(k, self.spans, li, p.index(), x, l.cols, out, l.rows);
            }
        }
        Ok(outs)
    }

    fn rope(&mut self, mut x: Vec<f32>, rope: usize) -> Result<Vec<f32>> {
        self.model.rope(&mut x, rope, self.pos);
        Ok(x)
    }

    fn attention(
        &mut self,
        li: usize,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        a: Attn,
    ) -> Result<Vec<f32>> {
        let kd = self.model.cfg.kv_dim();
        let mut off = 0;
        for it in self.items.iter_mut() {
            let n = it.tokens.len();
            it.kv.append(
                li,
                &k[off * kd..(off + n) * kd],
                &v[off * kd..(off + n) * kd],
            );
            off += n;
        }
        Ok(self.model.attention(self.items, li, &q, self.pos, a))
    }

    fn gated(&mut self, mut gate: Vec<f32>, up: Vec<f32>, act: Act) -> Result<Vec<f32>> {
        match act {
            Act::Silu => {
                for (g, u) in gate.iter_mut().zip(&up) {
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            }
            Act::GeluTanh => {
                for (g, u) in gate.iter_mut().zip(&up) {
                    *g = gelu_tanh(*g) * u;
                }
            }
        }
        Ok(gate)
    }

    fn add(&mut self, mut x: Vec<f32>, y: Vec<f32>) -> Result<Vec<f32>> {
        add_in_place(&mut x, &y);
        Ok(x)
    }

    fn scale(&mut self, mut x: Vec<f32>, s: f32) -> Result<Vec<f32>> {
        for v in &mut x {
            *v *= s;
        }
        Ok(x)
    }
}

/// The logits of `ids` alone (−∞ elsewhere): each row of the output
/// projection dequantized and dotted with `x` by the kernels' tile, the
/// arithmetic of the full projection on the f32 paths (the int8 paths round
/// `x` to 8 bits there, not here).
fn sparse_logits(k: Kernels, head: &Linear, ids: &[u32], x: &[f32]) -> Result<Vec<f32>> {
    let mut out = vec![f32::NEG_INFINITY; head.rows];
    let mut w = vec![0f32; head.cols];
    for &id in ids {
        let r = id as usize;
        if r >= head.rows {
            continue;
        }
        head.row_f32(k, r, &mut w)?;
        let [[v]] = crate::kernels_f32::tile::<1, 1>(k, [&w], [x]);
        out[r] = v + head.bias.as_ref().map_or(0.0, |b| b[r]);
    }
    Ok(out)
}

/// GELU, tanh approximation: `x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// Rope cos/sin tables of base `theta`, `[context, head_dim / 2]` each
/// (shared by every backend).
pub(crate) fn rope_tables(cfg: &ModelConfig, theta: f32, divisors: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim / 2;
    let mut rope_cos = Vec::with_capacity(cfg.context * half);
    let mut rope_sin = Vec::with_capacity(cfg.context * half);
    for p in 0..cfg.context {
        for i in 0..half {
            let mut freq = theta.powf(-2.0 * i as f32 / cfg.head_dim as f32);
            if let Some(d) = divisors.get(i) {
                freq /= d;
            }
            let a = p as f32 * freq;
            rope_cos.push(a.cos());
            rope_sin.push(a.sin());
        }
    }
    (rope_cos, rope_sin)
}

/// One query head over `n` cached positions of its kv head (at `off` within each
/// `kd`-wide cache row): softmax(q·K/√d)·V into `o`.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn attend_head(
    q: &[f32],
    keys: &[f16],
    vals: &[f16],
    kd: usize,
    off: usize,
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let hd = q.len();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for p in 0..n {
        let s = kernels::dot_f32_f16(q, &keys[p * kd + off..p * kd + off + hd]) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for (p, s) in scores.iter().enumerate() {
        kernels::axpy_f16(o, s * inv, &vals[p * kd + off..p * kd + off + hd]);
    }
}

/// The `g` query heads of one kv head (rows of `hd` in `q`) over `n` cached
/// positions into `o` (`g` rows): for each head exactly what [`attend_head`]
/// computes (the same bits), each key and value converted once for the group
/// and the outputs accumulated in registers.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn attend_group(
    q: &[f32],
    g: usize,
    keys: &[f16],
    vals: &[f16],
    kd: usize,
    off: usize,
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    scores.clear();
    scores.resize(g * n, 0.0);
    kernels::attention_dots(q, g, keys, kd, off, n, scores);
    for row in scores.chunks_exact_mut(n.max(1)).take(g) {
        let mut max = f32::NEG_INFINITY;
        for s in row.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
    kernels::attention_sum(scores, g, vals, kd, off, n, o);
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Llama 3 rope scaling (HF `rope_type: "llama3"`) as per-frequency divisors.
pub fn llama3_rope_divisors(
    theta: f32,
    head_dim: usize,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_context: f32,
) -> Vec<f32> {
    let low_wavelen = original_context / low_freq_factor;
    let high_wavelen = original_context / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = theta.powf(-2.0 * i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            let scaled = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth = (original_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            };
            freq / scaled
        })
        .collect()
}

pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss: f32 = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grouped attention is the per-head one, bit for bit, for any group
    /// size, head width (tails included), kv head and number of positions.
    #[test]
    fn grouped_attention_gives_the_bits_of_one_head_at_a_time() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for hd in [64usize, 36, 8, 128] {
            for g in [1usize, 2, 3, 4, 5, 7] {
                for n in [1usize, 2, 3, 17, 64] {
                    let nkv = 3;
                    let kd = nkv * hd;
                    let keys: Vec<f16> = (0..n * kd).map(|_| f16::from_f32(next())).collect();
                    let vals: Vec<f16> = (0..n * kd).map(|_| f16::from_f32(next())).collect();
                    let q: Vec<f32> = (0..g * hd).map(|_| next()).collect();
                    let kvh = n % nkv;
                    let scale = 1.0 / (hd as f32).sqrt();
                    let mut scores = Vec::new();
                    let mut got = vec![0f32; g * hd];
                    attend_group(
                        &q,
                        g,
                        &keys,
                        &vals,
                        kd,
                        kvh * hd,
                        n,
                        scale,
                        &mut scores,
                        &mut got,
                    );
                    for h in 0..g {
                        let mut want = vec![0f32; hd];
                        attend_head(
                            &q[h * hd..(h + 1) * hd],
                            &keys,
                            &vals,
                            kd,
                            kvh * hd,
                            n,
                            scale,
                            &mut scores,
                            &mut want,
                        );
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&got[h * hd..(h + 1) * hd]),
                            bits(&want),
                            "hd {hd}, group {g}, head {h}, {n} positions"
                        );
                    }
                }
            }
        }
    }
}
