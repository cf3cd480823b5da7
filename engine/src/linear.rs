//! The one linear type every projection goes through.
//!
//! `y = x Wᵀ (+ b)`, `W` is `[rows, cols]` (out × in) in one of the native block
//! formats, f32, or (for other GGUF quant types) candle's `QMatMul`. Several linears
//! sharing the same input run in one parallel region (q/k/v, gate/up), so a decode
//! step pays few thread hand-offs. Per-row LoRA deltas are added on top of the
//! base output by the multi-LoRA layer; the base path stays batch-invariant.

use crate::error::{EngineError, Result};
use crate::kernels::{BlockFormat, QK};
use crate::kernels_f32::{self, Kernels};
use crate::kernels_q8::{self, Packed, QuantX};
use crate::kquants::{KFormat, QK_K};
use candle_core::quantized::QMatMul;

pub enum Weight {
    Blocks {
        format: BlockFormat,
        data: Vec<u8>,
    },
    /// Block weights kept only in the int8 kernels' form ([`Linear::prepare`]
    /// on an int8 path drops the GGUF bytes, which would double the resident
    /// weights); where the GGUF bytes are needed they are rebuilt, losslessly.
    Packed {
        format: BlockFormat,
        packed: Packed,
    },
    /// GGUF K-quant blocks (256 weights each), dequantized natively per row
    /// ([`crate::kquants`]) into the f32 tiles, on every kernel path.
    KBlocks {
        format: KFormat,
        data: Vec<u8>,
    },
    F32(Vec<f32>),
    Candle(QMatMul),
}

pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    pub weight: Weight,
    pub bias: Option<Vec<f32>>,
    /// Block weights in the int8 kernels' form, built once on that path
    /// ([`Linear::prepare`] or the first use). The weights are immutable once
    /// packed: change `weight` only on a linear that has not run on it.
    packed: std::sync::OnceLock<Packed>,
    /// The GGUF bytes of a [`Weight::Packed`], rebuilt on the first call that
    /// needs them (an f32 kernel path chosen later, a device upload).
    gguf: std::sync::OnceLock<Vec<u8>>,
}

impl Linear {
    pub fn new(rows: usize, cols: usize, weight: Weight, bias: Option<Vec<f32>>) -> Result<Self> {
        let ok = match &weight {
            Weight::Blocks { format, data } => {
                cols % QK == 0 && data.len() == rows * cols / QK * format.block_bytes()
            }
            Weight::Packed { format, packed } => packed.fits(*format, rows, cols),
            Weight::KBlocks { format, data } => {
                cols % QK_K == 0 && data.len() == rows * cols / QK_K * format.block_bytes()
            }
            Weight::F32(w) => w.len() == rows * cols,
            Weight::Candle(_) => true,
        };
        if !ok || bias.as_ref().is_some_and(|b| b.len() != rows) {
            return Err(EngineError::ShapeMismatch {
                name: "linear".into(),
                got: vec![rows, cols],
                expected: vec![rows, cols],
            });
        }
        Ok(Self {
            rows,
            cols,
            weight,
            bias,
            packed: std::sync::OnceLock::new(),
            gguf: std::sync::OnceLock::new(),
        })
    }

    /// The int8 kernels' form of block weights, where path `k` takes it
    /// (built on the first call).
    pub fn packed(&self, k: Kernels) -> Option<&Packed> {
        match &self.weight {
            Weight::Blocks { format, data } if k.int8() => Some(
                self.packed
                    .get_or_init(|| kernels_q8::pack(k, *format, data, self.rows, self.cols)),
            ),
            Weight::Packed { packed, .. } if k.int8() => Some(packed),
            _ => None,
        }
    }

    /// Block weights in GGUF's bytes (rebuilt once from a [`Weight::Packed`]).
    pub fn blocks(&self) -> Option<(BlockFormat, &[u8])> {
        match &self.weight {
            Weight::Blocks { format, data } => Some((*format, data)),
            Weight::Packed { format, packed } => {
                Some((*format, self.gguf.get_or_init(|| packed.unpack(*format))))
            }
            _ => None,
        }
    }

    /// Build what the kernel path in use needs before the first request. On
    /// an int8 path block weights are repacked and their GGUF bytes dropped
    /// (returns whether that happened).
    pub fn prepare(&mut self, k: Kernels) -> bool {
        if !k.int8() {
            return false;
        }
        if let Weight::Blocks { format, data } = &self.weight {
            let format = *format;
            let packed = self
                .packed
                .take()
                .unwrap_or_else(|| kernels_q8::pack(k, format, data, self.rows, self.cols));
            self.weight = Weight::Packed { format, packed };
            return true;
        }
        false
    }

    /// Copy row `r` as f32 into `out` (embedding lookup on tied weights).
    pub fn row_f32(&self, k: Kernels, r: usize, out: &mut [f32]) -> Result<()> {
        match &self.weight {
            Weight::Blocks { format, data } => {
                let rb = self.cols / QK * format.block_bytes();
                kernels_f32::dequant_row(k, *format, &data[r * rb..(r + 1) * rb], out);
            }
            Weight::Packed { format, packed } => packed.dequant_row(*format, r, out),
            Weight::KBlocks { format, data } => {
                let rb = self.cols / QK_K * format.block_bytes();
                crate::kquants::dequant_row(*format, &data[r * rb..(r + 1) * rb], out);
            }
            Weight::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
            Weight::Candle(_) => {
                return Err(EngineError::InvalidRequest(
                    "row lookup on a candle-backed weight".into(),
                ))
            }
        }
        Ok(())
    }

    pub fn forward(&self, k: Kernels, x: &[f32], t: usize) -> Result<Vec<f32>> {
        let mut outs = matmul_many(k, &[self], x, t)?;
        Ok(outs.pop().unwrap_or_default())
    }
}

/// Rows per register tile of the batched path.
const TILE_ROWS: usize = 4;
/// Tokens per register tile of the batched path (4×3 measured fastest on AVX2).
const TILE_TOKENS: usize = 3;

/// Up to [`TILE_ROWS`] weight rows against all `t` tokens, in register tiles.
#[inline]
pub(crate) fn rows_times_tokens(
    k: Kernels,
    rows: &[&[f32]],
    x: &[f32],
    cols: usize,
    t: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    let xt = |i: usize| &x[i * cols..(i + 1) * cols];
    let mut ti = 0;
    while ti + TILE_TOKENS <= t {
        let xs = [xt(ti), xt(ti + 1), xt(ti + 2)];
        if let [a, b, c, d] = rows {
            for (ri, vals) in kernels_f32::tile::<4, 3>(k, [a, b, c, d], xs)
                .iter()
                .enumerate()
            {
                vals.iter()
                    .enumerate()
                    .for_each(|(j, v)| put(ri, ti + j, *v));
            }
        } else {
            for (ri, row) in rows.iter().enumerate() {
                let [vals] = kernels_f32::tile::<1, 3>(k, [row], xs);
                vals.iter()
                    .enumerate()
                    .for_each(|(j, v)| put(ri, ti + j, *v));
            }
        }
        ti += TILE_TOKENS;
    }
    // remaining 1-2 tokens: still several independent accumulator chains
    if let ([a, b, c, d], 2) = (rows, t - ti) {
        let v = kernels_f32::tile::<4, 2>(k, [a, b, c, d], [xt(ti), xt(ti + 1)]);
        for (ri, vals) in v.iter().enumerate() {
            vals.iter()
                .enumerate()
                .for_each(|(j, v)| put(ri, ti + j, *v));
        }
        return;
    }
    for ti in ti..t {
        if let [a, b, c, d] = rows {
            let v = kernels_f32::tile::<4, 1>(k, [a, b, c, d], [xt(ti)]);
            v.iter().enumerate().for_each(|(ri, [v])| put(ri, ti, *v));
        } else {
            for (ri, row) in rows.iter().enumerate() {
                let [[v]] = kernels_f32::tile::<1, 1>(k, [row], [xt(ti)]);
                put(ri, ti, v);
            }
        }
    }
}

/// Rows `r0..r1` of a block weight against all `t` tokens: [`TILE_ROWS`] rows
/// at a time dequantized (`dequant(row, out)`) into f32, then the f32 tiles.
#[inline(always)]
fn dequantized_tiles(
    k: Kernels,
    cols: usize,
    (r0, r1): (usize, usize),
    x: &[f32],
    t: usize,
    write: impl Fn(usize, usize, f32),
    dequant: impl Fn(usize, &mut [f32]),
) {
    let mut scratch = vec![0f32; TILE_ROWS * cols];
    let mut r = r0;
    while r < r1 {
        let n = (r1 - r).min(TILE_ROWS);
        for (i, w) in scratch.chunks_exact_mut(cols).take(n).enumerate() {
            dequant(r + i, w);
        }
        let rows: Vec<&[f32]> = scratch.chunks_exact(cols).take(n).collect();
        rows_times_tokens(k, &rows, x, cols, t, |ri, ti, v| write(ti, r + ri, v));
        r += n;
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each parallel job writes a disjoint set of (token, row) cells.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Run several linears with the same input `x` (`t` rows of `cols`) in one
/// parallel region on the kernels of path `k`. Returns one `[t, rows]` output
/// per linear.
pub fn matmul_many(k: Kernels, lins: &[&Linear], x: &[f32], t: usize) -> Result<Vec<Vec<f32>>> {
    let cols = lins.first().map(|l| l.cols).unwrap_or(0);
    if lins.iter().any(|l| l.cols != cols) || x.len() != t * cols {
        return Err(EngineError::InvalidRequest("matmul input shape".into()));
    }
    let mut outs: Vec<Vec<f32>> = lins.iter().map(|l| vec![0f32; t * l.rows]).collect();

    let total_rows: usize = lins.iter().map(|l| l.rows).sum();
    let threads = rayon::current_num_threads().max(1);
    // Jobs are contiguous row ranges, at most 1,024 rows. A few tokens (decode)
    // stream the weights from memory: two jobs per thread and linear, so each
    // job's rows are one long stream for the prefetchers (the team hands out
    // the next job in nanoseconds; 16 per thread decoded 20-35% slower, each
    // job paying a prefetch ramp). More tokens are compute-bound: eight per
    // thread balance better (prefill 512 measured 336 → 429 tok/s against two).
    let per = if t <= 4 { 2 } else { 8 };
    // whole groups of the grouped int8 layout (8 rows): none is split between jobs
    let chunk = (total_rows / (threads * per)).clamp(8, 1024).div_ceil(8) * 8;
    let mut jobs = Vec::new();
    for (li, l) in lins.iter().enumerate() {
        if matches!(l.weight, Weight::Candle(_)) {
            continue;
        }
        let mut r = 0;
        while r < l.rows {
            jobs.push((li, r, (r + chunk).min(l.rows)));
            r += chunk;
        }
    }
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let wide = k.wide();
    // the int8 path: every token quantized once, before the parallel region
    let packs: Vec<Option<&Packed>> = lins.iter().map(|l| l.packed(k)).collect();
    let xq = packs
        .iter()
        .any(Option::is_some)
        .then(|| kernels_q8::quantize(k, x, cols));
    let q = Int8 {
        k,
        packs: &packs,
        x: xq.as_ref(),
    };
    crate::team::for_each(jobs.len(), |j| {
        let (li, r0, r1) = jobs[j];
        if wide {
            // SAFETY: the AVX-512 path is only chosen where the CPU and OS have it.
            #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
            unsafe {
                matmul_job_avx512(lins, &ptrs, x, t, li, r0, r1, &q)
            }
        } else {
            matmul_job(lins, &ptrs, x, t, li, r0, r1, &q)
        }
    });
    /// What every job reads besides the weights: the path, and on the int8
    /// paths the packed weights and the quantized tokens.
    struct Int8<'a> {
        k: Kernels,
        packs: &'a [Option<&'a Packed>],
        x: Option<&'a QuantX>,
    }
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn matmul_job(
        lins: &[&Linear],
        ptrs: &[OutPtr],
        x: &[f32],
        t: usize,
        li: usize,
        r0: usize,
        r1: usize,
        q: &Int8<'_>,
    ) {
        matmul_body(lins, ptrs, x, t, li, r0, r1, q)
    }
    /// The same job compiled with AVX-512 enabled, so the kernels inline into
    /// its loops as the AVX2 ones do into `matmul_job`'s.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn matmul_job_avx512(
        lins: &[&Linear],
        ptrs: &[OutPtr],
        x: &[f32],
        t: usize,
        li: usize,
        r0: usize,
        r1: usize,
        q: &Int8<'_>,
    ) {
        matmul_body(lins, ptrs, x, t, li, r0, r1, q)
    }
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn matmul_body(
        lins: &[&Linear],
        ptrs: &[OutPtr],
        x: &[f32],
        t: usize,
        li: usize,
        r0: usize,
        r1: usize,
        q: &Int8<'_>,
    ) {
        let l = lins[li];
        let out = ptrs[li];
        let k = q.k;
        let write = |ti: usize, r: usize, v: f32| {
            // SAFETY: (ti, r) is inside [t, rows] and owned by this job alone.
            unsafe { *out.0.add(ti * l.rows + r) = v };
        };
        if let (Some(Some(p)), Some(xq)) = (q.packs.get(li), q.x) {
            kernels_q8::rows_times_tokens(k, p, xq, r0, r1, write);
            return;
        }
        match (l.blocks(), &l.weight) {
            (Some((format, data)), _) if t < TILE_TOKENS => {
                let rb = l.cols / QK * format.block_bytes();
                let row = |r: usize| &data[r * rb..(r + 1) * rb];
                // the first rows: `dot_rows` prefetches two tiles ahead
                crate::kernels::prefetch_all(&data[r0 * rb..(r0 + 8).min(r1) * rb]);
                for ti in 0..t {
                    let xs = &x[ti * l.cols..(ti + 1) * l.cols];
                    let mut r = r0;
                    while r + 4 <= r1 {
                        let v = kernels_f32::dot_rows::<4>(
                            k,
                            format,
                            [row(r), row(r + 1), row(r + 2), row(r + 3)],
                            xs,
                        );
                        v.into_iter()
                            .enumerate()
                            .for_each(|(j, v)| write(ti, r + j, v));
                        r += 4;
                    }
                    for r in r..r1 {
                        let [v] = kernels_f32::dot_rows::<1>(k, format, [row(r)], xs);
                        write(ti, r, v);
                    }
                }
            }
            (Some((format, data)), _) => {
                let rb = l.cols / QK * format.block_bytes();
                dequantized_tiles(k, l.cols, (r0, r1), x, t, write, |r, w| {
                    kernels_f32::dequant_row(k, format, &data[r * rb..(r + 1) * rb], w)
                });
            }
            (None, Weight::KBlocks { format, data }) => {
                let rb = l.cols / QK_K * format.block_bytes();
                dequantized_tiles(k, l.cols, (r0, r1), x, t, write, |r, w| {
                    crate::kquants::dequant_row(*format, &data[r * rb..(r + 1) * rb], w)
                });
            }
            (None, Weight::F32(w)) => {
                let mut r = r0;
                while r < r1 {
                    let n = (r1 - r).min(TILE_ROWS);
                    let rows: Vec<&[f32]> = (r..r + n)
                        .map(|i| &w[i * l.cols..(i + 1) * l.cols])
                        .collect();
                    rows_times_tokens(k, &rows, x, l.cols, t, |ri, ti, v| write(ti, r + ri, v));
                    r += n;
                }
            }
            (None, _) => {}
        }
    }
    for (l, out) in lins.iter().zip(outs.iter_mut()) {
        if let Weight::Candle(qm) = &l.weight {
            let xt = candle_core::Tensor::from_slice(x, (t, cols), &candle_core::Device::Cpu)?;
            let y = candle_core::Module::forward(qm, &xt)?;
            *out = y.flatten_all()?.to_vec1::<f32>()?;
        }
        if let Some(b) = &l.bias {
            for row in out.chunks_exact_mut(l.rows) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
    Ok(outs)
}
