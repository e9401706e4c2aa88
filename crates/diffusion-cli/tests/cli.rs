//! Runs the `diffusers` binary the way a user does.

use std::path::PathBuf;
use std::process::Command;

use diffusion_core::image::read_png_text;
use diffusion_core::npy::NpyArray;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn diffusers() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
}

fn expected(name: &str) -> Vec<f32> {
    let bytes =
        std::fs::read(fixtures().join("pipelines/unconditional/outputs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn sample_reproduces_diffusers_for_the_same_seed() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let npy = dir.path().join("out.npy");
    let model = fixtures().join("pipelines/unconditional/ddpm_tiny");
    let status = diffusers()
        .args([
            "sample",
            "--quiet",
            "--seed",
            "0",
            "--steps",
            "20",
            "--num-images",
            "2",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--output")
        .arg(&png)
        .arg("--output-npy")
        .arg(&npy)
        .status()
        .unwrap();
    assert!(status.success());
    let got = NpyArray::read(&npy).unwrap();
    assert_eq!(got.shape, vec![2, 8, 8, 3]);
    let want = expected("ddpm_seed0_steps20_batch2");
    let diff = got
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-3, "max |diff| = {diff}");

    let text = read_png_text(&png).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        params.contains("Steps: 20") && params.contains("Seed: 0"),
        "{params}"
    );
    assert!(params.contains("Sampler: DDPMScheduler"), "{params}");

    // DDIM through --scheduler: diffusers' DDIMPipeline output for the same seed and eta.
    let status = diffusers()
        .args([
            "sample",
            "--quiet",
            "--seed",
            "1",
            "--steps",
            "10",
            "--num-images",
            "2",
        ])
        .args(["--scheduler", "ddim", "--eta", "0.5"])
        .arg("--model")
        .arg(&model)
        .arg("--output")
        .arg(&png)
        .arg("--output-npy")
        .arg(&npy)
        .status()
        .unwrap();
    assert!(status.success());
    let got = NpyArray::read(&npy).unwrap();
    let want = expected("ddim_seed1_steps10_eta05");
    let diff = got
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff <= 1e-3, "ddim: max |diff| = {diff}");
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let model = fixtures().join("pipelines/unconditional/ddpm_tiny");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--steps", "0"], "num_inference_steps"),
        (vec!["--scheduler", "NoSuchScheduler"], "NoSuchScheduler"),
        (vec!["--eta", "0.5"], "--eta"),
        (vec!["--num-images", "0"], "--num-images"),
        (vec!["--device", "tpu"], "tpu"),
    ];
    for (extra, needle) in cases {
        let out = diffusers()
            .args(["sample", "--quiet"])
            .arg("--model")
            .arg(&model)
            .arg("--output")
            .arg(&png)
            .args(&extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!png.exists(), "{extra:?} left an output file");
    }
    let out = diffusers()
        .args([
            "sample",
            "--quiet",
            "--model",
            "/no/such/folder",
            "--output",
        ])
        .arg(&png)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/folder"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn help_explains_the_flags() {
    let out = diffusers().args(["sample", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--scheduler",
        "--steps",
        "--seed",
        "--num-images",
        "--output",
        "--output-npy",
    ] {
        assert!(help.contains(flag), "missing {flag} in:\n{help}");
    }
}
