//! `diffusers train instruct-pix2pix` on the tiny SD1 pipeline and the four pairs of
//! fixtures/train/instruct_pix2pix/data: flag validation before loading, a two-step run
//! whose pipeline folder has an 8-channel UNet, and validation edits of a bf16 run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn train(out: &Path, extra: &[&str]) -> Output {
    train_batch(out, "2", extra)
}

/// [`train`] with `--train-batch-size batch`.
fn train_batch(out: &Path, batch: &str, extra: &[&str]) -> Output {
    let model = fixtures().join("pipelines/sd/sd1");
    let data = fixtures().join("train/instruct_pix2pix/data");
    Command::new(env!("CARGO_BIN_EXE_diffusers"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["train", "instruct-pix2pix", "--model"])
        .arg(&model)
        .arg("--train-data-dir")
        .arg(&data)
        .arg("--output-dir")
        .arg(out)
        .args([
            "--resolution",
            "32",
            "--train-batch-size",
            batch,
            "--random-flip",
            "--learning-rate",
            "1e-3",
            "--quiet",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn flags_are_validated_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, needle) in [
        (&["--resolution", "0"][..], "resolution"),
        (&["--validation-epochs", "0"][..], "validation_epochs"),
        (
            &["--conditioning-dropout-prob", "1.5"][..],
            "conditioning_dropout_prob",
        ),
        (&["--edit-prompt-column", ""][..], "edit_prompt_column"),
    ] {
        let out = train(dir.path(), flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    assert!(!dir.path().join("logs").exists());
}

#[test]
fn two_steps_save_an_eight_channel_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let output = train(
        &out,
        &[
            "--max-train-steps",
            "2",
            "--conditioning-dropout-prob",
            "0.05",
            "--checkpointing-steps",
            "1",
            "--checkpoints-total-limit",
            "1",
            "--seed",
            "3",
        ],
    );
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("logs/train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["in_channels"], 8);
    for sub in ["vae", "text_encoder", "tokenizer", "scheduler"] {
        assert!(out.join(sub).is_dir(), "{sub}/ missing");
    }
    assert!(out.join("checkpoint-2/unet").is_dir());
    assert!(
        !out.join("checkpoint-1").exists(),
        "pruned to one checkpoint"
    );

    // Over two CPU handles with one example each: the same global batches and draws, so the
    // losses are the one-device run's up to the order of sums.
    let parallel = dir.path().join("parallel");
    let output = train_batch(
        &parallel,
        "1",
        &[
            "--max-train-steps",
            "2",
            "--conditioning-dropout-prob",
            "0.05",
            "--seed",
            "3",
            "--devices",
            "cpu,cpu",
        ],
    );
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("logs/train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (one, two) = (losses(&out), losses(&parallel));
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() <= 1e-5, "{one:?} vs {two:?}");
    }
}

#[test]
fn validation_flags_write_edits_with_their_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let image = fixtures().join("train/instruct_pix2pix/data/0_original.png");
    let image = image.to_str().unwrap();
    let missing = dir.path().join("missing.png");
    let missing = missing.to_str().unwrap();
    for (flags, needle) in [
        (&["--validation-prompt", "make it red"][..], "val_image_url"),
        (&["--val-image-url", image][..], "validation_prompt"),
        (
            &["--val-image-url", missing, "--validation-prompt", "x"][..],
            "missing.png",
        ),
        (
            &[
                "--val-image-url",
                image,
                "--validation-prompt",
                "x",
                "--num-validation-images",
                "0",
            ][..],
            "num_validation_images",
        ),
    ] {
        let out = train(&dir.path().join("refused"), flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(
            !dir.path().join("refused").exists(),
            "{flags:?} wrote files"
        );
    }

    let out = dir.path().join("run");
    let output = train(
        &out,
        &[
            "--max-train-steps",
            "2",
            "--seed",
            "4",
            "--val-image-url",
            image,
            "--validation-prompt",
            "make it red",
            "--num-validation-images",
            "1",
            "--mixed-precision",
            "bf16",
        ],
    );
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Step 0, and step 2: the end of epoch 0 and the last step.
    for name in ["step-000000.png", "step-000002.png", "progress.png"] {
        assert!(
            out.join("validation").join(name).is_file(),
            "{name} missing"
        );
    }
    let text = diffusion_core::image::read_png_text(out.join("validation/step-000002.png"))
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "parameters")
        .unwrap()
        .1;
    for field in [
        "make it red\n",
        "Image CFG scale: 1.5",
        "Seed: 4",
        "Batch size: 1",
        "Training step: 2",
    ] {
        assert!(text.contains(field), "{field} not in {text:?}");
    }
    // The trained folder is what `edit-instruct-pix2pix` loads.
    let edit = out.join("edit.png");
    let output = Command::new(env!("CARGO_BIN_EXE_diffusers"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["edit-instruct-pix2pix", "--model"])
        .arg(&out)
        .args(["--image", image, "--prompt", "make it red", "--steps", "2"])
        .args(["--seed", "0", "--quiet", "--output"])
        .arg(&edit)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "edit failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(edit.is_file());
}
