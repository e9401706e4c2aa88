//! IP-Adapter on [`UNet2DConditionModel`] (diffusers' `UNet2DConditionLoadersMixin.
//! _load_ip_adapter_weights` and the `"ip_image_proj"` branch of the forward pass).
//!
//! Loading an adapter gives every cross-attention (`attn2`) layer an
//! [`IPAdapterAttnProcessor`] and the model an image projection per adapter; the forward pass
//! then needs [`AddedCondKwargs::image_embeds`](super::AddedCondKwargs), one entry per adapter.
//!
//! Checkpoint layout (the original IP-Adapter files, `.safetensors` or `.bin`): `image_proj.*`
//! (the projection, see [`IPAdapterImageProjection::from_ip_adapter_weights`]) and
//! `ip_adapter.<n>.to_k_ip.weight` / `.to_v_ip.weight`, where `n = 1, 3, 5, ...` numbers the
//! cross-attention layers in the order diffusers lists attention processors: down blocks, then
//! up blocks, then the mid block.

use std::collections::BTreeMap;

use diffusion_core::burn::module::Param;
use diffusion_core::burn::nn::Linear;
use diffusion_core::burn::tensor::{DType, FloatDType, Tensor, TensorData};
use diffusion_core::weights::WeightSource;
use diffusion_core::{Device, Error, Result};

use super::{DownBlock, MidBlock, UNet2DConditionModel, UpBlock};
use crate::attention_processor::{Attention, IPAdapterAttnProcessor, IPAdapterMask};
use crate::embeddings::ip_adapter::{IPAdapterImageProjection, MultiIPAdapterImageProjection};
use crate::transformers::transformer_2d::Transformer2DModel;

/// One adapter's image embeddings for [`AddedCondKwargs::image_embeds`](super::AddedCondKwargs)
/// (diffusers accepts `[B, num_images, D]` or `[B, num_images, S, D]` tensors).
#[derive(Clone, Debug)]
pub enum ImageEmbeds {
    /// Pooled image embeddings `[B, num_images, D]` (`image_embeds` of the image encoder):
    /// plain IP-Adapter and FaceID.
    Pooled(Tensor<3>),
    /// Hidden states `[B, num_images, S, D]` (the image encoder's penultimate layer): Plus and
    /// Full adapters.
    Hidden(Tensor<4>),
}

impl ImageEmbeds {
    /// Batch size.
    pub fn batch_size(&self) -> usize {
        match self {
            Self::Pooled(t) => t.dims()[0],
            Self::Hidden(t) => t.dims()[0],
        }
    }

    /// Images per batch entry.
    pub fn num_images(&self) -> usize {
        match self {
            Self::Pooled(t) => t.dims()[1],
            Self::Hidden(t) => t.dims()[1],
        }
    }
}

/// How strongly one adapter acts (diffusers' `set_ip_adapter_scale` entry: a number, a list,
/// or a dict of blocks).
///
/// ```
/// use std::collections::BTreeMap;
/// use diffusion_models::unets::unet_2d_condition::{IPAdapterBlockScales, IPAdapterScale};
///
/// // diffusers: {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}
/// let style_only = IPAdapterScale::Blocks {
///     down: IPAdapterBlockScales::PerBlock(BTreeMap::from([(2, vec![0.0, 1.0])])),
///     mid: None,
///     up: IPAdapterBlockScales::PerBlock(BTreeMap::from([(0, vec![0.0, 1.0, 0.0])])),
/// };
/// # let _ = style_only;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum IPAdapterScale {
    /// The same scale in every layer.
    Uniform(f32),
    /// One scale per image of the adapter; only with masks (`ip_adapter_masks`).
    PerImage(Vec<f32>),
    /// Per transformer of each block, as in `set_ip_adapter_scale({"down": ..., "mid": ...,
    /// "up": ...})`; everything not named gets 0 (diffusers' default for IP-Adapter).
    Blocks {
        /// Down blocks with attention.
        down: IPAdapterBlockScales,
        /// The mid block's transformer (`None`: 0).
        mid: Option<f32>,
        /// Up blocks with attention.
        up: IPAdapterBlockScales,
    },
}

impl From<f32> for IPAdapterScale {
    fn from(scale: f32) -> Self {
        Self::Uniform(scale)
    }
}

/// One side (down or up) of [`IPAdapterScale::Blocks`].
#[derive(Clone, Debug, PartialEq)]
pub enum IPAdapterBlockScales {
    /// The same scale for every transformer of every block with attention.
    Uniform(f32),
    /// By block index (`block_<i>`): one scale for all its transformers, or one per
    /// transformer. Blocks with attention that are not listed get 0.
    PerBlock(BTreeMap<usize, Vec<f32>>),
}

/// `(down | up, block index, transformer index)` of a cross-attention path, or `None` for the
/// mid block.
fn block_of(path: &str) -> Option<(&str, usize, usize)> {
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        [
            side @ ("down_blocks" | "up_blocks"),
            block,
            "attentions",
            j,
            ..,
        ] => Some((side, block.parse().ok()?, j.parse().ok()?)),
        _ => None,
    }
}

impl UNet2DConditionModel {
    /// Every cross-attention (`attn2`) layer in diffusers' attention-processor order (down
    /// blocks, up blocks, mid block).
    fn cross_attentions_mut(&mut self) -> Vec<&mut Attention> {
        let mut groups: Vec<&mut Vec<Transformer2DModel>> = Vec::new();
        for block in &mut self.down_blocks {
            if let DownBlock::CrossAttnDownBlock2D(b) = block {
                groups.push(&mut b.attentions);
            }
        }
        for block in &mut self.up_blocks {
            if let UpBlock::CrossAttnUpBlock2D(b) = block {
                groups.push(&mut b.attentions);
            }
        }
        if let Some(MidBlock::UNetMidBlock2DCrossAttn(b)) = &mut self.mid_block {
            groups.push(&mut b.attentions);
        }
        groups
            .into_iter()
            .flat_map(|ts| ts.iter_mut())
            .flat_map(|t| t.transformer_blocks.iter_mut())
            .filter_map(|block| block.attn2.as_mut())
            .collect()
    }

    fn cross_attentions(&self) -> Vec<&Attention> {
        let mut groups: Vec<&Vec<Transformer2DModel>> = Vec::new();
        for block in &self.down_blocks {
            if let DownBlock::CrossAttnDownBlock2D(b) = block {
                groups.push(&b.attentions);
            }
        }
        for block in &self.up_blocks {
            if let UpBlock::CrossAttnUpBlock2D(b) = block {
                groups.push(&b.attentions);
            }
        }
        if let Some(MidBlock::UNetMidBlock2DCrossAttn(b)) = &self.mid_block {
            groups.push(&b.attentions);
        }
        groups
            .into_iter()
            .flat_map(|ts| ts.iter())
            .flat_map(|t| t.transformer_blocks.iter())
            .filter_map(|block| block.attn2.as_ref())
            .collect()
    }

    /// Load IP-Adapters (diffusers' `_load_ip_adapter_weights`): each source holds one
    /// checkpoint's `image_proj.*` and `ip_adapter.*` tensors. Replaces adapters loaded before;
    /// every adapter starts at scale 1.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`ip_adapter`) for an empty list or a model without
    /// cross-attention; [`Error::Unsupported`] naming the key for FaceID checkpoints with LoRA
    /// layers; [`Error::MissingTensor`] / [`Error::TensorShape`] naming the checkpoint
    /// and key when a layer's projection is missing or its shape does not fit this UNet (an
    /// adapter for another base model); the image projection's errors.
    pub fn load_ip_adapter_weights(&mut self, adapters: &[&WeightSource]) -> Result<()> {
        if adapters.is_empty() {
            return Err(Error::invalid_argument("ip_adapter", "no adapter given"));
        }
        let device = self.conv_in.weight.device();
        let dtype = self.conv_in.weight.val().dtype();
        let n_layers = self.cross_attentions().len();
        if n_layers == 0 {
            return Err(Error::invalid_argument(
                "ip_adapter",
                "this UNet has no cross-attention layers to adapt",
            ));
        }
        // FaceID checkpoints carry LoRA layers (`ip_adapter.<n>.to_k_lora.down.weight`) that
        // diffusers loads as a separate LoRA adapter; silently skipping them would give wrong
        // images.
        for source in adapters {
            if let Some(key) = source
                .keys()
                .find(|k| k.starts_with("ip_adapter.") && k.contains("_lora."))
            {
                return Err(Error::Unsupported {
                    path: source.origin().to_path_buf(),
                    field: key.to_string(),
                    value: "IP-Adapter LoRA layers".into(),
                    reason: "IP-Adapter FaceID checkpoints with built-in LoRA layers are not \
                             supported yet; the image projection and attention layers alone \
                             would not reproduce the adapter"
                        .into(),
                });
            }
        }
        let mut projections = Vec::with_capacity(adapters.len());
        for source in adapters {
            projections.push(IPAdapterImageProjection::from_ip_adapter_weights(
                source,
                "image_proj.",
                &device,
            )?);
        }
        // Read every layer's projections before changing the model, so a bad checkpoint leaves
        // it untouched.
        let mut processors = Vec::with_capacity(n_layers);
        for (j, attn) in self.cross_attentions().into_iter().enumerate() {
            let key_id = 2 * j + 1;
            let inner = attn.heads() * attn.dim_head();
            let kv_dim = attn.to_k.weight.dims()[0];
            let mut to_k_ip = Vec::with_capacity(adapters.len());
            let mut to_v_ip = Vec::with_capacity(adapters.len());
            for source in adapters {
                for (name, out) in [("to_k_ip", &mut to_k_ip), ("to_v_ip", &mut to_v_ip)] {
                    let key = format!("ip_adapter.{key_id}.{name}.weight");
                    out.push(read_linear(source, &key, inner, kv_dim, dtype, &device)?);
                }
            }
            processors.push(IPAdapterAttnProcessor::from_projections(to_k_ip, to_v_ip));
        }
        if let Some(extra) = adapters.iter().find_map(|s| {
            let key = format!("ip_adapter.{}.to_k_ip.weight", 2 * n_layers + 1);
            s.contains(&key).then_some((s.origin().to_path_buf(), key))
        }) {
            return Err(Error::invalid_argument(
                "ip_adapter",
                format!(
                    "{}: `{}` has more cross-attention layers than this UNet ({n_layers}); \
                     the adapter is for another base model",
                    extra.0.display(),
                    extra.1
                ),
            ));
        }
        for (attn, processor) in self.cross_attentions_mut().into_iter().zip(processors) {
            attn.processor = Some(processor);
        }
        let projection = MultiIPAdapterImageProjection::new(projections);
        let projection = if dtype == DType::F32 {
            projection
        } else {
            crate::modeling_utils::to_dtype(projection, FloatDType::from(dtype))?
        };
        self.ip_image_proj = Some(projection);
        Ok(())
    }

    /// Remove every IP-Adapter (diffusers' `unload_ip_adapter` on the UNet): the model computes
    /// exactly what it did before loading.
    pub fn unload_ip_adapter(&mut self) {
        for attn in self.cross_attentions_mut() {
            attn.processor = None;
        }
        self.ip_image_proj = None;
    }

    /// Number of loaded IP-Adapters.
    pub fn num_ip_adapters(&self) -> usize {
        self.ip_image_proj
            .as_ref()
            .map_or(0, MultiIPAdapterImageProjection::num_ip_adapters)
    }

    /// The loaded adapters' image projections (diffusers' `encoder_hid_proj` after
    /// `load_ip_adapter`).
    pub fn ip_image_projection(&self) -> Option<&MultiIPAdapterImageProjection> {
        self.ip_image_proj.as_ref()
    }

    /// Set each adapter's scale (diffusers' `set_ip_adapter_scale`): one entry per adapter, or
    /// one entry for all.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`scale`) when no adapter is loaded, for a count that is
    /// neither 1 nor the number of adapters, a block that does not exist or has no attention,
    /// or a per-block list whose length is not the block's transformer count.
    pub fn set_ip_adapter_scale(&mut self, scales: &[IPAdapterScale]) -> Result<()> {
        let n = self.num_ip_adapters();
        if n == 0 {
            return Err(Error::invalid_argument(
                "scale",
                "no IP-Adapter is loaded (load_ip_adapter first)",
            ));
        }
        if scales.len() != 1 && scales.len() != n {
            return Err(Error::invalid_argument(
                "scale",
                format!("{} scale configs for {n} IP-Adapters", scales.len()),
            ));
        }
        let per_adapter: Vec<&IPAdapterScale> = (0..n)
            .map(|i| &scales[if scales.len() == 1 { 0 } else { i }])
            .collect();
        // Transformers per block with attention (diffusers derives the same counts from
        // `layers_per_block`).
        let down: BTreeMap<usize, usize> = self
            .down_blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                DownBlock::CrossAttnDownBlock2D(b) => Some((i, b.attentions.len())),
                DownBlock::DownBlock2D(_) => None,
            })
            .collect();
        let up: BTreeMap<usize, usize> = self
            .up_blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| match b {
                UpBlock::CrossAttnUpBlock2D(b) => Some((i, b.attentions.len())),
                UpBlock::UpBlock2D(_) => None,
            })
            .collect();
        let resolved: Vec<ResolvedScale> = per_adapter
            .iter()
            .map(|s| resolve_scale(s, &down, &up))
            .collect::<Result<_>>()?;
        for attn in self.cross_attentions_mut() {
            let path = attn.path().to_string();
            if let Some(processor) = attn.processor.as_mut() {
                for (i, r) in resolved.iter().enumerate() {
                    processor.set_scale(i, r.for_layer(&path))?;
                }
            }
        }
        Ok(())
    }

    /// The image tokens of every adapter for one forward pass, `[B, num_images, tokens, D]`,
    /// checked against the loaded adapters and the masks.
    pub(super) fn ip_adapter_states(
        &self,
        image_embeds: Option<Vec<ImageEmbeds>>,
        masks: &[Option<IPAdapterMask>],
        batch: usize,
        dtype: DType,
    ) -> Result<Option<Vec<Tensor<4>>>> {
        let Some(projection) = &self.ip_image_proj else {
            if image_embeds.is_some() {
                return Err(Error::invalid_argument(
                    "image_embeds",
                    "image embeddings given but no IP-Adapter is loaded",
                ));
            }
            if !masks.is_empty() {
                return Err(Error::invalid_argument(
                    "ip_adapter_masks",
                    "masks given but no IP-Adapter is loaded",
                ));
            }
            return Ok(None);
        };
        let image_embeds = image_embeds.ok_or_else(|| {
            Error::invalid_argument(
                "added_cond_kwargs",
                "an IP-Adapter is loaded (encoder_hid_dim_type = \"ip_image_proj\"): \
                 `image_embeds` must be given",
            )
        })?;
        let n = projection.num_ip_adapters();
        if image_embeds.len() != n {
            return Err(Error::invalid_argument(
                "image_embeds",
                format!("{} entries for {n} IP-Adapters", image_embeds.len()),
            ));
        }
        for (i, e) in image_embeds.iter().enumerate() {
            if e.batch_size() != batch {
                return Err(Error::invalid_argument(
                    "image_embeds",
                    format!(
                        "entry {i} has batch size {}, the sample {batch}",
                        e.batch_size()
                    ),
                ));
            }
        }
        let scales = self
            .cross_attentions()
            .into_iter()
            .find_map(|a| a.processor.as_ref().map(|p| p.scale().to_vec()))
            .unwrap_or_default();
        if !masks.is_empty() {
            if masks.len() != n {
                return Err(Error::invalid_argument(
                    "ip_adapter_masks",
                    format!("{} masks for {n} IP-Adapters", masks.len()),
                ));
            }
            for (i, (mask, embeds)) in masks.iter().zip(&image_embeds).enumerate() {
                let Some(mask) = mask else { continue };
                if mask.num_images() != embeds.num_images() {
                    return Err(Error::invalid_argument(
                        "ip_adapter_masks",
                        format!(
                            "adapter {i}: {} masks for {} images",
                            mask.num_images(),
                            embeds.num_images()
                        ),
                    ));
                }
                if let Some(scale) = scales.get(i)
                    && scale.len() != 1
                    && scale.len() != mask.num_images()
                {
                    return Err(Error::invalid_argument(
                        "ip_adapter_masks",
                        format!(
                            "adapter {i}: {} masks for {} scales",
                            mask.num_images(),
                            scale.len()
                        ),
                    ));
                }
            }
        }
        for (i, scale) in scales.iter().enumerate() {
            let masked = masks.get(i).is_some_and(Option::is_some);
            if scale.len() > 1 && !masked {
                return Err(Error::invalid_argument(
                    "scale",
                    format!("adapter {i} has one scale per image, which needs ip_adapter_masks"),
                ));
            }
        }
        let embeds: Vec<Tensor<4>> = image_embeds
            .into_iter()
            .map(|e| match e {
                ImageEmbeds::Pooled(t) => t.unsqueeze_dim(2),
                ImageEmbeds::Hidden(t) => t,
            })
            .map(|t| {
                if t.dtype() == dtype {
                    t
                } else {
                    t.cast(FloatDType::from(dtype))
                }
            })
            .collect();
        let states = projection.forward(&embeds)?;
        Ok(Some(
            states
                .into_iter()
                .map(|t| {
                    if t.dtype() == dtype {
                        t
                    } else {
                        t.cast(FloatDType::from(dtype))
                    }
                })
                .collect(),
        ))
    }
}

/// A `[out, in]` (PyTorch layout) weight as a bias-free [`Linear`].
fn read_linear(
    source: &WeightSource,
    key: &str,
    d_out: usize,
    d_in: usize,
    dtype: DType,
    device: &Device,
) -> Result<Linear> {
    let (values, shape) = source.read_f32(key)?;
    if shape != [d_out, d_in] {
        return Err(Error::TensorShape {
            path: source.file_of(key).unwrap_or(source.origin()).to_path_buf(),
            key: key.to_string(),
            expected: vec![d_out, d_in],
            got: shape,
        });
    }
    let weight: Tensor<2> = Tensor::from_data(TensorData::new(values, [d_out, d_in]), device);
    let weight = weight.transpose();
    let weight = if dtype == DType::F32 {
        weight
    } else {
        weight.cast(FloatDType::from(dtype))
    };
    Ok(Linear {
        weight: Param::from_tensor(weight),
        bias: None,
    })
}

/// An [`IPAdapterScale`] resolved against the model's blocks.
enum ResolvedScale {
    Everywhere(Vec<f32>),
    /// `down_blocks.1.attentions.0` / `mid_block` → scale; others 0.
    Layers(BTreeMap<(String, usize, usize), f32>, f32),
}

impl ResolvedScale {
    fn for_layer(&self, path: &str) -> Vec<f32> {
        match self {
            Self::Everywhere(s) => s.clone(),
            Self::Layers(layers, mid) => match block_of(path) {
                Some((side, block, j)) => {
                    vec![
                        layers
                            .get(&(side.to_string(), block, j))
                            .copied()
                            .unwrap_or(0.0),
                    ]
                }
                None => vec![*mid],
            },
        }
    }
}

fn resolve_scale(
    scale: &IPAdapterScale,
    down: &BTreeMap<usize, usize>,
    up: &BTreeMap<usize, usize>,
) -> Result<ResolvedScale> {
    match scale {
        IPAdapterScale::Uniform(s) => Ok(ResolvedScale::Everywhere(vec![*s])),
        IPAdapterScale::PerImage(s) => {
            if s.is_empty() {
                return Err(Error::invalid_argument("scale", "an empty list of scales"));
            }
            Ok(ResolvedScale::Everywhere(s.clone()))
        }
        IPAdapterScale::Blocks {
            down: d,
            mid,
            up: u,
        } => {
            let mut layers = BTreeMap::new();
            for (side, spec, counts) in [("down_blocks", d, down), ("up_blocks", u, up)] {
                let name = side.trim_end_matches("_blocks");
                match spec {
                    IPAdapterBlockScales::Uniform(s) => {
                        for (&block, &n) in counts {
                            for j in 0..n {
                                layers.insert((side.to_string(), block, j), *s);
                            }
                        }
                    }
                    IPAdapterBlockScales::PerBlock(blocks) => {
                        for (&block, values) in blocks {
                            let Some(&n) = counts.get(&block) else {
                                return Err(Error::invalid_argument(
                                    "scale",
                                    format!(
                                        "{name}.block_{block}: the UNet has no such block with \
                                         attention (blocks with attention: {:?})",
                                        counts.keys().collect::<Vec<_>>()
                                    ),
                                ));
                            };
                            let values = match values.len() {
                                1 => vec![values[0]; n],
                                k if k == n => values.clone(),
                                k => {
                                    return Err(Error::invalid_argument(
                                        "scale",
                                        format!(
                                            "{name}.block_{block}: expected {n} scales \
                                             (one per transformer), got {k}"
                                        ),
                                    ));
                                }
                            };
                            for (j, v) in values.into_iter().enumerate() {
                                layers.insert((side.to_string(), block, j), v);
                            }
                        }
                    }
                }
            }
            Ok(ResolvedScale::Layers(layers, mid.unwrap_or(0.0)))
        }
    }
}
