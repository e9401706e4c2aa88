//! Validation images during training: written at the right steps with their generation
//! parameters, without changing what training computes (with or without validation, resumed or
//! not), and with typed errors and no partial file when they cannot be written.

use std::path::Path;

use diffusion_core::Error;
use diffusion_core::image::{load_image, read_png_text};
use diffusion_models::{ModelMixin, UNet2DModel};
use diffusion_train::validation::{STRIP_FILE, validation_dir, validation_path};
use diffusion_train::{
    ImageDataset, ImageValidationConfig, LoraTrainConfig, LrScheduleKind, PromptValidationConfig,
    TextToImageConfig, TrainConfig, ValidationSampler, train_text_to_image, train_unconditional,
};

use crate::{copy_dir, device, fixtures, read, sd1};

fn dataset() -> ImageDataset {
    ImageDataset::from_digits_csv_gz(fixtures().join("digits_head.csv.gz"), 8).unwrap()
}

/// 16 images in batches of 6: steps 3, 6 end epochs 0 and 1; the run stops at step 7.
fn config(output_dir: &Path, validation: ImageValidationConfig) -> TrainConfig {
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &device())
        .unwrap()
        .config()
        .clone();
    TrainConfig {
        output_dir: output_dir.to_path_buf(),
        model,
        // Fixed starting weights: a new model's initialisation is not seeded.
        pretrained_model: Some(fixtures().join("tiny_unet")),
        train_batch_size: 6,
        max_train_steps: Some(7),
        learning_rate: 2e-3,
        lr_warmup_steps: 2,
        use_ema: true,
        random_flip: true,
        seed: 42,
        checkpointing_steps: 4,
        save_model_epochs: 1,
        show_progress: false,
        validation,
        ..TrainConfig::default()
    }
}

fn every_steps(n: usize, sampler: ValidationSampler) -> ImageValidationConfig {
    ImageValidationConfig {
        save_images_steps: Some(n),
        eval_batch_size: 3,
        num_inference_steps: 4,
        sampler,
        seed: 5,
        ..ImageValidationConfig::default()
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
fn unconditional_grids_at_their_steps_leave_training_unchanged() {
    let data = dataset();
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_unconditional(
        &config(plain_dir.path(), ImageValidationConfig::default()),
        &data,
        &device(),
    )
    .unwrap();
    assert!(!validation_dir(plain_dir.path()).exists());

    let dir = tempfile::tempdir().unwrap();
    let with = train_unconditional(
        &config(dir.path(), every_steps(3, ValidationSampler::Ddim)),
        &data,
        &device(),
    )
    .unwrap();
    // Bit-identical training: every step's statistics and the exported weights.
    assert_eq!(with.steps, plain.steps);
    assert_eq!(
        read(&dir.path().join(WEIGHTS)),
        read(&plain_dir.path().join(WEIGHTS))
    );
    // Step 0 (the starting weights), every third step, and the last.
    assert_eq!(
        pngs(dir.path()),
        [
            STRIP_FILE,
            "step-000000.png",
            "step-000003.png",
            "step-000006.png",
            "step-000007.png"
        ]
    );
    let at6 = validation_path(dir.path(), 6);
    let text = parameters(&at6);
    for field in [
        "Steps: 4",
        "Sampler: DDIMScheduler",
        "Seed: 5",
        "Size: 8x8",
        "Batch size: 3",
        "Upscale: 8",
        "Training step: 6",
        "Epoch: 1",
    ] {
        assert!(text.contains(field), "{field} not in {text:?}");
    }
    // Three 64-pixel tiles, framed by 2 pixels, in a near-square grid of 2x2 (one black tile).
    assert_eq!(load_image(&at6).unwrap().dimensions(), (136, 136));
    // The weights move, so the grids do too; the seed is fixed, so step 0 is the untrained model.
    assert_ne!(read(&at6), read(&validation_path(dir.path(), 3)));
    // The strip: the four grids with 4-pixel gaps.
    let strip = dir.path().join("validation").join(STRIP_FILE);
    assert_eq!(
        load_image(&strip).unwrap().dimensions(),
        (4 * 136 + 3 * 4, 136)
    );
    assert!(parameters(&strip).contains("Training steps: 0 3 6 7"));

    // Epochs, as train_unconditional.py: after epochs 0, 2, ... and the last step; DDPM.
    let epochs_dir = tempfile::tempdir().unwrap();
    let by_epoch = ImageValidationConfig {
        save_images_steps: None,
        save_images_epochs: Some(2),
        ..every_steps(1, ValidationSampler::Ddpm)
    };
    let run = train_unconditional(&config(epochs_dir.path(), by_epoch), &data, &device()).unwrap();
    assert_eq!(run.steps, plain.steps);
    assert_eq!(
        pngs(epochs_dir.path()),
        [
            STRIP_FILE,
            "step-000000.png",
            "step-000003.png",
            "step-000007.png"
        ]
    );
    let text = parameters(&validation_path(epochs_dir.path(), 3));
    assert!(
        text.contains("Sampler: DDPMScheduler") && text.contains("Epoch: 0"),
        "{text}"
    );
}

#[test]
fn resumed_run_writes_the_same_grids() {
    let data = dataset();
    let full_dir = tempfile::tempdir().unwrap();
    let validation = every_steps(2, ValidationSampler::Ddpm);
    let full = train_unconditional(
        &config(full_dir.path(), validation.clone()),
        &data,
        &device(),
    )
    .unwrap();

    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(
        &full_dir.path().join("checkpoint-4"),
        &resumed_dir.path().join("checkpoint-4"),
    );
    let resumed_config = TrainConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..config(resumed_dir.path(), validation)
    };
    let resumed = train_unconditional(&resumed_config, &data, &device()).unwrap();
    assert_eq!(resumed.steps, full.steps[4..]);
    assert_eq!(
        read(&resumed_dir.path().join(WEIGHTS)),
        read(&full_dir.path().join(WEIGHTS))
    );
    // No step-0 grid on a resume; the later ones are byte for byte the uninterrupted run's.
    assert_eq!(
        pngs(resumed_dir.path()),
        [STRIP_FILE, "step-000006.png", "step-000007.png"]
    );
    for step in [6, 7] {
        assert_eq!(
            read(&validation_path(resumed_dir.path(), step)),
            read(&validation_path(full_dir.path(), step)),
            "step {step}"
        );
    }
}

#[test]
fn bad_settings_and_unwritable_images_are_typed_errors() {
    let data = dataset();
    let dir = tempfile::tempdir().unwrap();
    for (bad, field) in [
        (
            ImageValidationConfig {
                eval_batch_size: 0,
                ..every_steps(2, ValidationSampler::Ddim)
            },
            "validation.eval_batch_size",
        ),
        (
            every_steps(0, ValidationSampler::Ddim),
            "validation.save_images_steps",
        ),
        (
            ImageValidationConfig {
                num_inference_steps: 0,
                ..every_steps(2, ValidationSampler::Ddim)
            },
            "validation.num_inference_steps",
        ),
    ] {
        let err = train_unconditional(&config(dir.path(), bad), &data, &device()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument { name, .. } if name == field),
            "{err}"
        );
    }
    // Nothing was trained or written.
    assert!(!dir.path().join("logs").exists());

    // The image's path is taken by a folder: an I/O error naming it, no temporary left behind.
    let blocked = validation_path(dir.path(), 2);
    std::fs::create_dir_all(blocked.join("x")).unwrap();
    let err = train_unconditional(
        &config(dir.path(), every_steps(2, ValidationSampler::Ddim)),
        &data,
        &device(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path == &blocked),
        "{err}"
    );
    let mut left = pngs(dir.path());
    left.sort();
    assert_eq!(left, ["step-000000.png", "step-000002.png"], "{left:?}");
    assert!(blocked.is_dir());

    // The validation folder's path is a file.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(validation_dir(other.path()), b"not a folder").unwrap();
    let err = train_unconditional(
        &config(other.path(), every_steps(2, ValidationSampler::Ddim)),
        &data,
        &device(),
    )
    .unwrap_err();
    assert!(matches!(&err, Error::Io { .. }), "{err}");
}

fn lora_config(output_dir: &Path, validation: PromptValidationConfig) -> TextToImageConfig {
    TextToImageConfig {
        pretrained_model: sd1(),
        train_data_dir: fixtures().join("text_to_image/data"),
        output_dir: output_dir.to_path_buf(),
        resolution: 32,
        train_batch_size: 2,
        max_train_steps: Some(3),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        random_flip: true,
        checkpointing_steps: 2,
        lora: Some(LoraTrainConfig::default()),
        show_progress: false,
        validation,
        ..TextToImageConfig::default()
    }
}

#[test]
fn lora_validation_images_leave_training_unchanged_and_resume_exactly() {
    let validation = PromptValidationConfig {
        validation_prompts: vec!["a photo of a cat".into(), "a red square".into()],
        num_validation_images: 2,
        validation_steps: Some(2),
        num_inference_steps: 2,
        seed: Some(3),
        ..PromptValidationConfig::default()
    };
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_text_to_image(
        &lora_config(plain_dir.path(), PromptValidationConfig::default()),
        &device(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with =
        train_text_to_image(&lora_config(dir.path(), validation.clone()), &device()).unwrap();
    assert_eq!(with.steps, plain.steps);
    let weights = "pytorch_lora_weights.safetensors";
    assert_eq!(
        read(&dir.path().join(weights)),
        read(&plain_dir.path().join(weights))
    );
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
    assert!(text.starts_with("a photo of a cat\n"), "{text}");
    for field in [
        "Steps: 2",
        "CFG scale: 7.5",
        "Seed: 3",
        "Batch size: 2",
        "Training step: 2",
        r#"Prompts: ["a photo of a cat","a red square"]"#,
    ] {
        assert!(text.contains(field), "{field} not in {text:?}");
    }
    // A row per prompt, a column per image; the tiny pipeline makes 32x32 images (UNet
    // sample_size 16, VAE factor 2), framed by 2 pixels.
    assert_eq!(load_image(&at2).unwrap().dimensions(), (72, 72));
    assert_ne!(read(&at2), read(&validation_path(dir.path(), 0)));

    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(
        &dir.path().join("checkpoint-2"),
        &resumed_dir.path().join("checkpoint-2"),
    );
    let resumed_config = TextToImageConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..lora_config(resumed_dir.path(), validation)
    };
    let resumed = train_text_to_image(&resumed_config, &device()).unwrap();
    assert_eq!(resumed.steps, with.steps[2..]);
    assert_eq!(pngs(resumed_dir.path()), [STRIP_FILE, "step-000003.png"]);
    assert_eq!(
        read(&validation_path(resumed_dir.path(), 3)),
        read(&validation_path(dir.path(), 3))
    );

    let bad = lora_config(
        dir.path(),
        PromptValidationConfig {
            num_validation_images: 0,
            ..PromptValidationConfig {
                validation_prompts: vec!["a cat".into()],
                ..PromptValidationConfig::default()
            }
        },
    );
    let err = train_text_to_image(&bad, &device()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "validation.num_validation_images"),
        "{err}"
    );
}

#[test]
fn full_fine_tuning_with_ema_validates_by_epoch() {
    // Four images in batches of two: epochs end after steps 2 and 4; the run stops at step 3.
    let config = |dir: &Path, validation| TextToImageConfig {
        lora: None,
        use_ema: true,
        learning_rate: 1e-3,
        ..lora_config(dir, validation)
    };
    let validation = PromptValidationConfig {
        validation_prompts: vec!["a red square".into()],
        num_validation_images: 1,
        validation_epochs: Some(1),
        num_inference_steps: 2,
        ..PromptValidationConfig::default()
    };
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_text_to_image(
        &config(plain_dir.path(), PromptValidationConfig::default()),
        &device(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with = train_text_to_image(&config(dir.path(), validation), &device()).unwrap();
    assert_eq!(with.steps, plain.steps);
    assert_eq!(
        read(&dir.path().join(WEIGHTS)),
        read(&plain_dir.path().join(WEIGHTS))
    );
    assert_eq!(
        pngs(dir.path()),
        [
            STRIP_FILE,
            "step-000000.png",
            "step-000002.png",
            "step-000003.png"
        ]
    );
    let text = parameters(&validation_path(dir.path(), 2));
    // The run's seed (0) when no validation seed is given.
    assert!(
        text.contains("Epoch: 0") && text.contains("Seed: 0"),
        "{text}"
    );
    assert!(parameters(&validation_path(dir.path(), 3)).contains("Epoch: 1"));
}
