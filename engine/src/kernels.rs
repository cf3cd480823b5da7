//! CPU dot-product kernels over GGUF block formats.
//!
//! Weights stay in their GGUF block layout (bytes as in the file). Activations are
//! quantized once per token into [`Q8Act`] blocks (like ggml's q8_1: scale plus
//! scaled sum), then every weight row is a dot product against them. Each output
//! value is computed by the same sequence of operations whatever the batch size,
//! so a sequence gets bit-identical logits alone or inside a batch.

use half::f16;

/// Elements per quantization block (Q4_0, Q4_1, Q8_0 and the activation blocks).
pub const QK: usize = 32;

/// Bytes per block of each native weight format.
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q8_0_BYTES: usize = 34;

/// One block of 32 activations quantized to i8: `x ≈ d * qs`, `s = d * Σ qs`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(8))]
pub struct Q8Act {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// Quantize `x` (length a multiple of 32) into `out` (length `x.len() / 32`).
pub fn quantize_act(x: &[f32], out: &mut [Q8Act]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in blk.qs.iter_mut().zip(xs) {
            let r = (v * id).round() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += r.clamp(-127, 127);
        }
        // Scales are rounded through f16 exactly as ggml's q8_0/q8_1 blocks store
        // them, so dot products carry the same rounding as llama.cpp's.
        blk.d = f16::from_f32(d).to_f32();
        blk.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Dequantize one row of blocks into f32 (used for embeddings and tests).
pub fn dequant_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    match format {
        BlockFormat::Q4_0 => {
            for (b, o) in row.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    o[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        BlockFormat::Q4_1 => {
            for (b, o) in row.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    o[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }
        }
        BlockFormat::Q8_0 => {
            for (b, o) in row.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
    }
}

/// The block formats with native kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => Q4_0_BYTES,
            Self::Q4_1 => Q4_1_BYTES,
            Self::Q8_0 => Q8_0_BYTES,
        }
    }
}

/// Dot product of one quantized weight row with quantized activations.
#[inline]
pub fn dot_q(format: BlockFormat, row: &[u8], x: &[Q8Act]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: the target features are enabled at compile time; block counts are
        // checked by the callers (row.len() == x.len() * block_bytes).
        unsafe {
            let [v] = match format {
                BlockFormat::Q4_0 => avx2::tile::<avx2::Q40, 1>(row, [x]),
                BlockFormat::Q4_1 => avx2::tile::<avx2::Q41, 1>(row, [x]),
                BlockFormat::Q8_0 => avx2::tile::<avx2::Q80, 1>(row, [x]),
            };
            v
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_q_scalar(format, row, x)
    }
}

/// Dot products of one weight row with `N` tokens' activations at once (the
/// weight block is unpacked once for all of them). Each token's result is computed
/// by exactly the same operations as [`dot_q`], so tiling never changes a value.
#[inline]
pub fn dot_q_tile<const N: usize>(format: BlockFormat, row: &[u8], xs: [&[Q8Act]; N]) -> [f32; N] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        // SAFETY: see dot_q.
        unsafe {
            match format {
                BlockFormat::Q4_0 => avx2::tile::<avx2::Q40, N>(row, xs),
                BlockFormat::Q4_1 => avx2::tile::<avx2::Q41, N>(row, xs),
                BlockFormat::Q8_0 => avx2::tile::<avx2::Q80, N>(row, xs),
            }
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
    {
        xs.map(|x| dot_q_scalar(format, row, x))
    }
}

/// Portable reference for [`dot_q`].
pub fn dot_q_scalar(format: BlockFormat, row: &[u8], x: &[Q8Act]) -> f32 {
    let mut acc = 0f32;
    match format {
        BlockFormat::Q4_0 => {
            for (b, y) in row.chunks_exact(Q4_0_BYTES).zip(x) {
                let mut s = 0i32;
                for j in 0..16 {
                    s += ((b[2 + j] & 0x0F) as i32 - 8) * y.qs[j] as i32;
                    s += ((b[2 + j] >> 4) as i32 - 8) * y.qs[j + 16] as i32;
                }
                acc += f16_at(b, 0) * y.d * s as f32;
            }
        }
        BlockFormat::Q4_1 => {
            for (b, y) in row.chunks_exact(Q4_1_BYTES).zip(x) {
                let mut s = 0i32;
                for j in 0..16 {
                    s += (b[4 + j] & 0x0F) as i32 * y.qs[j] as i32;
                    s += (b[4 + j] >> 4) as i32 * y.qs[j + 16] as i32;
                }
                acc += f16_at(b, 0) * y.d * s as f32 + f16_at(b, 2) * y.s;
            }
        }
        BlockFormat::Q8_0 => {
            for (b, y) in row.chunks_exact(Q8_0_BYTES).zip(x) {
                let mut s = 0i32;
                for j in 0..QK {
                    s += b[2 + j] as i8 as i32 * y.qs[j] as i32;
                }
                acc += f16_at(b, 0) * y.d * s as f32;
            }
        }
    }
    acc
}

/// f32 dot product (f32 weights from safetensors or f16/bf16 GGUF tensors).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        // SAFETY: features enabled at compile time; the function bounds by min length.
        unsafe { avx2::dot_f32(a, b) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// f32 · f16 dot product (query against the f16 KV cache).
#[inline]
pub fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        // SAFETY: features enabled at compile time; bounded by the shorter slice.
        unsafe { avx2::dot_f32_f16(a, b) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    {
        a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
    }
}

/// `out += w * v` with `v` in f16.
#[inline]
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
    {
        // SAFETY: as above.
        unsafe { avx2::axpy_f16(out, w, v) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")))]
    {
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use super::{Q8Act, Q4_0_BYTES, Q4_1_BYTES, Q8_0_BYTES};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(q, m);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
        _mm256_set_m128i(hi, lo)
    }

    /// A weight block format: unpack a block into 32 lanes of (unsigned or signed) ints.
    pub trait Fmt {
        const BYTES: usize;
        /// Q4_1's lanes are unsigned 0..15 with a min; the others are signed.
        const UNSIGNED: bool;
        unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32);
    }
    pub struct Q40;
    pub struct Q41;
    pub struct Q80;
    impl Fmt for Q40 {
        const BYTES: usize = Q4_0_BYTES;
        const UNSIGNED: bool = false;
        #[inline(always)]
        unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
            let q = _mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8));
            (q, f16_ptr(b), 0.0)
        }
    }
    impl Fmt for Q41 {
        const BYTES: usize = Q4_1_BYTES;
        const UNSIGNED: bool = true;
        #[inline(always)]
        unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
            (nibbles(b.add(4)), f16_ptr(b), f16_ptr(b.add(2)))
        }
    }
    impl Fmt for Q80 {
        const BYTES: usize = Q8_0_BYTES;
        const UNSIGNED: bool = false;
        #[inline(always)]
        unsafe fn unpack(b: *const u8) -> (__m256i, f32, f32) {
            (_mm256_loadu_si256(b.add(2) as *const __m256i), f16_ptr(b), 0.0)
        }
    }

    #[inline(always)]
    unsafe fn f16_ptr(b: *const u8) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([*b, *b.add(1)])).to_f32()
    }

    #[inline(always)]
    pub unsafe fn tile<F: Fmt, const N: usize>(row: &[u8], xs: [&[Q8Act]; N]) -> [f32; N] {
        let mut n = row.len() / F::BYTES;
        for x in &xs {
            n = n.min(x.len());
        }
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut summs = [0f32; N];
        let base = row.as_ptr();
        for i in 0..n {
            let (qx, d, m) = F::unpack(base.add(i * F::BYTES));
            let ax = if F::UNSIGNED { qx } else { _mm256_sign_epi8(qx, qx) };
            for t in 0..N {
                let y = xs[t].get_unchecked(i);
                let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
                let sy = if F::UNSIGNED { qy } else { _mm256_sign_epi8(qy, qx) };
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones));
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), p, acc[t]);
                if F::UNSIGNED {
                    summs[t] += m * y.s;
                }
            }
        }
        let mut out = [0f32; N];
        for t in 0..N {
            out[t] = hsum(acc[t]) + summs[t];
        }
        out
    }

    #[cfg(target_feature = "f16c")]
    pub unsafe fn dot_f32_f16(a: &[f32], b: &[half::f16]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let k = _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i) as *const __m128i));
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), k, acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += a.get_unchecked(i) * b.get_unchecked(i).to_f32();
            i += 1;
        }
        s
    }

    #[cfg(target_feature = "f16c")]
    pub unsafe fn axpy_f16(out: &mut [f32], w: f32, v: &[half::f16]) {
        let n = out.len().min(v.len());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let o = _mm256_loadu_ps(out.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(wv, x, o));
            i += 8;
        }
        while i < n {
            *out.get_unchecked_mut(i) += w * v.get_unchecked(i).to_f32();
            i += 1;
        }
    }

    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a.get_unchecked(i) * b.get_unchecked(i);
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn random_blocks(format: BlockFormat, nblocks: usize, seed: u64) -> Vec<u8> {
        let bytes = rand_vec(nblocks * format.block_bytes(), seed);
        let mut out: Vec<u8> = bytes.iter().map(|v| ((v + 1.0) * 127.0) as u8).collect();
        for b in out.chunks_exact_mut(format.block_bytes()) {
            // sane f16 scales (0.01..0.03) and mins
            let d = f16::from_f32(0.01 + (b[5] as f32) / 12800.0);
            b[0..2].copy_from_slice(&d.to_le_bytes());
            if format == BlockFormat::Q4_1 {
                b[2..4].copy_from_slice(&f16::from_f32(-0.1).to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn simd_kernels_match_dequantized_reference() {
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let nb = 18;
            let row = random_blocks(format, nb, 7);
            let x = rand_vec(nb * QK, 11);
            let mut xq = vec![Q8Act::default(); nb];
            quantize_act(&x, &mut xq);
            let mut w = vec![0f32; nb * QK];
            dequant_row(format, &row, &mut w);
            let exact: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
            let fast = dot_q(format, &row, &xq);
            let scalar = dot_q_scalar(format, &row, &xq);
            assert!(
                (fast - scalar).abs() < 1e-3,
                "{format:?}: {fast} vs {scalar}"
            );
            let scale: f32 = w.iter().map(|a| a.abs()).sum::<f32>() / nb as f32;
            assert!(
                (fast - exact).abs() < 0.05 * scale.max(1.0),
                "{format:?}: {fast} vs exact {exact}"
            );
        }
    }

    #[test]
    fn tiles_are_bit_identical_to_single_dots() {
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let nb = 18;
            let row = random_blocks(format, nb, 3);
            let xq: Vec<Vec<Q8Act>> = (0..4)
                .map(|s| {
                    let mut q = vec![Q8Act::default(); nb];
                    quantize_act(&rand_vec(nb * QK, 20 + s), &mut q);
                    q
                })
                .collect();
            let tile = dot_q_tile::<4>(format, &row, [&xq[0], &xq[1], &xq[2], &xq[3]]);
            for (t, x) in xq.iter().enumerate() {
                assert_eq!(tile[t].to_bits(), dot_q(format, &row, x).to_bits(), "{format:?} token {t}");
            }
        }
    }

    #[test]
    fn f32_dot_matches_naive() {
        let a = rand_vec(581, 1);
        let b = rand_vec(581, 2);
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_f32(&a, &b) - naive).abs() < 1e-3);
    }
}
