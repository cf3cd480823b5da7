//! The int8 paths' kernels: int8 activations against quantized weights
//! ([`KernelPath::Avx512Vnni`], [`KernelPath::Avx2Int8`]).
//!
//! Activations are quantized per 32-element block as llama.cpp's Q8_1 does:
//! `d = max|x| / 127`, `q = round(x / d)` (ties to even), `s = d · Σq`.
//! Quantized weights are repacked once per linear into the form `vpdpbusd`
//! reads ([`Packed`]): one unsigned byte per element (a 4-bit value or an
//! 8-bit value plus 128), with the block's f16 scale `d` and offset `m`, so
//! `w · x ≈ Σ_b d_b·dx_b·Σ(u·q) + m_b·s_b` for every format:
//! - Q4_0: `u = q4`, `m = −8d`;
//! - Q4_1: `u = q4`, `m` = the block's minimum;
//! - Q8_0: `u = q8 + 128`, `m = −128d`
//!
//! (for Q4_0 and Q8_0 the record stores `d` and [`Packed::m_scale`] applies the
//! factor to the offsets' dot).
//!
//! Two layouts, each with its own arithmetic (a weight keeps the layout it was
//! packed in, and the kernels follow the layout):
//! - groups of 8 rows ([`pack_grouped`]), what both int8 paths pack: lanes
//!   are rows, each block's integer dot is exact (`vpmaddubsw` on AVX2,
//!   `vpdpbusd` with VNNI: the same bits), and the blocks add up in order
//!   ([`reference_grouped`] defines it);
//! - one record per row ([`pack_rows`], the int8 paths' layout before
//!   2026-12-06; [`pack_grouped`] reads it): its vector kernels went with it,
//!   and a weight in it is computed by its plain definition.
//!
//! Either way a row's operations do not depend on what else is in the
//! register tile, so results are bit-identical for any batch size, as on the
//! f32 paths.
//!
//! [`KernelPath::Avx512Vnni`]: crate::kernels_f32::KernelPath::Avx512Vnni
//! [`KernelPath::Avx2Int8`]: crate::kernels_f32::KernelPath::Avx2Int8

use crate::kernels::{BlockFormat, QK};
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
use crate::kernels_f32::{KernelPath, Kernels};
use half::f16;

/// A linear's weights in the compute form of the int8 kernels: one record
/// per row, rows back to back (one sequential stream for the prefetcher), each
/// record its values (`row_bytes`), then `nb` f16 scales `d`, then `nb` f16
/// offsets (GGUF's own f16 fields, so a record is no larger than the GGUF row:
/// decode streams every weight once per token, and bytes decide its speed).
/// Q4_1 stores its minimum `m`; Q4_0 and Q8_0 store `d` again, and `m_scale`
/// (−8, −128) turns it into their offset.
#[derive(Clone)]
pub struct Packed {
    pub rows: usize,
    /// Blocks per row.
    pub nb: usize,
    /// 4-bit values (two per byte) rather than bytes.
    pub nibbles: bool,
    /// Value bytes per row.
    pub row_bytes: usize,
    /// Bytes per row record: `row_bytes + 4 · nb`.
    pub stride: usize,
    /// Multiplies the stored offsets: 1 (Q4_1), −8 (Q4_0), −128 (Q8_0).
    pub m_scale: f32,
    /// Rows in groups of [`GROUP`] ([`pack_grouped`]'s layout, the int8
    /// paths' kernels and their arithmetic) rather than one record per row.
    pub grouped: bool,
    pub data: Vec<u8>,
}

/// Rows per group in the grouped layout.
pub const GROUP: usize = 8;

impl Packed {
    fn record(&self, r: usize) -> &[u8] {
        &self.data[r * self.stride..(r + 1) * self.stride]
    }
    /// Row `r`'s values (the row layout).
    fn vals(&self, r: usize) -> &[u8] {
        &self.record(r)[..self.row_bytes]
    }
    /// Block `b`'s scale and stored offset (before `m_scale`) in row `r`.
    pub fn dm(&self, r: usize, b: usize) -> (f32, f32) {
        let (d, m) = self.dm_bits(r, b);
        (
            f16::from_bits(u16::from_le_bytes(d)).to_f32(),
            f16::from_bits(u16::from_le_bytes(m)).to_f32(),
        )
    }
    /// Bytes of one group's block in the grouped layout: the values, then
    /// [`GROUP`] f16 scales, then [`GROUP`] f16 offsets.
    fn group_block(&self) -> usize {
        GROUP * (self.row_bytes / self.nb.max(1) + 4)
    }
    /// Element `j` of block `b` of row `r`, as the unsigned byte the kernels
    /// multiply (a 4-bit value, or an 8-bit value plus 128).
    pub fn elem(&self, r: usize, b: usize, j: usize) -> u8 {
        if !self.grouped {
            return value(self, self.vals(r), b, j);
        }
        let at = (r / GROUP * self.nb + b) * self.group_block();
        let k = r % GROUP;
        if self.nibbles {
            let byte = self.data[at + 32 * (j / 8) + 4 * k + j % 4];
            if j % 8 < 4 {
                byte & 0x0F
            } else {
                byte >> 4
            }
        } else {
            self.data[at + 32 * (j / 4) + 4 * k + j % 4]
        }
    }
}

impl Packed {
    /// Whether this is the form [`pack`] gives `rows × cols` weights of
    /// `format` (the kernels read by these fields, unchecked).
    pub fn fits(&self, format: BlockFormat, rows: usize, cols: usize) -> bool {
        let nibbles = format != BlockFormat::Q8_0;
        let nb = cols / QK;
        let row_bytes = nb * if nibbles { 16 } else { 32 };
        let m_scale = match format {
            BlockFormat::Q4_0 => -8.0,
            BlockFormat::Q4_1 => 1.0,
            BlockFormat::Q8_0 => -128.0,
        };
        cols % QK == 0
            && self.rows == rows
            && self.nb == nb
            && self.nibbles == nibbles
            && self.row_bytes == row_bytes
            && self.stride == row_bytes + 4 * nb
            && self.m_scale == m_scale
            && self.data.len()
                == if self.grouped {
                    rows.div_ceil(GROUP) * GROUP
                } else {
                    rows
                } * self.stride
    }

    /// Block `b`'s f16 scale and offset slots of row `r`, as stored.
    fn dm_bits(&self, r: usize, b: usize) -> ([u8; 2], [u8; 2]) {
        if self.grouped {
            let gb = self.group_block();
            let at = (r / GROUP * self.nb + b) * gb + gb - 4 * GROUP + 2 * (r % GROUP);
            let d = &self.data[at..];
            return ([d[0], d[1]], [d[2 * GROUP], d[2 * GROUP + 1]]);
        }
        let rec = self.record(r);
        let (i, j) = (self.row_bytes + 2 * b, self.row_bytes + 2 * (self.nb + b));
        ([rec[i], rec[i + 1]], [rec[j], rec[j + 1]])
    }

    /// Row `r` as f32, by GGUF's definition of `format` (the embedding lookup
    /// of a weight kept only in this form).
    pub fn dequant_row(&self, format: BlockFormat, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(QK).take(self.nb).enumerate() {
            let (d, m) = self.dm(r, b);
            for (j, o) in o.iter_mut().enumerate() {
                let u = self.elem(r, b, j);
                *o = match format {
                    BlockFormat::Q4_0 => (u as i32 - 8) as f32 * d,
                    BlockFormat::Q4_1 => u as f32 * d + m,
                    BlockFormat::Q8_0 => (u as i32 - 128) as f32 * d,
                };
            }
        }
    }

    /// The GGUF bytes this was packed from (`format` is the one it was packed
    /// with): packing loses nothing.
    pub fn unpack(&self, format: BlockFormat) -> Vec<u8> {
        let bb = format.block_bytes();
        let mut out = vec![0u8; self.rows * self.nb * bb];
        for (r, row) in out.chunks_exact_mut(self.nb * bb).enumerate() {
            for (b, blk) in row.chunks_exact_mut(bb).enumerate() {
                let (d, m) = self.dm_bits(r, b);
                blk[0..2].copy_from_slice(&d);
                let u = |j: usize| self.elem(r, b, j);
                match format {
                    BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                        let at = if format == BlockFormat::Q4_1 {
                            blk[2..4].copy_from_slice(&m);
                            4
                        } else {
                            2
                        };
                        for j in 0..16 {
                            blk[at + j] = u(j) | u(j + 16) << 4;
                        }
                    }
                    BlockFormat::Q8_0 => {
                        for j in 0..QK {
                            blk[2 + j] = u(j).wrapping_sub(128);
                        }
                    }
                }
            }
        }
        out
    }
}

/// Repack `rows` rows of GGUF blocks (`data`, `cols` elements each) for the
/// kernel path `k`: [`pack_grouped`] on the int8 paths, else [`pack_rows`].
pub fn pack(k: Kernels, format: BlockFormat, data: &[u8], rows: usize, cols: usize) -> Packed {
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let _ = k; // one path without AVX2
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if k.int8() {
        // both int8 paths run faster on it (BENCHMARKS.md, "grouped layout")
        return pack_grouped(format, data, rows, cols);
    }
    pack_rows(format, data, rows, cols)
}

/// Repack in groups of [`GROUP`] rows (the last padded with zero rows), for
/// the int8 kernels: for each group, block after block, the values of
/// its rows interleaved four elements at a time, so one 32-byte load holds
/// four elements of each of the 8 rows: Q4 formats store 4 × 32 bytes, byte
/// `4k + i` of part `c` = `e[k][8c + i] | e[k][8c + 4 + i] << 4` (row `k`);
/// Q8_0 stores 8 × 32 bytes, byte `4k + i` of part `c` = `e[k][4c + i] + 128`.
/// Then the rows' 8 f16 scales, then their 8 f16 offsets (as in [`pack_rows`]).
pub fn pack_grouped(format: BlockFormat, data: &[u8], rows: usize, cols: usize) -> Packed {
    let by_row = pack_rows(format, data, rows, cols);
    let mut g = Packed {
        grouped: true,
        data: vec![0u8; rows.div_ceil(GROUP) * GROUP * by_row.stride],
        ..by_row.clone_empty()
    };
    let gb = g.group_block();
    let vb = gb - 4 * GROUP;
    for r in 0..rows {
        let k = r % GROUP;
        for b in 0..g.nb {
            let at = (r / GROUP * g.nb + b) * gb;
            for j in 0..QK {
                let u = by_row.elem(r, b, j);
                if g.nibbles {
                    let i = at + 32 * (j / 8) + 4 * k + j % 4;
                    g.data[i] |= if j % 8 < 4 { u } else { u << 4 };
                } else {
                    g.data[at + 32 * (j / 4) + 4 * k + j % 4] = u;
                }
            }
            let (d, m) = by_row.dm_bits(r, b);
            g.data[at + vb + 2 * k..at + vb + 2 * k + 2].copy_from_slice(&d);
            let mo = at + vb + 2 * GROUP + 2 * k;
            g.data[mo..mo + 2].copy_from_slice(&m);
        }
    }
    g
}

impl Packed {
    /// The same fields without the bytes.
    fn clone_empty(&self) -> Packed {
        Packed {
            data: Vec::new(),
            ..*self
        }
    }
}

/// Repack in one record per row (the int8 paths' layout before the grouped
/// one; [`pack_grouped`] starts from it).
///
/// Layout of a row's values: for each pair of blocks (64 elements `e`), Q4
/// formats store 32 bytes, byte `j` = `e[j] | e[32 + j] << 4`; Q8_0 stores the
/// 64 bytes `e + 128`. A last unpaired block keeps GGUF's own nibble order (16
/// bytes, elements `j` and `16 + j` in byte `j`) or its 32 bytes `+ 128`.
pub fn pack_rows(format: BlockFormat, data: &[u8], rows: usize, cols: usize) -> Packed {
    let nb = cols / QK;
    let bb = format.block_bytes();
    let nibbles = format != BlockFormat::Q8_0;
    let row_bytes = if nibbles { nb * 16 } else { nb * 32 };
    let stride = row_bytes + 4 * nb;
    let mut data_out = vec![0u8; rows * stride];
    // element values of one block, as unsigned bytes
    let elems = |b: &[u8]| -> [u8; QK] {
        let mut e = [0u8; QK];
        match format {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let qs = if format == BlockFormat::Q4_0 {
                    &b[2..18]
                } else {
                    &b[4..20]
                };
                for j in 0..16 {
                    e[j] = qs[j] & 0x0F;
                    e[j + 16] = qs[j] >> 4;
                }
            }
            BlockFormat::Q8_0 => {
                for j in 0..QK {
                    e[j] = (b[2 + j] as i8 as i16 + 128) as u8;
                }
            }
        }
        e
    };
    for r in 0..rows {
        let row = &data[r * nb * bb..(r + 1) * nb * bb];
        let (out, dm) = data_out[r * stride..(r + 1) * stride].split_at_mut(row_bytes);
        for b in 0..nb {
            let blk = &row[b * bb..(b + 1) * bb];
            dm[2 * b..2 * b + 2].copy_from_slice(&blk[0..2]);
            let m = if format == BlockFormat::Q4_1 {
                &blk[2..4]
            } else {
                &blk[0..2]
            };
            dm[2 * (nb + b)..2 * (nb + b) + 2].copy_from_slice(m);
        }
        let pairs = nb / 2;
        for p in 0..pairs {
            let mut e = [0u8; 2 * QK];
            e[..QK].copy_from_slice(&elems(&row[2 * p * bb..(2 * p + 1) * bb]));
            e[QK..].copy_from_slice(&elems(&row[(2 * p + 1) * bb..(2 * p + 2) * bb]));
            if nibbles {
                let o = &mut out[p * 32..(p + 1) * 32];
                for j in 0..32 {
                    o[j] = e[j] | (e[32 + j] << 4);
                }
            } else {
                out[p * 64..(p + 1) * 64].copy_from_slice(&e);
            }
        }
        if nb % 2 == 1 {
            let e = elems(&row[(nb - 1) * bb..nb * bb]);
            if nibbles {
                let o = &mut out[pairs * 32..pairs * 32 + 16];
                for j in 0..16 {
                    o[j] = e[j] | (e[16 + j] << 4);
                }
            } else {
                out[pairs * 64..pairs * 64 + 32].copy_from_slice(&e);
            }
        }
    }
    Packed {
        rows,
        nb,
        nibbles,
        row_bytes,
        stride,
        m_scale: match format {
            BlockFormat::Q4_0 => -8.0,
            BlockFormat::Q4_1 => 1.0,
            BlockFormat::Q8_0 => -128.0,
        },
        grouped: false,
        data: data_out,
    }
}

/// `t` activation rows quantized per block: `q` (`t × cols` bytes), the
/// scales `d` and the sums `s = d·Σq` (`t × cols/32` each).
pub struct QuantX {
    pub cols: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
}

impl QuantX {
    /// `t` rows of `cols` zeros, to be filled by a quantizer.
    fn zeroed(t: usize, cols: usize) -> Self {
        let nb = cols / QK;
        QuantX {
            cols,
            q: vec![0; t * cols],
            d: vec![0.0; t * nb],
            s: vec![0.0; t * nb],
        }
    }
}

/// The plain definition of the activation quantization (the kernels' is
/// vectorized and gives the same bytes, scales and sums).
pub fn quantize_reference(x: &[f32], cols: usize) -> QuantX {
    let (t, nb) = (x.len() / cols.max(1), cols / QK);
    let mut out = QuantX::zeroed(t, cols);
    for (bi, blk) in x.chunks_exact(QK).enumerate().take(t * nb) {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (j, v) in blk.iter().enumerate() {
            let q = (v * id).round_ties_even() as i32;
            out.q[bi * QK + j] = q as i8;
            sum += q;
        }
        out.d[bi] = d;
        out.s[bi] = d * sum as f32;
    }
    out
}

/// Quantize `t = x.len() / cols` rows (`cols` a multiple of 32) with the
/// kernels of path `k`.
pub fn quantize(k: Kernels, x: &[f32], cols: usize) -> QuantX {
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let _ = k; // one path without AVX2
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        // SAFETY: each int8 path is only chosen where the CPU reports its
        // features and the OS enables them (AVX2 is the build's baseline).
        match k.path() {
            KernelPath::Avx512Vnni => return unsafe { vnni::quantize(x, cols) },
            KernelPath::Avx2Int8 => return unsafe { avx2q::quantize(x, cols) },
            _ => {}
        }
    }
    quantize_reference(x, cols)
}

/// `out[t][r]` for rows `r0..r1` of `w` against every row of `x`, through
/// `put(token, row, value)`: on the grouped layout (what the int8 paths
/// pack) the VNNI or AVX2 kernels; on the row layout, and without AVX2, the
/// plain (slow) definitions.
pub fn rows_times_tokens(
    k: Kernels,
    w: &Packed,
    x: &QuantX,
    r0: usize,
    r1: usize,
    put: impl FnMut(usize, usize, f32),
) {
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let _ = k; // one path without AVX2
    if w.grouped {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
        // SAFETY: AVX2 is the build's baseline; every index is checked
        // against `w` and `x`.
        return unsafe {
            if k.path() == KernelPath::Avx512Vnni {
                avx2q::groups_times_tokens_vnni(w, x, r0, r1, put)
            } else {
                avx2q::groups_times_tokens(w, x, r0, r1, put)
            }
        };
        #[allow(unreachable_code)]
        return reference_grouped(w, x, r0, r1, put);
    }
    // the row layout has no vector kernel since the grouped layout replaced
    // it (2026-12-06): no path packs it, [`pack_grouped`] reads it
    reference_rows_times_tokens(w, x, r0, r1, put)
}

/// The row layout's arithmetic in plain Rust (its vector kernels' order of
/// operations except for the lanes of the pair sums).
fn reference_rows_times_tokens(
    w: &Packed,
    x: &QuantX,
    r0: usize,
    r1: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    let nb = w.nb;
    let t = x.q.len() / x.cols.max(1);
    for ti in 0..t {
        for r in r0..r1.min(w.rows) {
            let mut acc = 0f32;
            for b in 0..nb {
                let dot = block_dot(w, x, r, ti, b);
                acc += dot as f32 * (w.dm(r, b).0 * x.d[ti * nb + b]);
            }
            let mut off = 0f32;
            for b in 0..nb {
                off += w.dm(r, b).1 * x.s[ti * nb + b];
            }
            put(ti, r, acc + w.m_scale * off);
        }
    }
}

/// Block `b`'s exact integer dot of row `r` and token `ti`.
fn block_dot(w: &Packed, x: &QuantX, r: usize, ti: usize, b: usize) -> i32 {
    let xq = &x.q[ti * x.cols + b * QK..][..QK];
    (0..QK).map(|j| w.elem(r, b, j) as i32 * xq[j] as i32).sum()
}

/// The arithmetic of the grouped layout's kernels, which it defines: per row
/// and token, block after block, the block's exact integer dot `D`, its
/// whole contribution `fma(D, d_w·d_x, m·m_scale·s_x)` (the scaled values and
/// the offsets, which nearly cancel for Q4_1, meet within the block), then
/// `acc += ` that. Adding the two parts to the running sum one after the
/// other lost enough to move the first-step logprobs against llama.cpp from
/// 0.28 to 0.42 (the e2e agreement test allows 0.35). Nothing in it depends
/// on the other rows or tokens of a call: a row's bits are the same in any
/// batch.
pub fn reference_grouped(
    w: &Packed,
    x: &QuantX,
    r0: usize,
    r1: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    let nb = w.nb;
    let t = x.q.len() / x.cols.max(1);
    for ti in 0..t {
        for r in r0..r1.min(w.rows) {
            let mut acc = 0f32;
            for b in 0..nb {
                let dot = block_dot(w, x, r, ti, b);
                let (d, m) = w.dm(r, b);
                let off = m * w.m_scale * x.s[ti * nb + b];
                acc += (dot as f32).mul_add(d * x.d[ti * nb + b], off);
            }
            put(ti, r, acc);
        }
    }
}

/// Element `j` of block `b` from a packed row.
fn value(w: &Packed, vals: &[u8], b: usize, j: usize) -> u8 {
    let pair = b / 2;
    let last_odd = w.nb % 2 == 1 && b == w.nb - 1;
    if w.nibbles {
        if last_odd {
            let byte = vals[pair * 32 + j % 16];
            if j < 16 {
                byte & 0x0F
            } else {
                byte >> 4
            }
        } else {
            let e = (b % 2) * QK + j;
            let byte = vals[pair * 32 + e % 32];
            if e < 32 {
                byte & 0x0F
            } else {
                byte >> 4
            }
        }
    } else if last_odd {
        vals[pair * 64 + j]
    } else {
        vals[pair * 64 + (b % 2) * QK + j]
    }
}

/// The activations' quantization with AVX-512.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod vnni {
    use super::{QuantX, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn quantize(x: &[f32], cols: usize) -> QuantX {
        let (t, nb) = (x.len() / cols.max(1), cols / QK);
        let mut out = QuantX::zeroed(t, cols);
        let sign = _mm512_set1_ps(-0.0);
        for bi in 0..t * nb {
            let p = x.as_ptr().add(bi * QK);
            let v0 = _mm512_loadu_ps(p);
            let v1 = _mm512_loadu_ps(p.add(16));
            let a = _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1));
            let amax = _mm512_reduce_max_ps(a);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm512_set1_ps(id);
            // rounds to nearest, ties to even (the default MXCSR mode)
            let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, idv));
            let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, idv));
            let o = out.q.as_mut_ptr().add(bi * QK) as *mut __m128i;
            _mm_storeu_si128(o, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128(o.add(1), _mm512_cvtepi32_epi8(q1));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            *out.d.get_unchecked_mut(bi) = d;
            *out.s.get_unchecked_mut(bi) = d * sum as f32;
        }
        out
    }
}

/// The activations' quantization with AVX2 alone, and the grouped layout's
/// kernels: `vpmaddubsw` (AVX2) or `vpdpbusd` (VNNI on 256-bit registers) for
/// the blocks' exact integer dots. Q8_0's unsigned values (`q + 128`) would
/// overflow `vpmaddubsw`'s 16-bit sums, so there they are taken as
/// `|q| · sign(x)` plus `128 · Σx`, the same integer.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
mod avx2q {
    use super::{Packed, QuantX, GROUP, QK};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(x: &[f32], cols: usize) -> QuantX {
        let (t, nb) = (x.len() / cols.max(1), cols / QK);
        let mut out = QuantX::zeroed(t, cols);
        let sign = _mm256_set1_ps(-0.0);
        // packs interleave 4-byte groups by 128-bit lane; this puts them back
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for bi in 0..t * nb {
            let p = x.as_ptr().add(bi * QK);
            let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)));
            let a = v.map(|vk| _mm256_andnot_ps(sign, vk));
            let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            // rounds to nearest, ties to even (the default MXCSR mode)
            let q = v.map(|vk| _mm256_cvtps_epi32(_mm256_mul_ps(vk, idv)));
            let b = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let b = _mm256_permutevar8x32_epi32(b, order);
            _mm256_storeu_si256(out.q.as_mut_ptr().add(bi * QK) as *mut __m256i, b);
            let s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(s8),
                _mm256_extracti128_si256::<1>(s8),
            );
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)));
            *out.d.get_unchecked_mut(bi) = d;
            *out.s.get_unchecked_mut(bi) = d * sum as f32;
        }
        out
    }

    /// Σ over each 4-byte group of `u · x` (`u` unsigned, at most 15, or as
    /// below), 8 i32 lanes.
    #[inline(always)]
    unsafe fn dot4(u: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    }

    /// `dot4` for Q8_0's `u = q + 128`: `|q| · sign(x, q)` plus the
    /// activations' `128 · Σx` (`x128`), exact in 16 bits (|q| ≤ 128, |x| ≤ 127).
    #[inline(always)]
    unsafe fn dot4_q8(u: __m256i, x: __m256i, x128: __m256i) -> __m256i {
        let q = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
        _mm256_add_epi32(dot4(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q)), x128)
    }

    /// One group of [`GROUP`] rows against `N` tokens from `ti`, in the
    /// grouped layout: the rows' outputs, one 8-lane vector per token. Per
    /// block, each part's 32 bytes hold 4 elements of each row; the token's
    /// 4 matching activations are broadcast. With `VNNI`, `vpdpbusd`
    /// multiplies and adds into 32 bits; else `vpmaddubsw` multiplies, the
    /// block's products add up in 16 bits (Q4: at most 8 × 2 × 15 × 127 =
    /// 30,480; Q8_0 in 32) and one `vpmaddwd` widens them. Either way each
    /// row's exact integer dot is in its lane ([`super::reference_grouped`]).
    #[inline(always)]
    unsafe fn group_tile<const NIB: bool, const N: usize, const VNNI: bool>(
        w: &Packed,
        x: &QuantX,
        g: usize,
        ti: usize,
    ) -> [__m256; N] {
        let nb = w.nb;
        let gb = w.group_block();
        let vb = gb - 4 * GROUP;
        let base = w.data.as_ptr().add(g * nb * gb);
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let k128 = _mm256_set1_epi8(-128);
        let ms = _mm256_set1_ps(w.m_scale);
        let xq: [*const i8; N] = std::array::from_fn(|t| x.q.as_ptr().add((ti + t) * x.cols));
        let xd: [*const f32; N] = std::array::from_fn(|t| x.d.as_ptr().add((ti + t) * nb));
        let xs: [*const f32; N] = std::array::from_fn(|t| x.s.as_ptr().add((ti + t) * nb));
        let mut acc = [_mm256_setzero_ps(); N];
        for b in 0..nb {
            let blk = base.add(b * gb);
            let ahead = blk.wrapping_add(8 * gb);
            crate::kernels::prefetch(ahead);
            crate::kernels::prefetch(ahead.wrapping_add(64));
            crate::kernels::prefetch(ahead.wrapping_add(128));
            let mut dot = [_mm256_setzero_si256(); N];
            if NIB {
                for c in 0..4 {
                    let y = _mm256_loadu_si256(blk.add(32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(y, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(y), low);
                    for t in 0..N {
                        let p = xq[t].add(b * QK + 8 * c);
                        let xa = _mm256_set1_epi32((p as *const i32).read_unaligned());
                        let xb = _mm256_set1_epi32((p.add(4) as *const i32).read_unaligned());
                        if VNNI {
                            dot[t] = _mm256_dpbusd_epi32(dot[t], lo, xa);
                            dot[t] = _mm256_dpbusd_epi32(dot[t], hi, xb);
                        } else {
                            dot[t] = _mm256_add_epi16(dot[t], _mm256_maddubs_epi16(lo, xa));
                            dot[t] = _mm256_add_epi16(dot[t], _mm256_maddubs_epi16(hi, xb));
                        }
                    }
                }
                if !VNNI {
                    for d in dot.iter_mut() {
                        *d = _mm256_madd_epi16(*d, ones);
                    }
                }
            } else {
                for c in 0..8 {
                    let u = _mm256_loadu_si256(blk.add(32 * c) as *const __m256i);
                    for t in 0..N {
                        let p = xq[t].add(b * QK + 4 * c);
                        let xa = _mm256_set1_epi32((p as *const i32).read_unaligned());
                        if VNNI {
                            dot[t] = _mm256_dpbusd_epi32(dot[t], u, xa);
                        } else {
                            let v = dot4_q8(u, xa, dot4(k128, xa));
                            dot[t] = _mm256_add_epi32(dot[t], v);
                        }
                    }
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(vb) as *const __m128i));
            let mw = _mm256_mul_ps(
                _mm256_cvtph_ps(_mm_loadu_si128(blk.add(vb + 2 * GROUP) as *const __m128i)),
                ms,
            );
            for t in 0..N {
                let s = _mm256_mul_ps(dw, _mm256_broadcast_ss(&*xd[t].add(b)));
                let off = _mm256_mul_ps(mw, _mm256_broadcast_ss(&*xs[t].add(b)));
                let blk = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t]), s, off);
                acc[t] = _mm256_add_ps(acc[t], blk);
            }
        }
        acc
    }

    /// Rows `r0..r1` (clamped to the weight) of a grouped [`Packed`] against
    /// every token of `x`, a group of rows and up to 4 tokens at a time (a
    /// group partly outside the range is computed whole and emitted in part).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn groups_times_tokens(
        w: &Packed,
        x: &QuantX,
        r0: usize,
        r1: usize,
        put: impl FnMut(usize, usize, f32),
    ) {
        groups_body::<false>(w, x, r0, r1, put)
    }

    /// [`groups_times_tokens`] with `vpdpbusd` (AVX-512 VNNI on 256-bit
    /// registers) for the integer dots: the same exact dots, so the same bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn groups_times_tokens_vnni(
        w: &Packed,
        x: &QuantX,
        r0: usize,
        r1: usize,
        put: impl FnMut(usize, usize, f32),
    ) {
        groups_body::<true>(w, x, r0, r1, put)
    }

    #[inline(always)]
    unsafe fn groups_body<const VNNI: bool>(
        w: &Packed,
        x: &QuantX,
        r0: usize,
        r1: usize,
        mut put: impl FnMut(usize, usize, f32),
    ) {
        let r1 = r1.min(w.rows);
        let t = if x.cols == w.nb * QK && w.nb > 0 {
            (x.q.len() / x.cols)
                .min(x.d.len() / w.nb)
                .min(x.s.len() / w.nb)
        } else {
            0
        };
        let groups = w.rows.div_ceil(GROUP);
        if !w.grouped
            || w.stride != w.row_bytes + 4 * w.nb
            || w.data.len() < groups * w.nb * w.group_block()
        {
            return;
        }
        let mut emit = |v: __m256, g: usize, ti: usize| {
            let mut o = [0f32; GROUP];
            _mm256_storeu_ps(o.as_mut_ptr(), v);
            for (k, v) in o.iter().enumerate() {
                let r = g * GROUP + k;
                if r >= r0 && r < r1 {
                    put(ti, r, *v);
                }
            }
        };
        let mut g = r0 / GROUP;
        while g * GROUP < r1 {
            let mut ti = 0;
            while ti < t {
                macro_rules! run {
                    ($n:expr) => {{
                        let o = if w.nibbles {
                            group_tile::<true, $n, VNNI>(w, x, g, ti)
                        } else {
                            group_tile::<false, $n, VNNI>(w, x, g, ti)
                        };
                        for (j, v) in o.into_iter().enumerate() {
                            emit(v, g, ti + j);
                        }
                        ti += $n;
                    }};
                }
                match t - ti {
                    1 => run!(1),
                    2 => run!(2),
                    3 => run!(3),
                    _ => run!(4),
                }
            }
            g += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self, BlockFormat};
    use crate::kernels_f32::tests::rand_bytes;
    use crate::kernels_f32::{self, KernelPath};

    fn weights(format: BlockFormat, rows: usize, nb: usize, seed: u64) -> Vec<u8> {
        let mut data = rand_bytes(rows * nb * format.block_bytes(), seed);
        for (i, b) in data.chunks_exact_mut(format.block_bytes()).enumerate() {
            let d = 0.01 + 0.001 * (i % 7) as f32;
            b[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            if format == BlockFormat::Q4_1 {
                b[2..4].copy_from_slice(&half::f16::from_f32(-0.08).to_le_bytes());
            }
        }
        data
    }

    fn acts(t: usize, cols: usize, seed: u64) -> Vec<f32> {
        rand_bytes(t * cols, seed)
            .iter()
            .enumerate()
            // some blocks all zero (scale 0), the rest of mixed magnitude
            .map(|(i, &b)| {
                if (i / QK) % 9 == 4 {
                    0.0
                } else {
                    (b as f32 / 128.0 - 1.0) * (1.0 + (i % 5) as f32)
                }
            })
            .collect()
    }

    fn run(k: Kernels, w: &Packed, x: &QuantX, t: usize, r0: usize, r1: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; t * w.rows];
        rows_times_tokens(k, w, x, r0, r1, |ti, r, v| out[ti * w.rows + r] = v);
        out
    }

    /// On each int8 path of this machine: the packed form holds every weight,
    /// the vectorized quantization is the reference's, every tile shape gives
    /// the same bits for a row, the result is within int8 rounding of the f32
    /// dot of the dequantized weights, and the paths give the same bits.
    #[test]
    fn int8_kernels_agree_with_their_definition_for_any_tile() {
        let paths: Vec<KernelPath> = kernels_f32::available_paths()
            .into_iter()
            .filter(|p| p.int8())
            .collect();
        let mut first: Option<(KernelPath, Vec<Vec<u32>>)> = None;
        for &path in &paths {
            let k = Kernels::new(path).unwrap();
            eprintln!("path: {}", path.name());
            // the grouped layout, which every int8 path packs: each path's
            // kernel (vpmaddubsw or vpdpbusd) against the definition, bit for bit
            check_int8_path(k, pack_grouped);
            // the row layout (its plain definition): packing, accessors, bounds
            let bits = check_int8_path(k, pack_rows);
            match &first {
                None => first = Some((path, bits)),
                Some((p0, b0)) => assert!(
                    *b0 == bits,
                    "{} and {} give different bits",
                    p0.name(),
                    path.name()
                ),
            }
        }
    }

    /// The checks of one path; returns the bits of every batch output.
    fn check_int8_path(
        k: Kernels,
        pack: fn(BlockFormat, &[u8], usize, usize) -> Packed,
    ) -> Vec<Vec<u32>> {
        let mut outputs = Vec::new();
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            for nb in [18usize, 7, 1, 35, 48] {
                let (rows, cols, t) = (11, nb * QK, 9);
                let data = weights(format, rows, nb, 3 + nb as u64);
                let w = pack(format, &data, rows, cols);
                // every element survives the repacking
                let row_bytes = nb * format.block_bytes();
                let deqs: Vec<Vec<f32>> = (0..rows)
                    .map(|r| {
                        let mut deq = vec![0f32; cols];
                        kernels::dequant_row_reference(
                            format,
                            &data[r * row_bytes..(r + 1) * row_bytes],
                            &mut deq,
                        );
                        deq
                    })
                    .collect();
                for (r, deq) in deqs.iter().enumerate() {
                    for b in 0..nb {
                        for j in 0..QK {
                            let u = w.elem(r, b, j) as f32;
                            let (d, m) = w.dm(r, b);
                            let got = u * d + w.m_scale * m;
                            let want = deq[b * QK + j];
                            assert!(
                                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                                "{format:?} nb {nb} r {r} b {b} j {j}: {got} vs {want}"
                            );
                        }
                    }
                }
                // packing loses nothing, and the packed form's own
                // dequantization is GGUF's
                assert!(w.unpack(format) == data, "{format:?} nb {nb}: unpack");
                assert!(w.fits(format, rows, cols) && !w.fits(format, rows + 1, cols));
                let other = if format == BlockFormat::Q8_0 {
                    BlockFormat::Q4_1
                } else {
                    BlockFormat::Q8_0
                };
                assert!(
                    !w.fits(other, rows, cols),
                    "{format:?} packed fits {other:?}"
                );
                for (r, deq) in deqs.iter().enumerate() {
                    let mut got = vec![f32::NAN; cols];
                    w.dequant_row(format, r, &mut got);
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        deq.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{format:?} nb {nb} row {r}: dequant_row"
                    );
                }
                let xs = acts(t, cols, 17 + nb as u64);
                let xq = quantize(k, &xs, cols);
                let xr = quantize_reference(&xs, cols);
                assert_eq!(xq.q, xr.q, "{format:?} quantized bytes");
                assert_eq!(
                    xq.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    xr.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                assert_eq!(
                    xq.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    xr.s.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                let all = run(k, &w, &xq, t, 0, rows);
                outputs.push(all.iter().map(|v| v.to_bits()).collect());
                if w.grouped {
                    // the grouped kernels' arithmetic is their definition's, bit for bit
                    let mut def = vec![f32::NAN; t * rows];
                    reference_grouped(&w, &xq, 0, rows, |ti, r, v| def[ti * rows + r] = v);
                    assert_eq!(
                        all.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        def.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{format:?} nb {nb}: grouped kernel against its definition"
                    );
                }
                // one token at a time and one row at a time: the same bits
                for ti in 0..t {
                    let one = quantize(k, &xs[ti * cols..(ti + 1) * cols], cols);
                    for (r0, r1) in [(0, rows), (3, 4), (5, 9)] {
                        let o = run(k, &w, &one, 1, r0, r1);
                        for r in r0..r1 {
                            assert_eq!(
                                o[r].to_bits(),
                                all[ti * rows + r].to_bits(),
                                "{format:?} nb {nb} token {ti} row {r} rows {r0}..{r1}"
                            );
                        }
                    }
                }
                // the plain definition and the f32 dot of the dequantized weights
                let mut plain = vec![0f32; t * rows];
                reference_rows_times_tokens(&w, &xq, 0, rows, |ti, r, v| plain[ti * rows + r] = v);
                for ti in 0..t {
                    let x = &xs[ti * cols..(ti + 1) * cols];
                    // each activation moves by at most half a step: max|x| of its block / 254
                    let half_steps: f32 = x
                        .chunks_exact(QK)
                        .map(|b| QK as f32 * b.iter().fold(0f32, |a, v| a.max(v.abs())) / 254.0)
                        .sum();
                    for (r, deq) in deqs.iter().enumerate() {
                        let exact: f64 =
                            deq.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let wmax = deq.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let got = all[ti * rows + r];
                        let p = plain[ti * rows + r];
                        assert!(
                            (got - p).abs() <= 1e-4 * (1.0 + p.abs()),
                            "{format:?} kernel {got} vs definition {p}"
                        );
                        let bound = wmax * half_steps * 1.001 + 1e-4;
                        assert!(
                            ((got as f64) - exact).abs() <= bound as f64,
                            "{format:?} nb {nb}: {got} vs exact {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
        outputs
    }
}
