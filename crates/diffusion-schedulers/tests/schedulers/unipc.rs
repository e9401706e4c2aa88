//! UniPCMultistepScheduler: diffusers' own test loops (tests/schedulers/test_scheduler_unipc.py),
//! its default config file, class switching, aliases and bad input.

use anyhow::{Context, Result, ensure};

use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::scheduling_dpmsolver_multistep::SolverType;
use diffusion_schedulers::sigmas::FinalSigmasType;
use diffusion_schedulers::{
    AnyScheduler, BetaSchedule, ConfiguredScheduler, PredictionType, Scheduler, SchedulerKind,
    SchedulerSpec, SetTimesteps, StepOptions, UniPCMultistepScheduler,
    UniPCMultistepSchedulerConfig,
};

use crate::common::{arg_name, dummy_sample_deter, field_name, host, max_abs, tensor};
use crate::more::{check_golden, comparable, default_config_file, golden};

/// `get_scheduler_config` of diffusers' UniPC tests.
fn test_config() -> UniPCMultistepSchedulerConfig {
    UniPCMultistepSchedulerConfig {
        beta_schedule: BetaSchedule::Linear,
        solver_order: 2,
        solver_type: SolverType::Bh2,
        final_sigmas_type: FinalSigmasType::SigmaMin,
        ..Default::default()
    }
}

/// diffusers' multistep `full_loop`: model `x * t / (t + 1)`, no input scaling, 10 steps
/// (from step `noise_at` after noising the sample there, for the `with_noise` test).
pub(crate) fn full_loop<S: Scheduler>(
    s: &mut S,
    noise_at: Option<usize>,
) -> Result<(Tensor<4>, f64)> {
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false);
    let initial_scale = max_abs(&host(&x));
    let mut timesteps = s.timesteps().to_vec();
    if let Some(start) = noise_at {
        timesteps = timesteps[start * s.order()..].to_vec();
        x = s.add_noise(x, dummy_sample_deter(true), &timesteps[..1])?;
    }
    for t in timesteps {
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    Ok((x, initial_scale))
}

fn run(name: &str, config: UniPCMultistepSchedulerConfig, noise_at: Option<usize>) -> Result<()> {
    let mut s = UniPCMultistepScheduler::new(config)?;
    let (x, scale) = full_loop(&mut s, noise_at)?;
    check_golden(&golden(name)?, &x, scale)
}

#[test]
fn diffusers_full_loops() -> Result<()> {
    run("unipc/full_loop_no_noise", test_config(), None)?;
    let karras = UniPCMultistepSchedulerConfig {
        use_karras_sigmas: true,
        ..test_config()
    };
    run("unipc/full_loop_with_karras", karras.clone(), None)?;
    let v = UniPCMultistepSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..test_config()
    };
    run("unipc/full_loop_with_v_prediction", v, None)?;
    let karras_v = UniPCMultistepSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..karras
    };
    run(
        "unipc/full_loop_with_karras_and_v_prediction",
        karras_v,
        None,
    )?;
    run("unipc/full_loop_with_noise", test_config(), Some(8))
}

#[test]
fn switching_through_dpm_solver_and_back_keeps_the_result() -> Result<()> {
    let unipc = UniPCMultistepScheduler::new(test_config())?;
    let dpm = AnyScheduler::convert(
        &unipc,
        &SchedulerSpec::parse("DPMSolverMultistepScheduler")?,
    )?;
    let mut back = AnyScheduler::convert(&dpm, &SchedulerSpec::parse("UniPCMultistepScheduler")?)?;
    ensure!(back.kind() == SchedulerKind::UniPc);
    ensure!(back.as_unipc().context("unipc")?.config() == unipc.config());
    let (x, scale) = full_loop(&mut back, None)?;
    check_golden(&golden("unipc/switch")?, &x, scale)
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file("UniPCMultistepScheduler");
    let s = UniPCMultistepScheduler::load(&path)?;
    ensure!(*s.config() == UniPCMultistepSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    let theirs = comparable(diffusion_core::config::read_json(&path)?);
    ensure!(
        comparable(s.config_value()) == theirs,
        "{}\nvs\n{theirs}",
        s.config_value()
    );
    Ok(())
}

#[test]
fn a1111_name() -> Result<()> {
    let spec = SchedulerSpec::parse("UniPC")?;
    ensure!(spec.kind == SchedulerKind::UniPc && spec.overrides.is_empty());
    Ok(())
}

#[test]
fn configs_that_fail_in_diffusers_are_refused() {
    let bad = |c: UniPCMultistepSchedulerConfig| field_name(UniPCMultistepScheduler::new(c));
    // NaN at the last step in diffusers.
    let r = bad(UniPCMultistepSchedulerConfig {
        solver_type: SolverType::Bh1,
        ..Default::default()
    });
    assert_eq!(r, "final_sigmas_type");
    let r = bad(UniPCMultistepSchedulerConfig {
        predict_x0: false,
        ..Default::default()
    });
    assert_eq!(r, "final_sigmas_type");
    // -inf (order 2) or a singular system (order 3) at the last step.
    let r = bad(UniPCMultistepSchedulerConfig {
        lower_order_final: false,
        ..Default::default()
    });
    assert_eq!(r, "lower_order_final");
    for (config, field) in [
        (
            UniPCMultistepSchedulerConfig {
                solver_order: 0,
                ..test_config()
            },
            "solver_order",
        ),
        (
            UniPCMultistepSchedulerConfig {
                use_karras_sigmas: true,
                use_exponential_sigmas: true,
                ..test_config()
            },
            "use_exponential_sigmas",
        ),
        (
            UniPCMultistepSchedulerConfig {
                use_beta_sigmas: true,
                use_karras_sigmas: true,
                ..test_config()
            },
            "use_beta_sigmas",
        ),
        (
            UniPCMultistepSchedulerConfig {
                shift_terminal: Some(0.1),
                ..test_config()
            },
            "shift_terminal",
        ),
        (
            UniPCMultistepSchedulerConfig {
                solver_p: Some(serde_json::json!({"_class_name": "DDIMScheduler"})),
                ..test_config()
            },
            "solver_p",
        ),
        (
            UniPCMultistepSchedulerConfig {
                beta_schedule: BetaSchedule::Sigmoid,
                ..test_config()
            },
            "beta_schedule",
        ),
        (
            UniPCMultistepSchedulerConfig {
                predict_x0: false,
                prediction_type: PredictionType::FlowPrediction,
                ..test_config()
            },
            "prediction_type",
        ),
        (
            UniPCMultistepSchedulerConfig {
                predict_x0: false,
                thresholding: true,
                ..test_config()
            },
            "thresholding",
        ),
    ] {
        assert_eq!(bad(config), field);
    }
}

#[test]
fn legacy_solver_types_read_as_bh2() -> Result<()> {
    let s = UniPCMultistepScheduler::new(UniPCMultistepSchedulerConfig {
        solver_type: SolverType::Midpoint,
        ..Default::default()
    })?;
    ensure!(s.config().solver_type == SolverType::Bh2);
    Ok(())
}

#[test]
fn bad_set_timesteps_and_step_arguments() -> Result<()> {
    let mut s = UniPCMultistepScheduler::new(test_config())?;
    let x = tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    // Before set_timesteps.
    assert_eq!(
        arg_name(s.step(x.clone(), 999.0, x.clone(), StepOptions::default())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(arg_name(s.set_timesteps(1001)), "num_inference_steps");
    // Custom sigmas only with flow sigmas; custom timesteps never; mu only with dynamic
    // shifting, and then required.
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![1.0, 0.5]))),
        "sigmas"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 500.0]))),
        "timesteps"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::steps(10).with_mu(0.5))),
        "mu"
    );
    let mut flow = UniPCMultistepScheduler::new(UniPCMultistepSchedulerConfig {
        use_flow_sigmas: true,
        use_dynamic_shifting: true,
        prediction_type: PredictionType::FlowPrediction,
        ..Default::default()
    })?;
    assert_eq!(arg_name(flow.set_timesteps(10)), "mu");
    assert_eq!(
        arg_name(flow.set_timesteps_with(SetTimesteps::custom_sigmas(vec![1.0, 1.5]).with_mu(0.5))),
        "sigmas"
    );
    flow.set_timesteps_with(SetTimesteps::steps(10).with_mu(0.5))?;

    s.set_timesteps(4)?;
    // UniPC is deterministic: no options.
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
        arg_name(s.step(wrong, 999.0, x.clone(), StepOptions::default())),
        "model_output"
    );
    // A failed step leaves the state as it was: the full schedule still runs.
    let mut y = x;
    for t in s.timesteps().to_vec() {
        y = s
            .step(y.clone().mul_scalar(0.1), t, y, StepOptions::default())?
            .prev_sample;
    }
    assert!(host(&y).iter().all(|v| v.is_finite()));
    // Past the end.
    assert_eq!(
        arg_name(s.step(y.clone(), 0.0, y, StepOptions::default())),
        "timestep"
    );
    Ok(())
}
