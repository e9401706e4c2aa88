//! DPMSolverMultistepInverseScheduler: diffusers' own test loops
//! (tests/schedulers/test_scheduler_dpm_multi_inverse.py), its default config file, switching
//! with the forward solver, and bad input. Trajectories are checked in more.rs.

use anyhow::{Context, Result, ensure};
use diffusion_schedulers::scheduling_dpmsolver_multistep::AlgorithmType;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DPMSolverMultistepInverseScheduler,
    DPMSolverMultistepInverseSchedulerConfig, PredictionType, Scheduler, SchedulerSpec,
    SetTimesteps, StepOptions,
};

use crate::common::{arg_name, field_name, tensor};
use crate::more::{check_golden, comparable, default_config_file, golden};
use crate::unipc::full_loop;

/// `get_scheduler_config` of diffusers' inverse tests.
fn test_config() -> DPMSolverMultistepInverseSchedulerConfig {
    DPMSolverMultistepInverseSchedulerConfig {
        lower_order_final: false,
        ..Default::default()
    }
}

fn run(name: &str, config: DPMSolverMultistepInverseSchedulerConfig) -> Result<()> {
    let mut s = DPMSolverMultistepInverseScheduler::new(config)?;
    let (x, scale) = full_loop(&mut s, None)?;
    check_golden(&golden(name)?, &x, scale)
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    run("dpm_inverse/full_loop_no_noise", test_config())?;
    run(
        "dpm_inverse/full_loop_no_noise_thres",
        DPMSolverMultistepInverseSchedulerConfig {
            thresholding: true,
            dynamic_thresholding_ratio: 0.87,
            sample_max_value: 0.5,
            ..test_config()
        },
    )?;
    let v = DPMSolverMultistepInverseSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..test_config()
    };
    run("dpm_inverse/full_loop_with_v_prediction", v.clone())?;
    run(
        "dpm_inverse/full_loop_with_karras_and_v_prediction",
        DPMSolverMultistepInverseSchedulerConfig {
            use_karras_sigmas: true,
            ..v
        },
    )
}

#[test]
fn switching_through_the_forward_solver_keeps_the_result() -> Result<()> {
    let inverse = DPMSolverMultistepInverseScheduler::new(test_config())?;
    let forward = AnyScheduler::convert(&inverse, &SchedulerSpec::parse("DPM++ 2M")?)?;
    let mut back = AnyScheduler::convert(
        &forward,
        &SchedulerSpec::parse("DPMSolverMultistepInverseScheduler")?,
    )?;
    let config = back
        .as_dpm_solver_multistep_inverse()
        .context("inverse")?
        .config();
    ensure!(*config == *inverse.config(), "{config:?}");
    let (x, scale) = full_loop(&mut back, None)?;
    check_golden(&golden("dpm_inverse/switch")?, &x, scale)
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file("DPMSolverMultistepInverseScheduler");
    let s = DPMSolverMultistepInverseScheduler::load(&path)?;
    ensure!(*s.config() == DPMSolverMultistepInverseSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    let mut theirs = comparable(diffusion_core::config::read_json(&path)?);
    // `-Infinity` is left out when saving, as for DPMSolverMultistepScheduler.
    if let Some(map) = theirs.as_object_mut() {
        map.remove("lambda_min_clipped");
    }
    ensure!(comparable(s.config_value()) == theirs);
    // Before set_timesteps: every training timestep, ascending.
    ensure!(s.timesteps().len() == 1000 && s.timesteps()[0] == 0.0);
    ensure!(s.num_inference_steps().is_none());
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            DPMSolverMultistepInverseSchedulerConfig {
                algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
                ..Default::default()
            },
            "algorithm_type",
        ),
        (
            DPMSolverMultistepInverseSchedulerConfig {
                algorithm_type: AlgorithmType::Deis,
                ..Default::default()
            },
            "algorithm_type",
        ),
        (
            DPMSolverMultistepInverseSchedulerConfig {
                solver_order: 4,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            DPMSolverMultistepInverseSchedulerConfig {
                algorithm_type: AlgorithmType::DpmSolver,
                prediction_type: PredictionType::FlowPrediction,
                ..Default::default()
            },
            "prediction_type",
        ),
    ] {
        assert_eq!(
            field_name(DPMSolverMultistepInverseScheduler::new(config)),
            field
        );
    }
    let mut s = DPMSolverMultistepInverseScheduler::new(Default::default())?;
    let x = tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    assert_eq!(
        arg_name(s.step(x.clone(), 0.0, x.clone(), StepOptions::default())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![0.0, 500.0]))),
        "timesteps"
    );
    s.set_timesteps(5)?;
    assert_eq!(arg_name(s.set_begin_index(1)), "begin_index");
    ensure!(s.timesteps().windows(2).all(|w| w[0] < w[1]));
    ensure!(s.sigmas().unwrap_or(&[]).windows(2).all(|w| w[0] <= w[1]));
    Ok(())
}
