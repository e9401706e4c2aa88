//! A few dozen steps on a tiny model lower the loss on a fixed batch of digits.

use diffusion_core::burn::tensor::{Tensor, TensorData};
use diffusion_models::ModelMixin;
use diffusion_models::UNet2DModel;
use diffusion_train::run::step_draws;
use diffusion_train::{ImageDataset, LrScheduleKind, TrainConfig, Trainer, training_loss};

use crate::{device, fixtures};

/// The mean loss over fixed noise and timesteps (drawn with a seed the training never uses).
fn eval_loss(trainer: &Trainer, x0: &[f32], dims: [usize; 4]) -> f32 {
    let model = trainer.inference_model();
    let dev = device();
    let mut total = 0.0;
    for k in 0..4 {
        let draws = step_draws(1234, k, dims, 1000, false);
        let x = Tensor::<4>::from_data(TensorData::new(x0.to_vec(), dims), &dev);
        let noise = Tensor::<4>::from_data(TensorData::new(draws.noise, dims), &dev);
        let loss = training_loss(&model, trainer.scheduler(), x, noise, &draws.timesteps).unwrap();
        total += loss.into_scalar::<f32>();
    }
    total / 4.0
}

#[test]
fn training_lowers_the_loss_on_a_fixed_batch() {
    let ds = ImageDataset::from_digits_csv_gz(fixtures().join("digits_head.csv.gz"), 8).unwrap();
    let dims = ds.dims();
    let x0 = ds.batch(&(0..dims[0]).collect::<Vec<_>>(), &[]).unwrap();
    let config = TrainConfig {
        learning_rate: 2e-3,
        lr_scheduler: LrScheduleKind::Constant,
        show_progress: false,
        ..TrainConfig::default()
    };
    let ad = device().autodiff();
    // The fixture's architecture with fresh weights from burn's initialisers.
    let model_config = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &ad)
        .unwrap()
        .config()
        .clone();
    let model = UNet2DModel::new(&model_config, &ad).unwrap();
    let steps = 40;
    let mut trainer = Trainer::new(&config, model, steps, &ad).unwrap();
    let before = eval_loss(&trainer, &x0, dims);
    let mut losses = Vec::new();
    for step in 0..steps {
        let draws = step_draws(config.seed, step, dims, 1000, false);
        let x = Tensor::<4>::from_data(TensorData::new(x0.clone(), dims), &ad);
        let noise = Tensor::<4>::from_data(TensorData::new(draws.noise, dims), &ad);
        losses.push(trainer.step(x, noise, &draws.timesteps).unwrap().loss);
    }
    let after = eval_loss(&trainer, &x0, dims);
    assert!(
        after < 0.6 * before,
        "held-out loss went from {before} to {after}"
    );
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[steps - 10..].iter().sum::<f32>() / 10.0;
    assert!(last < first, "training losses {losses:?}");
}
