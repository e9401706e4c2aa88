//! `UNet2DConditionModel` against the diffusers oracle (`fixtures/oracle/gen_unet2d_condition.py`),
//! half precision, attention hooks, and the errors around it. One test binary with modules,
//! because linking burn is slow.

mod errors;
mod hooks;
mod ip_adapter;
mod loading;
mod parity;
mod precision;

use diffusion_models::ModelMixin;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use diffusion_core::Device;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::tensor::to_vec;
use diffusion_core::weights::{NamedTensor, WeightSource};
use diffusion_models::{
    AddedCondKwargs, ClassLabels, UNet2DConditionModel, UNet2DConditionOptions,
};

/// Absolute tolerance of every f32 comparison with the oracle.
pub const TOLERANCE: f32 = 1e-4;

/// `fixtures/unet2d_condition/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/unet2d_condition")
        .join(name)
}

pub fn device() -> Device {
    Device::flex()
}

pub fn load(case: &str) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::from_pretrained(fixture(case), &device())
        .with_context(|| case.to_string())
}

/// The oracle's inputs and outputs of one model.
pub struct Io {
    source: WeightSource,
}

impl Io {
    pub fn open(case: &str) -> Result<Self> {
        let path = fixture(case).join("io.safetensors");
        Ok(Self {
            source: WeightSource::open(&path).with_context(|| path.display().to_string())?,
        })
    }

    pub fn tensor<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        Ok(self.source.tensor::<D>(key, &device())?)
    }

    pub fn has(&self, key: &str) -> bool {
        self.source.contains(key)
    }

    /// The key of input `name` for `run`: `<run>/<name>` when the run overrides it.
    fn key(&self, run: &str, name: &str) -> Option<String> {
        let specific = format!("{run}/{name}");
        if self.has(&specific) {
            Some(specific)
        } else if self.has(name) {
            Some(name.to_string())
        } else {
            None
        }
    }

    pub fn input<const D: usize>(&self, run: &str, name: &str) -> Result<Tensor<D>> {
        let key = self
            .key(run, name)
            .with_context(|| format!("no input `{name}` for run `{run}`"))?;
        self.tensor(&key)
    }

    pub fn optional<const D: usize>(&self, run: &str, name: &str) -> Result<Option<Tensor<D>>> {
        self.key(run, name).map(|k| self.tensor(&k)).transpose()
    }

    /// `<run>/<prefix>.0`, `<run>/<prefix>.1`, ... while present.
    pub fn list(&self, run: &str, prefix: &str) -> Result<Option<Vec<Tensor<4>>>> {
        let mut out = Vec::new();
        while self.has(&format!("{run}/{prefix}.{}", out.len())) {
            out.push(self.tensor(&format!("{run}/{prefix}.{}", out.len()))?);
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// The run names (`t0`, `per_batch`, `controlnet`, ...), sorted.
    pub fn runs(&self) -> Vec<String> {
        self.source
            .keys()
            .filter_map(|k| k.strip_suffix("/out"))
            .map(str::to_string)
            .collect()
    }

    /// The extra inputs of `run`, in the form `model` takes them.
    pub fn options(&self, run: &str) -> Result<UNet2DConditionOptions> {
        // Integer labels are stored 1-D, embeddings 2-D.
        let class_labels = match self.key(run, "class_labels") {
            None => None,
            Some(key) if self.source.entry(&key).map(|e| e.shape.len()) == Some(1) => {
                let labels = to_vec(self.tensor::<1>(&key)?);
                Some(ClassLabels::Indices(
                    labels.iter().map(|&v| v as usize).collect(),
                ))
            }
            Some(key) => Some(ClassLabels::Embeddings(self.tensor::<2>(&key)?)),
        };
        let text_embeds = self.optional::<2>(run, "text_embeds")?;
        let time_ids = self.optional::<2>(run, "time_ids")?;
        let added_cond_kwargs =
            (text_embeds.is_some() || time_ids.is_some()).then(|| AddedCondKwargs {
                text_embeds,
                time_ids,
                image_embeds: None,
            });
        Ok(UNet2DConditionOptions {
            class_labels,
            timestep_cond: self.optional::<2>(run, "timestep_cond")?,
            added_cond_kwargs,
            encoder_attention_mask: self.optional::<2>(run, "encoder_attention_mask")?,
            down_block_additional_residuals: self.list(run, "down_residual")?,
            mid_block_additional_residual: self.optional::<4>(run, "mid_residual")?,
            down_intrablock_additional_residuals: self.list(run, "adapter")?,
            ip_adapter_masks: Vec::new(),
        })
    }

    /// Run `model` on the oracle's inputs of `run`.
    pub fn run(&self, model: &UNet2DConditionModel, run: &str) -> Result<Tensor<4>> {
        Ok(model.forward_with(
            self.input::<4>(run, "sample")?,
            self.tensor::<1>(&format!("{run}/timestep"))?,
            self.input::<3>(run, "encoder_hidden_states")?,
            self.options(run)?,
        )?)
    }
}

/// Largest absolute difference; fails on a length mismatch or a non-finite value.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert!(g.is_finite(), "non-finite output {g}");
            (g - w).abs()
        })
        .fold(0.0, f32::max)
}

/// All tensors of a weight file, as f32.
pub fn read_all(path: &Path) -> Result<Vec<NamedTensor>> {
    let source = WeightSource::open(path)?;
    source
        .keys()
        .map(|key| {
            let (values, shape) = source.read_f32(key)?;
            Ok(NamedTensor {
                key: key.to_string(),
                shape,
                values,
            })
        })
        .collect()
}

pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    to_vec(t)
}

/// A small 1-D tensor (timesteps).
pub fn values_tensor(values: &[f32]) -> Tensor<1> {
    diffusion_core::tensor::from_vec(values.to_vec(), [values.len()], &device())
}
