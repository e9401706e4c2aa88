//! The flow-matching objective against diffusers (fixtures/oracle/gen_train_flow_matching.py):
//! density sampling and loss weighting on the same draws, the training schedule of
//! FlowMatchEulerDiscreteScheduler (shift 1 and 3) and the SD3 script's sigma lookup, and two
//! full fine-tuning steps of the tiny SD1 UNet with the SD3 script's loss (loss, gradient norm,
//! every gradient of the first step, every parameter after the steps).

use std::path::PathBuf;

use diffusion_core::weights::WeightSource;
use diffusion_core::{Error, TorchGenerator};
use diffusion_models::{ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_schedulers::FlowMatchEulerDiscreteSchedulerConfig;
use diffusion_train::flow_matching::{
    compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, density_from_draws,
};
use diffusion_train::{
    FlowMatchingConfig, FlowMatchingSchedule, LrScheduleKind, NoiseDraws, TextToImageConfig,
    TextToImageTrainer, WeightingScheme, load_noise_scheduler,
};
use serde_json::Value;

use crate::{
    compare_to_fixture as compare, copy_dir, device, fixtures, max_abs_diff, number as f, sd1,
    tensor,
};

const TOL: f32 = 1e-5;
const PART_TOL: f32 = 1e-6;

fn root() -> PathBuf {
    fixtures().join("flow_matching")
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join(name)).unwrap()).unwrap()
}

fn read(source: &WeightSource, key: &str) -> Vec<f32> {
    source
        .read_f32(key)
        .unwrap_or_else(|e| panic!("fixture tensor `{key}`: {e}"))
        .0
}

/// Largest difference relative to `max(1, |expected|)`.
fn max_rel_diff(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "length mismatch");
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn scheme_config(scheme: WeightingScheme, meta: &Value) -> FlowMatchingConfig {
    FlowMatchingConfig {
        weighting_scheme: scheme,
        logit_mean: meta["logit_mean"].as_f64().unwrap_or(0.0),
        logit_std: meta["logit_std"].as_f64().unwrap_or(1.0),
        mode_scale: meta["mode_scale"].as_f64().unwrap_or(1.29),
        precondition_outputs: true,
    }
}

#[test]
fn loss_weighting_matches_diffusers() {
    let source = WeightSource::open(root().join("parts.safetensors")).unwrap();
    let sigmas = read(&source, "weighting/sigmas");
    for scheme in [
        WeightingScheme::SigmaSqrt,
        WeightingScheme::Cosmap,
        WeightingScheme::None,
    ] {
        let ours = compute_loss_weighting_for_sd3(scheme, &sigmas);
        let theirs = read(&source, &format!("weighting/{}", scheme.as_str()));
        let d = max_rel_diff(&ours, &theirs);
        eprintln!(
            "weighting {}: max relative difference {d:e}",
            scheme.as_str()
        );
        assert!(d <= PART_TOL, "{}: {ours:?} vs {theirs:?}", scheme.as_str());
    }
}

#[test]
fn density_sampling_matches_diffusers() {
    let source = WeightSource::open(root().join("parts.safetensors")).unwrap();
    let meta = json("parts.json");
    for (name, scheme) in [
        ("logit_normal", WeightingScheme::LogitNormal),
        ("mode", WeightingScheme::Mode),
        ("uniform", WeightingScheme::None),
    ] {
        let config = scheme_config(scheme, &meta["density"][name]);
        let draws = read(&source, &format!("density/{name}/draws"));
        let want = read(&source, &format!("density/{name}/u"));
        let d = max_abs_diff(&density_from_draws(&config, &draws), &want);
        eprintln!("density {name} from torch's draws: max difference {d:e}");
        assert!(
            d <= PART_TOL,
            "{name}: density from injected draws differs by {d}"
        );
        // Our generator makes the same draws from the same seed.
        let ours =
            compute_density_for_timestep_sampling(&config, want.len(), &mut TorchGenerator::new(5));
        let d = max_abs_diff(&ours, &want);
        eprintln!("density {name} from our generator: max difference {d:e}");
        assert!(d <= PART_TOL, "{name}: seeded density differs by {d}");
    }
}

#[test]
fn training_schedule_and_sigma_lookup_match_diffusers() {
    let source = WeightSource::open(root().join("parts.safetensors")).unwrap();
    for shift in [1.0, 3.0] {
        let key = format!("schedule/shift{}", shift as u32);
        let schedule = FlowMatchingSchedule::new(FlowMatchEulerDiscreteSchedulerConfig {
            shift,
            ..FlowMatchEulerDiscreteSchedulerConfig::default()
        })
        .unwrap();
        let d_t = max_rel_diff(
            &schedule.timesteps,
            &read(&source, &format!("{key}/timesteps")),
        );
        let d_s = max_abs_diff(&schedule.sigmas, &read(&source, &format!("{key}/sigmas")));
        eprintln!("shift {shift}: timesteps {d_t:e} (relative), sigmas {d_s:e}");
        assert!(
            d_t <= PART_TOL && d_s <= PART_TOL,
            "shift {shift}: schedule differs"
        );
        let indices = schedule
            .indices(&read(&source, &format!("{key}/u")))
            .unwrap();
        let want: Vec<usize> = read(&source, &format!("{key}/indices"))
            .iter()
            .map(|&v| v as usize)
            .collect();
        assert_eq!(indices, want, "shift {shift}: indices");
        let ts = schedule.timesteps_at(&indices).unwrap();
        assert_eq!(
            ts,
            read(&source, &format!("{key}/timesteps_at")),
            "shift {shift}"
        );
        let sigmas = schedule.sigmas_for_timesteps(&ts).unwrap();
        assert_eq!(
            sigmas,
            read(&source, &format!("{key}/sigmas_at")),
            "shift {shift}"
        );
    }
    let schedule =
        FlowMatchingSchedule::new(FlowMatchEulerDiscreteSchedulerConfig::default()).unwrap();
    assert!(
        matches!(schedule.indices(&[1.0]), Err(Error::InvalidArgument { name, .. }) if name == "u")
    );
    assert!(matches!(
        schedule.sigmas_for_timesteps(&[0.5]),
        Err(Error::InvalidArgument { name, .. }) if name == "timesteps"
    ));
}

/// The run of case `name`: full fine-tuning, the case's model folder (only its scheduler) for
/// the flow schedule.
fn config(hp: &Value, case: &Value, name: &str) -> TextToImageConfig {
    TextToImageConfig {
        pretrained_model: root().join(name),
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        adam_beta1: f(&hp["adam_beta1"]),
        adam_beta2: f(&hp["adam_beta2"]),
        adam_weight_decay: f(&hp["adam_weight_decay"]),
        adam_epsilon: f(&hp["adam_epsilon"]),
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        flow_matching: Some(FlowMatchingConfig {
            weighting_scheme: WeightingScheme::parse(case["weighting_scheme"].as_str().unwrap())
                .unwrap(),
            logit_mean: f(&case["logit_mean"]),
            logit_std: f(&case["logit_std"]),
            mode_scale: f(&case["mode_scale"]),
            precondition_outputs: case["precondition_outputs"].as_bool().unwrap(),
        }),
        show_progress: false,
        ..TextToImageConfig::default()
    }
}

fn trainer(config: &TextToImageConfig, steps: usize) -> Result<TextToImageTrainer, Error> {
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &device()).unwrap();
    let scheduler = load_noise_scheduler(&config.pretrained_model).unwrap();
    TextToImageTrainer::new(config, unet, None, scheduler, steps, &device())
}

/// Case `name` on one device (`devices` 0) or data-parallel over `devices` CPU handles.
fn check_case(name: &str, devices: usize) {
    let expected = json("steps.json");
    let (hp, case) = (&expected["hyperparameters"], &expected["cases"][name]);
    let results = &expected["results"][name];
    let steps = case["steps"].as_u64().unwrap() as usize;
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let t2i = WeightSource::open(fixtures().join("text_to_image/steps.safetensors")).unwrap();
    let latents = tensor::<4>(&t2i, "latents", &device());
    let states = tensor::<3>(&t2i, "encoder_hidden_states", &device());
    let mut trainer = trainer(&config(hp, case, name), steps).unwrap();
    let flow = trainer
        .flow_matching()
        .expect("a flow-matching run")
        .clone();
    let draws = |s: usize| {
        let u = read(&source, &format!("{name}/u/{s}"));
        let indices = flow.schedule.indices(&u).unwrap();
        let want: Vec<usize> = read(&source, &format!("{name}/indices/{s}"))
            .iter()
            .map(|&v| v as usize)
            .collect();
        assert_eq!(indices, want, "{name} step {s}: indices");
        NoiseDraws {
            noise: tensor(&source, &format!("{name}/noise/{s}"), &device()),
            offset_noise: None,
            perturbation: None,
            timesteps: indices,
        }
    };

    let loss = trainer
        .loss(latents.clone(), states.clone(), &draws(0))
        .unwrap();
    let grads = trainer.gradients(loss);
    let (key, diff) = compare(
        &grads.state_dict(trainer.unet()),
        &source,
        &format!("{name}/grad0"),
    );
    eprintln!("{name}: worst gradient difference {diff:e} (`{key}`)");
    assert!(diff <= TOL, "{name}: gradient of `{key}` differs by {diff}");

    let mut parallel =
        (devices > 0).then(|| trainer.data_parallel(vec![device(); devices]).unwrap());
    for s in 0..steps {
        let stats = match &mut parallel {
            Some(p) => trainer.step_data_parallel(p, latents.clone(), states.clone(), &draws(s)),
            None => trainer.step(latents.clone(), states.clone(), &draws(s)),
        }
        .unwrap()
        .expect("every micro-batch is a step");
        let want = f(&results["losses"][s]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!(
            "{name} step {s}: loss {} (diffusers {want}, diff {d:e})",
            stats.loss
        );
        assert!(d <= TOL, "{name} step {s}: loss {} vs {want}", stats.loss);
        let want = f(&results["grad_norms"][s]);
        let d = (f64::from(stats.grad_norm) - want).abs() as f32;
        eprintln!("{name} step {s}: grad norm diff {d:e}");
        assert!(
            d <= TOL,
            "{name} step {s}: grad norm {} vs {want}",
            stats.grad_norm
        );
    }
    let (key, diff) = compare(
        &state_dict(trainer.unet()),
        &source,
        &format!("{name}/param"),
    );
    eprintln!("{name}: worst parameter difference after the steps {diff:e} (`{key}`)");
    assert!(diff <= TOL, "{name}: `{key}` differs by {diff}");
}

#[test]
fn full_steps_shift1_logit_normal_preconditioned_match_diffusers() {
    check_case("shift1_logit_normal", 0);
}

/// The flow-matching loss (not the DDPM one) on every device of a data-parallel run.
#[test]
fn full_steps_over_two_devices_match_diffusers() {
    check_case("shift1_logit_normal", 2);
}

#[test]
fn full_steps_shift3_cosmap_match_diffusers() {
    check_case("shift3_cosmap", 0);
}

#[test]
fn flow_folder_turns_the_objective_on_and_refuses_ddpm_only_settings() {
    let expected = json("steps.json");
    let hp = &expected["hyperparameters"];
    let case = &expected["cases"]["shift3_cosmap"];
    // The folder's scheduler alone selects the objective, with the SD3 script's defaults.
    let plain = TextToImageConfig {
        flow_matching: None,
        ..config(hp, case, "shift3_cosmap")
    };
    let t = trainer(&plain, 1).unwrap();
    let flow = t
        .flow_matching()
        .expect("FlowMatchEulerDiscreteScheduler folder");
    assert_eq!(flow.config, FlowMatchingConfig::default());
    assert_eq!(flow.schedule.len(), 1000);
    // Not for the DDPM folders of the other tests.
    let ddpm = TextToImageConfig {
        pretrained_model: sd1(),
        flow_matching: None,
        ..plain.clone()
    };
    assert!(trainer(&ddpm, 1).unwrap().flow_matching().is_none());
    for (bad, field) in [
        (
            TextToImageConfig {
                snr_gamma: Some(5.0),
                ..plain.clone()
            },
            "snr_gamma",
        ),
        (
            TextToImageConfig {
                noise_offset: 0.1,
                ..plain.clone()
            },
            "noise_offset",
        ),
        (
            TextToImageConfig {
                prediction_type: Some(diffusion_schedulers::PredictionType::VPrediction),
                ..plain.clone()
            },
            "prediction_type",
        ),
        (
            TextToImageConfig {
                flow_matching: Some(FlowMatchingConfig {
                    logit_std: 0.0,
                    ..FlowMatchingConfig::default()
                }),
                ..plain.clone()
            },
            "logit_std",
        ),
    ] {
        match trainer(&bad, 1) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, field),
            other => panic!("{field}: expected an InvalidArgument, got {other:?}"),
        }
    }
    assert!(matches!(
        WeightingScheme::parse("uniform"),
        Err(Error::InvalidArgument { name, .. }) if name == "weighting_scheme"
    ));
}

/// `train_text_to_image` on the tiny SD1 folder with a FlowMatchEulerDiscreteScheduler (shift 3)
/// trains with the flow objective (logit-normal draws from the run's generator), differs from
/// the same run on the DDIM folder, and resumes exactly from a checkpoint.
#[test]
fn text_to_image_run_on_a_flow_folder_resumes_exactly() {
    let model = tempfile::tempdir().unwrap();
    copy_dir(&sd1(), model.path());
    std::fs::copy(
        root().join("shift3_cosmap/scheduler/scheduler_config.json"),
        model.path().join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    let config = |pretrained: &std::path::Path, out: &std::path::Path| TextToImageConfig {
        pretrained_model: pretrained.to_path_buf(),
        train_data_dir: fixtures().join("text_to_image/data"),
        output_dir: out.to_path_buf(),
        resolution: 32,
        train_batch_size: 2,
        max_train_steps: Some(3),
        learning_rate: 1e-3,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        checkpointing_steps: 2,
        show_progress: false,
        ..TextToImageConfig::default()
    };
    let out = tempfile::tempdir().unwrap();
    let flow =
        diffusion_train::train_text_to_image(&config(model.path(), out.path()), &device()).unwrap();
    let losses = flow.losses();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let ddpm_out = tempfile::tempdir().unwrap();
    let ddpm =
        diffusion_train::train_text_to_image(&config(&sd1(), ddpm_out.path()), &device()).unwrap();
    assert_ne!(
        ddpm.losses(),
        losses,
        "the flow folder trained the DDPM objective"
    );
    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(
        &out.path().join("checkpoint-2"),
        &resumed_dir.path().join("checkpoint-2"),
    );
    let resumed = diffusion_train::train_text_to_image(
        &TextToImageConfig {
            resume_from_checkpoint: Some("latest".into()),
            ..config(model.path(), resumed_dir.path())
        },
        &device(),
    )
    .unwrap();
    assert_eq!(resumed.start_step, 2);
    assert_eq!(resumed.losses(), losses[2..].to_vec());
}
