//! IPNDMScheduler: default config file, the schedule diffusers builds at construction, and bad
//! input. (diffusers' only golden loop, test_full_loop_no_noise, reruns the schedule after
//! resetting a private step index while keeping the history; there is no such operation
//! here.) Trajectories are checked in more.rs.

use anyhow::{Result, ensure};
use diffusion_schedulers::{
    ConfiguredScheduler, IPNDMScheduler, IPNDMSchedulerConfig, Scheduler, SetTimesteps, StepOptions,
};

use crate::common::{arg_name, field_name, host, tensor};
use crate::more::{comparable, default_config_file};

#[test]
fn default_config_file_and_initial_schedule() -> Result<()> {
    let path = default_config_file("IPNDMScheduler");
    let s = IPNDMScheduler::load(&path)?;
    ensure!(*s.config() == IPNDMSchedulerConfig::default());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    // Like diffusers, a fresh scheduler already has a num_train_timesteps-step schedule that
    // runs from timestep 1 (pure noise) towards 0.
    ensure!(s.num_inference_steps() == Some(1000) && s.timesteps().len() == 1000);
    ensure!(s.timesteps()[0] == 1.0 && s.betas()[1000] == 0.0 && s.alphas()[1000] == 1.0);
    ensure!(s.sigmas().is_none());
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    // Trained noise levels need a step and an end, each in [0, 1] (diffusers' alphas are
    // NaN past 1).
    for betas in [vec![0.5], vec![1.5, 0.0], vec![0.9, f64::NAN, 0.0]] {
        assert_eq!(
            field_name(IPNDMScheduler::new(IPNDMSchedulerConfig {
                trained_betas: Some(betas.clone()),
                ..Default::default()
            })),
            "trained_betas",
            "{betas:?}"
        );
    }
    assert_eq!(
        field_name(IPNDMScheduler::new(IPNDMSchedulerConfig {
            num_train_timesteps: 0,
            ..Default::default()
        })),
        "num_train_timesteps"
    );
    let mut s = IPNDMScheduler::new(Default::default())?;
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![1.0, 0.5]))),
        "timesteps"
    );
    s.set_timesteps(4)?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    assert_eq!(
        arg_name(s.step(x.clone(), 0.3, x.clone(), StepOptions::default())),
        "timestep"
    );
    assert_eq!(
        arg_name(s.add_noise(x.clone(), x.clone(), &[1.0])),
        "add_noise"
    );
    // Four steps run to the end; a fifth is past it.
    let mut y = x;
    for t in s.timesteps().to_vec() {
        y = s
            .step(y.clone().mul_scalar(0.5), t, y, StepOptions::default())?
            .prev_sample;
    }
    ensure!(host(&y).iter().all(|v| v.is_finite()));
    assert_eq!(
        arg_name(s.step(y.clone(), 1.0, y, StepOptions::default())),
        "timestep"
    );
    Ok(())
}
