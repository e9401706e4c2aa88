//! Learning-rate schedules of diffusers' `optimization.py` (`get_scheduler`).
//!
//! Each is a `LambdaLR`: the learning rate of optimizer step `s` (0-based) is
//! `base_lr * lambda(s)`. torch evaluates `lambda(0)` when the scheduler is built and
//! `lambda(s + 1)` at `lr_scheduler.step()` after optimizer step `s`, so with warmup the very first
//! step runs at learning rate 0, as in diffusers' training scripts.

use serde::{Deserialize, Serialize};

use diffusion_core::{Error, Result};

/// The schedule's shape, by diffusers' `--lr_scheduler` name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// Linear warmup, then linear decay to 0 at `num_training_steps`.
    Linear,
    /// Linear warmup, then a half cosine down to 0 (`get_cosine_schedule_with_warmup`).
    #[default]
    Cosine,
    /// Linear warmup, then one cosine per cycle, restarting at the top (`num_cycles = 1` as
    /// `get_scheduler` passes it gives the plain half cosine).
    CosineWithRestarts,
    /// Linear warmup, then `(lr - lr_end) * remaining^power + lr_end` with power 1 and
    /// `lr_end = 1e-7`.
    Polynomial,
    /// The base learning rate throughout.
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
}

impl LrScheduleKind {
    /// diffusers' name (`"cosine"`, `"constant_with_warmup"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts => "cosine_with_restarts",
            Self::Polynomial => "polynomial",
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
        }
    }
}

/// A learning rate for every optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    kind: LrScheduleKind,
    base_lr: f64,
    num_warmup_steps: usize,
    num_training_steps: usize,
}

/// `lr_end` of diffusers' polynomial schedule.
const POLYNOMIAL_LR_END: f64 = 1e-7;

impl LrSchedule {
    /// A schedule over `num_training_steps` optimizer steps with `num_warmup_steps` of warmup.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `learning_rate` for a negative or non-finite rate, and
    /// `lr_end` when a polynomial schedule's base rate is not above `lr_end` (diffusers raises
    /// the same).
    pub fn new(
        kind: LrScheduleKind,
        base_lr: f64,
        num_warmup_steps: usize,
        num_training_steps: usize,
    ) -> Result<Self> {
        if !base_lr.is_finite() || base_lr < 0.0 {
            return Err(Error::invalid_argument(
                "learning_rate",
                format!("{base_lr} is not a non-negative number"),
            ));
        }
        if kind == LrScheduleKind::Polynomial && base_lr <= POLYNOMIAL_LR_END {
            return Err(Error::invalid_argument(
                "lr_end",
                format!(
                    "the polynomial schedule decays to {POLYNOMIAL_LR_END}, which must be below the learning rate {base_lr}"
                ),
            ));
        }
        Ok(Self {
            kind,
            base_lr,
            num_warmup_steps,
            num_training_steps,
        })
    }

    /// The kind of schedule.
    pub fn kind(&self) -> LrScheduleKind {
        self.kind
    }

    /// The learning rate after warmup.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }

    /// The multiplier of the base rate at optimizer step `step` (diffusers' `lr_lambda`).
    pub fn factor(&self, step: usize) -> f64 {
        let warmup = self.num_warmup_steps;
        let total = self.num_training_steps;
        let s = step as f64;
        let warming = step < warmup;
        let warmup_factor = s / warmup.max(1) as f64;
        let decay_steps = total.saturating_sub(warmup).max(1) as f64;
        match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::ConstantWithWarmup if warming => warmup_factor,
            LrScheduleKind::ConstantWithWarmup => 1.0,
            _ if warming => warmup_factor,
            LrScheduleKind::Linear => {
                let progress = (total as f64 - s) / decay_steps;
                progress.max(0.0)
            }
            LrScheduleKind::Cosine => {
                // num_cycles = 0.5: half a cosine period.
                let progress = (step - warmup) as f64 / decay_steps;
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
            LrScheduleKind::CosineWithRestarts => {
                let progress = (step - warmup) as f64 / decay_steps;
                if progress >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (std::f64::consts::PI * (progress % 1.0)).cos())).max(0.0)
                }
            }
            LrScheduleKind::Polynomial => {
                if step > total {
                    POLYNOMIAL_LR_END / self.base_lr
                } else {
                    let lr_range = self.base_lr - POLYNOMIAL_LR_END;
                    let remaining = 1.0 - (step - warmup) as f64 / decay_steps;
                    (lr_range * remaining + POLYNOMIAL_LR_END) / self.base_lr
                }
            }
        }
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup_matches_diffusers_formula() {
        let s = LrSchedule::new(LrScheduleKind::Cosine, 1e-3, 2, 10).unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(1), 0.5e-3);
        assert_eq!(s.lr(2), 1e-3);
        // progress 4/8 = half way down.
        assert!((s.lr(6) - 0.5e-3).abs() < 1e-15);
        assert!(s.lr(10).abs() < 1e-18);
        let past_end = 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 1.25).cos());
        assert!((s.lr(12) - past_end).abs() < 1e-15);
    }

    #[test]
    fn other_kinds() {
        let lin = LrSchedule::new(LrScheduleKind::Linear, 1.0, 2, 6).unwrap();
        assert_eq!(
            [lin.lr(1), lin.lr(2), lin.lr(4), lin.lr(7)],
            [0.5, 1.0, 0.5, 0.0]
        );
        let c = LrSchedule::new(LrScheduleKind::ConstantWithWarmup, 2.0, 4, 0).unwrap();
        assert_eq!([c.lr(0), c.lr(2), c.lr(9)], [0.0, 1.0, 2.0]);
        let k = LrSchedule::new(LrScheduleKind::Constant, 2.0, 4, 0).unwrap();
        assert_eq!(k.lr(0), 2.0);
        let p = LrSchedule::new(LrScheduleKind::Polynomial, 1.0, 0, 4).unwrap();
        assert!((p.lr(1) - (0.75 * (1.0 - 1e-7) + 1e-7)).abs() < 1e-15);
        assert_eq!(p.lr(9), 1e-7);
        let r = LrSchedule::new(LrScheduleKind::CosineWithRestarts, 1.0, 0, 4).unwrap();
        assert_eq!(r.lr(4), 0.0);
        assert!(LrSchedule::new(LrScheduleKind::Cosine, f64::NAN, 0, 1).is_err());
        assert!(LrSchedule::new(LrScheduleKind::Polynomial, 1e-8, 0, 1).is_err());
    }
}
