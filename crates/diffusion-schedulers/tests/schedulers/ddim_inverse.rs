//! Inverse DDIM: diffusers' own tests (tests/schedulers/test_scheduler_ddim_inverse.py),
//! conversion, default config and bad input. Trajectory parity is in parity.rs with the other
//! classes.

use anyhow::{Context, Result, ensure};
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DDIMInverseScheduler, DDIMInverseSchedulerConfig,
    DDIMScheduler, DDIMSchedulerConfig, PredictionType, Scheduler, SchedulerKind, SchedulerSpec,
    SetTimesteps, StepOptions,
};

use crate::common::{dummy_sample_deter, fixtures, tensor};
use crate::golden::check;

fn full_loop(config: DDIMInverseSchedulerConfig) -> Result<Tensor<4>> {
    let mut scheduler = DDIMInverseScheduler::new(config)?;
    scheduler.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false);
    for t in scheduler.timesteps().to_vec() {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = scheduler
            .step(residual, t, x, StepOptions::default())?
            .prev_sample;
    }
    Ok(x)
}

#[test]
fn ddim_inverse_full_loops() -> Result<()> {
    // get_scheduler_config() of the test: the defaults, spelled out there.
    let x = full_loop(DDIMInverseSchedulerConfig::default())?;
    check("ddim_inverse/full_loop_no_noise", &x, 671.6816, 0.8746)?;
    let x = full_loop(DDIMInverseSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..Default::default()
    })?;
    check(
        "ddim_inverse/full_loop_with_v_prediction",
        &x,
        1394.2185,
        1.8154,
    )?;
    let x = full_loop(DDIMInverseSchedulerConfig {
        set_alpha_to_one: true,
        beta_start: 0.01,
        ..Default::default()
    })?;
    check(
        "ddim_inverse/full_loop_with_set_alpha_to_one",
        &x,
        539.9622,
        0.7031,
    )?;
    let x = full_loop(DDIMInverseSchedulerConfig {
        set_alpha_to_one: false,
        beta_start: 0.01,
        ..Default::default()
    })?;
    check(
        "ddim_inverse/full_loop_with_no_set_alpha_to_one",
        &x,
        542.6722,
        0.7066,
    )
}

#[test]
fn ddim_inverse_steps_offset_and_default_config() -> Result<()> {
    // test_steps_offset: ascending, offset added.
    let mut s = DDIMInverseScheduler::new(DDIMInverseSchedulerConfig {
        steps_offset: 1,
        ..Default::default()
    })?;
    ensure!(s.timesteps().len() == 1000 && s.timesteps()[0] == 0.0);
    s.set_timesteps(5)?;
    ensure!(s.timesteps() == [1.0, 201.0, 401.0, 601.0, 801.0]);
    let path = fixtures().join("configs/DDIMInverseScheduler/scheduler_config.json");
    let loaded = DDIMInverseScheduler::load(&path)?;
    ensure!(*loaded.config() == DDIMInverseSchedulerConfig::default());
    ensure!(loaded.config_file().unknown_keys().is_empty());
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    ensure!(loaded.config_value() == theirs, "{}", loaded.config_value());
    // From a DDIM config, as inversion pipelines build it.
    let ddim = DDIMScheduler::new(DDIMSchedulerConfig {
        beta_start: 0.00085,
        clip_sample: false,
        ..Default::default()
    })?;
    let inverse = AnyScheduler::convert(&ddim, &SchedulerSpec::parse("DDIMInverseScheduler")?)?;
    let c = inverse.as_ddim_inverse().context("inverse")?.config();
    ensure!(c.beta_start == 0.00085 && !c.clip_sample);
    ensure!(inverse.kind() == SchedulerKind::DdimInverse);
    Ok(())
}

#[test]
fn ddim_inverse_bad_input() {
    let sample = || tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let name = |r: diffusion_core::Result<()>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        Err(Error::ConfigField { field, .. }) => field,
        other => format!("unexpected: {other:?}"),
    };
    let mut s = DDIMInverseScheduler::new(DDIMInverseSchedulerConfig::default()).unwrap();
    let r = s.step(sample(), 1.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "num_inference_steps");
    assert_eq!(name(s.set_timesteps(1001)), "num_inference_steps");
    assert_eq!(
        name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![1.0]))),
        "timesteps"
    );
    s.set_timesteps(10).unwrap();
    let r = s.step(sample(), 1.5, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    let r = s.step(sample(), 1000.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    let r = s.step(
        sample(),
        0.0,
        sample(),
        StepOptions::default().with_eta(0.5),
    );
    assert_eq!(name(r.map(|_| ())), "eta");
    let r = s.add_noise(sample(), sample(), &[10.0]);
    assert_eq!(name(r.map(|_| ())), "add_noise");
    for (key, value) in [
        ("timestep_spacing", serde_json::json!("linspace")),
        ("beta_schedule", serde_json::json!("sigmoid")),
        ("prediction_type", serde_json::json!("flow_prediction")),
    ] {
        let r = AnyScheduler::build(
            SchedulerKind::DdimInverse,
            serde_json::json!({ key: value }),
            std::path::Path::new("x"),
        );
        assert!(r.is_err(), "{key} = {value} was accepted");
    }
}
