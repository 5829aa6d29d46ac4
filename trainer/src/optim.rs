//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), the cosine learning-rate schedule with linear warmup,
//! and gradient clipping by global norm. The optimizer's state is plain tensors so checkpoints can save it and,
//! later, shard it by parameter group.

use tch::{Kind, TchError, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW over a fixed list of f32 parameters.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken (for bias correction).
    pub step: u64,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Result<Self, TchError> {
        let zeros = || {
            params
                .iter()
                .map(Tensor::f_zeros_like)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            config,
            step: 0,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
        })
    }

    /// One update of every parameter with its gradient, at learning rate `lr`. Runs without autograd.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) -> Result<(), TchError> {
        self.step += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        tch::no_grad(|| -> Result<(), TchError> {
            for (((p, g), m), v) in params
                .iter()
                .zip(grads)
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let mut p = p.shallow_clone();
                if c.weight_decay != 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let _ = m.f_lerp_(g, 1.0 - c.beta1)?;
                let _ = v
                    .f_mul_scalar_(c.beta2)?
                    .f_addcmul_(g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
                let denom = v.f_sqrt()?.f_div_scalar_(bias2_sqrt)?.f_add_scalar_(c.eps)?;
                let _ = p.f_addcdiv_(&m.f_mul_scalar(-step_size)?, &denom)?;
            }
            Ok(())
        })
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup over the first
/// `ceil(warmup_ratio * total)` steps (the first step already uses `lr / warmup`, not 0), then cosine decay to 0.
pub fn cosine_lr(lr: f64, step: u64, total: u64, warmup_ratio: f64) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as u64;
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (when `max_norm > 0`); returns the norm before.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<f64, TchError> {
    tch::no_grad(|| {
        let norms = grads
            .iter()
            .map(|g| g.f_norm_scalaropt_dtype(2, Kind::Float))
            .collect::<Result<Vec<_>, _>>()?;
        let total = f64::try_from(Tensor::f_stack(&norms, 0)?.f_norm()?)?;
        if max_norm > 0.0 && total.is_finite() {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                for g in grads {
                    let _ = g.shallow_clone().f_mul_scalar_(coef)?;
                }
            }
        }
        Ok(total)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_the_pytorch_update_rule() {
        // Two steps by hand: m, v, bias correction, decoupled decay.
        let p = Tensor::from_slice(&[1.0f32, -2.0]);
        let g = Tensor::from_slice(&[0.5f32, 0.25]);
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(config, std::slice::from_ref(&p)).unwrap();
        let lr = 0.01;
        let (mut pe, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        let ge = [0.5f64, 0.25];
        for t in 1..=2 {
            opt.step(std::slice::from_ref(&p), std::slice::from_ref(&g), lr)
                .unwrap();
            for i in 0..2 {
                pe[i] *= 1.0 - lr * 0.1;
                m[i] = 0.9 * m[i] + 0.1 * ge[i];
                v[i] = 0.999 * v[i] + 0.001 * ge[i] * ge[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                pe[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = Vec::try_from(&p).unwrap();
        for i in 0..2 {
            assert!((f64::from(got[i]) - pe[i]).abs() < 1e-6, "{got:?} vs {pe:?}");
        }
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_zero() {
        let lr = |s| cosine_lr(1.0, s, 100, 0.03);
        assert!((lr(0) - 1.0 / 3.0).abs() < 1e-12);
        assert!((lr(2) - 1.0).abs() < 1e-12);
        assert!((lr(3) - 1.0).abs() < 1e-12);
        assert!(lr(50) < lr(20) && lr(20) < lr(3));
        assert!(lr(99) < 0.001);
        assert_eq!(cosine_lr(2e-5, 0, 10, 0.0), 2e-5);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = [Tensor::from_slice(&[3.0f32]), Tensor::from_slice(&[4.0f32])];
        let norm = clip_grad_norm(&g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let after = clip_grad_norm(&g, 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
