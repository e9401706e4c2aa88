//! DreamBooth with prior preservation on the tiny SD1 pipeline against train_dreambooth.py
//! (fixtures/oracle/gen_train_dreambooth_ti.py): the instance + class batch, the loss
//! `MSE(instance) + prior_loss_weight * MSE(class)`, every first-step gradient, two clipped
//! AdamW steps and every updated parameter.

use std::path::PathBuf;

use diffusion_core::weights::WeightSource;
use diffusion_models::{ModelMixin, UNet2DConditionModel, state_dict};
use diffusion_train::{
    DreamBoothConfig, DreamBoothTrainer, LrScheduleKind, NoiseDraws, TextToImageConfig,
    load_noise_scheduler,
};
use serde_json::Value;

use crate::{compare_to_fixture as worst, device, fixtures, number as f, sd1, tensor};

const TOL: f32 = 1e-5;

fn root() -> PathBuf {
    fixtures().join("dreambooth")
}

#[test]
fn dreambooth_prior_preservation_steps_match_diffusers() {
    check_prior_preservation_steps(0);
}

/// Over two devices, each with one instance row and its class row (DDP's layout), the steps
/// still match diffusers' single-process steps on the whole batch.
#[test]
fn dreambooth_prior_preservation_over_two_devices_matches_diffusers() {
    check_prior_preservation_steps(2);
}

/// The fixture's steps on one device (`devices` 0) or data-parallel over `devices` handles.
fn check_prior_preservation_steps(devices: usize) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap()).unwrap();
    let hp = &expected["hyperparameters"];
    let results = &expected["results"];
    let source = WeightSource::open(root().join("steps.safetensors")).unwrap();
    let dev = device();
    let config = DreamBoothConfig {
        instance_prompt: hp["instance_prompt"].as_str().unwrap().into(),
        class_prompt: Some(hp["class_prompt"].as_str().unwrap().into()),
        class_data_dir: Some(fixtures().join("text_to_image/data")),
        with_prior_preservation: true,
        prior_loss_weight: f(&hp["prior_loss_weight"]),
        train: TextToImageConfig {
            pretrained_model: sd1(),
            learning_rate: f(&hp["learning_rate"]),
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 0,
            adam_beta1: f(&hp["adam_beta1"]),
            adam_beta2: f(&hp["adam_beta2"]),
            adam_weight_decay: f(&hp["adam_weight_decay"]),
            adam_epsilon: f(&hp["adam_epsilon"]),
            max_grad_norm: Some(f(&hp["max_grad_norm"])),
            show_progress: false,
            ..DreamBoothConfig::default().train
        },
        ..DreamBoothConfig::default()
    };
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    let steps = hp["steps"].as_u64().unwrap() as usize;
    let mut trainer = DreamBoothTrainer::new(&config, unet, None, scheduler, steps, &dev).unwrap();
    let latents = tensor::<4>(&source, "latents", &dev);
    let states = tensor::<3>(&source, "encoder_hidden_states", &dev);
    let draws = |s: usize| {
        let (t, _) = source.read_f32(&format!("timesteps/{s}")).unwrap();
        NoiseDraws {
            noise: tensor(&source, &format!("noise/{s}"), &dev),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        }
    };

    let loss = trainer
        .loss(latents.clone(), states.clone(), &draws(0))
        .unwrap();
    let grads = trainer.inner().gradients(loss);
    let (key, d) = worst(&grads.state_dict(trainer.inner().unet()), &source, "grad0");
    eprintln!("dreambooth: worst first-step gradient difference {d:e} (`{key}`)");
    assert!(d <= TOL, "gradient of `{key}` differs by {d}");
    let mut max_err = d;
    let mut parallel =
        (devices > 0).then(|| trainer.data_parallel(vec![dev.clone(); devices]).unwrap());
    for s in 0..steps {
        let stats = match &mut parallel {
            Some(p) => trainer.step_data_parallel(p, latents.clone(), states.clone(), &draws(s)),
            None => trainer.step(latents.clone(), states.clone(), &draws(s)),
        }
        .unwrap()
        .unwrap();
        let want = f(&results["losses"][s]);
        let d = (f64::from(stats.loss) - want).abs() as f32;
        eprintln!("dreambooth step {s}: loss {} (diff {d:e})", stats.loss);
        assert!(d <= TOL, "step {s}: loss {} vs {want}", stats.loss);
        let want = f(&results["grad_norms"][s]);
        let d = (f64::from(stats.grad_norm) - want).abs() as f32;
        assert!(
            d <= TOL,
            "step {s}: grad norm {} vs {want}",
            stats.grad_norm
        );
        max_err = max_err.max(d);
    }
    let (key, d) = worst(&state_dict(trainer.inner().unet()), &source, "param");
    eprintln!("dreambooth: worst parameter difference after the steps {d:e} (`{key}`)");
    assert!(d <= TOL, "`{key}` differs by {d}");
    eprintln!("dreambooth: worst difference {:e}", max_err.max(d));
}
