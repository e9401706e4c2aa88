//! Prompts to SDXL embeddings, as diffusers' `StableDiffusionXLPipeline.encode_prompt`: the
//! penultimate hidden states of both encoders side by side, and the second encoder's pooled
//! projection.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Error, Result};
use diffusion_loaders::textual_inversion::maybe_convert_prompts;
use diffusion_models::{CLIPTokenizer, Padding};

use super::StableDiffusionXLComponents;
use crate::stable_diffusion::prompt::repeat_rows;

/// The text inputs of an SDXL call.
pub(crate) struct XLPromptInputs<'a> {
    pub prompt: &'a [String],
    pub prompt_2: Option<&'a [String]>,
    pub negative_prompt: Option<&'a [String]>,
    pub negative_prompt_2: Option<&'a [String]>,
    pub prompt_embeds: Option<Tensor<3>>,
    pub negative_prompt_embeds: Option<Tensor<3>>,
    pub pooled_prompt_embeds: Option<Tensor<2>>,
    pub negative_pooled_prompt_embeds: Option<Tensor<2>>,
    pub clip_skip: Option<usize>,
}

/// Prompt embeddings `[B * n, S, D1 + D2]`, pooled `[B * n, P]`, and their negatives with
/// guidance.
pub(crate) struct XLEmbeddings {
    pub prompt_embeds: Tensor<3>,
    pub pooled: Tensor<2>,
    pub negative: Option<(Tensor<3>, Tensor<2>)>,
}

impl XLPromptInputs<'_> {
    /// The prompt batch, after diffusers' `check_inputs` on the text arguments.
    pub fn batch_size(&self) -> Result<usize> {
        let batch = match (&self.prompt_embeds, self.prompt.is_empty()) {
            (Some(_), false) => {
                return Err(Error::invalid_argument(
                    "prompt_embeds",
                    "give either prompt or prompt_embeds, not both",
                ));
            }
            (Some(e), true) => {
                if self.pooled_prompt_embeds.is_none() {
                    return Err(Error::invalid_argument(
                        "pooled_prompt_embeds",
                        "prompt_embeds need pooled_prompt_embeds too",
                    ));
                }
                e.dims()[0]
            }
            (None, false) => self.prompt.len(),
            (None, true) => {
                return Err(Error::invalid_argument(
                    "prompt",
                    "give a prompt (or prompt_embeds)",
                ));
            }
        };
        if self.negative_prompt_embeds.is_some() && self.negative_pooled_prompt_embeds.is_none() {
            return Err(Error::invalid_argument(
                "negative_pooled_prompt_embeds",
                "negative_prompt_embeds need negative_pooled_prompt_embeds too",
            ));
        }
        if self.negative_prompt.is_some() && self.negative_prompt_embeds.is_some() {
            return Err(Error::invalid_argument(
                "negative_prompt_embeds",
                "give either negative_prompt or negative_prompt_embeds, not both",
            ));
        }
        for (name, list) in [
            ("prompt_2", self.prompt_2),
            ("negative_prompt", self.negative_prompt),
            ("negative_prompt_2", self.negative_prompt_2),
        ] {
            if let Some(list) = list
                && list.len() != batch
            {
                return Err(Error::invalid_argument(
                    name,
                    format!("{} prompts for a batch of {batch}", list.len()),
                ));
            }
        }
        Ok(batch)
    }
}

/// Tokenize (padded and truncated to `max_length`) and return the ids tensor.
fn ids(
    tokenizer: &CLIPTokenizer,
    prompts: &[String],
    max_length: usize,
    device: &Device,
) -> Result<diffusion_core::burn::tensor::Tensor<2, diffusion_core::burn::tensor::Int>> {
    // Multi-vector textual-inversion tokens expand per tokenizer, as in diffusers.
    let prompts = maybe_convert_prompts(prompts, tokenizer)?;
    tokenizer
        .tokenize(&prompts, Padding::MaxLength, Some(max_length), true)?
        .input_ids_tensor(device)
}

/// Both encoders on one pair of prompt lists: `hidden_states[-(skip + 1)]` of each, joined
/// along features, and the second encoder's `text_embeds`. Without a first encoder (refiners),
/// the second one reads the first list, as diffusers pairs prompts with the encoders there are.
fn embed_pair(
    c: &StableDiffusionXLComponents,
    prompts: &[String],
    prompts_2: &[String],
    max_length: Option<usize>,
    skip: usize,
    device: &Device,
) -> Result<(Tensor<3>, Tensor<2>)> {
    let pick = |hidden: &[Tensor<3>]| -> Result<Tensor<3>> {
        let n = hidden.len();
        if skip + 1 > n {
            return Err(Error::invalid_argument(
                "clip_skip",
                format!("skips more than the {} layers", n - 1),
            ));
        }
        Ok(hidden[n - 1 - skip].clone())
    };
    let mut parts = Vec::with_capacity(2);
    let prompts_for_2 = match (&c.text_encoder, &c.tokenizer) {
        (Some(encoder), Some(tokenizer)) => {
            let len = max_length.unwrap_or(tokenizer.model_max_length());
            let out = encoder.forward(ids(tokenizer, prompts, len, device)?)?;
            parts.push(pick(&out.hidden_states)?);
            prompts_2
        }
        _ => prompts,
    };
    let len_2 = max_length.unwrap_or(c.tokenizer_2.model_max_length());
    let out_2 = c
        .text_encoder_2
        .forward(ids(&c.tokenizer_2, prompts_for_2, len_2, device)?)?;
    parts.push(pick(&out_2.hidden_states)?);
    Ok((Tensor::cat(parts, 2), out_2.text_embeds))
}

/// `encode_prompt` for SDXL.
///
/// # Errors
/// As [`XLPromptInputs::batch_size`], the tokenizers and the text encoders.
pub(crate) fn encode_prompt(
    c: &StableDiffusionXLComponents,
    inputs: XLPromptInputs<'_>,
    num_images_per_prompt: usize,
    do_classifier_free_guidance: bool,
    device: &Device,
) -> Result<XLEmbeddings> {
    let batch = inputs.batch_size()?;
    // diffusers takes hidden_states[-2] by default and hidden_states[-(clip_skip + 2)] with it.
    let skip = inputs.clip_skip.map_or(1, |s| s + 1);
    let (prompt_embeds, pooled) = match (inputs.prompt_embeds, inputs.pooled_prompt_embeds) {
        (Some(e), Some(p)) => (e, p),
        (Some(_), None) => {
            return Err(Error::invalid_argument(
                "pooled_prompt_embeds",
                "prompt_embeds need pooled_prompt_embeds too",
            ));
        }
        (None, pooled) => {
            let prompts_2 = inputs.prompt_2.unwrap_or(inputs.prompt);
            let (e, p) = embed_pair(c, inputs.prompt, prompts_2, None, skip, device)?;
            (e, pooled.unwrap_or(p))
        }
    };
    let negative = if do_classifier_free_guidance {
        let zero_out = inputs.negative_prompt.is_none() && c.force_zeros_for_empty_prompt;
        let (neg, neg_pooled) = match (inputs.negative_prompt_embeds, zero_out) {
            (Some(e), _) => (
                e,
                inputs
                    .negative_pooled_prompt_embeds
                    .unwrap_or_else(|| pooled.clone().zeros_like()),
            ),
            (None, true) => (
                prompt_embeds.clone().zeros_like(),
                pooled.clone().zeros_like(),
            ),
            (None, false) => {
                let neg: Vec<String> = match inputs.negative_prompt {
                    Some(n) => n.to_vec(),
                    None => vec![String::new(); batch],
                };
                let neg_2: Vec<String> = inputs
                    .negative_prompt_2
                    .map_or_else(|| neg.clone(), <[String]>::to_vec);
                let seq = prompt_embeds.dims()[1];
                // The negatives always take hidden_states[-2], whatever clip_skip.
                let (e, p) = embed_pair(c, &neg, &neg_2, Some(seq), 1, device)?;
                (e, inputs.negative_pooled_prompt_embeds.unwrap_or(p))
            }
        };
        Some((
            repeat_rows(neg, num_images_per_prompt),
            repeat_rows(neg_pooled, num_images_per_prompt),
        ))
    } else {
        None
    };
    Ok(XLEmbeddings {
        prompt_embeds: repeat_rows(prompt_embeds, num_images_per_prompt),
        pooled: repeat_rows(pooled, num_images_per_prompt),
        negative,
    })
}
