//! GGUF's K-quant formats: super-blocks of 256 weights with 6-bit (Q4_K,
//! Q5_K) or 8-bit (Q6_K) sub-block scales — what Q4_K_M files (Gemma 3's
//! among them) store most weights in. Dequantized here natively, value for
//! value as llama.cpp's `dequantize_row_q*_K` (and candle's port of it) with
//! no fused multiply-add, so every weight is the same f32 the reference
//! computes; the f32 kernels then run on the dequantized rows.
//!
//! Not yet here: dot products straight from the blocks and an int8 path
//! (on an int8 kernel path these weights run through the f32 tiles).

/// Weights per super-block.
pub const QK_K: usize = 256;

/// A K-quant block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KFormat {
    Q4K,
    Q5K,
    Q6K,
}

impl KFormat {
    /// Bytes per 256-weight block as stored in GGUF.
    pub fn block_bytes(self) -> usize {
        match self {
            // d, dmin (f16), 12 scale bytes, 128 nibble bytes
            Self::Q4K => 2 + 2 + 12 + 128,
            // … and 32 bytes of fifth bits
            Self::Q5K => 2 + 2 + 12 + 32 + 128,
            // 128 low-nibble bytes, 64 high-bit bytes, 16 i8 scales, d (f16)
            Self::Q6K => 128 + 64 + 16 + 2,
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4k_block(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (c, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = scale_min(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = y.split_at_mut(32);
        for ((q, lo), hi) in q.iter().zip(lo).zip(hi) {
            *lo = d1 * (q & 0xF) as f32 - m1;
            *hi = d2 * (q >> 4) as f32 - m2;
        }
    }
}

fn q5k_block(b: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let ql = &b[48..176];
    for (c, (q, y)) in ql.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (sc, m) = scale_min(2 * c, scales);
        let (d1, m1) = (d * sc as f32, min * m as f32);
        let (sc, m) = scale_min(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, min * m as f32);
        let (lo, hi) = y.split_at_mut(32);
        for (l, (lo, hi)) in lo.iter_mut().zip(hi).enumerate() {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            *lo = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            *hi = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

fn q6k_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// Dequantize one row of `format` blocks into `out` (`out.len()` weights,
/// a multiple of [`QK_K`]; `row` holds exactly their blocks).
pub fn dequant_row(format: KFormat, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK_K)) {
        match format {
            KFormat::Q4K => q4k_block(b, y),
            KFormat::Q5K => q5k_block(b, y),
            KFormat::Q6K => q6k_block(b, y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};

    /// Random blocks whose f16 fields are finite (random scales of either sign).
    fn blocks(format: KFormat, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut out = Vec::with_capacity(n * format.block_bytes());
        for _ in 0..n {
            let mut b: Vec<u8> = (0..format.block_bytes()).map(|_| next() as u8).collect();
            let f = |v: f32| half::f16::from_f32(v).to_le_bytes();
            let d = (next() % 2000) as f32 / 1e5 - 0.01;
            let m = (next() % 2000) as f32 / 1e5;
            match format {
                KFormat::Q4K | KFormat::Q5K => {
                    b[0..2].copy_from_slice(&f(d));
                    b[2..4].copy_from_slice(&f(m));
                }
                KFormat::Q6K => b[208..210].copy_from_slice(&f(d)),
            }
            out.extend(b);
        }
        out
    }

    fn reference(format: KFormat, data: &[u8], n: usize) -> Vec<f32> {
        let dtype = match format {
            KFormat::Q4K => GgmlDType::Q4K,
            KFormat::Q5K => GgmlDType::Q5K,
            KFormat::Q6K => GgmlDType::Q6K,
        };
        let q = qtensor_from_ggml(dtype, data, vec![n * QK_K], &candle_core::Device::Cpu).unwrap();
        q.dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn every_k_quant_dequantizes_bit_for_bit_as_the_reference() {
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            for seed in 0..4 {
                let n = 3;
                let data = blocks(format, n, seed);
                let want = reference(format, &data, n);
                let mut got = vec![0f32; n * QK_K];
                dequant_row(format, &data, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{format:?} seed {seed} weight {i}: {a} vs {b}"
                    );
                }
                // every byte counts: a flipped bit changes some weight
                for at in [0, 3, 5, 17, 100, format.block_bytes() - 1] {
                    let mut bad = data.clone();
                    bad[at] ^= 0x10;
                    let mut other = vec![0f32; n * QK_K];
                    dequant_row(format, &bad, &mut other);
                    assert_ne!(other, got, "{format:?}: byte {at} ignored");
                }
            }
        }
    }

    /// A K-quant linear gives exactly what the same weights dequantized give
    /// as an f32 linear, on every kernel path this CPU has and for any number
    /// of tokens (a row's result does not depend on the batch).
    #[test]
    fn a_k_quant_linear_equals_its_dequantized_weights_on_every_path() {
        use crate::kernels_f32::{available_paths, Kernels};
        use crate::linear::{Linear, Weight};
        let (rows, cols) = (13, 2 * QK_K);
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            let data = blocks(format, rows * cols / QK_K, 7);
            let mut dense = vec![0f32; rows * cols];
            let rb = cols / QK_K * format.block_bytes();
            for (r, o) in dense.chunks_exact_mut(cols).enumerate() {
                dequant_row(format, &data[r * rb..(r + 1) * rb], o);
            }
            let kq = Linear::new(rows, cols, Weight::KBlocks { format, data }, None).unwrap();
            let f = Linear::new(rows, cols, Weight::F32(dense.clone()), None).unwrap();
            let x: Vec<f32> = (0..5 * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            for p in available_paths() {
                let k = Kernels::new(p).unwrap();
                let one = kq.forward(k, &x[..cols], 1).unwrap();
                let five = kq.forward(k, &x, 5).unwrap();
                assert_eq!(
                    one,
                    f.forward(k, &x[..cols], 1).unwrap(),
                    "{format:?} {p:?}"
                );
                assert_eq!(five, f.forward(k, &x, 5).unwrap(), "{format:?} {p:?}");
                assert_eq!(one[..], five[..rows], "{format:?} {p:?}: batch-dependent");
                let mut row = vec![0f32; cols];
                kq.row_f32(k, 3, &mut row).unwrap();
                assert_eq!(row[..], dense[3 * cols..4 * cols]);
            }
            // a wrong byte count is refused
            assert!(Linear::new(
                rows,
                cols,
                Weight::KBlocks {
                    format,
                    data: vec![0; 10]
                },
                None
            )
            .is_err());
        }
    }

    /// Speed against candle's `QMatMul` on the same blocks (its port of
    /// llama.cpp's K-quant dot products, activations quantized to Q8_K), one
    /// projection of 1,536 × 512 weights, 1 and 64 tokens:
    /// `cargo test --release -p retune-engine --lib k_quant_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement"]
    fn k_quant_speed_against_candle() {
        use crate::kernels_f32::Kernels;
        use crate::linear::{Linear, Weight};
        use candle_core::quantized::QMatMul;
        use candle_core::{Device, Module, Tensor};
        // SmolLM2's hidden (576) is no multiple of 256: its K-quant GGUFs keep
        // those rows in other types; 512 columns here
        let (rows, cols) = (1536, 2 * QK_K);
        let k = Kernels::process_default();
        for format in [KFormat::Q4K, KFormat::Q6K] {
            let data = blocks(format, rows * cols / QK_K, 3);
            let dtype = match format {
                KFormat::Q4K => GgmlDType::Q4K,
                KFormat::Q5K => GgmlDType::Q5K,
                KFormat::Q6K => GgmlDType::Q6K,
            };
            let q = qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu).unwrap();
            let qm = QMatMul::from_qtensor(q).unwrap();
            let ours = Linear::new(rows, cols, Weight::KBlocks { format, data }, None).unwrap();
            for t in [1usize, 64] {
                let x: Vec<f32> = (0..t * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let xt = Tensor::from_slice(&x, (t, cols), &Device::Cpu).unwrap();
                let reps = if t == 1 { 2000 } else { 100 };
                let time = |f: &dyn Fn()| {
                    f();
                    let s = std::time::Instant::now();
                    for _ in 0..reps {
                        f();
                    }
                    s.elapsed().as_secs_f64() / reps as f64 * 1e6
                };
                let a = time(&|| {
                    std::hint::black_box(ours.forward(k, &x, t).unwrap());
                });
                let b = time(&|| {
                    std::hint::black_box(qm.forward(&xt).unwrap());
                });
                eprintln!(
                    "{format:?} {rows}x{cols}, {t} token(s), kernels {}: retune {a:.1} us, candle QMatMul {b:.1} us, ratio {:.2}",
                    k.path().name(),
                    b / a
                );
            }
        }
    }
}
