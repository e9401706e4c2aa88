//! The conditioning embeddings of `UNet2DConditionModel`: timestep features and MLP, class
//! embeddings, SDXL's `text_time` addition, and the encoder projection.

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::nn::{Embedding, EmbeddingConfig, Linear};
use diffusion_core::burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};
use diffusion_core::{Device, Error, Result};

use super::{AddedCondKwargs, UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::activations::Activation;
use crate::embeddings::{GaussianFourierProjection, TimestepEmbedding, Timesteps};
use crate::layers;
use crate::unets::unet_2d::{ClassLabels, IdentityEmbedding};

/// How timesteps become features (`time_proj`).
#[derive(Module, Debug)]
pub enum TimeProjection {
    /// Sinusoidal features (`"positional"`).
    Positional(Timesteps),
    /// Gaussian Fourier features (`"fourier"`, without `log`).
    Fourier(GaussianFourierProjection),
}

impl TimeProjection {
    /// Features in f32 whatever the input dtype (diffusers' `Timesteps` returns f32 too).
    fn forward(&self, t: Tensor<1>) -> Tensor<2> {
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.cast(FloatDType::F32)
        };
        match self {
            Self::Positional(p) => p.forward(t),
            Self::Fourier(p) => p.forward(t),
        }
    }
}

/// How class labels are embedded (`class_embedding`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // built once per model; boxing buys nothing
pub enum ClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)` (`class_embed_type = None`).
    Table(Embedding),
    /// `time_proj` then a [`TimestepEmbedding`] with `act_fn` (`"timestep"`).
    Timestep(TimestepEmbedding),
    /// Embeddings given directly (`"identity"`).
    Identity(IdentityEmbedding),
    /// A [`TimestepEmbedding`] on given vectors (`"projection"`).
    Projection(TimestepEmbedding),
    /// One linear layer on given vectors (`"simple_projection"`).
    SimpleProjection(Linear),
}

/// The embedding modules `UNet2DConditionModel::new` builds, and the widths it needs.
pub(super) struct Embeddings {
    pub time_proj: TimeProjection,
    pub time_embedding: TimestepEmbedding,
    pub encoder_hid_proj: Option<Linear>,
    pub class_embedding: Option<ClassEmbedding>,
    pub add_time_proj: Option<Timesteps>,
    pub add_embedding: Option<TimestepEmbedding>,
    pub time_embed_act: Option<Activation>,
    /// Width of the embedding the blocks receive (doubled by `class_embeddings_concat`).
    pub blocks_time_embed_dim: usize,
}

fn activation(field: &str, name: &str) -> Result<Activation> {
    Activation::from_name(name).ok_or_else(|| {
        layers::unsupported(
            field,
            name,
            format!("supported: {}", Activation::NAMES.join(", ")),
        )
    })
}

pub(super) fn build(config: &UNet2DConditionModelConfig, device: &Device) -> Result<Embeddings> {
    let c0 = config.block_out_channels[0];
    let time_embed_dim = config.time_embed_dim();
    let act = activation("act_fn", &config.act_fn)?;
    let (time_proj, timestep_input_dim) = match config.time_embedding_type.as_str() {
        "fourier" => (
            TimeProjection::Fourier(GaussianFourierProjection::new(
                time_embed_dim / 2,
                1.0,
                false,
                config.flip_sin_to_cos,
                device,
            )),
            time_embed_dim,
        ),
        _ => (
            TimeProjection::Positional(Timesteps::new(
                c0,
                config.flip_sin_to_cos,
                config.freq_shift,
            )),
            c0,
        ),
    };
    let post_act = config
        .timestep_post_act
        .as_deref()
        .map(|name| activation("timestep_post_act", name))
        .transpose()?;
    let time_embedding = TimestepEmbedding::with_options(
        timestep_input_dim,
        time_embed_dim,
        act,
        post_act,
        config.time_cond_proj_dim,
        device,
    );

    let hid_type = config
        .encoder_hid_dim_type
        .as_deref()
        .or(config.encoder_hid_dim.map(|_| "text_proj"));
    let encoder_hid_proj = match (hid_type, config.encoder_hid_dim) {
        (None, _) => None,
        (Some("text_proj"), Some(hid_dim)) => {
            let cross = match &config.cross_attention_dim {
                super::PerBlock::One(d) => *d,
                super::PerBlock::List(_) => {
                    return Err(layers::unsupported(
                        "cross_attention_dim",
                        "a list",
                        "encoder_hid_proj projects to one width; diffusers fails here too",
                    ));
                }
            };
            Some(layers::linear(hid_dim, cross, device))
        }
        (Some(kind @ ("text_image_proj" | "image_proj" | "ip_image_proj")), _) => {
            return Err(layers::unsupported(
                "encoder_hid_dim_type",
                kind,
                "only \"text_proj\" is implemented",
            ));
        }
        (Some(other), _) => {
            return Err(layers::config_error(
                "encoder_hid_dim_type",
                format!("`{other}` is not one of text_proj, text_image_proj, image_proj"),
            ));
        }
    };

    let projection_dim = config.projection_class_embeddings_input_dim.unwrap_or(0);
    let class_embedding = match (config.class_embed_type.as_deref(), config.num_class_embeds) {
        (None, Some(n)) => Some(ClassEmbedding::Table(
            EmbeddingConfig::new(n, time_embed_dim).init(device),
        )),
        (None, None) => None,
        (Some("timestep"), _) => Some(ClassEmbedding::Timestep(TimestepEmbedding::with_options(
            timestep_input_dim,
            time_embed_dim,
            act,
            None,
            None,
            device,
        ))),
        (Some("identity"), _) => Some(ClassEmbedding::Identity(IdentityEmbedding {
            dim: time_embed_dim,
        })),
        (Some("projection"), _) => Some(ClassEmbedding::Projection(TimestepEmbedding::new(
            projection_dim,
            time_embed_dim,
            device,
        ))),
        (Some("simple_projection"), _) => Some(ClassEmbedding::SimpleProjection(layers::linear(
            projection_dim,
            time_embed_dim,
            device,
        ))),
        (Some(other), _) => {
            // diffusers silently builds no class embedding for an unknown name.
            return Err(layers::config_error(
                "class_embed_type",
                format!(
                    "`{other}` is not one of timestep, identity, projection, simple_projection"
                ),
            ));
        }
    };

    let (add_time_proj, add_embedding) = match config.addition_embed_type.as_deref() {
        None => (None, None),
        Some("text_time") => (
            Some(Timesteps::new(
                config.addition_time_embed_dim.unwrap_or(0),
                config.flip_sin_to_cos,
                config.freq_shift,
            )),
            Some(TimestepEmbedding::new(
                projection_dim,
                time_embed_dim,
                device,
            )),
        ),
        Some(kind @ ("text" | "text_image" | "image" | "image_hint")) => {
            return Err(layers::unsupported(
                "addition_embed_type",
                kind,
                "only \"text_time\" (SDXL) is implemented",
            ));
        }
        Some(other) => {
            return Err(layers::config_error(
                "addition_embed_type",
                format!("`{other}` is not one of text, text_image, text_time, image, image_hint"),
            ));
        }
    };
    let time_embed_act = config
        .time_embedding_act_fn
        .as_deref()
        .map(|name| activation("time_embedding_act_fn", name))
        .transpose()?;
    Ok(Embeddings {
        time_proj,
        time_embedding,
        encoder_hid_proj,
        class_embedding,
        add_time_proj,
        add_embedding,
        time_embed_act,
        blocks_time_embed_dim: if config.class_embeddings_concat {
            2 * time_embed_dim
        } else {
            time_embed_dim
        },
    })
}

fn cast_to(t: Tensor<2>, dtype: DType) -> Tensor<2> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// `n` rows for a batch of `batch`: one row is repeated, `batch` rows are kept.
fn rows_for_batch(t: Tensor<2>, batch: usize, name: &str) -> Result<Tensor<2>> {
    match t.dims()[0] {
        n if n == batch => Ok(t),
        1 => Ok(t.repeat_dim(0, batch)),
        n => Err(Error::invalid_argument(
            name,
            format!("{n} rows for a batch of {batch}; pass 1 or {batch}"),
        )),
    }
}

fn check_width(t: &Tensor<2>, width: usize, name: &str) -> Result<()> {
    let d = t.dims()[1];
    if d == width {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            name,
            format!("has width {d}, the model takes {width}"),
        ))
    }
}

impl UNet2DConditionModel {
    /// `time_embedding(time_proj(t), timestep_cond)` in the model's dtype.
    pub(super) fn embed_time(
        &self,
        timesteps: Tensor<1>,
        timestep_cond: Option<Tensor<2>>,
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor<2>> {
        let t_emb = cast_to(self.time_proj.forward(timesteps), dtype);
        let condition = match (timestep_cond, self.time_embedding.cond_proj_dim()) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Error::invalid_argument(
                    "timestep_cond",
                    "this model has no cond_proj (time_cond_proj_dim is null)",
                ));
            }
            (Some(cond), Some(width)) => {
                check_width(&cond, width, "timestep_cond")?;
                Some(cast_to(
                    rows_for_batch(cond, batch, "timestep_cond")?,
                    dtype,
                ))
            }
        };
        Ok(self.time_embedding.forward_with_condition(t_emb, condition))
    }

    /// The class embedding of `labels`, `[batch, time_embed_dim]`.
    pub(super) fn embed_class(
        &self,
        labels: Option<ClassLabels>,
        batch: usize,
        dtype: DType,
    ) -> Result<Option<Tensor<2>>> {
        let (embedding, labels) = match (&self.class_embedding, labels) {
            (None, None) => return Ok(None),
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
            (Some(e), Some(l)) => (e, l),
        };
        let device = self.conv_in.weight.lazy_device();
        let as_values = |ids: &[usize]| {
            let values: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
            Tensor::<1>::from_data(TensorData::new(values, [ids.len()]), &device)
        };
        let emb = match (embedding, labels) {
            (ClassEmbedding::Table(table), ClassLabels::Indices(ids)) => {
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
                table.forward(ids).reshape([n, dim])
            }
            (ClassEmbedding::Timestep(mlp), ClassLabels::Indices(ids)) => {
                mlp.forward(cast_to(self.time_proj.forward(as_values(&ids)), dtype))
            }
            (ClassEmbedding::Timestep(mlp), ClassLabels::Values(t)) => {
                mlp.forward(cast_to(self.time_proj.forward(t), dtype))
            }
            (ClassEmbedding::Identity(identity), ClassLabels::Embeddings(e)) => {
                check_width(&e, identity.dim, "class_labels")?;
                cast_to(e, dtype)
            }
            (ClassEmbedding::Projection(mlp), ClassLabels::Embeddings(e)) => {
                check_width(
                    &e,
                    mlp.linear_1.weight.lazy_shape().dims::<2>()[0],
                    "class_labels",
                )?;
                mlp.forward(cast_to(e, dtype))
            }
            (ClassEmbedding::SimpleProjection(linear), ClassLabels::Embeddings(e)) => {
                check_width(
                    &e,
                    linear.weight.lazy_shape().dims::<2>()[0],
                    "class_labels",
                )?;
                linear.forward(cast_to(e, dtype))
            }
            (embedding, labels) => {
                return Err(Error::invalid_argument(
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
                            ClassEmbedding::Projection(_) => "\"projection\"",
                            ClassEmbedding::SimpleProjection(_) => "\"simple_projection\"",
                        }
                    ),
                ));
            }
        };
        Ok(Some(rows_for_batch(emb, batch, "class_labels")?))
    }

    /// SDXL's `add_embedding(cat(text_embeds, add_time_proj(time_ids)))`, when the model has
    /// one.
    pub(super) fn embed_addition(
        &self,
        added: Option<AddedCondKwargs>,
        batch: usize,
        dtype: DType,
    ) -> Result<Option<Tensor<2>>> {
        let (Some(time_proj), Some(mlp)) = (&self.add_time_proj, &self.add_embedding) else {
            if added.is_some_and(|a| a.text_embeds.is_some() || a.time_ids.is_some()) {
                return Err(Error::invalid_argument(
                    "added_cond_kwargs",
                    "this model has no addition embedding (addition_embed_type is null)",
                ));
            }
            return Ok(None);
        };
        let missing = |key: &str| {
            Error::invalid_argument(
                "added_cond_kwargs",
                format!(
                    "addition_embed_type \"text_time\" requires `{key}` (SDXL's pooled text \
                     embedding `text_embeds` [B, D] and `time_ids` [B, 6])"
                ),
            )
        };
        let added = added.unwrap_or_default();
        let text_embeds = added.text_embeds.ok_or_else(|| missing("text_embeds"))?;
        let time_ids = added.time_ids.ok_or_else(|| missing("time_ids"))?;
        let [tb, text_width] = text_embeds.dims();
        let [ib, n_ids] = time_ids.dims();
        if tb != batch || ib != batch {
            return Err(Error::invalid_argument(
                "added_cond_kwargs",
                format!(
                    "text_embeds has {tb} rows and time_ids {ib}; both need one per sample ({batch})"
                ),
            ));
        }
        let expected = mlp.linear_1.weight.lazy_shape().dims::<2>()[0];
        let got = text_width + n_ids * time_proj.num_channels;
        if got != expected {
            return Err(Error::invalid_argument(
                "added_cond_kwargs",
                format!(
                    "text_embeds width {text_width} plus {n_ids} time ids x {} features is {got}; \
                     the model takes {expected} (projection_class_embeddings_input_dim)",
                    time_proj.num_channels
                ),
            ));
        }
        let time_ids = time_ids.reshape([batch * n_ids]);
        let time_ids = if time_ids.dtype() == DType::F32 {
            time_ids
        } else {
            time_ids.cast(FloatDType::F32)
        };
        let time_embeds = time_proj
            .forward(time_ids)
            .reshape([batch, n_ids * time_proj.num_channels]);
        let add_embeds = Tensor::cat(vec![cast_to(text_embeds, DType::F32), time_embeds], 1);
        Ok(Some(mlp.forward(cast_to(add_embeds, dtype))))
    }
}
