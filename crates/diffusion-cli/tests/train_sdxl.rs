//! `diffusers train text-to-image` and `diffusers train lora` on the tiny SDXL pipeline
//! (fixtures/pipelines/sd/sdxl, detected from its model_index.json) and the two-image dataset
//! of fixtures/train/sdxl/data: SDXL-only flags refused on SD1 and checked before loading, a
//! two-step full fine-tuning run whose pipeline folder loads as an SDXL pipeline, and two-step
//! LoRA runs (UNet only, and with `--train-text-encoder`) whose files load into it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffusion_core::Device;
use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_pipelines::{Generators, StableDiffusionXLArgs, StableDiffusionXLPipeline};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn train(kind: &str, model: &str, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1")
        .args(["train", kind, "--model"])
        .arg(fixtures().join("pipelines/sd").join(model))
        .arg("--train-data-dir")
        .arg(fixtures().join("train/sdxl/data"))
        .arg("--output-dir")
        .arg(out)
        .args([
            "--resolution",
            "32",
            "--train-batch-size",
            "2",
            "--random-flip",
            "--learning-rate",
            "1e-3",
            "--quiet",
        ])
        .args(extra);
    cmd.output().unwrap()
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn log_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("logs/train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// A 2-step 32x32 generation of an SDXL pipeline folder (with an optional LoRA).
fn generate(folder: &Path, lora: Option<&Path>) -> Vec<f32> {
    let device = Device::flex();
    let mut pipe = StableDiffusionXLPipeline::from_pretrained(folder.to_str().unwrap(), &device)
        .expect("the saved folder loads as an SDXL pipeline");
    if let Some(lora) = lora {
        let report = pipe
            .components
            .load_lora_weights(lora, "trained")
            .expect("the saved LoRA loads");
        assert!(!report.matched_modules.is_empty());
    }
    let out = pipe
        .call(StableDiffusionXLArgs {
            prompt: vec!["a red square".into()],
            height: Some(32),
            width: Some(32),
            num_inference_steps: 2,
            generator: Generators::Seed(0),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        })
        .unwrap();
    let ImageOutput::Array(images) = out.images else {
        panic!("expected an array");
    };
    images.data
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn sdxl_flags_are_checked_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, model, flags, needle) in [
        (
            "text-to-image",
            "sd1",
            &["--proportion-empty-prompts", "0.1"][..],
            "SDXL option",
        ),
        (
            "text-to-image",
            "sdxl",
            &["--proportion-empty-prompts", "2"][..],
            "proportion_empty_prompts",
        ),
        (
            "text-to-image",
            "sdxl",
            &["--input-perturbation", "0.1"][..],
            "input_perturbation",
        ),
        ("lora", "sd1", &["--train-text-encoder"][..], "SDXL option"),
        (
            "text-to-image",
            "sdxl",
            &["--train-text-encoder"][..],
            "train_text_encoder",
        ),
        (
            "lora",
            "sdxl",
            &["--train-text-encoder", "--cache-latents"][..],
            "cache_latents",
        ),
        (
            "lora",
            "sdxl",
            &["--timestep-bias-strategy", "later"][..],
            "timestep_bias_strategy",
        ),
        (
            "text-to-image",
            "sdxl",
            &[
                "--timestep-bias-strategy",
                "later",
                "--timestep-bias-multiplier",
                "0",
            ][..],
            "timestep_bias_multiplier",
        ),
    ] {
        let out = train(kind, model, dir.path(), flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{kind} {model} {flags:?} was accepted"
        );
        assert!(err.contains(needle), "{kind} {model} {flags:?}: {err}");
    }
    assert!(!dir.path().join("logs").exists());
}

#[test]
fn sdxl_full_fine_tuning_two_steps_saves_a_loadable_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("full");
    ok(&train(
        "text-to-image",
        "sdxl",
        &out,
        &[
            "--max-train-steps",
            "2",
            "--proportion-empty-prompts",
            "0.5",
            "--timestep-bias-strategy",
            "later",
            "--checkpointing-steps",
            "1",
        ],
    ));
    let losses = log_losses(&out);
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    assert!(out.join("checkpoint-1/unet/config.json").is_file());
    for sub in ["text_encoder_2", "tokenizer_2", "vae", "scheduler"] {
        assert!(out.join(sub).is_dir(), "{sub} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["proportion_empty_prompts"], 0.5);
    assert_eq!(config["timestep_bias"]["strategy"], "later");
    // The fine-tuned UNet changes the generation of the base pipeline.
    let base = generate(&fixtures().join("pipelines/sd/sdxl"), None);
    let tuned = generate(&out, None);
    assert!(max_abs_diff(&base, &tuned) > 0.0);
}

#[test]
fn sdxl_lora_two_steps_resume_exactly_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--rank",
        "2",
        "--snr-gamma",
        "5",
        "--noise-offset",
        "0.05",
        "--checkpointing-steps",
        "1",
    ];
    let straight = dir.path().join("straight");
    ok(&train(
        "lora",
        "sdxl",
        &straight,
        &[&common[..], &["--max-train-steps", "2"]].concat(),
    ));
    let file = straight.join("pytorch_lora_weights.safetensors");
    assert!(file.is_file());
    assert!(
        straight
            .join("checkpoint-1/pytorch_lora_weights.safetensors")
            .is_file()
    );
    let losses = log_losses(&straight);
    assert_eq!(losses.len(), 2);

    // One step, then resume for the second: the same losses and the same file.
    let resumed = dir.path().join("resumed");
    ok(&train(
        "lora",
        "sdxl",
        &resumed,
        &[&common[..], &["--max-train-steps", "1"]].concat(),
    ));
    ok(&train(
        "lora",
        "sdxl",
        &resumed,
        &[
            &common[..],
            &[
                "--max-train-steps",
                "2",
                "--resume-from-checkpoint",
                "latest",
            ],
        ]
        .concat(),
    ));
    assert_eq!(log_losses(&resumed), losses);
    assert_eq!(
        std::fs::read(resumed.join("pytorch_lora_weights.safetensors")).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // Over two CPU handles: the dataset's two images make one global batch, one image per
    // device, so the steps are the one-device run's up to the order of sums.
    let parallel = dir.path().join("parallel");
    ok(&train(
        "lora",
        "sdxl",
        &parallel,
        &[
            &common[..],
            &["--max-train-steps", "2", "--devices", "cpu,cpu"],
        ]
        .concat(),
    ));
    let parallel_losses = log_losses(&parallel);
    assert_eq!(parallel_losses.len(), 2);
    for (a, b) in losses.iter().zip(&parallel_losses) {
        assert!((a - b).abs() <= 1e-5, "{losses:?} vs {parallel_losses:?}");
    }

    let base_folder = fixtures().join("pipelines/sd/sdxl");
    let base = generate(&base_folder, None);
    let with_lora = generate(&base_folder, Some(&file));
    assert_eq!(base.len(), with_lora.len());
    assert!(with_lora.iter().all(|v| v.is_finite()));
    assert!(
        max_abs_diff(&base, &with_lora) > 0.0,
        "the trained LoRA changes nothing"
    );
}

/// `train lora --train-text-encoder` on SDXL: one file with the UNet's and both text encoders'
/// LoRAs, exact resumption, and a generation that the text-encoder LoRAs change.
#[test]
fn sdxl_lora_with_text_encoders_two_steps_resume_exactly_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--rank",
        "2",
        "--train-text-encoder",
        "--checkpointing-steps",
        "1",
    ];
    let straight = dir.path().join("straight");
    ok(&train(
        "lora",
        "sdxl",
        &straight,
        &[&common[..], &["--max-train-steps", "2"]].concat(),
    ));
    let file = straight.join("pytorch_lora_weights.safetensors");
    let saved = diffusion_core::weights::SafetensorsFile::open(&file).unwrap();
    for prefix in ["unet.", "text_encoder.", "text_encoder_2."] {
        assert!(
            saved.keys().iter().any(|k| k.starts_with(prefix)),
            "no `{prefix}` keys in {}",
            file.display()
        );
    }
    let losses = log_losses(&straight);
    assert_eq!(losses.len(), 2);

    let resumed = dir.path().join("resumed");
    ok(&train(
        "lora",
        "sdxl",
        &resumed,
        &[&common[..], &["--max-train-steps", "1"]].concat(),
    ));
    ok(&train(
        "lora",
        "sdxl",
        &resumed,
        &[
            &common[..],
            &[
                "--max-train-steps",
                "2",
                "--resume-from-checkpoint",
                "latest",
            ],
        ]
        .concat(),
    ));
    assert_eq!(log_losses(&resumed), losses);
    assert_eq!(
        std::fs::read(resumed.join("pytorch_lora_weights.safetensors")).unwrap(),
        std::fs::read(&file).unwrap()
    );

    // The same file without its text-encoder keys generates something else.
    let unet_only = dir.path().join("unet_only.safetensors");
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = saved
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("unet."))
        .map(|k| {
            let (values, shape) = saved.read_f32(&k).unwrap();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k, shape, bytes)
        })
        .collect();
    let views = tensors.iter().map(|(k, shape, bytes)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .unwrap();
        (k.as_str(), view)
    });
    std::fs::write(&unet_only, safetensors::serialize(views, None).unwrap()).unwrap();
    let base_folder = fixtures().join("pipelines/sd/sdxl");
    let with_all = generate(&base_folder, Some(&file));
    let with_unet = generate(&base_folder, Some(&unet_only));
    assert!(with_all.iter().all(|v| v.is_finite()));
    assert!(
        max_abs_diff(&with_all, &with_unet) > 0.0,
        "the text-encoder LoRAs change nothing"
    );
}
