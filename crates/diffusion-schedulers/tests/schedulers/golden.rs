//! diffusers' own scheduler tests (tests/schedulers/test_scheduler_ddpm.py and
//! test_scheduler_ddim.py): the same deterministic sample, dummy model and loops, checked
//! against the numbers hard-coded there, and against the oracle's final samples.

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::{
    ConfiguredScheduler, DDIMScheduler, DDIMSchedulerConfig, DDPMScheduler, DDPMSchedulerConfig,
    PredictionType, Scheduler, SetTimesteps, StepOptions,
};

use crate::common::{Tensors, dummy_sample_deter, host, read_json, rel_err};

fn abs_sum_mean(t: &Tensor<4>) -> (f64, f64) {
    let v = host(t);
    let sum: f64 = v.iter().map(|x| f64::from(x.abs())).sum();
    (sum, sum / v.len() as f64)
}

/// Check a loop result against diffusers' hard-coded sum/mean (with its tolerances) and against
/// the oracle's final sample.
pub(crate) fn check(
    name: &str,
    result: &Tensor<4>,
    expected_sum: f64,
    expected_mean: f64,
) -> Result<()> {
    let (sum, mean) = abs_sum_mean(result);
    ensure!(
        (sum - expected_sum).abs() < 1e-2,
        "{name}: sum {sum} vs diffusers' {expected_sum}"
    );
    ensure!(
        (mean - expected_mean).abs() < 1e-3,
        "{name}: mean {mean} vs diffusers' {expected_mean}"
    );
    let golden = Tensors::load("golden.safetensors")?;
    let err = rel_err(&host(result), golden.values(name)?);
    ensure!(
        err <= 1e-5,
        "{name}: relative error {err:e} against the oracle"
    );
    // The oracle's recorded sums are the same quantity computed by torch.
    let meta = read_json("golden.json")?;
    let entry = meta
        .as_array()
        .context("golden")?
        .iter()
        .find(|e| e["name"] == name)
        .context("golden entry")?;
    let oracle_sum = entry["sum"].as_f64().context("sum")?;
    ensure!(
        (sum - oracle_sum).abs() <= 1e-5 * oracle_sum,
        "{name}: sum {sum} vs the oracle's {oracle_sum}"
    );
    Ok(())
}

fn ddpm_test_config() -> DDPMSchedulerConfig {
    // get_scheduler_config() of test_scheduler_ddpm.py: the defaults, spelled out there.
    DDPMSchedulerConfig::default()
}

fn ddpm_full_loop(config: DDPMSchedulerConfig) -> Result<Tensor<4>> {
    let mut scheduler = DDPMScheduler::new(config)?;
    let mut x = dummy_sample_deter(false);
    // `generator = torch.manual_seed(0)`: the default generator reseeded, i.e. a fresh one.
    let mut generator = TorchGenerator::new(0);
    for t in (0..scheduler.num_train_timesteps()).rev() {
        let t = t as f64;
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = scheduler
            .step(
                residual,
                t,
                x,
                StepOptions::default().with_generator(&mut generator),
            )?
            .prev_sample;
    }
    Ok(x)
}

#[test]
fn ddpm_full_loop_no_noise() -> Result<()> {
    let x = ddpm_full_loop(ddpm_test_config())?;
    check("ddpm/full_loop_no_noise", &x, 258.9606, 0.3372)
}

#[test]
fn ddpm_full_loop_with_v_prediction() -> Result<()> {
    let x = ddpm_full_loop(DDPMSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..ddpm_test_config()
    })?;
    check("ddpm/full_loop_with_v_prediction", &x, 202.0296, 0.2631)
}

#[test]
fn ddpm_full_loop_with_noise() -> Result<()> {
    let mut scheduler = DDPMScheduler::new(ddpm_test_config())?;
    let t_start = scheduler.num_train_timesteps() - 2;
    let timesteps = scheduler.timesteps()[t_start * scheduler.order()..].to_vec();
    let mut x = scheduler.add_noise(
        dummy_sample_deter(false),
        dummy_sample_deter(true),
        &timesteps[..1],
    )?;
    let mut generator = TorchGenerator::new(0);
    for &t in &timesteps {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = scheduler
            .step(
                residual,
                t,
                x,
                StepOptions::default().with_generator(&mut generator),
            )?
            .prev_sample;
    }
    check("ddpm/full_loop_with_noise", &x, 387.9466, 0.5051)
}

#[test]
fn ddpm_variance() -> Result<()> {
    let scheduler = DDPMScheduler::new(ddpm_test_config())?;
    for (t, expected) in [(0.0, 0.0), (487.0, 0.00979), (999.0, 0.02)] {
        let v = scheduler.fixed_variance(t)?;
        ensure!((v - expected).abs() < 1e-5, "variance at {t}: {v}");
    }
    Ok(())
}

#[test]
fn ddpm_custom_timesteps_previous_timestep() -> Result<()> {
    let mut scheduler = DDPMScheduler::new(ddpm_test_config())?;
    let custom = vec![100.0, 87.0, 50.0, 1.0, 0.0];
    scheduler.set_timesteps_with(SetTimesteps::custom_timesteps(custom.clone()))?;
    ensure!(scheduler.timesteps() == custom.as_slice());
    for (i, &t) in custom.iter().enumerate() {
        let expected = custom.get(i + 1).copied().unwrap_or(-1.0);
        ensure!(scheduler.previous_timestep(t)? == expected, "after {t}");
    }
    Ok(())
}

fn ddim_test_config() -> DDIMSchedulerConfig {
    DDIMSchedulerConfig::default()
}

fn ddim_full_loop(config: DDIMSchedulerConfig) -> Result<Tensor<4>> {
    let mut scheduler = DDIMScheduler::new(config)?;
    scheduler.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false);
    for t in scheduler.timesteps().to_vec() {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = scheduler
            .step(residual, t, x, StepOptions::default().with_eta(0.0))?
            .prev_sample;
    }
    Ok(x)
}

#[test]
fn ddim_full_loop_no_noise() -> Result<()> {
    let x = ddim_full_loop(ddim_test_config())?;
    check("ddim/full_loop_no_noise", &x, 172.0067, 0.223967)
}

#[test]
fn ddim_full_loop_with_v_prediction() -> Result<()> {
    let x = ddim_full_loop(DDIMSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..ddim_test_config()
    })?;
    check("ddim/full_loop_with_v_prediction", &x, 52.5302, 0.0684)
}

#[test]
fn ddim_full_loop_with_and_without_set_alpha_to_one() -> Result<()> {
    let x = ddim_full_loop(DDIMSchedulerConfig {
        set_alpha_to_one: true,
        beta_start: 0.01,
        ..ddim_test_config()
    })?;
    check("ddim/full_loop_with_set_alpha_to_one", &x, 149.8295, 0.1951)?;
    let x = ddim_full_loop(DDIMSchedulerConfig {
        set_alpha_to_one: false,
        beta_start: 0.01,
        ..ddim_test_config()
    })?;
    check(
        "ddim/full_loop_with_no_set_alpha_to_one",
        &x,
        149.0784,
        0.1941,
    )
}

#[test]
fn ddim_full_loop_with_noise() -> Result<()> {
    let mut scheduler = DDIMScheduler::new(ddim_test_config())?;
    scheduler.set_timesteps(10)?;
    let timesteps = scheduler.timesteps()[8..].to_vec();
    let mut x = scheduler.add_noise(
        dummy_sample_deter(false),
        dummy_sample_deter(true),
        &timesteps[..1],
    )?;
    for &t in &timesteps {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = scheduler
            .step(residual, t, x, StepOptions::default())?
            .prev_sample;
    }
    check("ddim/full_loop_with_noise", &x, 354.5418, 0.4616)
}

#[test]
fn ddim_variance() -> Result<()> {
    let scheduler = DDIMScheduler::new(ddim_test_config())?;
    for (t, prev, expected) in [
        (0.0, 0.0, 0.0),
        (420.0, 400.0, 0.14771),
        (980.0, 960.0, 0.32460),
        (487.0, 486.0, 0.00979),
        (999.0, 998.0, 0.02),
    ] {
        let v = scheduler.variance(t, prev)?;
        ensure!((v - expected).abs() < 1e-5, "variance({t}, {prev}) = {v}");
    }
    Ok(())
}

#[test]
fn ddim_steps_offset() -> Result<()> {
    let mut scheduler = DDIMScheduler::new(DDIMSchedulerConfig {
        steps_offset: 1,
        ..ddim_test_config()
    })?;
    scheduler.set_timesteps(5)?;
    ensure!(scheduler.timesteps() == [801.0, 601.0, 401.0, 201.0, 1.0]);
    ensure!(scheduler.config().steps_offset == 1);
    Ok(())
}
