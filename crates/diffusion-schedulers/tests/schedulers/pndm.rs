//! PNDM: diffusers' own tests (tests/schedulers/test_scheduler_pndm.py), its A1111 alias, and
//! bad input. Trajectory parity is in parity.rs with the other classes.

use anyhow::{Context, Result, ensure};
use diffusion_core::Error;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DDIMScheduler, DDIMSchedulerConfig, PNDMScheduler,
    PNDMSchedulerConfig, PredictionType, Scheduler, SchedulerKind, SchedulerSpec, SetTimesteps,
    StepOptions,
};

use crate::common::{dummy_sample_deter, host, tensor};
use crate::golden::check;

fn abs_sum_mean(t: &Tensor<4>) -> (f64, f64) {
    let v = host(t);
    let sum: f64 = v.iter().map(|x| f64::from(x.abs())).sum();
    (sum, sum / v.len() as f64)
}

fn full_loop(config: PNDMSchedulerConfig) -> Result<Tensor<4>> {
    let mut scheduler = PNDMScheduler::new(config)?;
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
fn pndm_full_loop_no_noise() -> Result<()> {
    let x = full_loop(PNDMSchedulerConfig::default())?;
    check("pndm/full_loop_no_noise", &x, 198.1318, 0.2580)
}

#[test]
fn pndm_full_loop_with_v_prediction() -> Result<()> {
    let x = full_loop(PNDMSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..Default::default()
    })?;
    check("pndm/full_loop_with_v_prediction", &x, 67.3986, 0.0878)
}

/// diffusers' hard-coded sum and mean, with its tolerances, and nothing finer.
///
/// diffusers' `beta_start = 0.01` loops are ill-conditioned: its dummy model with alpha_bar
/// falling to 2e-6 makes the final sample differ by 5e-5 relative between float32 and float64
/// (measured with the oracle), and torch's CPU sqrt is not correctly rounded (its
/// `sqrt(alpha_800 / alpha_900)` is one ulp below the IEEE value here), which the loop
/// amplifies to 4e-5 of the final sample. So the oracle's final sample is not a 1e-5 target for
/// these two; the same configs are held to 1e-5 per step with the well-conditioned trajectory
/// model in parity.rs (fixture cases with `set_alpha_to_one` and `beta_start` 0.01).
fn check_diffusers_numbers(name: &str, x: &Tensor<4>, sum_0: f64, mean_0: f64) -> Result<()> {
    let (sum, mean) = abs_sum_mean(x);
    ensure!(
        (sum - sum_0).abs() < 1e-2,
        "{name}: sum {sum} vs diffusers' {sum_0}"
    );
    ensure!(
        (mean - mean_0).abs() < 1e-3,
        "{name}: mean {mean} vs diffusers' {mean_0}"
    );
    Ok(())
}

#[test]
fn pndm_full_loop_with_and_without_set_alpha_to_one() -> Result<()> {
    let x = full_loop(PNDMSchedulerConfig {
        set_alpha_to_one: true,
        beta_start: 0.01,
        ..Default::default()
    })?;
    check_diffusers_numbers("with_set_alpha_to_one", &x, 230.0399, 0.2995)?;
    let x = full_loop(PNDMSchedulerConfig {
        set_alpha_to_one: false,
        beta_start: 0.01,
        ..Default::default()
    })?;
    check_diffusers_numbers("with_no_set_alpha_to_one", &x, 186.9482, 0.2434)
}

#[test]
fn pndm_steps_offset_timesteps() -> Result<()> {
    // test_steps_offset: the Runge-Kutta warm-up repeats the half steps.
    let mut scheduler = PNDMScheduler::new(PNDMSchedulerConfig {
        steps_offset: 1,
        ..Default::default()
    })?;
    scheduler.set_timesteps(10)?;
    let expected = [
        901.0, 851.0, 851.0, 801.0, 801.0, 751.0, 751.0, 701.0, 701.0, 651.0, 651.0, 601.0, 601.0,
        501.0, 401.0, 301.0, 201.0, 101.0, 1.0,
    ];
    ensure!(
        scheduler.timesteps() == expected,
        "{:?}",
        scheduler.timesteps()
    );
    // PLMS only: the second timestep is evaluated twice.
    let mut plms = PNDMScheduler::new(PNDMSchedulerConfig {
        steps_offset: 1,
        skip_prk_steps: true,
        ..Default::default()
    })?;
    plms.set_timesteps(5)?;
    ensure!(plms.timesteps() == [801.0, 601.0, 601.0, 401.0, 201.0, 1.0]);
    Ok(())
}

#[test]
fn pndm_power_of_three_steps() -> Result<()> {
    // test_pow_of_3_inference_steps: 27 steps once failed indexing alphas at the first step.
    let mut scheduler = PNDMScheduler::new(PNDMSchedulerConfig::default())?;
    scheduler.set_timesteps(27)?;
    let mut x = dummy_sample_deter(false);
    let first_two: Vec<f64> = scheduler.timesteps()[..2].to_vec();
    for t in first_two {
        let residual = x.clone().mul_scalar(0.1);
        x = scheduler
            .step(residual, t, x, StepOptions::default())?
            .prev_sample;
    }
    ensure!(scheduler.counter() == 2);
    Ok(())
}

#[test]
fn plms_alias_and_conversion_from_ddim() -> Result<()> {
    let spec = SchedulerSpec::parse("plms")?;
    ensure!(spec.kind == SchedulerKind::Pndm);
    ensure!(SchedulerSpec::parse("PNDMScheduler")?.kind == SchedulerKind::Pndm);
    let ddim = DDIMScheduler::new(DDIMSchedulerConfig {
        beta_start: 0.00085,
        steps_offset: 1,
        set_alpha_to_one: false,
        clip_sample: false,
        ..Default::default()
    })?;
    let pndm = AnyScheduler::convert(&ddim, &spec)?;
    let pndm = pndm.as_pndm().context("pndm")?;
    let c = pndm.config();
    ensure!(c.skip_prk_steps && c.steps_offset == 1 && c.beta_start == 0.00085);
    ensure!(!c.set_alpha_to_one);
    ensure!(pndm.config_value().get("clip_sample").is_none());
    ensure!(pndm.config_value()["_class_name"] == "PNDMScheduler");
    Ok(())
}

#[test]
fn pndm_bad_input() {
    let sample = || tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let mut s = PNDMScheduler::new(PNDMSchedulerConfig::default()).unwrap();
    // Before set_timesteps.
    let r = s.step(sample(), 999.0, sample(), StepOptions::default());
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "num_inference_steps"));
    // The Runge-Kutta warm-up needs 4 steps; PLMS alone does not.
    let r = s.set_timesteps(3);
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "num_inference_steps"));
    let r = s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 500.0]));
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "timesteps"));
    s.set_timesteps(4).unwrap();
    // Options it does not take, shapes that differ, fractional timesteps.
    let r = s.step(
        sample(),
        999.0,
        sample(),
        StepOptions::default().with_eta(0.5),
    );
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "eta"));
    let other = tensor(vec![0.5f32; 2 * 3 * 2 * 3], [2, 3, 2, 3]);
    let r = s.step(other, 999.0, sample(), StepOptions::default());
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "model_output"));
    let r = s.step(sample(), 999.5, sample(), StepOptions::default());
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "timestep"));
    // Past the end of the schedule.
    let n = s.timesteps().len();
    for t in s.timesteps().to_vec() {
        s.step(sample(), t, sample(), StepOptions::default())
            .unwrap();
    }
    assert_eq!(s.counter(), n);
    let r = s.step(sample(), 0.0, sample(), StepOptions::default());
    assert!(matches!(r, Err(Error::InvalidArgument { name, .. }) if name == "timestep"));
    // Configs diffusers refuses.
    for (key, value) in [
        ("prediction_type", "sample"),
        ("beta_schedule", "sigmoid"),
        ("timestep_spacing", "karras"),
    ] {
        let json = serde_json::json!({ key: value });
        let r = AnyScheduler::build(SchedulerKind::Pndm, json, std::path::Path::new("x"));
        assert!(r.is_err(), "{key} = {value} was accepted");
    }
    let ok = PNDMScheduler::new(PNDMSchedulerConfig {
        skip_prk_steps: true,
        ..Default::default()
    });
    assert!(ok.unwrap().set_timesteps(1).is_ok());
}

#[test]
fn pndm_default_config_written_by_diffusers_loads_to_our_default() -> Result<()> {
    let path = crate::common::fixtures().join("configs/PNDMScheduler/scheduler_config.json");
    let pndm = PNDMScheduler::load(&path)?;
    ensure!(*pndm.config() == PNDMSchedulerConfig::default());
    ensure!(pndm.config_file().unknown_keys().is_empty());
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    ensure!(
        pndm.config_value() == theirs,
        "{}\nvs\n{theirs}",
        pndm.config_value()
    );
    let any = AnyScheduler::from_config_file(&path)?;
    ensure!(any.kind() == SchedulerKind::Pndm);
    Ok(())
}
