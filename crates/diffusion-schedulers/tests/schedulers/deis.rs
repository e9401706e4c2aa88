//! DEISMultistepScheduler: diffusers' own test loops (tests/schedulers/test_scheduler_deis.py),
//! its default config file, configs written by the other solvers, and bad input.

use anyhow::{Context, Result, ensure};

use diffusion_schedulers::scheduling_dpmsolver_multistep::{AlgorithmType, SolverType};
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DEISMultistepScheduler, DEISMultistepSchedulerConfig,
    PredictionType, Scheduler, SchedulerKind, SchedulerSpec, SetTimesteps, StepOptions,
};

use crate::common::{arg_name, field_name, fixtures, tensor};
use crate::more::{check_golden, comparable, default_config_file, golden};
use crate::unipc::full_loop;

fn run(name: &str, config: DEISMultistepSchedulerConfig, noise_at: Option<usize>) -> Result<()> {
    let mut s = DEISMultistepScheduler::new(config)?;
    let (x, scale) = full_loop(&mut s, noise_at)?;
    check_golden(&golden(name)?, &x, scale)
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    run("deis/full_loop_no_noise", Default::default(), None)?;
    let v = DEISMultistepSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..Default::default()
    };
    run("deis/full_loop_with_v_prediction", v, None)?;
    run("deis/full_loop_with_noise", Default::default(), Some(8))
}

#[test]
fn switching_through_the_dpm_solvers_and_unipc_keeps_the_result() -> Result<()> {
    let deis = DEISMultistepScheduler::new(Default::default())?;
    let mut s = AnyScheduler::from(deis.clone());
    for class in [
        "DPMSolverSinglestepScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
    ] {
        s = AnyScheduler::convert(&s, &SchedulerSpec::parse(class)?)?;
    }
    ensure!(s.kind() == SchedulerKind::Deis);
    ensure!(s.as_deis().context("deis")?.config() == deis.config());
    let (x, scale) = full_loop(&mut s, None)?;
    check_golden(&golden("deis/switch")?, &x, scale)
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file("DEISMultistepScheduler");
    let s = DEISMultistepScheduler::load(&path)?;
    ensure!(*s.config() == DEISMultistepSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    let theirs = comparable(diffusion_core::config::read_json(&path)?);
    ensure!(comparable(s.config_value()) == theirs);
    // The config diffusers' DPM test_switch chain wrote as DEIS loads as DEIS.
    let path = fixtures().join("configs/deis_from_dpm");
    let s = AnyScheduler::from_config_file(&path)?;
    let deis = s.as_deis().context("deis")?;
    ensure!(deis.config().algorithm_type == AlgorithmType::Deis);
    ensure!(deis.config().solver_type == SolverType::Logrho);
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            DEISMultistepSchedulerConfig {
                algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
                ..Default::default()
            },
            "algorithm_type",
        ),
        (
            DEISMultistepSchedulerConfig {
                solver_order: 4,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            DEISMultistepSchedulerConfig {
                use_karras_sigmas: true,
                use_exponential_sigmas: true,
                ..Default::default()
            },
            "use_exponential_sigmas",
        ),
        (
            DEISMultistepSchedulerConfig {
                prediction_type: PredictionType::OriginalSample,
                ..Default::default()
            },
            "prediction_type",
        ),
    ] {
        assert_eq!(field_name(DEISMultistepScheduler::new(config)), field);
    }
    // DPM-Solver's names become DEIS's, as in diffusers.
    let s = DEISMultistepScheduler::new(DEISMultistepSchedulerConfig {
        algorithm_type: AlgorithmType::DpmSolverPlusPlus,
        solver_type: SolverType::Midpoint,
        ..Default::default()
    })?;
    ensure!(s.config().algorithm_type == AlgorithmType::Deis);
    ensure!(s.config().solver_type == SolverType::Logrho);

    let x = tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let mut s = DEISMultistepScheduler::new(Default::default())?;
    assert_eq!(
        arg_name(s.step(x.clone(), 999.0, x.clone(), StepOptions::default())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0]))),
        "timesteps"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::steps(5).with_mu(0.5))),
        "mu"
    );
    s.set_timesteps(3)?;
    let mut generator = diffusion_core::TorchGenerator::new(0);
    assert_eq!(
        arg_name(s.step(
            x.clone(),
            999.0,
            x.clone(),
            StepOptions::default().with_generator(&mut generator)
        )),
        "generator"
    );
    let wrong = tensor(vec![0.5f32; 2 * 3 * 2], [2, 3, 2, 1]);
    assert_eq!(
        arg_name(s.step(wrong, 999.0, x, StepOptions::default())),
        "model_output"
    );
    Ok(())
}
