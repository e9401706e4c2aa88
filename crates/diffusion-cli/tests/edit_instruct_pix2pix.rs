//! `diffusers edit-instruct-pix2pix` run as a user does, against
//! fixtures/oracle/gen_pipelines_instruct_pix2pix.py.

use std::path::{Path, PathBuf};
use std::process::Command;

use diffusion_core::image::read_png_text;
use diffusion_core::npy::NpyArray;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn ip2p() -> PathBuf {
    fixtures().join("pipelines/instruct_pix2pix")
}

fn diffusers() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
}

fn expected(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(ip2p().join("outputs.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn edit(image: &Path, extra: &[&str], png: &Path, npy: &Path) -> std::process::Output {
    diffusers()
        .arg("edit-instruct-pix2pix")
        .arg("--model")
        .arg(ip2p().join("ip2p"))
        .arg("--image")
        .arg(image)
        .args(extra)
        .args(["--quiet", "--output"])
        .arg(png)
        .arg("--output-npy")
        .arg(npy)
        .output()
        .unwrap()
}

fn check_case(name: &str, image: &str, extra: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (png, npy) = (dir.path().join("edit.png"), dir.path().join("edit.npy"));
    let out = edit(&ip2p().join(image), extra, &png, &npy);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = NpyArray::read(&npy).unwrap();
    let (shape, want) = expected(name);
    assert_eq!(got.shape, shape, "{name}");
    let diff = max_abs_diff(&got.data, &want);
    eprintln!("edit-instruct-pix2pix {name}: max |diff| = {diff:.2e}");
    assert!(diff <= 1e-3, "{name}: max |diff| = {diff}");
    let text = read_png_text(&png).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    for needle in needles {
        assert!(params.contains(needle), "no {needle:?} in {params}");
    }
}

#[test]
fn edit_instruct_pix2pix_reproduces_diffusers() {
    // Case `negative_prompt_seed`: the folder's PNDMScheduler, seed 1.
    check_case(
        "negative_prompt_seed",
        "image.png",
        &[
            "--prompt",
            "turn the sky into a sunset",
            "--negative-prompt",
            "french fries",
            "--steps",
            "3",
            "--guidance",
            "7.5",
            "--image-guidance",
            "1.5",
            "--seed",
            "1",
        ],
        &[
            "turn the sky into a sunset\n",
            "Negative prompt: french fries",
            "Sampler: PNDMScheduler",
            "CFG scale: 7.5",
            "Image CFG scale: 1.5",
            "Seed: 1",
            "Size: 32x32",
            "Init image: ",
        ],
    );
}

#[test]
fn edit_instruct_pix2pix_takes_another_scheduler() {
    // Case `euler_ancestral_seed`: --scheduler converts the folder's config, as from_config.
    check_case(
        "euler_ancestral_seed",
        "image.png",
        &[
            "--prompt",
            "turn the sky into a sunset",
            "--steps",
            "3",
            "--scheduler",
            "EulerAncestralDiscreteScheduler",
            "--seed",
            "2",
        ],
        &["Sampler: EulerAncestralDiscreteScheduler", "Seed: 2"],
    );
}

#[test]
fn edit_instruct_pix2pix_rejects_bad_flags_before_loading_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (png, npy) = (dir.path().join("out.png"), dir.path().join("out.npy"));
    let image = ip2p().join("image.png");
    let image = image.to_str().unwrap();
    let missing_dir = dir.path().join("no/such/dir/out.npy");
    let missing_dir = missing_dir.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--image-guidance", "0.5"], "--image-guidance 0.5"),
        (vec!["--image-guidance", "NaN"], "--image-guidance"),
        (vec!["--guidance", "inf"], "--guidance inf"),
        (vec!["--eta=-1"], "--eta -1"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--num-images", "0"], "--num-images"),
        (vec!["--scheduler", "NoSuchScheduler"], "--scheduler"),
        (vec!["--height", "32"], "both --height and --width"),
        (vec!["--height", "30", "--width", "32"], "--height 30"),
        (vec!["--dtype", "f8"], "--dtype f8"),
        (vec!["--output-npy", missing_dir], "--output-npy"),
        (vec!["--config", "x"], "--config"),
        (vec!["--ip-adapter", "x"], "--ip-adapter"),
    ];
    let run = |image: &str, extra: &[&str], output: &Path| {
        diffusers()
            .args(["edit-instruct-pix2pix", "--model"])
            .arg(dir.path().join("no-model"))
            .args(["--image", image, "--prompt", "make it winter"])
            .args(extra)
            .arg("--quiet")
            .arg("--output")
            .arg(output)
            .output()
            .unwrap()
    };
    for (extra, needle) in cases {
        let out = run(image, &extra, &png);
        assert!(!out.status.success(), "{extra:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!stderr.contains("no-model"), "{extra:?} loaded: {stderr}");
        assert!(!png.exists() && !npy.exists(), "{extra:?} left a file");
    }
    // An input that is not an image, and one that does not exist, are named.
    let not_an_image = ip2p().join("cases.json");
    for bad in [not_an_image, dir.path().join("missing.png")] {
        let out = run(bad.to_str().unwrap(), &[], &png);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
        assert!(!png.exists());
    }
    // --image is required.
    let out = diffusers()
        .args(["edit-instruct-pix2pix", "--model", "m", "--prompt", "b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
    // Once the flags pass, a model that does not exist is reported as such.
    let out = run(image, &[], &png);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model"));
    assert!(!png.exists());
}

#[test]
fn edit_instruct_pix2pix_refuses_a_model_without_image_channels() {
    // sd1's UNet has 4 input channels: refused with the reason, nothing written.
    let dir = tempfile::tempdir().unwrap();
    let (png, npy) = (dir.path().join("out.png"), dir.path().join("out.npy"));
    let out = diffusers()
        .args(["edit-instruct-pix2pix", "--model"])
        .arg(fixtures().join("pipelines/sd/sd1"))
        .arg("--image")
        .arg(ip2p().join("image.png"))
        .args(["--prompt", "make it winter", "--steps", "2", "--quiet"])
        .arg("--output")
        .arg(&png)
        .arg("--output-npy")
        .arg(&npy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("8 input channels"), "{stderr}");
    assert!(!png.exists() && !npy.exists());
}
