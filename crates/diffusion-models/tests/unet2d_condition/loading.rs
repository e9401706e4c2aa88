//! Config defaults as diffusers writes them, and save/load round trips.

use anyhow::Result;
use diffusion_core::ConfigFile;
use diffusion_models::ModelMixin;
use diffusion_models::state_dict::state_dict;
use diffusion_models::{UNet2DConditionModel, UNet2DConditionModelConfig};

use crate::{Io, device, fixture, load, max_abs_diff, values};

#[test]
fn default_config_matches_what_diffusers_writes() -> Result<()> {
    let path = fixture("default").join("config.json");
    let file = ConfigFile::<UNet2DConditionModelConfig>::load(&path)?;
    assert_eq!(file.config, UNet2DConditionModelConfig::default());
    assert!(file.unknown_keys().is_empty(), "{:?}", file.unknown_keys());
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(file.to_value(), original);
    Ok(())
}

/// Every fixture config reads back to the JSON diffusers wrote (lists stay lists, scalars
/// scalars), apart from the private keys.
#[test]
fn fixture_configs_round_trip() -> Result<()> {
    for case in ["sd2_tiny", "sdxl_tiny", "variants_a", "variants_b"] {
        let path = fixture(case).join("config.json");
        let file = ConfigFile::<UNet2DConditionModelConfig>::load(&path)?;
        assert!(
            file.unknown_keys().is_empty(),
            "{case}: {:?}",
            file.unknown_keys()
        );
        let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let written = file.to_value();
        for (key, value) in original.as_object().unwrap() {
            assert_eq!(written.get(key), Some(value), "{case}: `{key}`");
        }
    }
    Ok(())
}

#[test]
fn save_pretrained_round_trips() -> Result<()> {
    let model = load("sdxl_tiny")?;
    let dir = tempfile::tempdir()?;
    model.save_pretrained(dir.path())?;
    let again = UNet2DConditionModel::from_pretrained(dir.path(), &device())?;
    assert_eq!(again.config(), model.config());
    let (a, b) = (state_dict(&model), state_dict(&again));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.key, &x.shape, &x.values), (&y.key, &y.shape, &y.values));
    }
    let io = Io::open("sdxl_tiny")?;
    let diff = max_abs_diff(
        &values(io.run(&again, "t10")?),
        &values(io.run(&model, "t10")?),
    );
    assert_eq!(diff, 0.0);
    Ok(())
}
