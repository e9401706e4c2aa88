//! `diffusers train instruct-pix2pix` on the tiny SD1 pipeline and the four pairs of
//! fixtures/train/instruct_pix2pix/data: flag validation before loading, and a two-step run
//! whose pipeline folder has an 8-channel UNet.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn train(out: &Path, extra: &[&str]) -> Output {
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
            "2",
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
        (&["--mixed-precision", "bf16"][..], "mixed_precision"),
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
}
