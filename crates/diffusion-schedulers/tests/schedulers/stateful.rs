//! The stateful (sigma) schedulers: bad input, step cursor, aliases, noise sources and ranks.

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::scheduling_dpmsolver_multistep::AlgorithmType;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DDIMScheduler, DDIMSchedulerConfig,
    DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig,
    EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerConfig, EulerDiscreteScheduler,
    EulerDiscreteSchedulerConfig, Scheduler, SchedulerKind, SchedulerSpec, SetTimesteps,
    StepOptions,
};
use serde_json::json;

use crate::common::{arg_name, field_name, host, tensor};

fn sample() -> Tensor<4> {
    tensor(
        (0..2 * 3 * 4 * 4)
            .map(|i| (i as f32 / 17.0).sin())
            .collect(),
        [2, 3, 4, 4],
    )
}

fn euler() -> EulerDiscreteScheduler {
    EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig::default()).expect("defaults")
}

fn dpm(config: DPMSolverMultistepSchedulerConfig) -> DPMSolverMultistepScheduler {
    DPMSolverMultistepScheduler::new(config).expect("valid config")
}

#[test]
fn options_a_scheduler_does_not_take_are_refused() {
    let mut s = euler();
    s.set_timesteps(10).unwrap();
    let t = s.timesteps()[0];
    let r = s.step(sample(), t, sample(), StepOptions::default().with_eta(0.3));
    assert_eq!(arg_name(r), "eta");
    let mut s = EulerAncestralDiscreteScheduler::new(Default::default()).unwrap();
    s.set_timesteps(10).unwrap();
    let opts = StepOptions {
        s_churn: Some(1.0),
        ..Default::default()
    };
    assert_eq!(arg_name(s.step(sample(), 999.0, sample(), opts)), "s_churn");
    let mut s = dpm(Default::default());
    s.set_timesteps(10).unwrap();
    let opts = StepOptions::default().with_clipped_model_output(true);
    assert_eq!(
        arg_name(s.step(sample(), 999.0, sample(), opts)),
        "use_clipped_model_output"
    );
}

#[test]
fn step_before_set_timesteps_and_past_the_end() {
    let r = dpm(Default::default()).step(sample(), 999.0, sample(), StepOptions::default());
    assert_eq!(arg_name(r), "num_inference_steps");

    let mut s = euler();
    s.set_timesteps(2).unwrap();
    for t in s.timesteps().to_vec() {
        s.step(sample(), t, sample(), StepOptions::default())
            .unwrap();
    }
    // A third step has no sigma to go to.
    let r = s.step(sample(), 0.0, sample(), StepOptions::default());
    assert_eq!(arg_name(r), "timestep");
    // A timestep that is not in the schedule cannot place a fresh Euler cursor.
    s.set_timesteps(10).unwrap();
    assert_eq!(arg_name(s.scale_model_input(sample(), 123.456)), "timestep");
}

#[test]
fn noise_must_be_explicit_for_stochastic_steps() {
    let mut s = EulerAncestralDiscreteScheduler::new(Default::default()).unwrap();
    s.set_timesteps(10).unwrap();
    let t = s.timesteps()[0];
    assert_eq!(
        arg_name(s.step(sample(), t, sample(), StepOptions::default())),
        "generator"
    );
    // The refused step did not move the cursor.
    assert_eq!(s.step_index(), Some(0));

    let mut s = dpm(DPMSolverMultistepSchedulerConfig {
        algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
        ..Default::default()
    });
    s.set_timesteps(10).unwrap();
    let t = s.timesteps()[0];
    assert_eq!(
        arg_name(s.step(sample(), t, sample(), StepOptions::default())),
        "generator"
    );
    assert_eq!(s.step_index(), None);

    let mut s = euler();
    s.set_timesteps(10).unwrap();
    let churn = StepOptions {
        s_churn: Some(5.0),
        ..Default::default()
    };
    let t = s.timesteps()[0];
    assert_eq!(arg_name(s.step(sample(), t, sample(), churn)), "generator");
}

#[test]
fn set_timesteps_arguments() {
    let mut s = euler();
    let both = SetTimesteps {
        timesteps: Some(vec![999.0, 500.0]),
        sigmas: Some(vec![10.0, 1.0, 0.0]),
        ..Default::default()
    };
    assert_eq!(arg_name(s.set_timesteps_with(both)), "timesteps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::default())),
        "num_inference_steps"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![1.0]))),
        "sigmas"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![2000.0]))),
        "timesteps"
    );
    let mut karras = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
        use_karras_sigmas: Some(true),
        ..Default::default()
    })
    .unwrap();
    let r = karras.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 500.0]));
    assert_eq!(arg_name(r), "timesteps");

    let mut s = dpm(Default::default());
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::steps(5).with_mu(0.5))),
        "mu"
    );
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![10.5]))),
        "timesteps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    let mut ancestral = EulerAncestralDiscreteScheduler::new(Default::default()).unwrap();
    let r = ancestral.set_timesteps_with(SetTimesteps::custom_timesteps(vec![10.0]));
    assert_eq!(arg_name(r), "timesteps");
}

#[test]
fn configs_diffusers_refuses_are_refused() {
    let bad = [
        (
            DPMSolverMultistepSchedulerConfig {
                algorithm_type: AlgorithmType::DpmSolver,
                ..Default::default()
            },
            "final_sigmas_type",
        ),
        (
            DPMSolverMultistepSchedulerConfig {
                solver_order: 4,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            DPMSolverMultistepSchedulerConfig {
                use_beta_sigmas: true,
                use_karras_sigmas: true,
                ..Default::default()
            },
            "use_beta_sigmas",
        ),
        (
            DPMSolverMultistepSchedulerConfig {
                use_karras_sigmas: true,
                use_exponential_sigmas: true,
                ..Default::default()
            },
            "use_exponential_sigmas",
        ),
    ];
    for (config, field) in bad {
        assert_eq!(field_name(DPMSolverMultistepScheduler::new(config)), field);
    }
    let r = EulerAncestralDiscreteScheduler::new(EulerAncestralDiscreteSchedulerConfig {
        prediction_type: diffusion_schedulers::PredictionType::Sample,
        ..Default::default()
    });
    assert_eq!(field_name(r), "prediction_type");
    let r = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
        use_beta_sigmas: Some(true),
        use_exponential_sigmas: Some(true),
        ..Default::default()
    });
    assert_eq!(field_name(r), "use_beta_sigmas");
}

#[test]
fn a1111_names_select_the_documented_configs() -> Result<()> {
    // A Stable Diffusion 1.5 scheduler config (its PNDM keys are unknown to DPM and kept).
    let sd15 = json!({
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
    });
    let ddim = AnyScheduler::build(
        SchedulerKind::Ddim,
        sd15.clone(),
        std::path::Path::new("sd15"),
    )?;
    let spec = SchedulerSpec::parse("DPM++ 2M SDE Karras")?;
    let s = AnyScheduler::convert(&ddim, &spec)?;
    let dpm = s.as_dpm_solver_multistep().context("dpm")?;
    let c = dpm.config();
    ensure!(c.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus);
    ensure!(c.use_karras_sigmas && c.solver_order == 2);
    ensure!(c.beta_start == 0.00085 && c.steps_offset == 1);
    ensure!(SchedulerSpec::parse("euler a")?.kind == SchedulerKind::EulerAncestral);
    ensure!(SchedulerSpec::parse("Euler")?.kind == SchedulerKind::Euler);
    let karras = SchedulerSpec::parse("DPM++ 2M Karras")?;
    ensure!(karras.overrides["use_karras_sigmas"] == true);
    ensure!(karras.overrides["algorithm_type"] == "dpmsolver++");
    // Converting to Euler drops DDIM-only keys (set_alpha_to_one) and keeps the schedule.
    let euler = AnyScheduler::convert(&ddim, &SchedulerSpec::parse("Euler")?)?;
    ensure!(euler.config_value().get("set_alpha_to_one").is_none());
    ensure!(euler.config_value()["beta_schedule"] == "scaled_linear");
    ensure!(euler.config_value()["_class_name"] == "EulerDiscreteScheduler");
    Ok(())
}

#[test]
fn variance_noise_is_the_same_as_the_generator_draw() -> Result<()> {
    let run = |external: bool| -> Result<Vec<f32>> {
        let mut s = EulerAncestralDiscreteScheduler::new(Default::default())?;
        s.set_timesteps(6)?;
        let mut g = TorchGenerator::new(40);
        let mut x = sample();
        for t in s.timesteps().to_vec() {
            let input = s.scale_model_input(x.clone(), t)?;
            let out = input.mul_scalar(0.3);
            let options = if external {
                StepOptions::default()
                    .with_variance_noise(tensor(g.randn(&[2, 3, 4, 4]), [2, 3, 4, 4]))
            } else {
                StepOptions::default().with_generator(&mut g)
            };
            x = s.step(out, t, x, options)?.prev_sample;
        }
        Ok(host(&x))
    };
    ensure!(run(true)? == run(false)?);
    Ok(())
}

#[test]
fn begin_index_starts_mid_schedule_and_set_timesteps_resets() -> Result<()> {
    let mut s = euler();
    s.set_timesteps(10)?;
    s.set_begin_index(4)?;
    let t = s.timesteps()[4];
    let scaled = s.scale_model_input(sample(), t)?;
    ensure!(s.step_index() == Some(4));
    let sigma = s.sigmas().context("sigmas")?[4] as f32;
    let expected = sample().div_scalar((sigma * sigma + 1.0).sqrt());
    ensure!(host(&scaled) == host(&expected));
    s.step(sample(), t, sample(), StepOptions::default())?;
    ensure!(s.step_index() == Some(5));
    s.set_timesteps(10)?;
    ensure!(s.step_index().is_none());

    // A DPM run from a fresh schedule equals the first run: history and order are reset.
    let mut s = dpm(DPMSolverMultistepSchedulerConfig {
        solver_order: 3,
        ..Default::default()
    });
    let mut runs = Vec::new();
    for _ in 0..2 {
        s.set_timesteps(8)?;
        let mut x = sample();
        for t in s.timesteps().to_vec() {
            let out = x.clone().mul_scalar(0.5);
            x = s.step(out, t, x, StepOptions::default())?.prev_sample;
        }
        runs.push(host(&x));
    }
    ensure!(runs[0] == runs[1]);
    Ok(())
}

/// The step maths is elementwise, so any rank gives the same numbers as the 4-d layout.
#[test]
fn steps_work_for_any_rank() -> Result<()> {
    fn run<const D: usize>(scheduler: &mut AnyScheduler, x: Tensor<D>) -> Result<Vec<f32>> {
        scheduler.set_timesteps(5)?;
        let mut g = TorchGenerator::new(3);
        let mut x = x;
        for t in scheduler.timesteps().to_vec() {
            let input = scheduler.scale_model_input(x.clone(), t)?;
            let out = input.mul_scalar(0.7).add_scalar(0.05);
            let options = StepOptions::default().with_generator(&mut g);
            x = scheduler.step(out, t, x, options)?.prev_sample;
        }
        Ok(host(&x))
    }
    for name in ["DDPM", "Euler a", "DPM++ 2M SDE Karras", "Euler"] {
        let spec = SchedulerSpec::parse(name)?;
        let base = DDIMScheduler::new(DDIMSchedulerConfig::default())?;
        let mut s = AnyScheduler::convert(&base, &spec)?;
        let data: Vec<f32> = host(&sample());
        let four = run(&mut s, tensor(data.clone(), [2, 3, 4, 4]))?;
        let three = run(&mut s, tensor(data.clone(), [2, 3, 16]))?;
        let five = run(&mut s, tensor(data, [2, 3, 2, 2, 4]))?;
        ensure!(four == three && four == five, "{name}");
    }
    Ok(())
}
