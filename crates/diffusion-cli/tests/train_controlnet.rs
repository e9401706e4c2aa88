//! `diffusers train controlnet` on the tiny SD1 pipeline, the starting ControlNet of
//! fixtures/train/controlnet/controlnet and the four rows of fixtures/train/controlnet/data:
//! flag validation before loading, and a two-step run whose ControlNet folder loads back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffusion_core::Device;
use diffusion_models::{ControlNetModel, ModelMixin};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Run the command with `extra` flags; the defaults below fill in the flags `extra` lacks.
fn train(out: &Path, extra: &[&str]) -> Output {
    let controlnet = fixtures().join("train/controlnet/controlnet");
    let controlnet = controlnet.to_str().unwrap();
    let defaults = [
        ("--controlnet-model", controlnet),
        ("--resolution", "32"),
        ("--train-batch-size", "2"),
        ("--learning-rate", "1e-3"),
        ("--lr-warmup-steps", "0"),
    ];
    let given = |flag: &str| {
        extra
            .iter()
            .any(|e| *e == flag || e.starts_with(&format!("{flag}=")))
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1")
        .args(["train", "controlnet", "--pretrained-model"])
        .arg(fixtures().join("pipelines/sd/sd1"))
        .arg("--train-data-dir")
        .arg(fixtures().join("train/controlnet/data"))
        .arg("--output-dir")
        .arg(out)
        .arg("--quiet");
    for (flag, value) in defaults {
        if !given(flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(extra);
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
    let out_dir = dir.path().join("out");
    for (flags, needle) in [
        (&["--resolution", "0"][..], "resolution"),
        (&["--resolution", "30"][..], "resolution"),
        (&["--train-batch-size", "0"][..], "train_batch_size"),
        (
            &["--gradient-accumulation-steps", "0"][..],
            "gradient_accumulation_steps",
        ),
        (
            &["--proportion-empty-prompts", "1.5"][..],
            "proportion_empty_prompts",
        ),
        (&["--max-train-steps", "0"][..], "max_train_steps"),
        (&["--learning-rate=-1"][..], "learning_rate"),
        (&["--checkpointing-steps", "0"][..], "checkpointing_steps"),
        (
            &["--controlnet-model", "/nonexistent/controlnet"][..],
            "nonexistent",
        ),
        (&["--lr-scheduler", "bogus"][..], "bogus"),
        (
            &["--validation-prompt", "a red square"][..],
            "validation.validation_image",
        ),
        (&["--validation-steps", "5"][..], "need --validation-prompt"),
        (&["--mixed-precision", "fp8"][..], "mixed_precision"),
        (
            &[
                "--validation-prompt",
                "a red square",
                "--validation-image",
                "/nonexistent/cond.png",
            ][..],
            "nonexistent",
        ),
    ] {
        let out = train(&out_dir, flags);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(needle), "{flags:?}: {err}");
        assert!(!err.contains("multiple times"), "{flags:?}: {err}");
    }
    // Nothing was loaded or written.
    assert!(!out_dir.exists());
}

#[test]
fn two_steps_write_a_loadable_controlnet_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let steps = |n: &'static str| ["--max-train-steps", n, "--checkpointing-steps", "1"];
    ok(&train(&straight, &steps("2")));
    for file in [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "checkpoint-1/controlnet/config.json",
        "checkpoint-2/optimizer",
    ] {
        assert!(straight.join(file).exists(), "{file} missing");
    }
    let log = log_lines(&straight);
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    let controlnet = ControlNetModel::from_pretrained(&straight, &Device::flex()).unwrap();
    assert_eq!(controlnet.config().conditioning_channels, 3);

    // One step, then resume for the second: the same log and the same weights.
    let resumed = dir.path().join("resumed");
    ok(&train(&resumed, &steps("1")));
    ok(&train(
        &resumed,
        &[&steps("2")[..], &["--resume-from-checkpoint", "latest"]].concat(),
    ));
    assert_eq!(log_lines(&resumed), log);
    assert_eq!(
        std::fs::read(resumed.join("diffusion_pytorch_model.safetensors")).unwrap(),
        std::fs::read(straight.join("diffusion_pytorch_model.safetensors")).unwrap()
    );

    // Over two CPU handles, one row each: the one-device losses up to the order of sums.
    let parallel = dir.path().join("parallel");
    ok(&train(
        &parallel,
        &[
            &steps("2")[..],
            &["--train-batch-size", "1", "--devices", "cpu,cpu"],
        ]
        .concat(),
    ));
    let two = log_lines(&parallel);
    assert_eq!(two.len(), 2);
    for (a, b) in log.iter().zip(&two) {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
}

#[test]
fn validation_images_are_written_and_leave_training_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let with = dir.path().join("with");
    let steps = ["--max-train-steps", "2", "--checkpointing-steps", "5"];
    ok(&train(&plain, &steps));
    let cond = fixtures().join("train/controlnet/data/0_cond.png");
    let cond = cond.to_str().unwrap();
    ok(&train(
        &with,
        &[
            &steps[..],
            &[
                "--validation-prompt",
                "a red square",
                "--validation-prompt",
                "two green lines",
                "--validation-image",
                cond,
                "--num-validation-images",
                "1",
                "--validation-steps",
                "1",
            ],
        ]
        .concat(),
    ));
    assert_eq!(log_lines(&with), log_lines(&plain));
    assert_eq!(
        std::fs::read(with.join("diffusion_pytorch_model.safetensors")).unwrap(),
        std::fs::read(plain.join("diffusion_pytorch_model.safetensors")).unwrap()
    );
    for name in ["step-000001.png", "step-000002.png", "progress.png"] {
        assert!(
            with.join("validation").join(name).is_file(),
            "{name} missing"
        );
    }
    let text =
        diffusion_core::image::read_png_text(with.join("validation/step-000002.png")).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    for want in [
        "Steps: 20",
        "Sampler: UniPCMultistepScheduler",
        "Training step: 2",
        "0_cond.png",
    ] {
        assert!(params.contains(want), "{want} missing from {params}");
    }
}
