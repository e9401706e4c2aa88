//! EDMEulerScheduler: diffusers' own test loop (tests/schedulers/test_scheduler_edm_euler.py),
//! default config file and bad input. Trajectories are checked in more.rs.

use anyhow::{Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::{
    ConfiguredScheduler, EDMEulerScheduler, EDMEulerSchedulerConfig, PredictionType, Scheduler,
    SetTimesteps, StepOptions,
};

use crate::common::{arg_name, dummy_sample_deter, field_name, host, max_abs, tensor};
use crate::more::{check_golden, comparable, default_config_file, golden};

#[test]
fn diffusers_full_loop() -> Result<()> {
    let mut s = EDMEulerScheduler::new(EDMEulerSchedulerConfig {
        num_train_timesteps: 256,
        ..Default::default()
    })?;
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false).mul_scalar(s.init_noise_sigma() as f32);
    let scale = max_abs(&host(&x));
    for t in s.timesteps().to_vec() {
        let scaled = s.scale_model_input(x.clone(), t)?;
        let out = scaled.mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    check_golden(&golden("edm_euler/full_loop_no_noise")?, &x, scale)
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file("EDMEulerScheduler");
    let s = EDMEulerScheduler::load(&path)?;
    ensure!(*s.config() == EDMEulerSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    ensure!((s.init_noise_sigma() - 6401f64.sqrt()).abs() < 1e-12);
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            EDMEulerSchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..Default::default()
            },
            "prediction_type",
        ),
        (
            EDMEulerSchedulerConfig {
                sigma_min: 100.0,
                ..Default::default()
            },
            "sigma_min",
        ),
        (
            EDMEulerSchedulerConfig {
                sigma_data: 0.0,
                ..Default::default()
            },
            "sigma_data",
        ),
    ] {
        assert_eq!(field_name(EDMEulerScheduler::new(config)), field);
    }
    let mut s = EDMEulerScheduler::new(Default::default())?;
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![0.5]))),
        "sigmas"
    );
    s.set_timesteps(4)?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    assert_eq!(
        arg_name(s.step(x.clone(), 0.123, x.clone(), StepOptions::default())),
        "timestep"
    );
    // Churn draws noise.
    let t0 = s.timesteps()[0];
    let churn = StepOptions {
        s_churn: Some(1.0),
        ..Default::default()
    };
    assert_eq!(
        arg_name(s.step(x.clone(), t0, x.clone(), churn)),
        "generator"
    );
    let mut generator = TorchGenerator::new(0);
    let churn = StepOptions {
        s_churn: Some(1.0),
        ..Default::default()
    }
    .with_generator(&mut generator);
    let y = s.step(x.clone(), t0, x, churn)?.prev_sample;
    ensure!(host(&y).iter().all(|v| v.is_finite()));
    Ok(())
}
