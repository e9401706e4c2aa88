//! EDMDPMSolverMultistepScheduler: diffusers' own test loops
//! (tests/schedulers/test_scheduler_edm_dpmsolver_multistep.py), default config file,
//! conversion from other configs and bad input. Trajectories are checked in extra.rs.

use anyhow::{Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::scheduling_dpmsolver_multistep::AlgorithmType;
use diffusion_schedulers::sigmas::FinalSigmasType;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DDPMScheduler, EDMDPMSolverMultistepScheduler,
    EDMDPMSolverMultistepSchedulerConfig, PredictionType, Scheduler, SchedulerSpec, SetTimesteps,
    StepOptions,
};

use crate::common::{arg_name, dummy_sample_deter, field_name, host, max_abs, tensor};
use crate::more::{check_golden, comparable, default_config_file_in, golden_in};

/// The config of diffusers' test (`get_scheduler_config`).
fn test_config() -> EDMDPMSolverMultistepSchedulerConfig {
    EDMDPMSolverMultistepSchedulerConfig {
        lower_order_final: false,
        final_sigmas_type: FinalSigmasType::SigmaMin,
        ..Default::default()
    }
}

/// diffusers' multistep test loop: no `scale_model_input`, model `x * t / (t + 1)`, entered
/// at position `noise_at` after `add_noise` when given.
fn full_loop(mut s: impl Scheduler, noise_at: Option<usize>) -> Result<(f64, Tensor4)> {
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false);
    let scale = max_abs(&host(&x));
    let mut timesteps = s.timesteps().to_vec();
    if let Some(at) = noise_at {
        timesteps = timesteps[at * s.order()..].to_vec();
        x = s.add_noise(x, dummy_sample_deter(true), &timesteps[..1])?;
    }
    for t in timesteps {
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    Ok((scale, x))
}

type Tensor4 = diffusion_core::burn::tensor::Tensor<4>;

#[test]
fn diffusers_full_loops() -> Result<()> {
    for (name, config, noise_at) in [
        ("full_loop_no_noise", test_config(), None),
        ("full_loop_with_noise", test_config(), Some(5)),
        (
            "full_loop_no_noise_thres",
            EDMDPMSolverMultistepSchedulerConfig {
                thresholding: true,
                dynamic_thresholding_ratio: 0.87,
                sample_max_value: 0.5,
                ..test_config()
            },
            None,
        ),
        (
            "full_loop_with_v_prediction",
            EDMDPMSolverMultistepSchedulerConfig {
                prediction_type: PredictionType::VPrediction,
                ..test_config()
            },
            None,
        ),
    ] {
        let (scale, x) = full_loop(EDMDPMSolverMultistepScheduler::new(config)?, noise_at)?;
        check_golden(&golden_in("extra", &format!("edm_dpm/{name}"))?, &x, scale)?;
    }
    Ok(())
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file_in("extra", "EDMDPMSolverMultistepScheduler");
    let s = EDMDPMSolverMultistepScheduler::load(&path)?;
    ensure!(*s.config() == EDMDPMSolverMultistepSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    ensure!((s.init_noise_sigma() - 6401f64.sqrt()).abs() < 1e-12);
    // Before set_timesteps: diffusers' __init__ schedule of num_train_timesteps levels.
    ensure!(s.timesteps().len() == 1000 && s.sigmas().is_some_and(|v| v.len() == 1001));
    Ok(())
}

/// diffusers' `from_config` from a Stable Diffusion DDPM config: the beta keys are ignored
/// (kept as unknown keys), the shared ones carry over.
#[test]
fn converts_from_other_configs() -> Result<()> {
    let ddpm = DDPMScheduler::new(Default::default())?;
    let edm = AnyScheduler::convert(
        &ddpm,
        &SchedulerSpec::parse("EDMDPMSolverMultistepScheduler")?,
    )?;
    ensure!(edm.class_name() == "EDMDPMSolverMultistepScheduler");
    ensure!(edm.config_value()["num_train_timesteps"] == 1000);
    let dpm = AnyScheduler::convert(&ddpm, &SchedulerSpec::parse("DPM++ 2M SDE Karras")?)?;
    let mut edm = AnyScheduler::convert(
        &dpm,
        &SchedulerSpec::parse("EDMDPMSolverMultistepScheduler")?,
    )?;
    ensure!(edm.config_value()["algorithm_type"] == "sde-dpmsolver++");
    edm.set_timesteps(4)?;
    ensure!(edm.timesteps().len() == 4);
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            EDMDPMSolverMultistepSchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..Default::default()
            },
            "prediction_type",
        ),
        (
            EDMDPMSolverMultistepSchedulerConfig {
                algorithm_type: AlgorithmType::DpmSolver,
                ..Default::default()
            },
            "algorithm_type",
        ),
        (
            EDMDPMSolverMultistepSchedulerConfig {
                algorithm_type: AlgorithmType::Deis,
                ..Default::default()
            },
            "final_sigmas_type",
        ),
        (
            EDMDPMSolverMultistepSchedulerConfig {
                algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
                solver_order: 3,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            EDMDPMSolverMultistepSchedulerConfig {
                solver_order: 0,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            EDMDPMSolverMultistepSchedulerConfig {
                sigma_min: 100.0,
                ..Default::default()
            },
            "sigma_min",
        ),
        (
            EDMDPMSolverMultistepSchedulerConfig {
                num_train_timesteps: 0,
                ..Default::default()
            },
            "num_train_timesteps",
        ),
    ] {
        assert_eq!(
            field_name(EDMDPMSolverMultistepScheduler::new(config)),
            field
        );
    }
    let mut s = EDMDPMSolverMultistepScheduler::new(Default::default())?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    assert_eq!(
        arg_name(s.step(x.clone(), 0.0, x.clone(), StepOptions::default())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![0.5]))),
        "sigmas"
    );
    s.set_timesteps(2)?;
    let t0 = s.timesteps()[0];
    assert_eq!(
        arg_name(s.step(
            x.clone(),
            t0,
            x.clone(),
            StepOptions::default().with_eta(0.5)
        )),
        "eta"
    );
    s.step(x.clone(), t0, x.clone(), StepOptions::default())?;
    s.step(x.clone(), t0, x.clone(), StepOptions::default())?;
    assert_eq!(
        arg_name(s.step(x.clone(), t0, x.clone(), StepOptions::default())),
        "timestep"
    );
    // The SDE variant draws noise.
    let mut sde = EDMDPMSolverMultistepScheduler::new(EDMDPMSolverMultistepSchedulerConfig {
        algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
        ..Default::default()
    })?;
    sde.set_timesteps(3)?;
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
            x,
            StepOptions::default().with_generator(&mut generator),
        )?
        .prev_sample;
    ensure!(host(&y).iter().all(|v| v.is_finite()));
    Ok(())
}
