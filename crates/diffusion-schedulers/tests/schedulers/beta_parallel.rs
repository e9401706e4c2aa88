//! Beta-distribution sigmas (`use_beta_sigmas`) and the parallel-sampling schedulers
//! (DDIMParallelScheduler, DDPMParallelScheduler), and IPNDM's `trained_betas`, against
//! diffusers, on the fixtures of
//! fixtures/oracle/gen_schedulers_beta_parallel.py (fixtures/schedulers/beta_parallel/):
//! scipy's quantiles, trajectories, `batch_step_no_noise`, add_noise, diffusers' own test
//! loops, default configs, bad input and invariants.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Error, TorchGenerator};
use diffusion_schedulers::sigmas::beta_sigmas;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, DDIMParallelScheduler, DDIMParallelSchedulerConfig,
    DDIMScheduler, DDIMSchedulerConfig, DDPMParallelScheduler, DDPMParallelSchedulerConfig,
    DDPMScheduler, DDPMSchedulerConfig, PredictionType, Scheduler, SchedulerKind, SetTimesteps,
    StepOptions, TimestepSpacing,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Value, json};

use crate::common::{
    Tensors, arg_name, build, dummy_sample_deter, field_name, fixtures, host, read_json, rel_err,
    tensor,
};
use crate::parity::{check_forward_cases, check_trajectory};

/// The same tolerance as every other parity test (see parity.rs).
const SAMPLE_RTOL: f64 = 1e-5;

/// Every class diffusers 0.42.1 gives `use_beta_sigmas` that this crate implements.
const BETA_CLASSES: [&str; 11] = [
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepInverseScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
];

#[test]
fn beta_quantiles_match_scipy() -> Result<()> {
    let cases = read_json("beta_parallel/beta_ppf.json")?;
    let mut worst = 0f64;
    for case in cases.as_array().context("cases")? {
        let n = case["n"].as_u64().context("n")? as usize;
        let expected: Vec<f64> = case["ppf"]
            .as_array()
            .context("ppf")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        // With sigma_min 0 and sigma_max 1 the sigmas are the quantiles themselves.
        let ours = beta_sigmas(0.0, 1.0, n);
        ensure!(
            ours.len() == expected.len(),
            "n = {n}: {} values",
            ours.len()
        );
        for (a, b) in ours.iter().zip(&expected) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("beta quantiles: worst absolute error {worst:e} against scipy");
    ensure!(
        worst <= 1e-13,
        "worst absolute error {worst:e} against scipy"
    );
    Ok(())
}

#[test]
fn trajectories_match_diffusers() -> Result<()> {
    let cases = read_json("beta_parallel/cases.json")?;
    let tensors = Tensors::load("beta_parallel/trajectories.safetensors")?;
    let mut by_class = BTreeMap::<String, (usize, f64)>::new();
    for case in cases.as_array().context("cases")? {
        let err = check_trajectory(case, &tensors)?;
        let entry = by_class
            .entry(case["class"].as_str().unwrap_or("?").to_string())
            .or_default();
        *entry = (entry.0 + 1, entry.1.max(err));
    }
    for (class, (n, err)) in &by_class {
        eprintln!("  {class}: {n} trajectories, worst relative error {err:e}");
        ensure!(*n >= 5, "{class}: only {n} trajectories");
    }
    for class in BETA_CLASSES.iter().chain(&[
        "DDIMParallelScheduler",
        "DDPMParallelScheduler",
        "IPNDMScheduler",
    ]) {
        ensure!(by_class.contains_key(*class), "no trajectory for {class}");
    }
    Ok(())
}

/// `batch_step_no_noise` of whichever parallel scheduler `s` is.
fn batch_step(
    s: &AnyScheduler,
    model_output: Tensor<4>,
    timesteps: &[f64],
    sample: Tensor<4>,
    use_clipped_model_output: bool,
) -> diffusion_core::Result<Tensor<4>> {
    match s {
        AnyScheduler::DdimParallel(s) => {
            s.batch_step_no_noise(model_output, timesteps, sample, use_clipped_model_output)
        }
        AnyScheduler::DdpmParallel(s) => s.batch_step_no_noise(model_output, timesteps, sample),
        other => panic!("{} has no batch_step_no_noise", other.class_name()),
    }
}

#[test]
fn batch_step_no_noise_matches_diffusers() -> Result<()> {
    let cases = read_json("beta_parallel/batch.json")?;
    let tensors = Tensors::load("beta_parallel/batch.safetensors")?;
    let sample = tensors.tensor4("sample")?;
    let mut worst = BTreeMap::<String, (usize, f64)>::new();
    for case in cases.as_array().context("cases")? {
        let key = case["key"].as_str().context("key")?;
        let class = case["class"].as_str().context("class")?;
        let mut s = build(class, &case["config"])?;
        if let Some(k) = case["num_inference_steps"].as_u64() {
            s.set_timesteps(k as usize)?;
        }
        let timesteps: Vec<f64> = case["timesteps"]
            .as_array()
            .context("timesteps")?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        let clipped = case["kwargs"]["use_clipped_model_output"]
            .as_bool()
            .unwrap_or(false);
        let model_output = tensors.tensor4(case["model_output"].as_str().context("output")?)?;
        let out = batch_step(&s, model_output, &timesteps, sample.clone(), clipped)?;
        let err = rel_err(&host(&out), tensors.values(&format!("{key}/prev"))?);
        ensure!(
            err <= SAMPLE_RTOL,
            "{key} ({class} {}): relative error {err:e}",
            case["config"]
        );
        let entry = worst.entry(class.to_string()).or_default();
        *entry = (entry.0 + 1, entry.1.max(err));
    }
    for (class, (n, err)) in &worst {
        eprintln!("  {class}: {n} batch steps, worst relative error {err:e}");
        ensure!(*n >= 10, "{class}: only {n} cases");
    }
    Ok(())
}

#[test]
fn add_noise_and_velocity_match_diffusers() -> Result<()> {
    let (with_velocity, sigma_based) = check_forward_cases(
        "beta_parallel/forward.json",
        "beta_parallel/forward.safetensors",
    )?;
    ensure!(
        with_velocity == 4 && sigma_based == 0,
        "{with_velocity} / {sigma_based} cases"
    );
    Ok(())
}

/// Check one of diffusers' test loops against its hard-coded sum and mean (its tolerances,
/// 1e-2 and 1e-3) and against the oracle's final sample.
fn check_golden(name: &str, result: &Tensor<4>) -> Result<()> {
    let all = read_json("beta_parallel/golden.json")?;
    let entry = all
        .as_array()
        .context("golden")?
        .iter()
        .find(|e| e["name"] == name)
        .with_context(|| format!("no golden entry {name}"))?;
    let values = host(result);
    let sum: f64 = values.iter().map(|x| f64::from(x.abs())).sum();
    let mean = sum / values.len() as f64;
    let expected_sum = entry["diffusers_test_sum"].as_f64().context("sum")?;
    let expected_mean = entry["diffusers_test_mean"].as_f64().context("mean")?;
    ensure!(
        (sum - expected_sum).abs() < 1e-2,
        "{name}: sum {sum} vs diffusers' {expected_sum}"
    );
    ensure!(
        (mean - expected_mean).abs() < 1e-3,
        "{name}: mean {mean} vs diffusers' {expected_mean}"
    );
    let golden = Tensors::load("beta_parallel/golden.safetensors")?;
    let err = rel_err(&values, golden.values(name)?);
    ensure!(
        err <= SAMPLE_RTOL,
        "{name}: relative error {err:e} against the oracle"
    );
    Ok(())
}

/// get_scheduler_config() of diffusers' tests/schedulers/test_scheduler_ddim_parallel.py.
fn ddim_parallel_test_config() -> DDIMParallelSchedulerConfig {
    DDIMParallelSchedulerConfig(DDIMSchedulerConfig {
        clip_sample: true,
        ..Default::default()
    })
}

/// The full loop of test_scheduler_ddim_parallel.py: 10 steps, eta 0, model `x t / (t + 1)`.
fn ddim_parallel_full_loop(config: DDIMParallelSchedulerConfig) -> Result<Tensor<4>> {
    let mut s = DDIMParallelScheduler::new(config)?;
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false);
    for t in s.timesteps().to_vec() {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s
            .step(residual, t, x, StepOptions::default().with_eta(0.0))?
            .prev_sample;
    }
    Ok(x)
}

/// The batch of test_batch_step_no_noise: the deterministic sample shifted by 0, +0.1 and
/// -0.1, at timesteps 0, 1 and 2 (one per copy), through the test model.
fn test_batch() -> (Tensor<4>, Vec<f64>, Tensor<4>) {
    let base = dummy_sample_deter(false);
    let samples = Tensor::cat(
        vec![
            base.clone(),
            base.clone().add_scalar(0.1),
            base.sub_scalar(0.1),
        ],
        0,
    );
    let per_copy = 4;
    let timesteps: Vec<f64> = (0..3)
        .flat_map(|t| std::iter::repeat_n(f64::from(t), per_copy))
        .collect();
    let t = tensor(
        timesteps.iter().map(|&t| t as f32).collect(),
        [timesteps.len(), 1, 1, 1],
    );
    let residual = samples.clone().mul(t.clone()).div(t.add_scalar(1.0));
    (residual, timesteps, samples)
}

#[test]
fn ddim_parallel_full_loops_match_diffusers_tests() -> Result<()> {
    // Numbers hard-coded in huggingface/diffusers tests/schedulers/test_scheduler_ddim_parallel.py
    // (test_full_loop_*), recorded with the oracle's final samples.
    let base = ddim_parallel_test_config;
    check_golden(
        "ddim_parallel/full_loop_no_noise",
        &ddim_parallel_full_loop(base())?,
    )?;
    let mut v = base();
    v.0.prediction_type = PredictionType::VPrediction;
    check_golden(
        "ddim_parallel/full_loop_with_v_prediction",
        &ddim_parallel_full_loop(v)?,
    )?;
    for (alpha_to_one, name) in [
        (true, "ddim_parallel/full_loop_with_set_alpha_to_one"),
        (false, "ddim_parallel/full_loop_with_no_set_alpha_to_one"),
    ] {
        let mut c = base();
        c.0.set_alpha_to_one = alpha_to_one;
        c.0.beta_start = 0.01;
        check_golden(name, &ddim_parallel_full_loop(c)?)?;
    }
    Ok(())
}

#[test]
fn batch_step_no_noise_matches_diffusers_tests() -> Result<()> {
    // test_batch_step_no_noise of both parallel test files (huggingface/diffusers
    // tests/schedulers/test_scheduler_ddim_parallel.py: 1147.7904 / 0.4982 after
    // set_timesteps(10); test_scheduler_ddpm_parallel.py: 1153.1833 / 0.5005 without).
    let (residual, timesteps, samples) = test_batch();
    let mut ddim = DDIMParallelScheduler::new(ddim_parallel_test_config())?;
    ddim.set_timesteps(10)?;
    let out = ddim.batch_step_no_noise(residual.clone(), &timesteps, samples.clone(), false)?;
    check_golden("ddim_parallel/batch_step_no_noise", &out)?;
    let ddpm = DDPMParallelScheduler::new(DDPMParallelSchedulerConfig::default())?;
    let out = ddpm.batch_step_no_noise(residual, &timesteps, samples)?;
    check_golden("ddpm_parallel/batch_step_no_noise", &out)
}

/// The full loops of test_scheduler_ddpm_parallel.py: every training timestep, noise from
/// `torch.manual_seed(0)`; with `noise_from` the sample is first noised to that timestep.
fn ddpm_parallel_full_loop(
    config: DDPMParallelSchedulerConfig,
    noise_from: Option<usize>,
) -> Result<Tensor<4>> {
    let mut s = DDPMParallelScheduler::new(config)?;
    let mut timesteps = s.timesteps().to_vec();
    let mut x = dummy_sample_deter(false);
    if let Some(start) = noise_from {
        timesteps = timesteps[start * s.order()..].to_vec();
        x = s.add_noise(x, dummy_sample_deter(true), &timesteps[..1])?;
    }
    let mut generator = TorchGenerator::new(0);
    for t in timesteps {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s
            .step(
                residual,
                t,
                x,
                StepOptions::default().with_generator(&mut generator),
            )?
            .prev_sample;
    }
    Ok(x)
}

#[test]
fn ddpm_parallel_full_loops_match_diffusers_tests() -> Result<()> {
    // Numbers hard-coded in huggingface/diffusers tests/schedulers/test_scheduler_ddpm_parallel.py
    // (test_full_loop_*), recorded with the oracle's final samples.
    let base = DDPMParallelSchedulerConfig::default;
    check_golden(
        "ddpm_parallel/full_loop_no_noise",
        &ddpm_parallel_full_loop(base(), None)?,
    )?;
    let mut v = base();
    v.0.prediction_type = PredictionType::VPrediction;
    check_golden(
        "ddpm_parallel/full_loop_with_v_prediction",
        &ddpm_parallel_full_loop(v, None)?,
    )?;
    check_golden(
        "ddpm_parallel/full_loop_with_noise",
        &ddpm_parallel_full_loop(base(), Some(998))?,
    )
}

#[test]
fn ddpm_parallel_variance_and_custom_timesteps_as_diffusers_tests() -> Result<()> {
    // test_variance and test_custom_timesteps of test_scheduler_ddpm_parallel.py.
    let mut s = DDPMParallelScheduler::new(DDPMParallelSchedulerConfig::default())?;
    for (t, expected) in [(0.0, 0.0), (487.0, 0.00979), (999.0, 0.02)] {
        let v = s.fixed_variance(t)?;
        ensure!((v - expected).abs() < 1e-5, "variance at {t}: {v}");
    }
    let custom = vec![100.0, 87.0, 50.0, 1.0, 0.0];
    s.set_timesteps_with(SetTimesteps::custom_timesteps(custom.clone()))?;
    for (i, &t) in custom.iter().enumerate() {
        let expected = custom.get(i + 1).copied().unwrap_or(-1.0);
        ensure!(s.previous_timestep(t)? == expected, "after {t}");
    }
    let refused = s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![
        100.0, 87.0, 50.0, 51.0, 0.0,
    ]));
    ensure!(arg_name(refused) == "timesteps");
    Ok(())
}

#[test]
fn ddim_parallel_variance_as_diffusers_tests() -> Result<()> {
    // test_variance of test_scheduler_ddim_parallel.py.
    let s = DDIMParallelScheduler::new(ddim_parallel_test_config())?;
    for (t, prev, expected) in [
        (0.0, 0.0, 0.0),
        (420.0, 400.0, 0.14771),
        (980.0, 960.0, 0.32460),
        (487.0, 486.0, 0.00979),
        (999.0, 998.0, 0.02),
    ] {
        let v = s.variance(t, prev)?;
        ensure!((v - expected).abs() < 1e-5, "variance {t} -> {prev}: {v}");
    }
    // test_steps_offset.
    let mut s = DDIMParallelScheduler::new(DDIMParallelSchedulerConfig(DDIMSchedulerConfig {
        steps_offset: 1,
        ..Default::default()
    }))?;
    s.set_timesteps(5)?;
    ensure!(s.timesteps() == [801.0, 601.0, 401.0, 201.0, 1.0]);
    Ok(())
}

#[test]
fn default_configs_load_as_diffusers_saves_them() -> Result<()> {
    for kind in [SchedulerKind::DdimParallel, SchedulerKind::DdpmParallel] {
        let dir = fixtures()
            .join("beta_parallel/configs")
            .join(kind.class_name());
        let s = AnyScheduler::from_config_file(&dir)?;
        ensure!(s.kind() == kind, "{}", kind.class_name());
        let ours = AnyScheduler::build(kind, json!({}), Path::new("<default>"))?.config_value();
        let theirs = s.config_value();
        for (key, value) in ours.as_object().context("ours")? {
            if key.starts_with('_') {
                continue;
            }
            ensure!(
                theirs.get(key) == Some(value),
                "{}: {key} is {value} here, {:?} in diffusers",
                kind.class_name(),
                theirs.get(key)
            );
        }
    }
    let s = DDPMParallelScheduler::load(
        fixtures().join("beta_parallel/configs/DDPMParallelScheduler"),
    )?;
    ensure!(s.config() == &DDPMParallelSchedulerConfig::default());
    let s = DDIMParallelScheduler::load(
        fixtures().join("beta_parallel/configs/DDIMParallelScheduler"),
    )?;
    ensure!(s.config() == &DDIMParallelSchedulerConfig::default());
    Ok(())
}

#[test]
fn every_beta_class_takes_beta_sigmas_and_refuses_two_spacings() -> Result<()> {
    for class in BETA_CLASSES {
        let mut s = build(class, &json!({"use_beta_sigmas": true}))?;
        s.set_timesteps(10)?;
        let sigmas = s.sigmas().context("sigmas")?;
        let inverse = class == "DPMSolverMultistepInverseScheduler";
        // Strictly monotone apart from the final entry, which repeats or ends the schedule,
        // and the repeats of the two-evaluation solvers (Heun, KDPM2).
        let mut inner = sigmas[..sigmas.len() - 1].to_vec();
        inner.dedup();
        let monotone = inner
            .windows(2)
            .all(|w| if inverse { w[0] < w[1] } else { w[0] > w[1] });
        ensure!(monotone, "{class}: sigmas {sigmas:?}");
        for other in ["use_karras_sigmas", "use_exponential_sigmas"] {
            let r = build(class, &json!({"use_beta_sigmas": true, other: true}));
            let field = match r {
                Err(e) => match e.downcast::<Error>() {
                    Ok(Error::ConfigField { field, .. }) => field,
                    Ok(other) => format!("{other:?}"),
                    Err(e) => format!("{e}"),
                },
                Ok(_) => "accepted".into(),
            };
            ensure!(field == "use_beta_sigmas", "{class} + {other}: {field}");
        }
    }
    // Custom timesteps cannot be combined with respaced sigmas.
    for class in [
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
    ] {
        let mut s = build(class, &json!({"use_beta_sigmas": true}))?;
        let r = s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![900.0, 500.0, 100.0]));
        ensure!(arg_name(r) == "timesteps", "{class}");
    }
    Ok(())
}

fn ddim_parallel() -> DDIMParallelScheduler {
    DDIMParallelScheduler::new(DDIMParallelSchedulerConfig::default()).expect("default config")
}

fn ddpm_parallel() -> DDPMParallelScheduler {
    DDPMParallelScheduler::new(DDPMParallelSchedulerConfig::default()).expect("default config")
}

fn batch(n: usize, channels: usize) -> Tensor<4> {
    let len = n * channels * 2 * 2;
    tensor(
        (0..len).map(|i| i as f32 / len as f32 - 0.5).collect(),
        [n, channels, 2, 2],
    )
}

#[test]
fn batch_step_no_noise_refuses_bad_input() {
    let mut ddim = ddim_parallel();
    // Before set_timesteps DDIM has no step size.
    assert_eq!(
        arg_name(ddim.batch_step_no_noise(batch(2, 3), &[10.0, 20.0], batch(2, 3), false)),
        "num_inference_steps"
    );
    ddim.set_timesteps(10).unwrap();
    let ddpm = ddpm_parallel();
    for timesteps in [&[][..], &[1.0, 2.0, 3.0][..]] {
        assert_eq!(
            arg_name(ddim.batch_step_no_noise(batch(2, 3), timesteps, batch(2, 3), false)),
            "timesteps",
            "{timesteps:?}"
        );
        assert_eq!(
            arg_name(ddpm.batch_step_no_noise(batch(2, 3), timesteps, batch(2, 3))),
            "timesteps",
            "{timesteps:?}"
        );
    }
    for bad in [-1.0, 1000.0, 2.5, f64::NAN] {
        assert_eq!(
            arg_name(ddim.batch_step_no_noise(batch(2, 3), &[bad, 1.0], batch(2, 3), false)),
            "timesteps",
            "{bad}"
        );
        assert_eq!(
            arg_name(ddpm.batch_step_no_noise(batch(2, 3), &[1.0, bad], batch(2, 3))),
            "timesteps",
            "{bad}"
        );
    }
    assert_eq!(
        arg_name(ddim.batch_step_no_noise(batch(2, 4), &[1.0, 2.0], batch(2, 3), false)),
        "model_output"
    );
    // A fixed-variance model has no extra channels to drop.
    assert_eq!(
        arg_name(ddpm.batch_step_no_noise(batch(2, 6), &[1.0, 2.0], batch(2, 3))),
        "model_output"
    );
    let flat = tensor(vec![0.5f32; 4], [4]);
    assert_eq!(
        arg_name(ddpm.batch_step_no_noise(flat.clone(), &[1.0], flat)),
        "sample"
    );
    // Errors name the parallel class.
    let mut fresh = ddim_parallel();
    let err = fresh
        .step(batch(1, 3), 10.0, batch(1, 3), StepOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("DDIMParallelScheduler"), "{err}");
    let err = ddpm_parallel()
        .step(
            batch(1, 3),
            10.0,
            batch(1, 3),
            StepOptions::default().with_eta(0.5),
        )
        .unwrap_err();
    assert!(err.to_string().contains("DDPMParallelScheduler"), "{err}");
}

#[test]
fn parallel_configs_refuse_what_their_bases_refuse() {
    for (key, value) in [
        ("prediction_type", json!("flow_prediction")),
        ("beta_schedule", json!("cosine")),
        ("num_train_timesteps", json!(0)),
    ] {
        for class in ["DDIMParallelScheduler", "DDPMParallelScheduler"] {
            let r = build(class, &json!({ key: value }));
            assert!(r.is_err(), "{class} accepted {key} = {value}");
        }
    }
    let r = DDIMParallelScheduler::new(DDIMParallelSchedulerConfig(DDIMSchedulerConfig {
        thresholding: true,
        dynamic_thresholding_ratio: 2.0,
        ..Default::default()
    }));
    assert_eq!(field_name(r), "dynamic_thresholding_ratio");
}

fn parallel_config() -> impl Strategy<Value = (DDIMSchedulerConfig, DDPMSchedulerConfig)> {
    (
        100usize..1200,
        prop_oneof![
            Just(PredictionType::Epsilon),
            Just(PredictionType::VPrediction),
            Just(PredictionType::Sample),
        ],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(n, prediction_type, clip_sample, alpha_one, rescale)| {
            (
                DDIMSchedulerConfig {
                    num_train_timesteps: n,
                    prediction_type,
                    clip_sample,
                    set_alpha_to_one: alpha_one,
                    rescale_betas_zero_snr: rescale,
                    ..Default::default()
                },
                DDPMSchedulerConfig {
                    num_train_timesteps: n,
                    prediction_type,
                    clip_sample,
                    rescale_betas_zero_snr: rescale,
                    ..Default::default()
                },
            )
        })
}

/// `max |a - b|`, with equal infinities and NaN against NaN counting as equal and NaN against
/// a number as infinitely far.
fn max_diff(a: &Tensor<4>, b: &Tensor<4>) -> f64 {
    let (a, b) = (host(a), host(b));
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x == y || (x.is_nan() && y.is_nan()) {
                0.0
            } else if x.is_nan() || y.is_nan() {
                f64::INFINITY
            } else {
                f64::from((x - y).abs())
            }
        })
        .fold(0.0, f64::max)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        // The module lives under a #[path], where proptest cannot find the crate root.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/schedulers/beta_parallel.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    /// The parallel classes' `step` is their base class's, value for value.
    #[test]
    fn parallel_steps_equal_their_bases(
        (ddim_config, ddpm_config) in parallel_config(),
        k in 2usize..50,
        position in 0.0f64..1.0,
        eta in 0.0f64..1.0,
        seed in 0u64..1000,
    ) {
        let mut base = DDIMScheduler::new(ddim_config.clone()).unwrap();
        let mut parallel =
            DDIMParallelScheduler::new(DDIMParallelSchedulerConfig(ddim_config)).unwrap();
        base.set_timesteps(k).unwrap();
        parallel.set_timesteps(k).unwrap();
        prop_assert_eq!(base.timesteps(), parallel.timesteps());
        let i = ((k - 1) as f64 * position) as usize;
        let t = base.timesteps()[i];
        let (x, e) = (batch(2, 3), batch(2, 3).mul_scalar(0.7).add_scalar(0.2));
        let mut g1 = TorchGenerator::new(seed);
        let mut g2 = TorchGenerator::new(seed);
        let options = |g| StepOptions::default().with_eta(eta).with_generator(g);
        let ours = base.step(e.clone(), t, x.clone(), options(&mut g1));
        let theirs = parallel.step(e.clone(), t, x.clone(), options(&mut g2));
        match (ours, theirs) {
            (Ok(a), Ok(b)) => prop_assert!(max_diff(&a.prev_sample, &b.prev_sample) == 0.0),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a.is_ok(), b.is_ok()),
        }

        let mut base = DDPMScheduler::new(ddpm_config.clone()).unwrap();
        let mut parallel =
            DDPMParallelScheduler::new(DDPMParallelSchedulerConfig(ddpm_config)).unwrap();
        let t = ((base.num_train_timesteps() - 1) as f64 * position).floor();
        let (mut g1, mut g2) = (TorchGenerator::new(seed), TorchGenerator::new(seed));
        let options = |g| StepOptions::default().with_generator(g);
        let a = base.step(e.clone(), t, x.clone(), options(&mut g1)).unwrap();
        let b = parallel.step(e, t, x, options(&mut g2)).unwrap();
        prop_assert!(max_diff(&a.prev_sample, &b.prev_sample) == 0.0);
    }

    /// With every sample at the same timestep (and a target inside the schedule, where
    /// `step` and `batch_step_no_noise` agree on `alpha_bar_prev`), the batched step is DDIM's
    /// deterministic step and DDPM's posterior mean; and each sample's result depends only on
    /// its own timestep.
    #[test]
    fn batch_steps_agree_with_single_steps(
        (ddim_config, ddpm_config) in parallel_config(),
        k in 2usize..50,
        position in 0.0f64..1.0,
        other in 0.0f64..1.0,
    ) {
        // Leading spacing: every timestep but the last steps to one inside the schedule.
        let ddim_config = DDIMSchedulerConfig {
            timestep_spacing: TimestepSpacing::Leading,
            ..ddim_config
        };
        let mut ddim =
            DDIMParallelScheduler::new(DDIMParallelSchedulerConfig(ddim_config)).unwrap();
        ddim.set_timesteps(k).unwrap();
        let ts = ddim.timesteps().to_vec();
        let t = ts[((k - 2) as f64 * position) as usize];
        let u = ts[((k - 1) as f64 * other) as usize];
        let (x, e) = (batch(2, 3), batch(2, 3).mul_scalar(0.7).add_scalar(0.2));
        let single = ddim.step(e.clone(), t, x.clone(), StepOptions::default()).unwrap();
        let batched = ddim.batch_step_no_noise(e.clone(), &[t, t], x.clone(), false).unwrap();
        let diff = max_diff(&single.prev_sample, &batched);
        prop_assert!(diff <= 1e-6, "{}", diff);
        // Sample 0 at t and sample 1 at u: each as if the whole batch were at its timestep.
        let mixed = host(&ddim.batch_step_no_noise(e.clone(), &[t, u], x.clone(), false).unwrap());
        let alone = host(&ddim.batch_step_no_noise(e.clone(), &[u, u], x.clone(), false).unwrap());
        let per_sample = mixed.len() / 2;
        prop_assert_eq!(&mixed[per_sample..], &alone[per_sample..]);
        prop_assert_eq!(&mixed[..per_sample], &host(&batched)[..per_sample]);

        // DDPM over every training timestep: the previous timestep is t - 1, as in
        // batch_step_no_noise before set_timesteps.
        let mut ddpm =
            DDPMParallelScheduler::new(DDPMParallelSchedulerConfig(ddpm_config)).unwrap();
        let n = ddpm.num_train_timesteps();
        let t = (((n - 1) as f64 * position) as usize).max(1) as f64;
        // Zero noise leaves DDPM's step at its posterior mean.
        let zeros = Tensor::zeros([2, 3, 2, 2], &crate::common::device());
        let options = StepOptions::default().with_variance_noise(zeros);
        let mean = ddpm.step(e.clone(), t, x.clone(), options).unwrap().prev_sample;
        let batched = ddpm.batch_step_no_noise(e, &[t], x).unwrap();
        let diff = max_diff(&mean, &batched);
        prop_assert!(diff <= 1e-6, "{}", diff);
    }
}
