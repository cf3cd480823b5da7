//! GGUF block formats with native kernels, a plain reference dequantizer, and
//! the f16 KV-cache helpers used by attention. The weight × activation kernels
//! are in [`crate::kernels_f32`].

use half::f16;

/// Elements per quantization block (Q4_0, Q4_1, Q8_0).
pub const QK: usize = 32;

/// The block formats with native kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    /// Bytes per block as stored in GGUF.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Prefetch the cache line at `p` of a weight stream into L2 (`prefetcht1`).
///
/// Into L2 rather than L1: a core has few L1 miss buffers, and a request
/// into L2 does not hold one, so more lines are in flight at once. Measured on
/// an AMD EPYC (VNNI path, one stream): 110 → 156 decode tokens/s against
/// `prefetcht0` (BENCHMARKS.md, 2026-12-04).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(p as *const i8) }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(crate) fn prefetch(_p: *const u8) {}

/// Prefetch every cache line of `bytes` (the first rows of a job: the
/// kernels' own prefetches run a few tiles ahead of the row they compute).
#[inline]
pub(crate) fn prefetch_all(bytes: &[u8]) {
    for off in (0..bytes.len()).step_by(64) {
        prefetch(bytes.as_ptr().wrapping_add(off));
    }
}

#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Plain reference dequantization (ggml's definitions), for tests.
pub fn dequant_row_reference(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    for (b, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..16 {
            match format {
                BlockFormat::Q4_0 => {
                    o[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    o[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
                BlockFormat::Q4_1 => {
                    let m = f16_at(b, 2);
                    o[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    o[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
                BlockFormat::Q8_0 => {
                    o[j] = b[2 + j] as i8 as f32 * d;
                    o[j + 16] = b[18 + j] as i8 as f32 * d;
                }
            }
        }
    }
}

/// f32 · f16 dot product (query against the f16 KV cache).
#[inline]
pub fn dot_f32_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        // SAFETY: features enabled at compile time; bounded by the shorter slice.
        unsafe { avx2::dot_f32_f16(a, b) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
    }
}

/// `out += w * v` with `v` in f16.
#[inline]
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        // SAFETY: as above.
        unsafe { avx2::axpy_f16(out, w, v) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x.to_f32();
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 lanes in a fixed order.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_helpers_match_naive() {
        let a: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f16> = (0..67)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y.to_f32()).sum();
        assert!((dot_f32_f16(&a, &b) - naive).abs() < 1e-4);
        let mut out = a.clone();
        axpy_f16(&mut out, 0.5, &b);
        for i in 0..67 {
            assert!((out[i] - (a[i] + 0.5 * b[i].to_f32())).abs() < 1e-6);
        }
    }
}
