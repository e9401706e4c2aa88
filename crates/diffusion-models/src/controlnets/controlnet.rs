//! `ControlNetModel`: a trainable copy of a `UNet2DConditionModel`'s down path and mid block
//! that turns a conditioning image (edges, depth, pose, ...) into residuals for the UNet's skip
//! connections (`diffusers.models.controlnets.controlnet`).
//!
//! The down and mid blocks are built by [`UNet2DConditionModel::new`] from the UNet config
//! the ControlNet's config describes ([`ControlNetModelConfig::to_unet_config`]), so both
//! models share one block builder. The residuals of [`ControlNetModel::forward`] are what
//! [`UNet2DConditionOptions`] takes ([`ControlNetOutput::into_unet_options`]).
//!
//! Not built (an [`Error::Unsupported`] naming the field): class embeddings, `encoder_hid_dim`
//! (diffusers builds the projection but never applies it), `addition_embed_type = "text"`.
//! Not taken: diffusers' `attention_mask` (a self-attention bias that only fits when the token
//! count equals the latent pixels; its pipelines never pass it), `timestep_cond`,
//! `cross_attention_kwargs`.

mod config;

pub use config::ControlNetModelConfig;

use diffusion_core::burn;
use diffusion_core::burn::module::{Module, ModuleMapper, Param, ParamId};
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor};
use diffusion_core::{Device, Error, Result};

use crate::attention::CrossAttentionInputs;
use crate::embeddings::{TimestepEmbedding, Timesteps};
use crate::layers;
use crate::modeling_utils::ModelMixin;
use crate::unets::unet_2d_condition::{
    AddedCondKwargs, DownBlock, MidBlock, TimeProjection, UNet2DConditionModel,
    UNet2DConditionOptions,
};

/// diffusers' `ControlNetConditioningEmbedding`: a small strided CNN from the conditioning
/// image (pixel space) to the latent resolution and `block_out_channels[0]` channels.
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding {
    /// `conditioning_channels` → `conditioning_embedding_out_channels[0]`.
    pub conv_in: Conv2d,
    /// Per level: a 3×3 convolution, then a strided one to the next level's channels.
    pub blocks: Vec<Conv2d>,
    /// Zero-initialised in diffusers; to `block_out_channels[0]`.
    pub conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    /// Build with fresh weights.
    pub fn new(
        conditioning_embedding_channels: usize,
        conditioning_channels: usize,
        block_out_channels: &[usize],
        device: &Device,
    ) -> Self {
        let conv_in = layers::conv2d(
            conditioning_channels,
            block_out_channels[0],
            3,
            1,
            1,
            device,
        );
        let mut blocks = Vec::new();
        for pair in block_out_channels.windows(2) {
            blocks.push(layers::conv2d(pair[0], pair[0], 3, 1, 1, device));
            blocks.push(layers::conv2d(pair[0], pair[1], 3, 2, 1, device));
        }
        let last = block_out_channels[block_out_channels.len() - 1];
        let conv_out = layers::conv2d(last, conditioning_embedding_channels, 3, 1, 1, device);
        Self {
            conv_in,
            blocks,
            conv_out,
        }
    }

    /// # Shapes
    /// - `conditioning`: `[B, conditioning_channels, H, W]`
    /// - output: `[B, conditioning_embedding_channels, H / 2^(levels - 1), W / 2^(levels - 1)]`
    pub fn forward(&self, conditioning: Tensor<4>) -> Tensor<4> {
        let silu = burn::tensor::activation::silu;
        let mut x = silu(layers::conv(&self.conv_in, conditioning));
        for block in &self.blocks {
            x = silu(layers::conv(block, x));
        }
        layers::conv(&self.conv_out, x)
    }
}

/// The rare inputs of [`ControlNetModel::forward_with`]; `Default` is diffusers' defaults.
#[derive(Clone, Debug)]
pub struct ControlNetOptions {
    /// Multiplies every residual (`conditioning_scale`, default 1).
    pub conditioning_scale: f64,
    /// Scale the residuals from 0.1 (first) to 1 (mid) logarithmically (`guess_mode`).
    pub guess_mode: bool,
    /// SDXL's pooled text embedding and time ids.
    pub added_cond_kwargs: Option<AddedCondKwargs>,
}

impl Default for ControlNetOptions {
    fn default() -> Self {
        Self {
            conditioning_scale: 1.0,
            guess_mode: false,
            added_cond_kwargs: None,
        }
    }
}

/// diffusers' `ControlNetOutput`.
#[derive(Clone, Debug)]
pub struct ControlNetOutput {
    /// One residual per skip connection of the UNet's down path.
    pub down_block_res_samples: Vec<Tensor<4>>,
    /// The residual of the mid block's output.
    pub mid_block_res_sample: Tensor<4>,
}

impl ControlNetOutput {
    /// The UNet options that add these residuals (other options left at their defaults).
    pub fn into_unet_options(self) -> UNet2DConditionOptions {
        UNet2DConditionOptions {
            down_block_additional_residuals: Some(self.down_block_res_samples),
            mid_block_additional_residual: Some(self.mid_block_res_sample),
            ..UNet2DConditionOptions::default()
        }
    }
}

/// What [`ControlNetModel::from_unet`] takes besides the UNet (diffusers' keyword arguments).
#[derive(Clone, Debug)]
pub struct FromUNetOptions {
    /// `"rgb"` or `"bgr"`.
    pub controlnet_conditioning_channel_order: String,
    /// Channels of the conditioning embedding.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Copy the UNet's weights (diffusers' default) instead of fresh ones.
    pub load_weights_from_unet: bool,
    /// Channels of the conditioning image.
    pub conditioning_channels: usize,
}

impl Default for FromUNetOptions {
    fn default() -> Self {
        Self {
            controlnet_conditioning_channel_order: "rgb".into(),
            conditioning_embedding_out_channels: vec![16, 32, 96, 256],
            load_weights_from_unet: true,
            conditioning_channels: 3,
        }
    }
}

/// diffusers' `ControlNetModel`: attribute names equal its state-dict keys.
#[derive(Module, Debug)]
pub struct ControlNetModel {
    /// Input convolution of the latents.
    pub conv_in: Conv2d,
    /// Timestep features.
    pub time_proj: TimeProjection,
    /// MLP on the timestep features.
    pub time_embedding: TimestepEmbedding,
    /// SDXL's sinusoidal features of `time_ids`.
    pub add_time_proj: Option<Timesteps>,
    /// SDXL's MLP on the pooled text embedding and time id features.
    pub add_embedding: Option<TimestepEmbedding>,
    /// Conditioning image to latent-resolution features, added after `conv_in`.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding,
    /// Down path (as the UNet's).
    pub down_blocks: Vec<DownBlock>,
    /// Zero convolutions, one per skip connection.
    pub controlnet_down_blocks: Vec<Conv2d>,
    /// Zero convolution of the mid block's output.
    pub controlnet_mid_block: Conv2d,
    /// Middle block (as the UNet's).
    pub mid_block: MidBlock,
    #[module(skip)]
    config: ControlNetModelConfig,
}

/// Gives every parameter a fresh id, so a copied module trains apart from its source.
struct FreshIds;

impl ModuleMapper for FreshIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (_, value, mapper) = param.consume();
        Param::from_mapped_value(ParamId::new(), value, mapper)
    }
}

impl ControlNetModel {
    /// Build a model with freshly initialised (lazy) parameters. Unlike diffusers, the zero
    /// convolutions are not zeroed: use [`Self::from_unet`] (or load weights) for training.
    ///
    /// # Errors
    /// As [`UNet2DConditionModel::new`] for the shared fields; [`Error::Unsupported`] for class
    /// embeddings, `encoder_hid_dim` and `addition_embed_type` other than `"text_time"`;
    /// [`Error::ConfigField`] for an unknown channel order or no mid block.
    pub fn new(config: &ControlNetModelConfig, device: &Device) -> Result<Self> {
        use diffusion_core::Config as _;
        config
            .validate()
            .map_err(|(field, message)| layers::config_error(&field, message))?;
        for (field, set) in [
            ("class_embed_type", config.class_embed_type.is_some()),
            ("num_class_embeds", config.num_class_embeds.is_some()),
            ("encoder_hid_dim", config.encoder_hid_dim.is_some()),
            (
                "encoder_hid_dim_type",
                config.encoder_hid_dim_type.is_some(),
            ),
        ] {
            if set {
                return Err(layers::unsupported(
                    field,
                    "set",
                    "ControlNetModel is built without class embeddings or encoder projections",
                ));
            }
        }
        if let Some(kind) = config.addition_embed_type.as_deref()
            && kind != "text_time"
        {
            return Err(layers::unsupported(
                "addition_embed_type",
                kind,
                "only \"text_time\" is implemented",
            ));
        }
        let unet = UNet2DConditionModel::new(&config.to_unet_config(), device)?;
        Ok(Self::from_parts(unet, config.clone(), device))
    }

    /// Keep the UNet's embeddings, down path and mid block; add the ControlNet's own layers.
    fn from_parts(
        unet: UNet2DConditionModel,
        config: ControlNetModelConfig,
        device: &Device,
    ) -> Self {
        let c0 = config.block_out_channels[0];
        let controlnet_cond_embedding = ControlNetConditioningEmbedding::new(
            c0,
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            device,
        );
        // One zero convolution per skip connection: conv_in, every resnet, every downsampler.
        let zero = |c: usize| layers::conv2d(c, c, 1, 1, 0, device);
        let mut controlnet_down_blocks = vec![zero(c0)];
        let layers_per_block = config
            .layers_per_block
            .resolve(config.down_block_types.len())
            .unwrap_or_default();
        let n = config.block_out_channels.len();
        for (i, &c) in config.block_out_channels.iter().enumerate() {
            for _ in 0..layers_per_block[i] {
                controlnet_down_blocks.push(zero(c));
            }
            if i + 1 < n {
                controlnet_down_blocks.push(zero(c));
            }
        }
        let controlnet_mid_block = zero(config.block_out_channels[n - 1]);
        let mid_block = unet
            .mid_block
            .expect("validate() requires a mid block, and UNet2DConditionModel::new builds it");
        Self {
            conv_in: unet.conv_in,
            time_proj: unet.time_proj,
            time_embedding: unet.time_embedding,
            add_time_proj: unet.add_time_proj,
            add_embedding: unet.add_embedding,
            controlnet_cond_embedding,
            down_blocks: unet.down_blocks,
            controlnet_down_blocks,
            controlnet_mid_block,
            mid_block,
            config,
        }
    }

    /// diffusers' `ControlNetModel.from_unet`: a ControlNet with the UNet's layout and, with
    /// `load_weights_from_unet`, copies of its `conv_in`, time embedding, SDXL addition
    /// embedding, down blocks and mid block. The ControlNet's own layers are fresh; the zero
    /// convolutions and `controlnet_cond_embedding.conv_out` are zero, as in diffusers.
    ///
    /// # Errors
    /// As [`Self::new`] for the derived config.
    pub fn from_unet(unet: &UNet2DConditionModel, options: &FromUNetOptions) -> Result<Self> {
        let device = unet.conv_in.weight.lazy_device();
        let config = ControlNetModelConfig::from_unet(
            unet.config(),
            options.conditioning_channels,
            options.conditioning_embedding_out_channels.clone(),
            &options.controlnet_conditioning_channel_order,
        );
        let mut model = Self::new(&config, &device)?;
        if options.load_weights_from_unet {
            model.conv_in = unet.conv_in.clone().map(&mut FreshIds);
            model.time_proj = unet.time_proj.clone();
            model.time_embedding = unet.time_embedding.clone().map(&mut FreshIds);
            if let (Some(_), Some(src)) = (&model.add_embedding, &unet.add_embedding) {
                model.add_embedding = Some(src.clone().map(&mut FreshIds));
            }
            model.down_blocks = unet
                .down_blocks
                .iter()
                .map(|b| b.clone().map(&mut FreshIds))
                .collect();
            if let Some(mid) = &unet.mid_block {
                model.mid_block = mid.clone().map(&mut FreshIds);
            }
        }
        model.zero_controlnet_layers();
        Ok(model)
    }

    /// diffusers' `zero_module` on the zero convolutions and the conditioning embedding's
    /// output convolution.
    fn zero_controlnet_layers(&mut self) {
        struct Zero;
        impl ModuleMapper for Zero {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let (id, value, mapper) = param.consume();
                Param::from_mapped_value(id, value.zeros_like(), mapper)
            }
        }
        self.controlnet_cond_embedding.conv_out = self
            .controlnet_cond_embedding
            .conv_out
            .clone()
            .map(&mut Zero);
        self.controlnet_down_blocks = std::mem::take(&mut self.controlnet_down_blocks)
            .into_iter()
            .map(|c| c.map(&mut Zero))
            .collect();
        self.controlnet_mid_block = self.controlnet_mid_block.clone().map(&mut Zero);
    }

    /// The residuals for `sample` at `timesteps`, conditioned on `encoder_hidden_states` and
    /// the conditioning image `controlnet_cond`, each multiplied by `conditioning_scale`.
    ///
    /// # Shapes
    /// - `sample`: `[B, in_channels, H, W]` (latents)
    /// - `timesteps`: `[1]` or `[B]`
    /// - `encoder_hidden_states`: `[B, S, cross_attention_dim]`
    /// - `controlnet_cond`: `[B, conditioning_channels, H * 2^(k - 1), W * 2^(k - 1)]` with `k`
    ///   the length of `conditioning_embedding_out_channels` (8× the latents for SD)
    ///
    /// # Errors
    /// As [`Self::forward_with`].
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        controlnet_cond: Tensor<4>,
        conditioning_scale: f64,
    ) -> Result<ControlNetOutput> {
        self.forward_with(
            sample,
            timesteps,
            encoder_hidden_states,
            controlnet_cond,
            ControlNetOptions {
                conditioning_scale,
                ..ControlNetOptions::default()
            },
        )
    }

    /// [`Self::forward`] with the options of [`ControlNetOptions`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for a sample, encoder states, timesteps,
    /// or conditioning image of the wrong shape, and for SDXL inputs that are
    /// missing or of the wrong width.
    pub fn forward_with(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        controlnet_cond: Tensor<4>,
        options: ControlNetOptions,
    ) -> Result<ControlNetOutput> {
        let [b, c, h, w] = sample.dims();
        let dtype = self.conv_in.weight.val().dtype();
        if c != self.config.in_channels || b == 0 || h == 0 || w == 0 {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "shape [{b}, {c}, {h}, {w}]; the model takes [B, {}, H, W]",
                    self.config.in_channels
                ),
            ));
        }
        let [eb, s_kv, _] = encoder_hidden_states.dims();
        if eb != b || s_kv == 0 {
            return Err(Error::invalid_argument(
                "encoder_hidden_states",
                format!("batch {eb} with {s_kv} tokens for a sample batch of {b}"),
            ));
        }
        let timesteps = match timesteps.dims()[0] {
            n if n == b => timesteps,
            1 => timesteps.repeat_dim(0, b),
            n => {
                return Err(Error::invalid_argument(
                    "timesteps",
                    format!("{n} timesteps for a batch of {b}; pass 1 or {b}"),
                ));
            }
        };
        let controlnet_cond = match self.config.controlnet_conditioning_channel_order.as_str() {
            "bgr" => controlnet_cond.flip([1]),
            _ => controlnet_cond,
        };
        let mut emb = self
            .time_embedding
            .forward(cast_to(self.time_features(timesteps), dtype));
        if let Some(aug) = self.embed_addition(options.added_cond_kwargs, b, dtype)? {
            emb = emb.add(aug);
        }

        let mut x = layers::conv(&self.conv_in, sample);
        let cond = self.controlnet_cond_embedding.forward(controlnet_cond);
        if cond.dims() != x.dims() {
            return Err(Error::invalid_argument(
                "controlnet_cond",
                format!(
                    "embeds to {:?}, the latents' features are {:?}",
                    cond.dims(),
                    x.dims()
                ),
            ));
        }
        x = x.add(cond);

        let inputs = CrossAttentionInputs {
            encoder_hidden_states: &encoder_hidden_states,
            encoder_attention_bias: None,
            hook: None,
            ip_adapter: None,
        };
        let mut res_samples = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) = match block {
                DownBlock::CrossAttnDownBlock2D(d) => d.forward(x, &emb, &inputs, None),
                DownBlock::DownBlock2D(d) => d.forward(x, &emb),
            };
            x = out;
            res_samples.extend(states);
        }
        x = match &self.mid_block {
            MidBlock::UNetMidBlock2DCrossAttn(m) => m.forward(x, &emb, &inputs),
            MidBlock::UNetMidBlock2D(m) => m.forward(x, Some(&emb)),
        };

        let mut down: Vec<Tensor<4>> = res_samples
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(r, conv)| layers::conv(conv, r))
            .collect();
        let mut mid = layers::conv(&self.controlnet_mid_block, x);

        let scale = options.conditioning_scale;
        if options.guess_mode && !self.config.global_pool_conditions {
            // torch.logspace(-1, 0, n + 1): 0.1 for the first residual up to 1 for the mid one.
            let n = down.len();
            let scales: Vec<f64> = (0..=n)
                .map(|k| 10f64.powf(-1.0 + k as f64 / n as f64) * scale)
                .collect();
            down = down
                .into_iter()
                .zip(&scales)
                .map(|(r, &s)| r.mul_scalar(s))
                .collect();
            mid = mid.mul_scalar(scales[n]);
        } else {
            down = down.into_iter().map(|r| r.mul_scalar(scale)).collect();
            mid = mid.mul_scalar(scale);
        }
        if self.config.global_pool_conditions {
            down = down
                .into_iter()
                .map(|r| r.mean_dim(3).mean_dim(2))
                .collect();
            mid = mid.mean_dim(3).mean_dim(2);
        }
        Ok(ControlNetOutput {
            down_block_res_samples: down,
            mid_block_res_sample: mid,
        })
    }

    /// Sinusoidal features of the timesteps, in f32.
    fn time_features(&self, timesteps: Tensor<1>) -> Tensor<2> {
        let timesteps = cast_to(timesteps, DType::F32);
        match &self.time_proj {
            TimeProjection::Positional(p) => p.forward(timesteps),
            TimeProjection::Fourier(p) => p.forward(timesteps),
        }
    }

    /// SDXL's `add_embedding(concat(text_embeds, add_time_proj(time_ids)))`.
    fn embed_addition(
        &self,
        kwargs: Option<AddedCondKwargs>,
        batch: usize,
        dtype: DType,
    ) -> Result<Option<Tensor<2>>> {
        let (Some(time_proj), Some(embedding)) = (&self.add_time_proj, &self.add_embedding) else {
            return Ok(None);
        };
        let missing = |name: &str| {
            Error::invalid_argument(
                "added_cond_kwargs",
                format!("addition_embed_type \"text_time\" needs `{name}`"),
            )
        };
        let kwargs = kwargs.ok_or_else(|| missing("text_embeds"))?;
        let text_embeds = kwargs.text_embeds.ok_or_else(|| missing("text_embeds"))?;
        let time_ids = kwargs.time_ids.ok_or_else(|| missing("time_ids"))?;
        let [tb, _] = text_embeds.dims();
        let [ib, n_ids] = time_ids.dims();
        if tb != batch || ib != batch {
            return Err(Error::invalid_argument(
                "added_cond_kwargs",
                format!("text_embeds batch {tb} and time_ids batch {ib} for a batch of {batch}"),
            ));
        }
        let features = time_proj.forward(cast_to(time_ids, DType::F32).reshape([batch * n_ids]));
        let width = features.dims()[1];
        let features = features.reshape([batch, n_ids * width]);
        let add = Tensor::cat(
            vec![cast_to(text_embeds, dtype), cast_to(features, dtype)],
            1,
        );
        let [_, got] = add.dims();
        let [want, _] = embedding.linear_1.weight.lazy_shape().dims::<2>();
        if got != want {
            return Err(Error::invalid_argument(
                "added_cond_kwargs",
                format!(
                    "text_embeds and time_id features are {got} wide, add_embedding takes {want}"
                ),
            ));
        }
        Ok(Some(embedding.forward(add)))
    }
}

fn cast_to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

impl ModelMixin for ControlNetModel {
    type Config = ControlNetModelConfig;

    fn from_config(config: &ControlNetModelConfig, device: &Device) -> Result<Self> {
        Self::new(config, device)
    }

    fn config(&self) -> &ControlNetModelConfig {
        &self.config
    }
}
