//! IP-Adapter on the Stable Diffusion and SDXL pipelines (diffusers' `IPAdapterMixin`):
//! `load_ip_adapter`, `set_ip_adapter_scale`, `unload_ip_adapter` on the components, and the
//! call argument [`IPAdapterArgs`] (diffusers' `ip_adapter_image`, `ip_adapter_image_embeds`
//! and `cross_attention_kwargs["ip_adapter_masks"]`).
//!
//! An adapter conditions generation on images: the image encoder (`CLIPVisionModelWithProjection`,
//! loaded from the adapter repository's `image_encoder` folder) embeds them, the adapter's image
//! projection turns the embeddings into tokens, and every cross-attention layer attends to
//! those tokens beside the prompt's (see
//! [`diffusion_models::UNet2DConditionModel::load_ip_adapter_weights`]).
//!
//! ```no_run
//! use diffusion_core::Device;
//! use diffusion_core::image::load_image;
//! use diffusion_pipelines::{Generators, IPAdapterArgs, StableDiffusionArgs, StableDiffusionPipeline};
//!
//! # fn main() -> diffusion_core::Result<()> {
//! let mut pipe = StableDiffusionPipeline::from_pretrained(
//!     "stable-diffusion-v1-5/stable-diffusion-v1-5",
//!     &Device::default(),
//! )?;
//! pipe.components
//!     .load_ip_adapter("h94/IP-Adapter", Some("models"), &["ip-adapter_sd15.safetensors"])?;
//! pipe.components.set_ip_adapter_scale(&[0.6.into()])?;
//! let style = load_image("style.png")?;
//! let out = pipe.call(StableDiffusionArgs {
//!     prompt: vec!["a cat, masterpiece".into()],
//!     ip_adapter: IPAdapterArgs {
//!         image: Some(vec![vec![style]]),
//!         ..Default::default()
//!     },
//!     generator: Generators::Seed(0),
//!     ..Default::default()
//! })?;
//! # let _ = out;
//! pipe.components.unload_ip_adapter();
//! # Ok(())
//! # }
//! ```

use diffusion_core::burn::tensor::{FloatDType, Tensor};
use diffusion_core::image::{RgbImage, VaeImageProcessor};
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::ip_adapter::{IPAdapterLoadOptions, resolve_ip_adapters};
use diffusion_models::attention_processor::IPAdapterMask;
use diffusion_models::image_encoders::image_processing_clip::ImageSize;
use diffusion_models::modeling_utils::to_dtype;
use diffusion_models::unets::unet_2d_condition::{IPAdapterScale, ImageEmbeds};
use diffusion_models::{CLIPImageProcessor, CLIPVisionModelWithProjection, UNet2DConditionModel};

use crate::{StableDiffusionComponents, StableDiffusionXLComponents};

/// The IP-Adapter inputs of a pipeline call; `Default` gives none.
#[derive(Clone, Debug, Default)]
pub struct IPAdapterArgs {
    /// `ip_adapter_image`: for each loaded adapter, its images (several images of one adapter
    /// are attended to together, or each in its own region with masks).
    pub image: Option<Vec<Vec<RgbImage>>>,
    /// `ip_adapter_image_embeds`: precomputed image embeddings per adapter, `[B, n, D]` pooled
    /// ([`ImageEmbeds::Pooled`]) or `[B, n, S, D]` hidden states ([`ImageEmbeds::Hidden`]);
    /// with classifier-free guidance the negative half comes first (`B = 2`). Used instead of
    /// `image`.
    pub image_embeds: Option<Vec<ImageEmbeds>>,
    /// `cross_attention_kwargs["ip_adapter_masks"]`: per adapter, where on the image each of its
    /// images acts (see [`ip_adapter_masks`]); empty for no masks.
    pub masks: Vec<Option<IPAdapterMask>>,
}

impl IPAdapterArgs {
    /// Whether anything is given.
    pub fn is_empty(&self) -> bool {
        self.image.is_none() && self.image_embeds.is_none() && self.masks.is_empty()
    }
}

/// diffusers' `IPAdapterMaskProcessor().preprocess(masks, height, width)` for one adapter:
/// grayscale, binarised at 0.5, resized to the output size (Lanczos when the size differs; give
/// masks of the output size for bit parity with diffusers).
///
/// # Errors
/// As [`VaeImageProcessor::preprocess`].
pub fn ip_adapter_masks(
    masks: &[RgbImage],
    height: usize,
    width: usize,
    device: &Device,
) -> Result<IPAdapterMask> {
    let processor = VaeImageProcessor {
        do_resize: true,
        vae_scale_factor: 8,
        do_normalize: false,
        do_binarize: true,
        do_convert_grayscale: true,
    };
    let t = processor.preprocess(masks, Some(height), Some(width), device)?;
    let [n, _, h, w] = t.dims();
    IPAdapterMask::from_tensor(t.reshape([1, n, h, w]))
}

/// diffusers' `prepare_ip_adapter_image_embeds` (with `encode_image`): one [`ImageEmbeds`] per
/// adapter, batched like the UNet input (negative half first with guidance); `None` without
/// adapters.
pub(crate) fn prepare_ip_adapter_image_embeds(
    unet: &UNet2DConditionModel,
    image_encoder: Option<&CLIPVisionModelWithProjection>,
    feature_extractor: Option<&CLIPImageProcessor>,
    args: &IPAdapterArgs,
    batch: usize,
    do_cfg: bool,
    device: &Device,
) -> Result<Option<Vec<ImageEmbeds>>> {
    let Some(projection) = unet.ip_image_projection() else {
        if !args.is_empty() {
            return Err(Error::invalid_argument(
                "ip_adapter_image",
                "IP-Adapter inputs given but no IP-Adapter is loaded (load_ip_adapter)",
            ));
        }
        return Ok(None);
    };
    let layers = &projection.image_projection_layers;
    // (negative, positive) per adapter, batch 1.
    let pairs: Vec<(ImageEmbeds, ImageEmbeds)> = match (&args.image_embeds, &args.image) {
        (Some(embeds), _) => {
            if embeds.len() != layers.len() {
                return Err(Error::invalid_argument(
                    "ip_adapter_image_embeds",
                    format!("{} entries for {} IP-Adapters", embeds.len(), layers.len()),
                ));
            }
            embeds
                .iter()
                .map(|e| split_guidance(e, do_cfg))
                .collect::<Result<_>>()?
        }
        (None, Some(images)) => {
            let encoder = image_encoder.ok_or_else(|| {
                Error::invalid_argument(
                    "ip_adapter_image",
                    "the pipeline has no image encoder (it was loaded with \
                     image_encoder_folder: None): give ip_adapter_image_embeds instead",
                )
            })?;
            if images.len() != layers.len() {
                return Err(Error::invalid_argument(
                    "ip_adapter_image",
                    format!(
                        "images for {} adapters, but {} IP-Adapters are loaded",
                        images.len(),
                        layers.len()
                    ),
                ));
            }
            let default_extractor;
            let extractor = match feature_extractor {
                Some(e) => e,
                None => {
                    default_extractor = default_feature_extractor(encoder);
                    &default_extractor
                }
            };
            images
                .iter()
                .zip(layers)
                .map(|(images, layer)| {
                    encode_image(
                        encoder,
                        extractor,
                        images,
                        layer.uses_hidden_states(),
                        device,
                    )
                })
                .collect::<Result<_>>()?
        }
        (None, None) => {
            return Err(Error::invalid_argument(
                "ip_adapter_image",
                "an IP-Adapter is loaded: give ip_adapter_image or ip_adapter_image_embeds \
                 (or unload_ip_adapter)",
            ));
        }
    };
    let unet_dtype = unet.conv_in.weight.val().dtype();
    pairs
        .into_iter()
        .map(|(negative, positive)| {
            // diffusers repeats the embeddings `num_images_per_prompt` times (one prompt); every
            // image of the batch gets the same image conditioning here.
            let repeat = |e: ImageEmbeds| -> Result<ImageEmbeds> {
                Ok(match e {
                    ImageEmbeds::Pooled(t) => ImageEmbeds::Pooled(repeat_to(t, batch)?),
                    ImageEmbeds::Hidden(t) => ImageEmbeds::Hidden(repeat_to(t, batch)?),
                })
            };
            let positive = repeat(positive)?;
            let out = if do_cfg {
                let negative = repeat(negative)?;
                match (negative, positive) {
                    (ImageEmbeds::Pooled(n), ImageEmbeds::Pooled(p)) => {
                        ImageEmbeds::Pooled(Tensor::cat(vec![n, p], 0))
                    }
                    (ImageEmbeds::Hidden(n), ImageEmbeds::Hidden(p)) => {
                        ImageEmbeds::Hidden(Tensor::cat(vec![n, p], 0))
                    }
                    _ => unreachable!("both halves come from one tensor"),
                }
            } else {
                positive
            };
            Ok(match out {
                ImageEmbeds::Pooled(t) => ImageEmbeds::Pooled(cast(t, unet_dtype)),
                ImageEmbeds::Hidden(t) => ImageEmbeds::Hidden(cast(t, unet_dtype)),
            })
        })
        .collect::<Result<_>>()
        .map(Some)
}

fn cast<const D: usize>(t: Tensor<D>, dtype: diffusion_core::burn::tensor::DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// `batch` copies along dimension 0 of a batch-1 tensor, or the tensor itself when it already
/// has `batch` rows.
fn repeat_to<const D: usize>(t: Tensor<D>, batch: usize) -> Result<Tensor<D>> {
    let rows = t.dims()[0];
    if rows == batch {
        Ok(t)
    } else if rows == 1 {
        Ok(Tensor::cat(vec![t; batch], 0))
    } else {
        Err(Error::invalid_argument(
            "ip_adapter_image_embeds",
            format!("{rows} embeddings per guidance half for a batch of {batch}"),
        ))
    }
}

/// Precomputed embeddings to `(negative, positive)`: diffusers' `chunk(2)` with guidance, zeros
/// are not invented.
fn split_guidance(e: &ImageEmbeds, do_cfg: bool) -> Result<(ImageEmbeds, ImageEmbeds)> {
    let rows = e.batch_size();
    if !do_cfg {
        return Ok((e.clone(), e.clone()));
    }
    if !rows.is_multiple_of(2) {
        return Err(Error::invalid_argument(
            "ip_adapter_image_embeds",
            format!(
                "{rows} rows: with classifier-free guidance the negative and positive halves are \
                 stacked, so the batch must be even"
            ),
        ));
    }
    let half = rows / 2;
    Ok(match e {
        ImageEmbeds::Pooled(t) => (
            ImageEmbeds::Pooled(t.clone().narrow(0, 0, half)),
            ImageEmbeds::Pooled(t.clone().narrow(0, half, half)),
        ),
        ImageEmbeds::Hidden(t) => (
            ImageEmbeds::Hidden(t.clone().narrow(0, 0, half)),
            ImageEmbeds::Hidden(t.clone().narrow(0, half, half)),
        ),
    })
}

/// diffusers' `encode_image(images, num_images_per_prompt=1, output_hidden_states)`: pooled
/// embeddings with zeros as the negative, or the penultimate hidden states with those of a
/// black (all-zero pixel values) image as the negative; shaped `[1, n_images, ...]`.
fn encode_image(
    encoder: &CLIPVisionModelWithProjection,
    extractor: &CLIPImageProcessor,
    images: &[RgbImage],
    hidden_states: bool,
    device: &Device,
) -> Result<(ImageEmbeds, ImageEmbeds)> {
    if images.is_empty() {
        return Err(Error::invalid_argument(
            "ip_adapter_image",
            "an adapter was given no image",
        ));
    }
    let dtype = encoder.visual_projection.weight.val().dtype();
    let pixels = cast(extractor.preprocess(images, device)?, dtype);
    if hidden_states {
        let positive = encoder
            .forward(pixels.clone())?
            .penultimate_hidden_state()?;
        let negative = encoder
            .forward(pixels.zeros_like())?
            .penultimate_hidden_state()?;
        Ok((
            ImageEmbeds::Hidden(negative.unsqueeze_dim(0)),
            ImageEmbeds::Hidden(positive.unsqueeze_dim(0)),
        ))
    } else {
        let positive = encoder.forward(pixels)?.image_embeds;
        let negative = positive.zeros_like();
        Ok((
            ImageEmbeds::Pooled(negative.unsqueeze_dim(0)),
            ImageEmbeds::Pooled(positive.unsqueeze_dim(0)),
        ))
    }
}

/// The processor diffusers makes when a pipeline has none:
/// `CLIPImageProcessor(size=image_size, crop_size=image_size)`.
fn default_feature_extractor(encoder: &CLIPVisionModelWithProjection) -> CLIPImageProcessor {
    let size = encoder.config().image_size;
    CLIPImageProcessor {
        size: ImageSize::ShortestEdge(size),
        crop_size: (size, size),
        ..CLIPImageProcessor::default()
    }
}

/// The IP-Adapter operations of a set of components.
macro_rules! ip_adapter_methods {
    ($components:ty) => {
        impl $components {
            /// Load IP-Adapters (diffusers' `load_ip_adapter`): `name` is a folder or Hub
            /// repository id holding `weight_names` in `subfolder` (or one checkpoint file), in
            /// the original layout (`.safetensors` or `.bin`). The image encoder is loaded from
            /// `<subfolder>/image_encoder` when the pipeline has none. Replaces adapters loaded
            /// before; every adapter starts at scale 1.
            ///
            /// # Errors
            /// As [`Self::load_ip_adapter_with`].
            pub fn load_ip_adapter(
                &mut self,
                name: &str,
                subfolder: Option<&str>,
                weight_names: &[&str],
            ) -> Result<()> {
                let options = IPAdapterLoadOptions {
                    subfolder: subfolder.map(str::to_string),
                    ..IPAdapterLoadOptions::default()
                };
                self.load_ip_adapter_with(name, weight_names, &options)
            }

            /// [`Self::load_ip_adapter`] with every option (`image_encoder_folder`, Hub access).
            ///
            /// # Errors
            /// As [`resolve_ip_adapters`] (missing files, not an IP-Adapter), the image encoder's
            /// loading errors, and as
            /// [`diffusion_models::UNet2DConditionModel::load_ip_adapter_weights`] (an adapter
            /// for another base model names the tensor that does not fit); nothing changes then.
            pub fn load_ip_adapter_with(
                &mut self,
                name: &str,
                weight_names: &[&str],
                options: &IPAdapterLoadOptions,
            ) -> Result<()> {
                let resolved = resolve_ip_adapters(name, weight_names, options)?;
                let dtype = self.unet.conv_in.weight.val().dtype();
                let device = self.unet.conv_in.weight.device();
                let encoder = match (&self.image_encoder, &resolved.image_encoder_dir) {
                    (None, Some(dir)) => {
                        let encoder = CLIPVisionModelWithProjection::from_pretrained(dir, &device)?;
                        Some(if dtype == diffusion_core::burn::tensor::DType::F32 {
                            encoder
                        } else {
                            to_dtype(encoder, FloatDType::from(dtype))?
                        })
                    }
                    _ => None,
                };
                let sources: Vec<_> = resolved.weights.iter().collect();
                let mut unet = self.unet.clone();
                unet.load_ip_adapter_weights(&sources)?;
                self.unet = unet;
                if let Some(encoder) = encoder {
                    self.image_encoder = Some(encoder);
                }
                if self.feature_extractor.is_none()
                    && let Some(encoder) = &self.image_encoder
                {
                    self.feature_extractor = Some(default_feature_extractor(encoder));
                }
                Ok(())
            }

            /// Set each adapter's scale (diffusers' `set_ip_adapter_scale`): one entry for all
            /// adapters or one per adapter; a number, per-image values (with masks), or per
            /// block ([`IPAdapterScale::Blocks`]: e.g. style only).
            ///
            /// # Errors
            /// As [`diffusion_models::UNet2DConditionModel::set_ip_adapter_scale`].
            pub fn set_ip_adapter_scale(&mut self, scales: &[IPAdapterScale]) -> Result<()> {
                self.unet.set_ip_adapter_scale(scales)
            }

            /// Remove the IP-Adapters and the image encoder (diffusers' `unload_ip_adapter`);
            /// the UNet computes exactly what it did before.
            pub fn unload_ip_adapter(&mut self) {
                self.unet.unload_ip_adapter();
                self.image_encoder = None;
            }
        }
    };
}

ip_adapter_methods!(StableDiffusionComponents);
ip_adapter_methods!(StableDiffusionXLComponents);
