//! Fused CPU ops of the training forward, each with a backward: a frozen
//! projection plus its LoRA delta, RMS norm, rope and SwiGLU. candle keeps every
//! intermediate of a composed op alive until backward ends (and a gradient for
//! each); a fused op keeps only its output, so a step touches a fraction of the
//! memory. Their backward passes are plain tensor ops; finite differences and the
//! PEFT fixture check them (trainer/tests/gradients.rs).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

pub(super) fn f32s<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: contiguous f32 input expected"),
    }
}

pub(super) fn tensor_f32<'a>(
    g: &'a candle_core::StorageRef<'_>,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (&**g, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: contiguous f32 CPU tensor expected"),
    }
}

fn par() -> gemm::Parallelism {
    let threads = candle_core::utils::get_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst[m, n] (= dst · keep +) beta · lhs[m, k] · rhsᵀ`, with `rhs` row-major `[n, k]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_nt(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    beta: f32,
) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= n * k);
    // SAFETY: the slices hold m·n, m·k and n·k elements with the strides given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            k as isize,
            1,
            1f32,
            beta,
            false,
            false,
            false,
            par(),
        );
    }
}

/// `y = x · Wᵀ + scale · (x · Aᵀ) · Bᵀ` over `(x [t, in], A [r, in], B [out, r])`,
/// `W` frozen. Backward: the input gradient and A's and B's, never W's.
pub(super) struct LoraLinear {
    pub(super) w: Tensor,
    pub(super) scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, k) = l1.shape().dims2()?;
        let (r, ka) = l2.shape().dims2()?;
        let (n, rb) = l3.shape().dims2()?;
        let (wn, wk) = self.w.dims2()?;
        if ka != k || wk != k || rb != r || wn != n {
            candle_core::bail!(
                "lora-linear: shapes x {t}x{k}, A {r}x{ka}, B {n}x{rb}, W {wn}x{wk}"
            );
        }
        let x = f32s(s1, l1, "lora-linear x")?;
        let a = f32s(s2, l2, "lora-linear A")?;
        let b = f32s(s3, l3, "lora-linear B")?;
        let (ws, wl) = self.w.storage_and_layout();
        let w = tensor_f32(&ws, wl, "lora-linear W")?;
        let mut y = vec![0f32; t * n];
        gemm_nt(&mut y, x, w, t, n, k, false, 1.0);
        let mut xa = vec![0f32; t * r];
        gemm_nt(&mut xa, x, a, t, r, k, false, 1.0);
        gemm_nt(&mut y, &xa, b, t, n, r, true, self.scale as f32);
        Ok((CpuStorage::F32(y), Shape::from((t, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, gy) = (x.detach(), a.detach(), b.detach(), gy.detach());
        let xa = x.matmul(&a.t()?)?; // [t, r]
        let g_xa = (gy.matmul(&b)? * self.scale)?; // [t, r]
        let gb = (gy.t()?.matmul(&xa)? * self.scale)?; // [out, r]
        let ga = g_xa.t()?.matmul(&x)?; // [r, in]
        let gx = (gy.matmul(&self.w)? + g_xa.matmul(&a)?)?; // [t, in]
        Ok((Some(gx), Some(ga), Some(gb)))
    }
}

/// RMS norm of rows with frozen weights `w`.
pub(super) struct RmsNorm {
    pub(super) w: Tensor,
    pub(super) eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, h) = l.shape().dims2()?;
        let x = f32s(s, l, "rms-norm x")?;
        let (ws, wl) = self.w.storage_and_layout();
        let w = tensor_f32(&ws, wl, "rms-norm w")?;
        if w.len() != h {
            candle_core::bail!("rms-norm: {h} columns, {} weights", w.len());
        }
        let mut y = vec![0f32; t * h];
        for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * inv * g;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((t, h))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // y = x·inv·w, inv = (mean(x²) + eps)^-½:
        // gx = inv · (g − x · inv² · mean(g ⊙ x)), g = gy ⊙ w
        let x = x.detach();
        let g = gy.detach().broadcast_mul(&self.w)?;
        let inv = (x.sqr()?.mean_keepdim(1)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let dot = (&g * &x)?.mean_keepdim(1)?;
        let corr = x.broadcast_mul(&(dot * inv.sqr()?)?)?;
        Ok(Some((g - corr)?.broadcast_mul(&inv)?))
    }
}

/// Neox rope on `[t, heads · hd]` rows; `cos`/`sin` are `[t, hd/2]`. Its backward
/// is the inverse rotation (`sin` negated).
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) heads: usize,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, width) = l.shape().dims2()?;
        let x = f32s(s, l, "rope x")?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let cos = tensor_f32(&cs, cl, "rope cos")?;
        let sin = tensor_f32(&ss, sl, "rope sin")?;
        let hd = width / self.heads.max(1);
        let half = hd / 2;
        if hd * self.heads != width || cos.len() != t * half || sin.len() != t * half {
            candle_core::bail!(
                "rope: {t}x{width} rows, {} heads, tables {}",
                self.heads,
                cos.len()
            );
        }
        let mut y = vec![0f32; t * width];
        for i in 0..t {
            let (c, sn) = (
                &cos[i * half..(i + 1) * half],
                &sin[i * half..(i + 1) * half],
            );
            for h in 0..self.heads {
                let o = i * width + h * hd;
                for j in 0..half {
                    let (x1, x2) = (x[o + j], x[o + half + j]);
                    y[o + j] = x1 * c[j] - x2 * sn[j];
                    y[o + half + j] = x2 * c[j] + x1 * sn[j];
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((t, width))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, gy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
            heads: self.heads,
        };
        Ok(Some(gy.detach().contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// `silu(g) ⊙ u`.
pub(super) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let g = f32s(s1, l1, "swiglu gate")?;
        let u = f32s(s2, l2, "swiglu up")?;
        let y: Vec<f32> = g
            .iter()
            .zip(u)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, gy) = (g.detach(), u.detach(), gy.detach());
        let sig = candle_nn::ops::sigmoid(&g)?;
        let silu = (&g * &sig)?;
        // d silu / dg = σ · (1 + g · (1 − σ))
        let dsilu = (&sig * ((&g * (1.0 - &sig)?)? + 1.0)?)?;
        let gg = ((&gy * u)? * dsilu)?;
        let gu = (gy * silu)?;
        Ok((Some(gg), Some(gu)))
    }
}
