//! Config inference and key conversion at full size, from keys and shapes only
//! (`fixtures/loaders/full_size_shapes.json.gz`, written by `gen_loaders.py` from the default
//! repositories' configs): SD 1.5, SD 2.1, SDXL base and refiner.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use diffusion_core::config::ConfigFile;
use diffusion_models::{AutoencoderKLConfig, CLIPTextConfig, UNet2DConditionModelConfig};
use serde_json::Value;

use super::checkpoint::transformed_shape;
use super::infer::{self, InferenceHints, ModelType};
use super::{convert, text_layout, text_plan};

type Shapes = BTreeMap<String, Vec<usize>>;

fn fixture() -> (PathBuf, Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/loaders/full_size_shapes.json.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    (path, serde_json::from_str(&text).unwrap())
}

fn shapes(v: &Value) -> Shapes {
    serde_json::from_value(v.clone()).unwrap()
}

fn config<C: diffusion_core::Config>(v: &Value, path: &Path) -> C {
    ConfigFile::<C>::from_value(v.clone(), path).unwrap().config
}

/// The plan's diffusers keys with their shapes after the transforms.
fn planned(plan: &[super::Planned], original: &Shapes) -> Shapes {
    plan.iter()
        .map(|p| {
            let shape = transformed_shape(&p.transform, &original[&p.source])
                .unwrap_or_else(|| panic!("{} does not fit {:?}", p.source, p.transform));
            (p.key.clone(), shape)
        })
        .collect()
}

#[test]
fn full_size_types_configs_and_keys() {
    let (path, data) = fixture();
    let hints = InferenceHints::default();
    for (name, want_type) in [
        ("v1", ModelType::V1),
        ("v2", ModelType::V2),
        ("xl_base", ModelType::XlBase),
        ("xl_refiner", ModelType::XlRefiner),
    ] {
        let case = &data[name];
        assert_eq!(case["diffusers_model_type"], name);
        let original = shapes(&case["original"]);
        let model_type = infer::detect(&path, &original).unwrap();
        assert_eq!(model_type, want_type);

        let layout =
            convert::unet_layout(&path, &convert::strip(&original, convert::UNET_PREFIX)).unwrap();
        let unet = infer::unet_config(&path, model_type, &layout, 8, &hints).unwrap();
        let want: UNet2DConditionModelConfig = config(&case["configs"]["unet"], &path);
        assert_eq!(unet, want, "{name} unet config");
        let text_time = unet.addition_embed_type.is_some();
        let got = planned(
            &convert::plan_unet(&original, &layout, text_time),
            &original,
        );
        assert_eq!(got, shapes(&case["diffusers"]["unet"]), "{name} unet keys");

        let prefix = convert::vae_prefix(&original).unwrap();
        let vae = infer::vae_config(&path, model_type, &original, prefix, &hints).unwrap();
        let want: AutoencoderKLConfig = config(&case["configs"]["vae"], &path);
        assert_eq!(vae, want, "{name} vae config");
        let got = planned(&convert::plan_vae(&original, prefix), &original);
        assert_eq!(got, shapes(&case["diffusers"]["vae"]), "{name} vae keys");

        for (folder, second) in [("text_encoder", false), ("text_encoder_2", true)] {
            let layout = text_layout(model_type, second);
            assert_eq!(
                layout.is_some(),
                case["configs"].get(folder).is_some(),
                "{name} {folder}"
            );
            let Some(layout) = layout else { continue };
            let mut got = infer::clip_config(&path, &original, layout, &hints).unwrap();
            let want: CLIPTextConfig = config(&case["configs"][folder], &path);
            got.transformers_version = want.transformers_version.clone();
            assert_eq!(got, want, "{name} {folder} config");
            let keys = planned(&text_plan(&original, layout, second, &got), &original);
            assert_eq!(
                keys,
                shapes(&case["diffusers"][folder]),
                "{name} {folder} keys"
            );
        }
    }
}
