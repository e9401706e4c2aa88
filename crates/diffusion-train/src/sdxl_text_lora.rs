//! `--train_text_encoder` of train_text_to_image_lora_sdxl.py: LoRAs of both SDXL text encoders
//! (`text_encoder`, a `CLIPTextModel`, and `text_encoder_2`, a `CLIPTextModelWithProjection`)
//! trained with the UNet LoRA.
//!
//! The script gives both encoders the same peft config (`r = lora_alpha = rank`, gaussian init,
//! `q_proj`, `k_proj`, `v_proj`, `out_proj`: [`LoraTrainConfig::text_encoder`]), runs them with
//! their LoRAs on every batch's prompt ids (`encode_prompt(text_input_ids_list=...)`:
//! `hidden_states[-2]` of each joined, `text_embeds` of the second; [`encode_prompt_ids`]),
//! clips the gradients by their global norm over `params_to_optimize` and steps one AdamW over
//! it: the UNet LoRA's factors, then the first encoder's, then the second's
//! ([`SdxlLoraFactors`]), one learning rate. The first encoder's last layer only feeds its last
//! hidden state, which SDXL does not use: its factors get no gradient, and AdamW leaves them
//! (and their weight decay) alone, as torch does.
//!
//! Under mixed precision the frozen encoders and the factors are cast to the half dtype inside
//! the autodiff graph every step (the script keeps the encoders in `weight_dtype` and the
//! factors in float32), and fp16 scales the loss and skips steps with non-finite gradients, as
//! for the UNet ([`crate::mixed_precision`]).
//!
//! Files: the three LoRAs go into one `pytorch_lora_weights.safetensors`, as
//! `StableDiffusionXLPipeline.save_lora_weights(unet_lora_layers, text_encoder_lora_layers,
//! text_encoder_2_lora_layers)` writes it ([`SdxlTrainer::save_lora_weights`]); a checkpoint
//! holds that file, the AdamW state of [`SdxlLoraFactors`] and `training_state.json`
//! ([`save_sdxl_text_checkpoint`], [`load_sdxl_text_checkpoint`]).

use std::path::Path;

use diffusion_core::burn;
use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::{FloatDType, Int, Tensor};
use diffusion_core::weights::{NamedTensor, SafetensorsFile};
use diffusion_core::{Device, Error, Result};
use diffusion_models::{
    CLIPTextModel, CLIPTextModelWithProjection, ModelMixin, UNet2DConditionModel,
};
use diffusion_schedulers::DDPMScheduler;

use crate::data_parallel::DataParallel;
use crate::lora::{LoraComponent, LoraFactors, LoraTrainConfig, UNetLora};
use crate::mixed_precision::{backward_scale, half_copy};
use crate::objective::NoiseDraws;
use crate::optimizer::{FlatGradients, accumulation_share};
use crate::sdxl::{
    SdxlConditioning, SdxlParallel, SdxlTrainConfig, SdxlTrainer, encode_prompt_ids, sdxl_loss,
};
use crate::text_to_image::forward_unet_of;
use crate::text_to_image::{TextToImageTrainer, load_noise_scheduler};
use crate::text_to_image_run::{
    open_lora_set_checkpoint, restore_lora_set_progress, save_lora_set_checkpoint,
};
use crate::trainer::StepStats;

/// What the one AdamW of a `train_text_encoder` run trains, in the script's
/// `params_to_optimize` order.
#[derive(Module, Debug)]
pub struct SdxlLoraFactors {
    /// The UNet LoRA.
    pub unet: LoraFactors,
    /// The LoRA of `text_encoder`.
    pub text_encoder: LoraFactors,
    /// The LoRA of `text_encoder_2`.
    pub text_encoder_2: LoraFactors,
}

/// The text side of a `train_text_encoder` run.
#[derive(Debug)]
pub(crate) struct SdxlTextTraining {
    /// The frozen base encoders on the autodiff device.
    encoder: CLIPTextModel,
    encoder_2: CLIPTextModelWithProjection,
    lora: UNetLora,
    lora_2: UNetLora,
}

/// `encoder` with `lora` applied; under mixed precision the frozen encoder and the factors are
/// cast to `dtype` inside the autodiff graph (the f32 factors stay the masters), as for the UNet.
///
/// # Errors
/// [`Error::InvalidArgument`] (`dtype`) when the device does not support `dtype`.
fn adapted<M: Module>(encoder: &M, lora: &UNetLora, dtype: Option<FloatDType>) -> Result<M> {
    Ok(match dtype {
        Some(dtype) => {
            let mut half = lora.clone();
            half.set_factors(half_copy(lora.factors(), dtype)?);
            half.apply_to(&half_copy(encoder, dtype)?)
        }
        None => lora.apply_to(encoder),
    })
}

/// The text-encoder LoRA configuration of a run whose UNet LoRA is `unet`: the script's
/// [`LoraTrainConfig::text_encoder`] at the same rank (and alpha).
pub fn text_encoder_lora_config(unet: &LoraTrainConfig) -> LoraTrainConfig {
    LoraTrainConfig {
        alpha: unet.alpha,
        ..LoraTrainConfig::text_encoder(unet.rank)
    }
}

impl SdxlTrainer {
    /// Start training `unet_lora` on the frozen `unet` with `text_lora` on the frozen
    /// `text_encoder` and `text_lora_2` on the frozen `text_encoder_2` (from
    /// [`UNetLora::new_text_encoder`] / [`UNetLora::new_text_encoder_2`]), as
    /// train_text_to_image_lora_sdxl.py does with `--train_text_encoder`; everything is moved
    /// onto `device` with autodiff. The inner trainer's AdamW steps [`SdxlLoraFactors`].
    ///
    /// # Errors
    /// As [`SdxlTrainer::new`]; [`Error::InvalidArgument`] (`train_text_encoder`) when the
    /// config does not train the text encoders, (`lora`) when a LoRA is of the wrong component.
    #[allow(clippy::too_many_arguments)]
    pub fn with_text_encoders(
        config: &SdxlTrainConfig,
        unet: UNet2DConditionModel,
        unet_lora: UNetLora,
        text_encoder: CLIPTextModel,
        text_lora: UNetLora,
        text_encoder_2: CLIPTextModelWithProjection,
        text_lora_2: UNetLora,
        scheduler: DDPMScheduler,
        num_training_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if !config.train_text_encoder {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "is not set in the config",
            ));
        }
        let components = [
            (&unet_lora, LoraComponent::Unet),
            (&text_lora, LoraComponent::TextEncoder),
            (&text_lora_2, LoraComponent::TextEncoder2),
        ];
        for (lora, want) in components {
            if lora.component() != want {
                return Err(Error::invalid_argument(
                    "lora",
                    format!(
                        "a LoRA of the {} where the {} one belongs",
                        lora.component().prefix(),
                        want.prefix()
                    ),
                ));
            }
        }
        let base = &config.text_to_image;
        let trainer = TextToImageTrainer::new(
            base,
            unet,
            Some(unet_lora),
            scheduler,
            num_training_steps,
            device,
        )?;
        let mut this = Self::from_trainer(config, trainer)?;
        let ad = crate::autodiff::autodiff_device(device, base.gradient_checkpointing);
        this.text = Some(SdxlTextTraining {
            encoder: crate::autodiff::checkpointed(text_encoder.fork(&ad).no_grad(), &ad),
            encoder_2: crate::autodiff::checkpointed(text_encoder_2.fork(&ad).no_grad(), &ad),
            lora: text_lora.fork(&ad),
            lora_2: text_lora_2.fork(&ad),
        });
        Ok(this)
    }

    fn text_training(&self) -> Result<&SdxlTextTraining> {
        self.text.as_ref().ok_or_else(|| {
            Error::invalid_argument("train_text_encoder", "the text encoders are not trained")
        })
    }

    /// The loss with both adapted text encoders in the graph: [`encode_prompt_ids`] of the
    /// prompt ids of each tokenizer, one `add_time_ids` row per sample, then [`Self::loss`].
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`, `ids_one`, `ids_two`: `[B, S]`
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`train_text_encoder`) when the text encoders are not
    /// trained; as [`encode_prompt_ids`], [`SdxlConditioning::new`] and [`Self::loss`].
    pub fn loss_with_ids(
        &self,
        latents: Tensor<4>,
        ids_one: Tensor<2, Int>,
        ids_two: Tensor<2, Int>,
        time_ids: &[[f32; 6]],
        draws: &NoiseDraws,
    ) -> Result<Tensor<1>> {
        let text = self.text_training()?;
        let device = crate::optimizer::module_device(self.trainer.unet());
        let dtype = self.trainer.config().mixed_precision().dtype();
        let one = adapted(&text.encoder, &text.lora, dtype)?;
        let two = adapted(&text.encoder_2, &text.lora_2, dtype)?;
        let (embeds, pooled) = encode_prompt_ids(
            &one,
            &two,
            ids_one.to_device(&device),
            ids_two.to_device(&device),
        )?;
        let cond = SdxlConditioning::new(embeds, pooled, time_ids)?;
        self.loss(latents, &cond, draws)
    }

    /// All three LoRAs' factors (with `train_text_encoder`), on the autodiff device.
    pub fn lora_factors(&self) -> Option<SdxlLoraFactors> {
        let text = self.text.as_ref()?;
        Some(SdxlLoraFactors {
            unet: self.trainer.lora()?.factors().clone(),
            text_encoder: text.lora.factors().clone(),
            text_encoder_2: text.lora_2.factors().clone(),
        })
    }

    /// The gradients of `loss` with respect to [`SdxlLoraFactors`] (with
    /// `train_text_encoder`), else as [`TextToImageTrainer::gradients`].
    pub fn gradients(&self, loss: Tensor<1>) -> FlatGradients {
        match self.lora_factors() {
            Some(factors) => FlatGradients::from_backward(&factors, loss.backward()),
            None => self.trainer.gradients(loss),
        }
    }

    /// Gradients from [`Self::gradients`] of a `train_text_encoder` run under peft's names,
    /// one list per LoRA (UNet, `text_encoder`, `text_encoder_2`), each as
    /// [`UNetLora::state_dict`] names the factors (zeros where a factor got no gradient).
    pub fn lora_gradient_state_dicts(
        &self,
        grads: &FlatGradients,
    ) -> Option<[Vec<NamedTensor>; 3]> {
        let factors = self.lora_factors()?;
        let mut sides: [Vec<NamedTensor>; 3] = Default::default();
        for mut t in grads.state_dict(&factors) {
            let (side, rest) = t.key.split_once('.')?;
            let i = match side {
                "unet" => 0,
                "text_encoder" => 1,
                "text_encoder_2" => 2,
                _ => return None,
            };
            t.key = rest.to_string();
            sides[i].push(t);
        }
        let [unet, one, two] = sides;
        let [lora, lora_2] = self.text_encoder_loras()?;
        Some([
            self.trainer.lora()?.name_factor_tensors(unet),
            lora.name_factor_tensors(one),
            lora_2.name_factor_tensors(two),
        ])
    }

    /// One micro-batch of a `train_text_encoder` run: [`Self::loss_with_ids`], backward of
    /// `loss / gradient_accumulation_steps`, accumulate, and after the last micro-batch of a
    /// step the optimizer step ([`Self::finish_step`]).
    ///
    /// # Errors
    /// As [`Self::loss_with_ids`].
    pub fn step_with_ids(
        &mut self,
        latents: Tensor<4>,
        ids_one: Tensor<2, Int>,
        ids_two: Tensor<2, Int>,
        time_ids: &[[f32; 6]],
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let loss = self.loss_with_ids(latents, ids_one, ids_two, time_ids, draws)?;
        let (loss, value) = self.trainer.backward_loss(loss);
        let grads = self.gradients(loss);
        if !self.trainer.accumulate(grads, value)? {
            return Ok(None);
        }
        self.finish_step().map(Some)
    }

    /// Replicate what this run trains onto `devices` (the first must be the trainer's own
    /// device): the UNet or its LoRA, or with `train_text_encoder` the three LoRAs' factors
    /// with the frozen UNet and both text encoders copied onto every device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when the list is empty.
    pub fn data_parallel(&self, devices: Vec<Device>) -> Result<SdxlParallel> {
        let (Some(text), Some(factors)) = (&self.text, self.lora_factors()) else {
            return Ok(SdxlParallel::Unet(self.trainer.data_parallel(devices)?));
        };
        let factors = DataParallel::new(devices, &factors)?;
        let unets = factors.frozen_copies(self.trainer.unet());
        let encoders = factors.frozen_copies(&text.encoder);
        let encoders_2 = factors.frozen_copies(&text.encoder_2);
        Ok(SdxlParallel::TextEncoders {
            factors,
            unets,
            encoders,
            encoders_2,
        })
    }

    /// [`Self::step_with_ids`] over the devices of `parallel` (from [`Self::data_parallel`] on
    /// a `train_text_encoder` trainer): every device runs its replica of the three LoRAs, both
    /// adapted encoders on its rows' prompt ids and the adapted UNet on its rows; the gradients
    /// are gathered, accumulated, clipped together and stepped by the one AdamW, and the
    /// replicas synced.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`, `ids_one`, `ids_two`: `[B, S]`, `time_ids`: `B` rows
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `train_text_encoder` when the text encoders are not
    /// trained or `parallel` was built without them, `timesteps` / `time_ids` when the draws or
    /// rows do not fit the batch; the shards' errors.
    #[allow(clippy::too_many_arguments)]
    pub fn step_data_parallel_with_ids(
        &mut self,
        parallel: &mut SdxlParallel,
        latents: Tensor<4>,
        ids_one: Tensor<2, Int>,
        ids_two: Tensor<2, Int>,
        time_ids: &[[f32; 6]],
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let SdxlParallel::TextEncoders {
            factors: replicas,
            unets,
            encoders,
            encoders_2,
        } = &*parallel
        else {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the replicas were built without the text encoders; use \
                 SdxlTrainer::data_parallel",
            ));
        };
        let (Some(text), Some(unet_lora), Some(main)) =
            (&self.text, self.trainer.lora(), self.lora_factors())
        else {
            return Err(Error::invalid_argument(
                "train_text_encoder",
                "the text encoders are not trained",
            ));
        };
        let b = latents.dims()[0];
        if draws.timesteps.len() != b || time_ids.len() != b {
            return Err(Error::invalid_argument(
                "time_ids",
                format!(
                    "{} timesteps and {} time id rows for a batch of {b}",
                    draws.timesteps.len(),
                    time_ids.len()
                ),
            ));
        }
        let k = self.trainer.config().gradient_accumulation_steps.max(1);
        let dtype = self.trainer.config().mixed_precision().dtype();
        let scale = backward_scale(self.trainer.grad_scaler.as_ref());
        let scheduler = self.trainer.scheduler().clone();
        let objective = self.trainer.objective().clone();
        // Each device gets the three LoRAs' layouts (to carry its replica's factors) and its
        // copies of the frozen models.
        let contexts = unets
            .iter()
            .zip(encoders.iter().zip(encoders_2))
            .map(|(u, (e, e2))| {
                (
                    [unet_lora.clone(), text.lora.clone(), text.lora_2.clone()],
                    (u.clone(), e.clone(), e2.clone()),
                )
            })
            .collect();
        let (value, grads) = replicas.loss_and_gradients_with(
            &main,
            b,
            contexts,
            scale,
            |replica,
             ([mut unet_layout, mut layout, mut layout_2], (unet, one, two)),
             rows,
             device| {
                let n = rows.len();
                let shard = |t: &Tensor<4>| t.clone().narrow(0, rows.start, n).to_device(device);
                unet_layout.set_factors(replica.unet.clone());
                layout.set_factors(replica.text_encoder.clone());
                layout_2.set_factors(replica.text_encoder_2.clone());
                let (embeds, pooled) = encode_prompt_ids(
                    &adapted(&one, &layout, dtype)?,
                    &adapted(&two, &layout_2, dtype)?,
                    ids_one.clone().narrow(0, rows.start, n).to_device(device),
                    ids_two.clone().narrow(0, rows.start, n).to_device(device),
                )?;
                let cond = SdxlConditioning::new(embeds, pooled, &time_ids[rows.clone()])?;
                let shard_draws = NoiseDraws {
                    noise: shard(&draws.noise),
                    offset_noise: draws.offset_noise.as_ref().map(shard),
                    perturbation: None,
                    timesteps: draws.timesteps[rows.clone()].to_vec(),
                };
                let loss = sdxl_loss(
                    &forward_unet_of(&unet, Some(&unet_layout), dtype)?,
                    &scheduler,
                    &objective,
                    shard(&latents),
                    cond,
                    &shard_draws,
                )?;
                Ok(accumulation_share(loss, k))
            },
        )?;
        let stats = if self.trainer.accumulate(grads, value)? {
            Some(self.finish_step()?)
        } else {
            None
        };
        if stats.is_some() {
            parallel.sync(self);
        }
        Ok(stats)
    }

    /// The optimizer step of a `train_text_encoder` run: unscale (fp16; a step with non-finite
    /// gradients is skipped, as [`TextToImageTrainer::finish_step`] skips it), clip over all
    /// three LoRAs, AdamW at the scheduled rate.
    pub(crate) fn finish_text_step(&mut self) -> Result<StepStats> {
        let factors = self.lora_factors().ok_or_else(|| {
            Error::invalid_argument("train_text_encoder", "the text encoders are not trained")
        })?;
        let (grads, loss) = self.trainer.take_pending()?;
        let (stats, factors) = self.trainer.step_module(factors, grads, loss)?;
        if let (Some(factors), Some(text)) = (factors, self.text.as_mut()) {
            if let Some(lora) = self.trainer.lora.as_mut() {
                lora.set_factors(factors.unet);
            }
            text.lora.set_factors(factors.text_encoder);
            text.lora_2.set_factors(factors.text_encoder_2);
        }
        Ok(stats)
    }

    /// Whether micro-batches of an unfinished optimizer step are pending.
    pub fn has_pending(&self) -> bool {
        self.trainer.has_pending()
    }

    /// The LoRAs of `text_encoder` and `text_encoder_2`, with `train_text_encoder`.
    pub fn text_encoder_loras(&self) -> Option<[&UNetLora; 2]> {
        self.text.as_ref().map(|t| [&t.lora, &t.lora_2])
    }

    /// Both text encoders with their LoRAs merged, without autodiff (for validation images),
    /// with `train_text_encoder`.
    pub fn inference_text_encoders(&self) -> Option<(CLIPTextModel, CLIPTextModelWithProjection)> {
        let text = self.text.as_ref()?;
        Some((
            text.lora.apply_to(&text.encoder).valid(),
            text.lora_2.apply_to(&text.encoder_2).valid(),
        ))
    }

    /// Write the LoRA file of the run as the script's `save_lora_weights` call does: the UNet
    /// LoRA, and both text encoders' with `train_text_encoder`. `path` is the file, or a folder
    /// that gets [`crate::lora::LORA_WEIGHT_NAME`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`lora`) for a full fine-tuning run; as
    /// [`crate::save_lora_weights`].
    pub fn save_lora_weights(&self, path: impl AsRef<Path>) -> Result<()> {
        let unet = self
            .trainer
            .lora()
            .ok_or_else(|| Error::invalid_argument("lora", "this run trains no LoRA"))?;
        match self.text_encoder_loras() {
            Some([one, two]) => crate::lora::save_lora_weights(path, &[unet, one, two]),
            None => crate::lora::save_lora_weights(path, &[unet]),
        }
    }
}

/// A `train_text_encoder` trainer from the SDXL folder of `config`: the LoRAs initialised from
/// the run's seed (the UNet's), seed + 1 (`text_encoder`'s) and seed + 2 (`text_encoder_2`'s),
/// or read from the LoRA file of a checkpoint.
///
/// # Errors
/// Model loading errors; as [`UNetLora::load_factors`] and [`SdxlTrainer::with_text_encoders`].
pub fn new_sdxl_text_trainer(
    config: &SdxlTrainConfig,
    num_training_steps: usize,
    device: &Device,
    from: Option<&SafetensorsFile>,
) -> Result<SdxlTrainer> {
    let base = &config.text_to_image;
    let inner = device.clone().without_autodiff();
    let lora_config = base
        .lora
        .as_ref()
        .ok_or_else(|| Error::invalid_argument("train_text_encoder", "needs a LoRA run"))?;
    let dir = &base.pretrained_model;
    let unet = UNet2DConditionModel::from_pretrained(dir.join("unet"), &inner)?;
    let one = CLIPTextModel::from_pretrained(dir.join("text_encoder"), &inner)?;
    let two = CLIPTextModelWithProjection::from_pretrained(dir.join("text_encoder_2"), &inner)?;
    let text_config = text_encoder_lora_config(lora_config);
    let seed = base.seed;
    let mut unet_lora = UNetLora::new(&unet, lora_config, seed, &inner)?;
    let mut lora = UNetLora::new_text_encoder(&one, &text_config, seed.wrapping_add(1), &inner)?;
    let mut lora_2 =
        UNetLora::new_text_encoder_2(&two, &text_config, seed.wrapping_add(2), &inner)?;
    if let Some(file) = from {
        unet_lora.load_factors(file, "unet.")?;
        lora.load_factors(file, "text_encoder.")?;
        lora_2.load_factors(file, "text_encoder_2.")?;
    }
    let scheduler = load_noise_scheduler(dir)?;
    SdxlTrainer::with_text_encoders(
        config,
        unet,
        unet_lora,
        one,
        lora,
        two,
        lora_2,
        scheduler,
        num_training_steps,
        device,
    )
}

/// Write a `train_text_encoder` checkpoint into `dir`: the three LoRAs in
/// `pytorch_lora_weights.safetensors`, the AdamW state of [`SdxlLoraFactors`] in `optimizer/`,
/// `training_state.json`; through a temporary sibling renamed at the end.
///
/// # Errors
/// [`Error::InvalidArgument`] (`train_text_encoder`) when the text encoders are not trained;
/// [`Error::Io`] and saving errors.
pub fn save_sdxl_text_checkpoint(trainer: &SdxlTrainer, dir: &Path) -> Result<()> {
    let factors = trainer.lora_factors().ok_or_else(|| {
        Error::invalid_argument("train_text_encoder", "the text encoders are not trained")
    })?;
    save_lora_set_checkpoint(
        trainer.trainer(),
        &factors,
        |path| trainer.save_lora_weights(path),
        dir,
    )
}

/// Rebuild a `train_text_encoder` trainer from a checkpoint [`save_sdxl_text_checkpoint`] wrote.
///
/// # Errors
/// [`Error::Io`] / [`Error::ConfigField`] naming `training_state.json`;
/// [`Error::InvalidArgument`] (`resume_from_checkpoint`) for a checkpoint of another RNG scheme
/// or past `num_training_steps`; (`lora`) when its LoRA file lacks a text encoder's factors (a
/// checkpoint of a run without `train_text_encoder`); as [`new_sdxl_text_trainer`] and
/// [`crate::AdamW::load`].
pub fn load_sdxl_text_checkpoint(
    config: &SdxlTrainConfig,
    dir: &Path,
    num_training_steps: usize,
    device: &Device,
) -> Result<SdxlTrainer> {
    let (state, file) = open_lora_set_checkpoint(dir, num_training_steps)?;
    let mut trainer = new_sdxl_text_trainer(config, num_training_steps, device, Some(&file))?;
    let factors = trainer.lora_factors().ok_or_else(|| {
        Error::invalid_argument("resume_from_checkpoint", "no text-encoder LoRAs to restore")
    })?;
    restore_lora_set_progress(&mut trainer.trainer, &factors, &state, dir)?;
    Ok(trainer)
}
