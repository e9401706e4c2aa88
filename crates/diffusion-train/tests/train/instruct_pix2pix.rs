//! InstructPix2Pix training of the tiny SD1 pipeline against PyTorch/diffusers
//! (fixtures/oracle/gen_train_instruct_pix2pix.py): the script's preprocessing, VAE latents
//! (`sample()` for the edited images, `mode()` for the originals), the widened `conv_in`, the
//! conditioning-dropout masks, and two full steps (loss, every gradient including `conv_in`'s,
//! every updated parameter).

use std::path::{Path, PathBuf};

use diffusion_core::burn::tensor::DType;
use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_core::image::{load_image, read_png_text};
use diffusion_core::weights::WeightSource;
use diffusion_core::{Error, TorchGenerator};
use diffusion_models::{ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_train::mixed_precision::param_dtypes;
use diffusion_train::text_to_image_run::FrozenComponents;
use diffusion_train::validation::{STRIP_FILE, validation_dir, validation_path};
use diffusion_train::{
    EditBatch, EditDataset, GradScaler, GradScalerConfig, InstructPix2PixConfig,
    InstructPix2PixTrainer, LrScheduleKind, MixedPrecision, NoiseDraws, conditioning_masks,
    load_noise_scheduler, train_instruct_pix2pix, widen_conv_in,
};
use serde_json::Value;

use crate::{
    compare_to_fixture as compare, copy_dir, device, fixtures, max_abs_diff, number as f, read,
    sd1, tensor,
};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("instruct_pix2pix")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

fn source() -> WeightSource {
    WeightSource::open(root().join("steps.safetensors")).unwrap()
}

fn config(hp: &Value) -> InstructPix2PixConfig {
    InstructPix2PixConfig {
        pretrained_model: sd1(),
        train_data_dir: root().join("data"),
        resolution: 32,
        random_flip: true,
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        conditioning_dropout_prob: Some(f(&hp["conditioning_dropout_prob"])),
        show_progress: false,
        ..InstructPix2PixConfig::default()
    }
}

fn diff_to(ours: Vec<f32>, source: &WeightSource, key: &str) -> f32 {
    let (want, _) = source.read_f32(key).unwrap();
    max_abs_diff(&ours, &want)
}

#[test]
fn data_latents_and_masks_match_diffusers() {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = source();
    let config = config(hp);
    let data = EditDataset::from_folder(root().join("data"), &config).unwrap();
    assert_eq!(data.len(), 4);
    assert_eq!(data.example(1).prompt, "turn the sky green");
    let flips: Vec<bool> = hp["flips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_bool().unwrap())
        .collect();
    let (original, edited) = data.pixel_values(&[0, 1, 2, 3], &flips).unwrap();
    let d = diff_to(original.clone(), &source, "original_pixel_values").max(diff_to(
        edited.clone(),
        &source,
        "edited_pixel_values",
    ));
    assert!(d <= 1e-6, "pixel values differ by {d}");

    let dev = device();
    let frozen = FrozenComponents::load(&sd1(), &dev).unwrap();
    let pixels = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [4, 3, 32, 32]), &dev);
    let dist = frozen.vae.encode(pixels(edited)).unwrap();
    let eps: Tensor<4> = tensor(&source, "posterior_noise", &dev);
    let latents = dist
        .mean
        .add(dist.std.mul(eps))
        .mul_scalar(frozen.vae.config().scaling_factor);
    let d = diff_to(diffusion_core::tensor::to_vec(latents), &source, "latents");
    eprintln!("latents: {d:e}");
    assert!(d <= TOL, "latents differ by {d}");
    let embeds = frozen.vae.encode(pixels(original)).unwrap().mode();
    let d = diff_to(
        diffusion_core::tensor::to_vec(embeds),
        &source,
        "original_image_embeds",
    );
    eprintln!("original_image_embeds: {d:e}");
    assert!(d <= TOL, "original image embeds differ by {d}");
    let prompts: Vec<&str> = (0..4).map(|i| data.example(i).prompt.as_str()).collect();
    let states = frozen.encode_captions(&prompts).unwrap();
    let d = diff_to(
        diffusion_core::tensor::to_vec(states),
        &source,
        "encoder_hidden_states",
    );
    assert!(d <= TOL, "encoder_hidden_states differ by {d}");
    let null = frozen.encode_captions(&[""]).unwrap();
    let d = diff_to(
        diffusion_core::tensor::to_vec(null),
        &source,
        "null_conditioning",
    );
    assert!(d <= TOL, "null conditioning differs by {d}");

    // The four dropout cases, and the script's generator draw.
    let p = f(&hp["conditioning_dropout_prob"]);
    let (random_p0, _) = source.read_f32("random_p/0").unwrap();
    assert_eq!(
        conditioning_masks(p, &random_p0),
        [(true, 1.0), (true, 0.0), (false, 0.0), (false, 1.0)]
    );
    let mut g = TorchGenerator::new(hp["dropout_seed"].as_u64().unwrap());
    assert_eq!(g.rand(&[4]), source.read_f32("random_p/1").unwrap().0);
}

#[test]
fn widened_unet_steps_match_diffusers() {
    check_steps(0);
}

/// The same steps over two devices, one example each (both images' latents, the prompt, the
/// dropout draw, noise and timestep sharded together).
#[test]
fn widened_unet_steps_over_two_devices_match_diffusers() {
    check_steps(2);
}

/// The fixture's steps on one device (`devices` 0) or data-parallel over `devices` handles.
fn check_steps(devices: usize) {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = source();
    let dev = device();
    let config = config(hp);
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let bias: Tensor<1> = tensor(&source, "init/conv_in.bias", &dev);
    let unet = widen_conv_in(unet, 8, Some(bias)).unwrap();
    assert_eq!(unet.config().in_channels, 8);
    let d = diff_to(
        diffusion_core::tensor::to_vec(unet.conv_in.weight.val()),
        &source,
        "init/conv_in.weight",
    );
    assert!(d == 0.0, "widened conv_in differs by {d}");
    let steps = f(&hp["steps"]) as usize;
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let mut trainer = InstructPix2PixTrainer::new(&config, unet, scheduler, steps, &dev).unwrap();

    let null: Tensor<3> = tensor(&source, "null_conditioning", &dev);
    let batch = |step: usize| EditBatch {
        latents: tensor(&source, "latents", &dev),
        original_image_embeds: tensor(&source, "original_image_embeds", &dev),
        encoder_hidden_states: tensor(&source, "encoder_hidden_states", &dev),
        dropout: Some((
            null.clone(),
            source.read_f32(&format!("random_p/{step}")).unwrap().0,
        )),
    };
    let draws = |step: usize| NoiseDraws {
        noise: tensor(&source, &format!("noise/{step}"), &dev),
        offset_noise: None,
        perturbation: None,
        timesteps: source
            .read_f32(&format!("timesteps/{step}"))
            .unwrap()
            .0
            .iter()
            .map(|&t| t as usize)
            .collect(),
    };

    let loss = trainer.loss(&batch(0), &draws(0)).unwrap();
    let grads = trainer.inner().gradients(loss);
    let (key, d) = compare(&grads.state_dict(trainer.inner().unet()), &source, "grad0");
    eprintln!("worst gradient difference {d:e} (`{key}`)");
    assert!(d <= TOL, "gradient of `{key}` differs by {d}");
    let conv_in = grads
        .state_dict(trainer.inner().unet())
        .into_iter()
        .find(|t| t.key == "conv_in.weight")
        .unwrap();
    let d = diff_to(conv_in.values, &source, "grad0/conv_in.weight");
    eprintln!("conv_in.weight gradient difference {d:e}");

    let mut parallel = (devices > 0).then(|| {
        trainer
            .inner()
            .data_parallel(vec![dev.clone(); devices])
            .unwrap()
    });
    for step in 0..steps {
        let stats = match &mut parallel {
            Some(p) => trainer.step_data_parallel(p, &batch(step), &draws(step)),
            None => trainer.step(&batch(step), &draws(step)),
        }
        .unwrap()
        .unwrap();
        let want = f(&results["losses"][step]);
        let d = (f64::from(stats.loss) - want).abs();
        eprintln!(
            "step {step}: loss {} (diffusers {want}, diff {d:e})",
            stats.loss
        );
        assert!(
            d <= f64::from(TOL),
            "step {step}: loss {} vs {want}",
            stats.loss
        );
        let want = f(&results["grad_norms"][step]);
        let d = (f64::from(stats.grad_norm) - want).abs();
        assert!(
            d <= f64::from(TOL),
            "step {step}: grad norm {} vs {want}",
            stats.grad_norm
        );
    }
    let (key, d) = compare(&state_dict(trainer.inner().unet()), &source, "param");
    eprintln!("worst parameter difference after {steps} steps {d:e} (`{key}`)");
    assert!(d <= TOL, "`{key}` differs by {d}");
}

/// A three-step run on the four pairs in batches of two (epochs end after steps 2 and 4),
/// checkpointed every two steps.
fn run_config(output_dir: &Path) -> InstructPix2PixConfig {
    InstructPix2PixConfig {
        pretrained_model: sd1(),
        train_data_dir: root().join("data"),
        output_dir: output_dir.to_path_buf(),
        resolution: 32,
        random_flip: true,
        train_batch_size: 2,
        max_train_steps: Some(3),
        learning_rate: 1e-3,
        lr_warmup_steps: 0,
        conditioning_dropout_prob: Some(0.1),
        checkpointing_steps: 2,
        seed: 5,
        show_progress: false,
        ..InstructPix2PixConfig::default()
    }
}

fn with_validation(output_dir: &Path) -> InstructPix2PixConfig {
    InstructPix2PixConfig {
        val_image_url: Some(root().join("data/1_original.png")),
        validation_prompt: Some("turn the sky green".into()),
        num_validation_images: 2,
        ..run_config(output_dir)
    }
}

fn pngs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(validation_dir(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn parameters(path: &Path) -> String {
    read_png_text(path)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{}: no parameters chunk", path.display()))
}

const WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";

#[test]
fn validation_edits_leave_training_unchanged_and_resume_exactly() {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_instruct_pix2pix(&run_config(plain_dir.path()), &device()).unwrap();
    assert!(!validation_dir(plain_dir.path()).exists());
    let dir = tempfile::tempdir().unwrap();
    let with = train_instruct_pix2pix(&with_validation(dir.path()), &device()).unwrap();
    assert_eq!(with.steps, plain.steps);
    assert_eq!(
        read(&dir.path().join(WEIGHTS)),
        read(&plain_dir.path().join(WEIGHTS))
    );
    // Step 0 (starting weights), the end of epoch 0 (step 2) and the last step (3).
    assert_eq!(
        pngs(dir.path()),
        [
            STRIP_FILE,
            "step-000000.png",
            "step-000002.png",
            "step-000003.png"
        ]
    );
    let at2 = validation_path(dir.path(), 2);
    let text = parameters(&at2);
    assert!(text.starts_with("turn the sky green\n"), "{text}");
    for field in [
        "Steps: 20",
        "CFG scale: 7",
        "Image CFG scale: 1.5",
        "Seed: 5",
        "Size: 32x32",
        "Batch size: 2",
        "Init image: ",
        "Training step: 2",
        "Epoch: 0",
    ] {
        assert!(text.contains(field), "{field} not in {text:?}");
    }
    assert!(parameters(&validation_path(dir.path(), 3)).contains("Epoch: 1"));
    // One row: the original and two edits of 32x32, each framed by 2 pixels.
    assert_eq!(load_image(&at2).unwrap().dimensions(), (108, 36));
    assert_ne!(read(&at2), read(&validation_path(dir.path(), 0)));

    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(
        &dir.path().join("checkpoint-2"),
        &resumed_dir.path().join("checkpoint-2"),
    );
    let resumed_config = InstructPix2PixConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..with_validation(resumed_dir.path())
    };
    let resumed = train_instruct_pix2pix(&resumed_config, &device()).unwrap();
    assert_eq!(resumed.steps, with.steps[2..]);
    assert_eq!(pngs(resumed_dir.path()), [STRIP_FILE, "step-000003.png"]);
    assert_eq!(
        read(&validation_path(resumed_dir.path(), 3)),
        read(&validation_path(dir.path(), 3))
    );
    assert_eq!(
        read(&resumed_dir.path().join(WEIGHTS)),
        read(&dir.path().join(WEIGHTS))
    );
}

#[test]
fn bad_validation_settings_are_typed_errors_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let invalid = |config: InstructPix2PixConfig, field: &str| {
        let err = train_instruct_pix2pix(&config, &device()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { name, .. } if name == field),
            "{field}: {err}"
        );
    };
    invalid(
        InstructPix2PixConfig {
            validation_prompt: None,
            ..with_validation(&out)
        },
        "validation_prompt",
    );
    invalid(
        InstructPix2PixConfig {
            val_image_url: None,
            ..with_validation(&out)
        },
        "val_image_url",
    );
    invalid(
        InstructPix2PixConfig {
            validation_prompt: Some("  ".into()),
            ..with_validation(&out)
        },
        "validation_prompt",
    );
    invalid(
        InstructPix2PixConfig {
            num_validation_images: 0,
            ..with_validation(&out)
        },
        "num_validation_images",
    );
    invalid(
        InstructPix2PixConfig {
            validation_epochs: 0,
            ..with_validation(&out)
        },
        "validation_epochs",
    );
    let missing = dir.path().join("missing.png");
    let err = train_instruct_pix2pix(
        &InstructPix2PixConfig {
            val_image_url: Some(missing.clone()),
            ..with_validation(&out)
        },
        &device(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { path, .. } if *path == missing),
        "{err}"
    );
    let not_an_image = root().join("data/metadata.jsonl");
    let err = train_instruct_pix2pix(
        &InstructPix2PixConfig {
            val_image_url: Some(not_an_image),
            ..with_validation(&out)
        },
        &device(),
    )
    .unwrap_err();
    assert!(matches!(&err, Error::Image { .. }), "{err}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

/// The widened trainer of `widened_unet_steps_match_diffusers` under `mixed_precision`, with
/// the fixture's first batch and draws.
fn fixture_trainer(mp: MixedPrecision) -> (InstructPix2PixTrainer, EditBatch, NoiseDraws) {
    fixture_trainer_with(mp, false)
}

/// [`fixture_trainer`] with `gradient_checkpointing` set as given.
pub(crate) fn fixture_trainer_with(
    mp: MixedPrecision,
    gradient_checkpointing: bool,
) -> (InstructPix2PixTrainer, EditBatch, NoiseDraws) {
    let expected = expected();
    let source = source();
    let dev = device();
    let config = InstructPix2PixConfig {
        mixed_precision: mp.as_str().into(),
        gradient_checkpointing,
        ..config(&expected["hyperparameters"])
    };
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let bias: Tensor<1> = tensor(&source, "init/conv_in.bias", &dev);
    let unet = widen_conv_in(unet, 8, Some(bias)).unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let trainer = InstructPix2PixTrainer::new(&config, unet, scheduler, 2, &dev).unwrap();
    let batch = EditBatch {
        latents: tensor(&source, "latents", &dev),
        original_image_embeds: tensor(&source, "original_image_embeds", &dev),
        encoder_hidden_states: tensor(&source, "encoder_hidden_states", &dev),
        dropout: Some((
            tensor(&source, "null_conditioning", &dev),
            source.read_f32("random_p/0").unwrap().0,
        )),
    };
    let draws = NoiseDraws {
        noise: tensor(&source, "noise/0", &dev),
        offset_noise: None,
        perturbation: None,
        timesteps: source
            .read_f32("timesteps/0")
            .unwrap()
            .0
            .iter()
            .map(|&t| t as usize)
            .collect(),
    };
    (trainer, batch, draws)
}

fn loss_and_grads(
    t: &InstructPix2PixTrainer,
    batch: &EditBatch,
    draws: &NoiseDraws,
) -> (f32, Vec<f32>) {
    let loss = t.loss(batch, draws).unwrap();
    assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
    let value = loss.clone().inner().into_scalar::<f32>();
    (
        value,
        crate::mixed_precision::flat_values(&t.inner().gradients(loss)),
    )
}

/// A bf16 and an fp16 step of the widened UNet stay close to the f32 step, within the
/// dtype-derived bound of mixed_precision.rs (`half_tolerances`: `L` conv and linear weights on
/// the deepest path, 3L roundings of the loss and 6L of the gradients at the dtype's unit
/// roundoff), and the master weights stay f32.
#[test]
fn half_precision_step_stays_close_to_f32() {
    let (reference, batch, draws) = fixture_trainer(MixedPrecision::No);
    let layers = state_dict(reference.inner().unet())
        .iter()
        .filter(|t| t.shape.len() >= 2)
        .count();
    let (loss32, grads32) = loss_and_grads(&reference, &batch, &draws);
    for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
        let (mut t, batch, draws) = fixture_trainer(mp);
        let (loss, grads) = loss_and_grads(&t, &batch, &draws);
        crate::mixed_precision::assert_close_to_f32(
            "InstructPix2Pix",
            mp,
            layers,
            (loss, grads),
            (loss32, &grads32),
        );
        assert_ne!(loss, loss32, "{mp:?}: the half copy was not used");
        t.step(&batch, &draws).unwrap().unwrap();
        assert!(!t.inner().last_step_skipped(), "{mp:?}");
        let masters = param_dtypes(t.inner().unet());
        assert!(
            !masters.is_empty() && masters.iter().all(|d| *d == DType::F32),
            "{mp:?}: master weights are {masters:?}"
        );
        assert_eq!(
            t.inner().grad_scaler().is_some(),
            mp == MixedPrecision::Fp16
        );
    }
}

#[test]
fn fp16_overflow_skips_the_step_and_keeps_the_weights() {
    let (mut t, batch, draws) = fixture_trainer(MixedPrecision::Fp16);
    t.inner_mut()
        .set_grad_scaler(
            GradScaler::new(GradScalerConfig {
                init_scale: 2f64.powi(40),
                ..GradScalerConfig::default()
            })
            .unwrap(),
        )
        .unwrap();
    let before = state_dict(t.inner().unet());
    let stats = t.step(&batch, &draws).unwrap().unwrap();
    assert!(t.inner().last_step_skipped());
    assert_eq!(t.inner().skipped_steps(), 1);
    assert_eq!(t.inner().grad_scaler().unwrap().scale(), 2f32.powi(39));
    assert!(stats.loss.is_finite());
    let after = state_dict(t.inner().unet());
    assert!(
        before.iter().zip(&after).all(|(a, b)| a.values == b.values),
        "a skipped step changed the weights"
    );
}

/// A whole fp16 run (frozen VAE and text encoder in fp16, validation in f32 on them) resumes
/// exactly, validation images included.
#[test]
fn fp16_run_with_validation_resumes_exactly() {
    let config = |out: &Path| InstructPix2PixConfig {
        mixed_precision: "fp16".into(),
        num_validation_images: 1,
        ..with_validation(out)
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = train_instruct_pix2pix(&config(full_dir.path()), &device()).unwrap();
    let losses = full.losses();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let ckpt = full_dir.path().join("checkpoint-2");
    assert!(ckpt.join("mixed_precision.json").is_file());
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_instruct_pix2pix(&run_config(plain_dir.path()), &device()).unwrap();
    assert_ne!(plain.losses(), losses, "fp16 ran as f32");
    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(&ckpt, &resumed_dir.path().join("checkpoint-2"));
    let resumed = train_instruct_pix2pix(
        &InstructPix2PixConfig {
            resume_from_checkpoint: Some("latest".into()),
            ..config(resumed_dir.path())
        },
        &device(),
    )
    .unwrap();
    assert_eq!(resumed.start_step, 2);
    assert_eq!(resumed.losses(), losses[2..].to_vec());
    assert_eq!(
        read(&resumed_dir.path().join(WEIGHTS)),
        read(&full_dir.path().join(WEIGHTS))
    );
    assert_eq!(
        read(&validation_path(resumed_dir.path(), 3)),
        read(&validation_path(full_dir.path(), 3))
    );
}
