//! Config plumbing: defaults for missing keys, unknown keys kept, typed errors, round trips.

use std::path::Path;

use diffusion_core::Error;
use diffusion_core::config::{Config, ConfigFile, ModelIndex};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::common::fixtures;

/// A small config in the style of the real ones (the real ones live in their crates).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct ToyConfig {
    num_train_timesteps: usize,
    beta_start: f64,
    beta_schedule: ToySchedule,
    trained_betas: Option<Vec<f64>>,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToySchedule {
    Linear,
    ScaledLinear,
}

impl Default for ToyConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_schedule: ToySchedule::Linear,
            trained_betas: None,
            block_out_channels: vec![64, 128],
            down_block_types: vec!["DownBlock2D".into(), "AttnDownBlock2D".into()],
        }
    }
}

impl Config for ToyConfig {
    const CLASS_NAME: &'static str = "ToyScheduler";

    fn validate(&self) -> Result<(), (String, String)> {
        if self.block_out_channels.len() != self.down_block_types.len() {
            return Err((
                "block_out_channels".into(),
                format!(
                    "has {} entries but down_block_types has {}",
                    self.block_out_channels.len(),
                    self.down_block_types.len()
                ),
            ));
        }
        Ok(())
    }
}

fn parse(text: &str) -> diffusion_core::Result<ConfigFile<ToyConfig>> {
    ConfigFile::from_json_str(text, Path::new("toy/config.json"))
}

#[test]
fn missing_keys_get_defaults_and_unknown_keys_are_kept() {
    let cfg = parse(r#"{"_class_name": "ToyScheduler", "beta_schedule": "scaled_linear", "future_key": [1, 2], "_name_or_path": "x"}"#)
        .unwrap();
    assert_eq!(cfg.config.num_train_timesteps, 1000);
    assert_eq!(cfg.config.beta_schedule, ToySchedule::ScaledLinear);
    assert_eq!(cfg.unknown_keys(), vec!["future_key"]);
    let back = cfg.to_value();
    assert_eq!(back["future_key"], serde_json::json!([1, 2]));
    assert_eq!(back["_name_or_path"], "x");
    assert_eq!(back["_class_name"], "ToyScheduler");
}

#[test]
fn malformed_json_names_file_and_position() {
    let err = parse("{\"num_train_timesteps\": 10,\n  oops}").unwrap_err();
    match &err {
        Error::Json { path, line, .. } => {
            assert_eq!(path, Path::new("toy/config.json"));
            assert_eq!(*line, 2);
        }
        other => panic!("expected Error::Json, got {other:?}"),
    }
    assert!(err.to_string().contains("toy/config.json"));
}

#[test]
fn wrong_typed_field_is_named() {
    let err = parse(r#"{"num_train_timesteps": "many"}"#).unwrap_err();
    match &err {
        Error::ConfigField { path, field, .. } => {
            assert_eq!(path, Path::new("toy/config.json"));
            assert_eq!(field, "num_train_timesteps");
        }
        other => panic!("expected ConfigField, got {other:?}"),
    }
    let err = parse(r#"{"beta_schedule": "cubic"}"#).unwrap_err();
    assert!(
        matches!(&err, Error::ConfigField { field, .. } if field == "beta_schedule"),
        "{err}"
    );
    let err = parse(r#"{"block_out_channels": [1, "two"]}"#).unwrap_err();
    assert!(
        matches!(&err, Error::ConfigField { field, .. } if field == "block_out_channels[1]"),
        "{err}"
    );
}

#[test]
fn validation_errors_name_the_field() {
    let err = parse(r#"{"block_out_channels": [1, 2, 3]}"#).unwrap_err();
    assert!(
        matches!(&err, Error::ConfigField { field, .. } if field == "block_out_channels"),
        "{err}"
    );
}

#[test]
fn real_diffusers_model_index_round_trips() {
    let path = fixtures().join("configs/model_index_ddpm.json");
    let index = ModelIndex::load(&path).unwrap();
    assert_eq!(index.class_name, "DDPMPipeline");
    assert_eq!(
        index.components["unet"].class_name.as_deref(),
        Some("UNet2DModel")
    );
    assert_eq!(
        index.components["scheduler"].library.as_deref(),
        Some("diffusers")
    );
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(index.to_value(), original);
}

#[test]
fn model_index_with_absent_optional_component() {
    let text = r#"{"_class_name": "StableDiffusionPipeline", "safety_checker": [null, null],
                   "requires_safety_checker": false, "unet": ["diffusers", "UNet2DConditionModel"]}"#;
    let index = ModelIndex::from_json_str(text, Path::new("m/model_index.json")).unwrap();
    assert_eq!(index.components["safety_checker"].class_name, None);
    assert_eq!(index.options["requires_safety_checker"], false);
    let err = ModelIndex::from_json_str(
        r#"{"unet": ["diffusers", 3]}"#,
        Path::new("m/model_index.json"),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ConfigField { .. }));
}

#[test]
fn save_is_atomic_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let cfg = parse(r#"{"num_train_timesteps": 7, "x": 1}"#).unwrap();
    cfg.save(&path).unwrap();
    let again = ConfigFile::<ToyConfig>::load(&path).unwrap();
    assert_eq!(again.config, cfg.config);
    assert_eq!(again.unknown, cfg.unknown);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left behind"
    );
    let err = cfg
        .save(dir.path().join("missing/dir/config.json"))
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
}

fn toy_config() -> impl Strategy<Value = ToyConfig> {
    (
        1usize..5000,
        1e-6f64..1e-2,
        prop_oneof![Just(ToySchedule::Linear), Just(ToySchedule::ScaledLinear)],
        proptest::option::of(proptest::collection::vec(1e-5f64..0.5, 1..8)),
        proptest::collection::vec(1usize..512, 1..5),
    )
        .prop_map(|(n, b, s, t, blocks)| ToyConfig {
            num_train_timesteps: n,
            beta_start: b,
            beta_schedule: s,
            trained_betas: t,
            down_block_types: blocks.iter().map(|c| format!("Block{c}")).collect(),
            block_out_channels: blocks,
        })
}

proptest! {
    #[test]
    fn config_round_trips_through_json(cfg in toy_config(), extra in 0i64..100) {
        let mut file = ConfigFile::new(cfg);
        file.unknown.insert("zz_unknown".into(), serde_json::json!(extra));
        let text = file.to_json_string();
        let back = ConfigFile::<ToyConfig>::from_json_str(&text, Path::new("p.json")).unwrap();
        prop_assert_eq!(&back.config, &file.config);
        prop_assert_eq!(&back.unknown, &file.unknown);
        prop_assert_eq!(back.to_json_string(), text);
    }
}

#[test]
fn python_non_finite_floats_are_read() {
    // diffusers saves DPMSolverMultistepScheduler with `"lambda_min_clipped": -Infinity`.
    let value = diffusion_core::config::parse_json(
        r#"{"lambda_min_clipped": -Infinity, "s": "NaN stays a string"}"#,
        Path::new("scheduler_config.json"),
    )
    .unwrap();
    assert_eq!(value["lambda_min_clipped"], "-Infinity");
    assert_eq!(value["s"], "NaN stays a string");
}
