//! Configs inferred from shapes equal the diffusers folders' configs and load the checkpoints
//! strictly. What shapes cannot tell is given as [`InferenceHints`] matching the tiny models
//! (their head widths and norm groups are not the full-size defaults); the training image size,
//! SD 2.1's attention upcast and unused projection width and SDXL's VAE scaling are full-size facts the tiny folders do not
//! share, and are patched before comparing.

use anyhow::Result;
use diffusion_core::config::ConfigFile;
use diffusion_loaders::{InferenceHints, SingleFileCheckpoint, SingleFileOptions};
use diffusion_models::unets::unet_2d_condition::TransformerLayers;
use diffusion_models::{
    AutoencoderKL, AutoencoderKLConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
    ModelMixin, UNet2DConditionModel, UNet2DConditionModelConfig,
};

use crate::{CASES, assert_same_parameters, device, fixture};

/// The tiny models' values of what shapes cannot tell (see `gen_loaders.py`).
fn hints(case: &str) -> InferenceHints {
    let full = InferenceHints::default();
    let tiny = InferenceHints {
        norm_num_groups: 2,
        text_head_channels: 8,
        ..full.clone()
    };
    match case {
        "sd1" | "inpaint" => InferenceHints {
            unet_heads: 2,
            text_head_channels: 6,
            ..tiny
        },
        "sd2" => InferenceHints {
            unet_head_channels: 2,
            ..tiny
        },
        "sdxl" => InferenceHints {
            unet_head_channels: 4,
            addition_time_embed_dim: 4,
            ..tiny
        },
        _ => full,
    }
}

fn open_inferring(case: &str) -> Result<SingleFileCheckpoint> {
    let options = SingleFileOptions {
        hints: hints(case),
        ..SingleFileOptions::default()
    };
    Ok(SingleFileCheckpoint::open_with(
        fixture(case).join("model.safetensors"),
        options,
    )?)
}

fn folder_config<C: diffusion_core::config::Config>(case: &str, component: &str) -> Result<C> {
    Ok(ConfigFile::<C>::load(
        fixture(case)
            .join("diffusers")
            .join(component)
            .join("config.json"),
    )?
    .config)
}

#[test]
fn inferred_unet_configs_match_the_folders() -> Result<()> {
    for case in CASES {
        let ckpt = open_inferring(case)?;
        let want: UNet2DConditionModelConfig = folder_config(case, "unet")?;
        let mut got = ckpt.unet_config()?;
        // Transformer depth: equal on every level that has transformers.
        let n = want.block_out_channels.len();
        let depths = |c: &UNet2DConditionModelConfig| -> Vec<usize> {
            c.transformer_layers_per_block
                .resolve(n)
                .unwrap()
                .iter()
                .map(|t| match t {
                    TransformerLayers::One(d) => *d,
                    TransformerLayers::PerLayer(d) => d[0],
                })
                .collect()
        };
        for (level, block) in want.down_block_types.iter().enumerate() {
            if block.starts_with("CrossAttn") {
                assert_eq!(
                    depths(&got)[level],
                    depths(&want)[level],
                    "{case} level {level}"
                );
            }
        }
        // The levels without transformers may say 1 or the common depth.
        got.transformer_layers_per_block = want.transformer_layers_per_block.clone();
        got.sample_size = want.sample_size;
        got.upcast_attention = want.upcast_attention;
        assert_eq!(got, want, "{case}");
        let unet = ckpt.unet(&device())?;
        let folder =
            UNet2DConditionModel::from_pretrained(fixture(case).join("diffusers/unet"), &device())?;
        assert_same_parameters(&format!("{case} inferred unet"), &unet, &folder);
    }
    Ok(())
}

#[test]
fn inferred_vae_and_text_configs_match_the_folders() -> Result<()> {
    for case in CASES {
        let ckpt = open_inferring(case)?;
        let want: AutoencoderKLConfig = folder_config(case, "vae")?;
        let mut got = ckpt.vae_config()?;
        let xl = ckpt.model_type().is_xl();
        assert_eq!(got.scaling_factor, if xl { 0.13025 } else { 0.18215 });
        got.sample_size = want.sample_size;
        got.scaling_factor = want.scaling_factor;
        assert_eq!(got, want, "{case} vae");

        let mut encoders = vec![("text_encoder", ckpt.text_encoder_config()?)];
        if ckpt.has_text_encoder_2() {
            encoders.push(("text_encoder_2", ckpt.text_encoder_2_config()?));
        }
        for (folder, mut got) in encoders {
            let want: CLIPTextConfig = folder_config(case, folder)?;
            if case == "sd2" {
                // SD 2's encoder has no projection; its repository's config says 512.
                assert_eq!(got.projection_dim, 512);
                got.projection_dim = want.projection_dim;
            }
            got.architectures = want.architectures.clone();
            got.dtype = want.dtype.clone();
            got.torch_dtype = want.torch_dtype.clone();
            got.transformers_version = want.transformers_version.clone();
            assert_eq!(got, want, "{case} {folder}");
        }
        // The inferred configs load the checkpoint strictly.
        let vae = ckpt.vae(&device())?;
        let folder =
            AutoencoderKL::from_pretrained(fixture(case).join("diffusers/vae"), &device())?;
        assert_same_parameters(&format!("{case} inferred vae"), &vae, &folder);
        let te = ckpt.text_encoder(&device())?;
        let folder = CLIPTextModel::from_pretrained(
            fixture(case).join("diffusers/text_encoder"),
            &device(),
        )?;
        assert_same_parameters(&format!("{case} inferred text_encoder"), &te, &folder);
        if ckpt.has_text_encoder_2() {
            let te2 = ckpt.text_encoder_2(&device())?;
            let folder = CLIPTextModelWithProjection::from_pretrained(
                fixture(case).join("diffusers/text_encoder_2"),
                &device(),
            )?;
            assert_same_parameters(&format!("{case} inferred text_encoder_2"), &te2, &folder);
        }
    }
    Ok(())
}

#[test]
fn scheduler_configs_and_the_v_prediction_guess() -> Result<()> {
    let sched = |case: &str, file: &str| -> Result<(String, String, Option<i64>)> {
        let ckpt = SingleFileCheckpoint::open(fixture(case).join(file))?;
        let c = ckpt.scheduler_config()?;
        Ok((
            c["_class_name"].as_str().unwrap().to_string(),
            c["prediction_type"].as_str().unwrap().to_string(),
            ckpt.global_step(),
        ))
    };
    let s = |a: &str, b: &str, step: Option<i64>| (a.to_string(), b.to_string(), step);
    assert_eq!(
        sched("sd1", "model.safetensors")?,
        s("PNDMScheduler", "epsilon", None)
    );
    assert_eq!(
        sched("sd1", "model.ckpt")?,
        s("PNDMScheduler", "epsilon", Some(470_000))
    );
    // SD 2 without a global step is taken for the 768 v-prediction model, as diffusers does;
    // step 875000 is SD 2 base (epsilon).
    assert_eq!(
        sched("sd2", "model.safetensors")?,
        s("DDIMScheduler", "v_prediction", None)
    );
    assert_eq!(
        sched("sd2", "model.ckpt")?,
        s("DDIMScheduler", "epsilon", Some(875_000))
    );
    assert_eq!(
        sched("sdxl", "model.safetensors")?,
        s("EulerDiscreteScheduler", "epsilon", None)
    );
    assert_eq!(
        sched("inpaint", "model.safetensors")?,
        s("PNDMScheduler", "epsilon", None)
    );
    let c =
        SingleFileCheckpoint::open(fixture("sd1").join("model.safetensors"))?.scheduler_config()?;
    assert_eq!(c["beta_start"], 0.00085);
    assert_eq!(c["beta_schedule"], "scaled_linear");
    assert_eq!(c["steps_offset"], 1);
    Ok(())
}
