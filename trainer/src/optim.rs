//! AdamW (PyTorch's update order), warm-up + cosine schedule, clipping by
//! global norm.

use crate::error::Result;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments per parameter, the step count, and each
/// parameter's multiple of the scheduled rate (1 unless set: LoRA+).
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub t: u64,
    pub scales: Vec<f64>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[&Var]) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let scales = vec![1.0; m.len()];
        Ok(Self {
            cfg,
            m,
            v,
            t: 0,
            scales,
        })
    }

    /// Parameter `i` steps at `scales[i]` times the scheduled rate.
    pub fn with_scales(mut self, scales: Vec<f64>) -> Result<Self> {
        if scales.len() != self.m.len() || scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(crate::error::TrainError::Setting(format!(
                "{} rate scales for {} parameters (each finite and above 0)",
                scales.len(),
                self.m.len()
            )));
        }
        self.scales = scales;
        Ok(self)
    }

    /// One update with learning rate `lr` (the schedule's value for this step).
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let lr = lr * self.scales.get(i).copied().unwrap_or(1.0);
            let step_size = lr / bc1;
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let p = var.as_tensor();
            let p = if c.weight_decay != 0.0 {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p.clone()
            };
            let p = (p - ((&m / denom)? * step_size)?)?;
            var.set(&p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at `total`
/// (Hugging Face's `get_cosine_schedule_with_warmup`).
pub fn lr_at(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    lr_at_fraction(step, warmup, total, peak, 0.0)
}

/// [`lr_at`], with the cosine at least `done` of the way through (the share of a
/// time budget already spent), so a run that the budget will cut still decays
/// to 0 by its end.
pub fn lr_at_fraction(step: usize, warmup: usize, total: usize, peak: f64, done: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let progress = progress.max(done);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos())
}

/// The global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut s = 0f64;
    for g in grads {
        s += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(s.sqrt())
}

/// Scale `grads` so their global norm is at most `max` (PyTorch's
/// `clip_grad_norm_`: coefficient `max / (norm + 1e-6)`, capped at 1).
pub fn clip(grads: &mut [Tensor], norm: f64, max: f64) -> Result<()> {
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// LoRA+: a parameter with scale k moves k times as far as with scale 1
    /// from the same state and gradients (Adam's step is linear in the rate);
    /// one with scale 1 moves as an optimizer without scales moves it.
    #[test]
    fn a_rate_scale_multiplies_that_parameter_step_only() {
        let dev = Device::Cpu;
        let init = [0.5f32, -1.0, 2.0];
        let grads = [
            Tensor::new(&[0.3f32, -0.2, 0.1], &dev).unwrap(),
            Tensor::new(&[-0.4f32, 0.25, 0.05], &dev).unwrap(),
        ];
        let run = |scales: Option<Vec<f64>>| -> Vec<Vec<f32>> {
            let vars: Vec<Var> = (0..2).map(|_| Var::new(&init, &dev).unwrap()).collect();
            let refs: Vec<&Var> = vars.iter().collect();
            let cfg = AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            };
            let mut opt = AdamW::new(cfg, &refs).unwrap();
            if let Some(s) = scales {
                opt = opt.with_scales(s).unwrap();
            }
            for _ in 0..3 {
                opt.step(&refs, &grads, 1e-3).unwrap();
            }
            vars.iter()
                .map(|v| {
                    let now = v.as_tensor().to_vec1::<f32>().unwrap();
                    now.iter().zip(init).map(|(a, b)| a - b).collect()
                })
                .collect()
        };
        let plain = run(None);
        let plus = run(Some(vec![1.0, 4.0]));
        assert_eq!(plain[0], plus[0], "scale 1 is the plain step");
        for (a, b) in plus[1].iter().zip(&plain[1]) {
            assert!((a / b - 4.0).abs() < 1e-3, "{a} vs 4 × {b}");
        }
        let bad = AdamW::new(AdamWConfig::default(), &[&Var::new(&init, &dev).unwrap()])
            .unwrap()
            .with_scales(vec![1.0, 2.0]);
        assert!(bad.is_err(), "one scale per parameter");
    }
}
