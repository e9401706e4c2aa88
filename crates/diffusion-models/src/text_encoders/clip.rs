//! transformers' CLIP text encoders (`models/clip/modeling_clip.py`): `CLIPTextModel` (Stable
//! Diffusion's text encoder) and `CLIPTextModelWithProjection` (SDXL's second encoder).
//!
//! Token + position embeddings, pre-LayerNorm encoder layers with causal self-attention,
//! `final_layer_norm`, and the pooled output at the eos position. Attribute names equal
//! transformers' state-dict keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`), so
//! `model.safetensors` loads strictly without a key table.

use std::path::{Path, PathBuf};

use diffusion_core::burn;
use diffusion_core::burn::module::{Module, Param};
use diffusion_core::burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use diffusion_core::burn::tensor::{FloatDType, Int, Tensor, TensorData, activation};
use diffusion_core::config::{Config, write_atomically};
use diffusion_core::weights::{
    SaveDtype, TRANSFORMERS_WEIGHTS_STEM, WeightSource, resolve_weights_for, weight_file_names_for,
};
use diffusion_core::{Device, Error, Result};
use serde::{Deserialize, Serialize};

use crate::attention_processor::scaled_dot_product_attention;
use crate::layers::{self, config_error, unsupported};
use crate::modeling_utils::{self, PretrainedOptions};
use crate::state_dict::{LoadReport, load_weights_as, save_weights};

/// transformers' `model_type` of a CLIP text config.
const MODEL_TYPE: &str = "clip_text_model";
/// The state-dict prefix of the transformer inside both models.
const TEXT_MODEL_PREFIX: &str = "text_model.";

/// `CLIPTextConfig` (transformers `models/clip/configuration_clip.py`); `Default` is its
/// `__init__` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CLIPTextConfig {
    /// Vocabulary size (49408 for CLIP).
    pub vocab_size: usize,
    /// Width of the token embeddings and encoder layers.
    pub hidden_size: usize,
    /// Width of the feed-forward layers.
    pub intermediate_size: usize,
    /// Output width of `text_projection` (used by the projection model only).
    pub projection_dim: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Number of positions (77).
    pub max_position_embeddings: usize,
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
    /// Padding token id.
    pub pad_token_id: Option<i64>,
    /// Beginning-of-text token id.
    pub bos_token_id: Option<i64>,
    /// End-of-text token id; 2 marks legacy configs whose pooled row is the argmax of the ids.
    pub eos_token_id: Option<i64>,
    /// transformers' `model_type` (`"clip_text_model"`).
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

impl Default for CLIPTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
            model_type: Some("clip_text_model".into()),
            architectures: None,
            dropout: 0.0,
            torch_dtype: None,
            dtype: None,
            transformers_version: None,
        }
    }
}

impl Config for CLIPTextConfig {
    const CLASS_NAME: &'static str = "CLIPTextModel";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        layers::check_transformer_dims(&positive, self.hidden_size, self.num_attention_heads)?;
        Ok(())
    }
}

/// The feed-forward activations CLIP configs name (`ACT2FN`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CLIPActivation {
    /// `x * sigmoid(1.702 x)` (`"quick_gelu"`, OpenAI CLIP).
    QuickGelu,
    /// Exact (erf) GELU (`"gelu"`, OpenCLIP).
    Gelu,
}

impl CLIPActivation {
    /// Parse `hidden_act`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] (`hidden_act`) for other names.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => Err(unsupported(
                "hidden_act",
                other,
                "CLIP encoders here support \"quick_gelu\" and \"gelu\"",
            )),
        }
    }

    fn forward(self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Self::QuickGelu => x.clone().mul(activation::sigmoid(x.mul_scalar(1.702))),
            Self::Gelu => activation::gelu(x),
        }
    }
}

fn layer_norm(config: &CLIPTextConfig, device: &Device) -> LayerNorm {
    LayerNormConfig::new(config.hidden_size)
        .with_epsilon(config.layer_norm_eps)
        .init(device)
}

/// The widths of a CLIP encoder, shared by the text and vision towers (transformers builds both
/// from the same `CLIPEncoderLayer`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct EncoderDims {
    pub(crate) hidden_size: usize,
    pub(crate) intermediate_size: usize,
    pub(crate) num_attention_heads: usize,
    pub(crate) num_hidden_layers: usize,
    pub(crate) layer_norm_eps: f64,
    pub(crate) act: CLIPActivation,
}

impl CLIPEncoder {
    /// Fresh layers of the given widths (the caller has checked that heads divide the width).
    pub(crate) fn new(dims: EncoderDims, device: &Device) -> Self {
        let norm = || {
            LayerNormConfig::new(dims.hidden_size)
                .with_epsilon(dims.layer_norm_eps)
                .init(device)
        };
        let layers = (0..dims.num_hidden_layers)
            .map(|_| CLIPEncoderLayer {
                self_attn: CLIPAttention::new(dims.hidden_size, dims.num_attention_heads, device),
                layer_norm1: norm(),
                mlp: CLIPMLP {
                    fc1: layers::linear(dims.hidden_size, dims.intermediate_size, device),
                    fc2: layers::linear(dims.intermediate_size, dims.hidden_size, device),
                    act: dims.act,
                },
                layer_norm2: norm(),
            })
            .collect();
        Self { layers }
    }
}

/// `CLIPAttention`: multi-head self-attention with biased q/k/v/out projections.
#[derive(Module, Debug)]
pub struct CLIPAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    #[module(skip)]
    heads: usize,
}

impl CLIPAttention {
    fn new(h: usize, heads: usize, device: &Device) -> Self {
        Self {
            q_proj: layers::linear(h, h, device),
            k_proj: layers::linear(h, h, device),
            v_proj: layers::linear(h, h, device),
            out_proj: layers::linear(h, h, device),
            heads,
        }
    }

    /// # Shapes
    /// - `x`: `[B, S, hidden]`, `bias`: `[B, heads, S, S]` (additive mask)
    /// - output: `[B, S, hidden]`
    pub fn forward(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        self.attend(x, Some(bias))
    }

    /// Attention without a mask (the vision tower's).
    ///
    /// # Shapes
    /// - input and output: `[B, S, hidden]`
    pub fn forward_unmasked(&self, x: Tensor<3>) -> Tensor<3> {
        self.attend(x, None)
    }

    fn attend(&self, x: Tensor<3>, bias: Option<Tensor<4>>) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let split = |t: Tensor<3>| {
            t.reshape([b, s, self.heads, h / self.heads])
                .swap_dims(1, 2)
        };
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let out = scaled_dot_product_attention(q, k, v, bias);
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, h]))
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct CLIPMLP {
    /// `hidden -> intermediate`.
    pub fc1: Linear,
    /// `intermediate -> hidden`.
    pub fc2: Linear,
    #[module(skip)]
    act: CLIPActivation,
}

impl CLIPMLP {
    /// # Shapes
    /// - input and output: `[B, S, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(self.act.forward(self.fc1.forward(x)))
    }
}

/// `CLIPEncoderLayer`: pre-LayerNorm attention and feed-forward, each with a residual.
#[derive(Module, Debug)]
pub struct CLIPEncoderLayer {
    /// Self-attention.
    pub self_attn: CLIPAttention,
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Feed-forward.
    pub mlp: CLIPMLP,
    /// Norm before the feed-forward.
    pub layer_norm2: LayerNorm,
}

impl CLIPEncoderLayer {
    /// # Shapes
    /// - `x`: `[B, S, hidden]`, `bias`: `[B, heads, S, S]`
    /// - output: `[B, S, hidden]`
    pub fn forward(&self, x: Tensor<3>, bias: Tensor<4>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), bias);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }

    /// As [`Self::forward`] without an attention mask (the vision tower's layers).
    ///
    /// # Shapes
    /// - input and output: `[B, S, hidden]`
    pub fn forward_unmasked(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward_unmasked(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// `CLIPEncoder`: the stack of layers.
#[derive(Module, Debug)]
pub struct CLIPEncoder {
    /// `num_hidden_layers` layers.
    pub layers: Vec<CLIPEncoderLayer>,
}

/// `CLIPTextEmbeddings`: token plus learned absolute position embeddings.
#[derive(Module, Debug)]
pub struct CLIPTextEmbeddings {
    /// `[vocab_size, hidden]`.
    pub token_embedding: Embedding,
    /// `[max_position_embeddings, hidden]`.
    pub position_embedding: Embedding,
}

/// What the text encoders return (`BaseModelOutputWithPooling` with `output_hidden_states`).
#[derive(Clone, Debug)]
pub struct CLIPTextModelOutput {
    /// `final_layer_norm` of the last layer's output, `[B, S, hidden]`.
    pub last_hidden_state: Tensor<3>,
    /// `last_hidden_state` at each row's eos position, `[B, hidden]`.
    pub pooler_output: Tensor<2>,
    /// The embeddings and every layer's output before `final_layer_norm`
    /// (`num_hidden_layers + 1` tensors of `[B, S, hidden]`); see
    /// [`Self::hidden_state_for_clip_skip`].
    pub hidden_states: Vec<Tensor<3>>,
}

impl CLIPTextModelOutput {
    /// `hidden_states[-(clip_skip + 1)]`, the row diffusers' pipelines take for `clip_skip`
    /// (before they apply `final_layer_norm`, see [`CLIPTextTransformer::final_layer_norm`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`clip_skip`) when it reaches past the embeddings.
    pub fn hidden_state_for_clip_skip(&self, clip_skip: usize) -> Result<Tensor<3>> {
        let n = self.hidden_states.len();
        if clip_skip + 1 > n {
            return Err(Error::invalid_argument(
                "clip_skip",
                format!("{clip_skip} skips more than the {} layers", n - 1),
            ));
        }
        Ok(self.hidden_states[n - 1 - clip_skip].clone())
    }
}

/// `CLIPTextTransformer`: embeddings, encoder and final norm.
#[derive(Module, Debug)]
pub struct CLIPTextTransformer {
    /// Token and position embeddings.
    pub embeddings: CLIPTextEmbeddings,
    /// Encoder layers.
    pub encoder: CLIPEncoder,
    /// Norm after the last layer.
    pub final_layer_norm: LayerNorm,
    #[module(skip)]
    config: CLIPTextConfig,
}

impl CLIPTextTransformer {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// [`Error::ConfigField`] for a config that fails [`Config::validate`];
    /// [`Error::Unsupported`] (`hidden_act`) for an activation other than quick_gelu / gelu.
    pub fn new(config: &CLIPTextConfig, device: &Device) -> Result<Self> {
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
        Ok(Self {
            embeddings: CLIPTextEmbeddings {
                token_embedding: EmbeddingConfig::new(config.vocab_size, config.hidden_size)
                    .init(device),
                position_embedding: EmbeddingConfig::new(
                    config.max_position_embeddings,
                    config.hidden_size,
                )
                .init(device),
            },
            encoder: CLIPEncoder::new(dims, device),
            final_layer_norm: layer_norm(config, device),
            config: config.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &CLIPTextConfig {
        &self.config
    }

    /// transformers' `resize_token_embeddings(new_num_tokens)`: keep the first rows of the
    /// token embedding, append rows of zeros up to `new_num_tokens` (transformers draws them at
    /// random; callers such as textual inversion overwrite them with
    /// [`Self::set_token_embeddings`]), and update `config.vocab_size`. The dtype and device
    /// stay the model's.
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// use diffusion_models::{CLIPTextConfig, CLIPTextModel};
    /// let device = diffusion_core::Device::default();
    /// let config = CLIPTextConfig { vocab_size: 10, hidden_size: 4, intermediate_size: 8,
    ///     num_hidden_layers: 1, num_attention_heads: 1, ..CLIPTextConfig::default() };
    /// let mut model = CLIPTextModel::new(&config, &device)?;
    /// model.text_model.resize_token_embeddings(12)?;
    /// assert_eq!(model.config().vocab_size, 12);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`new_num_tokens`) for zero.
    pub fn resize_token_embeddings(&mut self, new_num_tokens: usize) -> Result<()> {
        if new_num_tokens == 0 {
            return Err(Error::invalid_argument(
                "new_num_tokens",
                "the token embedding needs at least one row",
            ));
        }
        let weight = self.embeddings.token_embedding.weight.val();
        let [old, hidden] = weight.dims();
        let resized = if new_num_tokens <= old {
            weight.narrow(0, 0, new_num_tokens)
        } else {
            let zeros = Tensor::<2>::zeros([new_num_tokens - old, hidden], &weight.device())
                .cast(FloatDType::from(weight.dtype()));
            Tensor::cat(vec![weight, zeros], 0)
        };
        self.embeddings.token_embedding.weight = Param::from_tensor(resized);
        self.config.vocab_size = new_num_tokens;
        Ok(())
    }

    /// Keep only the token-embedding rows `rows` (in that order) and set `config.vocab_size` to
    /// their count: diffusers' `unload_textual_inversion` rebuilds the embedding from the rows
    /// up to the last special token and the added rows that stay.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`rows`) for an empty list or a row out of range.
    pub fn select_token_embeddings(&mut self, rows: &[usize]) -> Result<()> {
        let weight = self.embeddings.token_embedding.weight.val();
        let [n, _] = weight.dims();
        if rows.is_empty() || rows.iter().any(|&r| r >= n) {
            return Err(Error::invalid_argument(
                "rows",
                format!("{} rows selected from an embedding of {n}", rows.len()),
            ));
        }
        let device = weight.device();
        let index = Tensor::<1, Int>::from_data(
            TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &device,
        );
        self.embeddings.token_embedding.weight = Param::from_tensor(weight.select(0, index));
        self.config.vocab_size = rows.len();
        Ok(())
    }

    /// Overwrite rows `first_id..first_id + n` of the token embedding with `n` vectors given
    /// row-major as `f32`, converted to the model's dtype (`input_embeddings.data[id] = e`).
    ///
    /// ```
    /// # fn main() -> diffusion_core::Result<()> {
    /// use diffusion_models::{CLIPTextConfig, CLIPTextModel};
    /// let device = diffusion_core::Device::default();
    /// let config = CLIPTextConfig { vocab_size: 10, hidden_size: 2, intermediate_size: 8,
    ///     num_hidden_layers: 1, num_attention_heads: 1, ..CLIPTextConfig::default() };
    /// let mut model = CLIPTextModel::new(&config, &device)?;
    /// model.text_model.set_token_embeddings(8, &[1.0, 2.0, 3.0, 4.0])?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`values`) when their count is not a multiple of
    /// `hidden_size`, or the rows reach past `vocab_size`.
    pub fn set_token_embeddings(&mut self, first_id: usize, values: &[f32]) -> Result<()> {
        let weight = self.embeddings.token_embedding.weight.val();
        let [vocab, hidden] = weight.dims();
        if values.is_empty() || !values.len().is_multiple_of(hidden) {
            return Err(Error::invalid_argument(
                "values",
                format!(
                    "{} values are not whole rows of {hidden} (the hidden size)",
                    values.len()
                ),
            ));
        }
        let rows = values.len() / hidden;
        if first_id + rows > vocab {
            return Err(Error::invalid_argument(
                "values",
                format!(
                    "rows {first_id}..{} reach past the {vocab} tokens",
                    first_id + rows
                ),
            ));
        }
        let update = Tensor::<2>::from_data(
            TensorData::new(values.to_vec(), [rows, hidden]),
            &weight.device(),
        )
        .cast(FloatDType::from(weight.dtype()));
        let weight = weight.slice_assign([first_id..first_id + rows, 0..hidden], update);
        self.embeddings.token_embedding.weight = Param::from_tensor(weight);
        Ok(())
    }

    /// Run the encoder on token ids.
    ///
    /// # Shapes
    /// - `input_ids`: `[B, S]` with `S <= max_position_embeddings`
    /// - output: see [`CLIPTextModelOutput`]
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`input_ids`) for an empty batch or sequence, a sequence longer
    /// than `max_position_embeddings`, or an id outside `[0, vocab_size)`.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Result<CLIPTextModelOutput> {
        self.forward_with_attention_mask(input_ids, None)
    }

    /// [`Self::forward`] with transformers' `attention_mask` (1 = attend, 0 = padding key),
    /// combined with the causal mask. diffusers passes it only for encoders whose config sets
    /// `use_attention_mask`.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[B, S]`
    /// - output: see [`CLIPTextModelOutput`]
    ///
    /// # Errors
    /// As [`Self::forward`]; [`Error::InvalidArgument`] (`attention_mask`) when its shape differs
    /// from the ids' or a value is not 0 or 1.
    pub fn forward_with_attention_mask(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<CLIPTextModelOutput> {
        let [b, s] = input_ids.dims();
        let max = self.config.max_position_embeddings;
        if b == 0 || s == 0 || s > max {
            return Err(Error::invalid_argument(
                "input_ids",
                format!("shape [{b}, {s}]: need a non-empty batch of at most {max} tokens"),
            ));
        }
        let ids: Vec<i64> = input_ids
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| Error::invalid_argument("input_ids", format!("{e:?}")))?;
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id >= vocab) {
            return Err(Error::invalid_argument(
                "input_ids",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let device = input_ids.device();
        let positions = Tensor::<2, Int>::from_data(
            TensorData::new((0..s as i64).collect::<Vec<_>>(), [1, s]),
            &device,
        );
        let mut x = self.embeddings.token_embedding.forward(input_ids)
            + self.embeddings.position_embedding.forward(positions);

        // transformers' causal mask: the dtype's minimum above the diagonal, and on the keys
        // the attention mask marks as padding.
        let keep = match attention_mask {
            None => None,
            Some(mask) => Some(read_attention_mask(mask, [b, s])?),
        };
        let mask: Vec<f32> = (0..b * s * s)
            .map(|i| {
                let (row, query, key) = (i / (s * s), (i / s) % s, i % s);
                let padded = keep.as_ref().is_some_and(|k| k[row * s + key] == 0);
                if key > query || padded { f32::MIN } else { 0.0 }
            })
            .collect();
        let heads = self.config.num_attention_heads;
        let bias = Tensor::<4>::from_data(TensorData::new(mask, [b, 1, s, s]), &device)
            .expand([b, heads, s, s]);

        let mut hidden_states = Vec::with_capacity(self.encoder.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.encoder.layers {
            x = layer.forward(x, bias.clone());
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(x);

        let eos = self.config.eos_token_id;
        let rows: Vec<i64> = ids
            .chunks(s)
            .enumerate()
            .map(|(row, ids)| {
                let pos = match eos {
                    // Legacy configs (eos_token_id 2): the eos token has the largest id; the
                    // first maximum as torch.argmax returns it.
                    Some(2) | None => first_argmax(ids),
                    Some(eos) => ids.iter().position(|&id| id == eos).unwrap_or(0),
                };
                (row * s + pos) as i64
            })
            .collect();
        let hidden = self.config.hidden_size;
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [b]), &device);
        let pooler_output = last_hidden_state
            .clone()
            .reshape([b * s, hidden])
            .select(0, rows);
        Ok(CLIPTextModelOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
        })
    }
}

fn read_attention_mask(mask: Tensor<2, Int>, shape: [usize; 2]) -> Result<Vec<i64>> {
    if mask.dims() != shape {
        return Err(Error::invalid_argument(
            "attention_mask",
            format!("shape {:?} differs from the ids' {shape:?}", mask.dims()),
        ));
    }
    let values = mask
        .to_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .map_err(|e| Error::invalid_argument("attention_mask", format!("{e:?}")))?;
    if let Some(bad) = values.iter().find(|&&v| v != 0 && v != 1) {
        return Err(Error::invalid_argument(
            "attention_mask",
            format!("value {bad} is neither 0 nor 1"),
        ));
    }
    Ok(values)
}

fn first_argmax(ids: &[i64]) -> usize {
    let mut best = 0;
    for (i, &id) in ids.iter().enumerate() {
        if id > ids[best] {
            best = i;
        }
    }
    best
}

/// Read `config.json` and open `model[.variant].safetensors` (or its sharded index) of a
/// transformers folder.
fn open_folder(
    dir: &Path,
    variant: Option<&str>,
) -> Result<(CLIPTextConfig, PathBuf, WeightSource)> {
    let (file, config_path) = modeling_utils::load_config::<CLIPTextConfig>(dir)?;
    let mut source = WeightSource::open(resolve_weights_for(
        dir,
        TRANSFORMERS_WEIGHTS_STEM,
        variant,
    )?)?;
    // transformers 5 saves a bare `CLIPTextModel` without its `text_model.` prefix; older
    // versions (and every Stable Diffusion checkpoint) with it. transformers accepts both.
    if !source.keys().any(|k| k.starts_with(TEXT_MODEL_PREFIX)) {
        source.rename_keys(|k| {
            (!k.starts_with("text_projection.")).then(|| format!("{TEXT_MODEL_PREFIX}{k}"))
        })?;
    }
    Ok((file.config, config_path, source))
}

/// transformers' `CLIPTextModel` (Stable Diffusion's text encoder).
#[derive(Module, Debug)]
pub struct CLIPTextModel {
    /// The transformer (state-dict prefix `text_model.`).
    pub text_model: CLIPTextTransformer,
}

impl CLIPTextModel {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// As [`CLIPTextTransformer::new`].
    pub fn new(config: &CLIPTextConfig, device: &Device) -> Result<Self> {
        Ok(Self {
            text_model: CLIPTextTransformer::new(config, device)?,
        })
    }

    /// As [`Self::from_pretrained`], with the load mode of `options` (`variant` is not used by
    /// transformers folders and must be `None`).
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder for a missing config or weight file; config errors
    /// naming `config.json` and the field; [`Error::MissingTensor`] /
    /// [`Error::UnexpectedTensors`] (strict) / [`Error::TensorShape`] naming the key;
    /// [`Error::InvalidArgument`] (`variant`) when a variant is given.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &PretrainedOptions,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let (config, config_path, source) = open_folder(dir.as_ref(), options.variant.as_deref())?;
        let model =
            Self::new(&config, device).map_err(|e| layers::with_config_path(e, &config_path))?;
        load_weights_as(model, &source, options.mode, options.dtype)
    }

    /// # Shapes
    /// - `input_ids`: `[B, S]`; output: see [`CLIPTextModelOutput`]
    ///
    /// # Errors
    /// As [`CLIPTextTransformer::forward`].
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Result<CLIPTextModelOutput> {
        self.text_model.forward(input_ids)
    }

    /// [`Self::forward`] with an attention mask.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[B, S]`
    ///
    /// # Errors
    /// As [`CLIPTextTransformer::forward_with_attention_mask`].
    pub fn forward_with_attention_mask(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<CLIPTextModelOutput> {
        self.text_model
            .forward_with_attention_mask(input_ids, attention_mask)
    }
}

/// The methods every transformers model here shares around its own `from_pretrained_with`:
/// `from_pretrained`, `config` (the tower's), `save_pretrained` and `save_pretrained_with`
/// (`config.json` with `architectures: [$architecture]` and `model_type: $model_type`).
macro_rules! transformers_folder_methods {
    ($model:ident, $config:ty, $tower:ident, $model_type:expr) => {
        impl $model {
            /// Load a transformers folder: `config.json` and `model.safetensors` (strict).
            ///
            /// # Errors
            /// As [`Self::from_pretrained_with`].
            pub fn from_pretrained(
                dir: impl AsRef<std::path::Path>,
                device: &diffusion_core::Device,
            ) -> diffusion_core::Result<Self> {
                Self::from_pretrained_with(
                    dir,
                    &$crate::modeling_utils::PretrainedOptions::default(),
                    device,
                )
                .map(|(m, _)| m)
            }

            /// The config the model was built from.
            pub fn config(&self) -> &$config {
                self.$tower.config()
            }

            /// Write `config.json` and `model.safetensors` (f32) into `dir`, as transformers'
            /// `save_pretrained` does.
            ///
            /// # Errors
            /// [`diffusion_core::Error::Io`] when writing fails.
            pub fn save_pretrained(
                &self,
                dir: impl AsRef<std::path::Path>,
            ) -> diffusion_core::Result<()> {
                self.save_pretrained_with(dir, None, diffusion_core::weights::SaveDtype::F32)
            }

            /// As [`Self::save_pretrained`], with a weight variant and storage dtype
            /// (`Some("fp16")` with `SaveDtype::F16` writes `model.fp16.safetensors`).
            ///
            /// # Errors
            /// [`diffusion_core::Error::Io`] when writing fails.
            pub fn save_pretrained_with(
                &self,
                dir: impl AsRef<std::path::Path>,
                variant: Option<&str>,
                dtype: diffusion_core::weights::SaveDtype,
            ) -> diffusion_core::Result<()> {
                $crate::text_encoders::clip::save_folder(
                    self,
                    self.config(),
                    stringify!($model),
                    $model_type,
                    dir.as_ref(),
                    variant,
                    dtype,
                )
            }
        }
    };
}
pub(crate) use transformers_folder_methods;

transformers_folder_methods!(CLIPTextModel, CLIPTextConfig, text_model, MODEL_TYPE);
transformers_folder_methods!(
    CLIPTextModelWithProjection,
    CLIPTextConfig,
    text_model,
    MODEL_TYPE
);

/// A CLIP projection head, `hidden_size -> projection_dim` without bias.
///
/// # Errors
/// [`Error::ConfigField`] (`projection_dim`) when it is zero.
pub(crate) fn projection(
    hidden_size: usize,
    projection_dim: usize,
    device: &Device,
) -> Result<Linear> {
    if projection_dim == 0 {
        return Err(config_error("projection_dim", "must be positive"));
    }
    Ok(LinearConfig::new(hidden_size, projection_dim)
        .with_bias(false)
        .init(device))
}

/// Write a transformers folder: `config.json` (with `architectures` and `model_type`, as
/// transformers' `save_pretrained` writes it) and `model[.variant].safetensors`.
pub(crate) fn save_folder<M: Module, C: Serialize>(
    module: &M,
    config: &C,
    architecture: &str,
    model_type: &str,
    dir: &Path,
    variant: Option<&str>,
    dtype: SaveDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join(modeling_utils::CONFIG_NAME);
    let json_error = |e: serde_json::Error| Error::Json {
        path: config_path.clone(),
        line: 0,
        column: 0,
        message: e.to_string(),
    };
    let mut json = match serde_json::to_value(config).map_err(json_error)? {
        serde_json::Value::Object(map) => map,
        other => unreachable!("CLIP configs serialise to an object, not {other}"),
    };
    json.insert("architectures".into(), serde_json::json!([architecture]));
    json.insert("model_type".into(), model_type.into());
    let dtype_name = match dtype {
        SaveDtype::F32 => "float32",
        SaveDtype::F16 => "float16",
        SaveDtype::BF16 => "bfloat16",
    };
    json.insert("dtype".into(), dtype_name.into());
    let mut text = serde_json::to_string_pretty(&json).map_err(json_error)?;
    text.push('\n');
    write_atomically(&config_path, text.as_bytes())?;
    let (weights_name, _) = weight_file_names_for(TRANSFORMERS_WEIGHTS_STEM, variant);
    save_weights(module, dir.join(weights_name), dtype)
}

/// What [`CLIPTextModelWithProjection`] returns (`CLIPTextModelOutput` in transformers).
#[derive(Clone, Debug)]
pub struct CLIPTextModelWithProjectionOutput {
    /// `text_projection(pooler_output)`, `[B, projection_dim]` (SDXL's pooled prompt embeds).
    pub text_embeds: Tensor<2>,
    /// `[B, S, hidden]`.
    pub last_hidden_state: Tensor<3>,
    /// As [`CLIPTextModelOutput::hidden_states`]; SDXL takes `hidden_states[-2]`.
    pub hidden_states: Vec<Tensor<3>>,
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's second text encoder).
#[derive(Module, Debug)]
pub struct CLIPTextModelWithProjection {
    /// The transformer (state-dict prefix `text_model.`).
    pub text_model: CLIPTextTransformer,
    /// `hidden -> projection_dim`, no bias.
    pub text_projection: Linear,
}

impl CLIPTextModelWithProjection {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// As [`CLIPTextTransformer::new`]; [`Error::ConfigField`] (`projection_dim`) when zero.
    pub fn new(config: &CLIPTextConfig, device: &Device) -> Result<Self> {
        let text_projection = projection(config.hidden_size, config.projection_dim, device)?;
        Ok(Self {
            text_model: CLIPTextTransformer::new(config, device)?,
            text_projection,
        })
    }

    /// As [`Self::from_pretrained`], with the load mode of `options`.
    ///
    /// # Errors
    /// As [`CLIPTextModel::from_pretrained_with`].
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &PretrainedOptions,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let (config, config_path, source) = open_folder(dir.as_ref(), options.variant.as_deref())?;
        let model =
            Self::new(&config, device).map_err(|e| layers::with_config_path(e, &config_path))?;
        load_weights_as(model, &source, options.mode, options.dtype)
    }

    /// # Shapes
    /// - `input_ids`: `[B, S]`; output: see [`CLIPTextModelWithProjectionOutput`]
    ///
    /// # Errors
    /// As [`CLIPTextTransformer::forward`].
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Result<CLIPTextModelWithProjectionOutput> {
        self.forward_with_attention_mask(input_ids, None)
    }

    /// [`Self::forward`] with an attention mask.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[B, S]`
    ///
    /// # Errors
    /// As [`CLIPTextTransformer::forward_with_attention_mask`].
    pub fn forward_with_attention_mask(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<CLIPTextModelWithProjectionOutput> {
        let out = self
            .text_model
            .forward_with_attention_mask(input_ids, attention_mask)?;
        Ok(CLIPTextModelWithProjectionOutput {
            text_embeds: self.text_projection.forward(out.pooler_output),
            last_hidden_state: out.last_hidden_state,
            hidden_states: out.hidden_states,
        })
    }
}
