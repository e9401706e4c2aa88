//! CMStochasticIterativeScheduler: diffusers' own test loops
//! (tests/schedulers/test_scheduler_consistency_model.py), default config file and bad input.
//! Trajectories are checked in extra.rs.

use anyhow::{Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::{
    CMStochasticIterativeScheduler, CMStochasticIterativeSchedulerConfig, ConfiguredScheduler,
    Scheduler, SetTimesteps, StepOptions,
};

use crate::common::{arg_name, dummy_sample_deter, field_name, host, max_abs, tensor};
use crate::more::{check_golden, comparable, default_config_file_in, golden_in};

/// diffusers' loop: the model sees the scaled sample, `step` the unscaled one; noise from
/// `torch.manual_seed(0)`.
fn full_loop(request: SetTimesteps) -> Result<(f64, diffusion_core::burn::tensor::Tensor<4>)> {
    let mut s = CMStochasticIterativeScheduler::new(CMStochasticIterativeSchedulerConfig {
        num_train_timesteps: 201,
        ..Default::default()
    })?;
    s.set_timesteps_with(request)?;
    let mut generator = TorchGenerator::new(0);
    let mut x = dummy_sample_deter(false).mul_scalar(s.init_noise_sigma() as f32);
    let scale = max_abs(&host(&x));
    for t in s.timesteps().to_vec() {
        let scaled = s.scale_model_input(x.clone(), t)?;
        let out = scaled.mul_scalar(t).div_scalar(t + 1.0);
        let options = StepOptions::default().with_generator(&mut generator);
        x = s.step(out, t, x, options)?.prev_sample;
    }
    Ok((scale, x))
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    let (scale, x) = full_loop(SetTimesteps::steps(1))?;
    check_golden(
        &golden_in("extra", "cm/full_loop_no_noise_onestep")?,
        &x,
        scale,
    )?;
    let (scale, x) = full_loop(SetTimesteps::custom_timesteps(vec![106.0, 0.0]))?;
    check_golden(
        &golden_in("extra", "cm/full_loop_no_noise_multistep")?,
        &x,
        scale,
    )
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file_in("extra", "CMStochasticIterativeScheduler");
    let s = CMStochasticIterativeScheduler::load(&path)?;
    ensure!(*s.config() == CMStochasticIterativeSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    ensure!(s.init_noise_sigma() == 80.0);
    ensure!(s.timesteps().len() == 40 && s.sigmas().is_some_and(|v| v.len() == 40));
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            CMStochasticIterativeSchedulerConfig {
                sigma_min: 100.0,
                ..Default::default()
            },
            "sigma_min",
        ),
        (
            CMStochasticIterativeSchedulerConfig {
                rho: 0.0,
                ..Default::default()
            },
            "rho",
        ),
        (
            CMStochasticIterativeSchedulerConfig {
                num_train_timesteps: 0,
                ..Default::default()
            },
            "num_train_timesteps",
        ),
    ] {
        assert_eq!(
            field_name(CMStochasticIterativeScheduler::new(config)),
            field
        );
    }
    let mut s = CMStochasticIterativeScheduler::new(Default::default())?;
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(arg_name(s.set_timesteps(41)), "num_inference_steps");
    // diffusers' tests: increasing, too large, and both a count and timesteps.
    for custom in [
        vec![39.0, 30.0, 12.0, 15.0, 0.0],
        vec![40.0],
        vec![3.5],
        vec![],
    ] {
        assert_eq!(
            arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(custom))),
            "timesteps"
        );
    }
    let mut both = SetTimesteps::custom_timesteps(vec![39.0, 30.0, 12.0, 1.0, 0.0]);
    both.num_inference_steps = Some(5);
    assert_eq!(arg_name(s.set_timesteps_with(both)), "timesteps");
    s.set_timesteps(3)?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    assert_eq!(
        arg_name(s.step(x.clone(), 0.123, x.clone(), StepOptions::default())),
        "timestep"
    );
    let t0 = s.timesteps()[0];
    // Multistep schedules draw noise.
    assert_eq!(
        arg_name(s.step(x.clone(), t0, x.clone(), StepOptions::default())),
        "generator"
    );
    let mut generator = TorchGenerator::new(0);
    for _ in 0..3 {
        let options = StepOptions::default().with_generator(&mut generator);
        s.step(x.clone(), t0, x.clone(), options)?;
    }
    let options = StepOptions::default().with_generator(&mut generator);
    assert_eq!(arg_name(s.step(x.clone(), t0, x, options)), "timestep");
    Ok(())
}
