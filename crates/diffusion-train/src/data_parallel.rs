//! Data-parallel training inside one process, as `accelerate launch --multi_gpu` gives it to
//! diffusers' scripts through PyTorch's DistributedDataParallel.
//!
//! [`DataParallel`] holds a list of devices and one replica of the trained module per device
//! (the first device is the main one and its replica is the trainer's own model). One optimizer
//! step:
//!
//! 1. the global batch is cut into contiguous shards, one per device ([`DataParallel::shards`]);
//! 2. every device runs forward and backward on its shard, each on its own thread
//!    (`std::thread::scope`), or one after the other with [`DataParallel::with_threads`]`(false)`;
//! 3. each shard's loss is weighted by its share of the batch (`b_k / B`, which is `1 / N` for
//!    equal shards, DDP's all-reduce mean), so the summed gradients are the gradients of the
//!    mean loss over the whole batch;
//! 4. the gradients are moved to the main device and summed there (in shard order, so the result
//!    does not depend on thread timing), clipped, and the optimizer steps once on the main device;
//! 5. the updated parameters are copied to every other replica ([`DataParallel::sync`]).
//!
//! As with accelerate, `train_batch_size` is the batch of one device: a run over `N` devices
//! takes `N x train_batch_size` images per optimizer step. The random draws of a step (timesteps,
//! noise, flips) are made for the whole global batch and sliced, so a run over `N` devices takes
//! the same steps as a single-device run with `train_batch_size` set to the global batch, up to
//! the order of floating-point sums (the tests check 1e-6). A batch that the device count does not
//! divide (the last batch of an epoch) is split into shards whose sizes differ by one, with the
//! weights above keeping the result equal to the single-device step; devices beyond the batch size
//! sit that step out.
//!
//! The same device may be listed twice (`cpu,cpu`): each entry gets its own replica. On the CPU
//! that checks correctness; it does not make training faster, since both replicas share the
//! same cores.

use std::ops::Range;

use diffusion_core::burn::module::Module;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Device, Error, Result, parse_device};
use diffusion_models::{UNet2DConditionModel, UNet2DModel};

use crate::lora::LoraFactors;
use crate::mixed_precision::{backward_scale, half_copy};
use crate::objective::NoiseDraws;
use crate::optimizer::{FlatGradients, accumulation_share};
use crate::params;
use crate::text_to_image::{TextToImageTrainer, forward_unet_of, micro_batch_loss};
use crate::trainer::{StepStats, Trainer, training_loss};

/// Parse device names such as `["cpu", "cpu"]` or `["cuda:0", "cuda:1"]`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `devices` when the list or one of its entries is empty;
/// [`Error::UnknownName`] naming the entry that is not a device of this build.
pub fn parse_devices<S: AsRef<str>>(names: &[S]) -> Result<Vec<Device>> {
    if names.is_empty() {
        return Err(Error::invalid_argument("devices", "the list is empty"));
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let name = name.as_ref();
            if name.trim().is_empty() {
                return Err(Error::invalid_argument(
                    "devices",
                    format!("entry {i} is empty"),
                ));
            }
            parse_device(name)
        })
        .collect()
}

/// Split a comma-separated device list (`"cuda:0,cuda:1"`, the CLI's `--devices`) into names,
/// checking each as [`parse_devices`] does.
///
/// # Errors
/// As [`parse_devices`].
pub fn split_device_list(list: &str) -> Result<Vec<String>> {
    let names: Vec<String> = list.split(',').map(|s| s.trim().to_string()).collect();
    parse_devices(&names)?;
    Ok(names)
}

/// The contiguous row ranges of a batch of `batch` rows over `n` devices: sizes differ by at
/// most one (the first shards take the remainder); empty shards are left out, so there are
/// `min(batch, n)` of them.
pub fn shard_ranges(batch: usize, n: usize) -> Vec<Range<usize>> {
    let n = n.max(1);
    let (base, extra) = (batch / n, batch % n);
    let mut ranges = Vec::with_capacity(n);
    let mut begin = 0;
    for k in 0..n {
        let len = base + usize::from(k < extra);
        if len > 0 {
            ranges.push(begin..begin + len);
        }
        begin += len;
    }
    ranges
}

/// One replica of a trained module per device (see the module docs).
#[derive(Debug)]
pub struct DataParallel<M: Module> {
    devices: Vec<Device>,
    /// Replicas on `devices[1..]` (on autodiff devices); the main one is the caller's.
    replicas: Vec<M>,
    threads: bool,
    /// The main module runs under gradient checkpointing: so do the replicas and copies.
    checkpointing: bool,
}

impl<M: Module> DataParallel<M> {
    /// Replicate `main` (the trained module, on `devices[0]` with autodiff) onto the other
    /// devices. Forward and backward run on one thread per device unless
    /// [`Self::with_threads`] turns that off.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when the list is empty.
    pub fn new(devices: Vec<Device>, main: &M) -> Result<Self> {
        if devices.is_empty() {
            return Err(Error::invalid_argument("devices", "the list is empty"));
        }
        let checkpointing = crate::autodiff::is_checkpointed(main);
        let replicas = devices[1..]
            .iter()
            .map(|d| replica(main, d, checkpointing))
            .collect();
        Ok(Self {
            devices,
            replicas,
            threads: true,
            checkpointing,
        })
    }

    /// Run the devices' forward and backward passes on threads (`true`, the default) or one
    /// after the other.
    pub fn with_threads(mut self, threads: bool) -> Self {
        self.threads = threads;
        self
    }

    /// The devices, the main one first.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The number of devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether there are no devices (never true for a built value).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The shards of a batch of `batch` rows (see [`shard_ranges`]).
    pub fn shards(&self, batch: usize) -> Vec<Range<usize>> {
        shard_ranges(batch, self.devices.len())
    }

    /// Copy `main`'s current parameters into every other replica (after an optimizer step).
    pub fn sync(&mut self, main: &M) {
        self.replicas = self.devices[1..]
            .iter()
            .map(|d| replica(main, d, self.checkpointing))
            .collect();
    }

    /// The mean loss over a batch of `batch` rows and its gradients with respect to `main`'s
    /// parameters, gathered on the main device. `loss(model, rows, device)` computes the mean
    /// loss of rows `rows` of the batch with `model` on `device` (inputs must be moved there).
    ///
    /// Shard `k` of `b_k` rows contributes `loss_k * b_k / batch` to the loss and to the
    /// gradients, so the result is the single-device mean loss of the whole batch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `batch` when it is 0; the first error of `loss`.
    pub fn loss_and_gradients<F>(
        &self,
        main: &M,
        batch: usize,
        loss: F,
    ) -> Result<(f32, FlatGradients)>
    where
        F: Fn(&M, Range<usize>, &Device) -> Result<Tensor<1>> + Sync,
    {
        let contexts = vec![(); self.devices.len()];
        self.loss_and_gradients_with(main, batch, contexts, 1.0, |model, (), rows, device| {
            loss(model, rows, device)
        })
    }

    /// [`Self::loss_and_gradients`] with a per-device context and a backward scale.
    ///
    /// `contexts[k]` is handed by value to the pass of device `k` (what a shard needs besides the
    /// trained module: a frozen model forked onto that device with [`Self::frozen_copies`], a
    /// LoRA template); contexts beyond the number of shards are dropped. The backward runs on
    /// the weighted loss times `backward_scale` (an fp16 loss scale; `1.0` otherwise), so the
    /// gradients carry that factor; the returned loss does not.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `batch` when it is 0, or `devices` when there are fewer
    /// contexts than devices; the first error of `loss`.
    pub fn loss_and_gradients_with<C, F>(
        &self,
        main: &M,
        batch: usize,
        contexts: Vec<C>,
        backward_scale: f64,
        loss: F,
    ) -> Result<(f32, FlatGradients)>
    where
        C: Send,
        F: Fn(&M, C, Range<usize>, &Device) -> Result<Tensor<1>> + Sync,
    {
        if batch == 0 {
            return Err(Error::invalid_argument("batch", "an empty batch"));
        }
        if contexts.len() < self.devices.len() {
            return Err(Error::invalid_argument(
                "devices",
                format!(
                    "{} per-device contexts for {} devices",
                    contexts.len(),
                    self.devices.len()
                ),
            ));
        }
        let shards = self.shards(batch);
        // Each shard's thread owns a handle on its replica (modules are `Send`, not `Sync`).
        let jobs: Vec<(usize, M, C, Range<usize>)> = shards
            .into_iter()
            .zip(std::iter::once(main).chain(&self.replicas))
            .zip(contexts)
            .enumerate()
            .map(|(k, ((rows, model), context))| (k, model.clone(), context, rows))
            .collect();
        // The threads borrow the devices and `loss`, never `self` (whose replicas are not `Sync`).
        let devices = &self.devices;
        let loss = &loss;
        let work =
            |k: usize, model: M, context: C, rows: Range<usize>| -> Result<(f32, FlatGradients)> {
                let weight = rows.len() as f64 / batch as f64;
                let value = loss(&model, context, rows, &devices[k])?;
                let value = if weight == 1.0 {
                    value
                } else {
                    value.mul_scalar(weight)
                };
                let scalar = value.clone().inner().into_scalar::<f32>();
                let value = if backward_scale == 1.0 {
                    value
                } else {
                    value.mul_scalar(backward_scale)
                };
                Ok((
                    scalar,
                    FlatGradients::from_backward(&model, value.backward()),
                ))
            };
        let results: Vec<Result<(f32, FlatGradients)>> = if self.threads && jobs.len() > 1 {
            std::thread::scope(|scope| {
                let handles: Vec<_> = jobs
                    .into_iter()
                    .map(|(k, model, context, rows)| {
                        let work = &work;
                        scope.spawn(move || work(k, model, context, rows))
                    })
                    .collect();
                handles
                    .into_iter()
                    // A panic in a device's pass is a bug: pass it on as it is.
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                    .collect()
            })
        } else {
            jobs.into_iter()
                .map(|(k, model, context, rows)| work(k, model, context, rows))
                .collect()
        };
        let main_device = &self.devices[0];
        let mut total_loss = 0.0f32;
        let mut sum: Option<FlatGradients> = None;
        for result in results {
            let (value, grads) = result?;
            total_loss += value;
            let grads = grads.to_device(main_device);
            sum = Some(match sum {
                Some(mut s) => {
                    s.accumulate(grads)?;
                    s
                }
                None => grads,
            });
        }
        let grads = sum.ok_or_else(|| Error::invalid_argument("batch", "an empty batch"))?;
        Ok((total_loss, grads))
    }

    /// One copy of a frozen module per device, the main one (`main` itself, on the main device)
    /// first: the models a trained module needs on every device without training them (the base
    /// UNet under a LoRA). Each copy is forked onto its device with autodiff (and the trained
    /// module's gradient checkpointing) and keeps `main`'s trainability; the copies share
    /// nothing with `main`'s graph.
    pub fn frozen_copies<T: Module>(&self, main: &T) -> Vec<T> {
        std::iter::once(main.clone())
            .chain(self.devices[1..].iter().map(|d| {
                let ad = crate::autodiff::autodiff_device(d, self.checkpointing);
                crate::autodiff::checkpointed(main.clone().fork(&ad), &ad)
            }))
            .collect()
    }
}

/// `main` on `device` (with autodiff, and balanced gradient checkpointing when `checkpointing`)
/// with fresh leaves for its parameters, so the replica's graph shares nothing with the main
/// one's even when both are on the same device.
fn replica<M: Module>(main: &M, device: &Device, checkpointing: bool) -> M {
    let ad = crate::autodiff::autodiff_device(device, checkpointing);
    let forked = main.clone().fork(&ad);
    let values = params::values(&forked).into_iter().map(Some).collect();
    crate::autodiff::checkpointed(params::replace(forked, values), &ad)
}

impl Trainer {
    /// [`Trainer::step`] over the devices of `parallel` (built from this trainer's model): the
    /// batch is sharded, each device computes its part of the loss and gradients, and the
    /// optimizer steps once on the main device; the replicas are synced afterwards.
    ///
    /// # Shapes
    /// - `x0`, `noise`: `[B, C, H, W]` (the global batch)
    /// - `timesteps`: `B` values
    ///
    /// Under mixed precision every device runs on a half copy of its replica, and under fp16
    /// each shard's backward runs on its loss times the current loss scale; the summed
    /// gradients are unscaled and checked once, as DDP with a `GradScaler` does.
    ///
    /// # Errors
    /// As [`training_loss`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut DataParallel<UNet2DModel>,
        x0: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[usize],
    ) -> Result<StepStats> {
        let [b, ..] = x0.dims();
        if timesteps.len() != b || noise.dims() != x0.dims() {
            return Err(Error::invalid_argument(
                "timesteps",
                format!(
                    "{} timesteps and noise {:?} for a batch of {:?}",
                    timesteps.len(),
                    noise.dims(),
                    x0.dims()
                ),
            ));
        }
        let lr = self.lr_schedule.lr(self.global_step - self.skipped_steps);
        let scheduler = &self.scheduler;
        let dtype = self.config.mixed_precision.dtype();
        let scale = backward_scale(self.grad_scaler.as_ref());
        let contexts = vec![(); parallel.len()];
        let (loss_value, grads) = parallel.loss_and_gradients_with(
            &self.model,
            b,
            contexts,
            scale,
            |model, (), rows, device| {
                let x0 = x0
                    .clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device);
                let noise = noise
                    .clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device);
                match dtype {
                    Some(dtype) => {
                        let half = half_copy(model, dtype)?;
                        training_loss(&half, scheduler, x0, noise, &timesteps[rows])
                    }
                    None => training_loss(model, scheduler, x0, noise, &timesteps[rows]),
                }
            },
        )?;
        // From here on as in `Trainer::step`: unscale, clip, one AdamW step, EMA.
        let stats = self.apply_gradients(lr, loss_value, grads)?;
        parallel.sync(&self.model);
        Ok(stats)
    }
}

/// The replicas of what a [`TextToImageTrainer`] trains, one per device: the UNet (full
/// fine-tuning), or the LoRA factors together with a copy of the frozen UNet per device (LoRA).
/// Built with [`TextToImageTrainer::data_parallel`].
#[derive(Debug)]
pub enum TextToImageParallel {
    /// Full fine-tuning: one UNet replica per device.
    Full(DataParallel<UNet2DConditionModel>),
    /// LoRA: one replica of the factors per device, and the frozen base UNet on every device
    /// (the main device's first).
    Lora {
        /// The factors' replicas.
        factors: DataParallel<LoraFactors>,
        /// The frozen UNet per device.
        bases: Vec<UNet2DConditionModel>,
    },
}

impl TextToImageParallel {
    /// The devices, the main one first.
    pub fn devices(&self) -> &[Device] {
        match self {
            Self::Full(p) => p.devices(),
            Self::Lora { factors, .. } => factors.devices(),
        }
    }

    /// Run the devices' passes on threads (`true`, the default) or one after the other.
    pub fn with_threads(self, threads: bool) -> Self {
        match self {
            Self::Full(p) => Self::Full(p.with_threads(threads)),
            Self::Lora { factors, bases } => Self::Lora {
                factors: factors.with_threads(threads),
                bases,
            },
        }
    }

    /// Copy `trainer`'s current trained parameters into every other replica (after an
    /// optimizer step; [`TextToImageTrainer::step_data_parallel`] does it itself).
    pub fn sync(&mut self, trainer: &TextToImageTrainer) {
        match (self, trainer.lora()) {
            (Self::Full(p), _) => p.sync(trainer.unet()),
            (Self::Lora { factors, .. }, Some(lora)) => factors.sync(lora.factors()),
            // `data_parallel` pairs a LoRA trainer with `Lora` replicas only.
            (Self::Lora { .. }, None) => {}
        }
    }
}

impl TextToImageTrainer {
    /// Replicate what this trainer trains onto `devices` (the first must be the trainer's own
    /// device, with the trained module on it): the UNet for full fine-tuning, the LoRA factors
    /// and a copy of the frozen UNet for a LoRA.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when the list is empty.
    pub fn data_parallel(&self, devices: Vec<Device>) -> Result<TextToImageParallel> {
        Ok(match self.lora() {
            None => TextToImageParallel::Full(DataParallel::new(devices, self.unet())?),
            Some(lora) => {
                let factors = DataParallel::new(devices, lora.factors())?;
                let bases = factors.frozen_copies(self.unet());
                TextToImageParallel::Lora { factors, bases }
            }
        })
    }

    /// [`TextToImageTrainer::step`] over the devices of `parallel` (built by
    /// [`Self::data_parallel`]): the micro-batch is sharded, each device computes its part of
    /// the loss ([`crate::objective::conditional_loss`], or the flow-matching loss) and of the gradients, and these
    /// are gathered on the main device and accumulated; after the last micro-batch the
    /// optimizer steps once there and the replicas are synced. Under `fp16` every shard's
    /// backward runs on its loss times the current loss scale and the summed gradients are
    /// unscaled (and checked) once, as DDP with a `GradScaler` does.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`, `encoder_hidden_states`: `[B, S, D]` (the global batch)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `timesteps` when the draws do not fit the batch; as
    /// [`Self::step_data_parallel_by`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut TextToImageParallel,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        let [b, ..] = latents.dims();
        if draws.timesteps.len() != b {
            return Err(Error::invalid_argument(
                "timesteps",
                format!("{} timesteps for a batch of {b}", draws.timesteps.len()),
            ));
        }
        // Owned copies: the step below borrows the trainer mutably.
        let (scheduler, objective, flow) = (
            self.scheduler.clone(),
            self.objective.clone(),
            self.flow_matching.clone(),
        );
        self.step_data_parallel_by(parallel, b, |unet, rows, device| {
            let shard = |t: &Tensor<4>| {
                t.clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device)
            };
            let shard_draws = NoiseDraws {
                noise: shard(&draws.noise),
                offset_noise: draws.offset_noise.as_ref().map(shard),
                perturbation: draws.perturbation.as_ref().map(shard),
                timesteps: draws.timesteps[rows.clone()].to_vec(),
            };
            micro_batch_loss(
                unet,
                &scheduler,
                &objective,
                flow.as_ref(),
                shard(&latents),
                encoder_hidden_states
                    .clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device),
                &shard_draws,
            )
        })
    }

    /// The data-parallel step on a loss the caller computes per shard (DreamBooth's
    /// prior-preservation loss): `loss(unet, rows, device)` is the mean loss of rows `rows` of
    /// the global batch of `batch` rows, computed with `unet` (the device's replica with the
    /// LoRA applied and, under mixed precision, cast to the half dtype) on `device`. Backward,
    /// gradient accumulation, fp16 loss scaling and the optimizer step as
    /// [`Self::step_data_parallel`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` when `parallel` does not fit this trainer
    /// (full replicas for a LoRA trainer or the reverse); the first error of `loss`; as
    /// [`Self::finish_step`].
    pub fn step_data_parallel_by<F>(
        &mut self,
        parallel: &mut TextToImageParallel,
        batch: usize,
        loss: F,
    ) -> Result<Option<StepStats>>
    where
        F: Fn(&UNet2DConditionModel, Range<usize>, &Device) -> Result<Tensor<1>> + Sync,
    {
        let k = self.config.gradient_accumulation_steps.max(1);
        let dtype = self.config.mixed_precision().dtype();
        let scale = backward_scale(self.grad_scaler.as_ref());
        // The per-shard loss, divided as `step_loss` divides it under accumulation.
        let shard_loss = |unet: &UNet2DConditionModel, rows: Range<usize>, device: &Device| {
            Ok(accumulation_share(loss(unet, rows, device)?, k))
        };
        let (value, grads) = match (&*parallel, self.lora()) {
            (TextToImageParallel::Full(p), None) => {
                let contexts = vec![(); p.len()];
                p.loss_and_gradients_with(
                    &self.unet,
                    batch,
                    contexts,
                    scale,
                    |unet, (), rows, device| {
                        shard_loss(&forward_unet_of(unet, None, dtype)?, rows, device)
                    },
                )?
            }
            (TextToImageParallel::Lora { factors, bases }, Some(lora)) => {
                // Each device gets the LoRA's layout with its own replica of the factors.
                let contexts = bases.iter().map(|b| (lora.clone(), b.clone())).collect();
                factors.loss_and_gradients_with(
                    lora.factors(),
                    batch,
                    contexts,
                    scale,
                    |replica, (mut layout, base), rows, device| {
                        layout.set_factors(replica.clone());
                        shard_loss(&forward_unet_of(&base, Some(&layout), dtype)?, rows, device)
                    },
                )?
            }
            _ => {
                return Err(Error::invalid_argument(
                    "devices",
                    "the replicas were not built for this trainer (full vs LoRA); use \
                     TextToImageTrainer::data_parallel",
                ));
            }
        };
        let stats = self.accumulate_micro_batch(grads, value)?;
        if stats.is_some() {
            parallel.sync(self);
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_and_balanced() {
        assert_eq!(shard_ranges(6, 2), [0..3, 3..6]);
        assert_eq!(shard_ranges(5, 2), [0..3, 3..5]);
        assert_eq!(shard_ranges(7, 3), [0..3, 3..5, 5..7]);
        assert_eq!(shard_ranges(2, 3), [0..1, 1..2]);
        assert_eq!(shard_ranges(4, 1), vec![Range { start: 0, end: 4 }]);
    }

    #[test]
    fn device_lists_are_checked_by_name() {
        assert_eq!(split_device_list("cpu, cpu").unwrap(), ["cpu", "cpu"]);
        let err = split_device_list("cpu,tpu:3").unwrap_err().to_string();
        assert!(err.contains("tpu:3"), "{err}");
        let err = split_device_list("cpu,,cpu").unwrap_err().to_string();
        assert!(err.contains("devices") && err.contains("entry 1"), "{err}");
        let err = parse_devices::<&str>(&[]).unwrap_err().to_string();
        assert!(err.contains("devices"), "{err}");
    }
}
