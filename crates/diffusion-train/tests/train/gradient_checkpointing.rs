//! Gradient checkpointing (`gradient_checkpointing: true`, burn's balanced strategy): the graph
//! really runs under it, and the loss, every gradient and the parameters after two steps equal
//! those of the run without it, for the unconditional `UNet2DModel` trainer and for full and
//! LoRA text-to-image training of the tiny SD1 UNet.

use std::path::PathBuf;

use diffusion_core::Device;
use diffusion_core::burn::tensor::{GradientCheckpointingStrategy, Tensor};
use diffusion_core::weights::{NamedTensor, WeightSource};
use diffusion_models::{ModelMixin, UNet2DConditionModel, UNet2DModel, state_dict};
use diffusion_train::autodiff::autodiff_device;
use diffusion_train::{
    FlatGradients, LoraTrainConfig, LrScheduleKind, NoiseDraws, TextToImageConfig,
    TextToImageTrainer, TrainConfig, Trainer, UNetLora, load_noise_scheduler, training_loss,
};

use crate::{device, fixtures, max_abs_diff, sd1, tensor};

fn strategy(gradient_checkpointing: bool) -> Option<GradientCheckpointingStrategy> {
    Some(if gradient_checkpointing {
        GradientCheckpointingStrategy::Balanced
    } else {
        GradientCheckpointingStrategy::Disabled
    })
}

/// Worst difference between two state dicts with the same keys in the same order.
fn worst(a: &[NamedTensor], b: &[NamedTensor]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.key, y.key);
            max_abs_diff(&x.values, &y.values)
        })
        .fold(0.0, f32::max)
}

#[test]
fn autodiff_device_sets_the_strategy() {
    for gc in [false, true] {
        assert_eq!(
            autodiff_device(&device(), gc).gradient_checkpointing_strategy(),
            strategy(gc)
        );
    }
    // Without the flag, an autodiff device keeps the strategy it has.
    let balanced = autodiff_device(&device(), true);
    assert_eq!(
        autodiff_device(&balanced, false).gradient_checkpointing_strategy(),
        strategy(true)
    );
}

fn steps_source() -> WeightSource {
    WeightSource::open(fixtures().join("steps.safetensors")).unwrap()
}

fn timesteps(source: &WeightSource, step: usize) -> Vec<usize> {
    let (values, _) = source.read_f32(&format!("timesteps/{step}")).unwrap();
    values.iter().map(|&t| t as usize).collect()
}

/// Loss, flattened first-step gradients and the parameters after two steps of the tiny
/// unconditional UNet of fixtures/train.
fn unconditional_run(gc: bool) -> (f32, Vec<f32>, Vec<NamedTensor>) {
    let config = TrainConfig {
        learning_rate: 1e-3,
        lr_warmup_steps: 0,
        adam_epsilon: 1e-6,
        show_progress: false,
        gradient_checkpointing: gc,
        ..TrainConfig::default()
    };
    let dev = device();
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &dev).unwrap();
    let mut trainer = Trainer::new(&config, model, 10, &dev).unwrap();
    let weight_device = trainer.model().conv_in.weight.val().device();
    assert_eq!(
        weight_device.gradient_checkpointing_strategy(),
        strategy(gc)
    );

    let source = steps_source();
    // Inputs of the graph come from the same autodiff device (burn refuses mixed strategies).
    let ad = autodiff_device(&dev, gc);
    let x0: Tensor<4> = tensor(&source, "x0", &ad);
    let noise: Tensor<4> = tensor(&source, "noise/0", &ad);
    let loss = training_loss(
        trainer.model(),
        trainer.scheduler(),
        x0.clone(),
        noise,
        &timesteps(&source, 0),
    )
    .unwrap();
    assert_eq!(
        loss.device().gradient_checkpointing_strategy(),
        strategy(gc)
    );
    let value = loss.clone().inner().into_scalar::<f32>();
    let grads = FlatGradients::from_backward(trainer.model(), loss.backward());
    let flat = grads
        .tensors()
        .iter()
        .flatten()
        .flat_map(|g| diffusion_core::tensor::to_vec(g.clone()))
        .collect();
    for step in 0..2 {
        let noise: Tensor<4> = tensor(&source, &format!("noise/{step}"), &ad);
        trainer
            .step(x0.clone(), noise, &timesteps(&source, step))
            .unwrap();
    }
    (value, flat, state_dict(trainer.model()))
}

#[test]
fn unconditional_steps_equal_without_checkpointing() {
    let (loss, grads, params) = unconditional_run(false);
    let (loss_gc, grads_gc, params_gc) = unconditional_run(true);
    let grad_diff = max_abs_diff(&grads, &grads_gc);
    let param_diff = worst(&params, &params_gc);
    eprintln!(
        "unconditional: loss {loss} vs {loss_gc}, max grad diff {grad_diff:e}, \
         max param diff after 2 steps {param_diff:e}"
    );
    // Recomputation repeats the same kernels on the same inputs: bit for bit.
    assert_eq!(loss.to_bits(), loss_gc.to_bits());
    assert_eq!(grad_diff, 0.0);
    assert_eq!(param_diff, 0.0);
}

fn text_to_image_root() -> PathBuf {
    fixtures().join("text_to_image")
}

/// The `full_epsilon` / `lora` case draws of gen_train_text_to_image.py's fixture.
fn draws(source: &WeightSource, name: &str, step: usize, dev: &Device) -> NoiseDraws {
    let (t, _) = source
        .read_f32(&format!("{name}/timesteps/{step}"))
        .unwrap();
    NoiseDraws {
        noise: tensor(source, &format!("{name}/noise/{step}"), dev),
        offset_noise: None,
        perturbation: None,
        timesteps: t.iter().map(|&v| v as usize).collect(),
    }
}

/// Loss, named first-step gradients and the trained parameters after two steps of full
/// fine-tuning or LoRA training of the tiny SD1 UNet.
fn text_to_image_run(lora: bool, gc: bool) -> (f32, Vec<NamedTensor>, Vec<NamedTensor>) {
    let dev = device();
    let config = TextToImageConfig {
        pretrained_model: sd1(),
        learning_rate: 1e-3,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        max_grad_norm: Some(1.0),
        lora: lora.then(|| LoraTrainConfig {
            rank: 4,
            alpha: Some(4.0),
            ..LoraTrainConfig::default()
        }),
        show_progress: false,
        gradient_checkpointing: gc,
        ..TextToImageConfig::default()
    };
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let unet_lora = config
        .lora
        .as_ref()
        .map(|l| UNetLora::new(&unet, l, 7, &dev).unwrap());
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let mut trainer =
        TextToImageTrainer::new(&config, unet, unet_lora, scheduler, 2, &dev).unwrap();
    // A LoRA's frozen base UNet has no autodiff; the factors carry the strategy (the loss
    // below shows it).
    let weight_device = trainer.unet().conv_in.weight.val().device();
    let want = if lora { None } else { strategy(gc) };
    assert_eq!(weight_device.gradient_checkpointing_strategy(), want);

    let source = WeightSource::open(text_to_image_root().join("steps.safetensors")).unwrap();
    let name = if lora { "lora" } else { "full_epsilon" };
    let latents: Tensor<4> = tensor(&source, "latents", &dev);
    let states: Tensor<3> = tensor(&source, "encoder_hidden_states", &dev);
    let loss = trainer
        .loss(
            latents.clone(),
            states.clone(),
            &draws(&source, name, 0, &dev),
        )
        .unwrap();
    assert_eq!(
        loss.device().gradient_checkpointing_strategy(),
        strategy(gc)
    );
    let value = loss.clone().inner().into_scalar::<f32>();
    let grads = trainer.gradients(loss);
    let named = match trainer.lora() {
        Some(l) => l.gradient_state_dict(&grads),
        None => grads.state_dict(trainer.unet()),
    };
    for step in 0..2 {
        trainer
            .step(
                latents.clone(),
                states.clone(),
                &draws(&source, name, step, &dev),
            )
            .unwrap()
            .expect("no accumulation: every micro-batch is a step");
    }
    let params = match trainer.lora() {
        Some(l) => l.state_dict(),
        None => state_dict(trainer.unet()),
    };
    (value, named, params)
}

#[test]
fn text_to_image_steps_equal_without_checkpointing() {
    for lora in [false, true] {
        let (loss, grads, params) = text_to_image_run(lora, false);
        let (loss_gc, grads_gc, params_gc) = text_to_image_run(lora, true);
        let grad_diff = worst(&grads, &grads_gc);
        let param_diff = worst(&params, &params_gc);
        let kind = if lora { "lora" } else { "full" };
        eprintln!(
            "text-to-image {kind}: loss {loss} vs {loss_gc}, max grad diff {grad_diff:e}, \
             max param diff after 2 steps {param_diff:e}"
        );
        assert_eq!(loss.to_bits(), loss_gc.to_bits(), "{kind}: loss");
        assert_eq!(grad_diff, 0.0, "{kind}: gradients");
        assert_eq!(param_diff, 0.0, "{kind}: parameters");
    }
}

/// ControlNet, textual inversion and InstructPix2Pix under gradient checkpointing: the loss runs
/// on a checkpointing graph, and two steps (loss, gradient norm, trained weights) equal those
/// without it bit for bit.
#[test]
fn controlnet_textual_inversion_and_instruct_pix2pix_equal_without_checkpointing() {
    use diffusion_models::ControlNetModel;
    use diffusion_train::{ControlNetTrainConfig, ControlNetTrainer, MixedPrecision};

    let dev = device();
    // ControlNet on the fixture of gen_train_controlnet.py.
    let controlnet_run = |gc: bool| {
        let root = fixtures().join("controlnet");
        let config = ControlNetTrainConfig {
            learning_rate: 1e-3,
            lr_warmup_steps: 0,
            gradient_checkpointing: gc,
            ..ControlNetTrainConfig::default()
        };
        let controlnet = ControlNetModel::from_pretrained(root.join("controlnet"), &dev).unwrap();
        let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
        let scheduler = load_noise_scheduler(&sd1()).unwrap();
        let mut t = ControlNetTrainer::new(&config, controlnet, unet, scheduler, 2, &dev).unwrap();
        let source = WeightSource::open(root.join("steps.safetensors")).unwrap();
        let latents: Tensor<4> = tensor(&source, "latents", &dev);
        let states: Tensor<3> = tensor(&source, "encoder_hidden_states", &dev);
        let image: Tensor<4> = tensor(&source, "conditioning_pixel_values", &dev);
        let draws = |s: usize| NoiseDraws {
            noise: tensor(&source, &format!("noise/{s}"), &dev),
            offset_noise: None,
            perturbation: None,
            timesteps: source
                .read_f32(&format!("timesteps/{s}"))
                .unwrap()
                .0
                .iter()
                .map(|&v| v as usize)
                .collect(),
        };
        let loss = t
            .loss(latents.clone(), states.clone(), image.clone(), &draws(0))
            .unwrap();
        assert_eq!(
            loss.device().gradient_checkpointing_strategy(),
            strategy(gc)
        );
        let stats: Vec<(u32, u32)> = (0..2)
            .map(|s| {
                let st = t
                    .step(latents.clone(), states.clone(), image.clone(), &draws(s))
                    .unwrap()
                    .unwrap();
                (st.loss.to_bits(), st.grad_norm.to_bits())
            })
            .collect();
        (stats, state_dict(t.controlnet()))
    };
    let (a, wa) = controlnet_run(false);
    let (b, wb) = controlnet_run(true);
    assert_eq!(a, b, "ControlNet: losses or gradient norms");
    assert_eq!(worst(&wa, &wb), 0.0, "ControlNet: weights");

    // Textual inversion (the fixture of gen_train_dreambooth_ti.py).
    let ti_run = |gc: bool| {
        use crate::mixed_precision::textual_inversion::{draws, source, ti_trainer_with};
        let (mut t, ids) = ti_trainer_with(MixedPrecision::No, gc);
        let source = source();
        let latents: Tensor<4> = tensor(&source, "latents", &dev);
        let loss = t
            .loss(latents.clone(), ids.clone(), &draws(&source))
            .unwrap();
        assert_eq!(
            loss.device().gradient_checkpointing_strategy(),
            strategy(gc)
        );
        let stats: Vec<(u32, u32)> = (0..2)
            .map(|_| {
                let st = t
                    .step(latents.clone(), ids.clone(), &draws(&source))
                    .unwrap()
                    .unwrap();
                (st.loss.to_bits(), st.grad_norm.to_bits())
            })
            .collect();
        (stats, diffusion_core::tensor::to_vec(t.learned_embeds()))
    };
    let (a, ra) = ti_run(false);
    let (b, rb) = ti_run(true);
    assert_eq!(a, b, "textual inversion: losses or gradient norms");
    assert_eq!(max_abs_diff(&ra, &rb), 0.0, "textual inversion: rows");

    // InstructPix2Pix (the fixture of gen_train_instruct_pix2pix.py).
    let ip2p_run = |gc: bool| {
        let (mut t, batch, draws) =
            crate::instruct_pix2pix::fixture_trainer_with(MixedPrecision::No, gc);
        let loss = t.loss(&batch, &draws).unwrap();
        assert_eq!(
            loss.device().gradient_checkpointing_strategy(),
            strategy(gc)
        );
        let stats: Vec<(u32, u32)> = (0..2)
            .map(|_| {
                let st = t.step(&batch, &draws).unwrap().unwrap();
                (st.loss.to_bits(), st.grad_norm.to_bits())
            })
            .collect();
        (stats, state_dict(t.inner().unet()))
    };
    let (a, wa) = ip2p_run(false);
    let (b, wb) = ip2p_run(true);
    assert_eq!(a, b, "InstructPix2Pix: losses or gradient norms");
    assert_eq!(worst(&wa, &wb), 0.0, "InstructPix2Pix: weights");
}

/// Data-parallel under gradient checkpointing: every replica (not only the main device's)
/// carries the balanced strategy, and the sharded loss and gradients equal those without it
/// bit for bit.
#[test]
fn data_parallel_replicas_checkpoint_too() {
    use diffusion_train::DataParallel;
    let source = steps_source();
    let run = |gc: bool| {
        let config = TrainConfig {
            learning_rate: 1e-3,
            lr_warmup_steps: 0,
            show_progress: false,
            gradient_checkpointing: gc,
            ..TrainConfig::default()
        };
        let dev = device();
        let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &dev).unwrap();
        let trainer = Trainer::new(&config, model, 10, &dev).unwrap();
        let dp = DataParallel::new(vec![dev.clone(); 2], trainer.model())
            .unwrap()
            .with_threads(false);
        let x0: Tensor<4> = tensor(&source, "x0", &dev);
        let noise: Tensor<4> = tensor(&source, "noise/0", &dev);
        let ts = timesteps(&source, 0);
        let b = x0.dims()[0];
        let (loss, grads) = dp
            .loss_and_gradients(trainer.model(), b, |model, rows, device| {
                let weight = model.conv_in.weight.val();
                assert_eq!(
                    weight.device().gradient_checkpointing_strategy(),
                    strategy(gc)
                );
                let ad = autodiff_device(device, gc);
                let shard =
                    |t: &Tensor<4>| t.clone().narrow(0, rows.start, rows.len()).to_device(&ad);
                training_loss(
                    model,
                    trainer.scheduler(),
                    shard(&x0),
                    shard(&noise),
                    &ts[rows.clone()],
                )
            })
            .unwrap();
        let flat: Vec<f32> = grads
            .tensors()
            .iter()
            .flatten()
            .flat_map(|g| diffusion_core::tensor::to_vec(g.clone()))
            .collect();
        (loss, flat)
    };
    let (loss, grads) = run(false);
    let (loss_gc, grads_gc) = run(true);
    assert_eq!(loss.to_bits(), loss_gc.to_bits());
    assert_eq!(max_abs_diff(&grads, &grads_gc), 0.0);
}
