//! TCDScheduler: diffusers' own test loops (tests/schedulers/test_scheduler_tcd.py), its
//! default config file and bad input. Trajectories are checked in more.rs.

use anyhow::{Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::{
    ConfiguredScheduler, LCMSchedulerConfig, PredictionType, Scheduler, SetTimesteps, StepOptions,
    TCDScheduler, TCDSchedulerConfig,
};

use crate::common::{arg_name, dummy_sample_deter, field_name, host, max_abs, tensor};
use crate::more::{check_golden, comparable, default_config_file, golden};

fn full_loop(steps: usize, name: &str) -> Result<()> {
    let mut s = TCDScheduler::new(Default::default())?;
    s.set_timesteps(steps)?;
    let mut x = dummy_sample_deter(false);
    let scale = max_abs(&host(&x));
    let mut generator = TorchGenerator::new(0);
    for t in s.timesteps().to_vec() {
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        let options = StepOptions::default()
            .with_eta(0.0)
            .with_generator(&mut generator);
        x = s.step(out, t, x, options)?.prev_sample;
    }
    check_golden(&golden(name)?, &x, scale)
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    full_loop(1, "tcd/full_loop_onestep_deter")?;
    full_loop(10, "tcd/full_loop_multistep_deter")
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file("TCDScheduler");
    let s = TCDScheduler::load(&path)?;
    ensure!(*s.config() == TCDSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    // clip_sample and thresholding have no effect on TCD (as in diffusers) but are accepted,
    // so a DDPM config (clip_sample = true) converts; see `ignored_options_are_accepted`.
    for (config, field) in [
        (
            LCMSchedulerConfig {
                original_inference_steps: 0,
                ..Default::default()
            },
            "original_inference_steps",
        ),
        (
            LCMSchedulerConfig {
                prediction_type: PredictionType::FlowPrediction,
                ..Default::default()
            },
            "prediction_type",
        ),
    ] {
        assert_eq!(
            field_name(TCDScheduler::new(TCDSchedulerConfig(config))),
            field
        );
    }
    let mut s = TCDScheduler::new(Default::default())?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    assert_eq!(
        arg_name(s.step(x.clone(), 999.0, x.clone(), StepOptions::default())),
        "num_inference_steps"
    );
    // At most the 50 distillation steps; custom timesteps must descend.
    assert_eq!(arg_name(s.set_timesteps(51)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![500.0, 700.0]))),
        "timesteps"
    );
    s.set_timesteps(4)?;
    let t0 = s.timesteps()[0];
    assert_eq!(
        arg_name(s.step(
            x.clone(),
            t0,
            x.clone(),
            StepOptions::default().with_eta(1.5)
        )),
        "eta"
    );
    // The default eta (0.3) is stochastic: it needs noise.
    assert_eq!(
        arg_name(s.step(x.clone(), t0, x.clone(), StepOptions::default())),
        "generator"
    );
    assert_eq!(
        arg_name(s.step(
            x.clone(),
            3.0,
            x.clone(),
            StepOptions::default().with_eta(0.0)
        )),
        "timestep"
    );
    let y = s
        .step(x.clone(), t0, x, StepOptions::default().with_eta(0.0))?
        .prev_sample;
    ensure!(host(&y).iter().all(|v| v.is_finite()));
    Ok(())
}

/// diffusers' TCD step ignores `clip_sample` and `thresholding`; a config with them (a DDPM
/// config converted with `from_config`) builds and steps exactly like one without.
#[test]
fn ignored_options_are_accepted_and_change_nothing() -> Result<()> {
    let x = tensor(
        (0..16).map(|i| i as f32 / 8.0 - 1.0).collect(),
        [1, 1, 4, 4],
    );
    let mut plain = TCDScheduler::new(Default::default())?;
    let mut with = TCDScheduler::new(TCDSchedulerConfig(LCMSchedulerConfig {
        clip_sample: true,
        thresholding: true,
        ..Default::default()
    }))?;
    plain.set_timesteps(4)?;
    with.set_timesteps(4)?;
    let t = plain.timesteps()[0];
    let options = || StepOptions {
        eta: Some(0.0),
        ..StepOptions::default()
    };
    let a = plain
        .step(x.clone().mul_scalar(3.0), t, x.clone(), options())?
        .prev_sample;
    let b = with
        .step(x.clone().mul_scalar(3.0), t, x, options())?
        .prev_sample;
    ensure!(a.into_data() == b.into_data());
    Ok(())
}
