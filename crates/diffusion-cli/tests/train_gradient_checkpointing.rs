//! `--gradient-checkpointing` on `diffusers train unconditional`, `lora`, `controlnet`,
//! `textual-inversion` and `instruct-pix2pix`:
//! two steps with the flag log the same losses and write the same weight file, byte for byte,
//! as two steps without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("logs/train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}

/// `diffusers train <command>` into `out`: `paths` are (flag, path under fixtures/) pairs, then
/// `args`, `--quiet` and `extra`.
fn train(
    command: &str,
    paths: &[(&str, &str)],
    args: &[&str],
    out: &Path,
    extra: &[&str],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1").args(["train", command]);
    for (flag, path) in paths {
        cmd.arg(flag).arg(fixtures().join(path));
    }
    cmd.arg("--output-dir")
        .arg(out)
        .args(args)
        .arg("--quiet")
        .args(extra)
        .output()
        .unwrap()
}

const SD1: (&str, &str) = ("--model", "pipelines/sd/sd1");

fn unconditional(out: &Path, extra: &[&str]) -> Output {
    let paths = [
        ("--digits", "train/digits_head.csv.gz"),
        ("--pretrained-model", "train/tiny_unet"),
    ];
    let args = [
        "--resolution",
        "8",
        "--train-batch-size",
        "2",
        "--max-train-steps",
        "2",
    ];
    train("unconditional", &paths, &args, out, extra)
}

/// The settings the SD1 commands below share: 32 pixels, two images per step, two steps.
const SD1_ARGS: [&str; 8] = [
    "--resolution",
    "32",
    "--train-batch-size",
    "2",
    "--max-train-steps",
    "2",
    "--learning-rate",
    "1e-3",
];

fn lora(out: &Path, extra: &[&str]) -> Output {
    let paths = [SD1, ("--train-data-dir", "train/text_to_image/data")];
    train("lora", &paths, &SD1_ARGS, out, extra)
}

fn controlnet(out: &Path, extra: &[&str]) -> Output {
    let paths = [
        ("--pretrained-model", "pipelines/sd/sd1"),
        ("--controlnet-model", "train/controlnet/controlnet"),
        ("--train-data-dir", "train/controlnet/data"),
    ];
    let args = [&SD1_ARGS[..], &["--lr-warmup-steps", "0"]].concat();
    train("controlnet", &paths, &args, out, extra)
}

fn textual_inversion(out: &Path, extra: &[&str]) -> Output {
    let paths = [SD1, ("--train-data-dir", "train/text_to_image/data")];
    let token = [
        "--placeholder-token",
        "<cat-toy>",
        "--initializer-token",
        "red",
        "--lr-warmup-steps",
        "0",
    ];
    let args = [&SD1_ARGS[..], &token].concat();
    train("textual-inversion", &paths, &args, out, extra)
}

fn instruct_pix2pix(out: &Path, extra: &[&str]) -> Output {
    let paths = [SD1, ("--train-data-dir", "train/instruct_pix2pix/data")];
    train("instruct-pix2pix", &paths, &SD1_ARGS, out, extra)
}

/// Run `train` without and with the flag; return both logs' losses and both weight files.
fn both(train: fn(&Path, &[&str]) -> Output, weights: &str) -> [(Vec<f64>, Vec<u8>); 2] {
    let dir = tempfile::tempdir().unwrap();
    [&[][..], &["--gradient-checkpointing"][..]].map(|extra| {
        let out = dir
            .path()
            .join(if extra.is_empty() { "plain" } else { "gc" });
        ok(&train(&out, extra));
        let bytes = std::fs::read(out.join(weights)).unwrap();
        (losses(&out), bytes)
    })
}

#[test]
fn unconditional_with_the_flag_equals_without() {
    let [(plain, plain_w), (gc, gc_w)] =
        both(unconditional, "unet/diffusion_pytorch_model.safetensors");
    eprintln!("unconditional losses {plain:?} vs {gc:?}");
    assert_eq!(plain.len(), 2);
    assert_eq!(plain, gc);
    assert!(plain_w == gc_w, "the trained UNet files differ");
}

#[test]
fn lora_with_the_flag_equals_without() {
    let [(plain, plain_w), (gc, gc_w)] = both(lora, "pytorch_lora_weights.safetensors");
    eprintln!("lora losses {plain:?} vs {gc:?}");
    assert_eq!(plain.len(), 2);
    assert_eq!(plain, gc);
    assert!(plain_w == gc_w, "the LoRA files differ");
}

#[test]
fn controlnet_textual_inversion_and_instruct_pix2pix_with_the_flag_equal_without() {
    for (name, train, weights) in [
        (
            "controlnet",
            controlnet as fn(&Path, &[&str]) -> Output,
            "diffusion_pytorch_model.safetensors",
        ),
        (
            "textual-inversion",
            textual_inversion,
            "learned_embeds.safetensors",
        ),
        (
            "instruct-pix2pix",
            instruct_pix2pix,
            "unet/diffusion_pytorch_model.safetensors",
        ),
    ] {
        let [(plain, plain_w), (gc, gc_w)] = both(train, weights);
        eprintln!("{name} losses {plain:?} vs {gc:?}");
        assert_eq!(plain.len(), 2, "{name}");
        assert_eq!(plain, gc, "{name}");
        assert!(plain_w == gc_w, "{name}: the trained files differ");
    }
}
