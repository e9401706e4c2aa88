//! diffusers' own tests for the sigma schedulers (tests/schedulers/test_scheduler_euler.py,
//! test_scheduler_euler_ancestral.py, test_scheduler_dpm_multi.py): same sample, model and
//! loops, checked against the numbers hard-coded there and against the oracle's final samples.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::config::read_json as read_config_json;
use diffusion_schedulers::scheduling_dpmsolver_multistep::AlgorithmType;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DPMSolverMultistepScheduler,
    DPMSolverMultistepSchedulerConfig, EulerAncestralDiscreteScheduler,
    EulerAncestralDiscreteSchedulerConfig, EulerDiscreteScheduler, EulerDiscreteSchedulerConfig,
    PredictionType, Scheduler, SchedulerKind, SetTimesteps, StepOptions,
};

use crate::common::{Tensors, dummy_sample_deter, fixtures, host, max_abs, rel_err_scaled};

/// diffusers' sum/mean checks with its tolerances, then the final sample against the oracle's,
/// relative to the larger of the result and the initial sample (Euler's v-prediction loop
/// ends at ~1e-13, pure rounding noise of an O(1) computation).
pub(crate) fn check(
    name: &str,
    result: &Tensor<4>,
    initial_scale: f64,
    expected_sum: Option<f64>,
    expected_mean: f64,
) -> Result<()> {
    let v = host(result);
    let sum: f64 = v.iter().map(|x| f64::from(x.abs())).sum();
    let mean = sum / v.len() as f64;
    if let Some(expected_sum) = expected_sum {
        ensure!(
            (sum - expected_sum).abs() < 1e-2,
            "{name}: sum {sum} vs diffusers' {expected_sum}"
        );
    }
    ensure!(
        (mean - expected_mean).abs() < 1e-3,
        "{name}: mean {mean} vs diffusers' {expected_mean}"
    );
    let golden = Tensors::load("golden.safetensors")?;
    let err = rel_err_scaled(&v, golden.values(name)?, initial_scale);
    ensure!(
        err <= 1e-5,
        "{name}: relative error {err:e} against the oracle"
    );
    Ok(())
}

fn t_model(x: &Tensor<4>, t: f64) -> Tensor<4> {
    x.clone().mul_scalar(t).div_scalar(t + 1.0)
}

/// The loop of diffusers' Euler-family tests (the scaled sample replaces the sample).
fn sigma_loop<S: Scheduler>(
    s: &mut S,
    noise_at: Option<usize>,
    name: &str,
    sum: Option<f64>,
    mean: f64,
) -> Result<()> {
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false).mul_scalar(s.init_noise_sigma() as f32);
    let initial_scale = max_abs(&host(&x));
    let mut timesteps = s.timesteps().to_vec();
    if let Some(start) = noise_at {
        timesteps = timesteps[start * s.order()..].to_vec();
        x = s.add_noise(x, dummy_sample_deter(true), &timesteps[..1])?;
    }
    let mut generator = TorchGenerator::new(0);
    for t in timesteps {
        x = s.scale_model_input(x, t)?;
        let out = t_model(&x, t);
        x = s
            .step(
                out,
                t,
                x,
                StepOptions::default().with_generator(&mut generator),
            )?
            .prev_sample;
    }
    check(name, &x, initial_scale, sum, mean)
}

fn euler_config() -> EulerDiscreteSchedulerConfig {
    EulerDiscreteSchedulerConfig {
        num_train_timesteps: 1100,
        ..Default::default()
    }
}

#[test]
fn euler_full_loops() -> Result<()> {
    let mut s = EulerDiscreteScheduler::new(euler_config())?;
    sigma_loop(
        &mut s,
        None,
        "euler/full_loop_no_noise",
        Some(10.0807),
        0.0131,
    )?;
    let mut s = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..euler_config()
    })?;
    sigma_loop(
        &mut s,
        None,
        "euler/full_loop_with_v_prediction",
        Some(0.0002),
        2.2676e-06,
    )?;
    let mut s = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
        use_karras_sigmas: Some(true),
        ..euler_config()
    })?;
    sigma_loop(
        &mut s,
        None,
        "euler/full_loop_device_karras_sigmas",
        Some(124.52299499511719),
        0.16213932633399963,
    )
}

#[test]
fn euler_ancestral_full_loops() -> Result<()> {
    let config = || EulerAncestralDiscreteSchedulerConfig {
        num_train_timesteps: 1100,
        ..Default::default()
    };
    let mut s = EulerAncestralDiscreteScheduler::new(config())?;
    sigma_loop(
        &mut s,
        None,
        "euler_ancestral/full_loop_no_noise",
        Some(152.3192),
        0.1983,
    )?;
    let mut s = EulerAncestralDiscreteScheduler::new(EulerAncestralDiscreteSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..config()
    })?;
    sigma_loop(
        &mut s,
        None,
        "euler_ancestral/full_loop_with_v_prediction",
        Some(108.4439),
        0.1412,
    )?;
    let mut s = EulerAncestralDiscreteScheduler::new(config())?;
    sigma_loop(
        &mut s,
        Some(8),
        "euler_ancestral/full_loop_with_noise",
        Some(56163.0508),
        73.1290,
    )
}

/// get_scheduler_config() of test_scheduler_dpm_multi.py.
fn dpm_config() -> DPMSolverMultistepSchedulerConfig {
    DPMSolverMultistepSchedulerConfig {
        lower_order_final: false,
        final_sigmas_type: diffusion_schedulers::sigmas::FinalSigmasType::SigmaMin,
        ..Default::default()
    }
}

/// diffusers' DPM `full_loop` (no input scaling; a generator that only the SDE variants use).
fn dpm_loop<S: Scheduler>(s: &mut S, noise_at: Option<usize>) -> Result<Tensor<4>> {
    if s.num_inference_steps().is_none() {
        s.set_timesteps(10)?;
    }
    let mut x = dummy_sample_deter(false);
    let mut timesteps = s.timesteps().to_vec();
    if let Some(start) = noise_at {
        timesteps = timesteps[start * s.order()..].to_vec();
        x = s.add_noise(x, dummy_sample_deter(true), &timesteps[..1])?;
    }
    let mut generator = TorchGenerator::new(0);
    for t in timesteps {
        let out = t_model(&x, t);
        let options = if noise_at.is_some() {
            StepOptions::default()
        } else {
            StepOptions::default().with_generator(&mut generator)
        };
        x = s.step(out, t, x, options)?.prev_sample;
    }
    Ok(x)
}

#[test]
fn dpm_solver_multistep_full_loops() -> Result<()> {
    let run = |config: DPMSolverMultistepSchedulerConfig| -> Result<Tensor<4>> {
        dpm_loop(&mut DPMSolverMultistepScheduler::new(config)?, None)
    };
    check(
        "dpm_multi/full_loop_no_noise",
        &run(dpm_config())?,
        1.0,
        None,
        0.3301,
    )?;
    let with_noise = dpm_loop(
        &mut DPMSolverMultistepScheduler::new(dpm_config())?,
        Some(5),
    )?;
    check(
        "dpm_multi/full_loop_with_noise",
        &with_noise,
        1.0,
        Some(318.4111),
        0.4146,
    )?;
    let thres = DPMSolverMultistepSchedulerConfig {
        thresholding: true,
        dynamic_thresholding_ratio: 0.87,
        sample_max_value: 0.5,
        ..dpm_config()
    };
    check(
        "dpm_multi/full_loop_no_noise_thres",
        &run(thres)?,
        1.0,
        None,
        1.1364,
    )?;
    let v = DPMSolverMultistepSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..dpm_config()
    };
    check(
        "dpm_multi/full_loop_with_v_prediction",
        &run(v.clone())?,
        1.0,
        None,
        0.2251,
    )?;
    let karras = DPMSolverMultistepSchedulerConfig {
        use_karras_sigmas: true,
        ..v.clone()
    };
    check(
        "dpm_multi/full_loop_with_karras_and_v_prediction",
        &run(karras)?,
        1.0,
        None,
        0.2096,
    )?;
    let lu = DPMSolverMultistepSchedulerConfig {
        use_lu_lambdas: true,
        ..v
    };
    check(
        "dpm_multi/full_loop_with_lu_and_v_prediction",
        &run(lu)?,
        1.0,
        None,
        0.1554,
    )
}

#[test]
fn dpm_solver_multistep_reads_deis_and_unipc_names() -> Result<()> {
    // test_switch: a config that went through DPMSolverSinglestep, UniPC and DEIS says
    // algorithm_type "deis" and solver_type "logrho"; read as DPM it must run as dpmsolver++.
    let path = fixtures().join("configs/deis_from_dpm/scheduler_config.json");
    let value = read_config_json(&path)?;
    ensure!(value["algorithm_type"] == "deis" && value["solver_type"] == "logrho");
    let mut s = AnyScheduler::build(SchedulerKind::DpmSolverMultistep, value, &path)?;
    let dpm = s.as_dpm_solver_multistep().context("dpm")?;
    ensure!(dpm.config().algorithm_type == AlgorithmType::DpmSolverPlusPlus);
    ensure!(s.config_value()["solver_type"] == "midpoint");
    let x = dpm_loop(&mut s, None)?;
    check("dpm_multi/switch", &x, 1.0, None, 0.3301)
}

#[test]
fn dpm_solver_custom_timesteps_reproduce_the_spaced_ones() -> Result<()> {
    // test_custom_timesteps: setting the timesteps a step count gives, explicitly, changes
    // nothing.
    use diffusion_schedulers::sigmas::FinalSigmasType;
    for algorithm in [
        AlgorithmType::DpmSolverPlusPlus,
        AlgorithmType::SdeDpmSolverPlusPlus,
    ] {
        for prediction in [
            PredictionType::Epsilon,
            PredictionType::Sample,
            PredictionType::VPrediction,
        ] {
            for final_sigmas in [FinalSigmasType::SigmaMin, FinalSigmasType::Zero] {
                let config = DPMSolverMultistepSchedulerConfig {
                    algorithm_type: algorithm,
                    prediction_type: prediction,
                    final_sigmas_type: final_sigmas,
                    ..dpm_config()
                };
                let mut spaced = DPMSolverMultistepScheduler::new(config.clone())?;
                spaced.set_timesteps(10)?;
                let mut custom = DPMSolverMultistepScheduler::new(config)?;
                custom.set_timesteps_with(SetTimesteps::custom_timesteps(
                    spaced.timesteps().to_vec(),
                ))?;
                ensure!(custom.sigmas() == spaced.sigmas());
                let a = host(&dpm_loop(&mut spaced, None)?);
                let b = host(&dpm_loop(&mut custom, None)?);
                let diff: f64 = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| f64::from((x - y).abs()))
                    .sum();
                ensure!(
                    diff < 1e-5,
                    "{algorithm:?} {prediction:?} {final_sigmas:?}: {diff}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn default_configs_written_by_diffusers_load_to_our_defaults() -> Result<()> {
    let dir = fixtures().join("configs");
    let euler = EulerDiscreteScheduler::load(dir.join("EulerDiscreteScheduler"))?;
    ensure!(*euler.config() == EulerDiscreteSchedulerConfig::default());
    let ancestral =
        EulerAncestralDiscreteScheduler::load(dir.join("EulerAncestralDiscreteScheduler"))?;
    ensure!(*ancestral.config() == EulerAncestralDiscreteSchedulerConfig::default());
    // This file holds `"lambda_min_clipped": -Infinity`, Python's JSON.
    let dpm_dir = dir.join("DPMSolverMultistepScheduler");
    let dpm = DPMSolverMultistepScheduler::load(&dpm_dir)?;
    ensure!(*dpm.config() == DPMSolverMultistepSchedulerConfig::default());
    ensure!(dpm.config_file().unknown_keys().is_empty());
    for (name, ours) in [
        ("EulerDiscreteScheduler", euler.config_value()),
        ("EulerAncestralDiscreteScheduler", ancestral.config_value()),
        ("DPMSolverMultistepScheduler", dpm.config_value()),
    ] {
        let mut theirs = read_config_json(&dir.join(name).join("scheduler_config.json"))?;
        // The -inf default is left out when saving (strict JSON; diffusers reads it back as
        // its default): everything else is written back as diffusers wrote it.
        if let Some(map) = theirs.as_object_mut()
            && map.get("lambda_min_clipped") == Some(&"-Infinity".into())
        {
            map.remove("lambda_min_clipped");
        }
        ensure!(ours == theirs, "{name}: {ours}\nvs\n{theirs}");
    }
    // And what we write loads again to the same scheduler.
    let again = AnyScheduler::from_config_value(dpm.config_value(), Path::new("saved.json"))?;
    ensure!(again.as_dpm_solver_multistep().context("dpm")?.config() == dpm.config());
    Ok(())
}
