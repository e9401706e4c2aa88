//! `UNet2DModel`: the unconditional (optionally class-conditional) 2-D UNet of DDPM, DDIM and
//! score-SDE pipelines (`diffusers.models.unets.unet_2d`).

pub(crate) mod config;

pub use config::{SampleSize, UNet2DModelConfig};

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::conv::Conv2d;
use diffusion_core::burn::nn::{Embedding, EmbeddingConfig, GroupNorm};
use diffusion_core::burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::{Device, Error, Result};

use crate::activations::Activation;
use crate::embeddings::{GaussianFourierProjection, TimestepEmbedding, Timesteps};
use crate::layers;
use crate::modeling_utils::ModelMixin;
use crate::resnet::TimeEmbeddingNorm;
use crate::unets::unet_2d_blocks::{
    BlockArgs, DownBlock, MidBlockArgs, ResampleType, UNetMidBlock2D, UpBlock, get_down_block,
    get_up_block,
};

/// How timesteps become features (`time_proj`).
#[derive(Module, Debug)]
pub enum TimeProjection {
    /// Sinusoidal features (`"positional"`).
    Positional(Timesteps),
    /// Gaussian Fourier features of `ln(t)` (`"fourier"`); the output is divided by `t`.
    Fourier(GaussianFourierProjection),
    /// A table indexed by integer timestep (`"learned"`).
    Learned(Embedding),
}

/// A parameterless identity (`nn.Identity`), for `class_embed_type = "identity"`.
#[derive(Module, Debug)]
pub struct IdentityEmbedding {
    /// Width of the embeddings passed through.
    pub dim: usize,
}

/// How class labels are embedded (`class_embedding`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum ClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)` (`class_embed_type = None`).
    Table(Embedding),
    /// `time_proj` then a [`TimestepEmbedding`] (`"timestep"`).
    Timestep(TimestepEmbedding),
    /// Embeddings given directly (`"identity"`).
    Identity(IdentityEmbedding),
}

/// Class conditioning passed to [`UNet2DModel::forward`]; one entry per sample, or one for all.
#[derive(Clone, Debug)]
pub enum ClassLabels {
    /// Integer labels: for `num_class_embeds` tables, and for `"timestep"` embeddings.
    Indices(Vec<usize>),
    /// Real-valued labels for `"timestep"` embeddings, `[N]`.
    Values(Tensor<1>),
    /// Ready embeddings for `"identity"`, `[N, time_embed_dim]`.
    Embeddings(Tensor<2>),
}

/// diffusers' `UNet2DModel`: attribute names equal its state-dict keys.
#[derive(Module, Debug)]
pub struct UNet2DModel {
    /// Input convolution.
    pub conv_in: Conv2d,
    /// Timestep features.
    pub time_proj: TimeProjection,
    /// MLP on the timestep features.
    pub time_embedding: TimestepEmbedding,
    /// Class conditioning, added to the time embedding.
    pub class_embedding: Option<ClassEmbedding>,
    /// Down path.
    pub down_blocks: Vec<DownBlock>,
    /// Middle block (`mid_block_type = None` removes it).
    pub mid_block: Option<UNetMidBlock2D>,
    /// Up path.
    pub up_blocks: Vec<UpBlock>,
    /// Output norm.
    pub conv_norm_out: GroupNorm,
    /// Output convolution.
    pub conv_out: Conv2d,
    #[module(skip)]
    config: UNet2DModelConfig,
}

fn time_embedding_norm(config: &UNet2DModelConfig) -> Result<TimeEmbeddingNorm> {
    TimeEmbeddingNorm::from_name(&config.resnet_time_scale_shift).ok_or_else(|| {
        layers::unsupported(
            "resnet_time_scale_shift",
            &config.resnet_time_scale_shift,
            "UNet2DModel's resnets take \"default\" or \"scale_shift\"",
        )
    })
}

fn resample_type(field: &str, value: &str) -> Result<ResampleType> {
    ResampleType::from_name(value)
        .ok_or_else(|| layers::unsupported(field, value, "expected \"conv\" or \"resnet\""))
}

impl UNet2DModel {
    /// Build a model with freshly initialised (lazy) parameters.
    ///
    /// # Errors
    /// [`Error::ConfigField`] for inconsistent configs (block list lengths, group counts that
    /// do not divide channels, ...), [`Error::Unsupported`] for block types, activations or
    /// embedding types this port does not implement. Paths in these errors read
    /// `<in-memory config>`; [`Self::from_pretrained`] reports the `config.json` instead.
    pub fn new(config: &UNet2DModelConfig, device: &Device) -> Result<Self> {
        use diffusion_core::Config as _;
        config
            .validate()
            .map_err(|(field, message)| layers::config_error(&field, message))?;
        let channels = &config.block_out_channels;
        let c0 = channels[0];
        let n_levels = channels.len();
        let time_embed_dim = config.time_embed_dim();
        let act = Activation::from_name(&config.act_fn).ok_or_else(|| {
            layers::unsupported(
                "act_fn",
                &config.act_fn,
                format!("supported: {}", Activation::NAMES.join(", ")),
            )
        })?;
        let time_norm = time_embedding_norm(config)?;
        let downsample_type = resample_type("downsample_type", &config.downsample_type)?;
        let upsample_type = resample_type("upsample_type", &config.upsample_type)?;

        let (time_proj, timestep_input_dim) = match config.time_embedding_type.as_str() {
            "fourier" => (
                TimeProjection::Fourier(GaussianFourierProjection::new(
                    c0, 16.0, true, false, device,
                )),
                2 * c0,
            ),
            "learned" => {
                let n = config.num_train_timesteps.unwrap_or(0);
                (
                    TimeProjection::Learned(EmbeddingConfig::new(n, c0).init(device)),
                    c0,
                )
            }
            _ => (
                TimeProjection::Positional(Timesteps::new(
                    c0,
                    config.flip_sin_to_cos,
                    config.freq_shift,
                )),
                c0,
            ),
        };
        let time_embedding = TimestepEmbedding::new(timestep_input_dim, time_embed_dim, device);
        let class_embedding = match (config.class_embed_type.as_deref(), config.num_class_embeds) {
            (None, Some(n)) => Some(ClassEmbedding::Table(
                EmbeddingConfig::new(n, time_embed_dim).init(device),
            )),
            (None, None) => None,
            (Some("timestep"), _) => Some(ClassEmbedding::Timestep(TimestepEmbedding::new(
                timestep_input_dim,
                time_embed_dim,
                device,
            ))),
            (Some("identity"), _) => Some(ClassEmbedding::Identity(IdentityEmbedding {
                dim: time_embed_dim,
            })),
            (Some(other), _) => {
                return Err(layers::unsupported(
                    "class_embed_type",
                    other,
                    "UNet2DModel takes null, \"timestep\" or \"identity\"",
                ));
            }
        };

        let args =
            |i: usize, in_ch: usize, out_ch: usize, prev: usize, layers_n: usize, resample| {
                BlockArgs {
                    num_layers: layers_n,
                    in_channels: in_ch,
                    out_channels: out_ch,
                    prev_output_channel: prev,
                    temb_channels: time_embed_dim,
                    add_resample: i + 1 < n_levels,
                    resnet_eps: config.norm_eps,
                    resnet_act_fn: act,
                    resnet_groups: config.norm_num_groups,
                    attention_head_dim: config.attention_head_dim.unwrap_or(out_ch),
                    downsample_padding: config.downsample_padding,
                    resnet_time_scale_shift: time_norm,
                    resample_type: resample,
                    dropout: config.dropout,
                }
            };
        let mut down_blocks = Vec::with_capacity(n_levels);
        let mut output_channel = c0;
        for (i, name) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channels[i];
            let block_args = args(
                i,
                input_channel,
                output_channel,
                0,
                config.layers_per_block,
                downsample_type,
            );
            down_blocks.push(get_down_block(name, &block_args, device)?);
        }
        let last = channels[n_levels - 1];
        let mid_block = match &config.mid_block_type {
            None => None,
            Some(name) => {
                if name != "UNetMidBlock2D" {
                    log::warn!(
                        "mid_block_type `{name}`: UNet2DModel always builds a UNetMidBlock2D"
                    );
                }
                Some(UNetMidBlock2D::new(
                    &MidBlockArgs {
                        in_channels: last,
                        temb_channels: Some(time_embed_dim),
                        dropout: config.dropout,
                        resnet_eps: config.norm_eps,
                        resnet_act_fn: act,
                        output_scale_factor: config.mid_block_scale_factor,
                        resnet_time_scale_shift: time_norm,
                        attention_head_dim: config.attention_head_dim.unwrap_or(last),
                        resnet_groups: config.norm_num_groups,
                        attn_groups: config.attn_norm_num_groups,
                        add_attention: config.add_attention,
                    },
                    device,
                )?)
            }
        };
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n_levels);
        let mut output_channel = reversed[0];
        for (i, name) in config.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = reversed[i];
            let input_channel = reversed[(i + 1).min(n_levels - 1)];
            let block_args = args(
                i,
                input_channel,
                output_channel,
                prev_output_channel,
                config.layers_per_block + 1,
                upsample_type,
            );
            up_blocks.push(get_up_block(name, &block_args, device)?);
        }
        let groups_out = config.norm_num_groups.unwrap_or_else(|| (c0 / 4).min(32));
        Ok(Self {
            conv_in: layers::conv2d(config.in_channels, c0, 3, 1, 1, device),
            time_proj,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: layers::group_norm(
                groups_out,
                c0,
                config.norm_eps,
                "norm_num_groups",
                device,
            )?,
            conv_out: layers::conv2d(c0, config.out_channels, 3, 1, 1, device),
            config: config.clone(),
        })
    }

    /// How many times the down path halves the resolution.
    fn num_downsamplings(&self) -> usize {
        self.config.block_out_channels.len().saturating_sub(1)
    }

    /// Predict the noise (or score) for `sample` at `timesteps`.
    ///
    /// `timesteps` holds one value for the whole batch or one per sample, used as given (like a
    /// float tensor passed to diffusers; note that diffusers truncates a bare Python `float`
    /// timestep to an integer first). For the `"learned"` embedding they must be integers below
    /// `num_train_timesteps`; for `"fourier"`, positive noise levels.
    ///
    /// # Shapes
    /// - `sample`: `[B, in_channels, H, W]`, with `H` and `W` multiples of
    ///   `2^(len(block_out_channels) - 1)`
    /// - `timesteps`: `[1]` or `[B]`
    /// - output: `[B, out_channels, H, W]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a sample with the wrong channels or size, a timestep count
    /// that is neither 1 nor `B`, invalid learned timesteps, and class labels that are missing,
    /// unexpected, of the wrong kind or out of range.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        class_labels: Option<ClassLabels>,
    ) -> Result<Tensor<4>> {
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
        let multiple = 1usize << self.num_downsamplings();
        if !h.is_multiple_of(multiple) || !w.is_multiple_of(multiple) || h == 0 || w == 0 {
            return Err(Error::invalid_argument(
                "sample",
                format!("{h}x{w} is not a positive multiple of {multiple} in both dimensions"),
            ));
        }
        let timesteps = broadcast_timesteps(timesteps, b)?;
        let sample = if self.config.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };

        let mut t_emb = self.project_time(timesteps.clone(), "timesteps")?;
        // diffusers' `t_emb.to(dtype=self.dtype)`: the projection is f32, the weights may be half.
        if t_emb.dtype() != sample.dtype() {
            t_emb = t_emb.cast(diffusion_core::burn::tensor::FloatDType::from(
                sample.dtype(),
            ));
        }
        let mut emb = self.time_embedding.forward(t_emb);
        emb = match (&self.class_embedding, class_labels) {
            (Some(embedding), Some(labels)) => emb.add(self.embed_class(embedding, labels, b)?),
            (Some(_), None) => {
                return Err(Error::invalid_argument(
                    "class_labels",
                    "this model is class-conditional; class labels are required",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::invalid_argument(
                    "class_labels",
                    "this model has no class embedding (num_class_embeds / class_embed_type unset)",
                ));
            }
            (None, None) => emb,
        };

        let mut skip_sample = sample.clone();
        let mut x = layers::conv(&self.conv_in, sample);
        let mut res_samples = vec![x.clone()];
        for block in &self.down_blocks {
            let states = match block {
                DownBlock::DownBlock2D(d) | DownBlock::AttnDownBlock2D(d) => {
                    let (out, states) = d.forward(x, &emb);
                    x = out;
                    states
                }
                DownBlock::SkipDownBlock2D(d) | DownBlock::AttnSkipDownBlock2D(d) => {
                    let (out, states, skip) = d.forward(x, &emb, skip_sample);
                    x = out;
                    skip_sample = skip;
                    states
                }
            };
            res_samples.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, Some(&emb));
        }
        let mut skip: Option<Tensor<4>> = None;
        for block in &self.up_blocks {
            // Balanced by construction: the down path yields one state per up-block resnet.
            let take = block.num_resnets().min(res_samples.len());
            let block_res = res_samples.split_off(res_samples.len() - take);
            x = match block {
                UpBlock::UpBlock2D(u) | UpBlock::AttnUpBlock2D(u) => u.forward(x, block_res, &emb),
                UpBlock::SkipUpBlock2D(u) | UpBlock::AttnSkipUpBlock2D(u) => {
                    let (out, new_skip) = u.forward(x, block_res, &emb, skip);
                    skip = new_skip;
                    out
                }
            };
        }
        let mut out = layers::conv(
            &self.conv_out,
            layers::group_norm_act(&self.conv_norm_out, x, Some(Activation::Silu)),
        );
        if let Some(skip) = skip {
            out = out.add(skip);
        }
        if let TimeProjection::Fourier(_) = self.time_proj {
            out = out.div(timesteps.reshape([b, 1, 1, 1]));
        }
        Ok(out)
    }

    /// `time_proj` on timesteps or class labels (`what` names the argument in errors).
    fn project_time(&self, t: Tensor<1>, what: &str) -> Result<Tensor<2>> {
        Ok(match &self.time_proj {
            TimeProjection::Positional(p) => p.forward(t),
            TimeProjection::Fourier(p) => p.forward(t),
            TimeProjection::Learned(table) => {
                let [n] = t.dims();
                let [size, dim] = table.weight.lazy_shape().dims::<2>();
                let values = diffusion_core::tensor::to_vec(t.clone());
                let indices = values
                    .iter()
                    .map(|&v| {
                        if v.fract() == 0.0 && v >= 0.0 && (v as usize) < size {
                            Ok(v as i64)
                        } else {
                            Err(Error::invalid_argument(
                                what,
                                format!("{v} is not an integer timestep below {size} (learned embedding)"),
                            ))
                        }
                    })
                    .collect::<Result<Vec<i64>>>()?;
                let ids =
                    Tensor::<2, Int>::from_data(TensorData::new(indices, [n, 1]), &t.device());
                table.forward(ids).reshape([n, dim])
            }
        })
    }

    fn embed_class(
        &self,
        embedding: &ClassEmbedding,
        labels: ClassLabels,
        batch: usize,
    ) -> Result<Tensor<2>> {
        let device = self.conv_in.weight.lazy_device();
        let count_ok = |n: usize| {
            if n == 1 || n == batch {
                Ok(())
            } else {
                Err(Error::invalid_argument(
                    "class_labels",
                    format!("{n} labels for a batch of {batch}; pass 1 or {batch}"),
                ))
            }
        };
        match (embedding, labels) {
            (ClassEmbedding::Table(table), ClassLabels::Indices(ids)) => {
                count_ok(ids.len())?;
                let [size, dim] = table.weight.lazy_shape().dims::<2>();
                if let Some(bad) = ids.iter().find(|&&i| i >= size) {
                    return Err(Error::invalid_argument(
                        "class_labels",
                        format!("label {bad} is out of range for {size} classes"),
                    ));
                }
                let n = ids.len();
                let ids: Vec<i64> = ids.into_iter().map(|i| i as i64).collect();
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, 1]), &device);
                Ok(table.forward(ids).reshape([n, dim]))
            }
            (ClassEmbedding::Timestep(mlp), ClassLabels::Indices(ids)) => {
                count_ok(ids.len())?;
                let n = ids.len();
                let values: Vec<f32> = ids.into_iter().map(|i| i as f32).collect();
                let t = Tensor::<1>::from_data(TensorData::new(values, [n]), &device);
                Ok(mlp.forward(self.project_time(t, "class_labels")?))
            }
            (ClassEmbedding::Timestep(mlp), ClassLabels::Values(t)) => {
                count_ok(t.dims()[0])?;
                Ok(mlp.forward(self.project_time(t, "class_labels")?))
            }
            (ClassEmbedding::Identity(identity), ClassLabels::Embeddings(e)) => {
                let [n, d] = e.dims();
                count_ok(n)?;
                if d != identity.dim {
                    return Err(Error::invalid_argument(
                        "class_labels",
                        format!(
                            "embeddings of width {d}; the time embedding has {}",
                            identity.dim
                        ),
                    ));
                }
                Ok(e)
            }
            (embedding, labels) => Err(Error::invalid_argument(
                "class_labels",
                format!(
                    "{} labels do not fit a {} class embedding",
                    match labels {
                        ClassLabels::Indices(_) => "integer",
                        ClassLabels::Values(_) => "real-valued",
                        ClassLabels::Embeddings(_) => "embedding",
                    },
                    match embedding {
                        ClassEmbedding::Table(_) => "table (num_class_embeds)",
                        ClassEmbedding::Timestep(_) => "\"timestep\"",
                        ClassEmbedding::Identity(_) => "\"identity\"",
                    }
                ),
            )),
        }
    }
}

/// diffusers' `timesteps * ones(batch)`: one timestep for all samples, or one each.
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

impl ModelMixin for UNet2DModel {
    type Config = UNet2DModelConfig;

    fn from_config(config: &UNet2DModelConfig, device: &Device) -> Result<Self> {
        Self::new(config, device)
    }

    fn config(&self) -> &UNet2DModelConfig {
        &self.config
    }
}
