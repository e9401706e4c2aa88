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

use crate::mixed_precision::MixedPrecision;
use crate::objective::{NoiseDraws, conditional_loss};
use crate::optimizer::FlatGradients;
use crate::params;
use crate::text_to_image::TextToImageTrainer;
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
        let replicas = devices[1..].iter().map(|d| replica(main, d)).collect();
        Ok(Self {
            devices,
            replicas,
            threads: true,
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
        self.replicas = self.devices[1..].iter().map(|d| replica(main, d)).collect();
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
        if batch == 0 {
            return Err(Error::invalid_argument("batch", "an empty batch"));
        }
        let shards = self.shards(batch);
        // Each shard's thread owns a handle on its replica (modules are `Send`, not `Sync`).
        let jobs: Vec<(usize, M, Range<usize>)> = shards
            .into_iter()
            .zip(std::iter::once(main).chain(&self.replicas))
            .enumerate()
            .map(|(k, (rows, model))| (k, model.clone(), rows))
            .collect();
        // The threads borrow the devices and `loss`, never `self` (whose replicas are not `Sync`).
        let devices = &self.devices;
        let loss = &loss;
        let work = |k: usize, model: M, rows: Range<usize>| -> Result<(f32, FlatGradients)> {
            let weight = rows.len() as f64 / batch as f64;
            let value = loss(&model, rows, &devices[k])?;
            let value = if weight == 1.0 {
                value
            } else {
                value.mul_scalar(weight)
            };
            let scalar = value.clone().inner().into_scalar::<f32>();
            Ok((
                scalar,
                FlatGradients::from_backward(&model, value.backward()),
            ))
        };
        let results: Vec<Result<(f32, FlatGradients)>> = if self.threads && jobs.len() > 1 {
            std::thread::scope(|scope| {
                let handles: Vec<_> = jobs
                    .into_iter()
                    .map(|(k, model, rows)| {
                        let work = &work;
                        scope.spawn(move || work(k, model, rows))
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
                .map(|(k, model, rows)| work(k, model, rows))
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
}

/// `main` on `device` (with autodiff) with fresh leaves for its parameters, so the replica's
/// graph shares nothing with the main one's even when both are on the same device.
fn replica<M: Module>(main: &M, device: &Device) -> M {
    let forked = main.clone().fork(&device.clone().autodiff());
    let values = params::values(&forked).into_iter().map(Some).collect();
    params::replace(forked, values)
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
    /// # Errors
    /// As [`training_loss`]; [`Error::InvalidArgument`] naming `devices` under mixed precision
    /// (data-parallel steps run in f32).
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
        if self.config.mixed_precision != MixedPrecision::No {
            return Err(Error::invalid_argument(
                "devices",
                "data-parallel training runs in f32 only; set mixed_precision to `no`",
            ));
        }
        let lr = self.lr_schedule.lr(self.global_step - self.skipped_steps);
        let scheduler = &self.scheduler;
        let (loss_value, mut grads) =
            parallel.loss_and_gradients(&self.model, b, |model, rows, device| {
                let x0 = x0
                    .clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device);
                let noise = noise
                    .clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device);
                training_loss(model, scheduler, x0, noise, &timesteps[rows])
            })?;
        // From here on as in `Trainer::step`: clip, one AdamW step, EMA.
        let grad_norm = match self.config.max_grad_norm {
            Some(max_norm) => grads.clip_grad_norm(max_norm),
            None => grads.total_norm(),
        };
        let model = self.model.clone();
        self.model = self.optimizer.step(lr, model, grads)?;
        parallel.sync(&self.model);
        self.last_step_skipped = false;
        let ema_decay = match &mut self.ema {
            Some(ema) => Some(ema.step(&self.model)?),
            None => None,
        };
        self.global_step += 1;
        Ok(StepStats {
            step: self.global_step,
            loss: loss_value,
            grad_norm,
            lr,
            ema_decay,
        })
    }
}

impl TextToImageTrainer {
    /// [`TextToImageTrainer::step`] over the devices of `parallel` (built from this trainer's
    /// UNet): the micro-batch is sharded, each device computes its part of the loss of
    /// [`conditional_loss`] and of the gradients, and these are gathered on the main device and
    /// accumulated; after the last micro-batch the optimizer steps once there and the replicas
    /// are synced. Full fine-tuning in f32 only.
    ///
    /// # Shapes
    /// - `latents`: `[B, C, H, W]`, `encoder_hidden_states`: `[B, S, D]` (the global batch)
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `devices` for a LoRA or mixed-precision trainer; as
    /// [`conditional_loss`].
    pub fn step_data_parallel(
        &mut self,
        parallel: &mut DataParallel<UNet2DConditionModel>,
        latents: Tensor<4>,
        encoder_hidden_states: Tensor<3>,
        draws: &NoiseDraws,
    ) -> Result<Option<StepStats>> {
        if self.lora.is_some() || self.config.mixed_precision() != MixedPrecision::No {
            return Err(Error::invalid_argument(
                "devices",
                "data-parallel training is full fine-tuning in f32 only (no LoRA, \
                 mixed_precision `no`)",
            ));
        }
        let [b, ..] = latents.dims();
        if draws.timesteps.len() != b {
            return Err(Error::invalid_argument(
                "timesteps",
                format!("{} timesteps for a batch of {b}", draws.timesteps.len()),
            ));
        }
        let k = self.config.gradient_accumulation_steps.max(1);
        let (scheduler, objective) = (&self.scheduler, &self.objective);
        let (value, grads) = parallel.loss_and_gradients(&self.unet, b, |unet, rows, device| {
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
            let loss = conditional_loss(
                unet,
                scheduler,
                objective,
                shard(&latents),
                encoder_hidden_states
                    .clone()
                    .narrow(0, rows.start, rows.len())
                    .to_device(device),
                &shard_draws,
            )?;
            Ok(if k > 1 {
                loss.div_scalar(k as f64)
            } else {
                loss
            })
        })?;
        let stats = self.accumulate_micro_batch(grads, value)?;
        if stats.is_some() {
            parallel.sync(&self.unet);
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
