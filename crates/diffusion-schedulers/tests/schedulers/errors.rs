//! Bad input gives typed errors that name what is wrong, never a panic.

use std::path::Path;

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{ConfigFile, Error, TorchGenerator};
use diffusion_schedulers::{
    AnyScheduler, DDIMScheduler, DDIMSchedulerConfig, DDPMScheduler, DDPMSchedulerConfig,
    Scheduler, SchedulerSpec, SetTimesteps, StepOptions, VarianceType,
};

use crate::common::{arg_name, field_name, tensor};

fn sample() -> Tensor<4> {
    tensor(
        (0..2 * 3 * 4 * 4).map(|i| i as f32 / 96.0 - 0.5).collect(),
        [2, 3, 4, 4],
    )
}

fn ddpm() -> DDPMScheduler {
    DDPMScheduler::new(DDPMSchedulerConfig::default()).expect("default config")
}

fn ddim() -> DDIMScheduler {
    DDIMScheduler::new(DDIMSchedulerConfig::default()).expect("default config")
}

#[test]
fn zero_and_too_many_steps() {
    assert_eq!(arg_name(ddpm().set_timesteps(0)), "num_inference_steps");
    assert_eq!(arg_name(ddim().set_timesteps(0)), "num_inference_steps");
    assert_eq!(arg_name(ddpm().set_timesteps(1001)), "num_inference_steps");
    assert_eq!(arg_name(ddim().set_timesteps(1001)), "num_inference_steps");
    assert!(ddim().set_timesteps(1000).is_ok());
}

#[test]
fn unknown_strings_in_configs_name_the_field() {
    for (key, value) in [
        ("beta_schedule", "cubic"),
        ("prediction_type", "noise"),
        ("timestep_spacing", "random"),
        ("variance_type", "other"),
    ] {
        let json = format!(r#"{{"_class_name": "DDPMScheduler", "{key}": "{value}"}}"#);
        let r = ConfigFile::<DDPMSchedulerConfig>::from_json_str(&json, Path::new("x.json"));
        assert_eq!(field_name(r), key);
    }
}

#[test]
fn schedules_a_class_does_not_have_are_refused() {
    // diffusers' DDIM raises NotImplementedError for sigmoid; DDPM has it.
    let r = ConfigFile::<DDIMSchedulerConfig>::from_json_str(
        r#"{"beta_schedule": "sigmoid"}"#,
        Path::new("x.json"),
    );
    assert_eq!(field_name(r), "beta_schedule");
    let r = DDIMScheduler::new(DDIMSchedulerConfig {
        prediction_type: diffusion_schedulers::PredictionType::FlowPrediction,
        ..Default::default()
    });
    assert_eq!(field_name(r), "prediction_type");
    assert!(
        ConfigFile::<DDPMSchedulerConfig>::from_json_str(
            r#"{"beta_schedule": "sigmoid"}"#,
            Path::new("x.json")
        )
        .is_ok()
    );
}

#[test]
fn impossible_values_are_refused() {
    let r = DDPMScheduler::new(DDPMSchedulerConfig {
        num_train_timesteps: 0,
        ..Default::default()
    });
    assert_eq!(field_name(r), "num_train_timesteps");
    let r = DDPMScheduler::new(DDPMSchedulerConfig {
        thresholding: true,
        dynamic_thresholding_ratio: 1.5,
        ..Default::default()
    });
    assert_eq!(field_name(r), "dynamic_thresholding_ratio");
    let r = DDIMScheduler::new(DDIMSchedulerConfig {
        trained_betas: Some(vec![0.1; 10]),
        ..Default::default()
    });
    assert_eq!(arg_name(r), "trained_betas");
}

#[test]
fn degenerate_zero_snr_rescaling_is_refused() {
    // alpha_bar underflows float32 long before t = 360 here; rescaling would divide 0 by 0.
    let r = DDIMScheduler::new(DDIMSchedulerConfig {
        num_train_timesteps: 360,
        beta_start: 0.002,
        beta_end: 0.47,
        rescale_betas_zero_snr: true,
        ..Default::default()
    });
    assert_eq!(arg_name(r), "rescale_betas_zero_snr");
}

#[test]
fn eta_on_ddpm_is_refused() {
    let mut s = ddpm();
    s.set_timesteps(10).unwrap();
    let t = s.timesteps()[0];
    let r = s.step(sample(), t, sample(), StepOptions::default().with_eta(0.5));
    assert_eq!(arg_name(r), "eta");
    let r = s.step(
        sample(),
        t,
        sample(),
        StepOptions::default().with_clipped_model_output(true),
    );
    assert_eq!(arg_name(r), "use_clipped_model_output");
}

#[test]
fn ddim_step_before_set_timesteps() {
    let r = ddim().step(sample(), 999.0, sample(), StepOptions::default());
    assert_eq!(arg_name(r), "num_inference_steps");
}

#[test]
fn timesteps_outside_the_schedule() {
    let mut s = ddim();
    s.set_timesteps(10).unwrap();
    for t in [1000.0, -1.0, 12.5, f64::NAN] {
        assert_eq!(
            arg_name(s.step(sample(), t, sample(), StepOptions::default())),
            "timestep"
        );
    }
    let mut s = ddpm();
    s.set_timesteps(10).unwrap();
    let mut g = TorchGenerator::new(0);
    let r = s.step(
        sample(),
        901.0,
        sample(),
        StepOptions::default().with_generator(&mut g),
    );
    assert_eq!(arg_name(r), "timestep");
}

#[test]
fn custom_timesteps() {
    let mut s = ddpm();
    for bad in [
        vec![100.0, 87.0, 50.0, 51.0, 0.0],
        vec![1000.0],
        vec![],
        vec![10.0, 5.5, 0.0],
    ] {
        let r = s.set_timesteps_with(SetTimesteps::custom_timesteps(bad));
        assert_eq!(arg_name(r), "timesteps");
    }
    let both = SetTimesteps {
        num_inference_steps: Some(5),
        timesteps: Some(vec![100.0, 0.0]),
        ..Default::default()
    };
    assert_eq!(arg_name(s.set_timesteps_with(both)), "timesteps");
    // DDIM takes no custom timesteps or sigmas; DDPM no sigmas.
    let r = ddim().set_timesteps_with(SetTimesteps::custom_timesteps(vec![10.0, 0.0]));
    assert_eq!(arg_name(r), "timesteps");
    let r = s.set_timesteps_with(SetTimesteps::custom_sigmas(vec![1.0, 0.0]));
    assert_eq!(arg_name(r), "sigmas");
    let r = s.set_timesteps_with(SetTimesteps::steps(5).with_mu(0.5));
    assert_eq!(arg_name(r), "mu");
}

#[test]
fn noise_must_be_explicit() {
    let mut s = ddpm();
    s.set_timesteps(10).unwrap();
    let t = s.timesteps()[0];
    assert_eq!(
        arg_name(s.step(sample(), t, sample(), StepOptions::default())),
        "generator"
    );
    // The last step adds no noise and needs no generator.
    assert!(
        s.step(sample(), 0.0, sample(), StepOptions::default())
            .is_ok()
    );

    let mut s = ddim();
    s.set_timesteps(10).unwrap();
    let opts = StepOptions::default().with_eta(0.5);
    assert_eq!(
        arg_name(s.step(sample(), 900.0, sample(), opts)),
        "generator"
    );
    let mut g = TorchGenerator::new(0);
    let opts = StepOptions::default()
        .with_eta(0.5)
        .with_generator(&mut g)
        .with_variance_noise(sample());
    assert_eq!(
        arg_name(s.step(sample(), 900.0, sample(), opts)),
        "variance_noise"
    );
    let wrong = tensor(vec![0.0; 3 * 4 * 4], [1, 3, 4, 4]);
    let opts = StepOptions::default()
        .with_eta(0.5)
        .with_variance_noise(wrong);
    assert_eq!(
        arg_name(s.step(sample(), 900.0, sample(), opts)),
        "variance_noise"
    );
    let opts = StepOptions::default().with_eta(-0.1);
    assert_eq!(arg_name(s.step(sample(), 900.0, sample(), opts)), "eta");
}

#[test]
fn per_image_generators_must_match_the_batch() {
    let mut s = ddpm();
    s.set_timesteps(10).unwrap();
    let mut gens = vec![TorchGenerator::new(0)];
    let r = s.step(
        sample(),
        900.0,
        sample(),
        StepOptions::default().with_generators(&mut gens),
    );
    assert_eq!(arg_name(r), "generator");
}

#[test]
fn mismatched_shapes() {
    let mut s = ddim();
    s.set_timesteps(10).unwrap();
    let other = tensor(vec![0.0; 2 * 3 * 4 * 5], [2, 3, 4, 5]);
    assert_eq!(
        arg_name(s.step(other.clone(), 900.0, sample(), StepOptions::default())),
        "model_output"
    );
    assert_eq!(arg_name(s.add_noise(sample(), other, &[10.0])), "noise");
    assert_eq!(
        arg_name(s.add_noise(sample(), sample(), &[10.0, 20.0, 30.0])),
        "timesteps"
    );
    assert_eq!(
        arg_name(s.get_velocity(sample(), sample(), &[1000.0])),
        "timestep"
    );
}

#[test]
fn learned_variance_needs_the_extra_channels() {
    let mut s = DDPMScheduler::new(DDPMSchedulerConfig {
        variance_type: VarianceType::Learned,
        ..Default::default()
    })
    .unwrap();
    s.set_timesteps(10).unwrap();
    let mut g = TorchGenerator::new(0);
    let r = s.step(
        sample(),
        900.0,
        sample(),
        StepOptions::default().with_generator(&mut g),
    );
    assert_eq!(arg_name(r), "model_output");
    // The refused step drew nothing: the generator is where a fresh one starts.
    assert_eq!(g.randn(&[4]), TorchGenerator::new(0).randn(&[4]));
}

#[test]
fn fixed_large_log_is_unsupported_not_nan() {
    let mut s = DDPMScheduler::new(DDPMSchedulerConfig {
        variance_type: VarianceType::FixedLargeLog,
        ..Default::default()
    })
    .unwrap();
    s.set_timesteps(10).unwrap();
    let mut g = TorchGenerator::new(0);
    let r = s.step(
        sample(),
        900.0,
        sample(),
        StepOptions::default().with_generator(&mut g),
    );
    assert!(
        matches!(r, Err(Error::Unsupported { ref field, .. }) if field == "variance_type"),
        "{r:?}"
    );
}

#[test]
fn unknown_scheduler_names() {
    match SchedulerSpec::parse("Euler b") {
        Err(Error::UnknownName { known, .. }) => assert!(known.contains("DDIMScheduler")),
        other => panic!("expected UnknownName, got {other:?}"),
    }
    let r = AnyScheduler::from_config_value(
        serde_json::json!({"num_train_timesteps": 10}),
        Path::new("scheduler_config.json"),
    );
    assert_eq!(field_name(r), "_class_name");
    let r = AnyScheduler::from_config_value(
        serde_json::json!({"_class_name": "KarrasVeScheduler"}),
        Path::new("scheduler_config.json"),
    );
    assert!(matches!(r, Err(Error::UnknownName { .. })), "{r:?}");
}

#[test]
fn thresholding_needs_a_batch_and_channel_axis() {
    let flat = tensor(vec![0.5; 8], [8]);
    let r = diffusion_schedulers::ops::threshold_sample(flat, 0.995, 1.0);
    assert_eq!(arg_name(r), "sample");
}

#[test]
fn begin_index_past_the_schedule() {
    let mut s = ddim();
    s.set_timesteps(10).unwrap();
    assert_eq!(arg_name(s.set_begin_index(10)), "begin_index");
    assert!(s.set_begin_index(9).is_ok());
}
