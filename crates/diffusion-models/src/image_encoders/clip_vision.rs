//! transformers' CLIP image encoders (`models/clip/modeling_clip.py`): `CLIPVisionModel` and
//! `CLIPVisionModelWithProjection` (the image encoder of IP-Adapter).
//!
//! Patch embedding (a strided convolution without bias), a learned class token and absolute
//! position embeddings, `pre_layrnorm` (transformers' spelling), the encoder layers shared with
//! the text encoders ([`CLIPEncoder`]) without a mask, and `post_layernorm` on the class token.
//! Attribute names equal transformers' state-dict keys
//! (`vision_model.encoder.layers.0.self_attn.q_proj.weight`).
//!
//! `from_pretrained` reads a bare `CLIPVisionConfig` `config.json` as well as a `CLIPConfig`
//! whose `vision_config` it takes (as transformers does); the weights of such a full `CLIPModel`
//! folder then also hold the text tower, which is skipped.

use std::path::{Path, PathBuf};

use diffusion_core::burn;
use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::nn::conv::{Conv2d, Conv2dConfig};
use diffusion_core::burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear};
use diffusion_core::burn::tensor::{Distribution, FloatDType, Tensor};
use diffusion_core::config::{Config, ConfigFile, read_json};
use diffusion_core::weights::{TRANSFORMERS_WEIGHTS_STEM, WeightSource, resolve_weights_for};
use diffusion_core::{Device, Error, Result};
use serde::{Deserialize, Serialize};

use crate::layers::{self, config_error};
use crate::modeling_utils::{CONFIG_NAME, PretrainedOptions};
use crate::state_dict::{LoadMode, LoadReport, load_weights_as};
use crate::text_encoders::clip::{
    CLIPActivation, CLIPEncoder, EncoderDims, projection, transformers_folder_methods,
};

/// transformers' `model_type` of a CLIP vision config.
const MODEL_TYPE: &str = "clip_vision_model";
/// The state-dict prefix of the vision transformer inside both models.
const VISION_MODEL_PREFIX: &str = "vision_model.";
/// The key under which a `CLIPConfig` nests its vision config (`base_config_key`).
const VISION_CONFIG_KEY: &str = "vision_config";

/// `CLIPVisionConfig` (transformers `models/clip/configuration_clip.py`); `Default` is its
/// `__init__` defaults (openai/clip-vit-base-patch32).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CLIPVisionConfig {
    /// Width of the patch embeddings and encoder layers.
    pub hidden_size: usize,
    /// Width of the feed-forward layers.
    pub intermediate_size: usize,
    /// Output width of `visual_projection` (used by the projection model only).
    pub projection_dim: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Channels of the input images.
    pub num_channels: usize,
    /// Side of the square input images.
    pub image_size: usize,
    /// Side of the square patches.
    pub patch_size: usize,
    /// Feed-forward activation: `"quick_gelu"` or `"gelu"`.
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Attention dropout (inert at inference).
    pub attention_dropout: f64,
    /// Initialisation scale (training only).
    pub initializer_range: f64,
    /// Initialisation factor (training only).
    pub initializer_factor: f64,
    /// transformers' `model_type` (`"clip_vision_model"`).
    pub model_type: Option<String>,
    /// transformers' `architectures`.
    pub architectures: Option<Vec<String>>,
    /// Dropout of older configs (inert at inference).
    pub dropout: f64,
    /// Storage dtype written by transformers (`torch_dtype` before v5, `dtype` since).
    pub torch_dtype: Option<String>,
    /// As `torch_dtype`, transformers 5's name.
    pub dtype: Option<String>,
    /// The transformers version that wrote the file.
    pub transformers_version: Option<String>,
}

impl Default for CLIPVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            model_type: Some(MODEL_TYPE.into()),
            architectures: None,
            dropout: 0.0,
            torch_dtype: None,
            dtype: None,
            transformers_version: None,
        }
    }
}

impl Config for CLIPVisionConfig {
    const CLASS_NAME: &'static str = "CLIPVisionModel";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        layers::check_transformer_dims(&positive, self.hidden_size, self.num_attention_heads)?;
        if self.patch_size > self.image_size {
            return Err((
                "patch_size".into(),
                format!(
                    "patches of {} pixels do not fit images of {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        Ok(())
    }
}

impl CLIPVisionConfig {
    /// Patches per side (`image_size // patch_size`).
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: the class token and one per patch.
    pub fn num_positions(&self) -> usize {
        self.grid_size() * self.grid_size() + 1
    }

    /// Read a transformers `config.json`: a `CLIPVisionConfig`, or a `CLIPConfig` whose
    /// `vision_config` is taken. Returns the config and whether it came from a `CLIPConfig`.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for an unreadable file; [`Error::ConfigField`] naming
    /// the file and field for a wrong type or an invalid value.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<(Self, bool)> {
        let path = path.as_ref();
        let mut value = read_json(path)?;
        let nested = match value.get_mut(VISION_CONFIG_KEY) {
            Some(inner) => {
                value = inner.take();
                true
            }
            None => false,
        };
        let file = ConfigFile::<Self>::from_value(value, path)?;
        Ok((file.config, nested))
    }
}

/// `CLIPVisionEmbeddings`: the class token and the patches, plus position embeddings.
#[derive(Module, Debug)]
pub struct CLIPVisionEmbeddings {
    /// The class token, `[hidden]`.
    pub class_embedding: Param<Tensor<1>>,
    /// `Conv2d(num_channels, hidden, patch_size, stride=patch_size, bias=False)`.
    pub patch_embedding: Conv2d,
    /// `[num_positions, hidden]`.
    pub position_embedding: Embedding,
}

impl CLIPVisionEmbeddings {
    fn new(config: &CLIPVisionConfig, device: &Device) -> Self {
        let p = config.patch_size;
        let class =
            Tensor::<1>::random([config.hidden_size], Distribution::Normal(0.0, 1.0), device);
        Self {
            class_embedding: Param::from_tensor(class),
            patch_embedding: Conv2dConfig::new([config.num_channels, config.hidden_size], [p, p])
                .with_stride([p, p])
                .with_bias(false)
                .init(device),
            position_embedding: EmbeddingConfig::new(config.num_positions(), config.hidden_size)
                .init(device),
        }
    }

    /// # Shapes
    /// - `pixel_values`: `[B, num_channels, image_size, image_size]`
    /// - output: `[B, num_positions, hidden]`
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let weight_dtype = self.patch_embedding.weight.val().dtype();
        // transformers casts the pixels to the patch embedding's dtype.
        let pixel_values = if pixel_values.dtype() == weight_dtype {
            pixel_values
        } else {
            pixel_values.cast(FloatDType::from(weight_dtype))
        };
        let [b, _, _, _] = pixel_values.dims();
        let patches = layers::conv(&self.patch_embedding, pixel_values);
        let [_, hidden, gh, gw] = patches.dims();
        let patches = patches.reshape([b, hidden, gh * gw]).swap_dims(1, 2);
        let class = self
            .class_embedding
            .val()
            .reshape([1, 1, hidden])
            .expand([b, 1, hidden]);
        let embeddings = Tensor::cat(vec![class, patches], 1);
        let positions = self.position_embedding.weight.val();
        let [n, _] = positions.dims();
        embeddings + positions.reshape([1, n, hidden])
    }
}

/// What [`CLIPVisionTransformer`] and [`CLIPVisionModel`] return
/// (`BaseModelOutputWithPooling` with `output_hidden_states`).
#[derive(Clone, Debug)]
pub struct CLIPVisionModelOutput {
    /// The last layer's output, `[B, num_positions, hidden]` (no final norm: transformers
    /// normalises only the pooled class token).
    pub last_hidden_state: Tensor<3>,
    /// `post_layernorm` of the class token, `[B, hidden]`.
    pub pooler_output: Tensor<2>,
    /// `pre_layrnorm` of the embeddings and every layer's output (`num_hidden_layers + 1`
    /// tensors of `[B, num_positions, hidden]`); IP-Adapter Plus takes `hidden_states[-2]`,
    /// see [`penultimate_hidden_state`].
    pub hidden_states: Vec<Tensor<3>>,
}

/// What [`CLIPVisionModelWithProjection`] returns (`CLIPVisionModelOutput` in transformers).
#[derive(Clone, Debug)]
pub struct CLIPVisionModelWithProjectionOutput {
    /// `visual_projection(pooler_output)`, `[B, projection_dim]` (IP-Adapter's image embeds).
    pub image_embeds: Tensor<2>,
    /// As [`CLIPVisionModelOutput::last_hidden_state`].
    pub last_hidden_state: Tensor<3>,
    /// As [`CLIPVisionModelOutput::hidden_states`].
    pub hidden_states: Vec<Tensor<3>>,
}

impl CLIPVisionModelWithProjectionOutput {
    /// `hidden_states[-2]`, the image features of IP-Adapter Plus / Full / FaceID Plus.
    ///
    /// # Errors
    /// As [`penultimate_hidden_state`].
    pub fn penultimate_hidden_state(&self) -> Result<Tensor<3>> {
        penultimate_hidden_state(&self.hidden_states)
    }
}

/// `hidden_states[-2]` of an encoder output.
///
/// # Errors
/// [`Error::InvalidArgument`] (`hidden_states`) for an encoder without layers (one state).
pub fn penultimate_hidden_state(hidden_states: &[Tensor<3>]) -> Result<Tensor<3>> {
    let n = hidden_states.len();
    if n < 2 {
        return Err(Error::invalid_argument(
            "hidden_states",
            format!("{n} hidden state(s): an encoder without layers has no hidden_states[-2]"),
        ));
    }
    Ok(hidden_states[n - 2].clone())
}

/// transformers' vision tower (`CLIPVisionTransformer`; the state-dict prefix `vision_model.`):
/// embeddings, `pre_layrnorm`, encoder and `post_layernorm`.
#[derive(Module, Debug)]
pub struct CLIPVisionTransformer {
    /// Patch, class and position embeddings.
    pub embeddings: CLIPVisionEmbeddings,
    /// Norm before the encoder (transformers' spelling).
    pub pre_layrnorm: LayerNorm,
    /// Encoder layers.
    pub encoder: CLIPEncoder,
    /// Norm of the pooled class token.
    pub post_layernorm: LayerNorm,
    #[module(skip)]
    config: CLIPVisionConfig,
}

impl CLIPVisionTransformer {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// [`Error::ConfigField`] for a config that fails [`Config::validate`];
    /// [`Error::Unsupported`] (`hidden_act`) for an activation other than quick_gelu / gelu.
    pub fn new(config: &CLIPVisionConfig, device: &Device) -> Result<Self> {
        config
            .validate()
            .map_err(|(field, message)| config_error(&field, message))?;
        let act = CLIPActivation::from_name(&config.hidden_act)?;
        let dims = EncoderDims {
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            num_attention_heads: config.num_attention_heads,
            num_hidden_layers: config.num_hidden_layers,
            layer_norm_eps: config.layer_norm_eps,
            act,
        };
        let norm = || {
            LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        Ok(Self {
            embeddings: CLIPVisionEmbeddings::new(config, device),
            pre_layrnorm: norm(),
            encoder: CLIPEncoder::new(dims, device),
            post_layernorm: norm(),
            config: config.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &CLIPVisionConfig {
        &self.config
    }

    /// Encode images (transformers' `interpolate_pos_encoding` is not supported: images must
    /// have the config's size).
    ///
    /// # Shapes
    /// - `pixel_values`: `[B, num_channels, image_size, image_size]`, as
    ///   [`super::CLIPImageProcessor`] makes them
    /// - output: see [`CLIPVisionModelOutput`]
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`pixel_values`) for an empty batch, another channel count or
    /// another image size.
    pub fn forward(&self, pixel_values: Tensor<4>) -> Result<CLIPVisionModelOutput> {
        let [b, c, h, w] = pixel_values.dims();
        let (channels, size) = (self.config.num_channels, self.config.image_size);
        if b == 0 || c != channels || h != size || w != size {
            return Err(Error::invalid_argument(
                "pixel_values",
                format!(
                    "shape [{b}, {c}, {h}, {w}]: the model takes a non-empty batch of \
                     [{channels}, {size}, {size}] images"
                ),
            ));
        }
        let mut x = self
            .pre_layrnorm
            .forward(self.embeddings.forward(pixel_values));
        let mut hidden_states = Vec::with_capacity(self.encoder.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.encoder.layers {
            x = layer.forward_unmasked(x);
            hidden_states.push(x.clone());
        }
        let hidden = self.config.hidden_size;
        let class_token = x.clone().narrow(1, 0, 1).reshape([b, hidden]);
        Ok(CLIPVisionModelOutput {
            pooler_output: self.post_layernorm.forward(class_token),
            last_hidden_state: x,
            hidden_states,
        })
    }
}

/// A transformers folder's config, its path, whether it was a full `CLIPConfig`, and its
/// weights with the `vision_model.` prefix.
fn open_folder(
    dir: &Path,
    variant: Option<&str>,
) -> Result<(CLIPVisionConfig, PathBuf, bool, WeightSource)> {
    let config_path = dir.join(CONFIG_NAME);
    if !config_path.is_file() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
            message: format!("no `{CONFIG_NAME}` in the model folder"),
        });
    }
    let (config, nested) = CLIPVisionConfig::from_json_file(&config_path)?;
    let mut source = WeightSource::open(resolve_weights_for(
        dir,
        TRANSFORMERS_WEIGHTS_STEM,
        variant,
    )?)?;
    // transformers 5 saves a bare `CLIPVisionModel` without its `vision_model.` prefix; older
    // versions (and every projection model) with it.
    if !source.keys().any(|k| k.starts_with(VISION_MODEL_PREFIX)) {
        source.rename_keys(|k| {
            (!k.starts_with("visual_projection.")).then(|| format!("{VISION_MODEL_PREFIX}{k}"))
        })?;
    }
    Ok((config, config_path, nested, source))
}

/// Load `model` from `source`; a full `CLIPModel` folder (`composite`) also holds the text
/// tower and its projection (and `visual_projection` when `model` has none), which are not
/// unexpected.
fn load_vision<M: Module>(
    model: M,
    source: &WeightSource,
    options: &PretrainedOptions,
    composite: bool,
) -> Result<(M, LoadReport)> {
    let mode = options.mode;
    if !composite {
        return load_weights_as(model, source, mode, options.dtype);
    }
    let (model, mut report) = load_weights_as(model, source, LoadMode::Lenient, options.dtype)?;
    report.unexpected.retain(|k| {
        !(k.starts_with("text_model.")
            || k.starts_with("text_projection.")
            || k == "logit_scale"
            || k == "visual_projection.weight")
    });
    if mode == LoadMode::Strict {
        if let Some(key) = report.missing.first() {
            return Err(Error::MissingTensor {
                path: source.origin().to_path_buf(),
                key: key.clone(),
            });
        }
        if !report.unexpected.is_empty() {
            return Err(Error::UnexpectedTensors {
                path: source.origin().to_path_buf(),
                keys: report.unexpected,
            });
        }
    }
    Ok((model, report))
}

/// transformers' `CLIPVisionModel`: the vision tower without projection.
#[derive(Module, Debug)]
pub struct CLIPVisionModel {
    /// The transformer (state-dict prefix `vision_model.`).
    pub vision_model: CLIPVisionTransformer,
}

impl CLIPVisionModel {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// As [`CLIPVisionTransformer::new`].
    pub fn new(config: &CLIPVisionConfig, device: &Device) -> Result<Self> {
        Ok(Self {
            vision_model: CLIPVisionTransformer::new(config, device)?,
        })
    }

    /// As [`Self::from_pretrained`], with the weight variant (`model.fp16.safetensors`) and
    /// load mode of `options`. A full `CLIPModel` folder loads its vision tower.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder for a missing config or weight file; config errors
    /// naming `config.json` and the field; [`Error::MissingTensor`] /
    /// [`Error::UnexpectedTensors`] (strict) / [`Error::TensorShape`] naming the key.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &PretrainedOptions,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let (config, config_path, nested, source) =
            open_folder(dir.as_ref(), options.variant.as_deref())?;
        let model =
            Self::new(&config, device).map_err(|e| layers::with_config_path(e, &config_path))?;
        // A `CLIPVisionModelWithProjection` folder also holds `visual_projection`, which
        // transformers skips when loading the bare model.
        let composite = nested || source.contains("visual_projection.weight");
        load_vision(model, &source, options, composite)
    }

    /// # Shapes
    /// - `pixel_values`: `[B, num_channels, image_size, image_size]`; output: see
    ///   [`CLIPVisionModelOutput`]
    ///
    /// # Errors
    /// As [`CLIPVisionTransformer::forward`].
    pub fn forward(&self, pixel_values: Tensor<4>) -> Result<CLIPVisionModelOutput> {
        self.vision_model.forward(pixel_values)
    }
}

/// transformers' `CLIPVisionModelWithProjection`, IP-Adapter's `image_encoder`.
#[derive(Module, Debug)]
pub struct CLIPVisionModelWithProjection {
    /// The transformer (state-dict prefix `vision_model.`).
    pub vision_model: CLIPVisionTransformer,
    /// `hidden -> projection_dim`, no bias.
    pub visual_projection: Linear,
}

impl CLIPVisionModelWithProjection {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// As [`CLIPVisionTransformer::new`]; [`Error::ConfigField`] (`projection_dim`) when zero.
    pub fn new(config: &CLIPVisionConfig, device: &Device) -> Result<Self> {
        let visual_projection = projection(config.hidden_size, config.projection_dim, device)?;
        Ok(Self {
            vision_model: CLIPVisionTransformer::new(config, device)?,
            visual_projection,
        })
    }

    /// As [`Self::from_pretrained`], with the weight variant and load mode of `options`. A full
    /// `CLIPModel` folder loads its vision tower and `visual_projection`.
    ///
    /// # Errors
    /// As [`CLIPVisionModel::from_pretrained_with`].
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &PretrainedOptions,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let (config, config_path, nested, source) =
            open_folder(dir.as_ref(), options.variant.as_deref())?;
        let model =
            Self::new(&config, device).map_err(|e| layers::with_config_path(e, &config_path))?;
        load_vision(model, &source, options, nested)
    }

    /// # Shapes
    /// - `pixel_values`: `[B, num_channels, image_size, image_size]`; output: see
    ///   [`CLIPVisionModelWithProjectionOutput`]
    ///
    /// # Errors
    /// As [`CLIPVisionTransformer::forward`].
    pub fn forward(&self, pixel_values: Tensor<4>) -> Result<CLIPVisionModelWithProjectionOutput> {
        let out = self.vision_model.forward(pixel_values)?;
        Ok(CLIPVisionModelWithProjectionOutput {
            image_embeds: self.visual_projection.forward(out.pooler_output),
            last_hidden_state: out.last_hidden_state,
            hidden_states: out.hidden_states,
        })
    }
}

transformers_folder_methods!(CLIPVisionModel, CLIPVisionConfig, vision_model, MODEL_TYPE);
transformers_folder_methods!(
    CLIPVisionModelWithProjection,
    CLIPVisionConfig,
    vision_model,
    MODEL_TYPE
);
