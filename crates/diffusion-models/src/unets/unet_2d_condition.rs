//! `UNet2DConditionModel`: the text-conditioned UNet of Stable Diffusion 1.x / 2.x, SDXL,
//! inpainting, LCM and ControlNet / T2I-Adapter pipelines
//! (`diffusers.models.unets.unet_2d_condition`).
//!
//! [`UNet2DConditionModel::forward`] takes the common inputs; the rare ones (class labels, LCM's
//! `timestep_cond`, SDXL's `added_cond_kwargs`, the encoder attention mask, ControlNet and
//! T2I-Adapter residuals) go through [`UNet2DConditionOptions`] and
//! [`UNet2DConditionModel::forward_with`]. [`UNet2DConditionModel::set_attention_hook`] installs
//! an [`AttentionHook`] that every transformer attention layer calls.
//!
//! Built: `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UNetMidBlock2D`,
//! `CrossAttnUpBlock2D`, `UpBlock2D`; positional or Fourier time features; class embeddings
//! (table, `"timestep"`, `"identity"`, `"projection"`, `"simple_projection"`, optionally
//! concatenated); `addition_embed_type = "text_time"`; `encoder_hid_dim_type = "text_proj"`.
//! Not built (an [`Error::Unsupported`] naming the field): the `SimpleCrossAttn`, `ResnetDownsample`
//! and `K` blocks, `dual_cross_attention`, GLIGEN, the Kandinsky addition embeddings and
//! image projections. Not taken by `forward_with`: the self-attention `attention_mask` (unused by
//! diffusers' pipelines), `cross_attention_kwargs` (a LoRA scale or custom processor arguments:
//! use an [`AttentionHook`]), FreeU.

mod config;
mod embeddings;
mod ip_adapter;

use std::collections::VecDeque;
use std::sync::Arc;

pub use config::{PerBlock, ResolvedBlocks, TransformerLayers, UNet2DConditionModelConfig};
pub use embeddings::{ClassEmbedding, TimeProjection};
pub use ip_adapter::{IPAdapterBlockScales, IPAdapterScale, ImageEmbeds};

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::nn::{GroupNorm, Linear};
use diffusion_core::burn::tensor::{DType, Tensor};
use diffusion_core::{Device, Error, Result};

use crate::activations::Activation;
use crate::attention::CrossAttentionInputs;
use crate::attention_processor::{AttentionHook, AttentionHookSlot, IPAdapterAttnInputs};
use crate::embeddings::{TimestepEmbedding, Timesteps};
use crate::layers;
use crate::modeling_utils::ModelMixin;
use crate::resnet::TimeEmbeddingNorm;
use crate::unets::unet_2d::ClassLabels;
use crate::unets::unet_2d_blocks::{
    BlockArgs, CrossAttnArgs, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, MidBlockArgs,
    ResampleType, UNetMidBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D,
};

/// The down block classes this port builds.
pub const DOWN_BLOCK_TYPES: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
/// The up block classes this port builds.
pub const UP_BLOCK_TYPES: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];
/// The mid block classes this port builds (`mid_block_type = null` builds none).
pub const MID_BLOCK_TYPES: [&str; 2] = ["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"];

/// A down block, named by its diffusers class.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum DownBlock {
    /// `CrossAttnDownBlock2D`.
    CrossAttnDownBlock2D(CrossAttnDownBlock2D),
    /// `DownBlock2D`.
    DownBlock2D(DownBlock2D),
}

/// An up block, named by its diffusers class.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum UpBlock {
    /// `CrossAttnUpBlock2D`.
    CrossAttnUpBlock2D(CrossAttnUpBlock2D),
    /// `UpBlock2D`.
    UpBlock2D(UpBlock2D),
}

impl UpBlock {
    fn num_resnets(&self) -> usize {
        match self {
            Self::CrossAttnUpBlock2D(b) => b.resnets.len(),
            Self::UpBlock2D(b) => b.resnets.len(),
        }
    }
}

/// The mid block, named by its diffusers class.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum MidBlock {
    /// `UNetMidBlock2DCrossAttn`.
    UNetMidBlock2DCrossAttn(UNetMidBlock2DCrossAttn),
    /// `UNetMidBlock2D` (one resnet, no attention).
    UNetMidBlock2D(UNetMidBlock2D),
}

/// SDXL's `added_cond_kwargs` (`addition_embed_type = "text_time"`).
#[derive(Clone, Debug, Default)]
pub struct AddedCondKwargs {
    /// Pooled text embedding, `[B, D]`.
    pub text_embeds: Option<Tensor<2>>,
    /// Size and crop conditioning (original size, crop top-left, target size), `[B, 6]`.
    pub time_ids: Option<Tensor<2>>,
    /// IP-Adapter image embeddings, one entry per loaded adapter (required once an adapter is
    /// loaded, see [`UNet2DConditionModel::load_ip_adapter_weights`]).
    pub image_embeds: Option<Vec<ImageEmbeds>>,
}

/// The rare inputs of [`UNet2DConditionModel::forward_with`]; `Default` passes none.
#[derive(Clone, Debug, Default)]
pub struct UNet2DConditionOptions {
    /// Class conditioning (`class_labels`), for models with a class embedding:
    /// [`ClassLabels::Indices`] for tables and `"timestep"`, [`ClassLabels::Values`] for
    /// `"timestep"`, [`ClassLabels::Embeddings`] (`[B, D]`) for `"identity"`, `"projection"`
    /// and `"simple_projection"`.
    pub class_labels: Option<ClassLabels>,
    /// LCM's guidance embedding, `[B, time_cond_proj_dim]`, added to the time features through
    /// `time_embedding.cond_proj`.
    pub timestep_cond: Option<Tensor<2>>,
    /// SDXL's pooled text embedding and time ids.
    pub added_cond_kwargs: Option<AddedCondKwargs>,
    /// Which encoder tokens cross-attention may see, `[B, S]`: 1 keeps, 0 discards (turned
    /// into a bias of `-10000` on the scores, as diffusers does).
    pub encoder_attention_mask: Option<Tensor<2>>,
    /// ControlNet residuals, one per skip connection of the down path (`conv_in`'s output,
    /// then every resnet and downsampler output), added to them. Needs
    /// `mid_block_additional_residual` too; without it, diffusers' deprecated behaviour
    /// applies: they are treated as `down_intrablock_additional_residuals`.
    pub down_block_additional_residuals: Option<Vec<Tensor<4>>>,
    /// ControlNet residual added to the mid block's output.
    pub mid_block_additional_residual: Option<Tensor<4>>,
    /// IP-Adapter masks, one entry per loaded adapter (`None` leaves that adapter unmasked);
    /// empty for none (diffusers' `cross_attention_kwargs["ip_adapter_masks"]`).
    pub ip_adapter_masks: Vec<Option<crate::attention_processor::IPAdapterMask>>,
    /// T2I-Adapter features, one per down block in order: added to the last
    /// (resnet, transformer) pair's output of a cross-attention block, or to the output of a
    /// plain block; one left over is added to the mid block's output when its shape matches.
    pub down_intrablock_additional_residuals: Option<Vec<Tensor<4>>>,
}

/// diffusers' `UNet2DConditionModel`: attribute names equal its state-dict keys.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    /// Input convolution.
    pub conv_in: Conv2d,
    /// Timestep features.
    pub time_proj: TimeProjection,
    /// MLP on the timestep features (with `cond_proj` for LCM).
    pub time_embedding: TimestepEmbedding,
    /// Projection of the encoder hidden states (`encoder_hid_dim_type = "text_proj"`).
    pub encoder_hid_proj: Option<Linear>,
    /// Class conditioning.
    pub class_embedding: Option<ClassEmbedding>,
    /// SDXL's sinusoidal features of `time_ids`.
    pub add_time_proj: Option<Timesteps>,
    /// SDXL's MLP on the pooled text embedding and time id features.
    pub add_embedding: Option<TimestepEmbedding>,
    /// Down path.
    pub down_blocks: Vec<DownBlock>,
    /// Middle block.
    pub mid_block: Option<MidBlock>,
    /// Up path.
    pub up_blocks: Vec<UpBlock>,
    /// The loaded IP-Adapters' image projections (diffusers' `encoder_hid_proj` with
    /// `encoder_hid_dim_type = "ip_image_proj"`).
    pub ip_image_proj: Option<crate::embeddings::ip_adapter::MultiIPAdapterImageProjection>,
    /// Output norm (absent with `norm_num_groups = null`).
    pub conv_norm_out: Option<GroupNorm>,
    /// Output convolution.
    pub conv_out: Conv2d,
    #[module(skip)]
    time_embed_act: Option<Activation>,
    #[module(skip)]
    conv_act: Activation,
    #[module(skip)]
    attention_hook: AttentionHookSlot,
    #[module(skip)]
    config: UNet2DConditionModelConfig,
}

/// diffusers strips a `UNetRes` prefix from block names.
fn strip_prefix(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}

impl UNet2DConditionModel {
    /// Build a model with freshly initialised (lazy) parameters.
    ///
    /// # Errors
    /// [`Error::ConfigField`] for inconsistent configs (list lengths that disagree with
    /// `down_block_types`, group counts that do not divide channels, a set
    /// `num_attention_heads`, ...), [`Error::Unsupported`] for block types, activations,
    /// embedding types and options this port does not implement (`dual_cross_attention`,
    /// `attention_type = "gated"`, ...). Paths in these errors read `<in-memory config>`;
    /// [`Self::from_pretrained`] reports the `config.json` instead.
    pub fn new(config: &UNet2DConditionModelConfig, device: &Device) -> Result<Self> {
        use diffusion_core::Config as _;
        config
            .validate()
            .map_err(|(field, message)| layers::config_error(&field, message))?;
        if config.dual_cross_attention {
            return Err(layers::unsupported(
                "dual_cross_attention",
                "true",
                "DualTransformer2DModel is not implemented",
            ));
        }
        if config.attention_type != "default" {
            return Err(layers::unsupported(
                "attention_type",
                &config.attention_type,
                "only \"default\" is implemented (no GLIGEN)",
            ));
        }
        let blocks = config
            .resolve_blocks()
            .map_err(|(field, message)| layers::config_error(&field, message))?;
        let act = Activation::from_name(&config.act_fn).ok_or_else(|| {
            layers::unsupported(
                "act_fn",
                &config.act_fn,
                format!("supported: {}", Activation::NAMES.join(", ")),
            )
        })?;
        let time_norm =
            TimeEmbeddingNorm::from_name(&config.resnet_time_scale_shift).ok_or_else(|| {
                layers::unsupported(
                    "resnet_time_scale_shift",
                    &config.resnet_time_scale_shift,
                    "this port's resnets take \"default\" or \"scale_shift\"",
                )
            })?;
        let emb = embeddings::build(config, device)?;
        let channels = &config.block_out_channels;
        let n_levels = channels.len();
        let base =
            |num_layers, in_channels, out_channels, prev_output_channel, add_resample| BlockArgs {
                num_layers,
                in_channels,
                out_channels,
                prev_output_channel,
                temb_channels: emb.blocks_time_embed_dim,
                add_resample,
                resnet_eps: config.norm_eps,
                resnet_act_fn: act,
                resnet_groups: config.norm_num_groups,
                attention_head_dim: out_channels,
                downsample_padding: config.downsample_padding,
                resnet_time_scale_shift: time_norm,
                resample_type: ResampleType::Conv,
                dropout: config.dropout,
            };
        let cross_args =
            |i: usize, layers: Vec<usize>, heads: &[usize], dims: &[usize], only: &[bool]| {
                CrossAttnArgs {
                    transformer_layers: layers,
                    num_attention_heads: heads[i],
                    cross_attention_dim: dims[i],
                    use_linear_projection: config.use_linear_projection,
                    only_cross_attention: only[i],
                    upcast_attention: config.upcast_attention,
                }
            };

        let mut down_blocks = Vec::with_capacity(n_levels);
        let mut output_channel = channels[0];
        for (i, name) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channels[i];
            let num_layers = blocks.layers_per_block[i];
            let args = base(
                num_layers,
                input_channel,
                output_channel,
                0,
                i + 1 < n_levels,
            );
            let path = format!("down_blocks.{i}");
            down_blocks.push(match strip_prefix(name) {
                "CrossAttnDownBlock2D" => {
                    let layers = blocks.down_transformer_layers[i]
                        .resolve(num_layers)
                        .unwrap_or_default();
                    let cross = cross_args(
                        i,
                        layers,
                        &blocks.num_attention_heads,
                        &blocks.cross_attention_dim,
                        &blocks.only_cross_attention,
                    );
                    DownBlock::CrossAttnDownBlock2D(CrossAttnDownBlock2D::new(
                        &args, &cross, &path, device,
                    )?)
                }
                "DownBlock2D" => DownBlock::DownBlock2D(DownBlock2D::new(&args, false, device)?),
                _ => {
                    return Err(layers::unsupported(
                        "down_block_types",
                        name,
                        format!("supported: {}", DOWN_BLOCK_TYPES.join(", ")),
                    ));
                }
            });
        }

        let last = channels[n_levels - 1];
        let mid_block = match config.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let layers = blocks.down_transformer_layers[n_levels - 1]
                    .resolve(1)
                    .unwrap_or_default();
                let cross = cross_args(
                    n_levels - 1,
                    layers,
                    &blocks.num_attention_heads,
                    &blocks.cross_attention_dim,
                    &blocks.only_cross_attention,
                );
                Some(MidBlock::UNetMidBlock2DCrossAttn(
                    UNetMidBlock2DCrossAttn::new(
                        &base(1, last, last, 0, false),
                        config.mid_block_scale_factor,
                        &cross,
                        "mid_block",
                        device,
                    )?,
                ))
            }
            Some("UNetMidBlock2D") => Some(MidBlock::UNetMidBlock2D(UNetMidBlock2D::with_layers(
                &MidBlockArgs {
                    in_channels: last,
                    temb_channels: Some(emb.blocks_time_embed_dim),
                    dropout: config.dropout,
                    resnet_eps: config.norm_eps,
                    resnet_act_fn: act,
                    output_scale_factor: config.mid_block_scale_factor,
                    resnet_time_scale_shift: time_norm,
                    attention_head_dim: last,
                    resnet_groups: config.norm_num_groups,
                    attn_groups: None,
                    add_attention: false,
                },
                0,
                device,
            )?)),
            Some(name @ "UNetMidBlock2DSimpleCrossAttn") => {
                return Err(layers::unsupported(
                    "mid_block_type",
                    name,
                    format!("supported: {}", MID_BLOCK_TYPES.join(", ")),
                ));
            }
            Some(other) => {
                return Err(layers::config_error(
                    "mid_block_type",
                    format!("unknown mid block `{other}`"),
                ));
            }
        };

        let reversed = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let rev_channels = reversed(channels);
        let rev_heads = reversed(&blocks.num_attention_heads);
        let rev_layers = reversed(&blocks.layers_per_block);
        let rev_cross = reversed(&blocks.cross_attention_dim);
        let rev_only: Vec<bool> = blocks.only_cross_attention.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n_levels);
        let mut output_channel = rev_channels[0];
        for (i, name) in config.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = rev_channels[i];
            let input_channel = rev_channels[(i + 1).min(n_levels - 1)];
            let num_layers = rev_layers[i] + 1;
            let args = base(
                num_layers,
                input_channel,
                output_channel,
                prev_output_channel,
                i + 1 < n_levels,
            );
            let path = format!("up_blocks.{i}");
            up_blocks.push(match strip_prefix(name) {
                "CrossAttnUpBlock2D" => {
                    let layers = blocks.up_transformer_layers[i]
                        .resolve(num_layers)
                        .unwrap_or_default();
                    let cross = cross_args(i, layers, &rev_heads, &rev_cross, &rev_only);
                    UpBlock::CrossAttnUpBlock2D(CrossAttnUpBlock2D::new(
                        &args, &cross, &path, device,
                    )?)
                }
                "UpBlock2D" => UpBlock::UpBlock2D(UpBlock2D::new(&args, false, device)?),
                _ => {
                    return Err(layers::unsupported(
                        "up_block_types",
                        name,
                        format!("supported: {}", UP_BLOCK_TYPES.join(", ")),
                    ));
                }
            });
        }

        let c0 = channels[0];
        let conv_norm_out = config
            .norm_num_groups
            .map(|groups| {
                layers::group_norm(groups, c0, config.norm_eps, "norm_num_groups", device)
            })
            .transpose()?;
        let conv = |cin: usize, cout: usize, k: usize| {
            layers::conv2d(cin, cout, k, 1, (k - 1) / 2, device)
        };
        Ok(Self {
            conv_in: conv(config.in_channels, c0, config.conv_in_kernel),
            time_proj: emb.time_proj,
            time_embedding: emb.time_embedding,
            encoder_hid_proj: emb.encoder_hid_proj,
            class_embedding: emb.class_embedding,
            add_time_proj: emb.add_time_proj,
            add_embedding: emb.add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            ip_image_proj: None,
            conv_norm_out,
            conv_out: conv(c0, config.out_channels, config.conv_out_kernel),
            time_embed_act: emb.time_embed_act,
            conv_act: act,
            attention_hook: AttentionHookSlot::default(),
            config: config.clone(),
        })
    }

    /// Install `hook` on every transformer attention layer (replacing any previous hook); see
    /// [`AttentionHook`]. The weights are shared with the hook's view of the layers, not copied.
    pub fn set_attention_hook(&mut self, hook: Arc<dyn AttentionHook>) {
        self.attention_hook = AttentionHookSlot(Some(hook));
    }

    /// Remove the attention hook (diffusers' default processors again).
    pub fn clear_attention_hook(&mut self) {
        self.attention_hook = AttentionHookSlot(None);
    }

    /// The installed attention hook, if any.
    pub fn attention_hook(&self) -> Option<&Arc<dyn AttentionHook>> {
        self.attention_hook.0.as_ref()
    }

    /// Predict the noise (or `v`, per the scheduler's training) for `sample` at `timesteps`,
    /// conditioned on `encoder_hidden_states`.
    ///
    /// `timesteps` holds one value for the whole batch or one per sample, used as given (like
    /// a float tensor passed to diffusers).
    ///
    /// # Shapes
    /// - `sample`: `[B, in_channels, H, W]` (any positive size: sides that are not multiples of
    ///   `2^(levels - 1)` are handled as diffusers does, by resizing in the up path)
    /// - `timesteps`: `[1]` or `[B]`
    /// - `encoder_hidden_states`: `[B, S, cross_attention_dim]` (`[B, S, encoder_hid_dim]` with
    ///   an encoder projection)
    /// - output: `[B, out_channels, H, W]`
    ///
    /// # Errors
    /// As [`Self::forward_with`].
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>> {
        self.forward_with(
            sample,
            timesteps,
            encoder_hidden_states,
            UNet2DConditionOptions::default(),
        )
    }

    /// [`Self::forward`] with the rare inputs of [`UNet2DConditionOptions`].
    ///
    /// # Shapes
    /// As [`Self::forward`]; see [`UNet2DConditionOptions`] for the options.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for: a sample with the wrong channels,
    /// an empty size or a dtype other than the model's; `encoder_hidden_states` of the wrong
    /// batch or width; a timestep count that is neither 1 nor `B`; class labels that are
    /// missing, unexpected or of the wrong kind; `timestep_cond` without `cond_proj` or of the
    /// wrong width; `added_cond_kwargs` missing `text_embeds` / `time_ids` on an SDXL model or
    /// of the wrong widths; an attention mask of the wrong shape; ControlNet / T2I-Adapter
    /// residuals of the wrong count or shape.
    pub fn forward_with(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        options: UNet2DConditionOptions,
    ) -> Result<Tensor<4>> {
        let [b, _, h, w] = sample.dims();
        let dtype = self.conv_in.weight.val().dtype();
        self.check_sample(&sample, dtype)?;
        let timesteps = broadcast_timesteps(timesteps, b)?;
        let encoder_hidden_states = self.prepare_encoder_states(encoder_hidden_states, b, dtype)?;
        let s_kv = encoder_hidden_states.dims()[1];
        let encoder_attention_bias = options
            .encoder_attention_mask
            .map(|mask| attention_bias(mask, b, s_kv, dtype))
            .transpose()?;

        let sample = if self.config.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };

        let mut emb = self.embed_time(timesteps, options.timestep_cond, b, dtype)?;
        if let Some(class_emb) = self.embed_class(options.class_labels, b, dtype)? {
            emb = if self.config.class_embeddings_concat {
                Tensor::cat(vec![emb, class_emb], 1)
            } else {
                emb.add(class_emb)
            };
        }
        let mut added_cond_kwargs = options.added_cond_kwargs;
        let image_embeds = added_cond_kwargs
            .as_mut()
            .and_then(|kwargs| kwargs.image_embeds.take());
        let ip_states =
            self.ip_adapter_states(image_embeds, &options.ip_adapter_masks, b, dtype)?;
        if let Some(aug) = self.embed_addition(added_cond_kwargs, b, dtype)? {
            emb = emb.add(aug);
        }
        if let Some(act) = self.time_embed_act {
            emb = act.forward(emb);
        }

        let inputs = CrossAttentionInputs {
            encoder_hidden_states: &encoder_hidden_states,
            encoder_attention_bias: encoder_attention_bias.as_ref(),
            hook: self.attention_hook.get(),
            ip_adapter: ip_states
                .as_deref()
                .map(|image_states| IPAdapterAttnInputs {
                    image_states,
                    masks: &options.ip_adapter_masks,
                }),
        };
        let (controlnet, mut adapter) = split_residuals(
            options.down_block_additional_residuals,
            options.mid_block_additional_residual,
            options.down_intrablock_additional_residuals,
        )?;

        // Down path.
        let mut x = layers::conv(&self.conv_in, sample);
        let mut res_samples = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let states = match block {
                DownBlock::CrossAttnDownBlock2D(d) => {
                    let residual = adapter.pop_front();
                    if let Some(r) = &residual {
                        let [_, _, xh, xw] = x.dims();
                        let want = [b, self.config.block_out_channels[i], xh, xw];
                        check_shape(r, want, "down_intrablock_additional_residuals", i)?;
                    }
                    let (out, states) = d.forward(x, &emb, &inputs, residual);
                    x = out;
                    states
                }
                DownBlock::DownBlock2D(d) => {
                    let (out, mut states) = d.forward(x, &emb);
                    x = out;
                    if let Some(r) = adapter.pop_front() {
                        check_shape(&r, x.dims(), "down_intrablock_additional_residuals", i)?;
                        x = x.add(r);
                        // diffusers adds in place, so the skip connection that is the block's
                        // output (its last state) carries the feature too.
                        if let Some(last) = states.last_mut() {
                            *last = x.clone();
                        }
                    }
                    states
                }
            };
            res_samples.extend(states);
        }
        if let Some((down, _)) = &controlnet {
            if down.len() != res_samples.len() {
                return Err(Error::invalid_argument(
                    "down_block_additional_residuals",
                    format!(
                        "{} residuals for {} skip connections",
                        down.len(),
                        res_samples.len()
                    ),
                ));
            }
            for (i, (res, extra)) in res_samples.iter_mut().zip(down).enumerate() {
                check_shape(extra, res.dims(), "down_block_additional_residuals", i)?;
                *res = res.clone().add(extra.clone());
            }
        }

        // Mid block.
        if let Some(mid) = &self.mid_block {
            x = match mid {
                MidBlock::UNetMidBlock2DCrossAttn(m) => m.forward(x, &emb, &inputs),
                MidBlock::UNetMidBlock2D(m) => m.forward(x, Some(&emb)),
            };
            // T2I-Adapter-XL: a feature left over for the mid block.
            if adapter.front().is_some_and(|r| r.dims() == x.dims())
                && let Some(r) = adapter.pop_front()
            {
                x = x.add(r);
            }
        }
        if !adapter.is_empty() {
            log::warn!(
                "{} down_intrablock_additional_residuals were not used",
                adapter.len()
            );
        }
        if let Some((_, mid)) = controlnet {
            check_shape(&mid, x.dims(), "mid_block_additional_residual", 0)?;
            x = x.add(mid);
        }

        // Up path; sides that are not multiples of the total downsampling are resized to the
        // skip connections' sizes instead of doubled.
        let factor = 1usize << self.num_upsamplers();
        let forward_upsample_size = !h.is_multiple_of(factor) || !w.is_multiple_of(factor);
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let take = block.num_resnets().min(res_samples.len());
            let block_res = res_samples.split_off(res_samples.len() - take);
            let upsample_size = match res_samples.last() {
                Some(next) if forward_upsample_size && i + 1 < n_up => {
                    let [_, _, nh, nw] = next.dims();
                    Some([nh, nw])
                }
                _ => None,
            };
            x = match block {
                UpBlock::CrossAttnUpBlock2D(u) => {
                    u.forward(x, block_res, &emb, &inputs, upsample_size)
                }
                UpBlock::UpBlock2D(u) => u.forward_to_size(x, block_res, &emb, upsample_size),
            };
        }

        if let Some(norm) = &self.conv_norm_out {
            x = layers::group_norm_act(norm, x, Some(self.conv_act));
        }
        let out = layers::conv(&self.conv_out, x);
        Ok(out)
    }

    /// How many up blocks double the resolution.
    fn num_upsamplers(&self) -> usize {
        self.up_blocks
            .iter()
            .filter(|b| match b {
                UpBlock::CrossAttnUpBlock2D(u) => !u.upsamplers.is_empty(),
                UpBlock::UpBlock2D(u) => !u.upsamplers.is_empty(),
            })
            .count()
    }

    fn check_sample(&self, sample: &Tensor<4>, dtype: DType) -> Result<()> {
        let [b, c, h, w] = sample.dims();
        if c != self.config.in_channels {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "has {c} channels, the model takes {}",
                    self.config.in_channels
                ),
            ));
        }
        if b == 0 || h == 0 || w == 0 {
            return Err(Error::invalid_argument(
                "sample",
                format!("shape [{b}, {c}, {h}, {w}] is empty"),
            ));
        }
        if sample.dtype() != dtype {
            return Err(Error::invalid_argument(
                "sample",
                format!(
                    "dtype {:?} differs from the model's {dtype:?}; cast one of them",
                    sample.dtype()
                ),
            ));
        }
        Ok(())
    }

    /// Check the encoder hidden states against every cross-attention layer and apply
    /// `encoder_hid_proj`.
    fn prepare_encoder_states(
        &self,
        states: Tensor<3>,
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor<3>> {
        let [eb, s, d] = states.dims();
        if eb != batch {
            return Err(Error::invalid_argument(
                "encoder_hidden_states",
                format!("batch {eb} differs from the sample's {batch}"),
            ));
        }
        if s == 0 {
            return Err(Error::invalid_argument(
                "encoder_hidden_states",
                "has no tokens",
            ));
        }
        if states.dtype() != dtype {
            return Err(Error::invalid_argument(
                "encoder_hidden_states",
                format!(
                    "dtype {:?} differs from the model's {dtype:?}; cast one of them",
                    states.dtype()
                ),
            ));
        }
        let states = match &self.encoder_hid_proj {
            Some(proj) => {
                let [d_in, _] = proj.weight.lazy_shape().dims::<2>();
                if d != d_in {
                    return Err(Error::invalid_argument(
                        "encoder_hidden_states",
                        format!("width {d}, the model takes {d_in} (encoder_hid_dim)"),
                    ));
                }
                proj.forward(states)
            }
            None => states,
        };
        let d = states.dims()[2];
        for (block, width) in self.cross_attention_widths() {
            if width != d {
                return Err(Error::invalid_argument(
                    "encoder_hidden_states",
                    format!(
                        "width {d}, but {block} attends to width {width} (cross_attention_dim)"
                    ),
                ));
            }
        }
        Ok(states)
    }

    /// The encoder width each cross-attention block expects, with the block's path.
    fn cross_attention_widths(&self) -> Vec<(String, usize)> {
        let blocks = match self.config.resolve_blocks() {
            Ok(blocks) => blocks,
            Err(_) => return Vec::new(),
        };
        let n = blocks.cross_attention_dim.len();
        let mut out = Vec::new();
        for (i, block) in self.down_blocks.iter().enumerate() {
            if matches!(block, DownBlock::CrossAttnDownBlock2D(_)) {
                out.push((format!("down_blocks.{i}"), blocks.cross_attention_dim[i]));
            }
        }
        if let Some(MidBlock::UNetMidBlock2DCrossAttn(_)) = &self.mid_block {
            out.push(("mid_block".into(), blocks.cross_attention_dim[n - 1]));
        }
        for (i, block) in self.up_blocks.iter().enumerate() {
            if matches!(block, UpBlock::CrossAttnUpBlock2D(_)) {
                out.push((
                    format!("up_blocks.{i}"),
                    blocks.cross_attention_dim[n - 1 - i],
                ));
            }
        }
        out
    }
}

/// ControlNet residuals (down, mid) and T2I-Adapter features, sorted out as diffusers does:
/// down residuals without a mid residual are (deprecated) adapter features.
type Residuals = (Option<(Vec<Tensor<4>>, Tensor<4>)>, VecDeque<Tensor<4>>);

fn split_residuals(
    down: Option<Vec<Tensor<4>>>,
    mid: Option<Tensor<4>>,
    intrablock: Option<Vec<Tensor<4>>>,
) -> Result<Residuals> {
    match (down, mid, intrablock) {
        (Some(down), Some(mid), adapter) => {
            Ok((Some((down, mid)), adapter.unwrap_or_default().into()))
        }
        (Some(down), None, None) => {
            log::warn!(
                "down_block_additional_residuals without mid_block_additional_residual are \
                 T2I-Adapter features (deprecated in diffusers); pass them as \
                 down_intrablock_additional_residuals"
            );
            Ok((None, down.into()))
        }
        (Some(_), None, Some(_)) => Err(Error::invalid_argument(
            "mid_block_additional_residual",
            "ControlNet residuals need the mid block residual too",
        )),
        (None, Some(_), _) => Err(Error::invalid_argument(
            "down_block_additional_residuals",
            "ControlNet residuals need the down block residuals too",
        )),
        (None, None, adapter) => Ok((None, adapter.unwrap_or_default().into())),
    }
}

/// diffusers' `timesteps.expand(batch)`: one timestep for all samples, or one each.
fn broadcast_timesteps(timesteps: Tensor<1>, batch: usize) -> Result<Tensor<1>> {
    match timesteps.dims()[0] {
        n if n == batch => Ok(timesteps),
        1 => Ok(timesteps.repeat_dim(0, batch)),
        n => Err(Error::invalid_argument(
            "timesteps",
            format!("{n} timesteps for a batch of {batch}; pass 1 or {batch}"),
        )),
    }
}

/// A keep-mask `[B, S]` as the additive bias `(1 - mask) * -10000`, `[B, 1, 1, S]`.
fn attention_bias(mask: Tensor<2>, batch: usize, s_kv: usize, dtype: DType) -> Result<Tensor<4>> {
    let [mb, ms] = mask.dims();
    if mb != batch || ms != s_kv {
        return Err(Error::invalid_argument(
            "encoder_attention_mask",
            format!("shape [{mb}, {ms}]; the encoder hidden states need [{batch}, {s_kv}]"),
        ));
    }
    let mask = if mask.dtype() == dtype {
        mask
    } else {
        mask.cast(diffusion_core::burn::tensor::FloatDType::from(dtype))
    };
    Ok(mask
        .neg()
        .add_scalar(1.0)
        .mul_scalar(-10000.0)
        .reshape([batch, 1, 1, s_kv]))
}

fn check_shape(t: &Tensor<4>, want: [usize; 4], name: &str, index: usize) -> Result<()> {
    let got = t.dims();
    if got == want {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            name,
            format!("entry {index} has shape {got:?}, expected {want:?}"),
        ))
    }
}

impl ModelMixin for UNet2DConditionModel {
    type Config = UNet2DConditionModelConfig;

    fn from_config(config: &UNet2DConditionModelConfig, device: &Device) -> Result<Self> {
        Self::new(config, device)
    }

    fn config(&self) -> &UNet2DConditionModelConfig {
        &self.config
    }
}
