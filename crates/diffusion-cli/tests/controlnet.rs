//! `diffusers controlnet` run the way a user does, against diffusers' arrays
//! (fixtures/oracle/gen_pipelines_controlnet.py).

use std::path::{Path, PathBuf};
use std::process::Command;

use diffusion_core::image::read_png_text;
use diffusion_core::npy::NpyArray;
use safetensors::SafeTensors;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/controlnet")
}

fn diffusers() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffusers"));
    cmd.env("HF_HUB_OFFLINE", "1");
    cmd
}

fn fixture_tensor(file: &str, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir().join(file)).unwrap();
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

/// The case's injected latents as an .npy file in `tmp`.
fn latents_npy(tmp: &Path, case: &str) -> PathBuf {
    let (shape, data) = fixture_tensor("inputs.safetensors", &format!("{case}/latents"));
    let path = tmp.join(format!("{case}_latents.npy"));
    NpyArray { shape, data }.write(&path).unwrap();
    path
}

/// The pipeline folder without its ControlNet: a plain Stable Diffusion folder.
fn sd_only_folder(tmp: &Path) -> PathBuf {
    let src = dir().join("sd_controlnet");
    let dst = tmp.join("sd");
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dst.join(sub).join(entry.file_name())).unwrap();
        }
    }
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("model_index.json")).unwrap())
            .unwrap();
    let map = index.as_object_mut().unwrap();
    map.insert("_class_name".into(), "StableDiffusionPipeline".into());
    map.remove("controlnet");
    std::fs::write(
        dst.join("model_index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
    dst
}

#[test]
fn controlnet_reproduces_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("out.png");
    let npy = tmp.path().join("out.npy");
    let status = diffusers()
        .args(["controlnet", "--quiet", "--steps", "3", "--guidance", "6"])
        .args(["--prompt", "a painting of a squirrel eating a burger"])
        .arg("--model")
        .arg(dir().join("sd_controlnet"))
        .arg("--image")
        .arg(dir().join("control.png"))
        .arg("--latents")
        .arg(latents_npy(tmp.path(), "plain"))
        .arg("--output")
        .arg(&png)
        .arg("--output-npy")
        .arg(&npy)
        .status()
        .unwrap();
    assert!(status.success());
    let got = NpyArray::read(&npy).unwrap();
    let (shape, want) = fixture_tensor("outputs.safetensors", "plain");
    assert_eq!(got.shape, shape);
    let diff = max_abs_diff(&got.data, &want);
    eprintln!("plain: max abs diff {diff:e}");
    assert!(diff <= 1e-3, "max abs diff {diff}");
    let text = read_png_text(&png).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    for want in [
        "ControlNet conditioning scale: 1",
        "Control image: ",
        "Steps: 3",
        "Sampler: DDIMScheduler",
        "Size: 32x32",
    ] {
        assert!(params.contains(want), "{want} missing from {params}");
    }

    // A Stable Diffusion folder plus --controlnet, with a conditioning scale and a window.
    let npy2 = tmp.path().join("out2.npy");
    let png2 = tmp.path().join("out2.png");
    let status = diffusers()
        .args(["controlnet", "--quiet", "--steps", "5", "--guidance", "7.5"])
        .args(["--prompt", "an astronaut riding a horse"])
        .args(["--negative-prompt", "blurry"])
        .args(["--controlnet-conditioning-scale", "0.5"])
        .args([
            "--control-guidance-start",
            "0.1",
            "--control-guidance-end",
            "0.6",
        ])
        .arg("--model")
        .arg(sd_only_folder(tmp.path()))
        .arg("--controlnet")
        .arg(dir().join("sd_controlnet/controlnet"))
        .arg("--image")
        .arg(dir().join("control.png"))
        .arg("--latents")
        .arg(latents_npy(tmp.path(), "scale_start_end"))
        .arg("--output")
        .arg(&png2)
        .arg("--output-npy")
        .arg(&npy2)
        .status()
        .unwrap();
    assert!(status.success());
    let got = NpyArray::read(&npy2).unwrap();
    let (_, want) = fixture_tensor("outputs.safetensors", "scale_start_end");
    let diff = max_abs_diff(&got.data, &want);
    eprintln!("scale_start_end (separate folders): max abs diff {diff:e}");
    assert!(diff <= 1e-3, "max abs diff {diff}");
    let text = read_png_text(&png2).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Control guidance end: 0.6"), "{params}");
}

#[test]
fn controlnet_rejects_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let garbage = tmp.path().join("garbage.png");
    std::fs::write(&garbage, b"not an image").unwrap();
    let sd_only = sd_only_folder(tmp.path());
    let model = dir().join("sd_controlnet");
    let control = dir().join("control.png");
    let missing = tmp.path().join("missing.png");
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec!["--image".into(), missing.clone().into()],
            "missing.png",
        ),
        (
            vec!["--image".into(), garbage.clone().into()],
            "garbage.png",
        ),
        (
            vec![
                "--image".into(),
                control.clone().into(),
                "--height".into(),
                "36".into(),
            ],
            "--height 36",
        ),
        (
            vec![
                "--image".into(),
                control.clone().into(),
                "--controlnet-conditioning-scale=-1".into(),
            ],
            "--controlnet-conditioning-scale",
        ),
        (
            vec![
                "--image".into(),
                control.clone().into(),
                "--control-guidance-start".into(),
                "0.5".into(),
                "--control-guidance-end".into(),
                "0.5".into(),
            ],
            "--control-guidance-start 0.5",
        ),
        (
            vec![
                "--image".into(),
                control.clone().into(),
                "--steps".into(),
                "0".into(),
            ],
            "--steps",
        ),
    ];
    for (extra, want) in cases {
        let output = diffusers()
            .args(["controlnet", "--quiet", "--prompt", "x"])
            .arg("--model")
            .arg(&model)
            .args(&extra)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{extra:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
    // A Stable Diffusion folder without --controlnet says what is missing.
    let output = diffusers()
        .args(["controlnet", "--quiet", "--prompt", "x", "--steps", "1"])
        .arg("--model")
        .arg(&sd_only)
        .arg("--image")
        .arg(&control)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--controlnet"), "{stderr}");
    assert!(!out.exists());
}
