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

/// Attention scores of a group of query heads that share a kv head:
/// `out[h·n + p] = q_h · key_p` for the `g` rows of `q` (`hd` each) and the `n`
/// cached keys at `keys[p·kd + off..][..hd]`. Each is exactly [`dot_f32_f16`]
/// of the two (the same bits); each key is converted once for the group, and
/// several positions run side by side (the dot's single accumulator is a
/// latency chain).
pub fn attention_dots(
    q: &[f32],
    g: usize,
    keys: &[f16],
    kd: usize,
    off: usize,
    n: usize,
    out: &mut [f32],
) {
    let hd = q.len() / g.max(1);
    let fits = g > 0
        && q.len() == g * hd
        && out.len() >= g * n
        && (n == 0 || (off + hd <= kd && keys.len() >= (n - 1) * kd + off + hd));
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    if fits {
        let mut h = 0;
        while h < g {
            let (qh, k, o) = (
                q[h * hd..].as_ptr(),
                keys[off..].as_ptr(),
                out[h * n..].as_mut_ptr(),
            );
            // SAFETY: the bounds were checked above (`fits`); features enabled
            // at compile time.
            unsafe {
                h += match g - h {
                    1 => avx2::dots_f16::<1>(qh, hd, k, kd, n, o),
                    2 => avx2::dots_f16::<2>(qh, hd, k, kd, n, o),
                    3 => avx2::dots_f16::<3>(qh, hd, k, kd, n, o),
                    _ => avx2::dots_f16::<4>(qh, hd, k, kd, n, o),
                };
            }
        }
        return;
    }
    let _ = fits;
    for h in 0..g {
        for p in 0..n {
            let lo = (p * kd + off).min(keys.len());
            let hi = (lo + hd).min(keys.len());
            if let (Some(o), Some(qh)) = (out.get_mut(h * n + p), q.get(h * hd..(h + 1) * hd)) {
                *o = dot_f32_f16(qh, &keys[lo..hi]);
            }
        }
    }
}

/// The attention outputs of a group of query heads that share a kv head:
/// `o_h += Σ_p w[h·n + p] · value_p` for the `g` rows of `o` (`hd` each) and
/// the `n` cached values at `vals[p·kd + off..][..hd]`. Each element is
/// accumulated in position order exactly as [`axpy_f16`] per position does
/// (the same bits), in registers rather than through memory, each value
/// converted once for the group.
pub fn attention_sum(
    w: &[f32],
    g: usize,
    vals: &[f16],
    kd: usize,
    off: usize,
    n: usize,
    o: &mut [f32],
) {
    let hd = o.len() / g.max(1);
    let fits = g > 0
        && o.len() == g * hd
        && w.len() >= g * n
        && (n == 0 || (off + hd <= kd && vals.len() >= (n - 1) * kd + off + hd));
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    if fits {
        let mut h = 0;
        while h < g {
            let (wh, v, oh) = (
                w[h * n..].as_ptr(),
                vals[off..].as_ptr(),
                o[h * hd..].as_mut_ptr(),
            );
            // SAFETY: as above.
            unsafe {
                h += match g - h {
                    1 => avx2::sum_f16::<1, 8>(wh, n, v, kd, hd, oh),
                    2 => avx2::sum_f16::<2, 4>(wh, n, v, kd, hd, oh),
                    3 => avx2::sum_f16::<3, 4>(wh, n, v, kd, hd, oh),
                    _ => avx2::sum_f16::<4, 3>(wh, n, v, kd, hd, oh),
                };
            }
        }
        return;
    }
    let _ = fits;
    for (h, oh) in o.chunks_exact_mut(hd.max(1)).enumerate().take(g) {
        for p in 0..n {
            let lo = (p * kd + off).min(vals.len());
            let hi = (lo + hd).min(vals.len());
            axpy_f16(oh, w.get(h * n + p).copied().unwrap_or(0.0), &vals[lo..hi]);
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

    /// [`super::attention_dots`] for `G` (at most 4) heads from `q`: returns `G`.
    /// `q` holds `G · hd` values, `k` the first key (`n` keys `kd` apart, `hd`
    /// each), `out` `G` rows of `n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_f16<const G: usize>(
        q: *const f32,
        hd: usize,
        k: *const half::f16,
        kd: usize,
        n: usize,
        out: *mut f32,
    ) -> usize {
        let mut p = 0;
        while p + 2 <= n {
            dots_at::<G, 2>(q, hd, k, kd, n, p, out);
            p += 2;
        }
        if p < n {
            dots_at::<G, 1>(q, hd, k, kd, n, p, out);
        }
        G
    }

    #[inline(always)]
    unsafe fn dots_at<const G: usize, const P: usize>(
        q: *const f32,
        hd: usize,
        k: *const half::f16,
        kd: usize,
        n: usize,
        p: usize,
        out: *mut f32,
    ) {
        let kp: [*const half::f16; P] = std::array::from_fn(|j| k.add((p + j) * kd));
        let mut acc = [[_mm256_setzero_ps(); P]; G];
        let mut i = 0;
        while i + 8 <= hd {
            let kv: [__m256; P] = std::array::from_fn(|j| {
                _mm256_cvtph_ps(_mm_loadu_si128(kp[j].add(i) as *const __m128i))
            });
            for (h, acc) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_ps(q.add(h * hd + i));
                for j in 0..P {
                    acc[j] = _mm256_fmadd_ps(qv, kv[j], acc[j]);
                }
            }
            i += 8;
        }
        for (h, acc) in acc.iter().enumerate() {
            for j in 0..P {
                let mut s = hsum(acc[j]);
                for t in i..hd {
                    s += *q.add(h * hd + t) * (*kp[j].add(t)).to_f32();
                }
                *out.add(h * n + p + j) = s;
            }
        }
    }

    /// [`super::attention_sum`] for `G` (at most 4) heads, `C` vectors of
    /// columns at a time (`G · C` accumulators): returns `G`. `w` holds `G`
    /// rows of `n` weights, `v` the first value (`n` values `kd` apart, `hd`
    /// each), `o` `G` rows of `hd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_f16<const G: usize, const C: usize>(
        w: *const f32,
        n: usize,
        v: *const half::f16,
        kd: usize,
        hd: usize,
        o: *mut f32,
    ) -> usize {
        let nv = hd / 8;
        let mut c0 = 0;
        while c0 < nv {
            let cn = C.min(nv - c0);
            let mut acc = [[_mm256_setzero_ps(); C]; G];
            for (h, acc) in acc.iter_mut().enumerate() {
                for (j, a) in acc.iter_mut().enumerate().take(cn) {
                    *a = _mm256_loadu_ps(o.add(h * hd + 8 * (c0 + j)));
                }
            }
            for p in 0..n {
                let vp = v.add(p * kd + 8 * c0);
                let x: [__m256; C] = std::array::from_fn(|j| {
                    if j < cn {
                        _mm256_cvtph_ps(_mm_loadu_si128(vp.add(8 * j) as *const __m128i))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                for (h, acc) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*w.add(h * n + p));
                    for j in 0..cn {
                        acc[j] = _mm256_fmadd_ps(wv, x[j], acc[j]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (j, a) in acc.iter().enumerate().take(cn) {
                    _mm256_storeu_ps(o.add(h * hd + 8 * (c0 + j)), *a);
                }
            }
            c0 += cn;
        }
        for t in 8 * nv..hd {
            for h in 0..G {
                for p in 0..n {
                    *o.add(h * hd + t) += *w.add(h * n + p) * (*v.add(p * kd + t)).to_f32();
                }
            }
        }
        G
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
