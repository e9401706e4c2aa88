//! `diffusers train text-to-image` and `diffusers train lora` on the tiny SD1 pipeline and the
//! four-image dataset of fixtures/train/text_to_image/data: flag validation before loading,
//! two-step runs with their outputs, and a resumed run that equals the uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn train(kind: &str, out: &Path, extra: &[&str]) -> Output {
    let model = fixtures().join("pipelines/sd/sd1");
    let data = fixtures().join("train/text_to_image/data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1")
        .args(["train", kind, "--model"])
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
        .args(extra);
    cmd.output().unwrap()
}

fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("logs/train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn flags_are_validated_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    for (flags, needle) in [
        (&["--resolution", "0"][..], "resolution"),
        (&["--mixed-precision", "fp8"][..], "mixed-precision"),
        (&["--snr-gamma=-1"][..], "snr_gamma"),
        (
            &["--gradient-accumulation-steps", "0"][..],
            "gradient_accumulation_steps",
        ),
    ] {
        let out = train("text-to-image", dir.path(), flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    let out = train("lora", dir.path(), &["--rank", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("rank"));
    // Nothing was loaded or written.
    assert!(!dir.path().join("logs").exists());
}

#[test]
fn lora_two_steps_and_exact_resume() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let common = [
        "--snr-gamma",
        "5",
        "--noise-offset",
        "0.05",
        "--checkpointing-steps",
        "1",
    ];
    let out = train(
        "lora",
        &straight,
        &[&common[..], &["--max-train-steps", "2"]].concat(),
    );
    ok(&out);
    let lora = straight.join("pytorch_lora_weights.safetensors");
    assert!(lora.is_file());
    assert!(
        straight
            .join("checkpoint-1/pytorch_lora_weights.safetensors")
            .is_file()
    );
    let straight_log = log_lines(&straight);
    assert_eq!(straight_log.len(), 2);

    // One step, then resume for the second: the same losses and the same file.
    let resumed = dir.path().join("resumed");
    ok(&train(
        "lora",
        &resumed,
        &[&common[..], &["--max-train-steps", "1"]].concat(),
    ));
    ok(&train(
        "lora",
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
    assert_eq!(log_lines(&resumed), straight_log);
    assert_eq!(
        std::fs::read(resumed.join("pytorch_lora_weights.safetensors")).unwrap(),
        std::fs::read(&lora).unwrap()
    );
}

#[test]
fn text_to_image_two_steps_writes_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("ft");
    let out = train(
        "text-to-image",
        &out_dir,
        &[
            "--max-train-steps",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--use-ema",
            "--cache-latents",
            "--prediction-type",
            "v-prediction",
        ],
    );
    ok(&out);
    for file in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(out_dir.join(file).is_file(), "{file} missing");
    }
    let log = log_lines(&out_dir);
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    assert!(log[0]["ema_decay"].is_number());
}
