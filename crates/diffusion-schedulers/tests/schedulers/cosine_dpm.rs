//! CosineDPMSolverMultistepScheduler: default config file, conversion from other configs and
//! bad input. Trajectories with the Brownian increments given as `variance_noise` are checked
//! in extra.rs, with the torchsde-exact tree in cosine_tree.rs. diffusers' own test (tests/schedulers/test_scheduler_cosine_dpmsolver_multistep.py)
//! has no golden numbers: it only checks that a torchsde-seeded loop ends without NaN.

use anyhow::{Result, ensure};
use diffusion_core::TorchGenerator;
use diffusion_schedulers::scheduling_dpmsolver_multistep::SolverType;
use diffusion_schedulers::{
    AnyScheduler, ConfiguredScheduler, CosineDPMSolverMultistepScheduler,
    CosineDPMSolverMultistepSchedulerConfig, DDPMScheduler, PredictionType, Scheduler,
    SchedulerSpec, SetTimesteps, StepOptions,
};

use serde_json::Value;

use crate::common::{arg_name, field_name, host, tensor};
use crate::more::{comparable, default_config_file_in};

#[test]
fn default_config_file_matches_our_defaults() -> Result<()> {
    let path = default_config_file_in("extra", "CosineDPMSolverMultistepScheduler");
    let s = CosineDPMSolverMultistepScheduler::load(&path)?;
    ensure!(*s.config() == CosineDPMSolverMultistepSchedulerConfig::default());
    ensure!(s.config_file().unknown_keys().is_empty());
    // diffusers writes its integer default `sigma_max = 500` as `500`; we write `500.0`.
    ensure!(
        as_floats(comparable(s.config_value()))
            == as_floats(comparable(diffusion_core::config::read_json(&path)?))
    );
    ensure!((s.init_noise_sigma() - 250001f64.sqrt()).abs() < 1e-9);
    ensure!(s.timesteps().len() == 1000 && s.sigmas().is_some_and(|v| v.len() == 1001));
    Ok(())
}

/// Every number of a JSON object as a float.
fn as_floats(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| match v.as_f64() {
                    Some(f) => (k, Value::from(f)),
                    None => (k, v),
                })
                .collect(),
        ),
        other => other,
    }
}

/// diffusers' `from_config`: keys the class does not know are kept and ignored, UniPC's
/// solver names read as `midpoint`. A UniPC config carries `sigma_min`/`sigma_max` null, which
/// diffusers passes on and then fails on (`math.log(None)`); here that is a typed error.
#[test]
fn converts_from_other_configs() -> Result<()> {
    let ddpm = DDPMScheduler::new(Default::default())?;
    let spec = SchedulerSpec::parse("CosineDPMSolverMultistepScheduler")?;
    let unipc = AnyScheduler::convert(&ddpm, &SchedulerSpec::parse("UniPC")?)?;
    assert_eq!(
        field_name(AnyScheduler::convert(&unipc, &spec)),
        "sigma_max"
    );
    let mut spec = spec;
    spec.overrides.insert("sigma_min".into(), Value::from(0.3));
    spec.overrides
        .insert("sigma_max".into(), Value::from(500.0));
    let cosine = AnyScheduler::convert(&unipc, &spec)?;
    let cosine = cosine
        .as_cosine_dpm_solver_multistep()
        .ok_or_else(|| anyhow::anyhow!("not cosine"))?;
    ensure!(cosine.config().solver_type == SolverType::Midpoint);
    ensure!(cosine.config().prediction_type == PredictionType::Epsilon);
    Ok(())
}

#[test]
fn bad_input_is_refused() -> Result<()> {
    for (config, field) in [
        (
            CosineDPMSolverMultistepSchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..Default::default()
            },
            "prediction_type",
        ),
        (
            CosineDPMSolverMultistepSchedulerConfig {
                solver_order: 3,
                ..Default::default()
            },
            "solver_order",
        ),
        (
            CosineDPMSolverMultistepSchedulerConfig {
                sigma_min: 600.0,
                ..Default::default()
            },
            "sigma_min",
        ),
        (
            CosineDPMSolverMultistepSchedulerConfig {
                sigma_data: -1.0,
                ..Default::default()
            },
            "sigma_data",
        ),
    ] {
        assert_eq!(
            field_name(CosineDPMSolverMultistepScheduler::new(config)),
            field
        );
    }
    let mut s = CosineDPMSolverMultistepScheduler::new(Default::default())?;
    let x = tensor(vec![0.5f32; 16], [1, 1, 4, 4]);
    let noise =
        || StepOptions::default().with_variance_noise(tensor(vec![0.1f32; 16], [1, 1, 4, 4]));
    assert_eq!(
        arg_name(s.step(x.clone(), 0.5, x.clone(), noise())),
        "num_inference_steps"
    );
    assert_eq!(arg_name(s.set_timesteps(0)), "num_inference_steps");
    assert_eq!(
        arg_name(s.set_timesteps_with(SetTimesteps::custom_timesteps(vec![0.5]))),
        "timesteps"
    );
    s.set_timesteps(2)?;
    let t0 = s.timesteps()[0];
    // With a generator the increments come from a Brownian tree seeded by its initial seed
    // (cosine_tree.rs checks them against torchsde): the same seed gives the same step, another
    // seed another one; a generator list must have one generator per image. Without a
    // generator or variance_noise the step is refused.
    let with_seed = |seed: u64| -> Result<Vec<f32>> {
        let mut generator = TorchGenerator::new(seed);
        Ok(host(
            &s.clone()
                .step(
                    x.clone(),
                    t0,
                    x.clone(),
                    StepOptions::default().with_generator(&mut generator),
                )?
                .prev_sample,
        ))
    };
    ensure!(with_seed(0)? == with_seed(0)?);
    ensure!(with_seed(0)? != with_seed(1)?);
    let mut two = vec![TorchGenerator::new(0), TorchGenerator::new(1)];
    let options = StepOptions {
        generator: Some(diffusion_core::NoiseSource::PerImage(&mut two)),
        ..StepOptions::default()
    };
    assert_eq!(
        arg_name(s.clone().step(x.clone(), t0, x.clone(), options)),
        "generator"
    );
    assert_eq!(
        arg_name(s.step(x.clone(), t0, x.clone(), StepOptions::default())),
        "generator"
    );
    assert_eq!(
        arg_name(s.step(
            x.clone(),
            t0,
            x.clone(),
            StepOptions::default().with_variance_noise(tensor(vec![0.1f32; 4], [1, 1, 2, 2]))
        )),
        "variance_noise"
    );
    let y = s.step(x.clone(), t0, x.clone(), noise())?.prev_sample;
    ensure!(host(&y).iter().all(|v| v.is_finite()));
    s.step(x.clone(), t0, x.clone(), noise())?;
    assert_eq!(arg_name(s.step(x.clone(), t0, x, noise())), "timestep");
    Ok(())
}
