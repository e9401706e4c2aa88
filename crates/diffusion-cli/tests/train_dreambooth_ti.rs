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
        // The fixture folder already has 4 images (5 entries): nothing is generated into it.
        "--num-class-images",
        "4",
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

    // Data-parallel LoRA over two CPU handles, one instance image (and its class image) each.
    let parallel = dir.path().join("parallel");
    let mut args = common.to_vec();
    args.extend([
        "--output-dir",
        parallel.to_str().unwrap(),
        "--lora",
        "--rank",
        "2",
        "--devices",
        "cpu,cpu",
    ]);
    ok(&run(&["dreambooth"], &args));
    assert!(parallel.join("pytorch_lora_weights.safetensors").is_file());
    let config = std::fs::read_to_string(parallel.join("train_config.json")).unwrap();
    assert!(config.contains("\"devices\""), "{config}");
    // With the text-encoder LoRA: every device runs its replica of both LoRAs.
    let both = dir.path().join("both");
    let mut args = common.to_vec();
    args.extend([
        "--output-dir",
        both.to_str().unwrap(),
        "--lora",
        "--rank",
        "2",
        "--train-text-encoder",
        "--devices",
        "cpu,cpu",
    ]);
    ok(&run(&["dreambooth"], &args));
    let file = diffusion_core::weights::SafetensorsFile::open(
        both.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    assert!(file.keys().iter().any(|k| k.starts_with("text_encoder.")));
    // A device this build does not have is refused before loading.
    let refused = dir.path().join("refused");
    let mut args = common.to_vec();
    args.extend([
        "--output-dir",
        refused.to_str().unwrap(),
        "--lora",
        "--devices",
        "cpu,tpu:1",
    ]);
    let out = run(&["dreambooth"], &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tpu:1"));
    assert!(!refused.exists());
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

    // bf16: the frozen UNet and VAE in bf16, the learned rows saved in f32.
    let bf16_dir = dir.path().join("ti-bf16");
    let mut args = base.to_vec();
    let last = args.len() - 1;
    args[last] = bf16_dir.to_str().unwrap();
    args.extend(["--initializer-token", "red", "--mixed-precision", "bf16"]);
    ok(&run(&["textual-inversion"], &args));
    let config = std::fs::read_to_string(bf16_dir.join("train_config.json")).unwrap();
    assert!(config.contains("\"mixed_precision\": \"bf16\""), "{config}");
    let file =
        diffusion_core::weights::SafetensorsFile::open(bf16_dir.join("learned_embeds.safetensors"))
            .unwrap();
    let (rows, shape) = file.read_f32("<cat-toy>").unwrap();
    assert_eq!(shape, [2, 8]);
    assert!(rows.iter().all(|v| v.is_finite()));

    // Data-parallel over two CPU handles (two images each).
    let parallel_dir = dir.path().join("ti-parallel");
    let mut args = base.to_vec();
    let last = args.len() - 1;
    args[last] = parallel_dir.to_str().unwrap();
    args.extend(["--initializer-token", "red", "--devices", "cpu,cpu"]);
    ok(&run(&["textual-inversion"], &args));
    assert!(parallel_dir.join("learned_embeds.safetensors").is_file());
    assert_eq!(log_text(&parallel_dir).lines().count(), 2);
}

fn log_text(out: &std::path::Path) -> String {
    std::fs::read_to_string(out.join("logs/train_log.jsonl")).unwrap()
}

#[test]
fn textual_inversion_exact_resume() {
    let data = fixtures().join("train/text_to_image/data");
    let dir = tempfile::tempdir().unwrap();
    let args = |out: &std::path::Path, steps: &'static str| {
        [
            "--train-data-dir",
            data.to_str().unwrap(),
            "--placeholder-token",
            "<cat-toy>",
            "--initializer-token",
            "red",
            "--repeats",
            "1",
            "--train-batch-size",
            "2",
            "--learning-rate",
            "5e-3",
            "--lr-warmup-steps",
            "0",
            "--checkpointing-steps",
            "1",
            "--max-train-steps",
            steps,
            "--output-dir",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let call = |extra: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_diffusers"))
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "train",
                "textual-inversion",
                "--resolution",
                "32",
                "--quiet",
            ])
            .arg("--model")
            .arg(fixtures().join("pipelines/sd/sd1"))
            .args(extra)
            .output()
            .unwrap()
    };
    let straight = dir.path().join("straight");
    ok(&call(args(&straight, "3")));
    assert!(straight.join("checkpoint-1/training_state.json").is_file());
    assert_eq!(log_text(&straight).lines().count(), 3);

    // One step, then resume for the other two: the same log and the same embeddings.
    let resumed = dir.path().join("resumed");
    ok(&call(args(&resumed, "1")));
    let mut again = args(&resumed, "3");
    again.extend(["--resume-from-checkpoint".into(), "latest".into()]);
    ok(&call(again));
    assert_eq!(log_text(&resumed), log_text(&straight));
    assert_eq!(
        std::fs::read(resumed.join("learned_embeds.safetensors")).unwrap(),
        std::fs::read(straight.join("learned_embeds.safetensors")).unwrap()
    );
}

#[test]
fn dreambooth_lora_with_text_encoder_and_generated_class_images() {
    let data = fixtures().join("train/text_to_image/data");
    let data = data.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("class");
    let out = dir.path().join("out");
    let common = [
        "--instance-data-dir",
        data,
        "--instance-prompt",
        "a photo of sks dog",
        "--class-data-dir",
        class.to_str().unwrap(),
        "--class-prompt",
        "a photo of dog",
        "--with-prior-preservation",
        "--num-class-images",
        "3",
        "--sample-batch-size",
        "2",
        "--class-num-inference-steps",
        "2",
        "--train-batch-size",
        "1",
        "--lr-warmup-steps",
        "0",
        "--output-dir",
        out.to_str().unwrap(),
    ];
    // Refused before anything is loaded or written: the text encoder needs --lora.
    let mut args = common.to_vec();
    args.push("--train-text-encoder");
    let bad = run(&["dreambooth"], &args);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("train_text_encoder"));
    assert!(!class.exists() && !out.exists());

    args.extend(["--lora", "--rank", "2"]);
    ok(&run(&["dreambooth"], &args));
    let mut names: Vec<String> = std::fs::read_dir(&class)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3);
    for (i, name) in names.iter().enumerate() {
        assert!(
            name.starts_with(&format!("{i}-")) && name.ends_with(".png"),
            "{name}"
        );
    }
    let file = diffusion_core::weights::SafetensorsFile::open(
        out.join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    let keys = file.keys();
    assert!(keys.iter().any(|k| k.starts_with("unet.")));
    assert!(keys.iter().any(|k| k.starts_with("text_encoder.")));
    assert_eq!(log_text(&out).lines().count(), 2);
}

/// `--mixed-precision bf16` for DreamBooth LoRA with the text-encoder LoRA and prior
/// preservation: two steps, finite losses, the LoRA file written; an unknown value is refused
/// before anything is written.
#[test]
fn dreambooth_lora_text_encoder_bf16_two_steps() {
    let data = fixtures().join("train/text_to_image/data");
    let data = data.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = vec![
        "--instance-data-dir",
        data,
        "--instance-prompt",
        "a photo of sks dog",
        "--class-data-dir",
        data,
        "--class-prompt",
        "a photo of dog",
        "--with-prior-preservation",
        "--num-class-images",
        "4",
        "--train-batch-size",
        "1",
        "--lr-warmup-steps",
        "0",
        "--lora",
        "--rank",
        "2",
        "--train-text-encoder",
        "--output-dir",
        out.to_str().unwrap(),
        "--mixed-precision",
    ];
    let mut bad = args.clone();
    bad.push("fp8");
    let refused = run(&["dreambooth"], &bad);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("mixed-precision"));
    assert!(!out.exists());

    args.push("bf16");
    ok(&run(&["dreambooth"], &args));
    assert!(out.join("pytorch_lora_weights.safetensors").is_file());
    let log = std::fs::read_to_string(out.join("logs/train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
}
