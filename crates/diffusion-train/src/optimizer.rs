//! `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_`, on a module's flattened
//! parameters.
//!
//! burn 0.22's `AdamW` applies the same update rule (decoupled weight decay `p *= 1 - lr * wd`,
//! bias-corrected moments, `eps` added after the square root of the corrected second moment), but
//! it is not used here, for three reasons:
//!
//! - its state is keyed by `ParamId`, which is random per process, so a state saved by one run
//!   cannot be matched to the parameters of a model loaded from `diffusion_pytorch_model.safetensors`
//!   by the next (and `load_record` silently re-initialises states it cannot place);
//! - its gradient clipping by norm clips every tensor on its own, where torch's
//!   `clip_grad_norm_` scales all gradients by one factor from their global L2 norm;
//! - it computes `beta^t` and the bias corrections in `f32` and divides the moments by them;
//!   torch computes them in `f64` on the host and folds them into a step size. The difference is
//!   a rounding-level `1e-5` relative in early steps, but matching torch's order costs nothing.
//!
//! [`AdamW`] therefore keeps one state per parameter index (see [`crate::params`]) and is saved
//! under diffusers' parameter keys.

use std::path::Path;

use serde::{Deserialize, Serialize};

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{Gradients, Tensor};
use diffusion_core::weights::{NamedTensor, SaveDtype, WeightSource};
use diffusion_core::{Error, Result};
use diffusion_models::{LoadMode, load_weights, save_weights, state_dict};

use crate::params::{self, ParamInfo};

/// `torch.optim.AdamW`'s hyperparameters other than the learning rate, which comes from the
/// schedule at every step. `Default` is torch's default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Decay of the first moment (`betas[0]`).
    pub beta1: f64,
    /// Decay of the second moment (`betas[1]`).
    pub beta2: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Added to the root of the corrected second moment.
    pub epsilon: f64,
}

impl Default for AdamWConfig {
    /// torch/optim/adamw.py: `betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2`.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 1e-2,
            epsilon: 1e-8,
        }
    }
}

impl AdamWConfig {
    /// Check the ranges torch checks.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, beta) in [("adam_beta1", self.beta1), ("adam_beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid_argument(
                    name,
                    format!("{beta} is not in [0, 1)"),
                ));
            }
        }
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return Err(Error::invalid_argument(
                "adam_epsilon",
                format!("{} is not a non-negative number", self.epsilon),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid_argument(
                "adam_weight_decay",
                format!("{} is not a non-negative number", self.weight_decay),
            ));
        }
        Ok(())
    }
}

/// One parameter's moments and its own step count (torch keeps `step` per parameter).
#[derive(Clone, Debug)]
struct ParamState {
    step: u64,
    exp_avg: Tensor<1>,
    exp_avg_sq: Tensor<1>,
}

/// A micro-batch's share of the step's loss under gradient accumulation: `loss / k` (the
/// scripts' `loss / gradient_accumulation_steps` before the backward), `loss` itself for `k`
/// of 1.
pub(crate) fn accumulation_share(loss: Tensor<1>, k: usize) -> Tensor<1> {
    if k > 1 {
        loss.div_scalar(k as f64)
    } else {
        loss
    }
}

/// One optimizer step as accelerate runs it for the scripts: under fp16 unscale the gradients
/// and check them (`grad_scaler`), clip them by their global norm (`max_grad_norm`), step
/// `module` with AdamW at `lr` unless a gradient is not finite, and update the loss scale.
/// Returns the gradient norm (before clipping) and the updated module, `None` for a skipped
/// step; the caller counts the step, and the skipped step, whose learning rate the schedule
/// does not advance past (accelerate skips the scheduler's step with the optimizer's).
///
/// # Errors
/// As [`AdamW::step`].
pub(crate) fn scaled_step<M: Module>(
    optimizer: &mut AdamW,
    grad_scaler: &mut Option<crate::mixed_precision::GradScaler>,
    max_grad_norm: Option<f64>,
    lr: f64,
    module: M,
    mut grads: FlatGradients,
) -> Result<(f32, Option<M>)> {
    let found_inf = match grad_scaler.as_ref() {
        Some(scaler) => scaler.unscale(&mut grads),
        None => false,
    };
    let grad_norm = match max_grad_norm {
        Some(max_norm) => grads.clip_grad_norm(max_norm),
        None => grads.total_norm(),
    };
    let updated = if found_inf {
        None
    } else {
        Some(optimizer.step(lr, module, grads)?)
    };
    if let Some(scaler) = grad_scaler.as_mut() {
        scaler.update(found_inf);
    }
    Ok((grad_norm, updated))
}

/// The summed gradients and loss of the micro-batches of the optimizer step in progress
/// (gradient accumulation).
#[derive(Debug, Default)]
pub(crate) struct Accumulator {
    sum: Option<(FlatGradients, f32)>,
    micro: usize,
}

impl Accumulator {
    /// Add one micro-batch's gradients and loss value; `true` when that makes `k` of them (the
    /// optimizer step is due).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the gradients do not fit the accumulated ones.
    pub(crate) fn add(&mut self, grads: FlatGradients, value: f32, k: usize) -> Result<bool> {
        self.sum = Some(match self.sum.take() {
            Some((mut sum, total)) => {
                sum.accumulate(grads)?;
                (sum, total + value)
            }
            None => (grads, value),
        });
        self.micro += 1;
        Ok(self.micro >= k)
    }

    /// Take the sums (and start the next step's).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `step` when nothing was accumulated.
    pub(crate) fn take(&mut self) -> Result<(FlatGradients, f32)> {
        self.micro = 0;
        self.sum
            .take()
            .ok_or_else(|| Error::invalid_argument("step", "no micro-batch was accumulated"))
    }

    /// Whether micro-batches of an unfinished step are held.
    pub(crate) fn is_pending(&self) -> bool {
        self.sum.is_some()
    }
}

/// A module's gradients, flattened per parameter in visit order.
#[derive(Clone, Debug)]
pub struct FlatGradients {
    grads: Vec<Option<Tensor<1>>>,
}

impl FlatGradients {
    /// Take the gradients of `module`'s parameters out of a backward pass.
    pub fn from_backward<M: Module>(module: &M, mut grads: Gradients) -> Self {
        Self {
            grads: params::gradients(module, &mut grads),
        }
    }

    /// These gradients moved onto `device` (data parallelism gathers every replica's gradients
    /// on the main device before averaging them; see [`crate::data_parallel`]).
    pub fn to_device(self, device: &diffusion_core::Device) -> Self {
        Self {
            grads: self
                .grads
                .into_iter()
                .map(|g| g.map(|g| g.to_device(device)))
                .collect(),
        }
    }

    /// Gradients given per parameter (flattened; `None` for a parameter without one).
    pub fn from_tensors(grads: Vec<Option<Tensor<1>>>) -> Self {
        Self { grads }
    }

    /// The gradients, flattened per parameter.
    pub fn tensors(&self) -> &[Option<Tensor<1>>] {
        &self.grads
    }

    /// Whether every gradient element is finite (no inf or NaN), checked element by element as
    /// torch's `_amp_foreach_non_finite_check_and_unscale_` does.
    pub fn all_finite(&self) -> bool {
        self.grads.iter().flatten().all(|g| {
            g.clone()
                .is_finite()
                .all()
                .into_data()
                .iter::<bool>()
                .all(|b| b)
        })
    }

    /// Multiply every gradient by `factor` (in the gradients' dtype).
    pub fn mul_scalar(&mut self, factor: f32) {
        for g in self.grads.iter_mut().flatten() {
            *g = g.clone().mul_scalar(factor);
        }
    }

    /// The number of parameters (with or without a gradient).
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Add `other`'s gradients to these, as successive `backward()` calls add into `.grad`
    /// (gradient accumulation); a parameter keeps `None` only when both lack a gradient.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `gradients` when the parameter counts differ.
    pub fn accumulate(&mut self, other: FlatGradients) -> Result<()> {
        if other.grads.len() != self.grads.len() {
            return Err(Error::invalid_argument(
                "gradients",
                format!(
                    "{} gradients added to {}",
                    other.grads.len(),
                    self.grads.len()
                ),
            ));
        }
        for (mine, theirs) in self.grads.iter_mut().zip(other.grads) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) => Some(a.add(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(())
    }

    /// The global L2 norm over all gradients, as `clip_grad_norm_` computes it: the norm of the
    /// per-tensor norms.
    pub fn total_norm(&self) -> f32 {
        let norms: Vec<Tensor<1>> = self
            .grads
            .iter()
            .flatten()
            .map(|g| g.clone().square().sum().sqrt())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        let norms = diffusion_core::tensor::to_vec(Tensor::cat(norms, 0));
        let sum: f64 = norms.iter().map(|&n| f64::from(n) * f64::from(n)).sum();
        sum.sqrt() as f32
    }

    /// `torch.nn.utils.clip_grad_norm_(parameters, max_norm)`: scale every gradient by
    /// `max_norm / (total_norm + 1e-6)` when that is below 1. Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f32 {
        let total = self.total_norm();
        let coef = max_norm as f32 / (total + 1e-6);
        if coef < 1.0 {
            for g in self.grads.iter_mut().flatten() {
                *g = g.clone().mul_scalar(coef);
            }
        }
        total
    }

    /// The gradients as a diffusers state dict of `module` (keys and PyTorch layout as in its
    /// weight file), with zeros for parameters that have no gradient.
    pub fn state_dict<M: Module>(&self, module: &M) -> Vec<NamedTensor> {
        state_dict(&shadow(module, self.grads.clone()))
    }
}

/// `module` without autodiff with parameter `i` replaced by `values[i]`, zeros where `None`.
fn shadow<M: Module>(module: &M, values: Vec<Option<Tensor<1>>>) -> M {
    let inner = module.valid();
    let infos = params::infos(&inner);
    let device = module_device(&inner);
    let filled = values
        .into_iter()
        .zip(&infos)
        .map(|(v, info)| {
            Some(v.unwrap_or_else(|| Tensor::zeros([params::numel(&info.shape)], &device)))
        })
        .collect();
    params::replace(inner, filled)
}

/// The device of a module's first parameter (the default device for a module without any).
pub(crate) fn module_device<M: Module>(module: &M) -> diffusion_core::Device {
    module.devices().into_iter().next().unwrap_or_default()
}

/// The file names of a saved optimizer state inside its folder.
const EXP_AVG_FILE: &str = "exp_avg.safetensors";
const EXP_AVG_SQ_FILE: &str = "exp_avg_sq.safetensors";
const STATE_FILE: &str = "optimizer.json";

/// What `optimizer.json` holds besides the moment tensors.
#[derive(Serialize, Deserialize)]
struct SavedState {
    config: AdamWConfig,
    /// Step count of each parameter in visit order (0: no state yet).
    steps: Vec<u64>,
}

/// `torch.optim.AdamW` over a module's parameters.
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    states: Vec<Option<ParamState>>,
}

impl AdamW {
    /// An optimizer with empty state (torch creates states lazily at the first step).
    ///
    /// # Errors
    /// As [`AdamWConfig::validate`].
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            states: Vec::new(),
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The step count of the most advanced parameter (0 before the first step).
    pub fn step_count(&self) -> u64 {
        self.states
            .iter()
            .flatten()
            .map(|s| s.step)
            .max()
            .unwrap_or(0)
    }

    /// One `optimizer.step()` at learning rate `lr`: parameters with a gradient are updated,
    /// the others are left as they are (and keep no state), as in torch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `gradients` when they were taken from a module with a
    /// different number of parameters.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, grads: FlatGradients) -> Result<M> {
        let values = params::values(&module);
        if grads.len() != values.len() {
            return Err(Error::invalid_argument(
                "gradients",
                format!(
                    "{} gradients for a module with {} parameters",
                    grads.len(),
                    values.len()
                ),
            ));
        }
        if self.states.is_empty() {
            self.states = vec![None; values.len()];
        } else if self.states.len() != values.len() {
            return Err(Error::invalid_argument(
                "module",
                format!(
                    "the optimizer holds state for {} parameters, the module has {}",
                    self.states.len(),
                    values.len()
                ),
            ));
        }
        let c = &self.config;
        let updated = values
            .into_iter()
            .zip(grads.grads)
            .zip(self.states.iter_mut())
            .map(|((p, g), state)| {
                let g = g?;
                let st = state.get_or_insert_with(|| ParamState {
                    step: 0,
                    exp_avg: p.zeros_like(),
                    exp_avg_sq: p.zeros_like(),
                });
                Some(adamw_update(c, lr, p, g, st))
            })
            .collect();
        Ok(params::replace(module, updated))
    }

    /// Write the state into folder `dir`: `exp_avg.safetensors` and `exp_avg_sq.safetensors`
    /// under `module`'s diffusers keys (PyTorch layout), and `optimizer.json` with the
    /// hyperparameters and per-parameter step counts.
    ///
    /// # Errors
    /// [`Error::Io`] when writing fails; [`Error::InvalidArgument`] when `module` has a
    /// different number of parameters than the state.
    pub fn save<M: Module>(&self, module: &M, dir: &Path) -> Result<()> {
        let n = params::infos(module).len();
        if !self.states.is_empty() && self.states.len() != n {
            return Err(Error::invalid_argument(
                "module",
                format!(
                    "the optimizer holds state for {} parameters, the module has {n}",
                    self.states.len()
                ),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let states: Vec<Option<&ParamState>> = if self.states.is_empty() {
            vec![None; n]
        } else {
            self.states.iter().map(Option::as_ref).collect()
        };
        let pick = |f: fn(&ParamState) -> &Tensor<1>| {
            states
                .iter()
                .map(|s| s.map(|s| f(s).clone()))
                .collect::<Vec<_>>()
        };
        save_weights(
            &shadow(module, pick(|s| &s.exp_avg)),
            dir.join(EXP_AVG_FILE),
            SaveDtype::F32,
        )?;
        save_weights(
            &shadow(module, pick(|s| &s.exp_avg_sq)),
            dir.join(EXP_AVG_SQ_FILE),
            SaveDtype::F32,
        )?;
        let saved = SavedState {
            config: self.config.clone(),
            steps: states.iter().map(|s| s.map_or(0, |s| s.step)).collect(),
        };
        let text = serde_json::to_string_pretty(&saved).unwrap_or_default();
        diffusion_core::config::write_atomically(&dir.join(STATE_FILE), text.as_bytes())
    }

    /// Read a state written by [`Self::save`] for `module`'s parameters. The hyperparameters
    /// are `config`'s (a resumed run may change them, as with torch's `load_state_dict` followed
    /// by new param-group settings); only the state is read.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for unreadable files, strict weight-loading errors naming
    /// the key for tensors that do not match `module`, [`Error::ConfigField`] (`steps`) when the
    /// step list does not match the module.
    pub fn load<M: Module>(config: AdamWConfig, module: &M, dir: &Path) -> Result<Self> {
        config.validate()?;
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let value = diffusion_core::config::parse_json(&text, &state_path)?;
        let saved: SavedState = serde_json::from_value(value).map_err(|e| Error::ConfigField {
            path: state_path.clone(),
            field: "<root>".into(),
            message: e.to_string(),
        })?;
        let infos: Vec<ParamInfo> = params::infos(module);
        if saved.steps.len() != infos.len() {
            return Err(Error::ConfigField {
                path: state_path,
                field: "steps".into(),
                message: format!(
                    "{} entries for a model with {} parameters",
                    saved.steps.len(),
                    infos.len()
                ),
            });
        }
        let read = |file: &str| -> Result<Vec<Tensor<1>>> {
            let source = WeightSource::open(dir.join(file))?;
            let (loaded, _) = load_weights(module.valid(), &source, LoadMode::Strict)?;
            Ok(params::values(&loaded))
        };
        let exp_avg = read(EXP_AVG_FILE)?;
        let exp_avg_sq = read(EXP_AVG_SQ_FILE)?;
        let states = saved
            .steps
            .iter()
            .zip(exp_avg.into_iter().zip(exp_avg_sq))
            .map(|(&step, (exp_avg, exp_avg_sq))| {
                (step > 0).then_some(ParamState {
                    step,
                    exp_avg,
                    exp_avg_sq,
                })
            })
            .collect();
        Ok(Self { config, states })
    }
}

/// torch's single-tensor AdamW update for one parameter, in torch's order of operations.
fn adamw_update(
    c: &AdamWConfig,
    lr: f64,
    p: Tensor<1>,
    g: Tensor<1>,
    st: &mut ParamState,
) -> Tensor<1> {
    st.step += 1;
    let mut p = p;
    if c.weight_decay != 0.0 {
        p = p.mul_scalar(1.0 - lr * c.weight_decay);
    }
    // exp_avg.lerp_(grad, 1 - beta1): torch computes `self + w * (end - self)` for w < 0.5.
    let w = 1.0 - c.beta1;
    st.exp_avg = if w < 0.5 {
        st.exp_avg
            .clone()
            .add(g.clone().sub(st.exp_avg.clone()).mul_scalar(w))
    } else {
        g.clone()
            .sub(g.clone().sub(st.exp_avg.clone()).mul_scalar(1.0 - w))
    };
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    st.exp_avg_sq = st
        .exp_avg_sq
        .clone()
        .mul_scalar(c.beta2)
        .add(g.clone().mul_scalar(1.0 - c.beta2).mul(g));
    let t = st.step as f64;
    let bias_correction1 = 1.0 - c.beta1.powf(t);
    let bias_correction2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
    let step_size = lr / bias_correction1;
    let denom = st
        .exp_avg_sq
        .clone()
        .sqrt()
        .div_scalar(bias_correction2_sqrt)
        .add_scalar(c.epsilon);
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    p.add(st.exp_avg.clone().mul_scalar(-step_size).div(denom))
}
