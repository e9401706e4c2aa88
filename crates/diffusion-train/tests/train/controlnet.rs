//! ControlNet training of a ControlNet made from the tiny SD1 UNet against PyTorch/diffusers
//! (fixtures/oracle/gen_train_controlnet.py, train_controlnet.py's step): the conditioning
//! transforms, then two steps (loss, every gradient of the ControlNet, gradient norms, every
//! updated parameter) with the same batch, noise and timesteps.

use std::path::PathBuf;

use diffusion_core::weights::WeightSource;
use diffusion_models::{ControlNetModel, ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_train::{
    ControlNetTrainConfig, ControlNetTrainer, LrScheduleKind, NoiseDraws,
    conditioning_pixel_values, load_noise_scheduler,
};
use serde_json::Value;

use crate::{
    compare_to_fixture as compare, device, fixtures, max_abs_diff, number as f, sd1, tensor,
};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("controlnet")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap()
}

#[test]
fn conditioning_images_are_prepared_as_the_script_does() {
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let (want, shape) = source.read_f32("conditioning_pixel_values").unwrap();
    assert_eq!(shape, [2, 3, 32, 32]);
    let mut got = Vec::new();
    for i in 0..2 {
        let path = root().join("data").join(format!("{i}_cond.png"));
        got.extend(conditioning_pixel_values(&path, 32).unwrap());
    }
    assert!(max_abs_diff(&got, &want) <= 1e-7);
    assert!(got.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn controlnet_steps_match_diffusers() {
    check_steps(1);
}

/// `gradient_accumulation_steps = 2` over the two rows one at a time takes diffusers' steps on
/// the batch of two: each micro-batch's loss is halved before its backward.
#[test]
fn controlnet_steps_accumulated_over_two_micro_batches_match_diffusers() {
    check_steps(2);
}

/// Over two devices, one row each: diffusers' steps on the batch of two.
#[test]
fn controlnet_steps_over_two_devices_match_diffusers() {
    check_steps_on(1, 2);
}

/// The fixture's steps, each as `micro` micro-batches of the two rows.
fn check_steps(micro: usize) {
    check_steps_on(micro, 0);
}

/// [`check_steps`] on one device (`devices` 0) or data-parallel over `devices` handles.
fn check_steps_on(micro: usize, devices: usize) {
    let expected = expected();
    let hp = &expected["hyperparameters"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let config = ControlNetTrainConfig {
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        gradient_accumulation_steps: micro,
        ..ControlNetTrainConfig::default()
    };
    let controlnet = ControlNetModel::from_pretrained(root().join("controlnet"), &dev).unwrap();
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let mut trainer =
        ControlNetTrainer::new(&config, controlnet, unet, scheduler, steps, &dev).unwrap();

    let latents = tensor::<4>(&source, "latents", &dev);
    let states = tensor::<3>(&source, "encoder_hidden_states", &dev);
    let image = tensor::<4>(&source, "conditioning_pixel_values", &dev);
    let draws = |step: usize| {
        let (t, _) = source.read_f32(&format!("timesteps/{step}")).unwrap();
        NoiseDraws {
            noise: tensor(&source, &format!("noise/{step}"), &dev),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        }
    };

    let loss = trainer
        .loss(latents.clone(), states.clone(), image.clone(), &draws(0))
        .unwrap();
    let grads = trainer.gradients(loss);
    let named = grads.state_dict(trainer.controlnet());
    let (key, grad_diff) = compare(&named, &source, "grad0");
    eprintln!("controlnet: worst gradient difference {grad_diff:e} (`{key}`)");
    assert!(
        grad_diff <= TOL,
        "gradient of `{key}` differs by {grad_diff}"
    );
    // Gradients reach past the zero convolutions into the copied UNet blocks.
    let g = named
        .iter()
        .find(|t| t.key == "down_blocks.0.resnets.0.conv1.weight")
        .unwrap();
    assert!(g.values.iter().any(|v| v.abs() > 1e-8));

    let b = latents.dims()[0];
    let mut parallel =
        (devices > 0).then(|| trainer.data_parallel(vec![dev.clone(); devices]).unwrap());
    for step in 0..steps {
        let d = draws(step);
        let mut stats = None;
        for j in 0..micro {
            // Micro-batch `j`: rows `j * b / micro ..`.
            let (start, n) = (j * b / micro, b / micro);
            let part = NoiseDraws {
                noise: d.noise.clone().narrow(0, start, n),
                offset_noise: None,
                perturbation: None,
                timesteps: d.timesteps[start..start + n].to_vec(),
            };
            let (l, st, im) = (
                latents.clone().narrow(0, start, n),
                states.clone().narrow(0, start, n),
                image.clone().narrow(0, start, n),
            );
            stats = match &mut parallel {
                Some(p) => trainer.step_data_parallel(p, l, st, im, &part),
                None => trainer.step(l, st, im, &part),
            }
            .unwrap();
            assert_eq!(stats.is_some(), j + 1 == micro, "micro-batch {j}");
        }
        let stats = stats.unwrap();
        let want = f(&expected["losses"][step]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!(
            "step {step}: loss {} (diffusers {want}, diff {d:e})",
            stats.loss
        );
        assert!(d <= TOL, "step {step}: loss {} vs {want}", stats.loss);
        let want = f(&expected["grad_norms"][step]);
        let d = (f64::from(stats.grad_norm) - want).abs() as f32;
        assert!(
            d <= TOL,
            "step {step}: grad norm {} vs {want}",
            stats.grad_norm
        );
    }
    let params = state_dict(trainer.controlnet());
    let (key, diff) = compare(&params, &source, "param");
    eprintln!("controlnet: worst parameter difference after the steps {diff:e} (`{key}`)");
    assert!(diff <= TOL, "`{key}` differs by {diff}");
}

mod run {
    //! `train_controlnet` with validation images (train_controlnet.py's `log_validation`).

    use std::path::{Path, PathBuf};

    use diffusion_core::image::{ImageOutput, OutputType, RgbImage, load_image, read_png_text};
    use diffusion_core::{Error, NoiseSource, TorchGenerator};
    use diffusion_models::{ControlNetModel, ModelMixin};
    use diffusion_pipelines::{
        StableDiffusionComponents, StableDiffusionControlNetArgs, StableDiffusionControlNetPipeline,
    };
    use diffusion_train::controlnet_run::ControlNetValidationConfig;
    use diffusion_train::validation::{STRIP_FILE, validation_dir, validation_path};
    use diffusion_train::{ControlNetRunConfig, train_controlnet};

    use super::{root, sd1};
    use crate::device;

    fn config(out: &Path, validation: ControlNetValidationConfig) -> ControlNetRunConfig {
        let mut config = ControlNetRunConfig {
            pretrained_model: sd1(),
            controlnet_model: Some(root().join("controlnet")),
            train_data_dir: root().join("data"),
            output_dir: out.to_path_buf(),
            resolution: 32,
            train_batch_size: 2,
            max_train_steps: Some(3),
            checkpointing_steps: 2,
            seed: 5,
            validation,
            show_progress: false,
            ..ControlNetRunConfig::default()
        };
        config.train.learning_rate = 1e-3;
        config.train.lr_warmup_steps = 0;
        config
    }

    fn validation() -> ControlNetValidationConfig {
        ControlNetValidationConfig {
            validation_prompts: vec!["a red square".into(), "two green lines".into()],
            // One control image for both prompts.
            validation_images: vec![root().join("data/0_cond.png")],
            num_validation_images: 2,
            validation_steps: 2,
            num_inference_steps: 2,
            seed: Some(11),
            ..ControlNetValidationConfig::default()
        }
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn pngs(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(validation_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

    /// The 32x32 tile at grid row `r`, column `c` (tiles framed by 2 pixels).
    fn tile(grid: &RgbImage, r: u32, c: u32) -> RgbImage {
        image::imageops::crop_imm(grid, c * 36 + 2, r * 36 + 2, 32, 32).to_image()
    }

    /// `proportion_empty_prompts = 1` empties every caption: the run equals one on a copy of
    /// the data whose captions are all empty (its draw comes after the micro-batch's others);
    /// at 0.5 some captions are emptied and the losses differ from both. With
    /// `gradient_accumulation_steps = 2` a run takes two micro-batches per step and resumes
    /// exactly.
    #[test]
    fn empty_prompts_and_gradient_accumulation_in_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let empty_data = dir.path().join("data");
        std::fs::create_dir_all(&empty_data).unwrap();
        let mut metadata = String::new();
        for entry in std::fs::read_dir(root().join("data")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_owned();
            if name == "metadata.jsonl" {
                for line in std::fs::read_to_string(&path).unwrap().lines() {
                    let mut row: serde_json::Value = serde_json::from_str(line).unwrap();
                    row["text"] = "".into();
                    metadata.push_str(&format!("{row}\n"));
                }
            } else {
                std::fs::copy(&path, empty_data.join(name)).unwrap();
            }
        }
        std::fs::write(empty_data.join("metadata.jsonl"), metadata).unwrap();
        let run = |out: &Path, data: &Path, proportion: f64| {
            let c = ControlNetRunConfig {
                train_data_dir: data.to_path_buf(),
                proportion_empty_prompts: proportion,
                ..config(out, ControlNetValidationConfig::default())
            };
            train_controlnet(&c, &device()).unwrap().losses()
        };
        let all_empty = run(&dir.path().join("a"), &root().join("data"), 1.0);
        let empty_captions = run(&dir.path().join("b"), &empty_data, 0.0);
        let half = run(&dir.path().join("c"), &root().join("data"), 0.5);
        let none = run(&dir.path().join("d"), &root().join("data"), 0.0);
        assert_eq!(all_empty, empty_captions);
        assert_ne!(half, none);
        assert_ne!(half, all_empty);
        let bad = ControlNetRunConfig {
            proportion_empty_prompts: 1.5,
            ..config(&dir.path().join("e"), ControlNetValidationConfig::default())
        };
        let err = train_controlnet(&bad, &device()).unwrap_err().to_string();
        assert!(err.contains("proportion_empty_prompts"), "{err}");
        assert!(!dir.path().join("e").exists());

        let accumulated = |out: &Path, resume: Option<&str>| {
            let mut c = ControlNetRunConfig {
                train_batch_size: 1,
                resume_from_checkpoint: resume.map(String::from),
                ..config(out, ControlNetValidationConfig::default())
            };
            c.train.gradient_accumulation_steps = 2;
            train_controlnet(&c, &device()).unwrap()
        };
        let straight_dir = dir.path().join("straight");
        let straight = accumulated(&straight_dir, None);
        assert_eq!(straight.steps.len(), 3);
        let resumed_dir = dir.path().join("resumed");
        copy_dir(
            &straight_dir.join("checkpoint-2"),
            &resumed_dir.join("checkpoint-2"),
        );
        let resumed = accumulated(&resumed_dir, Some("latest"));
        assert_eq!(resumed.start_step, 2);
        assert_eq!(resumed.steps, straight.steps[2..]);
        assert_eq!(
            read(&resumed_dir.join(WEIGHTS)),
            read(&straight_dir.join(WEIGHTS))
        );
    }

    #[test]
    fn validation_leaves_training_unchanged_and_matches_the_pipeline() {
        let plain_dir = tempfile::tempdir().unwrap();
        let plain = train_controlnet(
            &config(plain_dir.path(), ControlNetValidationConfig::default()),
            &device(),
        )
        .unwrap();
        assert!(!validation_dir(plain_dir.path()).exists());
        let dir = tempfile::tempdir().unwrap();
        let with = train_controlnet(&config(dir.path(), validation()), &device()).unwrap();
        assert_eq!(with.steps, plain.steps);
        assert_eq!(
            read(&dir.path().join(WEIGHTS)),
            read(&plain_dir.path().join(WEIGHTS))
        );
        assert_eq!(
            pngs(dir.path()),
            [STRIP_FILE, "step-000002.png", "step-000003.png"]
        );
        let at3 = validation_path(dir.path(), 3);
        let grid = load_image(&at3).unwrap();
        // A row per prompt: the control image, then two images; 32x32 tiles framed by 2.
        assert_eq!(grid.dimensions(), (3 * 36, 2 * 36));
        let text = read_png_text(&at3).unwrap();
        let text = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert!(text.starts_with("a red square\n"), "{text}");
        for field in [
            "Steps: 2",
            "Sampler: UniPCMultistepScheduler",
            "CFG scale: 7.5",
            "Seed: 11",
            "Size: 32x32",
            "Batch size: 2",
            "Training step: 3",
            r#"Prompts: ["a red square","two green lines"]"#,
            "Control images: ",
        ] {
            assert!(text.contains(field), "{field} not in {text:?}");
        }
        let control = load_image(root().join("data/0_cond.png")).unwrap();
        assert_eq!(tile(&grid, 0, 0), control);
        assert_eq!(tile(&grid, 1, 0), control);

        // The images are the ControlNet pipeline's with the saved ControlNet, every call drawing
        // its latents in turn from one generator seeded with the validation seed.
        let dev = device();
        let mut components =
            StableDiffusionComponents::from_pretrained(sd1().to_str().unwrap(), &dev).unwrap();
        components.set_scheduler("UniPCMultistepScheduler").unwrap();
        let controlnet = ControlNetModel::from_pretrained(dir.path(), &dev).unwrap();
        let mut pipe = StableDiffusionControlNetPipeline::from_parts(components, controlnet);
        let mut generator = TorchGenerator::new(11);
        for (r, prompt) in ["a red square", "two green lines"].iter().enumerate() {
            for c in 1..=2 {
                let latents = diffusion_core::tensor::randn_tensor(
                    [1, 4, 16, 16],
                    NoiseSource::Single(&mut generator),
                    &dev,
                )
                .unwrap();
                let out = pipe
                    .call(StableDiffusionControlNetArgs {
                        prompt: vec![prompt.to_string()],
                        image: Some(control.clone().into()),
                        num_inference_steps: 2,
                        latents: Some(latents),
                        output_type: OutputType::Pil,
                        progress: false,
                        ..Default::default()
                    })
                    .unwrap();
                let ImageOutput::Images(images) = out.images else {
                    panic!("no images")
                };
                // The trainer keeps its weights in another memory layout, so sums may round
                // differently: one 8-bit level at most.
                let got = tile(&grid, r as u32, c);
                let worst = got
                    .as_raw()
                    .iter()
                    .zip(images[0].as_raw())
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                eprintln!("row {r} column {c}: worst difference {worst}/255");
                assert!(worst <= 1, "row {r} column {c}: {worst}/255");
            }
        }
        // Generated images differ between the draws.
        assert_ne!(tile(&grid, 0, 1), tile(&grid, 0, 2));

        // Resumed from step 2, the run writes the same last grid.
        let resumed_dir = tempfile::tempdir().unwrap();
        copy_dir(
            &dir.path().join("checkpoint-2"),
            &resumed_dir.path().join("checkpoint-2"),
        );
        let resumed_config = ControlNetRunConfig {
            resume_from_checkpoint: Some("latest".into()),
            ..config(resumed_dir.path(), validation())
        };
        let resumed = train_controlnet(&resumed_config, &device()).unwrap();
        assert_eq!(resumed.steps, with.steps[2..]);
        assert_eq!(pngs(resumed_dir.path()), [STRIP_FILE, "step-000003.png"]);
        assert_eq!(read(&validation_path(resumed_dir.path(), 3)), read(&at3));
    }

    pub(super) fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[test]
    fn bad_validation_settings_fail_before_training() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let name_of =
            |v: ControlNetValidationConfig| match train_controlnet(&config(&out, v), &device()) {
                Err(Error::InvalidArgument { name, .. }) => name,
                other => panic!("expected InvalidArgument, got {other:?}"),
            };
        let v = validation();
        assert_eq!(
            name_of(ControlNetValidationConfig {
                validation_images: Vec::new(),
                ..v.clone()
            }),
            "validation.validation_image"
        );
        assert_eq!(
            name_of(ControlNetValidationConfig {
                validation_prompts: Vec::new(),
                ..v.clone()
            }),
            "validation.validation_prompt"
        );
        let three: Vec<PathBuf> = (0..3)
            .map(|i| root().join(format!("data/{i}_cond.png")))
            .collect();
        assert_eq!(
            name_of(ControlNetValidationConfig {
                validation_images: three,
                ..v.clone()
            }),
            "validation.validation_image"
        );
        assert_eq!(
            name_of(ControlNetValidationConfig {
                num_validation_images: 0,
                ..v.clone()
            }),
            "validation.num_validation_images"
        );
        assert_eq!(
            name_of(ControlNetValidationConfig {
                validation_steps: 0,
                ..v.clone()
            }),
            "validation.validation_steps"
        );
        // A missing or unreadable control image is named, and nothing is trained or written.
        let missing = dir.path().join("missing.png");
        let err = train_controlnet(
            &config(
                &out,
                ControlNetValidationConfig {
                    validation_images: vec![missing],
                    ..v.clone()
                },
            ),
            &device(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::NotFound { path, .. } if path.ends_with("missing.png")),
            "{err}"
        );
        let garbage = dir.path().join("garbage.png");
        std::fs::write(&garbage, b"not an image").unwrap();
        let err = train_controlnet(
            &config(
                &out,
                ControlNetValidationConfig {
                    validation_images: vec![garbage],
                    ..v
                },
            ),
            &device(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("garbage.png"), "{err}");
        assert!(!out.exists());
    }
}

mod half {
    //! `--mixed_precision fp16|bf16`: f32 masters with a half copy in the graph, the frozen UNet
    //! in the half dtype, fp16 loss scaling with skipped steps, exact resume.

    use std::path::Path;

    use diffusion_core::burn::tensor::DType;
    use diffusion_core::weights::WeightSource;
    use diffusion_models::{ControlNetModel, ModelMixin, UNet2DConditionModel, state_dict};
    use diffusion_train::mixed_precision::param_dtypes;
    use diffusion_train::{
        ControlNetRunConfig, ControlNetTrainConfig, ControlNetTrainer, GradScaler,
        GradScalerConfig, LrScheduleKind, MixedPrecision, NoiseDraws, load_noise_scheduler,
        train_controlnet,
    };

    use super::{root, sd1};
    use crate::mixed_precision::{assert_close_to_f32, flat_values, half_tolerances};
    use crate::{device, tensor};

    fn trainer(mp: MixedPrecision) -> ControlNetTrainer {
        let dev = device();
        let config = ControlNetTrainConfig {
            learning_rate: 1e-3,
            lr_scheduler: LrScheduleKind::Cosine,
            lr_warmup_steps: 0,
            mixed_precision: mp,
            ..ControlNetTrainConfig::default()
        };
        let controlnet = ControlNetModel::from_pretrained(root().join("controlnet"), &dev).unwrap();
        let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
        let scheduler = load_noise_scheduler(&sd1()).unwrap();
        ControlNetTrainer::new(&config, controlnet, unet, scheduler, 10, &dev).unwrap()
    }

    /// One step of the parity fixture: (loss, flat gradients) without stepping, then the step.
    fn inputs() -> (
        diffusion_core::burn::tensor::Tensor<4>,
        diffusion_core::burn::tensor::Tensor<3>,
        diffusion_core::burn::tensor::Tensor<4>,
        NoiseDraws,
    ) {
        let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
        let dev = device();
        let (t, _) = source.read_f32("timesteps/0").unwrap();
        (
            tensor(&source, "latents", &dev),
            tensor(&source, "encoder_hidden_states", &dev),
            tensor(&source, "conditioning_pixel_values", &dev),
            NoiseDraws {
                noise: tensor(&source, "noise/0", &dev),
                offset_noise: None,
                perturbation: None,
                timesteps: t.iter().map(|&v| v as usize).collect(),
            },
        )
    }

    fn loss_and_grads(t: &ControlNetTrainer) -> (f32, Vec<f32>) {
        let (latents, states, image, draws) = inputs();
        let loss = t.loss(latents, states, image, &draws).unwrap();
        assert_eq!(loss.dtype(), DType::F32);
        let value = loss.clone().inner().into_scalar::<f32>();
        (value, flat_values(&t.gradients(loss)))
    }

    /// bf16 and fp16 steps stay within the dtype-derived bound of
    /// `mixed_precision::half_precision_step_stays_close_to_f32`, where `L` counts the conv and
    /// linear weights of the ControlNet and the UNet (a path runs through the ControlNet's down
    /// blocks into the UNet's skip connections and up blocks).
    #[test]
    fn half_precision_step_stays_close_to_f32() {
        let reference = trainer(MixedPrecision::No);
        let layers = state_dict(reference.controlnet())
            .iter()
            .chain(state_dict(&reference.inference_unet()).iter())
            .filter(|t| t.shape.len() >= 2)
            .count();
        let (loss32, grads32) = loss_and_grads(&reference);
        let mut f32_trainer = trainer(MixedPrecision::No);
        let (latents, states, image, draws) = inputs();
        let stats32 = f32_trainer
            .step(latents.clone(), states.clone(), image.clone(), &draws)
            .unwrap()
            .expect("no accumulation: every micro-batch is a step");
        for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
            let (_, grad_tol) = half_tolerances(mp, layers);
            let mut t = trainer(mp);
            assert_eq!(t.unet_dtype(), mp.dtype().unwrap(), "frozen UNet in half");
            let (loss, grads) = loss_and_grads(&t);
            assert_close_to_f32("controlnet", mp, layers, (loss, grads), (loss32, &grads32));
            let stats = t
                .step(latents.clone(), states.clone(), image.clone(), &draws)
                .unwrap()
                .expect("no accumulation: every micro-batch is a step");
            assert!(!t.last_step_skipped());
            assert_eq!(
                stats.loss, loss,
                "{mp:?}: the step's loss is the unscaled loss"
            );
            let norm_rel = (f64::from(stats.grad_norm) - f64::from(stats32.grad_norm)).abs()
                / f64::from(stats32.grad_norm);
            assert!(
                norm_rel <= grad_tol,
                "{mp:?}: grad norm rel diff {norm_rel}"
            );
            let dtypes = param_dtypes(t.controlnet());
            assert!(
                !dtypes.is_empty() && dtypes.iter().all(|d| *d == DType::F32),
                "{mp:?}: master weights are {dtypes:?}"
            );
            assert_eq!(t.grad_scaler().is_some(), mp == MixedPrecision::Fp16);
            // AdamW's first update is at most lr per weight: within 2 lr of the f32 step's.
            let lr = stats.lr as f32;
            for (a, b) in state_dict(t.controlnet())
                .iter()
                .zip(&state_dict(f32_trainer.controlnet()))
            {
                let d = crate::max_abs_diff(&a.values, &b.values);
                assert!(d <= 2.0 * lr * 1.0001, "{mp:?}: `{}` differs by {d}", a.key);
            }
        }
    }

    /// An fp16 step whose scaled gradients overflow is skipped: weights and optimizer untouched,
    /// the scale halves, the learning-rate schedule does not advance.
    #[test]
    fn fp16_overflow_skips_the_step() {
        let mut t = trainer(MixedPrecision::Fp16);
        let huge = 2f64.powi(40);
        t.set_grad_scaler(
            GradScaler::new(GradScalerConfig {
                init_scale: huge,
                ..GradScalerConfig::default()
            })
            .unwrap(),
        )
        .unwrap();
        let before = state_dict(t.controlnet());
        let (latents, states, image, draws) = inputs();
        let stats = t
            .step(latents.clone(), states.clone(), image.clone(), &draws)
            .unwrap()
            .expect("no accumulation: every micro-batch is a step");
        assert!(stats.loss.is_finite());
        assert!(t.last_step_skipped());
        assert_eq!((t.skipped_steps(), t.global_step()), (1, 1));
        assert_eq!(t.grad_scaler().unwrap().scale(), (huge / 2.0) as f32);
        assert_eq!(t.optimizer().step_count(), 0);
        for (a, b) in state_dict(t.controlnet()).iter().zip(&before) {
            assert!(a.values == b.values, "`{}` changed", a.key);
        }
        t.set_grad_scaler(GradScaler::default()).unwrap();
        let next = t
            .step(latents, states, image, &draws)
            .unwrap()
            .expect("no accumulation: every micro-batch is a step");
        assert!(!t.last_step_skipped());
        assert_eq!(t.optimizer().step_count(), 1);
        assert_eq!(
            next.lr, stats.lr,
            "cosine schedule held at the skipped step"
        );
        // Only fp16 has a scaler.
        let mut bf16 = trainer(MixedPrecision::Bf16);
        assert!(bf16.grad_scaler().is_none());
        let err = bf16.set_grad_scaler(GradScaler::default()).unwrap_err();
        assert!(err.to_string().contains("mixed_precision"), "{err}");
    }

    fn run_config(out: &Path) -> ControlNetRunConfig {
        let mut config = ControlNetRunConfig {
            pretrained_model: sd1(),
            controlnet_model: Some(root().join("controlnet")),
            train_data_dir: root().join("data"),
            output_dir: out.to_path_buf(),
            resolution: 32,
            train_batch_size: 2,
            max_train_steps: Some(3),
            checkpointing_steps: 2,
            show_progress: false,
            ..ControlNetRunConfig::default()
        };
        config.train.learning_rate = 1e-3;
        config.train.lr_warmup_steps = 0;
        config.train.mixed_precision = MixedPrecision::Fp16;
        // Validation runs the pipeline in f32 on the half-rounded frozen weights.
        config.validation = diffusion_train::controlnet_run::ControlNetValidationConfig {
            validation_prompts: vec!["a red square".into()],
            validation_images: vec![root().join("data/0_cond.png")],
            num_validation_images: 1,
            validation_steps: 2,
            num_inference_steps: 2,
            ..Default::default()
        };
        config
    }

    /// `train_controlnet` in fp16 (frozen models in fp16) checkpoints its scaler and resumes
    /// exactly.
    #[test]
    fn fp16_run_resumes_exactly() {
        let full_dir = tempfile::tempdir().unwrap();
        let full = train_controlnet(&run_config(full_dir.path()), &device()).unwrap();
        let losses = full.losses();
        assert_eq!(losses.len(), 3);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        let ckpt = full_dir.path().join("checkpoint-2");
        assert!(ckpt.join("mixed_precision.json").is_file());
        for step in [2, 3] {
            let grid = diffusion_train::validation::validation_path(full_dir.path(), step);
            assert!(grid.is_file(), "{} missing", grid.display());
        }
        let resumed_dir = tempfile::tempdir().unwrap();
        super::run::copy_dir(&ckpt, &resumed_dir.path().join("checkpoint-2"));
        let resumed = train_controlnet(
            &ControlNetRunConfig {
                resume_from_checkpoint: Some("latest".into()),
                ..run_config(resumed_dir.path())
            },
            &device(),
        )
        .unwrap();
        assert_eq!(resumed.start_step, 2);
        assert_eq!(resumed.losses(), losses[2..].to_vec());
        let weights =
            |d: &Path| std::fs::read(d.join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(
            weights(full_dir.path()) == weights(resumed_dir.path()),
            "final weights differ"
        );
        // The saved ControlNet is f32.
        let saved = ControlNetModel::from_pretrained(full_dir.path(), &device()).unwrap();
        assert!(param_dtypes(&saved).iter().all(|d| *d == DType::F32));
    }
}
