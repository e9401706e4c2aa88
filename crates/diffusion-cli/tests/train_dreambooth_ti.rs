//! `diffusers train dreambooth` (full and --lora, with prior preservation) and `diffusers train
//! textual-inversion` on the tiny SD1 pipeline and fixtures/train/text_to_image/data: flags
//! checked before loading, two-step runs and their outputs.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn run(args: &[&str], extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffusers"))
        .env("HF_HUB_OFFLINE", "1")
        .arg("train")
        .args(args)
        .arg("--model")
        .arg(fixtures().join("pipelines/sd/sd1"))
        .args(["--resolution", "32", "--max-train-steps", "2", "--quiet"])
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

#[test]
fn dreambooth_with_prior_preservation_full_and_lora() {
    let data = fixtures().join("train/text_to_image/data");
    let data = data.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--instance-data-dir",
        data,
        "--instance-prompt",
        "a photo of sks dog",
        "--class-data-dir",
        data,
        "--class-prompt",
        "a photo of dog",
        "--with-prior-preservation",
        "--train-batch-size",
        "1",
        "--learning-rate",
        "1e-3",
        "--lr-warmup-steps",
        "0",
    ];
    // Validated before loading: prior preservation without a class prompt.
    let out = run(
        &["dreambooth"],
        &[
            "--instance-data-dir",
            data,
            "--instance-prompt",
            "x",
            "--with-prior-preservation",
            "--output-dir",
            dir.path().join("bad").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("class_data_dir"));
    assert!(!dir.path().join("bad").exists());

    let full = dir.path().join("full");
    let mut args = common.to_vec();
    args.extend(["--output-dir", full.to_str().unwrap()]);
    ok(&run(&["dreambooth"], &args));
    assert!(
        full.join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    let log = std::fs::read_to_string(full.join("logs/train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2);

    let lora = dir.path().join("lora");
    let mut args = common.to_vec();
    args.extend([
        "--output-dir",
        lora.to_str().unwrap(),
        "--lora",
        "--rank",
        "2",
    ]);
    ok(&run(&["dreambooth"], &args));
    assert!(lora.join("pytorch_lora_weights.safetensors").is_file());
}

#[test]
fn textual_inversion_two_steps() {
    let data = fixtures().join("train/text_to_image/data");
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("ti");
    let base = [
        "--train-data-dir",
        data.to_str().unwrap(),
        "--placeholder-token",
        "<cat-toy>",
        "--num-vectors",
        "2",
        "--train-batch-size",
        "2",
        "--learning-rate",
        "5e-3",
        "--lr-warmup-steps",
        "0",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ];
    // A multi-token initializer is refused (after loading the tokenizer, before training).
    let mut args = base.to_vec();
    args.extend(["--initializer-token", "photo"]);
    let out = run(&["textual-inversion"], &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("initializer_token"));

    let mut args = base.to_vec();
    args.extend(["--initializer-token", "red"]);
    ok(&run(&["textual-inversion"], &args));
    let file =
        diffusion_core::weights::SafetensorsFile::open(out_dir.join("learned_embeds.safetensors"))
            .unwrap();
    assert_eq!(file.keys(), ["<cat-toy>"]);
    assert_eq!(file.read_f32("<cat-toy>").unwrap().1, [2, 8]);
}
