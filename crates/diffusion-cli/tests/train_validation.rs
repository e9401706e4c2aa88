//! Validation images from the `train` commands: `train unconditional --save-images-steps` on one
//! digit class of a fine-tuned tiny UNet, `train lora --validation-prompt` on the tiny SD1
//! pipeline, and bad validation flags refused before anything is loaded or written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn unconditional(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffusers"))
        .args(["train", "unconditional", "--digits"])
        .arg(fixtures().join("train/digits_head.csv.gz"))
        .arg("--pretrained-model")
        .arg(fixtures().join("train/tiny_unet"))
        .arg("--output-dir")
        .arg(out)
        .args([
            "--resolution",
            "8",
            "--train-batch-size",
            "2",
            "--max-train-steps",
            "2",
            "--quiet",
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn parameters(path: &Path) -> String {
    diffusion_core::image::read_png_text(path)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v)
        .unwrap_or_default()
}

#[test]
fn unconditional_one_class_with_validation_grids() {
    let dir = tempfile::tempdir().unwrap();
    let out = unconditional(
        dir.path(),
        &[
            "--digits-class",
            "3",
            "--save-images-steps",
            "1",
            "--eval-batch-size",
            "2",
            "--ddpm-num-inference-steps",
            "3",
            "--validation-sampler",
            "ddim",
            "--validation-seed",
            "9",
        ],
    );
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The two 3s of the fixture's 16 digits.
    assert!(stderr.contains("training on 2 images"), "{stderr}");
    let validation = dir.path().join("validation");
    assert_eq!(
        listing(&validation),
        [
            "progress.png",
            "step-000000.png",
            "step-000001.png",
            "step-000002.png"
        ]
    );
    let text = parameters(&validation.join("step-000002.png"));
    for field in [
        "Steps: 3",
        "Sampler: DDIMScheduler",
        "Seed: 9",
        "Batch size: 2",
        "Training step: 2",
    ] {
        assert!(text.contains(field), "{field} not in {text:?}");
    }
}

#[test]
fn bad_validation_flags_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, needle) in [
        (
            &["--eval-batch-size", "0"][..],
            "validation.eval_batch_size",
        ),
        (
            &["--save-images-steps", "0"][..],
            "validation.save_images_steps",
        ),
        (
            &[
                "--save-images-steps",
                "1",
                "--ddpm-num-inference-steps",
                "0",
            ][..],
            "validation.num_inference_steps",
        ),
        (&["--digits-class", "11"][..], "--digits-class"),
        (&["--validation-sampler", "euler"][..], "euler"),
    ] {
        let out = unconditional(dir.path(), flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    assert!(!dir.path().join("logs").exists());
    assert!(!dir.path().join("validation").exists());

    // Validation options of the text-to-image commands need a prompt.
    let out = Command::new(env!("CARGO_BIN_EXE_diffusers"))
        .args(["train", "lora", "--model"])
        .arg(fixtures().join("pipelines/sd/sd1"))
        .arg("--train-data-dir")
        .arg(fixtures().join("train/text_to_image/data"))
        .arg("--output-dir")
        .arg(dir.path())
        .args(["--validation-steps", "2", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--validation-prompt"));
    assert!(!dir.path().join("logs").exists());
}

#[test]
fn lora_with_a_validation_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_diffusers"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["train", "lora", "--model"])
        .arg(fixtures().join("pipelines/sd/sd1"))
        .arg("--train-data-dir")
        .arg(fixtures().join("train/text_to_image/data"))
        .arg("--output-dir")
        .arg(dir.path())
        .args([
            "--resolution",
            "32",
            "--train-batch-size",
            "2",
            "--max-train-steps",
            "1",
            "--validation-prompt",
            "a photo of a cat",
            "--num-validation-images",
            "1",
            "--validation-inference-steps",
            "2",
            "--quiet",
        ])
        .output()
        .unwrap();
    ok(&out);
    let validation = dir.path().join("validation");
    assert_eq!(
        listing(&validation),
        ["progress.png", "step-000000.png", "step-000001.png"]
    );
    let text = parameters(&validation.join("step-000001.png"));
    assert!(
        text.starts_with("a photo of a cat\n") && text.contains("Steps: 2"),
        "{text}"
    );
    assert!(
        dir.path()
            .join("pytorch_lora_weights.safetensors")
            .is_file()
    );
}

#[test]
fn unconditional_accepts_mixed_precision_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let out = unconditional(dir.path(), &["--mixed-precision", "bf16"]);
    ok(&out);
    let log = std::fs::read_to_string(dir.path().join("logs/train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 2, "{log}");
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{log}");
    assert!(
        dir.path()
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    // A value outside no|fp16|bf16 is refused by name.
    let bad = unconditional(&dir.path().join("bad"), &["--mixed-precision", "fp8"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("fp8"));
}

/// `train dreambooth --lora --train-text-encoder` and `train textual-inversion` with the
/// validation flags: grids at steps 0, 1 and 2 with their settings; a stray validation flag
/// without a prompt is refused before training.
#[test]
fn dreambooth_and_textual_inversion_validation_images() {
    let data = fixtures().join("train/text_to_image/data");
    let data = data.to_str().unwrap();
    let sd1 = fixtures().join("pipelines/sd/sd1");
    let sd1 = sd1.to_str().unwrap();
    let common = [
        "--model",
        sd1,
        "--resolution",
        "32",
        "--train-batch-size",
        "2",
        "--max-train-steps",
        "2",
        "--lr-warmup-steps",
        "0",
        "--quiet",
        "--validation-steps",
        "1",
        "--num-validation-images",
        "1",
        "--validation-inference-steps",
        "2",
        "--validation-seed",
        "4",
    ];
    let cases: [(&str, &[&str], &str); 2] = [
        (
            "dreambooth",
            &[
                "--instance-data-dir",
                data,
                "--instance-prompt",
                "a photo of sks dog",
                "--lora",
                "--train-text-encoder",
            ],
            "a photo of sks dog",
        ),
        (
            "textual-inversion",
            &[
                "--train-data-dir",
                data,
                "--placeholder-token",
                "<sks>",
                "--initializer-token",
                "red",
                "--repeats",
                "1",
            ],
            "a photo of <sks>",
        ),
    ];
    for (command, flags, prompt) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_diffusers"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["train", command, "--output-dir"])
            .arg(dir.path())
            .args(common)
            .args(flags)
            .args(["--validation-prompt", prompt])
            .output()
            .unwrap();
        ok(&out);
        let validation = dir.path().join("validation");
        assert_eq!(
            listing(&validation),
            [
                "progress.png",
                "step-000000.png",
                "step-000001.png",
                "step-000002.png"
            ],
            "{command}"
        );
        let text = parameters(&validation.join("step-000001.png"));
        assert!(
            text.starts_with(&format!("{prompt}\n")),
            "{command}: {text}"
        );
        for field in ["Steps: 2", "Seed: 4", "Batch size: 1", "Training step: 1"] {
            assert!(text.contains(field), "{command}: {field} not in {text:?}");
        }

        // The validation options need a prompt.
        let stray = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_diffusers"))
            .env("HF_HUB_OFFLINE", "1")
            .args(["train", command, "--output-dir"])
            .arg(stray.path())
            .args(common)
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{command} ran without a prompt");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--validation-prompt"), "{command}: {err}");
        assert!(!stray.path().join("validation").exists());
    }
}
