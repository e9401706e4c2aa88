//! Config files written by diffusers load with the right defaults and save back unchanged.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use diffusion_core::ConfigFile;
use diffusion_schedulers::{
    AnyScheduler, BetaSchedule, ConfiguredScheduler, DDIMScheduler, DDIMSchedulerConfig,
    DDPMScheduler, DDPMSchedulerConfig, Scheduler, SchedulerKind, SchedulerSpec,
};
use serde_json::Value;

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/configs")
}

fn read(path: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn temp_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "diffusion-schedulers-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[test]
fn diffusers_default_files_equal_our_defaults() -> Result<()> {
    let ddpm = DDPMScheduler::load(configs().join("ddpm_default"))?;
    ensure!(*ddpm.config() == DDPMSchedulerConfig::default());
    ensure!(ddpm.config_file().unknown_keys().is_empty());
    let ddim = DDIMScheduler::load(configs().join("ddim_default/scheduler_config.json"))?;
    ensure!(*ddim.config() == DDIMSchedulerConfig::default());
    ensure!(ddim.config_file().unknown_keys().is_empty());
    // Saving writes back exactly the keys and values diffusers wrote.
    for (dir, value) in [
        ("ddpm_default", ddpm.config_value()),
        ("ddim_default", ddim.config_value()),
    ] {
        let theirs = read(&configs().join(dir).join("scheduler_config.json"))?;
        ensure!(value == theirs, "{dir}: {value}\nvs\n{theirs}");
    }
    Ok(())
}

#[test]
fn partial_files_fill_defaults_as_diffusers_does() -> Result<()> {
    let dir = configs().join("ddim_partial");
    let scheduler = AnyScheduler::from_config_file(&dir)?;
    ensure!(scheduler.kind() == SchedulerKind::Ddim);
    let resolved = read(&dir.join("resolved.json"))?;
    let ours = scheduler.config_value();
    for (key, value) in resolved.as_object().context("resolved")? {
        if key.starts_with('_') {
            continue;
        }
        ensure!(
            ours.get(key) == Some(value),
            "{key}: {:?} vs {value}",
            ours.get(key)
        );
    }
    let ddim = scheduler.as_ddim().context("ddim")?;
    ensure!(ddim.config().beta_schedule == BetaSchedule::ScaledLinear);
    ensure!(ddim.config_file().unknown_keys() == ["some_future_key"]);
    Ok(())
}

#[test]
fn save_and_load_round_trip_through_any_scheduler() -> Result<()> {
    let dir = temp_dir("roundtrip")?;
    let original = AnyScheduler::from_config_file(configs().join("ddim_partial"))?;
    original.save_config(&dir)?;
    let again = AnyScheduler::from_config_file(&dir)?;
    ensure!(again.config_value() == original.config_value());
    ensure!(again.config_value()["some_future_key"] == 3);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn from_config_swaps_classes_like_diffusers() -> Result<()> {
    // DDIMScheduler.from_config(ddpm.config): variance_type is dropped, the rest carries over.
    let ddpm = DDPMScheduler::load(configs().join("ddpm_default"))?;
    let ddim = AnyScheduler::convert(&ddpm, &SchedulerSpec::parse("DDIMScheduler")?)?;
    let value = ddim.config_value();
    ensure!(value["_class_name"] == "DDIMScheduler");
    ensure!(value.get("variance_type").is_none());
    ensure!(*ddim.as_ddim().context("ddim")?.config() == DDIMSchedulerConfig::default());
    // And back: DDPM gets its own default variance_type.
    let back = AnyScheduler::convert(&ddim, &SchedulerSpec::parse("DDPM")?)?;
    ensure!(*back.as_ddpm().context("ddpm")?.config() == DDPMSchedulerConfig::default());
    // ConfigFile::convert gives the same typed config.
    let via_core: ConfigFile<DDIMSchedulerConfig> =
        ddpm.config_file().convert(&Default::default())?;
    ensure!(via_core.config == DDIMSchedulerConfig::default());
    Ok(())
}

#[test]
fn trained_betas_survive_a_round_trip() -> Result<()> {
    let config = DDPMSchedulerConfig {
        num_train_timesteps: 4,
        trained_betas: Some(vec![0.1, 0.2, 0.3, 0.4]),
        ..Default::default()
    };
    let scheduler = DDPMScheduler::new(config.clone())?;
    let text = serde_json::to_string(&scheduler.config_value())?;
    let file = ConfigFile::<DDPMSchedulerConfig>::from_json_str(&text, Path::new("t.json"))?;
    ensure!(file.config == config);
    let betas = &scheduler.noise_schedule().betas;
    ensure!(betas == &[0.1f32, 0.2, 0.3, 0.4].map(f64::from));
    Ok(())
}
