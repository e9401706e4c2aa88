//! Validation images of the DreamBooth (full, LoRA, text-encoder LoRA), textual-inversion and
//! SDXL (full, LoRA) loops: written at their steps with their generation parameters, and without
//! changing a single bit of what training computes.

use std::path::{Path, PathBuf};

use diffusion_core::Error;
use diffusion_core::image::{load_image, read_png_text};
use diffusion_core::weights::SafetensorsFile;
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTokenizer, ModelMixin, UNet2DConditionModel,
};
use diffusion_schedulers::AnyScheduler;
use diffusion_train::validation::{
    FrozenParts, STRIP_FILE, ValidationPoint, save_prompt_validation, validation_dir,
    validation_path,
};
use diffusion_train::{
    DreamBoothConfig, LoraTrainConfig, LrScheduleKind, PromptValidationConfig, SdxlTrainConfig,
    TextToImageConfig, TextualInversionConfig, UNetLora, train_dreambooth,
    train_text_to_image_sdxl, train_textual_inversion,
};

use crate::{copy_dir, device, fixtures, read, sd1};

fn sdxl() -> PathBuf {
    fixtures().join("../pipelines/sd/sdxl")
}

fn data() -> PathBuf {
    fixtures().join("text_to_image/data")
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

/// Two images of one prompt, two denoising steps, every `steps` optimizer steps or every epoch.
fn validation(steps: Option<usize>, epochs: Option<usize>) -> PromptValidationConfig {
    PromptValidationConfig {
        validation_prompts: vec!["a photo of sks dog".into()],
        num_validation_images: 2,
        validation_steps: steps,
        validation_epochs: epochs,
        num_inference_steps: 2,
        seed: Some(7),
        ..PromptValidationConfig::default()
    }
}

/// The grids of steps 0, 2 and 3 (and the strip) exist, carry their step and settings, and
/// show two `side`-pixel images side by side; training moved the step-3 images.
fn check_grids(dir: &Path, side: u32, prompt: &str) {
    assert_eq!(
        pngs(dir),
        [
            STRIP_FILE,
            "step-000000.png",
            "step-000002.png",
            "step-000003.png"
        ]
    );
    for step in [0, 2, 3] {
        let path = validation_path(dir, step);
        let text = parameters(&path);
        assert!(text.starts_with(&format!("{prompt}\n")), "{text}");
        for field in [
            "Steps: 2".to_string(),
            "Seed: 7".to_string(),
            "Batch size: 2".to_string(),
            format!("Size: {side}x{side}"),
            format!("Training step: {step}"),
        ] {
            assert!(text.contains(&field), "{field} not in {text:?}");
        }
        // Two framed images in one row.
        assert_eq!(
            load_image(&path).unwrap().dimensions(),
            (2 * (side + 4), side + 4)
        );
    }
    assert_ne!(
        read(&validation_path(dir, 3)),
        read(&validation_path(dir, 0))
    );
}

fn dreambooth_config(
    out: &Path,
    lora: bool,
    text: bool,
    v: PromptValidationConfig,
) -> DreamBoothConfig {
    let mut c = if lora {
        DreamBoothConfig::lora_defaults()
    } else {
        DreamBoothConfig::default()
    };
    c.instance_data_dir = data();
    c.instance_prompt = "a photo of sks dog".into();
    c.train_text_encoder = text;
    c.train.pretrained_model = sd1();
    c.train.output_dir = out.to_path_buf();
    c.train.resolution = 32;
    c.train.train_batch_size = 2;
    c.train.max_train_steps = Some(3);
    c.train.learning_rate = if lora { 1e-2 } else { 1e-3 };
    c.train.lr_warmup_steps = 0;
    c.train.lr_scheduler = LrScheduleKind::Constant;
    c.train.checkpointing_steps = 100;
    c.train.seed = 3;
    c.train.show_progress = false;
    c.train.validation = v;
    c
}

/// Train with and without validation: the same steps and the same result file.
fn dreambooth_case(lora: bool, text: bool, result: &str) {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_dreambooth(
        &dreambooth_config(
            plain_dir.path(),
            lora,
            text,
            PromptValidationConfig::default(),
        ),
        &device(),
    )
    .unwrap();
    assert!(!validation_dir(plain_dir.path()).exists());
    let dir = tempfile::tempdir().unwrap();
    let with = train_dreambooth(
        &dreambooth_config(dir.path(), lora, text, validation(Some(2), None)),
        &device(),
    )
    .unwrap();
    assert_eq!(with.steps, plain.steps);
    assert_eq!(
        read(&dir.path().join(result)),
        read(&plain_dir.path().join(result))
    );
    // The tiny SD1 pipeline makes 32x32 images.
    check_grids(dir.path(), 32, "a photo of sks dog");
}

#[test]
fn dreambooth_full_validation_images_leave_training_unchanged() {
    dreambooth_case(false, false, "unet/diffusion_pytorch_model.safetensors");
}

#[test]
fn dreambooth_lora_validation_images_leave_training_unchanged() {
    dreambooth_case(true, false, "pytorch_lora_weights.safetensors");
}

#[test]
fn dreambooth_text_encoder_lora_validation_images_leave_training_unchanged() {
    dreambooth_case(true, true, "pytorch_lora_weights.safetensors");
}

/// The last grid of a `train_text_encoder` run is the pipeline with both saved LoRAs merged:
/// the same bytes as one made from `pytorch_lora_weights.safetensors`, and not those of the UNet
/// LoRA alone.
#[test]
fn dreambooth_text_encoder_lora_validation_merges_both_loras() {
    let dir = tempfile::tempdir().unwrap();
    let config = dreambooth_config(dir.path(), true, true, validation(Some(2), None));
    train_dreambooth(&config, &device()).unwrap();
    let dev = device();
    let file = SafetensorsFile::open(dir.path().join("pytorch_lora_weights.safetensors")).unwrap();
    let lora_config = config.train.lora.clone().unwrap();
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let mut unet_lora = UNetLora::new(&unet, &lora_config, 0, &dev).unwrap();
    unet_lora.load_factors(&file, "unet.").unwrap();
    let text_encoder = CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
    let text_config = LoraTrainConfig {
        alpha: lora_config.alpha,
        ..LoraTrainConfig::text_encoder(lora_config.rank)
    };
    let mut text_lora = UNetLora::new_text_encoder(&text_encoder, &text_config, 0, &dev).unwrap();
    text_lora.load_factors(&file, "text_encoder.").unwrap();
    let tokenizer = CLIPTokenizer::from_pretrained(sd1().join("tokenizer")).unwrap();
    let vae = AutoencoderKL::from_pretrained(sd1().join("vae"), &dev).unwrap();
    let scheduler = AnyScheduler::from_config_file(sd1().join("scheduler")).unwrap();
    // Step 3 is the first step of epoch 1 (two micro-batches per epoch).
    let at = ValidationPoint { step: 3, epoch: 1 };
    let make = |encoder: &CLIPTextModel, out: &Path| {
        let parts = FrozenParts {
            tokenizer: &tokenizer,
            text_encoder: encoder,
            vae: &vae,
            scheduler: &scheduler,
        };
        let unet = unet_lora.apply(&unet);
        save_prompt_validation(unet, parts, &config.train.validation, 3, out, at).unwrap()
    };
    let both = tempfile::tempdir().unwrap();
    let merged = text_lora.apply_to(&text_encoder);
    assert_eq!(
        read(&make(&merged, both.path())),
        read(&validation_path(dir.path(), 3))
    );
    let unet_only = tempfile::tempdir().unwrap();
    assert_ne!(
        read(&make(&text_encoder, unet_only.path())),
        read(&validation_path(dir.path(), 3))
    );
}

/// Under fp16 (half frozen encoders, f32 validation copies) validation still leaves the steps
/// and the LoRA file unchanged, for DreamBooth with the text-encoder LoRA and for SDXL.
#[test]
fn fp16_runs_with_validation_images_leave_training_unchanged() {
    type Run = fn(&Path, PromptValidationConfig) -> Vec<f32>;
    let runs: [(Run, &str); 2] = [
        (
            |out, v| {
                let mut c = dreambooth_config(out, true, true, v);
                c.train.mixed_precision = "fp16".into();
                let report = train_dreambooth(&c, &device()).unwrap();
                report.steps.iter().map(|s| s.loss).collect()
            },
            "dreambooth",
        ),
        (
            |out, v| {
                let mut c = sdxl_config(out, true, v);
                c.text_to_image.mixed_precision = "fp16".into();
                let report = train_text_to_image_sdxl(&c, &device()).unwrap();
                report.steps.iter().map(|s| s.loss).collect()
            },
            "sdxl",
        ),
    ];
    for (run, what) in runs {
        let plain_dir = tempfile::tempdir().unwrap();
        let plain = run(plain_dir.path(), PromptValidationConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let with = run(dir.path(), validation(Some(2), None));
        assert_eq!(with, plain, "{what}");
        let weights = "pytorch_lora_weights.safetensors";
        assert_eq!(
            read(&dir.path().join(weights)),
            read(&plain_dir.path().join(weights)),
            "{what}"
        );
        assert_eq!(pngs(dir.path()).len(), 4, "{what}");
    }
}

/// A `train_text_encoder` run resumed from its step-2 checkpoint writes the same step-3 grid,
/// byte for byte, and no step-0 grid.
#[test]
fn resumed_dreambooth_run_writes_the_same_later_grid() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = dreambooth_config(dir.path(), true, true, validation(Some(2), None));
    config.train.checkpointing_steps = 2;
    let full = train_dreambooth(&config, &device()).unwrap();
    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(
        &dir.path().join("checkpoint-2"),
        &resumed_dir.path().join("checkpoint-2"),
    );
    config.train.output_dir = resumed_dir.path().to_path_buf();
    config.train.resume_from_checkpoint = Some("latest".into());
    let resumed = train_dreambooth(&config, &device()).unwrap();
    assert_eq!(resumed.steps, full.steps[2..]);
    assert_eq!(pngs(resumed_dir.path()), [STRIP_FILE, "step-000003.png"]);
    assert_eq!(
        read(&validation_path(resumed_dir.path(), 3)),
        read(&validation_path(dir.path(), 3))
    );
}

fn ti_config(out: &Path, v: PromptValidationConfig) -> TextualInversionConfig {
    TextualInversionConfig {
        pretrained_model: sd1(),
        train_data_dir: data(),
        output_dir: out.to_path_buf(),
        placeholder_token: "<sks>".into(),
        initializer_token: "red".into(),
        num_vectors: 2,
        repeats: 1,
        resolution: 32,
        train_batch_size: 2,
        max_train_steps: Some(3),
        learning_rate: 5e-2,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        save_steps: 100,
        checkpointing_steps: 100,
        show_progress: false,
        validation: v,
        ..TextualInversionConfig::default()
    }
}

#[test]
fn textual_inversion_validation_images_use_the_learned_embeddings() {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_textual_inversion(
        &ti_config(plain_dir.path(), PromptValidationConfig::default()),
        &device(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut v = validation(Some(2), None);
    // The placeholder's learned rows are what changes between the grids.
    v.validation_prompts = vec!["a photo of sks dog <sks>".into()];
    let with = train_textual_inversion(&ti_config(dir.path(), v.clone()), &device()).unwrap();
    assert_eq!(with.steps, plain.steps);
    let embeds = "learned_embeds.safetensors";
    assert_eq!(
        read(&dir.path().join(embeds)),
        read(&plain_dir.path().join(embeds))
    );
    // The UNet is frozen: the later grids differ by the learned embeddings alone.
    check_grids(dir.path(), 32, "a photo of sks dog <sks>");

    let bad = TextualInversionConfig {
        validation: PromptValidationConfig {
            num_inference_steps: 0,
            ..v
        },
        ..ti_config(dir.path(), PromptValidationConfig::default())
    };
    let err = train_textual_inversion(&bad, &device()).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument { name, .. } if name == "validation.num_inference_steps"),
        "{err}"
    );
}

fn sdxl_config(out: &Path, lora: bool, v: PromptValidationConfig) -> SdxlTrainConfig {
    SdxlTrainConfig {
        text_to_image: TextToImageConfig {
            pretrained_model: sdxl(),
            train_data_dir: data(),
            output_dir: out.to_path_buf(),
            resolution: 32,
            train_batch_size: 2,
            max_train_steps: Some(3),
            learning_rate: if lora { 1e-2 } else { 1e-3 },
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            checkpointing_steps: 100,
            lora: lora.then(LoraTrainConfig::default),
            show_progress: false,
            validation: v,
            ..TextToImageConfig::default()
        },
        ..SdxlTrainConfig::default()
    }
}

/// 4 images in batches of 2: step 2 ends epoch 0, step 3 is the last.
fn sdxl_case(lora: bool, result: &str) {
    let plain_dir = tempfile::tempdir().unwrap();
    let plain = train_text_to_image_sdxl(
        &sdxl_config(plain_dir.path(), lora, PromptValidationConfig::default()),
        &device(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with = train_text_to_image_sdxl(
        &sdxl_config(dir.path(), lora, validation(None, Some(1))),
        &device(),
    )
    .unwrap();
    assert_eq!(with.steps, plain.steps);
    assert_eq!(
        read(&dir.path().join(result)),
        read(&plain_dir.path().join(result))
    );
    let side = load_image(validation_path(dir.path(), 0)).unwrap().height() - 4;
    check_grids(dir.path(), side, "a photo of sks dog");
}

#[test]
fn sdxl_full_validation_images_by_epoch_leave_training_unchanged() {
    sdxl_case(false, "unet/diffusion_pytorch_model.safetensors");
}

#[test]
fn sdxl_lora_validation_images_by_epoch_leave_training_unchanged() {
    sdxl_case(true, "pytorch_lora_weights.safetensors");
}
