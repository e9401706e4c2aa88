//! FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler: diffusers' contract
//! tests (tests/schedulers/test_scheduler_flow_match_euler_discrete.py has no golden loops),
//! default config files and bad input. Trajectories are checked in more.rs.

use anyhow::{Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::scheduling_flow_match_euler_discrete::FlowTimeShiftType;
use diffusion_schedulers::{
    ConfiguredScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerConfig,
    FlowMatchHeunDiscreteScheduler, FlowMatchHeunDiscreteSchedulerConfig, Scheduler, SetTimesteps,
    StepOptions,
};

use crate::common::{arg_name, field_name, host, tensor};
use crate::more::{comparable, default_config_file};

fn euler(config: FlowMatchEulerDiscreteSchedulerConfig) -> FlowMatchEulerDiscreteScheduler {
    FlowMatchEulerDiscreteScheduler::new(config).expect("valid config")
}

#[test]
fn default_config_files_match_our_defaults() -> Result<()> {
    let path = default_config_file("FlowMatchEulerDiscreteScheduler");
    let s = FlowMatchEulerDiscreteScheduler::load(&path)?;
    ensure!(*s.config() == FlowMatchEulerDiscreteSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    let path = default_config_file("FlowMatchHeunDiscreteScheduler");
    let s = FlowMatchHeunDiscreteScheduler::load(&path)?;
    ensure!(*s.config() == FlowMatchHeunDiscreteSchedulerConfig::default());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    Ok(())
}

#[test]
fn schedule_endpoints() -> Result<()> {
    // test_set_timesteps_endpoints: the first timestep is 1000 and the last sigma 0.
    let mut s = euler(Default::default());
    for k in [1, 2, 4, 8, 16] {
        s.set_timesteps(k)?;
        ensure!(s.timesteps().len() == k);
        let sigmas = s.sigmas().unwrap_or(&[]);
        ensure!(sigmas.len() == k + 1 && sigmas[k] == 0.0);
        ensure!((s.timesteps()[0] - 1000.0).abs() < 1e-4);
    }
    // Inverted sigmas run from data to noise and end at 1.
    let mut inverted = euler(FlowMatchEulerDiscreteSchedulerConfig {
        invert_sigmas: true,
        shift: 3.0,
        ..Default::default()
    });
    inverted.set_timesteps(4)?;
    ensure!(inverted.sigmas().unwrap_or(&[]).last() == Some(&1.0));
    Ok(())
}

#[test]
fn scale_noise_interpolates_sample_and_noise() -> Result<()> {
    // test_scale_noise_interpolates_sample_and_noise.
    let mut s = euler(Default::default());
    s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![500.0, 250.0]))?;
    let sample = tensor(vec![0.0f32; 64], [1, 4, 4, 4]);
    let noise = tensor(vec![1.0f32; 64], [1, 4, 4, 4]);
    let t = s.timesteps()[0];
    let mixed = s.scale_noise(sample, &[t], noise)?;
    ensure!(host(&mixed).iter().all(|v| (v - 0.5).abs() < 1e-4));
    Ok(())
}

#[test]
fn repeated_timesteps_and_begin_index() -> Result<()> {
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    // test_index_for_timestep_duplicate_handling: a repeated timestep starts at its second
    // occurrence.
    let mut s = euler(Default::default());
    s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![
        900.0, 500.0, 500.0, 100.0,
    ]))?;
    s.step(x.clone(), 500.0, x.clone(), StepOptions::default())?;
    ensure!(s.step_index() == Some(3));
    // test_set_begin_index_anchors_step_index.
    let mut s = euler(Default::default());
    s.set_timesteps(4)?;
    s.set_begin_index(2)?;
    let t0 = s.timesteps()[0];
    s.step(x.clone(), t0, x, StepOptions::default())?;
    ensure!(s.step_index() == Some(3));
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    assert_eq!(
        field_name(FlowMatchEulerDiscreteScheduler::new(
            FlowMatchEulerDiscreteSchedulerConfig {
                use_karras_sigmas: true,
                use_exponential_sigmas: true,
                ..Default::default()
            }
        )),
        "use_exponential_sigmas"
    );
    let bad_shift_type =
        diffusion_core::ConfigFile::<FlowMatchEulerDiscreteSchedulerConfig>::from_json_str(
            r#"{"time_shift_type": "quadratic"}"#,
            std::path::Path::new("x.json"),
        );
    assert_eq!(field_name(bad_shift_type), "time_shift_type");
    assert_eq!(
        field_name(FlowMatchEulerDiscreteScheduler::new(
            FlowMatchEulerDiscreteSchedulerConfig {
                shift: 0.0,
                ..Default::default()
            }
        )),
        "shift"
    );
    assert_eq!(
        field_name(FlowMatchHeunDiscreteScheduler::new(
            FlowMatchHeunDiscreteSchedulerConfig {
                shift: -1.0,
                ..Default::default()
            }
        )),
        "shift"
    );

    // mu is required with dynamic shifting and refused without it.
    let mut dynamic = euler(FlowMatchEulerDiscreteSchedulerConfig {
        use_dynamic_shifting: true,
        time_shift_type: FlowTimeShiftType::Linear,
        ..Default::default()
    });
    assert_eq!(arg_name(dynamic.set_timesteps(4)), "mu");
    dynamic.set_timesteps_with(SetTimesteps::steps(4).with_mu(0.5))?;
    let mut s = euler(Default::default());
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::steps(4).with_mu(0.5))),
        "mu"
    );
    // Lengths must agree (test_set_timesteps_sigmas_timesteps_length_mismatch_raises).
    let mismatched = SetTimesteps {
        sigmas: Some(vec![0.9, 0.5, 0.1]),
        timesteps: Some(vec![900.0, 500.0]),
        ..Default::default()
    };
    assert_eq!(arg_name(s.set_timesteps_with(mismatched)), "sigmas");
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![0.5, -0.1]))),
        "sigmas"
    );
    assert_eq!(arg_name(s.set_shift(0.0)), "shift");

    // Deterministic Euler takes no options (diffusers silently ignores its churn arguments);
    // stochastic sampling needs noise; a timestep must be in the schedule.
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    s.set_timesteps(4)?;
    let churn = StepOptions {
        s_churn: Some(1.0),
        ..Default::default()
    };
    assert_eq!(
        arg_name(s.step(x.clone(), 1000.0, x.clone(), churn)),
        "s_churn"
    );
    assert_eq!(
        arg_name(s.step(x.clone(), 3.0, x.clone(), StepOptions::default())),
        "timestep"
    );
    let mut stochastic = euler(FlowMatchEulerDiscreteSchedulerConfig {
        stochastic_sampling: true,
        ..Default::default()
    });
    stochastic.set_timesteps(4)?;
    assert_eq!(
        arg_name(stochastic.step(x.clone(), 1000.0, x.clone(), StepOptions::default())),
        "generator"
    );
    let mut generator = TorchGenerator::new(0);
    stochastic.step(
        x.clone(),
        1000.0,
        x.clone(),
        StepOptions::default().with_generator(&mut generator),
    )?;

    // Heun: a step count only; churn needs noise.
    let mut heun = FlowMatchHeunDiscreteScheduler::new(Default::default())?;
    assert_eq!(
        arg_name(heun.set_timesteps_with(SetTimesteps::custom_sigmas(vec![0.5]))),
        "sigmas"
    );
    heun.set_timesteps(3)?;
    ensure!(heun.timesteps().len() == 5 && heun.sigmas().unwrap_or(&[]).len() == 6);
    let churn = StepOptions {
        s_churn: Some(1.0),
        ..Default::default()
    };
    assert_eq!(
        arg_name(heun.step(x.clone(), 1000.0, x.clone(), churn)),
        "generator"
    );
    let negative = StepOptions {
        s_churn: Some(-1.0),
        ..Default::default()
    };
    assert_eq!(
        arg_name(heun.step(x.clone(), 1000.0, x, negative)),
        "s_churn"
    );
    Ok(())
}
