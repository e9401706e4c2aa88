//! LMS: diffusers' own tests (tests/schedulers/test_scheduler_lms.py), the integrated
//! coefficients, its A1111 aliases, default config and bad input. Trajectory parity is in
//! parity.rs with the other classes.

use anyhow::{Context, Result, ensure};
use diffusion_core::Error;
use diffusion_schedulers::scheduling_lms_discrete::lms_coefficient;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, LMSDiscreteScheduler, LMSDiscreteSchedulerConfig,
    PNDMScheduler, PNDMSchedulerConfig, PredictionType, Scheduler, SchedulerKind, SchedulerSpec,
    SetTimesteps, StepOptions,
};

use crate::common::{dummy_sample_deter, fixtures, host, max_abs, read_json, tensor};
use crate::golden_sigma::check;

fn test_config() -> LMSDiscreteSchedulerConfig {
    // get_scheduler_config() of test_scheduler_lms.py.
    LMSDiscreteSchedulerConfig {
        num_train_timesteps: 1100,
        ..Default::default()
    }
}

fn lms_loop(config: LMSDiscreteSchedulerConfig, name: &str, sum: f64, mean: f64) -> Result<()> {
    let mut s = LMSDiscreteScheduler::new(config)?;
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false).mul_scalar(s.init_noise_sigma() as f32);
    let initial_scale = max_abs(&host(&x));
    for t in s.timesteps().to_vec() {
        x = s.scale_model_input(x, t)?;
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    check(name, &x, initial_scale, Some(sum), mean)
}

#[test]
fn lms_full_loop_no_noise() -> Result<()> {
    lms_loop(test_config(), "lms/full_loop_no_noise", 1006.388, 1.31)
}

#[test]
fn lms_full_loop_with_v_prediction() -> Result<()> {
    let config = LMSDiscreteSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..test_config()
    };
    lms_loop(
        config,
        "lms/full_loop_with_v_prediction",
        0.0017,
        2.2676e-06,
    )
}

/// diffusers' coefficients on diffusers' float32 sigmas (ours can differ from those by an ulp
/// of torch's CPU sqrt, which moves a coefficient by ~1e-7; that part is covered by the
/// trajectories in parity.rs).
#[test]
fn lms_coefficients_equal_diffusers_quadrature() -> Result<()> {
    let groups = read_json("lms_coefficients.json")?;
    let (mut n, mut worst, mut f32_equal) = (0usize, 0f64, 0usize);
    for group in groups.as_array().context("groups")? {
        let sigmas: Vec<f64> = group["sigmas"]
            .as_array()
            .context("sigmas")?
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        for entry in group["coefficients"].as_array().context("coefficients")? {
            let v = |i: usize| entry[i].as_f64().context("entry");
            let ours = lms_coefficient(&sigmas, v(0)? as usize, v(1)? as usize, v(2)? as usize);
            let theirs = v(3)?;
            let err = (ours - theirs).abs() / theirs.abs().max(1e-300);
            ensure!(
                err <= 1e-10,
                "{entry} ({}): ours {ours}, relative error {err:e}",
                group["config"]
            );
            worst = worst.max(err);
            f32_equal += usize::from(ours as f32 == theirs as f32);
            n += 1;
        }
    }
    ensure!(n >= 100, "too few coefficients");
    // What scales the derivatives is the float32 coefficient: all of them are equal.
    ensure!(f32_equal == n, "{f32_equal} of {n} equal in float32");
    eprintln!("{n} LMS coefficients, worst relative error {worst:e}");
    Ok(())
}

#[test]
fn lms_coefficients_integrate_the_lagrange_basis() {
    // Order 1 is the Euler step: the integral of 1 over [sigma_t, sigma_{t+1}].
    let sigmas = [14.6, 9.0, 5.5, 3.0, 1.2, 0.0];
    let f32_interval = |a: f64, b: f64| f64::from(b as f32) - f64::from(a as f32);
    assert_eq!(lms_coefficient(&sigmas, 1, 0, 0), f32_interval(14.6, 9.0));
    // The basis polynomials sum to 1, so the weights sum to the interval length.
    for (order, t) in [(2, 1), (3, 2), (4, 3), (4, 4)] {
        let total: f64 = (0..order)
            .map(|j| lms_coefficient(&sigmas, order, t, j))
            .sum();
        // Up to the float32 evaluation of the integrand.
        let length = f32_interval(sigmas[t], sigmas[t + 1]);
        assert!(
            (total - length).abs() < 1e-6 * length.abs(),
            "order {order} at {t}: {total}"
        );
    }
    // Order 2 by hand: integral of (tau - s_{t-1}) / (s_t - s_{t-1}) over [s_t, s_{t+1}].
    let (a, b, p) = (sigmas[1], sigmas[2], sigmas[0]);
    let exact = ((b - p).powi(2) - (a - p).powi(2)) / (2.0 * (a - p));
    assert!((lms_coefficient(&sigmas, 2, 1, 0) - exact).abs() < 1e-6 * exact.abs());
}

#[test]
fn lms_aliases_default_config_and_conversion() -> Result<()> {
    let karras = SchedulerSpec::parse("LMS Karras")?;
    ensure!(karras.kind == SchedulerKind::Lms);
    ensure!(karras.overrides["use_karras_sigmas"] == true);
    ensure!(SchedulerSpec::parse("lms")?.overrides["use_karras_sigmas"] == false);
    let pndm = PNDMScheduler::new(PNDMSchedulerConfig {
        beta_start: 0.00085,
        beta_end: 0.012,
        skip_prk_steps: true,
        ..Default::default()
    })?;
    let lms = AnyScheduler::convert(&pndm, &karras)?;
    let c = lms.as_lms().context("lms")?.config();
    ensure!(c.use_karras_sigmas && c.beta_end == 0.012);
    ensure!(lms.config_value().get("skip_prk_steps").is_none());
    let path = fixtures().join("configs/LMSDiscreteScheduler/scheduler_config.json");
    let loaded = LMSDiscreteScheduler::load(&path)?;
    ensure!(*loaded.config() == LMSDiscreteSchedulerConfig::default());
    ensure!(loaded.config_file().unknown_keys().is_empty());
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    ensure!(loaded.config_value() == theirs, "{}", loaded.config_value());
    ensure!(loaded.timesteps().len() == 1000);
    Ok(())
}

#[test]
fn lms_bad_input() {
    let sample = || tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let name = |r: diffusion_core::Result<()>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        Err(Error::ConfigField { field, .. }) => field,
        other => format!("unexpected: {other:?}"),
    };
    let mut s = LMSDiscreteScheduler::new(LMSDiscreteSchedulerConfig::default()).unwrap();
    assert_eq!(
        name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 10.0]))),
        "timesteps"
    );
    assert_eq!(name(s.set_timesteps(1001)), "num_inference_steps");
    s.set_timesteps(2).unwrap();
    let t0 = s.timesteps()[0];
    let r = s.step(sample(), t0, sample(), StepOptions::default().with_eta(0.1));
    assert_eq!(name(r.map(|_| ())), "eta");
    let r = s.step(sample(), 3.5, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    s.step(sample(), t0, sample(), StepOptions::default())
        .unwrap();
    // A sample shaped unlike the stored derivatives.
    let other = || tensor(vec![0.5f32; 2 * 3 * 2 * 3], [2, 3, 2, 3]);
    let r = s.step(other(), s.timesteps()[1], other(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "sample");
    s.step(sample(), s.timesteps()[1], sample(), StepOptions::default())
        .unwrap();
    let r = s.step(sample(), 0.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    for (key, value) in [
        ("beta_schedule", serde_json::json!("exp")),
        ("prediction_type", serde_json::json!("flow_prediction")),
    ] {
        let r = AnyScheduler::build(
            SchedulerKind::Lms,
            serde_json::json!({ key: value }),
            std::path::Path::new("x"),
        );
        assert!(r.is_err(), "{key} = {value} was accepted");
    }
}
