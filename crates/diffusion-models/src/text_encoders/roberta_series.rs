//! AltDiffusion's text encoder, diffusers' `RobertaSeriesModelWithTransformation`
//! (`pipelines/deprecated/alt_diffusion/modeling_roberta_series.py`): an XLM-RoBERTa encoder
//! (transformers' `models/xlm_roberta`) followed by a linear `transformation` to the UNet's
//! cross-attention width.
//!
//! XLM-R differs from CLIP's text tower in ways that matter for parity: positions start at
//! `pad_token_id + 1` and padding tokens keep position `pad_token_id`
//! (`create_position_ids_from_input_ids`), a token-type embedding (type 0) is added, the
//! embeddings are layer-normed, layers are post-LayerNorm with bidirectional attention (padding
//! masked out through the attention mask), and there is no final norm.
//!
//! State-dict keys follow transformers (`roberta.encoder.layer.0.attention.self.query.weight`);
//! three names that are not Rust identifiers (`self`, `LayerNorm`, `pre_LN`) are renamed while
//! loading (`self_attn`, `layer_norm`, `pre_ln`), and errors name the stored keys.

use std::path::Path;

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use diffusion_core::burn::tensor::{Int, Tensor, TensorData, activation};
use diffusion_core::config::Config;
use diffusion_core::weights::{TRANSFORMERS_WEIGHTS_STEM, WeightSource, resolve_weights_for};
use diffusion_core::{Device, Error, Result};
use serde::{Deserialize, Serialize};

use crate::attention_processor::scaled_dot_product_attention;
use crate::layers::{self, config_error, unsupported};
use crate::modeling_utils::{self, PretrainedOptions};
use crate::state_dict::{LoadMode, LoadReport, load_weights_as};

/// `RobertaSeriesConfig` (diffusers `modeling_roberta_series.py`, an `XLMRobertaConfig` of
/// transformers `models/xlm_roberta/configuration_xlm_roberta.py` plus the projection keys);
/// `Default` is its `__init__` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RobertaSeriesConfig {
    /// Vocabulary size (250002 for XLM-R).
    pub vocab_size: usize,
    /// Width of the embeddings and encoder layers.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layers.
    pub intermediate_size: usize,
    /// Feed-forward activation; `"gelu"` (exact) is supported.
    pub hidden_act: String,
    /// Dropout (inert at inference).
    pub hidden_dropout_prob: f64,
    /// Attention dropout (inert at inference).
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position table (514 for XLM-R: 512 positions after the padding offset).
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (only type 0 is used).
    pub type_vocab_size: usize,
    /// Initialisation scale (training only).
    pub initializer_range: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding token id; also the position padding tokens get, positions start after it.
    pub pad_token_id: Option<i64>,
    /// `<s>` id.
    pub bos_token_id: Option<i64>,
    /// `</s>` id.
    pub eos_token_id: Option<i64>,
    /// Key cache flag of the decoder variants (unused here).
    pub use_cache: Option<bool>,
    /// Classifier dropout (unused here).
    pub classifier_dropout: Option<f64>,
    /// Must be false: the decoder (causal) variant is not an AltDiffusion text encoder.
    pub is_decoder: bool,
    /// Must be false: cross-attention layers are not supported.
    pub add_cross_attention: bool,
    /// Whether the word embeddings are tied to an LM head (no head here).
    pub tie_word_embeddings: Option<bool>,
    /// Older configs: `"absolute"` is the only kind transformers 5 still has.
    pub position_embedding_type: Option<String>,
    /// Output width of `transformation` (the UNet's `cross_attention_dim`).
    pub project_dim: usize,
    /// Pooling of the original AltCLIP training (unused by the pipelines).
    pub pooler_fn: String,
    /// Training flag of the original code (unused).
    pub learn_encoder: bool,
    /// Whether the pipelines pass the tokenizer's attention mask.
    pub use_attention_mask: bool,
    /// Project `pre_LN(hidden_states[-2])` with `transformation_pre` instead of the last layer
    /// with `transformation` (read with `getattr(config, "has_pre_transformation", False)`).
    pub has_pre_transformation: bool,
    /// transformers' `model_type` (`"xlm-roberta"` or `"roberta"`).
    pub model_type: Option<String>,
    /// transformers' `architectures`.
    pub architectures: Option<Vec<String>>,
    /// Older transformers' flag (unused).
    pub output_past: Option<bool>,
    /// Storage dtype written by transformers before v5.
    pub torch_dtype: Option<String>,
    /// As `torch_dtype`, transformers 5's name.
    pub dtype: Option<String>,
    /// The transformers version that wrote the file.
    pub transformers_version: Option<String>,
}

impl Default for RobertaSeriesConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(1),
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            use_cache: Some(true),
            classifier_dropout: None,
            is_decoder: false,
            add_cross_attention: false,
            tie_word_embeddings: Some(true),
            position_embedding_type: None,
            project_dim: 512,
            pooler_fn: "cls".into(),
            learn_encoder: false,
            use_attention_mask: true,
            has_pre_transformation: false,
            model_type: None,
            architectures: None,
            output_past: None,
            torch_dtype: None,
            dtype: None,
            transformers_version: None,
        }
    }
}

impl Config for RobertaSeriesConfig {
    const CLASS_NAME: &'static str = "RobertaSeriesModelWithTransformation";

    fn validate(&self) -> std::result::Result<(), (String, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
            ("project_dim", self.project_dim),
        ];
        layers::check_transformer_dims(&positive, self.hidden_size, self.num_attention_heads)?;
        match self.pad_token_id {
            Some(p) if p >= 0 && (p as usize) < self.max_position_embeddings => {}
            other => {
                return Err((
                    "pad_token_id".into(),
                    format!(
                        "{other:?}: XLM-R positions are offset by the padding id, which must be \
                         below max_position_embeddings {}",
                        self.max_position_embeddings
                    ),
                ));
            }
        }
        if self.has_pre_transformation && self.num_hidden_layers == 0 {
            return Err((
                "num_hidden_layers".into(),
                "has_pre_transformation reads the second-to-last hidden state: need a layer".into(),
            ));
        }
        Ok(())
    }
}

/// `XLMRobertaEmbeddings`: word + token-type + position embeddings, then LayerNorm.
#[derive(Module, Debug)]
pub struct XLMRobertaEmbeddings {
    /// `[vocab_size, hidden]`.
    pub word_embeddings: Embedding,
    /// `[max_position_embeddings, hidden]`.
    pub position_embeddings: Embedding,
    /// `[type_vocab_size, hidden]`.
    pub token_type_embeddings: Embedding,
    /// Norm of the sum (stored as `LayerNorm`).
    pub layer_norm: LayerNorm,
}

/// `XLMRobertaSelfAttention`: biased query / key / value projections.
#[derive(Module, Debug)]
pub struct XLMRobertaSelfAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
}

/// `XLMRobertaSelfOutput` / `XLMRobertaOutput`: `LayerNorm(dense(x) + residual)`.
#[derive(Module, Debug)]
pub struct XLMRobertaDenseNorm {
    /// The projection.
    pub dense: Linear,
    /// Post-residual norm (stored as `LayerNorm`).
    pub layer_norm: LayerNorm,
}

impl XLMRobertaDenseNorm {
    /// # Shapes
    /// - `x`: `[B, S, in]`, `residual`: `[B, S, hidden]`; output `[B, S, hidden]`
    pub fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.layer_norm.forward(self.dense.forward(x) + residual)
    }
}

/// `XLMRobertaAttention`: self-attention (stored as `self`) and its output block.
#[derive(Module, Debug)]
pub struct XLMRobertaAttention {
    /// The projections (state-dict name `self`).
    pub self_attn: XLMRobertaSelfAttention,
    /// Output projection, residual and norm.
    pub output: XLMRobertaDenseNorm,
}

/// `XLMRobertaIntermediate`: `gelu(dense(x))`.
#[derive(Module, Debug)]
pub struct XLMRobertaIntermediate {
    /// `hidden -> intermediate`.
    pub dense: Linear,
}

/// `XLMRobertaLayer`: post-LayerNorm attention and feed-forward.
#[derive(Module, Debug)]
pub struct XLMRobertaLayer {
    /// Attention block.
    pub attention: XLMRobertaAttention,
    /// Feed-forward up-projection.
    pub intermediate: XLMRobertaIntermediate,
    /// Feed-forward down-projection, residual and norm.
    pub output: XLMRobertaDenseNorm,
    #[module(skip)]
    heads: usize,
}

impl XLMRobertaLayer {
    /// # Shapes
    /// - `x`: `[B, S, hidden]`, `bias`: `[B, heads, S, S]` additive mask (or none)
    /// - output: `[B, S, hidden]`
    pub fn forward(&self, x: Tensor<3>, bias: Option<Tensor<4>>) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let attn = &self.attention.self_attn;
        let split = |t: Tensor<3>| {
            t.reshape([b, s, self.heads, h / self.heads])
                .swap_dims(1, 2)
        };
        let q = split(attn.query.forward(x.clone()));
        let k = split(attn.key.forward(x.clone()));
        let v = split(attn.value.forward(x.clone()));
        let context = scaled_dot_product_attention(q, k, v, bias)
            .swap_dims(1, 2)
            .reshape([b, s, h]);
        let x = self.attention.output.forward(context, x);
        let up = activation::gelu(self.intermediate.dense.forward(x.clone()));
        self.output.forward(up, x)
    }
}

/// `XLMRobertaEncoder`: the stack of layers (stored as `layer.N`).
#[derive(Module, Debug)]
pub struct XLMRobertaEncoder {
    /// `num_hidden_layers` layers.
    pub layer: Vec<XLMRobertaLayer>,
}

/// transformers' `XLMRobertaModel` without its pooler (AltDiffusion never uses it; diffusers
/// ignores the pooler weights when loading).
#[derive(Module, Debug)]
pub struct XLMRobertaModel {
    /// Embeddings.
    pub embeddings: XLMRobertaEmbeddings,
    /// Encoder layers.
    pub encoder: XLMRobertaEncoder,
}

/// What [`RobertaSeriesModelWithTransformation::forward`] returns
/// (`TransformationModelOutput` with `output_hidden_states=True`).
#[derive(Clone, Debug)]
pub struct TransformationModelOutput {
    /// The prompt embeddings the pipelines use, `[B, S, project_dim]`:
    /// `transformation(last_hidden_state)`, or `transformation_pre(pre_LN(hidden_states[-2]))`
    /// with `has_pre_transformation`.
    pub projection_state: Tensor<3>,
    /// The last layer's output, `[B, S, hidden]`.
    pub last_hidden_state: Tensor<3>,
    /// The embeddings and every layer's output (`num_hidden_layers + 1` tensors of
    /// `[B, S, hidden]`; the last equals `last_hidden_state`).
    pub hidden_states: Vec<Tensor<3>>,
}

/// diffusers' `RobertaSeriesModelWithTransformation`, AltDiffusion's text encoder.
///
/// ```
/// # fn main() -> diffusion_core::Result<()> {
/// # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/pipelines/alt_diffusion/alt");
/// use diffusion_core::Device;
/// use diffusion_models::{Padding, RobertaSeriesModelWithTransformation, XLMRobertaTokenizer};
///
/// let device = Device::default();
/// let tokenizer = XLMRobertaTokenizer::from_pretrained(format!("{dir}/tokenizer"))?;
/// let encoder =
///     RobertaSeriesModelWithTransformation::from_pretrained(format!("{dir}/text_encoder"), &device)?;
/// let tokens = tokenizer.tokenize(&["黑暗精灵公主"], Padding::MaxLength, Some(77), true)?;
/// let out = encoder.forward(
///     tokens.input_ids_tensor(&device)?,
///     Some(tokens.attention_mask_tensor(&device)?),
/// )?;
/// assert_eq!(out.projection_state.dims(), [1, 77, encoder.config().project_dim]);
/// # Ok(())
/// # }
/// ```
#[derive(Module, Debug)]
pub struct RobertaSeriesModelWithTransformation {
    /// The XLM-R encoder (state-dict prefix `roberta.`).
    pub roberta: XLMRobertaModel,
    /// `hidden -> project_dim`.
    pub transformation: Linear,
    /// `hidden -> project_dim` of the pre-transformation variant.
    pub transformation_pre: Option<Linear>,
    /// Norm of the second-to-last hidden state in the pre-transformation variant (stored as
    /// `pre_LN`).
    pub pre_ln: Option<LayerNorm>,
    #[module(skip)]
    config: RobertaSeriesConfig,
}

impl RobertaSeriesModelWithTransformation {
    /// Build with fresh weights.
    ///
    /// # Errors
    /// [`Error::ConfigField`] for a config that fails [`Config::validate`];
    /// [`Error::Unsupported`] for `hidden_act` other than `"gelu"`, a `position_embedding_type`
    /// other than `"absolute"`, or a decoder / cross-attention config.
    pub fn new(config: &RobertaSeriesConfig, device: &Device) -> Result<Self> {
        config
            .validate()
            .map_err(|(field, message)| config_error(&field, message))?;
        if config.hidden_act != "gelu" {
            return Err(unsupported(
                "hidden_act",
                &config.hidden_act,
                "XLM-R encoders here use the exact \"gelu\"",
            ));
        }
        if let Some(kind) = &config.position_embedding_type
            && kind != "absolute"
        {
            return Err(unsupported(
                "position_embedding_type",
                kind,
                "only absolute position embeddings are supported",
            ));
        }
        if config.is_decoder || config.add_cross_attention {
            let field = if config.is_decoder {
                "is_decoder"
            } else {
                "add_cross_attention"
            };
            return Err(unsupported(
                field,
                "true",
                "AltDiffusion's text encoder is a bidirectional encoder without cross-attention",
            ));
        }
        let h = config.hidden_size;
        let norm = || {
            LayerNormConfig::new(h)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        let dense_norm = |d_in: usize| XLMRobertaDenseNorm {
            dense: layers::linear(d_in, h, device),
            layer_norm: norm(),
        };
        let layer = (0..config.num_hidden_layers)
            .map(|_| XLMRobertaLayer {
                attention: XLMRobertaAttention {
                    self_attn: XLMRobertaSelfAttention {
                        query: layers::linear(h, h, device),
                        key: layers::linear(h, h, device),
                        value: layers::linear(h, h, device),
                    },
                    output: dense_norm(h),
                },
                intermediate: XLMRobertaIntermediate {
                    dense: layers::linear(h, config.intermediate_size, device),
                },
                output: dense_norm(config.intermediate_size),
                heads: config.num_attention_heads,
            })
            .collect();
        let pre = config.has_pre_transformation;
        Ok(Self {
            roberta: XLMRobertaModel {
                embeddings: XLMRobertaEmbeddings {
                    word_embeddings: EmbeddingConfig::new(config.vocab_size, h).init(device),
                    position_embeddings: EmbeddingConfig::new(config.max_position_embeddings, h)
                        .init(device),
                    token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, h)
                        .init(device),
                    layer_norm: norm(),
                },
                encoder: XLMRobertaEncoder { layer },
            },
            transformation: LinearConfig::new(h, config.project_dim).init(device),
            transformation_pre: pre.then(|| LinearConfig::new(h, config.project_dim).init(device)),
            pre_ln: pre.then(norm),
            config: config.clone(),
        })
    }

    /// Load a transformers folder: `config.json` and `model.safetensors` (strict).
    ///
    /// # Errors
    /// As [`Self::from_pretrained_with`].
    pub fn from_pretrained(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_pretrained_with(dir, &PretrainedOptions::default(), device).map(|(m, _)| m)
    }

    /// As [`Self::from_pretrained`], with the variant and load mode of `options`. The weights
    /// diffusers ignores (`roberta.pooler.*`, `logit_scale`, the `position_ids` /
    /// `token_type_ids` buffers of old checkpoints) are skipped in both modes.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the folder for a missing config or weight file; config errors
    /// naming `config.json` and the field; [`Error::MissingTensor`] / [`Error::UnexpectedTensors`]
    /// (strict) / [`Error::TensorShape`] naming the stored key.
    pub fn from_pretrained_with(
        dir: impl AsRef<Path>,
        options: &PretrainedOptions,
        device: &Device,
    ) -> Result<(Self, LoadReport)> {
        let dir = dir.as_ref();
        let (file, config_path) = modeling_utils::load_config::<RobertaSeriesConfig>(dir)?;
        let mut source = WeightSource::open(resolve_weights_for(
            dir,
            TRANSFORMERS_WEIGHTS_STEM,
            options.variant.as_deref(),
        )?)?;
        source.rename_keys(|k| {
            let renamed = to_module_key(k);
            (renamed != k).then_some(renamed)
        })?;
        let model = Self::new(&file.config, device)
            .map_err(|e| layers::with_config_path(e, &config_path))?;
        let (model, mut report) =
            load_weights_as(model, &source, LoadMode::Lenient, options.dtype)?;
        report.applied = report.applied.iter().map(|k| to_stored_key(k)).collect();
        report.missing = report.missing.iter().map(|k| to_stored_key(k)).collect();
        report.unexpected = report
            .unexpected
            .iter()
            .map(|k| to_stored_key(k))
            .filter(|k| !is_ignored(k))
            .collect();
        if options.mode == LoadMode::Strict {
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

    /// The config the model was built from.
    pub fn config(&self) -> &RobertaSeriesConfig {
        &self.config
    }

    /// Encode token ids. `attention_mask` (1 for tokens, 0 for padding) hides padding from
    /// attention; diffusers passes the tokenizer's mask when `use_attention_mask` is set.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[B, S]`; output: see [`TransformationModelOutput`]
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`input_ids`) for an empty batch, an id outside the vocabulary
    /// or a sequence longer than the position table allows
    /// (`max_position_embeddings - pad_token_id - 1`); (`attention_mask`) for a mask of another
    /// shape or with values other than 0 and 1.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Result<TransformationModelOutput> {
        let [b, s] = input_ids.dims();
        let pad = self.config.pad_token_id.unwrap_or(1);
        let max = self.config.max_position_embeddings - pad as usize - 1;
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
        // create_position_ids_from_input_ids: count non-padding tokens, padding keeps `pad`.
        let positions: Vec<i64> = ids
            .chunks(s)
            .flat_map(|row| {
                let mut count = 0;
                row.iter()
                    .map(|&id| {
                        if id == pad {
                            pad
                        } else {
                            count += 1;
                            count + pad
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let positions = Tensor::<2, Int>::from_data(TensorData::new(positions, [b, s]), &device);
        let token_types = Tensor::<2, Int>::zeros([b, s], &device);
        let emb = &self.roberta.embeddings;
        let x = emb.word_embeddings.forward(input_ids)
            + emb.token_type_embeddings.forward(token_types)
            + emb.position_embeddings.forward(positions);
        let mut x = emb.layer_norm.forward(x);

        let bias = match attention_mask {
            None => None,
            Some(mask) => {
                let keep = read_attention_mask(mask, [b, s])?;
                let values: Vec<f32> = keep
                    .iter()
                    .map(|&k| if k == 0 { f32::MIN } else { 0.0 })
                    .collect();
                let heads = self.config.num_attention_heads;
                Some(
                    Tensor::<4>::from_data(TensorData::new(values, [b, 1, 1, s]), &device)
                        .expand([b, heads, s, s]),
                )
            }
        };
        let mut hidden_states = Vec::with_capacity(self.roberta.encoder.layer.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.roberta.encoder.layer {
            x = layer.forward(x, bias.clone());
            hidden_states.push(x.clone());
        }
        let projection_state = match (&self.transformation_pre, &self.pre_ln) {
            (Some(transformation_pre), Some(pre_ln)) => {
                let second_last = hidden_states[hidden_states.len() - 2].clone();
                transformation_pre.forward(pre_ln.forward(second_last))
            }
            _ => self.transformation.forward(x.clone()),
        };
        Ok(TransformationModelOutput {
            projection_state,
            last_hidden_state: x,
            hidden_states,
        })
    }
}

/// transformers' key → this module's key.
fn to_module_key(key: &str) -> String {
    let key = key
        .replace(".attention.self.", ".attention.self_attn.")
        .replace(".LayerNorm.", ".layer_norm.");
    match key.strip_prefix("pre_LN.") {
        Some(rest) => format!("pre_ln.{rest}"),
        None => key,
    }
}

/// This module's key → transformers' key (for reports and errors).
fn to_stored_key(key: &str) -> String {
    let key = key
        .replace(".attention.self_attn.", ".attention.self.")
        .replace(".layer_norm.", ".LayerNorm.");
    match key.strip_prefix("pre_ln.") {
        Some(rest) => format!("pre_LN.{rest}"),
        None => key,
    }
}

/// Keys diffusers' `_keys_to_ignore_on_load_unexpected` / transformers' buffers cover.
fn is_ignored(key: &str) -> bool {
    key.contains("pooler")
        || key.contains("logit_scale")
        || key.ends_with("position_ids")
        || key.ends_with("embeddings.token_type_ids")
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
