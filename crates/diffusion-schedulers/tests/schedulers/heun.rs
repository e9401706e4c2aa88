//! Heun: diffusers' own tests (tests/schedulers/test_scheduler_heun.py), its A1111 alias,
//! default config and bad input. Trajectory parity is in parity.rs with the other classes.

use anyhow::{Context, Result, ensure};
use diffusion_core::Error;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, EulerDiscreteScheduler, EulerDiscreteSchedulerConfig,
    HeunDiscreteScheduler, HeunDiscreteSchedulerConfig, PredictionType, Scheduler, SchedulerKind,
    SchedulerSpec, SetTimesteps, StepOptions,
};

use crate::common::{dummy_sample_deter, fixtures, host, max_abs, tensor};
use crate::golden_sigma::check;

fn test_config() -> HeunDiscreteSchedulerConfig {
    // get_scheduler_config() of test_scheduler_heun.py.
    HeunDiscreteSchedulerConfig {
        num_train_timesteps: 1100,
        beta_start: 0.0001,
        beta_end: 0.02,
        ..Default::default()
    }
}

/// diffusers' Heun test loop: the scaled sample replaces the sample.
fn heun_loop(
    config: HeunDiscreteSchedulerConfig,
    noise_at: Option<usize>,
    name: &str,
    sum: f64,
    mean: f64,
) -> Result<()> {
    let mut s = HeunDiscreteScheduler::new(config)?;
    s.set_timesteps(10)?;
    let mut x = dummy_sample_deter(false).mul_scalar(s.init_noise_sigma() as f32);
    let initial_scale = max_abs(&host(&x));
    let mut timesteps = s.timesteps().to_vec();
    if let Some(start) = noise_at {
        timesteps = timesteps[start * s.order()..].to_vec();
        x = s.add_noise(x, dummy_sample_deter(true), &timesteps[..1])?;
    }
    for t in timesteps {
        x = s.scale_model_input(x, t)?;
        let out = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = s.step(out, t, x, StepOptions::default())?.prev_sample;
    }
    check(name, &x, initial_scale, Some(sum), mean)
}

#[test]
fn heun_full_loop_no_noise() -> Result<()> {
    heun_loop(
        test_config(),
        None,
        "heun/full_loop_no_noise",
        0.1233,
        0.0002,
    )
}

#[test]
fn heun_full_loop_with_v_prediction() -> Result<()> {
    let config = HeunDiscreteSchedulerConfig {
        prediction_type: PredictionType::VPrediction,
        ..test_config()
    };
    heun_loop(
        config,
        None,
        "heun/full_loop_with_v_prediction",
        4.6934e-07,
        6.1112e-10,
    )
}

#[test]
fn heun_full_loop_karras_sigmas() -> Result<()> {
    let config = HeunDiscreteSchedulerConfig {
        use_karras_sigmas: true,
        ..test_config()
    };
    heun_loop(
        config,
        None,
        "heun/full_loop_device_karras_sigmas",
        0.00015,
        1.9869554535034695e-07,
    )
}

#[test]
fn heun_full_loop_with_noise() -> Result<()> {
    heun_loop(
        test_config(),
        Some(8),
        "heun/full_loop_with_noise",
        75074.8906,
        97.7538,
    )
}

#[test]
fn heun_custom_timesteps_equal_the_spaced_ones() -> Result<()> {
    // test_custom_timesteps: the distinct timesteps, passed back, give the same schedule.
    for spacing in ["linspace", "leading"] {
        let config: HeunDiscreteSchedulerConfig = serde_json::from_value(serde_json::json!({
            "num_train_timesteps": 1100, "beta_start": 0.0001, "beta_end": 0.02,
            "timestep_spacing": spacing,
        }))?;
        let mut spaced = HeunDiscreteScheduler::new(config.clone())?;
        spaced.set_timesteps(10)?;
        let ts = spaced.timesteps();
        let distinct: Vec<f64> = std::iter::once(ts[0])
            .chain(ts[1..].iter().step_by(2).copied())
            .collect();
        let mut custom = HeunDiscreteScheduler::new(config)?;
        custom.set_timesteps_with(SetTimesteps::custom_timesteps(distinct))?;
        ensure!(custom.timesteps() == spaced.timesteps(), "{spacing}");
        ensure!(custom.sigmas() == spaced.sigmas(), "{spacing}");
    }
    Ok(())
}

#[test]
fn heun_alias_default_config_and_conversion() -> Result<()> {
    let spec = SchedulerSpec::parse("heun")?;
    ensure!(spec.kind == SchedulerKind::Heun);
    let euler = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
        use_karras_sigmas: Some(true),
        steps_offset: 1,
        ..Default::default()
    })?;
    let heun = AnyScheduler::convert(&euler, &spec)?;
    let c = heun.as_heun().context("heun")?.config();
    ensure!(!c.use_karras_sigmas && c.steps_offset == 1);
    // Euler's Linear default betas carry over (Heun's own default is Stable Diffusion's).
    ensure!(c.beta_start == 0.0001);
    ensure!(heun.order() == 2);
    let path = fixtures().join("configs/HeunDiscreteScheduler/scheduler_config.json");
    let loaded = HeunDiscreteScheduler::load(&path)?;
    ensure!(*loaded.config() == HeunDiscreteSchedulerConfig::default());
    ensure!(loaded.config_file().unknown_keys().is_empty());
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    ensure!(loaded.config_value() == theirs, "{}", loaded.config_value());
    // Before set_timesteps the schedule is every training timestep, interleaved.
    ensure!(loaded.timesteps().len() == 2 * 1000 - 1);
    ensure!(loaded.sigmas().context("sigmas")?.len() == 2 * 1000);
    Ok(())
}

#[test]
fn heun_leading_offset_construction_does_not_fail() -> Result<()> {
    // diffusers' __init__ runs set_timesteps(num_train_timesteps) even where a leading
    // steps_offset pushes the first timestep past the table (Stable Diffusion's config).
    let mut s = HeunDiscreteScheduler::new(HeunDiscreteSchedulerConfig {
        timestep_spacing: diffusion_schedulers::TimestepSpacing::Leading,
        steps_offset: 1,
        ..Default::default()
    })?;
    s.set_timesteps(10)?;
    ensure!(s.timesteps()[0] == 901.0);
    Ok(())
}

#[test]
fn heun_bad_input() {
    let sample = || tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let name = |r: diffusion_core::Result<_>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        Err(Error::ConfigField { field, .. }) => field,
        other => format!("unexpected: {:?}", other.map(|_: ()| ())),
    };
    let mut s = HeunDiscreteScheduler::new(HeunDiscreteSchedulerConfig::default()).unwrap();
    assert_eq!(
        name(s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![1.0, 0.0]))),
        "sigmas"
    );
    assert_eq!(
        name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 1200.0]))),
        "timesteps"
    );
    assert_eq!(name(s.set_timesteps(0)), "num_inference_steps");
    let mut karras = HeunDiscreteScheduler::new(HeunDiscreteSchedulerConfig {
        use_karras_sigmas: true,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        name(karras.set_timesteps_with(SetTimesteps::custom_timesteps(vec![999.0, 10.0]))),
        "timesteps"
    );
    s.set_timesteps(2).unwrap();
    let r = s.step(
        sample(),
        s.timesteps()[0],
        sample(),
        StepOptions::default().with_eta(0.1),
    );
    assert_eq!(name(r.map(|_| ())), "eta");
    let r = s.step(sample(), 123.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    // Run the 3 evaluations, then one more is past the end.
    for t in s.timesteps().to_vec() {
        s.step(sample(), t, sample(), StepOptions::default())
            .unwrap();
    }
    let r = s.step(sample(), 0.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    for (key, value) in [
        ("beta_schedule", serde_json::json!("sigmoid")),
        ("prediction_type", serde_json::json!("flow_prediction")),
    ] {
        let r = AnyScheduler::build(
            SchedulerKind::Heun,
            serde_json::json!({ key: value }),
            std::path::Path::new("x"),
        );
        assert!(r.is_err(), "{key} = {value} was accepted");
    }
    let both = HeunDiscreteScheduler::new(HeunDiscreteSchedulerConfig {
        use_karras_sigmas: true,
        use_exponential_sigmas: true,
        ..Default::default()
    });
    assert_eq!(name(both.map(|_| ())), "use_exponential_sigmas");
}
