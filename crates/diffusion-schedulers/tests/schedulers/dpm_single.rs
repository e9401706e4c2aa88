//! DPMSolverSinglestepScheduler: diffusers' own test loops
//! (tests/schedulers/test_scheduler_dpm_single.py), its default config file, class switching,
//! aliases and bad input.

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::scheduling_dpmsolver_multistep::{AlgorithmType, SolverType};
use diffusion_schedulers::sigmas::FinalSigmasType;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DPMSolverSinglestepScheduler,
    DPMSolverSinglestepSchedulerConfig, PredictionType, Scheduler, SchedulerKind, SchedulerSpec,
    SetTimesteps, StepOptions,
};

use crate::common::{arg_name, dummy_sample_deter, field_name, host, max_abs, tensor};
use crate::more::{check_golden, comparable, default_config_file, golden};
use crate::unipc::full_loop;

/// `get_scheduler_config` of diffusers' singlestep tests.
fn test_config() -> DPMSolverSinglestepSchedulerConfig {
    DPMSolverSinglestepSchedulerConfig {
        final_sigmas_type: FinalSigmasType::SigmaMin,
        ..Default::default()
    }
}

fn run(
    name: &str,
    config: DPMSolverSinglestepSchedulerConfig,
    noise_at: Option<usize>,
) -> Result<()> {
    let mut s = DPMSolverSinglestepScheduler::new(config)?;
    let (x, scale) = full_loop(&mut s, noise_at)?;
    check_golden(&golden(name)?, &x, scale)
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    run("dpm_single/full_loop_no_noise", test_config(), None)?;
    let v = DPMSolverSinglestepSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..test_config()
    };
    run("dpm_single/full_loop_with_v_prediction", v.clone(), None)?;
    let karras = DPMSolverSinglestepSchedulerConfig {
        use_karras_sigmas: true,
        ..test_config()
    };
    run("dpm_single/full_loop_with_karras", karras, None)?;
    let karras_v = DPMSolverSinglestepSchedulerConfig {
        use_karras_sigmas: true,
        ..v
    };
    run(
        "dpm_single/full_loop_with_karras_and_v_prediction",
        karras_v,
        None,
    )?;
    run("dpm_single/full_loop_with_noise", test_config(), Some(5))
}

#[test]
fn diffusers_uneven_loop_enters_mid_group() -> Result<()> {
    // 50 steps entered at the fourth timestep: the first step of a second-order pair has no
    // partner and is taken at first order.
    let mut s = DPMSolverSinglestepScheduler::new(test_config())?;
    s.set_timesteps(50)?;
    let mut x: Tensor<4> = dummy_sample_deter(false);
    let scale = max_abs(&host(&x));
    let entered = s.timesteps()[3..].to_vec();
    for t in entered {
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    check_golden(&golden("dpm_single/full_uneven_loop")?, &x, scale)
}

#[test]
fn switching_through_dpm_multistep_and_unipc_keeps_the_result() -> Result<()> {
    let single = DPMSolverSinglestepScheduler::new(test_config())?;
    let mut s = AnyScheduler::from(single.clone());
    for class in [
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "DPMSolverSinglestepScheduler",
    ] {
        s = AnyScheduler::convert(&s, &SchedulerSpec::parse(class)?)?;
    }
    ensure!(s.as_dpm_solver_singlestep().context("singlestep")?.config() == single.config());
    let (x, scale) = full_loop(&mut s, None)?;
    check_golden(&golden("dpm_single/switch")?, &x, scale)
}

#[test]
fn default_config_file_and_set_timesteps_config_changes() -> Result<()> {
    let path = default_config_file("DPMSolverSinglestepScheduler");
    let mut s = DPMSolverSinglestepScheduler::load(&path)?;
    ensure!(*s.config() == DPMSolverSinglestepSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    let mut theirs = comparable(diffusion_core::config::read_json(&path)?);
    // `-Infinity` is left out when saving, as for DPMSolverMultistepScheduler.
    if let Some(map) = theirs.as_object_mut() {
        map.remove("lambda_min_clipped");
    }
    ensure!(comparable(s.config_value()) == theirs);
    // As in diffusers, ending at sigma 0 turns lower_order_final on in the config.
    s.set_timesteps(10)?;
    ensure!(s.config().lower_order_final);
    ensure!(s.order_list() == [1, 2, 1, 2, 1, 2, 1, 2, 1, 1]);
    Ok(())
}

#[test]
fn a1111_names() -> Result<()> {
    for (name, karras) in [("DPM++ SDE", false), ("DPM++ SDE Karras", true)] {
        let spec = SchedulerSpec::parse(name)?;
        ensure!(spec.kind == SchedulerKind::DpmSolverSinglestep, "{name}");
        ensure!(spec.overrides["use_karras_sigmas"] == karras, "{name}");
    }
    Ok(())
}

#[test]
fn bad_configs_are_refused() {
    let dpmsolver = DPMSolverSinglestepSchedulerConfig {
        algorithm_type: AlgorithmType::DpmSolver,
        final_sigmas_type: FinalSigmasType::SigmaMin,
        ..Default::default()
    };
    for (config, field) in [
        (
            DPMSolverSinglestepSchedulerConfig {
                algorithm_type: AlgorithmType::SdeDpmSolver,
                ..Default::default()
            },
            "algorithm_type",
        ),
        (
            DPMSolverSinglestepSchedulerConfig {
                algorithm_type: AlgorithmType::DpmSolver,
                ..Default::default()
            },
            "final_sigmas_type",
        ),
        (
            DPMSolverSinglestepSchedulerConfig {
                thresholding: true,
                ..dpmsolver.clone()
            },
            "thresholding",
        ),
        (
            DPMSolverSinglestepSchedulerConfig {
                prediction_type: PredictionType::FlowPrediction,
                ..dpmsolver
            },
            "prediction_type",
        ),
        (
            DPMSolverSinglestepSchedulerConfig {
                solver_order: 4,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            DPMSolverSinglestepSchedulerConfig {
                use_karras_sigmas: true,
                use_exponential_sigmas: true,
                ..Default::default()
            },
            "use_exponential_sigmas",
        ),
        (
            DPMSolverSinglestepSchedulerConfig {
                use_beta_sigmas: true,
                use_karras_sigmas: true,
                ..Default::default()
            },
            "use_beta_sigmas",
        ),
    ] {
        assert_eq!(field_name(DPMSolverSinglestepScheduler::new(config)), field);
    }
    // Other solvers' names are read as diffusers reads them.
    let s = DPMSolverSinglestepScheduler::new(DPMSolverSinglestepSchedulerConfig {
        algorithm_type: AlgorithmType::Deis,
        solver_type: SolverType::Bh2,
        ..Default::default()
    })
    .expect("deis config");
    assert_eq!(s.config().algorithm_type, AlgorithmType::DpmSolverPlusPlus);
    assert_eq!(s.config().solver_type, SolverType::Midpoint);
}

#[test]
fn bad_arguments_are_refused() -> Result<()> {
    let x = tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let mut s = DPMSolverSinglestepScheduler::new(test_config())?;
    assert_eq!(
        arg_name(s.step(x.clone(), 999.0, x.clone(), StepOptions::default())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 500.5]))),
        "timesteps"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::steps(10).with_mu(0.5))),
        "mu"
    );
    let mut karras = DPMSolverSinglestepScheduler::new(DPMSolverSinglestepSchedulerConfig {
        use_karras_sigmas: true,
        ..test_config()
    })?;
    assert_eq!(
        arg_name(karras.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 500.0]))),
        "timesteps"
    );
    // The SDE variant needs noise at every step.
    let mut sde = DPMSolverSinglestepScheduler::new(DPMSolverSinglestepSchedulerConfig {
        algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
        ..test_config()
    })?;
    sde.set_timesteps(4)?;
    let t0 = sde.timesteps()[0];
    assert_eq!(
        arg_name(sde.step(x.clone(), t0, x.clone(), StepOptions::default())),
        "generator"
    );
    let mut generator = TorchGenerator::new(0);
    let y = sde
        .step(
            x.clone(),
            t0,
            x.clone(),
            StepOptions::default().with_generator(&mut generator),
        )?
        .prev_sample;
    assert!(host(&y).iter().all(|v| v.is_finite()));
    s.set_timesteps(4)?;
    let wrong = tensor(vec![0.5f32; 2 * 3 * 2], [2, 3, 2, 1]);
    assert_eq!(
        arg_name(s.step(wrong, 999.0, x.clone(), StepOptions::default())),
        "model_output"
    );
    Ok(())
}
