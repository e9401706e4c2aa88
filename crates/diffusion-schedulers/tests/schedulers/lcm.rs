//! LCM: diffusers' own tests (tests/schedulers/test_scheduler_lcm.py), its A1111 alias,
//! default config and bad input. Trajectory parity is in parity.rs with the other classes.

use anyhow::{Context, Result, ensure};
use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Error, TorchGenerator};
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, LCMScheduler, LCMSchedulerConfig, Scheduler, SchedulerKind,
    SchedulerSpec, SetTimesteps, StepOptions,
};

use crate::common::{dummy_sample_deter, fixtures, tensor};
use crate::golden::check;

fn full_loop(steps: usize) -> Result<Tensor<4>> {
    // get_scheduler_config() of the test: the defaults, spelled out there.
    let mut scheduler = LCMScheduler::new(LCMSchedulerConfig::default())?;
    scheduler.set_timesteps(steps)?;
    let mut x = dummy_sample_deter(false);
    // `torch.manual_seed(0)`: the default generator reseeded, i.e. a fresh one.
    let mut generator = TorchGenerator::new(0);
    for t in scheduler.timesteps().to_vec() {
        let residual = x.clone().mul_scalar(t).div_scalar(t + 1.0);
        x = scheduler
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
fn lcm_full_loops() -> Result<()> {
    check("lcm/full_loop_onestep", &full_loop(1)?, 18.7097, 0.0244)?;
    check("lcm/full_loop_multistep", &full_loop(10)?, 197.7616, 0.2575)
}

#[test]
fn lcm_timesteps() -> Result<()> {
    let mut s = LCMScheduler::new(LCMSchedulerConfig::default())?;
    // test_custom_timesteps.
    let custom = vec![100.0, 87.0, 50.0, 1.0, 0.0];
    s.set_timesteps_with(SetTimesteps::custom_timesteps(custom.clone()))?;
    ensure!(s.timesteps() == custom.as_slice() && s.custom_timesteps());
    // 4 of the 50 distillation timesteps 19, 39, ..., 999.
    s.set_timesteps(4)?;
    ensure!(
        s.timesteps() == [999.0, 759.0, 499.0, 259.0],
        "{:?}",
        s.timesteps()
    );
    s.set_timesteps(50)?;
    ensure!(s.timesteps()[49] == 19.0 && !s.custom_timesteps());
    Ok(())
}

#[test]
fn lcm_alias_default_config() -> Result<()> {
    let spec = SchedulerSpec::parse("LCM")?;
    ensure!(spec.kind == SchedulerKind::Lcm);
    let path = fixtures().join("configs/LCMScheduler/scheduler_config.json");
    let loaded = LCMScheduler::load(&path)?;
    ensure!(*loaded.config() == LCMSchedulerConfig::default());
    ensure!(loaded.config_file().unknown_keys().is_empty());
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    ensure!(loaded.config_value() == theirs, "{}", loaded.config_value());
    let converted = AnyScheduler::convert(&loaded, &SchedulerSpec::parse("Euler")?)?;
    ensure!(
        converted
            .config_value()
            .get("original_inference_steps")
            .is_none()
    );
    let back = AnyScheduler::convert(&converted, &spec)?;
    ensure!(back.as_lcm().context("lcm")?.config().beta_end == 0.012);
    Ok(())
}

#[test]
fn lcm_bad_input() {
    let sample = || tensor(vec![0.5f32; 2 * 3 * 2 * 2], [2, 3, 2, 2]);
    let name = |r: diffusion_core::Result<()>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        Err(Error::ConfigField { field, .. }) => field,
        other => format!("unexpected: {other:?}"),
    };
    let mut s = LCMScheduler::new(LCMSchedulerConfig::default()).unwrap();
    let r = s.step(sample(), 999.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "num_inference_steps");
    assert_eq!(name(s.set_timesteps(51)), "num_inference_steps");
    assert_eq!(name(s.set_timesteps(0)), "num_inference_steps");
    for bad in [vec![50.0, 100.0], vec![1000.0, 5.0], vec![99.5], vec![]] {
        assert_eq!(
            name(s.set_timesteps_with(SetTimesteps::custom_timesteps(bad))),
            "timesteps"
        );
    }
    s.set_timesteps(2).unwrap();
    let r = s.step(sample(), 998.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    // The first step re-noises: it needs noise.
    let r = s.step(sample(), 999.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "generator");
    let r = s.step(
        sample(),
        999.0,
        sample(),
        StepOptions::default().with_eta(0.0),
    );
    assert_eq!(name(r.map(|_| ())), "eta");
    let mut g = TorchGenerator::new(1);
    s.step(
        sample(),
        999.0,
        sample(),
        StepOptions::default().with_generator(&mut g),
    )
    .unwrap();
    // The last step returns the denoised sample, without noise.
    let out = s
        .step(sample(), 499.0, sample(), StepOptions::default())
        .unwrap();
    let denoised = out.pred_original_sample.expect("denoised");
    assert_eq!(
        crate::common::host(&out.prev_sample),
        crate::common::host(&denoised)
    );
    let r = s.step(sample(), 499.0, sample(), StepOptions::default());
    assert_eq!(name(r.map(|_| ())), "timestep");
    let r = LCMScheduler::new(LCMSchedulerConfig {
        original_inference_steps: 2000,
        ..Default::default()
    });
    assert_eq!(name(r.map(|_| ())), "original_inference_steps");
}
