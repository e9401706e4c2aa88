//! Text-to-image training of a Stable Diffusion XL UNet, whole or through a LoRA: diffusers'
//! examples/text_to_image/train_text_to_image_sdxl.py and train_text_to_image_lora_sdxl.py.
//!
//! What differs from SD1 ([`crate::text_to_image`], whose trainer does the optimisation here):
//! captions go through both frozen text encoders ([`SdxlTextEncoders::encode_prompt`]: the
//! penultimate hidden states of each, joined along features, and `text_encoder_2`'s projected
//! pooled output), and the UNet is also conditioned on `add_time_ids` ([`compute_time_ids`]:
//! the image's original `(height, width)`, the crop's top-left `(y1, x1)`, the target size).
//! The full fine-tuning script can also empty captions at random (`--proportion_empty_prompts`),
//! bias the timestep draw ([`TimestepBias`]) and train the `sample` objective (it subtracts the
//! noise from the model output and targets the latents); the LoRA script has none of these.
//! Neither script has `--input_perturbation`. The LoRA script's `--train_text_encoder` (LoRAs of
//! both text encoders, trained with the UNet's) is [`crate::sdxl_text_lora`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use diffusion_core::burn::tensor::{Int, Tensor, TensorData};
use diffusion_core::{Device, Error, Result};
use diffusion_models::{
    AddedCondKwargs, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
    UNet2DConditionModel, UNet2DConditionOptions,
};
use diffusion_schedulers::{DDPMScheduler, PredictionType};

use crate::caption_data::{CropGeometry, tokenize_captions};
use crate::data_parallel::{DataParallel, TextToImageParallel};
use crate::lora::{LoraTrainConfig, UNetLora};
use crate::objective::{NoiseDraws, Objective, conditional_prediction_with, mse_loss};
use crate::text_to_image::{TextToImageConfig, TextToImageTrainer};
use crate::trainer::StepStats;

/// `--timestep_bias_strategy` of train_text_to_image_sdxl.py.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepBiasStrategy {
    /// Uniform timesteps.
    #[default]
    None,
    /// Weight the first `portion` of the timesteps (the low-noise end).
    Earlier,
    /// Weight the last `portion` of the timesteps (the high-noise end).
    Later,
    /// Weight `begin..end`.
    Range,
}

impl TimestepBiasStrategy {
    /// Parse the script's spelling.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" => Some(Self::None),
            "earlier" => Some(Self::Earlier),
            "later" => Some(Self::Later),
            "range" => Some(Self::Range),
            _ => None,
        }
    }
}

/// The timestep bias of train_text_to_image_sdxl.py (`generate_timestep_weights`); `Default` is
/// its defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimestepBias {
    /// `--timestep_bias_strategy`.
    pub strategy: TimestepBiasStrategy,
    /// `--timestep_bias_multiplier`: the weight of the biased timesteps (others have 1).
    pub multiplier: f64,
    /// `--timestep_bias_begin` (range strategy).
    pub begin: usize,
    /// `--timestep_bias_end` (range strategy, exclusive).
    pub end: usize,
    /// `--timestep_bias_portion` (earlier / later strategies).
    pub portion: f64,
}

impl Default for TimestepBias {
    fn default() -> Self {
        Self {
            strategy: TimestepBiasStrategy::None,
            multiplier: 1.0,
            begin: 0,
            end: 1000,
            portion: 0.25,
        }
    }
}

impl TimestepBias {
    /// Check the settings on their own.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timestep_bias_multiplier` (not positive; the script
    /// means to refuse it too) or `timestep_bias_portion` (outside `[0, 1]`).
    pub fn validate(&self) -> Result<()> {
        if self.strategy == TimestepBiasStrategy::None {
            return Ok(());
        }
        if !(self.multiplier > 0.0 && self.multiplier.is_finite()) {
            return Err(Error::invalid_argument(
                "timestep_bias_multiplier",
                format!(
                    "{} is not positive; use the strategy `none` to disable the bias",
                    self.multiplier
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.portion) {
            return Err(Error::invalid_argument(
                "timestep_bias_portion",
                format!("{} is not in [0, 1]", self.portion),
            ));
        }
        Ok(())
    }

    /// `generate_timestep_weights`: one float32 weight per timestep, summing to one (all equal
    /// without a bias).
    ///
    /// # Errors
    /// As [`Self::validate`]; [`Error::InvalidArgument`] naming `timestep_bias_end` /
    /// `timestep_bias_begin` for a range past `num_timesteps` or empty.
    pub fn weights(&self, num_timesteps: usize) -> Result<Vec<f32>> {
        self.validate()?;
        let mut w = vec![1.0f32; num_timesteps];
        // int(portion * n), as Python truncates it.
        let num_to_bias = (self.portion * num_timesteps as f64) as usize;
        let range = match self.strategy {
            TimestepBiasStrategy::None => 0..0,
            // Python's `slice(-0, None)` is the whole schedule.
            TimestepBiasStrategy::Later if num_to_bias == 0 => 0..num_timesteps,
            TimestepBiasStrategy::Later => num_timesteps - num_to_bias..num_timesteps,
            TimestepBiasStrategy::Earlier => 0..num_to_bias,
            TimestepBiasStrategy::Range => {
                if self.end > num_timesteps {
                    return Err(Error::invalid_argument(
                        "timestep_bias_end",
                        format!(
                            "{} is past the {num_timesteps} training timesteps",
                            self.end
                        ),
                    ));
                }
                if self.begin >= self.end {
                    return Err(Error::invalid_argument(
                        "timestep_bias_begin",
                        format!("{} is not below timestep_bias_end {}", self.begin, self.end),
                    ));
                }
                self.begin..self.end
            }
        };
        if self.strategy == TimestepBiasStrategy::None {
            let v = 1.0 / num_timesteps as f32;
            return Ok(vec![v; num_timesteps]);
        }
        let m = self.multiplier as f32;
        for v in &mut w[range] {
            *v *= m;
        }
        let sum: f32 = w.iter().sum();
        Ok(w.into_iter().map(|v| v / sum).collect())
    }

    /// Timesteps drawn from [`Self::weights`] by inverse CDF, one per uniform `[0, 1)` number
    /// (`torch.multinomial(weights, bsz, replacement=True)` with our own random numbers).
    ///
    /// # Errors
    /// As [`Self::weights`].
    pub fn sample(&self, num_timesteps: usize, uniforms: &[f32]) -> Result<Vec<usize>> {
        let weights = self.weights(num_timesteps)?;
        let mut cdf = Vec::with_capacity(weights.len());
        let mut acc = 0.0f64;
        for w in weights {
            acc += f64::from(w);
            cdf.push(acc);
        }
        Ok(uniforms
            .iter()
            .map(|&u| {
                let target = f64::from(u) * acc;
                cdf.partition_point(|&c| c <= target).min(num_timesteps - 1)
            })
            .collect())
    }
}

/// Settings of an SDXL run: the SD1 text-to-image settings (field names are the scripts'
/// options, `lora: Some(..)` is the LoRA script) and the options only
/// train_text_to_image_sdxl.py has. `Default` is that script's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SdxlTrainConfig {
    /// Everything the SD1 scripts share with the SDXL ones (`pretrained_model` is an SDXL
    /// folder; `input_perturbation` must stay 0).
    pub text_to_image: TextToImageConfig,
    /// Replace this share of the captions with the empty prompt (full fine-tuning only).
    pub proportion_empty_prompts: f64,
    /// Bias of the timestep draw (full fine-tuning only).
    pub timestep_bias: TimestepBias,
    /// Also train LoRAs of both text encoders (`--train_text_encoder` of
    /// train_text_to_image_lora_sdxl.py; LoRA runs only, see [`crate::sdxl_text_lora`]).
    pub train_text_encoder: bool,
}

impl Default for SdxlTrainConfig {
    fn default() -> Self {
        Self {
            text_to_image: TextToImageConfig {
                output_dir: PathBuf::from("sdxl-model-finetuned"),
                resolution: 1024,
                ..TextToImageConfig::default()
            },
            proportion_empty_prompts: 0.0,
            timestep_bias: TimestepBias::default(),
            train_text_encoder: false,
        }
    }
}

impl SdxlTrainConfig {
    /// train_text_to_image_lora_sdxl.py's defaults: a rank-4 LoRA, its output folder.
    pub fn lora_defaults() -> Self {
        Self {
            text_to_image: TextToImageConfig {
                output_dir: PathBuf::from("sd-model-finetuned-lora"),
                resolution: 1024,
                lora: Some(LoraTrainConfig::default()),
                ..TextToImageConfig::default()
            },
            ..Self::default()
        }
    }

    /// Check the settings on their own, before anything is loaded.
    ///
    /// # Errors
    /// As [`TextToImageConfig::validate`] and [`TimestepBias::validate`];
    /// [`Error::InvalidArgument`] naming `input_perturbation` (not in the SDXL scripts),
    /// `proportion_empty_prompts` (outside
    /// `[0, 1]`), or, with a LoRA, an option only the full
    /// script has, or the `sample` prediction type; (`train_text_encoder`) without a LoRA,
    /// (`cache_latents`) with `train_text_encoder`.
    pub fn validate(&self) -> Result<()> {
        let base = &self.text_to_image;
        base.validate()?;
        self.timestep_bias.validate()?;
        if base.input_perturbation != 0.0 {
            return Err(Error::invalid_argument(
                "input_perturbation",
                "the SDXL scripts have no input perturbation",
            ));
        }
        if !(0.0..=1.0).contains(&self.proportion_empty_prompts) {
            return Err(Error::invalid_argument(
                "proportion_empty_prompts",
                format!("{} is not in [0, 1]", self.proportion_empty_prompts),
            ));
        }
        if base.lora.is_some() {
            if self.proportion_empty_prompts != 0.0 {
                return Err(Error::invalid_argument(
                    "proportion_empty_prompts",
                    "train_text_to_image_lora_sdxl.py has no empty prompts; full fine-tuning only",
                ));
            }
            if self.timestep_bias.strategy != TimestepBiasStrategy::None {
                return Err(Error::invalid_argument(
                    "timestep_bias_strategy",
                    "train_text_to_image_lora_sdxl.py has no timestep bias; full fine-tuning only",
                ));
            }
            if base.prediction_type == Some(PredictionType::Sample) {
                return Err(sample_with_lora());
            }
        }
        if self.train_text_encoder {
            if base.lora.is_none() {
                return Err(Error::invalid_argument(
                    "train_text_encoder",
                    "trains text-encoder LoRAs beside the UNet LoRA: LoRA runs only",
                ));
            }
            if base.cache_latents {
                return Err(Error::invalid_argument(
                    "cache_latents",
                    "with train_text_encoder every step encodes its images and captions",
                ));
            }
        }
        Ok(())
    }

    /// Check that the model folder is an SDXL folder and the dataset folder an imagefolder.
    ///
    /// # Errors
    /// [`Error::NotFound`] naming the missing folder or file.
    pub fn check_paths(&self) -> Result<()> {
        self.text_to_image.check_paths()?;
        for sub in ["text_encoder_2", "tokenizer_2"] {
            let dir = self.text_to_image.pretrained_model.join(sub);
            if !dir.is_dir() {
                return Err(Error::NotFound {
                    path: dir,
                    message: "an SDXL folder has a second text encoder and tokenizer".into(),
                });
            }
        }
        Ok(())
    }

    /// Read a JSON config (missing keys take their defaults, unknown keys are an error).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`], [`Error::ConfigField`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value = diffusion_core::config::parse_json(&text, path)?;
        serde_json::from_value(value).map_err(|e| Error::ConfigField {
            path: path.to_path_buf(),
            field: "<root>".into(),
            message: e.to_string(),
        })
    }

    /// Write the config as pretty JSON.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        diffusion_core::config::write_atomically(path.as_ref(), text.as_bytes())
    }
}

fn sample_with_lora() -> Error {
    Error::invalid_argument(
        "prediction_type",
        "train_text_to_image_lora_sdxl.py trains epsilon or v_prediction only",
    )
}

/// The scripts' `compute_time_ids`: `original_size + crops_coords_top_left + target_size`,
/// all as `(height, width)` / `(y, x)` pairs.
pub fn compute_time_ids(
    original_size: (usize, usize),
    crop_top_left: (usize, usize),
    resolution: usize,
) -> [f32; 6] {
    [
        original_size.0 as f32,
        original_size.1 as f32,
        crop_top_left.0 as f32,
        crop_top_left.1 as f32,
        resolution as f32,
        resolution as f32,
    ]
}

/// The `add_time_ids` of an image that [`crate::CaptionDataset::pixel_values`] cropped with
/// `geometry` and flipped when `flip`: the original `(height, width)` and the crop's `(y1, x1)`.
/// The scripts flip the resized image and then crop it, reporting the window in the flipped
/// image; the dataset crops and then flips, which is the window `x1 = resized_width -
/// resolution - left` of the flipped image, and that is what is reported (it is the scripts'
/// value except for a center crop whose margin is odd, where rounding puts their window one
/// pixel off the mirror image of ours).
pub fn time_ids_for(geometry: &CropGeometry, flip: bool, resolution: usize) -> [f32; 6] {
    let (w, h) = geometry.original_size;
    let (left, top) = geometry.crop_origin;
    let x1 = if flip {
        geometry.resized_size.0 - resolution - left
    } else {
        left
    };
    compute_time_ids((h, w), (top, x1), resolution)
}

/// The frozen text side of SDXL: both tokenizers and text encoders.
#[derive(Debug)]
pub struct SdxlTextEncoders {
    /// `tokenizer/`.
    pub tokenizer: CLIPTokenizer,
    /// `tokenizer_2/`.
    pub tokenizer_2: CLIPTokenizer,
    /// `text_encoder/` (CLIPTextModel).
    pub text_encoder: CLIPTextModel,
    /// `text_encoder_2/` (CLIPTextModelWithProjection).
    pub text_encoder_2: CLIPTextModelWithProjection,
}

impl SdxlTextEncoders {
    /// Load them from an SDXL folder onto `device` (without autodiff).
    ///
    /// # Errors
    /// Tokenizer and model loading errors.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let device = device.clone().without_autodiff();
        Ok(Self {
            tokenizer: CLIPTokenizer::from_pretrained(dir.join("tokenizer"))?,
            tokenizer_2: CLIPTokenizer::from_pretrained(dir.join("tokenizer_2"))?,
            text_encoder: CLIPTextModel::from_pretrained(dir.join("text_encoder"), &device)?,
            text_encoder_2: CLIPTextModelWithProjection::from_pretrained(
                dir.join("text_encoder_2"),
                &device,
            )?,
        })
    }

    /// Both text encoders cast to `dtype` (the scripts' `weight_dtype` under mixed precision);
    /// [`Self::encode_prompt`] still returns f32.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`.
    pub fn to_dtype(self, dtype: diffusion_core::burn::tensor::FloatDType) -> Result<Self> {
        use diffusion_models::modeling_utils::to_dtype;
        Ok(Self {
            tokenizer: self.tokenizer,
            tokenizer_2: self.tokenizer_2,
            text_encoder: to_dtype(self.text_encoder, dtype)?,
            text_encoder_2: to_dtype(self.text_encoder_2, dtype)?,
        })
    }

    /// The scripts' `encode_prompt`: each tokenizer pads / truncates to its
    /// `model_max_length`; `hidden_states[-2]` of both encoders joined along features, and
    /// `text_encoder_2`'s `text_embeds`, in f32 whatever the encoders' dtype.
    ///
    /// # Shapes
    /// - outputs: `[B, S, hidden + hidden_2]` and `[B, projection_dim]`
    ///
    /// # Errors
    /// Tokenizer and encoder errors; [`Error::InvalidArgument`] (`captions`) when the two
    /// tokenizers' lengths differ.
    pub fn encode_prompt<S: AsRef<str>>(&self, captions: &[S]) -> Result<(Tensor<3>, Tensor<2>)> {
        let device = crate::optimizer::module_device(&self.text_encoder);
        let (ids_one, ids_two) = self.input_ids(captions, &device)?;
        encode_prompt_ids(&self.text_encoder, &self.text_encoder_2, ids_one, ids_two)
    }

    /// The captions through each tokenizer (padded / truncated to its `model_max_length`): the
    /// scripts' `input_ids_one` and `input_ids_two`.
    ///
    /// # Shapes
    /// - outputs: `[B, S]` and `[B, S_2]`
    ///
    /// # Errors
    /// Tokenizer errors.
    pub fn input_ids<S: AsRef<str>>(
        &self,
        captions: &[S],
        device: &Device,
    ) -> Result<(Tensor<2, Int>, Tensor<2, Int>)> {
        Ok((
            tokenize_captions(&self.tokenizer, captions)?.input_ids_tensor(device)?,
            tokenize_captions(&self.tokenizer_2, captions)?.input_ids_tensor(device)?,
        ))
    }
}

/// The scripts' `encode_prompt` on token ids (`text_input_ids_list`), with any two encoders (the
/// frozen ones, or ones with a LoRA applied in the autodiff graph): `hidden_states[-2]` of both
/// joined along features, and `text_encoder_2`'s `text_embeds`, in f32 whatever the encoders'
/// dtype.
///
/// # Shapes
/// - `ids_one`, `ids_two`: `[B, S]`; outputs: `[B, S, hidden + hidden_2]` and
///   `[B, projection_dim]`
///
/// # Errors
/// Encoder errors; [`Error::InvalidArgument`] (`captions`) when the two sequence lengths
/// differ.
pub fn encode_prompt_ids(
    text_encoder: &CLIPTextModel,
    text_encoder_2: &CLIPTextModelWithProjection,
    ids_one: Tensor<2, Int>,
    ids_two: Tensor<2, Int>,
) -> Result<(Tensor<3>, Tensor<2>)> {
    let penultimate = |states: Vec<Tensor<3>>| -> Result<Tensor<3>> {
        let n = states.len();
        states
            .into_iter()
            .nth(n.wrapping_sub(2))
            .ok_or_else(|| Error::invalid_argument("text_encoder", "fewer than two hidden states"))
    };
    let one = penultimate(text_encoder.forward(ids_one)?.hidden_states)?;
    let out = text_encoder_2.forward(ids_two)?;
    let two = penultimate(out.hidden_states)?;
    if one.dims()[1] != two.dims()[1] {
        return Err(Error::invalid_argument(
            "captions",
            format!(
                "the tokenizers pad to {} and {} tokens",
                one.dims()[1],
                two.dims()[1]
            ),
        ));
    }
    use crate::mixed_precision::to_f32;
    Ok((
        to_f32(Tensor::cat(vec![one, two], 2)),
        to_f32(out.text_embeds),
    ))
}

/// What the SDXL UNet is conditioned on besides the noisy latents.
#[derive(Clone, Debug)]
pub struct SdxlConditioning {
    /// `prompt_embeds`, `[B, S, cross_attention_dim]`.
    pub prompt_embeds: Tensor<3>,
    /// `pooled_prompt_embeds` (`text_embeds`), `[B, D]`.
    pub pooled_prompt_embeds: Tensor<2>,
    /// `add_time_ids`, `[B, 6]`.
    pub time_ids: Tensor<2>,
}

impl SdxlConditioning {
    /// From the encoders' outputs and one [`compute_time_ids`] row per sample.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`time_ids`) when the rows do not match the batch.
    pub fn new(
        prompt_embeds: Tensor<3>,
        pooled_prompt_embeds: Tensor<2>,
        time_ids: &[[f32; 6]],
    ) -> Result<Self> {
        let b = prompt_embeds.dims()[0];
        if time_ids.len() != b || pooled_prompt_embeds.dims()[0] != b {
            return Err(Error::invalid_argument(
                "time_ids",
                format!(
                    "{} rows and {} pooled embeddings for a batch of {b}",
                    time_ids.len(),
                    pooled_prompt_embeds.dims()[0]
                ),
            ));
        }
        let device = prompt_embeds.device();
        let flat: Vec<f32> = time_ids.iter().flatten().copied().collect();
        Ok(Self {
            prompt_embeds,
            pooled_prompt_embeds,
            time_ids: Tensor::from_data(TensorData::new(flat, [b, 6]), &device),
        })
    }

    /// Join conditionings along the batch.
    pub fn cat(parts: Vec<Self>) -> Self {
        let mut e = Vec::with_capacity(parts.len());
        let mut p = Vec::with_capacity(parts.len());
        let mut t = Vec::with_capacity(parts.len());
        for part in parts {
            e.push(part.prompt_embeds);
            p.push(part.pooled_prompt_embeds);
            t.push(part.time_ids);
        }
        Self {
            prompt_embeds: Tensor::cat(e, 0),
            pooled_prompt_embeds: Tensor::cat(p, 0),
            time_ids: Tensor::cat(t, 0),
        }
    }

    /// Rows `rows` of the batch.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Self {
        let n = rows.len();
        Self {
            prompt_embeds: self.prompt_embeds.clone().narrow(0, rows.start, n),
            pooled_prompt_embeds: self.pooled_prompt_embeds.clone().narrow(0, rows.start, n),
            time_ids: self.time_ids.clone().narrow(0, rows.start, n),
        }
    }

    fn to_device(&self, device: &Device) -> Self {
        Self {
            prompt_embeds: self.prompt_embeds.clone().to_device(device),
            pooled_prompt_embeds: self.pooled_prompt_embeds.clone().to_device(device),
            time_ids: self.time_ids.clone().to_device(device),
        }
    }
}

/// The loss of the SDXL scripts with `unet` on one micro-batch (every input on `unet`'s device):
/// the MSE (with Min-SNR weights when set) of the prediction conditioned on the prompt
/// embeddings, the pooled embeddings and the time ids; for the `sample` objective the full
/// script's model output minus the noise against the latents.
///
/// # Errors
/// As [`conditional_prediction_with`].
pub(crate) fn sdxl_loss(
    unet: &UNet2DConditionModel,
    scheduler: &DDPMScheduler,
    objective: &Objective,
    latents: Tensor<4>,
    cond: SdxlConditioning,
    draws: &NoiseDraws,
) -> Result<Tensor<1>> {
    let device = latents.device();
    let b = latents.dims()[0];
    let options = UNet2DConditionOptions {
        added_cond_kwargs: Some(AddedCondKwargs {
            text_embeds: Some(cond.pooled_prompt_embeds),
            time_ids: Some(cond.time_ids),
            image_embeds: None,
        }),
        ..UNet2DConditionOptions::default()
    };
    let (mut pred, target) = conditional_prediction_with(
        unet,
        scheduler,
        objective,
        latents,
        cond.prompt_embeds,
        draws,
        options,
    )?;
    if objective.prediction_type == PredictionType::Sample {
        // The script's model predicts noise; it turns that into a sample target this way.
        let mut noise = draws.noise.clone();
        if let (Some(offset), true) = (&draws.offset_noise, objective.noise_offset > 0.0) {
            noise = noise.add(
                offset
                    .clone()
                    .mul_scalar(objective.noise_offset)
                    .expand(pred.dims()),
            );
        }
        pred = pred.sub(noise);
    }
    Ok(mse_loss(
        pred,
        target,
        scheduler,
        objective,
        &draws.timesteps,
        b,
        &device,
    ))
}

/// The replicas of what an SDXL run trains, one per device (see
/// [`SdxlTrainer::data_parallel`]).
#[derive(Debug)]
pub enum SdxlParallel {
    /// The UNet or its LoRA, as text-to-image training replicates them.
    Unet(TextToImageParallel),
    /// The three LoRAs of a `train_text_encoder` run: one replica of their factors per device,
    /// and the frozen UNet and both text encoders on every device (the main device's first).
    TextEncoders {
        /// The factors' replicas.
        factors: DataParallel<crate::sdxl_text_lora::SdxlLoraFactors>,
        /// The frozen UNet per device.
        unets: Vec<UNet2DConditionModel>,
        /// The frozen `text_encoder` per device.
        encoders: Vec<CLIPTextModel>,
        /// The frozen `text_encoder_2` per device.
        encoders_2: Vec<CLIPTextModelWithProjection>,
    },
}

impl SdxlParallel {
    /// Copy `trainer`'s current trained parameters into every other replica.
    pub fn sync(&mut self, trainer: &SdxlTrainer) {
        match self {
            Self::Unet(p) => p.sync(&trainer.trainer),
            Self::TextEncoders { factors, .. } => {
                if let Some(main) = trainer.lora_factors() {
                    factors.sync(&main);
                }
            }
        }
    }
}

/// The optimisation of an SDXL run: a [`TextToImageTrainer`] (AdamW, schedule, accumulation,
/// clipping, EMA, LoRA) fed the SDXL loss; with `train_text_encoder`, also the text-encoder
/// LoRAs ([`crate::sdxl_text_lora`]).
#[derive(Debug)]
pub struct SdxlTrainer {
    pub(crate) trainer: TextToImageTrainer,
    pub(crate) config: SdxlTrainConfig,
    pub(crate) text: Option<crate::sdxl_text_lora::SdxlTextTraining>,
}

impl SdxlTrainer {
    /// Start training `unet` fully, or only `lora`'s factors when given (see
    /// [`TextToImageTrainer::new`]).
    ///
    /// # Errors
    /// As [`SdxlTrainConfig::validate`] and [`TextToImageTrainer::new`];
    /// [`Error::InvalidArgument`] (`prediction_type`) for a LoRA on a `sample` scheduler,
    /// (`train_text_encoder`) when the config trains the text encoders (use
    /// [`Self::with_text_encoders`]).
    pub fn new(
        config: &SdxlTrainConfig,
        unet: UNet2DConditionModel,
        lora: Option<UNetLora>,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if config.train_text_encoder {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "is set: build the trainer with SdxlTrainer::with_text_encoders",
            ));
        }
        let trainer = TextToImageTrainer::new(
            &config.text_to_image,
            unet,
            lora,
            scheduler,
            num_training_steps,
            device,
        )?;
        Self::from_trainer(config, trainer)
    }

    /// Wrap a trainer built elsewhere (a resumed checkpoint).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn from_trainer(config: &SdxlTrainConfig, trainer: TextToImageTrainer) -> Result<Self> {
        config.validate()?;
        trainer.refuse_flow_matching("the SDXL loss")?;
        if trainer.lora().is_some() && trainer.objective().prediction_type == PredictionType::Sample
        {
            return Err(sample_with_lora());
        }
        Ok(Self {
            trainer,
            config: config.clone(),
            text: None,
        })
    }

    /// The loss of the current weights on one micro-batch, as the SDXL scripts compute it;
    /// inputs are moved onto the training device.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]` (scaled); `cond` with batch `B`
    ///
    /// # Errors
    /// As [`conditional_prediction_with`].
    pub fn loss(
        &self,
        latents: Tensor<4>,
        cond: &SdxlConditioning,
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        let device = crate::optimizer::module_device(self.trainer.unet());
        let draws = NoiseDraws {
            noise: draws.noise.clone().to_device(&device),
            offset_noise: draws.offset_noise.clone().map(|t| t.to_device(&device)),
            perturbation: None,
            timesteps: draws.timesteps.clone(),
        };
        sdxl_loss(
            &self.trainer.forward_unet()?,
            self.trainer.scheduler(),
            self.trainer.objective(),
            latents.to_device(&device),
            cond.to_device(&device),
            &draws,
        )
    }

    /// One micro-batch: the loss, its backward, and the optimizer step after the last
    /// micro-batch of a step (see [`TextToImageTrainer::step_loss`]).
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn step(
        &mut self,
        latents: Tensor<4>,
        cond: &SdxlConditioning,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        if self.text.is_some() {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the text encoders are trained: pass prompt ids to step_with_ids",
            ));
        }
        let loss = self.loss(latents, cond, draws)?;
        self.trainer.step_loss(loss)
    }

    /// [`Self::step`] over the devices of `parallel` (from [`Self::data_parallel`]): the
    /// micro-batch is sharded (latents, conditioning and draws), each device computes its part
    /// of the SDXL loss and of the gradients with its replica, and the optimizer steps once on
    /// the main device (see [`TextToImageTrainer::step_data_parallel_by`]).
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`; `cond` with batch `B` (the global batch)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `train_text_encoder` when the text encoders are trained
    /// (use [`Self::step_data_parallel_with_ids`]), `timesteps` when the draws do not fit the
    /// batch; as [`TextToImageTrainer::step_data_parallel_by`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut SdxlParallel,
        latents: Tensor<4>,
        cond: &SdxlConditioning,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let SdxlParallel::Unet(parallel) = parallel else {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the text encoders are trained: pass prompt ids to step_data_parallel_with_ids",
            ));
        };
        if self.text.is_some() {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the replicas were built without the text encoders; use \
                 SdxlTrainer::data_parallel",
            ));
        }
        let b = latents.dims()[0];
        if draws.timesteps.len() != b {
            return Err(Error::invalid_argument(
                "timesteps",
                format!("{} timesteps for a batch of {b}", draws.timesteps.len()),
            ));
        }
        // Owned copies: the step below borrows the trainer mutably.
        let scheduler = self.trainer.scheduler().clone();
        let objective = self.trainer.objective().clone();
        self.trainer
            .step_data_parallel_by(parallel, b, |unet, rows, device| {
                let shard = |t: &Tensor<4>| {
                    t.clone()
                        .narrow(0, rows.start, rows.len())
                        .to_device(device)
                };
                let shard_draws = NoiseDraws {
                    noise: shard(&draws.noise),
                    offset_noise: draws.offset_noise.as_ref().map(shard),
                    perturbation: None,
                    timesteps: draws.timesteps[rows.clone()].to_vec(),
                };
                sdxl_loss(
                    unet,
                    &scheduler,
                    &objective,
                    shard(&latents),
                    cond.rows(rows.clone()).to_device(device),
                    &shard_draws,
                )
            })
    }

    /// The optimizer step on what the micro-batches so far accumulated (over all LoRAs with
    /// `train_text_encoder`).
    ///
    /// # Errors
    /// As [`TextToImageTrainer::finish_step`].
    pub fn finish_step(&mut self) -> Result<StepStats> {
        if self.text.is_some() {
            return self.finish_text_step();
        }
        self.trainer.finish_step()
    }

    /// The underlying trainer (UNet, LoRA, optimizer, EMA, step count).
    pub fn trainer(&self) -> &TextToImageTrainer {
        &self.trainer
    }

    /// Mutable access to it (for example to replace the fp16 loss scaler).
    pub fn trainer_mut(&mut self) -> &mut TextToImageTrainer {
        &mut self.trainer
    }

    /// The run's settings.
    pub fn config(&self) -> &SdxlTrainConfig {
        &self.config
    }
}
