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
//!
//! The same type adapts a CLIP text encoder ([`UNetLora::new_text_encoder`],
//! train_dreambooth_lora.py's `--train_text_encoder`); [`save_lora_weights`] writes both into
//! one file, the text encoder's as `text_encoder.<module>.lora_linear_layer.{down,up}.weight`.
//! SDXL's second text encoder ([`UNetLora::new_text_encoder_2`]) goes in as `text_encoder_2.`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use diffusion_core::burn;
use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::weights::{NamedTensor, SafetensorsFile};
use diffusion_core::{Device, Error, Result, TorchGenerator};
use diffusion_models::state_dict::{KeyedParamMapper, map_params_by_key, param_shapes};
use diffusion_models::{CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel};

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
    /// train_dreambooth_lora.py's text-encoder `LoraConfig` (`--train_text_encoder`): rank
    /// `rank`, `lora_alpha = rank`, the CLIP attention projections.
    pub fn text_encoder(rank: usize) -> Self {
        Self {
            rank,
            alpha: None,
            target_modules: ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(String::from)
                .to_vec(),
        }
    }

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
    component: LoraComponent,
    modules: Vec<String>,
    factors: LoraFactors,
    rank: usize,
    alpha: f64,
}

/// Which model a [`UNetLora`] adapts; it names the keys of the saved file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraComponent {
    /// The UNet (`unet.<module>.lora.down.weight`).
    Unet,
    /// The CLIP text encoder (`text_encoder.<module>.lora_linear_layer.down.weight`, the module
    /// path without CLIP's `text_model.` level, as diffusers 0.42 writes it with transformers 5).
    TextEncoder,
    /// SDXL's second text encoder, a `CLIPTextModelWithProjection`
    /// (`text_encoder_2.<module>.lora_linear_layer.down.weight`; diffusers 0.42 with
    /// transformers 5 keeps its `text_model.` level).
    TextEncoder2,
}

impl LoraComponent {
    /// The key prefix of the component in a diffusers LoRA file (`unet`, `text_encoder`).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The module path as peft and diffusers name it: CLIP's without `text_model.`.
    fn module_name(self, module: &str) -> &str {
        match self {
            Self::Unet | Self::TextEncoder2 => module,
            Self::TextEncoder => module.strip_prefix("text_model.").unwrap_or(module),
        }
    }

    /// The names of the down and up factors in a diffusers file.
    fn file_parts(self) -> [&'static str; 2] {
        match self {
            Self::Unet => ["lora.down", "lora.up"],
            Self::TextEncoder | Self::TextEncoder2 => {
                ["lora_linear_layer.down", "lora_linear_layer.up"]
            }
        }
    }
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
        Self::build(
            LoraComponent::Unet,
            param_shapes(unet),
            config,
            seed,
            device,
        )
    }

    /// A LoRA on the linear layers of a CLIP text encoder, as train_dreambooth_lora.py's
    /// `--train_text_encoder` adds it (target modules `q_proj`, `k_proj`, `v_proj`, `out_proj`
    /// in [`LoraTrainConfig::text_encoder`]), initialised as [`Self::new`] initialises.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn new_text_encoder(
        text_encoder: &CLIPTextModel,
        config: &LoraTrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::build(
            LoraComponent::TextEncoder,
            param_shapes(text_encoder),
            config,
            seed,
            device,
        )
    }

    /// A LoRA on the linear layers of SDXL's second text encoder, as
    /// train_text_to_image_lora_sdxl.py's `--train_text_encoder` adds it (the configuration of
    /// [`Self::new_text_encoder`]), initialised as [`Self::new`] initialises.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn new_text_encoder_2(
        text_encoder_2: &CLIPTextModelWithProjection,
        config: &LoraTrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::build(
            LoraComponent::TextEncoder2,
            param_shapes(text_encoder_2),
            config,
            seed,
            device,
        )
    }

    fn build(
        component: LoraComponent,
        shapes: BTreeMap<String, Vec<usize>>,
        config: &LoraTrainConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let targets = target_shapes(shapes, &config.target_modules);
        if targets.is_empty() {
            return Err(Error::invalid_argument(
                "target_modules",
                format!(
                    "{:?} match no linear layer of the {}",
                    config.target_modules,
                    component.prefix()
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
            component,
            modules,
            factors: LoraFactors { down, up },
            rank: r,
            alpha: config.alpha(),
        })
    }

    /// The model this LoRA adapts.
    pub fn component(&self) -> LoraComponent {
        self.component
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
        self.factors = crate::autodiff::checkpointed(self.factors.fork(device).train(), device);
        self
    }

    /// Overwrite the factors with tensors of `source` named `{prefix}{module}.lora_A.weight` /
    /// `.lora_B.weight` (peft) or `{prefix}{module}.lora.down.weight` / `.lora.up.weight`
    /// (diffusers; `.lora_linear_layer.down.weight` / `.up.weight` for text encoders), e.g. a
    /// file this type saved (`prefix = "unet."` or `"text_encoder."`). A text encoder's
    /// modules are looked up with and without CLIP's `text_model.` level.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`lora`) naming a module with no factors; [`Error::TensorShape`] for a factor of the wrong shape; read errors.
    pub fn load_factors(&mut self, source: &SafetensorsFile, prefix: &str) -> Result<()> {
        let device = self.device();
        let keys: Vec<String> = source.keys();
        let mut down = Vec::new();
        let mut up = Vec::new();
        for (i, module) in self.modules.iter().enumerate() {
            let pick = |parts: [&str; 3],
                        old: &Param<Tensor<2>>|
             -> Result<Option<Param<Tensor<2>>>> {
                let names = [module.as_str(), self.component.module_name(module)];
                for (part, name) in parts.iter().flat_map(|p| names.map(|n| (p, n))) {
                    let key = format!("{prefix}{name}.{part}");
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
            let a = pick(
                [
                    "lora_A.weight",
                    "lora.down.weight",
                    "lora_linear_layer.down.weight",
                ],
                &self.factors.down[i],
            )?;
            let b = pick(
                [
                    "lora_B.weight",
                    "lora.up.weight",
                    "lora_linear_layer.up.weight",
                ],
                &self.factors.up[i],
            )?;
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
        self.apply_to(base)
    }

    /// [`Self::apply`] for any model whose parameter keys hold the adapted modules (the text
    /// encoder of a [`LoraComponent::TextEncoder`] LoRA).
    pub fn apply_to<M: Module>(&self, base: &M) -> M {
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

    /// The factors as peft names them (`<module>.lora_A.weight`, `<module>.lora_B.weight`;
    /// a text encoder's modules without `text_model.`), PyTorch layout, sorted by key.
    pub fn state_dict(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (m, (a, b)) in self
            .modules
            .iter()
            .zip(self.factors.down.iter().zip(&self.factors.up))
        {
            let m = self.component.module_name(m);
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
        self.name_factor_tensors(grads.state_dict(&self.factors))
    }

    /// Rename tensors keyed as [`LoraFactors`]' own state dict (`down.3`, `up.3`) to peft's
    /// names, as [`Self::state_dict`] names the factors; other keys are dropped.
    pub fn name_factor_tensors(&self, tensors: Vec<NamedTensor>) -> Vec<NamedTensor> {
        let mut out: Vec<NamedTensor> = tensors
            .into_iter()
            .filter_map(|mut t| {
                let (part, index) = t.key.split_once('.')?;
                let module = self.modules.get(index.parse::<usize>().ok()?)?;
                let module = self.component.module_name(module);
                let name = match part {
                    "down" => "lora_A",
                    "up" => "lora_B",
                    _ => return None,
                };
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
    /// As [`save_lora_weights`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_lora_weights(path, &[self])
    }

    /// The factors under the keys of a diffusers LoRA file, PyTorch layout, little-endian f32.
    fn file_tensors(&self) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        let prefix = self.component.prefix();
        let [down, up] = self.component.file_parts();
        let mut tensors = Vec::new();
        for (m, (a, b)) in self
            .modules
            .iter()
            .zip(self.factors.down.iter().zip(&self.factors.up))
        {
            let m = self.component.module_name(m);
            for (part, t) in [(down, a), (up, b)] {
                let t = t.val();
                let shape = t.dims().to_vec();
                let bytes = diffusion_core::tensor::to_vec(t)
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                tensors.push((format!("{prefix}.{m}.{part}.weight"), shape, bytes));
            }
        }
        tensors
    }

    /// diffusers' packed `LoraConfig` fields of the component (`unet.r`, `unet.lora_alpha`,
    /// ...).
    fn adapter_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        let targets: Vec<&str> = {
            let mut t: Vec<&str> = self
                .modules
                .iter()
                .map(|m| self.component.module_name(m))
                .collect();
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
        let p = self.component.prefix();
        let fields = [
            ("r", serde_json::json!(self.rank)),
            ("lora_alpha", number(self.alpha)),
            ("rank_pattern", serde_json::json!({})),
            ("alpha_pattern", serde_json::json!({})),
            ("target_modules", serde_json::json!(targets)),
            ("lora_bias", serde_json::json!(false)),
            ("use_dora", serde_json::json!(false)),
            ("use_rslora", serde_json::json!(false)),
            ("peft_type", serde_json::json!("LORA")),
        ];
        fields
            .into_iter()
            .map(|(k, v)| (format!("{p}.{k}"), v))
            .collect()
    }
}

/// Write LoRAs into one file as diffusers' `save_lora_weights(unet_lora_layers=...,
/// text_encoder_lora_layers=...)` does, which is what train_dreambooth_lora.py writes with
/// `--train_text_encoder`: `unet.<module>.lora.{down,up}.weight` and
/// `text_encoder.<module>.lora_linear_layer.{down,up}.weight`, metadata `{"format": "pt"}`, plus
/// `lora_adapter_metadata` when some LoRA has `alpha != r`. `path` is the file, or a folder that
/// gets [`LORA_WEIGHT_NAME`]; the file is written atomically.
///
/// # Errors
/// [`Error::InvalidArgument`] (`lora`) for two LoRAs of one component; [`Error::Io`],
/// [`Error::Safetensors`].
pub fn save_lora_weights(path: impl AsRef<Path>, loras: &[&UNetLora]) -> Result<()> {
    let path = path.as_ref();
    let path = if path.is_dir() {
        path.join(LORA_WEIGHT_NAME)
    } else {
        path.to_path_buf()
    };
    for (i, l) in loras.iter().enumerate() {
        if loras[..i].iter().any(|o| o.component == l.component) {
            return Err(Error::invalid_argument(
                "lora",
                format!("two LoRAs of the {}", l.component.prefix()),
            ));
        }
    }
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
        loras.iter().flat_map(|l| l.file_tensors()).collect();
    let mut info = HashMap::from([("format".to_string(), "pt".to_string())]);
    if loras.iter().any(|l| l.alpha != l.rank as f64) {
        let mut all = serde_json::Map::new();
        for l in loras {
            all.extend(l.adapter_metadata());
        }
        info.insert(
            ADAPTER_METADATA_KEY.to_string(),
            serde_json::Value::Object(all).to_string(),
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

/// The linear layers (2-D `<module>.weight`) whose module path matches a target, with their
/// PyTorch shapes `[out, in]`, sorted by path.
fn target_shapes(
    shapes: BTreeMap<String, Vec<usize>>,
    targets: &[String],
) -> BTreeMap<String, [usize; 2]> {
    shapes
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
