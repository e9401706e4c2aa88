//! ScoreSdeVeScheduler: the predictor-corrector loops of diffusers' ScoreSdeVePipeline on the
//! oracle's fixtures (fixtures/schedulers/extra/), diffusers' own test loop
//! (tests/schedulers/test_scheduler_score_sde_ve.py), default config file and bad input.

use anyhow::{Context, Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::Tensor;
use diffusion_schedulers::{
    ConfiguredScheduler, Scheduler, ScoreSdeVeScheduler, ScoreSdeVeSchedulerConfig, StepOptions,
};
use serde_json::Value;

use crate::common::{
    Tensors, arg_name, build, dummy_sample_deter, field_name, host, max_abs, read_json,
    rel_err_scaled, tensor,
};
use crate::more::{check_golden, comparable, default_config_file_in, golden_in};

/// The trajectory model `(0.5 x + 0.1) * sigma / (sigma + 1)`, conditioned on the noise level.
fn model(x: &Tensor<4>, sigma: f64) -> Tensor<4> {
    x.clone()
        .mul_scalar(0.5)
        .add_scalar(0.1)
        .mul_scalar(sigma)
        .div_scalar(sigma + 1.0)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

#[test]
fn predictor_corrector_loops_match_diffusers() -> Result<()> {
    let cases = read_json("extra/cases.json")?;
    let tensors = Tensors::load("extra/trajectories.safetensors")?;
    let (mut n, mut worst) = (0, 0f64);
    for case in cases.as_array().context("cases")? {
        if case["loop"] != "predictor_corrector" {
            continue;
        }
        let id = case["id"].as_str().context("id")?;
        let any = build("ScoreSdeVeScheduler", &case["config"])?;
        let mut s = any.as_score_sde_ve().context("sde ve")?.clone();
        let k = case["num_inference_steps"].as_u64().context("k")? as usize;
        s.set_timesteps(k)?;
        s.set_sigmas(k)?;
        // Schedules: float32 values from torch's linspace, pow and exp (an ulp or two).
        for (ours, theirs, what) in [
            (
                s.timesteps().to_vec(),
                floats(&case["diffusers_timesteps"]),
                "timesteps",
            ),
            (
                s.sigmas().context("sigmas")?.to_vec(),
                floats(&case["diffusers_sigmas"]),
                "sigmas",
            ),
            (
                s.discrete_sigmas().iter().map(|&v| f64::from(v)).collect(),
                floats(&case["discrete_sigmas"]),
                "discrete_sigmas",
            ),
        ] {
            ensure!(ours.len() == theirs.len(), "{id}: {what} length");
            let err = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
                .fold(0f64, f64::max);
            ensure!(
                err <= 4.0 * f64::from(f32::EPSILON),
                "{id}: {what} off by {err:e}"
            );
        }
        let correct_steps = s.config().correct_steps;
        let mut generator = TorchGenerator::new(case["step"]["seed"].as_u64().context("seed")?);
        let mut x = tensors.tensor4("sample0")?;
        let sigmas = s.sigmas().context("sigmas")?.to_vec();
        let mut compare = |actual: &Tensor<4>, key: String, input: &Tensor<4>| -> Result<()> {
            let scale = max_abs(&host(input));
            let err = rel_err_scaled(&host(actual), tensors.values(&key)?, scale);
            ensure!(err <= 1e-5, "{key}: relative error {err:e}");
            worst = worst.max(err);
            Ok(())
        };
        for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
            for j in 0..correct_steps {
                let options = StepOptions::default().with_generator(&mut generator);
                let y = s.step_correct(model(&x, sigmas[i]), x.clone(), options)?;
                compare(&y, format!("{id}/correct/{i}/{j}"), &x)?;
                x = y;
            }
            let options = StepOptions::default().with_generator(&mut generator);
            let out = s.step_pred(model(&x, sigmas[i]), t, x.clone(), options)?;
            compare(&out.prev_sample, format!("{id}/prev/{i}"), &x)?;
            compare(&out.prev_sample_mean, format!("{id}/mean/{i}"), &x)?;
            x = out.prev_sample;
        }
        n += 1;
    }
    eprintln!(
        "  ScoreSdeVeScheduler: {n} predictor-corrector loops, worst relative error {worst:e}"
    );
    ensure!(n >= 5, "only {n} loops");
    Ok(())
}

#[test]
fn diffusers_full_loop() -> Result<()> {
    let mut s = ScoreSdeVeScheduler::new(ScoreSdeVeSchedulerConfig::default())?;
    // diffusers' test calls set_sigmas first: the model sees the first three noise levels
    // of the 2000 __init__ timesteps.
    s.set_sigmas(3)?;
    s.set_timesteps(3)?;
    let sigmas = s.sigmas().context("sigmas")?.to_vec();
    let mut generator = TorchGenerator::new(0);
    let mut x = dummy_sample_deter(false);
    let scale = max_abs(&host(&x));
    let model = |x: &Tensor<4>, sigma: f64| x.clone().mul_scalar(sigma).div_scalar(sigma + 1.0);
    for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
        for _ in 0..s.config().correct_steps {
            let options = StepOptions::default().with_generator(&mut generator);
            x = s.step_correct(model(&x, sigmas[i]), x.clone(), options)?;
        }
        let options = StepOptions::default().with_generator(&mut generator);
        x = s
            .step(model(&x, sigmas[i]), t, x.clone(), options)?
            .prev_sample;
    }
    check_golden(&golden_in("extra", "sde_ve/full_loop_no_noise")?, &x, scale)
}

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file_in("extra", "ScoreSdeVeScheduler");
    let s = ScoreSdeVeScheduler::load(&path)?;
    ensure!(*s.config() == ScoreSdeVeSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    ensure!(comparable(s.config_value()) == comparable(diffusion_core::config::read_json(&path)?));
    ensure!(s.init_noise_sigma() == 1348.0);
    ensure!(s.timesteps().len() == 2000 && s.discrete_sigmas().len() == 2000);
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            ScoreSdeVeSchedulerConfig {
                sigma_min: 2000.0,
                ..Default::default()
            },
            "sigma_min",
        ),
        (
            ScoreSdeVeSchedulerConfig {
                sampling_eps: 0.0,
                ..Default::default()
            },
            "sampling_eps",
        ),
        (
            ScoreSdeVeSchedulerConfig {
                num_train_timesteps: 0,
                ..Default::default()
            },
            "num_train_timesteps",
        ),
    ] {
        assert_eq!(field_name(ScoreSdeVeScheduler::new(config)), field);
    }
    let mut s = ScoreSdeVeScheduler::new(Default::default())?;
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(arg_name(s.set_sigmas(0)), "num_inference_steps");
    s.set_timesteps(4)?;
    s.set_sigmas(4)?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    let mut generator = TorchGenerator::new(0);
    let options = StepOptions::default().with_generator(&mut generator);
    assert_eq!(
        arg_name(s.step(x.clone(), 1.5, x.clone(), options)),
        "timestep"
    );
    assert_eq!(
        arg_name(s.step(x.clone(), 1.0, x.clone(), StepOptions::default())),
        "generator"
    );
    assert_eq!(
        arg_name(s.step_correct(x.clone(), x.clone(), StepOptions::default().with_eta(0.1))),
        "eta"
    );
    assert_eq!(
        arg_name(s.add_noise(x.clone(), x.clone(), &[4.0])),
        "timesteps"
    );
    assert_eq!(arg_name(s.add_noise(x.clone(), x, &[0.5])), "timesteps");
    Ok(())
}
