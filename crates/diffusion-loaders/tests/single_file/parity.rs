//! Single-file loaded components equal the folder-loaded ones, and their outputs equal the
//! oracle's.

use anyhow::Result;
use diffusion_core::burn::tensor::Tensor;
use diffusion_loaders::{FromSingleFile, ModelType, SingleFileOptions};
use diffusion_models::unets::unet_2d_condition::{AddedCondKwargs, UNet2DConditionOptions};
use diffusion_models::{
    AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, ModelMixin, UNet2DConditionModel,
};

use crate::{CASES, Io, assert_close, assert_same_parameters, device, files, fixture, open};

#[test]
fn detects_each_model_type() -> Result<()> {
    let expected = [
        ("sd1", ModelType::V1),
        ("sd2", ModelType::V2),
        ("sdxl", ModelType::XlBase),
        ("inpaint", ModelType::Inpainting),
    ];
    for (case, want) in expected {
        let oracle: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            fixture(case).join("expected.json"),
        )?)?;
        for path in files(case) {
            let ckpt = open(&path, case)?;
            assert_eq!(ckpt.model_type(), want, "{}", path.display());
            // diffusers' own detection keys on full-size widths (1024-wide SD 2 attention,
            // bigG's block 9), which the tiny SD 2 / SDXL models lack; it agrees on the others.
            if matches!(want, ModelType::V1 | ModelType::Inpainting) {
                assert_eq!(oracle["diffusers_model_type"], want.diffusers_name());
            }
        }
    }
    Ok(())
}

fn unet_out(unet: &UNet2DConditionModel, io: &Io) -> Result<Tensor<4>> {
    let options = if io.has("unet/text_embeds") {
        UNet2DConditionOptions {
            added_cond_kwargs: Some(AddedCondKwargs {
                text_embeds: Some(io.tensor("unet/text_embeds")?),
                time_ids: Some(io.tensor("unet/time_ids")?),
                image_embeds: None,
            }),
            ..UNet2DConditionOptions::default()
        }
    } else {
        UNet2DConditionOptions::default()
    };
    Ok(unet.forward_with(
        io.tensor("unet/sample")?,
        io.tensor("unet/timestep")?,
        io.tensor("unet/encoder_hidden_states")?,
        options,
    )?)
}

#[test]
fn unet_equals_the_folder_model_and_the_oracle() -> Result<()> {
    for case in CASES {
        let io = Io::open(case)?;
        let folder =
            UNet2DConditionModel::from_pretrained(fixture(case).join("diffusers/unet"), &device())?;
        let want = io.tensor::<4>("unet/out")?;
        assert_close(
            &format!("{case} folder unet"),
            unet_out(&folder, &io)?,
            want.clone(),
        );
        for path in files(case) {
            let what = format!("{case} {}", path.file_name().unwrap().to_string_lossy());
            let unet = open(&path, case)?.unet(&device())?;
            assert_same_parameters(&format!("{what} unet"), &unet, &folder);
            assert_close(&format!("{what} unet"), unet_out(&unet, &io)?, want.clone());
        }
    }
    Ok(())
}

#[test]
fn vae_equals_the_folder_model_and_the_oracle() -> Result<()> {
    for case in CASES {
        let io = Io::open(case)?;
        let folder =
            AutoencoderKL::from_pretrained(fixture(case).join("diffusers/vae"), &device())?;
        for path in files(case) {
            let what = format!("{case} {}", path.file_name().unwrap().to_string_lossy());
            let vae = open(&path, case)?.vae(&device())?;
            assert_same_parameters(&format!("{what} vae"), &vae, &folder);
            let decoded = vae.decode(io.tensor("vae/latents")?)?;
            assert_close(
                &format!("{what} vae decode"),
                decoded,
                io.tensor("vae/decoded")?,
            );
            let mean = vae.encode(io.tensor("vae/image")?)?.mean;
            assert_close(
                &format!("{what} vae encode"),
                mean,
                io.tensor("vae/posterior_mean")?,
            );
        }
    }
    Ok(())
}

#[test]
fn text_encoders_equal_the_folder_models_and_the_oracle() -> Result<()> {
    for case in CASES {
        let io = Io::open(case)?;
        let folder = CLIPTextModel::from_pretrained(
            fixture(case).join("diffusers/text_encoder"),
            &device(),
        )?;
        let folder_2 = fixture(case).join("diffusers/text_encoder_2");
        let folder_2 = folder_2
            .is_dir()
            .then(|| CLIPTextModelWithProjection::from_pretrained(&folder_2, &device()))
            .transpose()?;
        for path in files(case) {
            let what = format!("{case} {}", path.file_name().unwrap().to_string_lossy());
            let ckpt = open(&path, case)?;
            let te = ckpt.text_encoder(&device())?;
            assert_same_parameters(&format!("{what} text_encoder"), &te, &folder);
            let out = te.forward(io.ids("text_encoder/input_ids")?)?;
            assert_close(
                &format!("{what} text_encoder"),
                out.last_hidden_state,
                io.tensor("text_encoder/last_hidden_state")?,
            );
            assert_close(
                &format!("{what} text_encoder pooled"),
                out.pooler_output,
                io.tensor("text_encoder/pooler_output")?,
            );
            assert_eq!(ckpt.has_text_encoder_2(), folder_2.is_some());
            if let Some(folder_2) = &folder_2 {
                let te2 = ckpt.text_encoder_2(&device())?;
                assert_same_parameters(&format!("{what} text_encoder_2"), &te2, folder_2);
                let out = te2.forward(io.ids("text_encoder_2/input_ids")?)?;
                assert_close(
                    &format!("{what} text_encoder_2"),
                    out.last_hidden_state,
                    io.tensor("text_encoder_2/last_hidden_state")?,
                );
                assert_close(
                    &format!("{what} text_encoder_2 text_embeds"),
                    out.text_embeds,
                    io.tensor("text_encoder_2/text_embeds")?,
                );
            }
        }
    }
    Ok(())
}

#[test]
fn ckpt_and_safetensors_give_identical_models() -> Result<()> {
    for case in ["sd1", "sd2", "sdxl"] {
        let [st, pt] = [
            fixture(case).join("model.safetensors"),
            fixture(case).join("model.ckpt"),
        ];
        let (a, b) = (open(&st, case)?, open(&pt, case)?);
        assert_eq!(a.model_type(), b.model_type());
        let shapes_a = a.shapes();
        assert_eq!(shapes_a, b.shapes(), "{case}: keys and shapes");
        assert_same_parameters(
            &format!("{case} unet"),
            &a.unet(&device())?,
            &b.unet(&device())?,
        );
        assert_same_parameters(
            &format!("{case} vae"),
            &a.vae(&device())?,
            &b.vae(&device())?,
        );
        assert_same_parameters(
            &format!("{case} text_encoder"),
            &a.text_encoder(&device())?,
            &b.text_encoder(&device())?,
        );
        if a.has_text_encoder_2() {
            assert_same_parameters(
                &format!("{case} text_encoder_2"),
                &a.text_encoder_2(&device())?,
                &b.text_encoder_2(&device())?,
            );
        }
    }
    Ok(())
}

#[test]
fn from_single_file_on_each_model() -> Result<()> {
    let path = fixture("sdxl").join("model.ckpt");
    let options = || SingleFileOptions {
        config_dir: Some(fixture("sdxl").join("diffusers")),
        ..SingleFileOptions::default()
    };
    let dir = fixture("sdxl").join("diffusers");
    let unet = UNet2DConditionModel::from_single_file_with(&path, options(), &device())?;
    let folder = UNet2DConditionModel::from_pretrained(dir.join("unet"), &device())?;
    assert_same_parameters("sdxl unet", &unet, &folder);
    let vae = AutoencoderKL::from_single_file_with(&path, options(), &device())?;
    assert_same_parameters(
        "sdxl vae",
        &vae,
        &AutoencoderKL::from_pretrained(dir.join("vae"), &device())?,
    );
    let te = CLIPTextModel::from_single_file_with(&path, options(), &device())?;
    let folder = CLIPTextModel::from_pretrained(dir.join("text_encoder"), &device())?;
    assert_same_parameters("sdxl text_encoder", &te, &folder);
    let te2 = CLIPTextModelWithProjection::from_single_file_with(&path, options(), &device())?;
    let folder =
        CLIPTextModelWithProjection::from_pretrained(dir.join("text_encoder_2"), &device())?;
    assert_same_parameters("sdxl text_encoder_2", &te2, &folder);
    Ok(())
}
