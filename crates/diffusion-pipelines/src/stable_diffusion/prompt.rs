//! Prompts to CLIP embeddings, as diffusers' `StableDiffusionPipeline.encode_prompt`.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::textual_inversion::maybe_convert_prompts;
use diffusion_models::{CLIPTextModel, CLIPTokenizer, ModelMixin, Padding, UNet2DConditionModel};

/// The text inputs of a call, as the pipelines' `prompt`, `negative_prompt`, `prompt_embeds`,
/// `negative_prompt_embeds` and `clip_skip` arguments.
pub(crate) struct PromptInputs<'a> {
    pub prompt: &'a [String],
    pub negative_prompt: Option<&'a [String]>,
    pub prompt_embeds: Option<Tensor<3>>,
    pub negative_prompt_embeds: Option<Tensor<3>>,
    pub clip_skip: Option<usize>,
}

impl PromptInputs<'_> {
    /// The prompt batch size (`len(prompt)`, else `prompt_embeds.shape[0]`), after diffusers'
    /// `check_inputs` on the text arguments.
    pub fn batch_size(&self) -> Result<usize> {
        let batch = match (&self.prompt_embeds, self.prompt.is_empty()) {
            (Some(_), false) => {
                return Err(Error::invalid_argument(
                    "prompt_embeds",
                    "give either prompt or prompt_embeds, not both",
                ));
            }
            (Some(e), true) => e.dims()[0],
            (None, false) => self.prompt.len(),
            (None, true) => {
                return Err(Error::invalid_argument(
                    "prompt",
                    "give a prompt (or prompt_embeds)",
                ));
            }
        };
        if self.negative_prompt.is_some() && self.negative_prompt_embeds.is_some() {
            return Err(Error::invalid_argument(
                "negative_prompt_embeds",
                "give either negative_prompt or negative_prompt_embeds, not both",
            ));
        }
        if let (Some(p), Some(n)) = (&self.prompt_embeds, &self.negative_prompt_embeds)
            && p.dims() != n.dims()
        {
            return Err(Error::invalid_argument(
                "negative_prompt_embeds",
                format!(
                    "shape {:?} differs from prompt_embeds {:?}",
                    n.dims(),
                    p.dims()
                ),
            ));
        }
        if let Some(neg) = self.negative_prompt
            && neg.len() != batch
        {
            return Err(Error::invalid_argument(
                "negative_prompt",
                format!(
                    "{} negative prompts for a batch of {batch} prompts",
                    neg.len()
                ),
            ));
        }
        Ok(batch)
    }
}

/// Run the tokenizer (padded and truncated to `max_length`) and the text encoder; with
/// `clip_skip`, take the hidden state `clip_skip` layers before the last through the final
/// layer norm, as diffusers does.
fn embed(
    tokenizer: &CLIPTokenizer,
    text_encoder: &CLIPTextModel,
    prompts: &[String],
    max_length: usize,
    clip_skip: Option<usize>,
    device: &Device,
) -> Result<Tensor<3>> {
    // Multi-vector textual-inversion tokens expand to `<tok> <tok>_1 ...` (diffusers'
    // `maybe_convert_prompt`); a prompt without them is unchanged.
    let prompts = &maybe_convert_prompts(prompts, tokenizer)?;
    for prompt in prompts {
        let len = tokenizer.encode(prompt, false)?.len() + 2;
        if len > max_length {
            log::warn!(
                "prompt of {len} tokens truncated to CLIP's {max_length}: {:?}",
                prompt
            );
        }
    }
    let tokens = tokenizer.tokenize(prompts, Padding::MaxLength, Some(max_length), true)?;
    let ids = tokens.input_ids_tensor(device)?;
    let out = text_encoder.forward(ids)?;
    match clip_skip {
        None => Ok(out.last_hidden_state),
        Some(skip) => {
            let hidden = out.hidden_state_for_clip_skip(skip)?;
            Ok(text_encoder.text_model.final_layer_norm.forward(hidden))
        }
    }
}

/// A tokenizer + text encoder pair that turns prompts into the UNet's text conditioning, so the
/// Stable Diffusion machinery runs on other encoders (AltDiffusion's XLM-R) unchanged.
pub(crate) trait PromptEncoder {
    /// The tokenizer's `model_max_length`: the positive prompts' padded length.
    fn model_max_length(&self) -> usize;

    /// Embed `prompts` padded and truncated to `max_length`, taking the hidden state
    /// `clip_skip` layers before the last where the encoder supports it.
    ///
    /// # Shapes
    /// - output: `[prompts, max_length, cross_attention_dim]`
    fn embed(
        &self,
        prompts: &[String],
        max_length: usize,
        clip_skip: Option<usize>,
        device: &Device,
    ) -> Result<Tensor<3>>;
}

/// Stable Diffusion's CLIP tokenizer and text encoder as a [`PromptEncoder`].
pub(crate) struct ClipPromptEncoder<'a> {
    pub tokenizer: &'a CLIPTokenizer,
    pub text_encoder: &'a CLIPTextModel,
}

impl PromptEncoder for ClipPromptEncoder<'_> {
    fn model_max_length(&self) -> usize {
        self.tokenizer.model_max_length()
    }

    fn embed(
        &self,
        prompts: &[String],
        max_length: usize,
        clip_skip: Option<usize>,
        device: &Device,
    ) -> Result<Tensor<3>> {
        embed(
            self.tokenizer,
            self.text_encoder,
            prompts,
            max_length,
            clip_skip,
            device,
        )
    }
}

/// `[B, ...]` to `[B * n, ...]`, each row repeated `n` times in place (`repeat(1, n, 1).view`).
pub(crate) fn repeat_rows<const D: usize>(x: Tensor<D>, n: usize) -> Tensor<D> {
    if n == 1 {
        return x;
    }
    let b = x.dims()[0];
    let rows: Vec<Tensor<D>> = (0..b)
        .flat_map(|i| std::iter::repeat_n(x.clone().narrow(0, i, 1), n))
        .collect();
    Tensor::cat(rows, 0)
}

/// `encode_prompt`: the prompt embeddings and, with classifier-free guidance, the negative ones,
/// each repeated for `num_images_per_prompt`.
///
/// # Errors
/// As [`PromptInputs::batch_size`], the tokenizer and the text encoder.
pub(crate) fn encode_prompt(
    tokenizer: &CLIPTokenizer,
    text_encoder: &CLIPTextModel,
    inputs: PromptInputs<'_>,
    num_images_per_prompt: usize,
    do_classifier_free_guidance: bool,
    device: &Device,
) -> Result<(Tensor<3>, Option<Tensor<3>>)> {
    let encoder = ClipPromptEncoder {
        tokenizer,
        text_encoder,
    };
    encode_prompt_with(
        &encoder,
        inputs,
        num_images_per_prompt,
        do_classifier_free_guidance,
        device,
    )
}

/// [`encode_prompt`] with any [`PromptEncoder`].
///
/// # Errors
/// As [`PromptInputs::batch_size`] and the encoder.
pub(crate) fn encode_prompt_with(
    encoder: &impl PromptEncoder,
    inputs: PromptInputs<'_>,
    num_images_per_prompt: usize,
    do_classifier_free_guidance: bool,
    device: &Device,
) -> Result<(Tensor<3>, Option<Tensor<3>>)> {
    let batch = inputs.batch_size()?;
    let max_length = encoder.model_max_length();
    let prompt_embeds = match inputs.prompt_embeds {
        Some(e) => e,
        None => encoder.embed(inputs.prompt, max_length, inputs.clip_skip, device)?,
    };
    let seq = prompt_embeds.dims()[1];
    let negative = if do_classifier_free_guidance {
        let negative = match inputs.negative_prompt_embeds {
            Some(e) => e,
            None => {
                let uncond: Vec<String> = match inputs.negative_prompt {
                    Some(n) => n.to_vec(),
                    None => vec![String::new(); batch],
                };
                // The negative prompt is padded to the prompt embeddings' length and never
                // clip-skipped (diffusers' behaviour).
                encoder.embed(&uncond, seq, None, device)?
            }
        };
        Some(repeat_rows(negative, num_images_per_prompt))
    } else {
        None
    };
    Ok((repeat_rows(prompt_embeds, num_images_per_prompt), negative))
}

/// The UNet's text conditioning of a call, shared by the Stable Diffusion pipelines.
pub(crate) struct GuidedPrompt {
    /// `[negative; positive]` under classifier-free guidance, else the positive embeddings,
    /// in the UNet's dtype.
    pub embeds: Tensor<3>,
    /// Whether classifier-free guidance runs (`guidance_scale > 1` and no LCM guidance
    /// embedding, as diffusers' `do_classifier_free_guidance`).
    pub do_cfg: bool,
    /// Images generated: prompts × `num_images_per_prompt`.
    pub batch: usize,
}

/// Encode the prompts as every Stable Diffusion pipeline does before denoising.
///
/// # Errors
/// As [`encode_prompt`].
pub(crate) fn encode_for_unet(
    c: &super::StableDiffusionComponents,
    inputs: PromptInputs<'_>,
    num_images_per_prompt: usize,
    guidance_scale: f64,
    device: &Device,
) -> Result<GuidedPrompt> {
    let encoder = ClipPromptEncoder {
        tokenizer: &c.tokenizer,
        text_encoder: &c.text_encoder,
    };
    encode_for_unet_with(
        &encoder,
        &c.unet,
        inputs,
        num_images_per_prompt,
        guidance_scale,
        device,
    )
}

/// [`encode_for_unet`] with any [`PromptEncoder`] and the UNet it conditions.
///
/// # Errors
/// As [`encode_prompt_with`].
pub(crate) fn encode_for_unet_with(
    encoder: &impl PromptEncoder,
    unet: &UNet2DConditionModel,
    inputs: PromptInputs<'_>,
    num_images_per_prompt: usize,
    guidance_scale: f64,
    device: &Device,
) -> Result<GuidedPrompt> {
    let batch = inputs.batch_size()? * num_images_per_prompt;
    let do_cfg = guidance_scale > 1.0 && unet.config().time_cond_proj_dim.is_none();
    let (positive, negative) =
        encode_prompt_with(encoder, inputs, num_images_per_prompt, do_cfg, device)?;
    let embeds = match negative {
        Some(negative) => Tensor::cat(vec![negative, positive], 0),
        None => positive,
    };
    Ok(GuidedPrompt {
        embeds: super::denoise::cast_like_model(embeds, super::denoise::unet_dtype(unet)),
        do_cfg,
        batch,
    })
}
