//! LoRA training of a `UNet2DConditionModel`, as train_text_to_image_lora.py sets it up with
//! peft: rank-`r` factors `A: [r, in]` and `B: [out, r]` on the attention projections
//! (`to_q`, `to_k`, `to_v`, `to_out.0`), scale `alpha / r`, base weights frozen and only the
//! factors in the optimizer.
//!
//! # How the factors enter the forward pass
//!
//! The UNet has no LoRA branch; every step builds its adapted weights in the autodiff graph,
//! `W = W0 + (alpha / r) · B A` with `W0` a constant, and runs the plain UNet on them
//! ([`UNetLora::apply`]). The gradients reaching `A` and `B` are those of peft's unmerged
//! `x W0ᵀ + (alpha / r) · (x Aᵀ) Bᵀ`, up to float rounding.
//!
//! # Files
//!
//! [`UNetLora::save`] writes what train_text_to_image_lora.py writes
//! (`convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))` through
//! `StableDiffusionPipeline.save_lora_weights`): `pytorch_lora_weights.safetensors` with
//! `unet.<module>.lora.down.weight` (`A`) and `unet.<module>.lora.up.weight` (`B`) and only
//! `{"format": "pt"}` as metadata. That layout carries no alpha, so loaders assume
//! `alpha = r` (the script always trains with `lora_alpha = rank`); when `alpha != r` the file
//! also gets diffusers' `lora_adapter_metadata` (`unet.r`, `unet.lora_alpha`, ...), as
//! `save_lora_weights(..., unet_lora_adapter_metadata=...)` writes it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use diffusion_core::burn;
use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::weights::{NamedTensor, SafetensorsFile};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::UNet2DConditionModel;
use diffusion_models::state_dict::{KeyedParamMapper, map_params_by_key, param_shapes};

/// The file name diffusers' `save_lora_weights` uses.
pub const LORA_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// The metadata key of diffusers' adapter config.
const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// What to adapt and how. `Default` is train_text_to_image_lora.py's `LoraConfig` with its
/// default `--rank 4`: `r = lora_alpha = 4`, gaussian init, the four attention projections.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraTrainConfig {
    /// The rank `r` (`--rank`).
    pub rank: usize,
    /// `lora_alpha`; the scale is `alpha / rank`. `None`: equal to the rank, as the script sets it.
    pub alpha: Option<f64>,
    /// Module-name suffixes to adapt, peft's `target_modules` (a module matches when its path
    /// equals an entry or ends with `.` and the entry).
    pub target_modules: Vec<String>,
}

impl Default for LoraTrainConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: None,
            target_modules: ["to_k", "to_q", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl LoraTrainConfig {
    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `rank`, `lora_alpha` or `target_modules`.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid_argument("rank", "must be positive"));
        }
        let alpha = self.alpha();
        if !(alpha > 0.0 && alpha.is_finite()) {
            return Err(Error::invalid_argument(
                "lora_alpha",
                format!("{alpha} is not positive"),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(Error::invalid_argument("target_modules", "is empty"));
        }
        Ok(())
    }
}

/// The trainable factors, in module order: `down[i]` is `A` (`[r, in]`), `up[i]` is `B`
/// (`[out, r]`), both in PyTorch layout.
#[derive(Module, Debug)]
pub struct LoraFactors {
    /// `lora_A` per module.
    pub down: Vec<Param<Tensor<2>>>,
    /// `lora_B` per module.
    pub up: Vec<Param<Tensor<2>>>,
}

/// A LoRA on a UNet's linear layers: module paths, their factors and the scale.
#[derive(Clone, Debug)]
pub struct UNetLora {
    modules: Vec<String>,
    factors: LoraFactors,
    rank: usize,
    alpha: f64,
}

fn param(t: Tensor<2>, trainable: bool) -> Param<Tensor<2>> {
    let p = Param::from_tensor(t);
    if trainable {
        p
    } else {
        p.set_require_grad(false)
    }
}

impl UNetLora {
    /// Adapt every linear layer of `unet` that `config.target_modules` names, initialised as
    /// train_text_to_image_lora.py asks peft to (`init_lora_weights="gaussian"`): `A` normal
    /// with standard deviation `1 / r`, `B` zero. `A` is drawn module by module in key order
    /// from a [`TorchGenerator`] seeded with `seed` (peft draws from torch's global generator,
    /// interleaved with `nn.Linear`'s own initialisation, so the values are not peft's; inject
    /// those with [`Self::load_factors`] when they matter).
    ///
    /// # Errors
    /// As [`LoraTrainConfig::validate`]; [`Error::InvalidArgument`] (`target_modules`) when
    /// no linear layer matches.
    pub fn new(
        unet: &UNet2DConditionModel,
        config: &LoraTrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let targets = target_shapes(unet, &config.target_modules);
        if targets.is_empty() {
            return Err(Error::invalid_argument(
                "target_modules",
                format!(
                    "{:?} match no linear layer of the UNet",
                    config.target_modules
                ),
            ));
        }
        let r = config.rank;
        let mut g = TorchGenerator::new(seed);
        let std = 1.0 / r as f32;
        let mut down = Vec::new();
        let mut up = Vec::new();
        let mut modules = Vec::new();
        for (module, [out, inp]) in targets {
            let a: Vec<f32> = g.randn(&[r, inp]).into_iter().map(|v| v * std).collect();
            down.push(param(
                Tensor::from_data(TensorData::new(a, [r, inp]), device),
                true,
            ));
            up.push(param(Tensor::zeros([out, r], device), true));
            modules.push(module);
        }
        Ok(Self {
            modules,
            factors: LoraFactors { down, up },
            rank: r,
            alpha: config.alpha(),
        })
    }

    /// The adapted module paths (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `lora_alpha`.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The factors (what the optimizer trains).
    pub fn factors(&self) -> &LoraFactors {
        &self.factors
    }

    /// Replace the factors (after an optimizer step).
    ///
    /// # Panics
    /// When the new factors are not one `A` and one `B` per module.
    pub fn set_factors(&mut self, factors: LoraFactors) {
        assert_eq!(factors.down.len(), self.modules.len(), "LoRA factor count");
        assert_eq!(factors.up.len(), self.modules.len(), "LoRA factor count");
        self.factors = factors;
    }

    /// Move the factors onto `device` (autodiff or not), keeping trainability.
    pub fn fork(mut self, device: &Device) -> Self {
        // `train` applies the configured trainability on an autodiff device.
        self.factors = self.factors.fork(device).train();
        self
    }

    /// Overwrite the factors with tensors of `source` named `{prefix}{module}.lora_A.weight` /
    /// `.lora_B.weight` (peft) or `{prefix}{module}.lora.down.weight` / `.lora.up.weight`
    /// (diffusers), e.g. a file this type saved (`prefix = "unet."`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`lora`) naming a module with no factors; [`Error::TensorShape`] for a factor of the wrong shape; read errors.
    pub fn load_factors(&mut self, source: &SafetensorsFile, prefix: &str) -> Result<()> {
        let device = self.device();
        let keys: Vec<String> = source.keys();
        let mut down = Vec::new();
        let mut up = Vec::new();
        for (i, module) in self.modules.iter().enumerate() {
            let pick = |parts: [&str; 2],
                        old: &Param<Tensor<2>>|
             -> Result<Option<Param<Tensor<2>>>> {
                for part in parts {
                    let key = format!("{prefix}{module}.{part}");
                    if keys.contains(&key) {
                        let (values, shape) = source.read_f32(&key)?;
                        let want = old.val().dims().to_vec();
                        if shape != want {
                            return Err(Error::TensorShape {
                                path: source.path().to_path_buf(),
                                key,
                                expected: want,
                                got: shape,
                            });
                        }
                        let t =
                            Tensor::from_data(TensorData::new(values, [want[0], want[1]]), &device);
                        return Ok(Some(param(t, true)));
                    }
                }
                Ok(None)
            };
            let a = pick(["lora_A.weight", "lora.down.weight"], &self.factors.down[i])?;
            let b = pick(["lora_B.weight", "lora.up.weight"], &self.factors.up[i])?;
            match (a, b) {
                (Some(a), Some(b)) => {
                    down.push(a);
                    up.push(b);
                }
                _ => {
                    return Err(Error::invalid_argument(
                        "lora",
                        format!(
                            "{}: no factors for `{prefix}{module}`",
                            source.path().display()
                        ),
                    ));
                }
            }
        }
        self.factors = LoraFactors { down, up };
        Ok(())
    }

    fn device(&self) -> Device {
        self.factors
            .devices()
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    /// `base` with every adapted weight replaced by `W0 + scale · B A`, built in the autodiff
    /// graph of the factors when they are on an autodiff device.
    pub fn apply(&self, base: &UNet2DConditionModel) -> UNet2DConditionModel {
        let scale = self.scale();
        let deltas: HashMap<String, Tensor<2>> = self
            .modules
            .iter()
            .zip(self.factors.down.iter().zip(&self.factors.up))
            .map(|(m, (a, b))| {
                // burn keeps a Linear's weight as [in, out]: (B A)ᵀ = Aᵀ Bᵀ.
                let delta = a
                    .val()
                    .transpose()
                    .matmul(b.val().transpose())
                    .mul_scalar(scale);
                (format!("{m}.weight"), delta)
            })
            .collect();
        map_params_by_key(base.clone(), &mut AddDelta { deltas })
    }

    /// The factors as peft names them (`<module>.lora_A.weight`, `<module>.lora_B.weight`),
    /// PyTorch layout, sorted by key.
    pub fn state_dict(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (m, (a, b)) in self
            .modules
            .iter()
            .zip(self.factors.down.iter().zip(&self.factors.up))
        {
            for (part, t) in [("lora_A", a), ("lora_B", b)] {
                let t = t.val();
                out.push(NamedTensor {
                    key: format!("{m}.{part}.weight"),
                    shape: t.dims().to_vec(),
                    values: diffusion_core::tensor::to_vec(t),
                });
            }
        }
        out.sort_by(|x, y| x.key.cmp(&y.key));
        out
    }

    /// Gradients of the factors (taken with [`crate::FlatGradients::from_backward`] on
    /// [`Self::factors`]) under peft's names, as [`Self::state_dict`] names the factors.
    pub fn gradient_state_dict(&self, grads: &crate::FlatGradients) -> Vec<NamedTensor> {
        let mut out: Vec<NamedTensor> = grads
            .state_dict(&self.factors)
            .into_iter()
            .filter_map(|mut t| {
                let (part, index) = t.key.split_once('.')?;
                let module = self.modules.get(index.parse::<usize>().ok()?)?;
                let name = if part == "down" { "lora_A" } else { "lora_B" };
                t.key = format!("{module}.{name}.weight");
                Some(t)
            })
            .collect();
        out.sort_by(|x, y| x.key.cmp(&y.key));
        out
    }

    /// Write the LoRA as train_text_to_image_lora.py does (see the module docs): `path` is the
    /// file, or a folder that gets [`LORA_WEIGHT_NAME`].
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Safetensors`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let path = if path.is_dir() {
            path.join(LORA_WEIGHT_NAME)
        } else {
            path.to_path_buf()
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (m, (a, b)) in self
            .modules
            .iter()
            .zip(self.factors.down.iter().zip(&self.factors.up))
        {
            for (part, t) in [("lora.down", a), ("lora.up", b)] {
                let t = t.val();
                let shape = t.dims().to_vec();
                let bytes = diffusion_core::tensor::to_vec(t)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                tensors.push((format!("unet.{m}.{part}.weight"), shape, bytes));
            }
        }
        let mut info = HashMap::from([("format".to_string(), "pt".to_string())]);
        if self.alpha != self.rank as f64 {
            info.insert(
                ADAPTER_METADATA_KEY.to_string(),
                self.adapter_metadata().to_string(),
            );
        }
        let views = tensors
            .iter()
            .map(|(key, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|view| (key.as_str(), view))
                    .map_err(|e| Error::Safetensors {
                        path: path.clone(),
                        message: format!("`{key}`: {e}"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let data = safetensors::serialize(views, Some(info)).map_err(|e| Error::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        diffusion_core::config::write_atomically(&path, &data)
    }

    /// diffusers' packed `LoraConfig` fields of the UNet (`unet.r`, `unet.lora_alpha`, ...).
    fn adapter_metadata(&self) -> serde_json::Value {
        let targets: Vec<&str> = {
            let mut t: Vec<&str> = self.modules.iter().map(String::as_str).collect();
            t.sort();
            t
        };
        let number = |v: f64| {
            if v.fract() == 0.0 {
                serde_json::json!(v as i64)
            } else {
                serde_json::json!(v)
            }
        };
        serde_json::json!({
            "unet.r": self.rank,
            "unet.lora_alpha": number(self.alpha),
            "unet.rank_pattern": {},
            "unet.alpha_pattern": {},
            "unet.target_modules": targets,
            "unet.lora_bias": false,
            "unet.use_dora": false,
            "unet.use_rslora": false,
            "unet.peft_type": "LORA",
        })
    }
}

/// The linear layers (2-D `<module>.weight`) whose module path matches a target, with their
/// PyTorch shapes `[out, in]`, sorted by path.
fn target_shapes(unet: &UNet2DConditionModel, targets: &[String]) -> BTreeMap<String, [usize; 2]> {
    param_shapes(unet)
        .into_iter()
        .filter_map(|(key, shape)| {
            let module = key.strip_suffix(".weight")?;
            let matches = targets
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}")));
            (matches && shape.len() == 2).then(|| (module.to_string(), [shape[0], shape[1]]))
        })
        .collect()
}

struct AddDelta {
    deltas: HashMap<String, Tensor<2>>,
}

impl KeyedParamMapper for AddDelta {
    fn map_param<const D: usize>(
        &mut self,
        key: &str,
        _transposed: bool,
        param: Param<Tensor<D>>,
    ) -> Param<Tensor<D>> {
        match self.deltas.remove(key) {
            Some(delta) => param.map(|w| {
                let dims = w.dims();
                w.add(delta.reshape(dims))
            }),
            None => param,
        }
    }
}
