//! An exponential moving average of a model's weights (diffusers' `training_utils.EMAModel`).
//!
//! After every optimizer step the shadow weights move towards the model's:
//! `shadow -= (1 - decay) * (shadow - param)`, with a decay that warms up with the number of
//! updates (see [`EmaConfig::decay_at`]). Frozen parameters are copied instead.
//!
//! Saved the way diffusers saves it (`EMAModel.save_pretrained`): a model folder with the shadow
//! weights whose `config.json` also holds the EMA's own settings and `optimization_step`, so
//! `EMAModel.from_pretrained(path, UNet2DModel)` reads it back in Python too.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Error, Result};

use crate::params;

/// `EMAModel.__init__` settings. `Default` is what train_unconditional.py passes with its own
/// defaults (`decay=0.9999`, `use_ema_warmup=True`, `inv_gamma=1.0`, `power=3/4`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EmaConfig {
    /// Upper bound of the decay (`decay`).
    pub decay: f64,
    /// Lower bound of the decay.
    pub min_decay: f64,
    /// Updates before this many optimizer steps only copy the weights.
    pub update_after_step: u64,
    /// `1 - (1 + step / inv_gamma)^-power` instead of `(1 + step) / (10 + step)`.
    pub use_ema_warmup: bool,
    /// Inverse multiplicative factor of the warmup.
    pub inv_gamma: f64,
    /// Exponent of the warmup.
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: true,
            inv_gamma: 1.0,
            power: 0.75,
        }
    }
}

impl EmaConfig {
    /// Check the ranges diffusers checks.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.decay) {
            return Err(Error::invalid_argument(
                "ema_max_decay",
                format!("{} is not in [0, 1]", self.decay),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_decay) {
            return Err(Error::invalid_argument(
                "ema_min_decay",
                format!("{} is not in [0, 1]", self.min_decay),
            ));
        }
        if !(self.inv_gamma > 0.0 && self.inv_gamma.is_finite()) {
            return Err(Error::invalid_argument(
                "ema_inv_gamma",
                format!("{} is not positive", self.inv_gamma),
            ));
        }
        if !self.power.is_finite() {
            return Err(Error::invalid_argument(
                "ema_power",
                format!("{} is not finite", self.power),
            ));
        }
        Ok(())
    }

    /// The decay of update number `optimization_step` (1-based), diffusers' `get_decay`.
    pub fn decay_at(&self, optimization_step: u64) -> f64 {
        let step = optimization_step.saturating_sub(self.update_after_step + 1);
        if step == 0 {
            return 0.0;
        }
        let s = step as f64;
        let value = if self.use_ema_warmup {
            1.0 - (1.0 + s / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + s) / (10.0 + s)
        };
        value.min(self.decay).max(self.min_decay)
    }
}

/// Shadow weights that follow a model.
#[derive(Clone, Debug)]
pub struct EmaModel {
    config: EmaConfig,
    shadow: Vec<Tensor<1>>,
    trainable: Vec<bool>,
    optimization_step: u64,
    cur_decay_value: Option<f64>,
}

impl EmaModel {
    /// Start from `model`'s current weights.
    ///
    /// # Errors
    /// As [`EmaConfig::validate`].
    pub fn new<M: Module>(config: EmaConfig, model: &M) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            shadow: params::values(model),
            trainable: params::infos(model).iter().map(|i| i.trainable).collect(),
            optimization_step: 0,
            cur_decay_value: None,
        })
    }

    /// Resume: shadow weights taken from `shadow_model` (the saved EMA weights) after
    /// `optimization_step` updates.
    ///
    /// # Errors
    /// As [`EmaConfig::validate`]; [`Error::InvalidArgument`] when `shadow_model` has a
    /// different number of parameters than `model`.
    pub fn from_weights<M: Module>(
        config: EmaConfig,
        model: &M,
        shadow_model: &M,
        optimization_step: u64,
    ) -> Result<Self> {
        let mut ema = Self::new(config, model)?;
        let shadow = params::values(shadow_model);
        if shadow.len() != ema.shadow.len() {
            return Err(Error::invalid_argument(
                "ema_model",
                format!(
                    "{} parameters for a model with {}",
                    shadow.len(),
                    ema.shadow.len()
                ),
            ));
        }
        ema.shadow = shadow;
        ema.optimization_step = optimization_step;
        Ok(ema)
    }

    /// The settings.
    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    /// How many updates have been made.
    pub fn optimization_step(&self) -> u64 {
        self.optimization_step
    }

    /// The decay used by the last update.
    pub fn cur_decay_value(&self) -> Option<f64> {
        self.cur_decay_value
    }

    /// One update towards `model`'s weights (`EMAModel.step`). Returns the decay used.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `model` has a different number of parameters.
    pub fn step<M: Module>(&mut self, model: &M) -> Result<f64> {
        let values = params::values(model);
        if values.len() != self.shadow.len() {
            return Err(Error::invalid_argument(
                "model",
                format!(
                    "{} parameters, the EMA tracks {}",
                    values.len(),
                    self.shadow.len()
                ),
            ));
        }
        self.optimization_step += 1;
        let decay = self.config.decay_at(self.optimization_step);
        self.cur_decay_value = Some(decay);
        let one_minus_decay = 1.0 - decay;
        for ((s, p), &trainable) in self.shadow.iter_mut().zip(values).zip(&self.trainable) {
            *s = if trainable {
                // s_param.sub_(one_minus_decay * (s_param - param))
                s.clone().sub(s.clone().sub(p).mul_scalar(one_minus_decay))
            } else {
                p
            };
        }
        Ok(decay)
    }

    /// `model` (any copy of the tracked architecture) carrying the shadow weights, without
    /// autodiff (diffusers' `copy_to`).
    pub fn copy_to<M: Module>(&self, model: &M) -> M {
        params::replace(
            model.valid(),
            self.shadow.iter().cloned().map(Some).collect(),
        )
    }

    /// The keys diffusers' `EMAModel.save_pretrained` adds to the model's `config.json`.
    pub fn config_entries(&self) -> Map<String, Value> {
        let c = &self.config;
        let mut map = Map::new();
        map.insert("decay".into(), c.decay.into());
        map.insert("min_decay".into(), c.min_decay.into());
        map.insert("optimization_step".into(), self.optimization_step.into());
        map.insert("update_after_step".into(), c.update_after_step.into());
        map.insert("use_ema_warmup".into(), c.use_ema_warmup.into());
        map.insert("inv_gamma".into(), c.inv_gamma.into());
        map.insert("power".into(), c.power.into());
        map
    }

    /// `optimization_step` as written by [`Self::config_entries`].
    pub fn optimization_step_from(entries: &Map<String, Value>) -> Option<u64> {
        entries.get("optimization_step").and_then(Value::as_u64)
    }
}

impl EmaConfig {
    /// The settings saved by [`EmaModel::config_entries`], each falling back to `self`'s when
    /// absent. diffusers' resume hook restores them this way (`load_state_dict` of the saved
    /// `EMAModel`), so a resumed EMA keeps the decay schedule it was started with.
    pub fn with_saved(&self, entries: &Map<String, Value>) -> Self {
        let float =
            |key: &str, fallback: f64| entries.get(key).and_then(Value::as_f64).unwrap_or(fallback);
        Self {
            decay: float("decay", self.decay),
            min_decay: float("min_decay", self.min_decay),
            update_after_step: entries
                .get("update_after_step")
                .and_then(Value::as_u64)
                .unwrap_or(self.update_after_step),
            use_ema_warmup: entries
                .get("use_ema_warmup")
                .and_then(Value::as_bool)
                .unwrap_or(self.use_ema_warmup),
            inv_gamma: float("inv_gamma", self.inv_gamma),
            power: float("power", self.power),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_follows_diffusers_get_decay() {
        let c = EmaConfig::default();
        assert_eq!(c.decay_at(1), 0.0);
        assert_eq!(c.decay_at(2), 1.0 - 2f64.powf(-0.75));
        assert_eq!(c.decay_at(10_000_000), 0.9999);
        let plain = EmaConfig {
            use_ema_warmup: false,
            update_after_step: 3,
            min_decay: 0.5,
            ..EmaConfig::default()
        };
        assert_eq!(plain.decay_at(4), 0.0);
        assert_eq!(plain.decay_at(5), 0.5); // (1 + 1) / 11 raised to min_decay
        assert_eq!(plain.decay_at(103), 100.0 / 109.0);
    }

    #[test]
    fn saved_settings_win_over_current_ones() {
        let saved = EmaConfig {
            power: 2.0 / 3.0,
            update_after_step: 5,
            ..EmaConfig::default()
        };
        let ema = EmaModel {
            config: saved.clone(),
            shadow: Vec::new(),
            trainable: Vec::new(),
            optimization_step: 12,
            cur_decay_value: None,
        };
        let entries = ema.config_entries();
        assert_eq!(EmaConfig::default().with_saved(&entries), saved);
        assert_eq!(EmaModel::optimization_step_from(&entries), Some(12));
        assert_eq!(
            EmaConfig::default().with_saved(&Map::new()),
            EmaConfig::default()
        );
    }
}
