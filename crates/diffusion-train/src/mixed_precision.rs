//! Mixed-precision training as accelerate gives it to diffusers' scripts
//! (`--mixed_precision fp16|bf16`), and `torch.amp.GradScaler`.
//!
//! burn has no autocast, so the standard equivalent is used: the trained parameters stay `f32`
//! (the master weights the optimizer updates); each step casts them to the half dtype inside the
//! autodiff graph ([`half_copy`]), the forward and backward run on that copy, the prediction is
//! cast back to `f32` before the loss (the scripts' `model_pred.float()`), and the gradients reach
//! the `f32` leaves through the cast's backward, as they reach torch's `f32` parameters through
//! autocast's casts. With `fp16` the loss is multiplied by a dynamic scale before the backward
//! ([`GradScaler`]), the `f32` gradients are unscaled and checked, and a step whose gradients are
//! not finite is skipped while the scale backs off.
//!
//! Unlike autocast, which picks per op (matmuls and convolutions in half precision; norms,
//! softmax and reductions in `f32`), every op of the half copy runs in the half dtype except the
//! GroupNorm statistics (burn widens them to `f32`) and the attention softmax (kept in `f32` by
//! diffusion-models).

use std::path::Path;

use serde::{Deserialize, Serialize};

use diffusion_core::burn::module::{Module, ModuleVisitor, Param};
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::{Error, Result};

use crate::optimizer::FlatGradients;

/// accelerate's `mixed_precision` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything in `f32`.
    #[default]
    No,
    /// IEEE half precision with a dynamic loss scale.
    Fp16,
    /// bfloat16, no loss scale (its exponent range is `f32`'s).
    Bf16,
}

impl MixedPrecision {
    /// Parse the scripts' spelling (`no`, `fp16`, `bf16`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `field` for any other value.
    pub fn parse(field: &str, value: &str) -> Result<Self> {
        match value {
            "no" => Ok(Self::No),
            "fp16" => Ok(Self::Fp16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::invalid_argument(
                field,
                format!("`{other}` is not one of no, fp16, bf16"),
            )),
        }
    }

    /// The scripts' spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
        }
    }

    /// The half dtype of the forward and backward (the scripts' `weight_dtype`); `None` for `no`.
    pub fn dtype(self) -> Option<FloatDType> {
        match self {
            Self::No => None,
            Self::Fp16 => Some(FloatDType::F16),
            Self::Bf16 => Some(FloatDType::BF16),
        }
    }

    /// A fresh loss scaler with accelerate's defaults for `fp16`; `None` otherwise.
    pub fn grad_scaler(self) -> Option<GradScaler> {
        (self == Self::Fp16).then(GradScaler::default)
    }
}

/// `module` (the `f32` master weights) cast to `dtype` inside the autodiff graph, so that a
/// backward through the copy leaves `f32` gradients on the master parameters.
///
/// # Errors
/// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`.
pub fn half_copy<M: Module>(module: &M, dtype: FloatDType) -> Result<M> {
    diffusion_models::modeling_utils::to_dtype(module.clone(), dtype)
}

struct FloatDTypes(Vec<DType>);

impl ModuleVisitor for FloatDTypes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().dtype());
    }
}

/// The dtype of every float parameter of `module`, in visit order.
pub fn param_dtypes<M: Module>(module: &M) -> Vec<DType> {
    let mut v = FloatDTypes(Vec::new());
    module.visit(&mut v);
    v.0
}

/// The dtype of `module`'s first float parameter (`None` for a module without any).
pub fn module_dtype<M: Module>(module: &M) -> Option<DType> {
    param_dtypes(module).into_iter().next()
}

/// `input` cast to `module`'s parameter dtype when that is a half dtype (autocast's cast of a
/// matmul/conv input), else unchanged.
pub fn cast_input<M: Module, const D: usize>(module: &M, input: Tensor<D>) -> Tensor<D> {
    match module_dtype(module) {
        Some(dtype) if dtype != input.dtype() && dtype != DType::F32 => {
            input.cast(FloatDType::from(dtype))
        }
        _ => input,
    }
}

/// `output` cast back to `f32` (the scripts' `model_pred.float()`), unchanged when it is `f32`.
pub fn to_f32<const D: usize>(output: Tensor<D>) -> Tensor<D> {
    if output.dtype() == DType::F32 {
        output
    } else {
        output.cast(FloatDType::F32)
    }
}

/// `torch.amp.GradScaler`'s settings; `Default` is its defaults (which accelerate keeps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GradScalerConfig {
    /// The first scale.
    pub init_scale: f64,
    /// Factor the scale grows by after `growth_interval` finite steps in a row.
    pub growth_factor: f64,
    /// Factor the scale shrinks by after a step with non-finite gradients.
    pub backoff_factor: f64,
    /// Finite steps in a row before the scale grows.
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    /// torch/amp/grad_scaler.py: `init_scale=2.**16, growth_factor=2.0, backoff_factor=0.5,
    /// growth_interval=2000`.
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl GradScalerConfig {
    /// Check the ranges torch asserts.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.init_scale > 0.0 && (self.init_scale as f32).is_finite()) {
            return Err(Error::invalid_argument(
                "init_scale",
                format!("{} is not a positive f32", self.init_scale),
            ));
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return Err(Error::invalid_argument(
                "growth_factor",
                format!("{} is not above 1", self.growth_factor),
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(Error::invalid_argument(
                "backoff_factor",
                format!("{} is not in (0, 1)", self.backoff_factor),
            ));
        }
        if self.growth_interval == 0 {
            return Err(Error::invalid_argument(
                "growth_interval",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// The scaler's state, as `GradScaler.state_dict()` holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// The settings.
    pub config: GradScalerConfig,
    /// The current scale (an `f32`, as torch keeps it).
    pub scale: f32,
    /// Finite steps since the last growth or backoff (`_growth_tracker`).
    pub growth_tracker: u32,
}

/// `torch.amp.GradScaler`: dynamic loss scaling for `fp16` gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct GradScaler {
    state: GradScalerState,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self::from_valid(GradScalerConfig::default())
    }
}

impl GradScaler {
    /// A scaler at `config.init_scale`.
    ///
    /// # Errors
    /// As [`GradScalerConfig::validate`].
    pub fn new(config: GradScalerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::from_valid(config))
    }

    fn from_valid(config: GradScalerConfig) -> Self {
        Self {
            state: GradScalerState {
                scale: config.init_scale as f32,
                growth_tracker: 0,
                config,
            },
        }
    }

    /// The scale the next loss is multiplied by.
    pub fn scale(&self) -> f32 {
        self.state.scale
    }

    /// Finite steps since the last change of scale.
    pub fn growth_tracker(&self) -> u32 {
        self.state.growth_tracker
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> &GradScalerState {
        &self.state
    }

    /// A scaler with a saved state.
    ///
    /// # Errors
    /// As [`GradScalerConfig::validate`]; [`Error::InvalidArgument`] (`scale`) for a scale that is
    /// not a positive finite number.
    pub fn from_state(state: GradScalerState) -> Result<Self> {
        state.config.validate()?;
        if !(state.scale > 0.0 && state.scale.is_finite()) {
            return Err(Error::invalid_argument(
                "scale",
                format!("{} is not a positive finite scale", state.scale),
            ));
        }
        Ok(Self { state })
    }

    /// `unscale_`: check the (scaled) gradients for inf/NaN, then multiply them by the `f32`
    /// reciprocal of the scale (computed in `f64`, as torch does). Returns `found_inf`.
    pub fn unscale(&self, grads: &mut FlatGradients) -> bool {
        let found_inf = !grads.all_finite();
        let inv_scale = (1.0 / f64::from(self.state.scale)) as f32;
        grads.mul_scalar(inv_scale);
        found_inf
    }

    /// `update()`: back off and reset after a step with non-finite gradients; otherwise count
    /// the step and grow the scale after `growth_interval` of them (unless it would overflow).
    pub fn update(&mut self, found_inf: bool) {
        let s = &mut self.state;
        if found_inf {
            s.scale = (f64::from(s.scale) * s.config.backoff_factor) as f32;
            s.growth_tracker = 0;
            return;
        }
        let successful = s.growth_tracker + 1;
        if successful == s.config.growth_interval {
            let grown = (f64::from(s.scale) * s.config.growth_factor) as f32;
            if grown.is_finite() {
                s.scale = grown;
            }
            s.growth_tracker = 0;
        } else {
            s.growth_tracker = successful;
        }
    }
}

/// The factor a backward runs under: the fp16 loss scale of `scaler`, 1 without one.
pub(crate) fn backward_scale(scaler: Option<&GradScaler>) -> f64 {
    scaler.map_or(1.0, |s| f64::from(s.scale()))
}

/// What a mixed-precision run adds to a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixedPrecisionState {
    /// The setting the checkpoint was written with.
    pub mixed_precision: MixedPrecision,
    /// The loss scaler (`fp16` only).
    pub grad_scaler: Option<GradScalerState>,
    /// Optimizer steps skipped for non-finite gradients; the learning-rate schedule does not
    /// advance on them (accelerate's scheduler skips its step with the optimizer's).
    pub skipped_steps: usize,
}

/// The file of [`MixedPrecisionState`] inside a checkpoint.
pub const STATE_FILE: &str = "mixed_precision.json";

impl MixedPrecisionState {
    /// Write `dir/mixed_precision.json`.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        diffusion_core::config::write_atomically(&dir.join(STATE_FILE), text.as_bytes())
    }

    /// Write `dir/mixed_precision.json` when there is something to keep: a half-precision run,
    /// or skipped steps. An f32 run that never skipped a step writes nothing (its checkpoints
    /// stay as they were before mixed precision existed).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save_if_used(&self, dir: &Path) -> Result<()> {
        if self.mixed_precision != MixedPrecision::No || self.skipped_steps > 0 {
            self.save(dir)?;
        }
        Ok(())
    }

    /// Restore what checkpoint `dir` keeps into a trainer running with `setting`: the skipped
    /// steps, and under fp16 the saved loss scaler (the scale carries over between fp16 runs;
    /// another setting keeps `grad_scaler` as it is, a fresh scaler or none). Nothing changes
    /// when the checkpoint has no `mixed_precision.json`.
    ///
    /// # Errors
    /// As [`Self::load`] and [`GradScaler::from_state`].
    pub fn restore(
        dir: &Path,
        setting: MixedPrecision,
        skipped_steps: &mut usize,
        grad_scaler: &mut Option<GradScaler>,
    ) -> Result<()> {
        let Some(mixed) = Self::load(dir)? else {
            return Ok(());
        };
        *skipped_steps = mixed.skipped_steps;
        if let (Some(saved), MixedPrecision::Fp16) = (mixed.grad_scaler, setting) {
            *grad_scaler = Some(GradScaler::from_state(saved)?);
        }
        Ok(())
    }

    /// Read `dir/mixed_precision.json`; `None` when the checkpoint has none (written without
    /// mixed precision).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`] naming the file.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(STATE_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value = diffusion_core::config::parse_json(&text, &path)?;
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| Error::ConfigField {
                path: path.clone(),
                field: "<root>".into(),
                message: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        assert_eq!(
            MixedPrecision::parse("mixed_precision", "bf16").unwrap(),
            MixedPrecision::Bf16
        );
        let err = MixedPrecision::parse("mixed_precision", "fp8")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mixed_precision") && err.contains("fp8"),
            "{err}"
        );
        let bad = GradScalerConfig {
            backoff_factor: 1.0,
            ..GradScalerConfig::default()
        };
        assert!(
            GradScaler::new(bad)
                .unwrap_err()
                .to_string()
                .contains("backoff_factor")
        );
        assert_eq!(GradScaler::default().scale(), 65536.0);
    }
}
