//! f32-activation kernels: quantized weight rows are expanded to f32 (exactly:
//! `q * d + m` with one fused multiply-add per weight) and multiplied with
//! unquantized activations. Each output is one 8-lane FMA accumulator over the
//! row followed by a fixed horizontal sum, whatever the register tile, so results
//! are bit-identical for any batch size.

use crate::kernels::{BlockFormat, QK};
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
use half::f16;

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
)))]
#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Expand one quantized row to f32 with the same arithmetic on every path
/// (`k` the model's path).
pub fn dequant_row(k: Kernels, format: BlockFormat, row: &[u8], out: &mut [f32]) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        if k.wide() {
            // SAFETY: AVX-512F/BW present and enabled by the OS (checked by `detect`).
            return unsafe { avx512::dequant_row(format, row, out) };
        }
        // SAFETY: features enabled at compile time; `out` holds a whole row.
        unsafe { avx2::dequant_row(format, row, out) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = k; // one path without AVX2
        let bb = format.block_bytes();
        for (b, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            let d = f16_at(b, 0);
            let nib = |base: usize, j: usize| {
                (if j < 16 {
                    b[base + j] & 15
                } else {
                    b[base + j - 16] >> 4
                }) as f32
            };
            for (j, v) in o.iter_mut().enumerate() {
                *v = match format {
                    BlockFormat::Q4_0 => nib(2, j).mul_add(d, -8.0 * d),
                    BlockFormat::Q4_1 => nib(4, j).mul_add(d, f16_at(b, 2)),
                    BlockFormat::Q8_0 => b[2 + j] as i8 as f32 * d,
                };
            }
        }
    }
}

/// `rows[r] · x` for R rows without materialising them in f32: bit-identical to
/// `dequant_row` followed by `tile` (same per-lane FMAs in the same order). R
/// independent accumulator chains hide the FMA latency of a single dot.
#[inline]
pub fn dot_rows<const R: usize>(
    k: Kernels,
    format: BlockFormat,
    rows: [&[u8]; R],
    x: &[f32],
) -> [f32; R] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        if k.wide() {
            // SAFETY: as in `dequant_row`; bounded by all lengths.
            return unsafe {
                match format {
                    BlockFormat::Q4_0 => avx512::dot_rows::<avx512::Q40, R>(rows, x),
                    BlockFormat::Q4_1 => avx512::dot_rows::<avx512::Q41, R>(rows, x),
                    BlockFormat::Q8_0 => avx512::dot_rows::<avx512::Q80, R>(rows, x),
                }
            };
        }
        // SAFETY: features enabled at compile time; bounded by all lengths.
        unsafe {
            match format {
                BlockFormat::Q4_0 => avx2::dot_rows::<avx2::Q40, R>(rows, x),
                BlockFormat::Q4_1 => avx2::dot_rows::<avx2::Q41, R>(rows, x),
                BlockFormat::Q8_0 => avx2::dot_rows::<avx2::Q80, R>(rows, x),
            }
        }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        rows.map(|row| {
            let mut w = vec![0f32; x.len()];
            dequant_row(k, format, row, &mut w);
            let [[v]] = tile::<1, 1>(k, [&w], [x]);
            v
        })
    }
}

/// `out[r][t] = w[r] · x[t]` for a register tile of R rows × N tokens.
#[inline]
pub fn tile<const R: usize, const N: usize>(
    k: Kernels,
    w: [&[f32]; R],
    x: [&[f32]; N],
) -> [[f32; N]; R] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        if k.wide() {
            // SAFETY: as in `dequant_row`; lengths are checked inside.
            return unsafe { avx512::tile(w, x) };
        }
        // SAFETY: features enabled at compile time; lengths are checked inside.
        unsafe { avx2::tile(w, x) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        let _ = k; // one path without AVX2
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                out[r][t] = w[r].iter().zip(x[t]).map(|(a, b)| a * b).sum();
            }
        }
        out
    }
}

/// Which weight × activation kernels run on this machine: chosen once, at the
/// first use, from what the CPU reports *and* the OS enables (std's detection
/// reads XCR0: a CPU flag alone is not enough), or chosen with the setting
/// `engine.kernels` ([`choose`]) or `RETUNE_KERNELS` ([`KERNEL_CHOICES`]). Within one machine every path gives
/// bit-identical results for any batch size (each output is one accumulator of
/// the path's width over the row, then a fixed horizontal sum). The f32 paths
/// differ from each other in the last bits; the int8 path, which rounds each
/// activation block to 8 bits as llama.cpp does, by that rounding (≈ 0.5%).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Plain Rust (builds without AVX2).
    Portable,
    /// 8-lane FMA (the x86-64-v3 build's baseline).
    Avx2,
    /// AVX2 with int8 activations: the grouped layout's arithmetic through
    /// `vpmaddubsw` + `vpmaddwd` ([`crate::kernels_q8`]), bit-identical to the
    /// VNNI path; f32 weights and dequantization as [`KernelPath::Avx2`].
    Avx2Int8,
    /// 16-lane FMA (AVX-512F/BW).
    Avx512,
    /// AVX-512 with VNNI: quantized weights against int8 activations
    /// ([`crate::kernels_q8`], llama.cpp's Q8_1 scheme); f32 weights and
    /// dequantization as [`KernelPath::Avx512`].
    Avx512Vnni,
}

impl KernelPath {
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "AVX2",
            Self::Avx2Int8 => "AVX2 (int8 activations)",
            Self::Avx512 => "AVX-512",
            Self::Avx512Vnni => "AVX-512 VNNI (int8 activations)",
        }
    }

    /// The path's name in `engine.kernels` and `RETUNE_KERNELS` (and in the
    /// `retune_engine_kernels_info` metric).
    pub fn key(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx2Int8 => "avx2int8",
            Self::Avx512 => "avx512",
            Self::Avx512Vnni => "avx512vnni",
        }
    }

    /// The 16-lane f32 kernels run on this path.
    #[inline]
    pub fn wide(self) -> bool {
        matches!(self, Self::Avx512 | Self::Avx512Vnni)
    }

    /// Quantized weights meet int8 activations on this path.
    #[inline]
    pub fn int8(self) -> bool {
        matches!(self, Self::Avx512Vnni | Self::Avx2Int8)
    }
}

/// A kernel path this machine runs, checked when it is made: what every
/// kernel takes, so that a model carries its own path (the int8 paths pack its
/// weights for it) and nothing reads a process-wide setting while it computes.
/// The only ways to make one check the CPU and the OS, which is what makes the
/// kernels' `unsafe` feature-gated calls sound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels(KernelPath);

impl Kernels {
    /// `p`, if this machine runs it.
    pub fn new(p: KernelPath) -> Result<Self, String> {
        if available_paths().contains(&p) {
            Ok(Self(p))
        } else {
            Err(format!(
                "kernel path {} is not available on this machine",
                p.name()
            ))
        }
    }

    /// The path `choice` (one of [`KERNEL_CHOICES`]) names on this machine;
    /// `auto` (or empty) is the process default ([`Kernels::process_default`]).
    pub fn choose(choice: &str) -> Result<Self, String> {
        if choice.is_empty() || choice == "auto" {
            return Ok(Self::process_default());
        }
        resolve(choice, &available_paths()).map(Self)
    }

    /// The default for models built now: `RETUNE_KERNELS`, else the machine's
    /// best, unless [`set_path`] changed it.
    pub fn process_default() -> Self {
        Self(path())
    }

    /// The best path of this machine that keeps activations in f32.
    pub fn best_f32() -> Self {
        Self(best_f32_path())
    }

    pub fn path(self) -> KernelPath {
        self.0
    }

    /// The 16-lane f32 kernels run on this path.
    #[inline]
    pub fn wide(self) -> bool {
        self.0.wide()
    }

    /// Quantized weights meet int8 activations on this path.
    #[inline]
    pub fn int8(self) -> bool {
        self.0.int8()
    }
}

static PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn code(p: KernelPath) -> u8 {
    match p {
        KernelPath::Portable => 1,
        KernelPath::Avx2 => 2,
        KernelPath::Avx512 => 3,
        KernelPath::Avx512Vnni => 4,
        KernelPath::Avx2Int8 => 5,
    }
}

/// The paths this machine can run, the default (the best) last.
pub fn available_paths() -> Vec<KernelPath> {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        // the int8 paths on the grouped layout decode, prefill and batch
        // faster than the f32 paths, AVX-512's included (BENCHMARKS.md,
        // "grouped layout", 2026-12-06): VNNI is the default, else AVX2 int8
        let mut v = vec![KernelPath::Avx2];
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw");
        if avx512 {
            v.push(KernelPath::Avx512);
        }
        v.push(KernelPath::Avx2Int8);
        if avx512
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            v.push(KernelPath::Avx512Vnni);
        }
        v
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    {
        vec![KernelPath::Portable]
    }
}

/// What `engine.kernels` (and `RETUNE_KERNELS`) may name: `auto` (the best
/// path of the machine: VNNI, else AVX2 int8), `int8` (the best path with
/// int8 activations, the same), `f32` (the best path with f32 activations),
/// or one path by name.
pub use retune_config::KERNEL_CHOICES;

/// The path `choice` (one of [`KERNEL_CHOICES`]) names among `avail` (a
/// machine's paths, the best last); an error says why there is none.
pub fn resolve(choice: &str, avail: &[KernelPath]) -> Result<KernelPath, String> {
    let best = |f: &dyn Fn(&KernelPath) -> bool| avail.iter().rev().copied().find(|p| f(p));
    let named = match choice {
        "" | "auto" => best(&|_| true),
        "int8" => best(&|p| p.int8()),
        "f32" => best(&|p| !p.int8()),
        // the rest of the choices name one path each
        c if KERNEL_CHOICES.contains(&c) => best(&|p| p.key() == c),
        other => {
            return Err(format!(
                "`{other}` is not a kernel choice ({})",
                KERNEL_CHOICES.join(", ")
            ))
        }
    };
    named.ok_or_else(|| {
        format!(
            "`{choice}`: this CPU (or its OS) has no such kernel path; it has {}",
            names(avail)
        )
    })
}

/// `paths`' names, comma-separated.
fn names(paths: &[KernelPath]) -> String {
    paths
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

fn detect() -> KernelPath {
    let avail = available_paths();
    let best = *avail.last().unwrap_or(&KernelPath::Portable);
    let choice = std::env::var("RETUNE_KERNELS").unwrap_or_default();
    resolve(&choice, &avail).unwrap_or_else(|_| {
        eprintln!(
            "retune: RETUNE_KERNELS={choice} is not available here ({}); using {}",
            names(&avail),
            best.name()
        );
        best
    })
}

/// Choose the default path for models built from now on from a setting (see
/// [`resolve`]); `auto` keeps the default (chosen at first use from
/// `RETUNE_KERNELS`, else the machine's best, unless switched since). A model
/// keeps the path it was built with ([`Kernels`]). Returns the default.
pub fn choose(choice: &str) -> Result<KernelPath, String> {
    if choice.is_empty() || choice == "auto" {
        return Ok(path());
    }
    let p = resolve(choice, &available_paths())?;
    set_path(p)?;
    Ok(p)
}

/// The default path for models built now (chosen at first use).
#[inline]
pub fn path() -> KernelPath {
    match PATH.load(std::sync::atomic::Ordering::Relaxed) {
        1 => KernelPath::Portable,
        2 => KernelPath::Avx2,
        3 => KernelPath::Avx512,
        4 => KernelPath::Avx512Vnni,
        5 => KernelPath::Avx2Int8,
        _ => {
            let p = detect();
            PATH.store(code(p), std::sync::atomic::Ordering::Relaxed);
            p
        }
    }
}

/// The best path of this machine that keeps activations in f32 (for checks
/// against references that compute in f32 on the same dequantized weights).
pub fn best_f32_path() -> KernelPath {
    available_paths()
        .into_iter()
        .rev()
        .find(|p| !p.int8())
        .unwrap_or(KernelPath::Portable)
}

/// Set the default path for models built from now on (models built before
/// keep theirs). Refused for a path this machine cannot run.
pub fn set_path(p: KernelPath) -> Result<(), String> {
    if !available_paths().contains(&p) {
        return Err(format!(
            "kernel path {} is not available on this machine",
            p.name()
        ));
    }
    PATH.store(code(p), std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
pub(crate) mod avx512 {
    use super::{BlockFormat, QK};
    use std::arch::x86_64::*;

    /// 16 lanes summed in a fixed order: high and low halves, then the 8-lane sum.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m512) -> f32 {
        // the high half through the f64 view: `extractf32x8` needs AVX-512DQ
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let h = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
        crate::kernels::avx2::hsum(h)
    }

    /// Expands one block into two 16-lane f32 vectors (elements 0-15, 16-31).
    pub trait Fmt {
        const BYTES: usize;
        unsafe fn expand(b: *const u8) -> [__m512; 2];
    }
    pub struct Q40;
    pub struct Q41;
    pub struct Q80;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn nib2(q: *const u8, dv: __m512, mv: __m512) -> [__m512; 2] {
        let raw = _mm_loadu_si128(q as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let f = |b: __m128i| _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), dv, mv);
        [f(lo), f(hi)]
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn f16p(b: *const u8) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([*b, *b.add(1)])).to_f32()
    }

    impl Fmt for Q40 {
        const BYTES: usize = 18;
        #[inline]
        unsafe fn expand(b: *const u8) -> [__m512; 2] {
            let d = f16p(b);
            nib2(b.add(2), _mm512_set1_ps(d), _mm512_set1_ps(-8.0 * d))
        }
    }
    impl Fmt for Q41 {
        const BYTES: usize = 20;
        #[inline]
        unsafe fn expand(b: *const u8) -> [__m512; 2] {
            let (d, m) = (f16p(b), f16p(b.add(2)));
            nib2(b.add(4), _mm512_set1_ps(d), _mm512_set1_ps(m))
        }
    }
    impl Fmt for Q80 {
        const BYTES: usize = 34;
        #[inline]
        unsafe fn expand(b: *const u8) -> [__m512; 2] {
            let dv = _mm512_set1_ps(f16p(b));
            let f = |k: usize| {
                let q = _mm_loadu_si128(b.add(2 + 16 * k) as *const __m128i);
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), dv)
            };
            [f(0), f(1)]
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dot_rows<F: Fmt, const R: usize>(rows: [&[u8]; R], x: &[f32]) -> [f32; R] {
        let mut n = x.len() / QK;
        for r in &rows {
            n = n.min(r.len() / F::BYTES);
        }
        let mut acc = [_mm512_setzero_ps(); R];
        for i in 0..n {
            let xp = x.as_ptr().add(i * QK);
            let xv = [_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))];
            for r in 0..R {
                let p = rows[r].as_ptr().add(i * F::BYTES);
                crate::kernels::prefetch(p.wrapping_add(2 * R * rows[r].len()));
                let w = F::expand(p);
                acc[r] = _mm512_fmadd_ps(w[0], xv[0], acc[r]);
                acc[r] = _mm512_fmadd_ps(w[1], xv[1], acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dequant_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
        match format {
            BlockFormat::Q4_0 => dequant::<Q40>(row, out),
            BlockFormat::Q4_1 => dequant::<Q41>(row, out),
            BlockFormat::Q8_0 => dequant::<Q80>(row, out),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn dequant<F: Fmt>(row: &[u8], out: &mut [f32]) {
        let n = (row.len() / F::BYTES).min(out.len() / QK);
        for i in 0..n {
            let p = row.as_ptr().add(i * F::BYTES);
            crate::kernels::prefetch(p.wrapping_add(4 * row.len()));
            let w = F::expand(p);
            let o = out.as_mut_ptr().add(i * QK);
            _mm512_storeu_ps(o, w[0]);
            _mm512_storeu_ps(o.add(16), w[1]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn tile<const R: usize, const N: usize>(
        w: [&[f32]; R],
        x: [&[f32]; N],
    ) -> [[f32; N]; R] {
        let mut len = usize::MAX;
        for s in w.iter().chain(x.iter()) {
            len = len.min(s.len());
        }
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        let mut k = 0;
        while k + 16 <= len {
            let mut xv = [_mm512_setzero_ps(); N];
            for t in 0..N {
                xv[t] = _mm512_loadu_ps(x[t].as_ptr().add(k));
            }
            for r in 0..R {
                let wv = _mm512_loadu_ps(w[r].as_ptr().add(k));
                for t in 0..N {
                    acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            k += 16;
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                let mut s = hsum(acc[r][t]);
                for j in k..len {
                    s += w[r].get_unchecked(j) * x[t].get_unchecked(j);
                }
                out[r][t] = s;
            }
        }
        out
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use super::{BlockFormat, QK};
    use crate::kernels::avx2::hsum;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16p(b: *const u8) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([*b, *b.add(1)])).to_f32()
    }

    /// Expands one block into four 8-lane f32 vectors (elements 0-7, 8-15, 16-23, 24-31).
    pub trait Fmt {
        const BYTES: usize;
        unsafe fn expand(b: *const u8) -> [__m256; 4];
    }
    pub struct Q40;
    pub struct Q41;
    pub struct Q80;

    #[inline(always)]
    unsafe fn nib4(q: *const u8, dv: __m256, mv: __m256) -> [__m256; 4] {
        let raw = _mm_loadu_si128(q as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let f = |b: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), dv, mv);
        [
            f(lo),
            f(_mm_srli_si128(lo, 8)),
            f(hi),
            f(_mm_srli_si128(hi, 8)),
        ]
    }
    impl Fmt for Q40 {
        const BYTES: usize = 18;
        #[inline(always)]
        unsafe fn expand(b: *const u8) -> [__m256; 4] {
            let d = f16p(b);
            nib4(b.add(2), _mm256_set1_ps(d), _mm256_set1_ps(-8.0 * d))
        }
    }
    impl Fmt for Q41 {
        const BYTES: usize = 20;
        #[inline(always)]
        unsafe fn expand(b: *const u8) -> [__m256; 4] {
            // d and m are adjacent f16s: convert both with one instruction
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
            nib4(
                b.add(4),
                _mm256_broadcastss_ps(dm),
                _mm256_broadcastss_ps(_mm_movehdup_ps(dm)),
            )
        }
    }
    impl Fmt for Q80 {
        const BYTES: usize = 34;
        #[inline(always)]
        unsafe fn expand(b: *const u8) -> [__m256; 4] {
            let dv = _mm256_set1_ps(f16p(b));
            let f = |k: usize| {
                let q = _mm_loadl_epi64(b.add(2 + 8 * k) as *const __m128i);
                _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), dv)
            };
            [f(0), f(1), f(2), f(3)]
        }
    }

    #[inline(always)]
    pub unsafe fn dot_rows<F: Fmt, const R: usize>(rows: [&[u8]; R], x: &[f32]) -> [f32; R] {
        let mut n = x.len() / QK;
        for r in &rows {
            n = n.min(r.len() / F::BYTES);
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for i in 0..n {
            let xp = x.as_ptr().add(i * QK);
            let xv = [
                _mm256_loadu_ps(xp),
                _mm256_loadu_ps(xp.add(8)),
                _mm256_loadu_ps(xp.add(16)),
                _mm256_loadu_ps(xp.add(24)),
            ];
            for r in 0..R {
                let p = rows[r].as_ptr().add(i * F::BYTES);
                // Rows are contiguous: touch the same block R rows further on, so
                // the next group's weights stream in while this group computes.
                crate::kernels::prefetch(p.wrapping_add(2 * R * rows[r].len()));
                let w = F::expand(p);
                for k in 0..4 {
                    acc[r] = _mm256_fmadd_ps(w[k], xv[k], acc[r]);
                }
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        out
    }

    pub unsafe fn dequant_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
        match format {
            BlockFormat::Q4_0 => dequant::<Q40>(row, out),
            BlockFormat::Q4_1 => dequant::<Q41>(row, out),
            BlockFormat::Q8_0 => dequant::<Q80>(row, out),
        }
    }

    unsafe fn dequant<F: Fmt>(row: &[u8], out: &mut [f32]) {
        let n = (row.len() / F::BYTES).min(out.len() / QK);
        for i in 0..n {
            let p = row.as_ptr().add(i * F::BYTES);
            // the batched path expands four rows at a time: fetch four rows ahead
            crate::kernels::prefetch(p.wrapping_add(4 * row.len()));
            let w = F::expand(p);
            let o = out.as_mut_ptr().add(i * QK);
            for (k, v) in w.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * k), *v);
            }
        }
    }

    #[inline(always)]
    pub unsafe fn tile<const R: usize, const N: usize>(
        w: [&[f32]; R],
        x: [&[f32]; N],
    ) -> [[f32; N]; R] {
        let mut len = usize::MAX;
        for s in w.iter().chain(x.iter()) {
            len = len.min(s.len());
        }
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        let mut k = 0;
        while k + 8 <= len {
            let mut xv = [_mm256_setzero_ps(); N];
            for t in 0..N {
                xv[t] = _mm256_loadu_ps(x[t].as_ptr().add(k));
            }
            for r in 0..R {
                let wv = _mm256_loadu_ps(w[r].as_ptr().add(k));
                for t in 0..N {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            k += 8;
        }
        let mut out = [[0f32; N]; R];
        for r in 0..R {
            for t in 0..N {
                let mut s = hsum(acc[r][t]);
                for j in k..len {
                    s += w[r].get_unchecked(j) * x[t].get_unchecked(j);
                }
                out[r][t] = s;
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::{self, BlockFormat};

    /// The settings' names pick the paths they say, on an AVX2-only machine
    /// and on one with VNNI; a path the machine lacks or an unknown name is
    /// an error that says what the machine has.
    #[test]
    fn kernel_choices_resolve_against_the_machine() {
        use KernelPath::*;
        let avx2_only = [Avx2, Avx2Int8];
        let vnni = [Avx2, Avx512, Avx2Int8, Avx512Vnni];
        for (choice, on_avx2, on_vnni) in [
            ("auto", Ok(Avx2Int8), Ok(Avx512Vnni)),
            ("", Ok(Avx2Int8), Ok(Avx512Vnni)),
            ("int8", Ok(Avx2Int8), Ok(Avx512Vnni)),
            ("f32", Ok(Avx2), Ok(Avx512)),
            ("avx2", Ok(Avx2), Ok(Avx2)),
            ("avx2int8", Ok(Avx2Int8), Ok(Avx2Int8)),
            ("avx512", Err(()), Ok(Avx512)),
            ("avx512vnni", Err(()), Ok(Avx512Vnni)),
            ("amx", Err(()), Err(())),
        ] {
            let got = |avail: &[KernelPath]| resolve(choice, avail).map_err(|_| ());
            assert_eq!(got(&avx2_only), on_avx2, "{choice} on AVX2");
            assert_eq!(got(&vnni), on_vnni, "{choice} on VNNI");
        }
        let err = resolve("avx512", &avx2_only).unwrap_err();
        assert!(err.contains("AVX2, AVX2 (int8 activations)"), "{err}");
        let err = resolve("fastest", &vnni).unwrap_err();
        assert!(err.contains("auto, int8, f32"), "{err}");
        assert_eq!(
            resolve("int8", &[Portable]),
            Err("`int8`: this CPU (or its OS) has no such kernel path; it has portable".into())
        );
        for c in KERNEL_CHOICES {
            assert!(resolve(c, &vnni).is_ok(), "{c}");
        }
    }

    /// Tests that switch the process's path hold this (nextest runs each test
    /// in its own process; `cargo test` runs them on threads of one).
    pub(crate) static PATH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `choose` switches the process's path (and `auto` keeps it).
    #[test]
    fn choose_sets_the_process_path() {
        let _one = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = path();
        for p in available_paths() {
            if p == KernelPath::Portable {
                continue;
            }
            assert_eq!(choose(p.key()), Ok(p));
            assert_eq!(path(), p);
            assert_eq!(choose("auto"), Ok(p), "auto keeps the path chosen");
        }
        if available_paths().iter().any(|p| p.int8()) {
            let p = choose("int8").unwrap();
            assert!(p.int8() && path() == p, "{}", p.name());
        }
        assert!(choose("nonsense").is_err());
        set_path(before).unwrap();
    }

    pub(crate) fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    /// Every path this machine has, each against itself (bit-exact across
    /// tiles and fused dots) and against the plain reference; the paths
    /// against each other within rounding. Tests run one per process
    /// (nextest), so switching the global path here touches no other test.
    #[test]
    fn every_available_path_is_self_consistent_and_agrees_with_the_others() {
        let _one = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let paths = available_paths();
        let mut results = Vec::new();
        for p in &paths {
            set_path(*p).unwrap();
            assert_eq!(path(), *p);
            results.push(fused_dot_tiles_and_reference_agree(
                Kernels::new(*p).unwrap(),
            ));
        }
        for r in &results[1..] {
            for (a, b) in r.iter().zip(&results[0]) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
        eprintln!("kernel paths checked: {paths:?}");
    }

    fn fused_dot_tiles_and_reference_agree(kp: Kernels) -> Vec<f32> {
        let mut seen = Vec::new();
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let nb = 18;
            let mut rows: Vec<Vec<u8>> = (0..2)
                .map(|s| rand_bytes(nb * format.block_bytes(), s))
                .collect();
            for row in rows.iter_mut() {
                for b in row.chunks_exact_mut(format.block_bytes()) {
                    b[0..2].copy_from_slice(&half::f16::from_f32(0.02).to_le_bytes());
                    if format == BlockFormat::Q4_1 {
                        b[2..4].copy_from_slice(&half::f16::from_f32(-0.1).to_le_bytes());
                    }
                }
            }
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|s| {
                    rand_bytes(nb * QK, 9 + s)
                        .iter()
                        .map(|&b| b as f32 / 128.0 - 1.0)
                        .collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = rows
                .iter()
                .map(|r| {
                    let mut w = vec![0f32; nb * QK];
                    dequant_row(kp, format, r, &mut w);
                    w
                })
                .collect();
            // dequantization agrees with the plain reference
            let mut reference = vec![0f32; nb * QK];
            kernels::dequant_row_reference(format, &rows[0], &mut reference);
            for (a, b) in w[0].iter().zip(&reference) {
                assert!((a - b).abs() < 1e-6, "{format:?}: {a} vs {b}");
            }
            let t = tile::<2, 4>(kp, [&w[0], &w[1]], [&xs[0], &xs[1], &xs[2], &xs[3]]);
            let t43 = tile::<4, 3>(kp, [&w[0], &w[1], &w[1], &w[0]], [&xs[1], &xs[2], &xs[3]]);
            for k in 0..4 {
                let four =
                    dot_rows::<4>(kp, format, [&rows[0], &rows[1], &rows[0], &rows[1]], &xs[k]);
                assert_eq!(
                    four.map(f32::to_bits),
                    [t[0][k], t[1][k], t[0][k], t[1][k]].map(f32::to_bits)
                );
                let [[a], [b], _, _] = tile::<4, 1>(kp, [&w[0], &w[1], &w[0], &w[1]], [&xs[k]]);
                assert_eq!(
                    [a.to_bits(), b.to_bits()],
                    [t[0][k].to_bits(), t[1][k].to_bits()]
                );
                if k > 0 {
                    assert_eq!(t43[0][k - 1].to_bits(), t[0][k].to_bits());
                    assert_eq!(t43[2][k - 1].to_bits(), t[1][k].to_bits());
                }
            }
            for r in 0..2 {
                for k in 0..4 {
                    let [fused] = dot_rows::<1>(kp, format, [&rows[r]], &xs[k]);
                    assert_eq!(
                        fused.to_bits(),
                        t[r][k].to_bits(),
                        "{format:?} row {r} token {k}"
                    );
                    let naive: f32 = w[r].iter().zip(&xs[k]).map(|(a, b)| a * b).sum();
                    assert!((fused - naive).abs() < 1e-3);
                    seen.push(fused);
                }
            }
            // a length that is not a multiple of either width takes the tail
            let odd = tile::<1, 1>(kp, [&w[0][..QK * nb - 5]], [&xs[0][..QK * nb - 5]]);
            let naive: f32 = w[0][..QK * nb - 5]
                .iter()
                .zip(&xs[0])
                .map(|(a, b)| a * b)
                .sum();
            assert!((odd[0][0] - naive).abs() < 1e-3);
            seen.push(odd[0][0]);
        }
        seen
    }
}
