//! Mixed precision (`fp16`/`bf16`): the loss scaler against `torch.amp.GradScaler`
//! (fixtures/oracle/gen_train_grad_scaler.py), a half-precision step against the f32 step,
//! a forced fp16 overflow, and exact resumption.

use std::path::Path;

use diffusion_core::burn::tensor::{DType, Tensor, TensorData};
use diffusion_core::weights::SafetensorsFile;
use diffusion_core::weights::WeightSource;
use diffusion_models::UNet2DConditionModel;
use diffusion_models::{ModelMixin, UNet2DModel, state_dict};
use diffusion_train::mixed_precision::{half_copy, param_dtypes};
use diffusion_train::{
    FlatGradients, GradScaler, GradScalerConfig, ImageDataset, LoraTrainConfig, LrScheduleKind,
    MixedPrecision, NoiseDraws, TextToImageConfig, TextToImageTrainer, TrainConfig, Trainer,
    UNetLora, load_noise_scheduler, train_text_to_image, train_unconditional, training_loss,
};
use serde_json::Value;

use crate::{copy_dir, device, fixtures, sd1, tensor};

fn num(v: &Value) -> f32 {
    match v {
        Value::String(s) => match s.as_str() {
            "inf" => f32::INFINITY,
            "-inf" => f32::NEG_INFINITY,
            "nan" => f32::NAN,
            other => panic!("bad number {other}"),
        },
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32,
    }
}

fn nums(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(num).collect()
}

/// Equal as IEEE values, with NaN equal to NaN.
fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits())
}

#[test]
fn grad_scaler_matches_torch() {
    let text = std::fs::read_to_string(fixtures().join("grad_scaler/sequences.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let dev = device();
    let mut checked = 0;
    let mut skipped = 0;
    for name in ["interval3", "growth_overflow", "odd_factors"] {
        let seq = &all[name];
        let s = &seq["settings"];
        let mut scaler = GradScaler::new(GradScalerConfig {
            init_scale: s["init_scale"].as_f64().unwrap(),
            growth_factor: s["growth_factor"].as_f64().unwrap(),
            backoff_factor: s["backoff_factor"].as_f64().unwrap(),
            growth_interval: s["growth_interval"].as_u64().unwrap() as u32,
        })
        .unwrap();
        for (i, step) in seq["steps"].as_array().unwrap().iter().enumerate() {
            let at = format!("{name} step {i}");
            assert_eq!(scaler.scale(), num(&step["scale_before"]), "{at}: scale");
            // What the backward of the scaled loss leaves in `.grad`: wanted * scale in f32.
            let scaled: Vec<f32> = nums(&step["wanted"])
                .iter()
                .map(|g| g * scaler.scale())
                .collect();
            assert!(same(&scaled, &nums(&step["scaled"])), "{at}: {scaled:?}");
            let n = scaled.len();
            let mut grads = FlatGradients::from_tensors(vec![
                Some(Tensor::<1>::from_data(TensorData::new(scaled, [n]), &dev)),
                None,
            ]);
            let found_inf = scaler.unscale(&mut grads);
            assert_eq!(found_inf, step["found_inf"].as_bool().unwrap(), "{at}");
            // torch skips optimizer.step exactly when found_inf; so does the trainer.
            assert_eq!(found_inf, step["skipped"].as_bool().unwrap(), "{at}");
            let unscaled = diffusion_core::tensor::to_vec(grads.tensors()[0].clone().unwrap());
            assert!(
                same(&unscaled, &nums(&step["unscaled"])),
                "{at}: unscaled {unscaled:?}"
            );
            scaler.update(found_inf);
            assert_eq!(scaler.scale(), num(&step["scale_after"]), "{at}: new scale");
            assert_eq!(
                u64::from(scaler.growth_tracker()),
                step["growth_tracker"].as_u64().unwrap(),
                "{at}: growth tracker"
            );
            checked += 1;
            skipped += usize::from(found_inf);
        }
    }
    assert_eq!((checked, skipped), (28, 7));
}

fn steps_source() -> WeightSource {
    WeightSource::open(fixtures().join("steps.safetensors")).unwrap()
}

fn timesteps0(source: &WeightSource) -> Vec<usize> {
    let (values, _) = source.read_f32("timesteps/0").unwrap();
    values.iter().map(|&t| t as usize).collect()
}

fn trainer(mixed_precision: MixedPrecision) -> Trainer {
    let ad = device().autodiff();
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &ad).unwrap();
    let config = TrainConfig {
        learning_rate: 1e-3,
        lr_warmup_steps: 0,
        adam_epsilon: 1e-6,
        mixed_precision,
        show_progress: false,
        ..TrainConfig::default()
    };
    Trainer::new(&config, model, 10, &ad).unwrap()
}

/// Loss and flattened gradients of the first fixture batch; `dtype` runs them on a half copy.
fn loss_and_grads(trainer: &Trainer, half: Option<MixedPrecision>) -> (f32, Vec<f32>) {
    let source = steps_source();
    let ad = device().autodiff();
    let x0: Tensor<4> = tensor(&source, "x0", &ad);
    let noise: Tensor<4> = tensor(&source, "noise/0", &ad);
    let model = match half.and_then(MixedPrecision::dtype) {
        Some(dtype) => half_copy(trainer.model(), dtype).unwrap(),
        None => trainer.model().clone(),
    };
    let loss = training_loss(&model, trainer.scheduler(), x0, noise, &timesteps0(&source)).unwrap();
    assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
    let value = loss.clone().inner().into_scalar::<f32>();
    let grads = FlatGradients::from_backward(trainer.model(), loss.backward());
    let flat = grads
        .tensors()
        .iter()
        .flatten()
        .flat_map(|g| {
            assert_eq!(g.dtype(), DType::F32, "gradients reach the f32 masters");
            diffusion_core::tensor::to_vec(g.clone())
        })
        .collect();
    (value, flat)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

/// A bf16 and an fp16 step stay close to the f32 step, and the master weights stay f32.
///
/// Tolerance, from the dtype's unit roundoff `u` (2^-8 for bf16, 2^-11 for fp16): every conv and
/// linear layer of the half copy rounds its weight, its input and its output to `u` (3
/// roundings; flex accumulates the products in f32). With `L` such layers, `L` bounds the depth of
/// any path through the model, so the loss sees at most `3L` roundings and the gradients (forward
/// plus backward through the same layers) `6L`. Independent roundings add up like a random walk
/// (Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019): relative
/// error `<= lambda * sqrt(n) * u` with `lambda = 5` (probability of failure below 1e-3 for these
/// `n`). Sign flips of the key biases' rounding-noise gradients (see gen_train.py) are within the
/// relative L2 measure.
#[test]
fn half_precision_step_stays_close_to_f32() {
    let reference = trainer(MixedPrecision::No);
    let layers = state_dict(reference.model())
        .iter()
        .filter(|t| t.shape.len() >= 2)
        .count();
    let (loss32, grads32) = loss_and_grads(&reference, None);
    let source = steps_source();
    let ad = device().autodiff();
    let mut f32_trainer = trainer(MixedPrecision::No);
    let stats32 = f32_trainer
        .step(
            tensor(&source, "x0", &ad),
            tensor(&source, "noise/0", &ad),
            &timesteps0(&source),
        )
        .unwrap();
    for (mp, u) in [
        (MixedPrecision::Bf16, 2f64.powi(-8)),
        (MixedPrecision::Fp16, 2f64.powi(-11)),
    ] {
        let lambda = 5.0;
        let loss_tol = lambda * ((3 * layers) as f64).sqrt() * u;
        let grad_tol = lambda * ((6 * layers) as f64).sqrt() * u;
        let mut t = trainer(mp);
        let (loss, grads) = loss_and_grads(&t, Some(mp));
        let loss_rel = (f64::from(loss) - f64::from(loss32)).abs() / f64::from(loss32);
        let grad_rel = rel_l2(&grads, &grads32);
        eprintln!(
            "{mp:?}: {layers} layers; loss rel diff {loss_rel:.3e} (tol {loss_tol:.3e}), \
             gradient rel L2 diff {grad_rel:.3e} (tol {grad_tol:.3e})"
        );
        assert!(loss_rel <= loss_tol, "{mp:?}: loss {loss} vs {loss32}");
        assert!(
            grad_rel <= grad_tol,
            "{mp:?}: gradients differ by {grad_rel}"
        );

        let stats = t
            .step(
                tensor(&source, "x0", &ad),
                tensor(&source, "noise/0", &ad),
                &timesteps0(&source),
            )
            .unwrap();
        assert!(!t.last_step_skipped());
        assert_eq!(
            stats.loss, loss,
            "{mp:?}: the step's loss is the unscaled f32 loss"
        );
        let norm_rel = (f64::from(stats.grad_norm) - f64::from(stats32.grad_norm)).abs()
            / f64::from(stats32.grad_norm);
        assert!(
            norm_rel <= grad_tol,
            "{mp:?}: grad norm rel diff {norm_rel}"
        );
        let dtypes = param_dtypes(t.model());
        assert!(
            !dtypes.is_empty() && dtypes.iter().all(|d| *d == DType::F32),
            "{mp:?}: master weights are {dtypes:?}"
        );
        // AdamW's first update is lr * m / (sqrt(v) + eps), at most lr in size: each weight is
        // within 2 lr (plus the weight-decay difference, zero here at equal starting weights)
        // of the f32 step's, and it moved.
        let lr = stats.lr as f32;
        let ours = state_dict(t.model());
        let theirs = state_dict(f32_trainer.model());
        let initial = state_dict(reference.model());
        let mut moved = 0;
        for ((a, b), c) in ours.iter().zip(&theirs).zip(&initial) {
            let d = crate::max_abs_diff(&a.values, &b.values);
            assert!(d <= 2.0 * lr * 1.0001, "{mp:?}: `{}` differs by {d}", a.key);
            moved += usize::from(crate::max_abs_diff(&a.values, &c.values) > 0.5 * lr);
        }
        assert!(
            moved * 10 >= ours.len() * 9,
            "{mp:?}: only {moved} tensors moved"
        );
    }
}

/// An fp16 step whose scaled gradients overflow half precision is skipped: the weights and the
/// optimizer are untouched, the scale halves, the step still counts.
#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let mut t = trainer(MixedPrecision::Fp16);
    assert_eq!(t.grad_scaler().unwrap().scale(), 65536.0);
    // 2^40 times the gradient of the mean loss is far past fp16's largest value (65504).
    let huge = 2f64.powi(40);
    t.set_grad_scaler(
        GradScaler::new(GradScalerConfig {
            init_scale: huge,
            ..GradScalerConfig::default()
        })
        .unwrap(),
    )
    .unwrap();
    let before = state_dict(t.model());
    let source = steps_source();
    let ad = device().autodiff();
    let stats = t
        .step(
            tensor(&source, "x0", &ad),
            tensor(&source, "noise/0", &ad),
            &timesteps0(&source),
        )
        .unwrap();
    assert!(stats.loss.is_finite(), "the f32 loss itself is finite");
    assert!(t.last_step_skipped());
    assert_eq!(t.skipped_steps(), 1);
    assert_eq!(t.global_step(), 1);
    assert_eq!(t.grad_scaler().unwrap().scale(), (huge / 2.0) as f32);
    assert_eq!(t.optimizer().step_count(), 0);
    for (a, b) in state_dict(t.model()).iter().zip(&before) {
        assert!(same(&a.values, &b.values), "`{}` changed", a.key);
    }
    // At the default scale the same step goes through, at the learning rate of the skipped
    // step: the schedule did not advance (cosine, no warmup, so it would have decayed).
    t.set_grad_scaler(GradScaler::default()).unwrap();
    let next = t
        .step(
            tensor(&source, "x0", &ad),
            tensor(&source, "noise/0", &ad),
            &timesteps0(&source),
        )
        .unwrap();
    assert!(!t.last_step_skipped());
    assert_eq!(t.optimizer().step_count(), 1);
    assert_eq!(next.lr, stats.lr);
    assert!(t.lr_schedule().lr(1) < stats.lr);
    // Only fp16 has a scaler.
    let mut bf16 = trainer(MixedPrecision::Bf16);
    assert!(bf16.grad_scaler().is_none());
    let err = bf16
        .set_grad_scaler(GradScaler::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("mixed_precision"), "{err}");
}

fn run_config(output_dir: &Path, mixed_precision: MixedPrecision) -> TrainConfig {
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &device())
        .unwrap()
        .config()
        .clone();
    TrainConfig {
        output_dir: output_dir.to_path_buf(),
        model,
        train_batch_size: 6,
        max_train_steps: Some(4),
        learning_rate: 2e-3,
        lr_warmup_steps: 1,
        use_ema: true,
        seed: 7,
        checkpointing_steps: 2,
        save_model_epochs: 10,
        show_progress: false,
        mixed_precision,
        ..TrainConfig::default()
    }
}

/// A mixed-precision run resumed from its checkpoint ends with the same losses and weights
/// (bit for bit) as the uninterrupted run, loss scale included.
#[test]
fn mixed_precision_resume_is_exact() {
    let data = ImageDataset::from_digits_csv_gz(fixtures().join("digits_head.csv.gz"), 8).unwrap();
    for mp in [MixedPrecision::Fp16, MixedPrecision::Bf16] {
        let full_dir = tempfile::tempdir().unwrap();
        let full = train_unconditional(&run_config(full_dir.path(), mp), &data, &device()).unwrap();
        let ckpt = full_dir.path().join("checkpoint-2");
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(ckpt.join("mixed_precision.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved["mixed_precision"], mp.as_str());
        assert_eq!(saved["grad_scaler"].is_null(), mp != MixedPrecision::Fp16);

        let resumed_dir = tempfile::tempdir().unwrap();
        let dst = resumed_dir.path().join("checkpoint-2");
        copy_dir(&ckpt, &dst);
        let config = TrainConfig {
            resume_from_checkpoint: Some("latest".into()),
            ..run_config(resumed_dir.path(), mp)
        };
        let resumed = train_unconditional(&config, &data, &device()).unwrap();
        assert_eq!(resumed.start_step, 2);
        assert_eq!(resumed.losses(), full.losses()[2..].to_vec(), "{mp:?}");
        let weights = |dir: &Path| {
            std::fs::read(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap()
        };
        assert!(
            weights(full_dir.path()) == weights(resumed_dir.path()),
            "{mp:?}: final weights differ"
        );
    }
}

pub(crate) fn t2i_trainer(case: &str, mixed_precision: MixedPrecision) -> TextToImageTrainer {
    let root = fixtures().join("text_to_image");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("steps.json")).unwrap()).unwrap();
    let hp = &expected["hyperparameters"];
    let f = |v: &Value| v.as_f64().unwrap();
    let lora = (expected["cases"][case]["kind"] == "lora").then(|| LoraTrainConfig {
        rank: f(&hp["rank"]) as usize,
        alpha: Some(f(&hp["lora_alpha"])),
        ..LoraTrainConfig::default()
    });
    let config = TextToImageConfig {
        pretrained_model: sd1(),
        learning_rate: f(&hp["learning_rate"]),
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        max_grad_norm: Some(f(&hp["max_grad_norm"])),
        lora,
        mixed_precision: mixed_precision.as_str().into(),
        show_progress: false,
        ..TextToImageConfig::default()
    };
    let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &device()).unwrap();
    let lora = config.lora.as_ref().map(|l| {
        let mut lora = UNetLora::new(&unet, l, 0, &device()).unwrap();
        let file = SafetensorsFile::open(root.join("steps.safetensors")).unwrap();
        lora.load_factors(&file, &format!("{case}/init/")).unwrap();
        lora
    });
    let scheduler = load_noise_scheduler(&sd1()).unwrap();
    TextToImageTrainer::new(&config, unet, lora, scheduler, 4, &device()).unwrap()
}

/// The text-to-image trainer (full fine-tuning and LoRA) under bf16/fp16 against f32, with the
/// tolerance of [`half_precision_step_stays_close_to_f32`] (`L` counts the UNet's conv and
/// linear weights; a LoRA adds its factors' product to weights already counted).
#[test]
fn text_to_image_half_precision_stays_close_to_f32() {
    let source = WeightSource::open(fixtures().join("text_to_image/steps.safetensors")).unwrap();
    let dev = device();
    let latents: Tensor<4> = tensor(&source, "latents", &dev);
    let states: Tensor<3> = tensor(&source, "encoder_hidden_states", &dev);
    for case in ["full_epsilon", "lora"] {
        let draws = || {
            let (t, _) = source.read_f32(&format!("{case}/timesteps/0")).unwrap();
            NoiseDraws {
                noise: tensor(&source, &format!("{case}/noise/0"), &dev),
                offset_noise: None,
                perturbation: None,
                timesteps: t.iter().map(|&v| v as usize).collect(),
            }
        };
        let flat = |t: &TextToImageTrainer| {
            let loss = t.loss(latents.clone(), states.clone(), &draws()).unwrap();
            assert_eq!(loss.dtype(), DType::F32);
            let value = loss.clone().inner().into_scalar::<f32>();
            let grads = t.gradients(loss);
            let values: Vec<f32> = grads
                .tensors()
                .iter()
                .flatten()
                .flat_map(|g| diffusion_core::tensor::to_vec(g.clone()))
                .collect();
            (value, values)
        };
        let reference = t2i_trainer(case, MixedPrecision::No);
        let layers = state_dict(reference.unet())
            .iter()
            .filter(|t| t.shape.len() >= 2)
            .count();
        let (loss32, grads32) = flat(&reference);
        for (mp, u) in [
            (MixedPrecision::Bf16, 2f64.powi(-8)),
            (MixedPrecision::Fp16, 2f64.powi(-11)),
        ] {
            let lambda = 5.0;
            let loss_tol = lambda * ((3 * layers) as f64).sqrt() * u;
            let grad_tol = lambda * ((6 * layers) as f64).sqrt() * u;
            let mut t = t2i_trainer(case, mp);
            let (loss, grads) = flat(&t);
            let loss_rel = (f64::from(loss) - f64::from(loss32)).abs() / f64::from(loss32);
            let grad_rel = rel_l2(&grads, &grads32);
            eprintln!(
                "{case} {mp:?}: {layers} layers; loss rel diff {loss_rel:.3e} (tol {loss_tol:.3e}), \
                 gradient rel L2 diff {grad_rel:.3e} (tol {grad_tol:.3e})"
            );
            assert!(
                loss_rel <= loss_tol,
                "{case} {mp:?}: loss {loss} vs {loss32}"
            );
            assert!(
                grad_rel <= grad_tol,
                "{case} {mp:?}: gradients differ by {grad_rel}"
            );
            t.step(latents.clone(), states.clone(), &draws())
                .unwrap()
                .unwrap();
            assert!(!t.last_step_skipped(), "{case} {mp:?}");
            let masters = match t.lora() {
                Some(lora) => param_dtypes(lora.factors()),
                None => param_dtypes(t.unet()),
            };
            assert!(
                !masters.is_empty() && masters.iter().all(|d| *d == DType::F32),
                "{case} {mp:?}: master weights are {masters:?}"
            );
            assert_eq!(t.grad_scaler().is_some(), mp == MixedPrecision::Fp16);
        }
    }
}

/// `train_text_to_image` with a LoRA in fp16 (frozen VAE and text encoder in fp16) resumes
/// exactly.
#[test]
fn text_to_image_lora_fp16_run_resumes_exactly() {
    let config = |out: &Path| TextToImageConfig {
        pretrained_model: sd1(),
        train_data_dir: fixtures().join("text_to_image/data"),
        output_dir: out.to_path_buf(),
        resolution: 32,
        train_batch_size: 2,
        max_train_steps: Some(3),
        learning_rate: 1e-2,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        random_flip: true,
        checkpointing_steps: 2,
        lora: Some(LoraTrainConfig::default()),
        mixed_precision: "fp16".into(),
        show_progress: false,
        ..TextToImageConfig::default()
    };
    let full_dir = tempfile::tempdir().unwrap();
    let full = train_text_to_image(&config(full_dir.path()), &device()).unwrap();
    let losses = full.losses();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let ckpt = full_dir.path().join("checkpoint-2");
    assert!(ckpt.join("mixed_precision.json").is_file());
    let resumed_dir = tempfile::tempdir().unwrap();
    copy_dir(&ckpt, &resumed_dir.path().join("checkpoint-2"));
    let resumed = train_text_to_image(
        &TextToImageConfig {
            resume_from_checkpoint: Some("latest".into()),
            ..config(resumed_dir.path())
        },
        &device(),
    )
    .unwrap();
    assert_eq!(resumed.start_step, 2);
    assert_eq!(resumed.losses(), losses[2..].to_vec());
    let lora = |dir: &Path| std::fs::read(dir.join("pytorch_lora_weights.safetensors")).unwrap();
    assert!(
        lora(full_dir.path()) == lora(resumed_dir.path()),
        "final LoRA differs"
    );
}

/// [`half_precision_step_stays_close_to_f32`]'s tolerances (loss, gradients) for a loss whose
/// deepest path crosses `layers` conv and linear weights, at `mp`'s unit roundoff.
pub(crate) fn half_tolerances(mp: MixedPrecision, layers: usize) -> (f64, f64) {
    let u = match mp {
        MixedPrecision::Bf16 => 2f64.powi(-8),
        MixedPrecision::Fp16 => 2f64.powi(-11),
        MixedPrecision::No => 0.0,
    };
    let lambda = 5.0;
    (
        lambda * ((3 * layers) as f64).sqrt() * u,
        lambda * ((6 * layers) as f64).sqrt() * u,
    )
}

/// Conv and linear weights (tensors of rank >= 2) of `module`.
fn weight_layers<M: diffusion_core::burn::module::Module>(module: &M) -> usize {
    state_dict(module)
        .iter()
        .filter(|t| t.shape.len() >= 2)
        .count()
}

pub(crate) fn flat_values(grads: &FlatGradients) -> Vec<f32> {
    grads
        .tensors()
        .iter()
        .flatten()
        .flat_map(|g| {
            assert_eq!(g.dtype(), DType::F32, "gradients reach the f32 masters");
            diffusion_core::tensor::to_vec(g.clone())
        })
        .collect()
}

/// Compare a half-precision loss and gradients with the f32 ones under [`half_tolerances`].
pub(crate) fn assert_close_to_f32(
    what: &str,
    mp: MixedPrecision,
    layers: usize,
    (loss, grads): (f32, Vec<f32>),
    (loss32, grads32): (f32, &[f32]),
) {
    let (loss_tol, grad_tol) = half_tolerances(mp, layers);
    let loss_rel = (f64::from(loss) - f64::from(loss32)).abs() / f64::from(loss32);
    let grad_rel = rel_l2(&grads, grads32);
    eprintln!(
        "{what} {mp:?}: {layers} layers; loss rel diff {loss_rel:.3e} (tol {loss_tol:.3e}), \
         gradient rel L2 diff {grad_rel:.3e} (tol {grad_tol:.3e})"
    );
    assert!(
        loss_rel <= loss_tol,
        "{what} {mp:?}: loss {loss} vs {loss32}"
    );
    assert!(
        grad_rel <= grad_tol,
        "{what} {mp:?}: gradients differ by {grad_rel}"
    );
}

fn all_f32(what: &str, dtypes: &[DType]) {
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| *d == DType::F32),
        "{what}: master weights are {dtypes:?}"
    );
}

/// An fp16 scaler whose scale makes every scaled gradient overflow half precision.
fn overflowing_scaler() -> GradScaler {
    GradScaler::new(GradScalerConfig {
        init_scale: 2f64.powi(40),
        ..GradScalerConfig::default()
    })
    .unwrap()
}

mod concepts {
    use super::*;
    use diffusion_core::burn::tensor::Int;
    use diffusion_core::weights::NamedTensor;
    use diffusion_models::{CLIPTextModel, CLIPTokenizer};
    use diffusion_train::{
        DreamBoothConfig, DreamBoothTrainer, SdxlConditioning, SdxlTrainConfig, SdxlTrainer,
        tokenize_captions, train_dreambooth,
    };

    fn te_root() -> std::path::PathBuf {
        fixtures().join("te_lora")
    }

    fn te_source() -> WeightSource {
        WeightSource::open(te_root().join("steps.safetensors")).unwrap()
    }

    /// The DreamBooth LoRA run of gen_train_te_lora.py (prior preservation), with or without
    /// the text-encoder LoRA.
    fn dreambooth_config(train_text_encoder: bool, mp: MixedPrecision) -> DreamBoothConfig {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(te_root().join("steps.json")).unwrap())
                .unwrap();
        let hp = &expected["hyperparameters"];
        let f = |v: &Value| v.as_f64().unwrap();
        DreamBoothConfig {
            instance_prompt: hp["instance_prompt"].as_str().unwrap().into(),
            class_prompt: Some(hp["class_prompt"].as_str().unwrap().into()),
            class_data_dir: Some(fixtures().join("text_to_image/data")),
            with_prior_preservation: true,
            prior_loss_weight: f(&hp["prior_loss_weight"]),
            train_text_encoder,
            train: TextToImageConfig {
                pretrained_model: sd1(),
                learning_rate: f(&hp["learning_rate"]),
                lr_scheduler: LrScheduleKind::Constant,
                lr_warmup_steps: 0,
                max_grad_norm: Some(f(&hp["max_grad_norm"])),
                lora: Some(LoraTrainConfig {
                    rank: f(&hp["rank"]) as usize,
                    alpha: Some(f(&hp["lora_alpha"])),
                    ..LoraTrainConfig::default()
                }),
                mixed_precision: mp.as_str().into(),
                show_progress: false,
                ..DreamBoothConfig::lora_defaults().train
            },
            ..DreamBoothConfig::lora_defaults()
        }
    }

    /// A trainer starting from the fixture's (non-zero) LoRA factors.
    fn dreambooth_trainer(train_text_encoder: bool, mp: MixedPrecision) -> DreamBoothTrainer {
        let config = dreambooth_config(train_text_encoder, mp);
        let dev = device();
        let file = SafetensorsFile::open(te_root().join("steps.safetensors")).unwrap();
        let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
        let lora_config = config.train.lora.clone().unwrap();
        let mut unet_lora = UNetLora::new(&unet, &lora_config, 0, &dev).unwrap();
        unet_lora.load_factors(&file, "unet_init/").unwrap();
        let scheduler = load_noise_scheduler(&sd1()).unwrap();
        if !train_text_encoder {
            return DreamBoothTrainer::new(&config, unet, Some(unet_lora), scheduler, 4, &dev)
                .unwrap();
        }
        let text_encoder =
            CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
        let te_config = LoraTrainConfig {
            alpha: lora_config.alpha,
            ..LoraTrainConfig::text_encoder(lora_config.rank)
        };
        let mut te_lora = UNetLora::new_text_encoder(&text_encoder, &te_config, 0, &dev).unwrap();
        te_lora.load_factors(&file, "te_init/").unwrap();
        DreamBoothTrainer::with_text_encoder(
            &config,
            unet,
            unet_lora,
            text_encoder,
            te_lora,
            scheduler,
            4,
            &dev,
        )
        .unwrap()
    }

    /// Prompt ids of the fixture batch: two instance prompts, then two class prompts.
    fn prompt_ids(config: &DreamBoothConfig) -> Tensor<2, Int> {
        let tokenizer = CLIPTokenizer::from_pretrained(sd1().join("tokenizer")).unwrap();
        let instance = config.instance_prompt.as_str();
        let class = config.class_prompt.as_deref().unwrap();
        tokenize_captions(&tokenizer, &[instance, instance, class, class])
            .unwrap()
            .input_ids_tensor(&device())
            .unwrap()
    }

    fn te_draws(source: &WeightSource) -> NoiseDraws {
        let (t, _) = source.read_f32("timesteps/0").unwrap();
        NoiseDraws {
            noise: tensor(source, "noise/0", &device()),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        }
    }

    /// One step of a DreamBooth trainer (with prompt ids when the text encoder is trained).
    fn dreambooth_step(
        t: &mut DreamBoothTrainer,
        latents: &Tensor<4>,
        ids: &Tensor<2, Int>,
        states: &Tensor<3>,
        draws: &NoiseDraws,
    ) -> diffusion_train::StepStats {
        let stats = if t.text_encoder_lora().is_some() {
            t.step_with_ids(latents.clone(), ids.clone(), draws)
        } else {
            t.step(latents.clone(), states.clone(), draws)
        };
        stats.unwrap().expect("no accumulation")
    }

    /// Everything a DreamBooth trainer trains, by name.
    fn trained(t: &DreamBoothTrainer) -> Vec<NamedTensor> {
        let mut all = t.inner().lora().unwrap().state_dict();
        if let Some(te) = t.text_encoder_lora() {
            all.extend(te.state_dict());
        }
        all
    }

    /// DreamBooth LoRA with prior preservation, without and with the text-encoder LoRA: a bf16
    /// and an fp16 step stay within the dtype-derived tolerance of the f32 step (with the text
    /// encoder in the graph, `L` adds its conv and linear weights to the UNet's); the masters
    /// stay f32; a forced fp16 overflow skips the step.
    #[test]
    fn dreambooth_lora_half_precision_stays_close_to_f32() {
        let source = te_source();
        let dev = device();
        let latents: Tensor<4> = tensor(&source, "latents", &dev);
        let draws = te_draws(&source);
        let text_encoder =
            CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
        let ids = prompt_ids(&dreambooth_config(false, MixedPrecision::No));
        let states = text_encoder.forward(ids.clone()).unwrap().last_hidden_state;
        let unet_layers = weight_layers(
            &UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap(),
        );
        let te_layers = weight_layers(&text_encoder);
        for train_text_encoder in [false, true] {
            let what = if train_text_encoder {
                "dreambooth lora + text encoder"
            } else {
                "dreambooth lora"
            };
            let layers = unet_layers + if train_text_encoder { te_layers } else { 0 };
            let flat = |t: &DreamBoothTrainer| {
                let loss = if train_text_encoder {
                    t.loss_with_ids(latents.clone(), ids.clone(), &draws)
                } else {
                    t.loss(latents.clone(), states.clone(), &draws)
                }
                .unwrap();
                assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
                let value = loss.clone().inner().into_scalar::<f32>();
                (value, flat_values(&t.gradients(loss)))
            };
            let reference = dreambooth_trainer(train_text_encoder, MixedPrecision::No);
            let (loss32, grads32) = flat(&reference);
            for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
                let mut t = dreambooth_trainer(train_text_encoder, mp);
                assert_close_to_f32(what, mp, layers, flat(&t), (loss32, &grads32));
                let before = trained(&t);
                let stats = dreambooth_step(&mut t, &latents, &ids, &states, &draws);
                assert!(stats.loss.is_finite() && !t.inner().last_step_skipped());
                assert_eq!(
                    t.inner().grad_scaler().is_some(),
                    mp == MixedPrecision::Fp16
                );
                all_f32(what, &param_dtypes(t.inner().lora().unwrap().factors()));
                if let Some(te) = t.text_encoder_lora() {
                    all_f32(what, &param_dtypes(te.factors()));
                }
                let moved = trained(&t)
                    .iter()
                    .zip(&before)
                    .filter(|(a, b)| !same(&a.values, &b.values))
                    .count();
                assert!(moved > 0, "{what} {mp:?}: nothing moved");
            }

            // fp16 overflow: skipped, nothing trained moves, the scale halves, the step counts;
            // the next step at the default scale goes through at the same learning rate.
            let mut t = dreambooth_trainer(train_text_encoder, MixedPrecision::Fp16);
            t.inner_mut().set_grad_scaler(overflowing_scaler()).unwrap();
            let before = trained(&t);
            let stats = dreambooth_step(&mut t, &latents, &ids, &states, &draws);
            assert!(
                stats.loss.is_finite(),
                "{what}: the f32 loss itself is finite"
            );
            assert!(t.inner().last_step_skipped(), "{what}");
            assert_eq!(t.inner().skipped_steps(), 1);
            assert_eq!(t.inner().global_step(), 1);
            assert_eq!(
                t.inner().grad_scaler().unwrap().scale(),
                2f32.powi(39),
                "{what}"
            );
            for (a, b) in trained(&t).iter().zip(&before) {
                assert!(same(&a.values, &b.values), "{what}: `{}` changed", a.key);
            }
            t.inner_mut()
                .set_grad_scaler(GradScaler::default())
                .unwrap();
            let next = dreambooth_step(&mut t, &latents, &ids, &states, &draws);
            assert!(!t.inner().last_step_skipped(), "{what}");
            assert_eq!(next.lr, stats.lr);
            assert!(
                trained(&t)
                    .iter()
                    .zip(&before)
                    .any(|(a, b)| !same(&a.values, &b.values))
            );
        }
    }

    /// `train_dreambooth` with prior preservation and the text-encoder LoRA in fp16 (frozen VAE,
    /// text encoder base and UNet base in fp16) resumes exactly, loss scale included.
    #[test]
    fn dreambooth_text_encoder_lora_fp16_run_resumes_exactly() {
        let config = |out: &Path| {
            let mut c = dreambooth_config(true, MixedPrecision::Fp16);
            c.instance_data_dir = fixtures().join("text_to_image/data");
            c.num_class_images = 4;
            let t = &mut c.train;
            t.output_dir = out.to_path_buf();
            t.resolution = 32;
            t.train_batch_size = 1;
            t.max_train_steps = Some(3);
            t.learning_rate = 1e-2;
            t.checkpointing_steps = 2;
            t.seed = 3;
            c
        };
        let full_dir = tempfile::tempdir().unwrap();
        let full = train_dreambooth(&config(full_dir.path()), &device()).unwrap();
        let losses = full.losses();
        assert_eq!(losses.len(), 3);
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        let ckpt = full_dir.path().join("checkpoint-2");
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(ckpt.join("mixed_precision.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(saved["mixed_precision"], "fp16");
        assert!(!saved["grad_scaler"].is_null());
        let resumed_dir = tempfile::tempdir().unwrap();
        copy_dir(&ckpt, &resumed_dir.path().join("checkpoint-2"));
        let mut resumed_config = config(resumed_dir.path());
        resumed_config.train.resume_from_checkpoint = Some("latest".into());
        let resumed = train_dreambooth(&resumed_config, &device()).unwrap();
        assert_eq!(resumed.start_step, 2);
        assert_eq!(resumed.losses(), losses[2..].to_vec());
        let lora =
            |dir: &Path| std::fs::read(dir.join("pytorch_lora_weights.safetensors")).unwrap();
        assert!(
            lora(full_dir.path()) == lora(resumed_dir.path()),
            "final LoRA differs"
        );
    }

    fn sdxl() -> std::path::PathBuf {
        fixtures().join("../pipelines/sd/sdxl")
    }

    /// The `lora_trained` case of gen_train_sdxl.py (Gaussian-initialised factors).
    fn sdxl_trainer(mp: MixedPrecision) -> SdxlTrainer {
        let root = fixtures().join("sdxl");
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("steps.json")).unwrap())
                .unwrap();
        let hp = &expected["hyperparameters"];
        let f = |v: &Value| v.as_f64().unwrap();
        let config = SdxlTrainConfig {
            text_to_image: TextToImageConfig {
                pretrained_model: sdxl(),
                resolution: 32,
                learning_rate: f(&hp["learning_rate"]),
                lr_scheduler: LrScheduleKind::Constant,
                lr_warmup_steps: 0,
                max_grad_norm: Some(f(&hp["max_grad_norm"])),
                lora: Some(LoraTrainConfig {
                    rank: f(&hp["rank"]) as usize,
                    alpha: Some(f(&hp["lora_alpha"])),
                    ..LoraTrainConfig::default()
                }),
                mixed_precision: mp.as_str().into(),
                show_progress: false,
                ..TextToImageConfig::default()
            },
            ..SdxlTrainConfig::default()
        };
        let dev = device();
        let unet = UNet2DConditionModel::from_pretrained(sdxl().join("unet"), &dev).unwrap();
        let mut lora =
            UNetLora::new(&unet, config.text_to_image.lora.as_ref().unwrap(), 0, &dev).unwrap();
        let file = SafetensorsFile::open(root.join("steps.safetensors")).unwrap();
        lora.load_factors(&file, "lora_trained/init/").unwrap();
        let scheduler = load_noise_scheduler(&sdxl()).unwrap();
        SdxlTrainer::new(&config, unet, Some(lora), scheduler, 3, &dev).unwrap()
    }

    /// SDXL LoRA: a bf16 and an fp16 step within the dtype-derived tolerance of the f32 step,
    /// f32 masters, and a forced fp16 overflow skipped.
    #[test]
    fn sdxl_lora_half_precision_stays_close_to_f32() {
        let source = WeightSource::open(fixtures().join("sdxl/steps.safetensors")).unwrap();
        let dev = device();
        let latents: Tensor<4> = tensor(&source, "latents", &dev);
        let cond = SdxlConditioning {
            prompt_embeds: tensor(&source, "prompt_embeds", &dev),
            pooled_prompt_embeds: tensor(&source, "pooled_prompt_embeds", &dev),
            time_ids: tensor(&source, "time_ids", &dev),
        };
        let draws = || {
            let (t, _) = source.read_f32("lora_trained/timesteps/0").unwrap();
            NoiseDraws {
                noise: tensor(&source, "lora_trained/noise/0", &dev),
                offset_noise: None,
                perturbation: None,
                timesteps: t.iter().map(|&v| v as usize).collect(),
            }
        };
        let flat = |t: &SdxlTrainer| {
            let loss = t.loss(latents.clone(), &cond, &draws()).unwrap();
            assert_eq!(loss.dtype(), DType::F32, "the loss is computed in f32");
            let value = loss.clone().inner().into_scalar::<f32>();
            (value, flat_values(&t.trainer().gradients(loss)))
        };
        let reference = sdxl_trainer(MixedPrecision::No);
        let layers = weight_layers(reference.trainer().unet());
        let (loss32, grads32) = flat(&reference);
        let factors = |t: &SdxlTrainer| t.trainer().lora().unwrap().state_dict();
        for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
            let mut t = sdxl_trainer(mp);
            assert_close_to_f32("sdxl lora", mp, layers, flat(&t), (loss32, &grads32));
            let before = factors(&t);
            t.step(latents.clone(), &cond, &draws()).unwrap().unwrap();
            assert!(!t.trainer().last_step_skipped(), "{mp:?}");
            all_f32(
                "sdxl lora",
                &param_dtypes(t.trainer().lora().unwrap().factors()),
            );
            assert!(
                factors(&t)
                    .iter()
                    .zip(&before)
                    .any(|(a, b)| !same(&a.values, &b.values))
            );
        }
        let mut t = sdxl_trainer(MixedPrecision::Fp16);
        t.trainer_mut()
            .set_grad_scaler(overflowing_scaler())
            .unwrap();
        let before = factors(&t);
        let stats = t.step(latents.clone(), &cond, &draws()).unwrap().unwrap();
        assert!(stats.loss.is_finite());
        assert!(t.trainer().last_step_skipped());
        assert_eq!(t.trainer().skipped_steps(), 1);
        assert_eq!(t.trainer().optimizer().step_count(), 0);
        assert_eq!(t.trainer().grad_scaler().unwrap().scale(), 2f32.powi(39));
        for (a, b) in factors(&t).iter().zip(&before) {
            assert!(same(&a.values, &b.values), "`{}` changed", a.key);
        }
    }
}

pub(crate) mod textual_inversion {
    //! Textual inversion under bf16/fp16 (the setup of gen_train_dreambooth_ti.py's textual
    //! inversion): the half step against the f32 step, the f32 table as master, an fp16
    //! overflow, and an fp16 run resumed exactly.

    use super::*;
    use diffusion_core::burn::tensor::Int;
    use diffusion_core::tensor::to_vec;
    use diffusion_models::{CLIPTextModel, CLIPTokenizer};
    use diffusion_train::{
        TextualInversionConfig, TextualInversionTrainer, add_placeholder_tokens, tokenize_captions,
        train_textual_inversion,
    };

    fn root() -> std::path::PathBuf {
        fixtures().join("textual_inversion")
    }

    pub(crate) fn source() -> WeightSource {
        WeightSource::open(root().join("steps.safetensors")).unwrap()
    }

    /// The fixture's trainer (4 planned steps) and its prompts' ids.
    fn ti_trainer(mp: MixedPrecision) -> (TextualInversionTrainer, Tensor<2, Int>) {
        ti_trainer_with(mp, false)
    }

    /// [`ti_trainer`] with `gradient_checkpointing` set as given.
    pub(crate) fn ti_trainer_with(
        mp: MixedPrecision,
        gradient_checkpointing: bool,
    ) -> (TextualInversionTrainer, Tensor<2, Int>) {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(root().join("steps.json")).unwrap())
                .unwrap();
        let hp = &expected["hyperparameters"];
        let f = |v: &Value| v.as_f64().unwrap();
        let config = TextualInversionConfig {
            pretrained_model: sd1(),
            placeholder_token: hp["placeholder_token"].as_str().unwrap().into(),
            initializer_token: hp["initializer_token"].as_str().unwrap().into(),
            num_vectors: hp["num_vectors"].as_u64().unwrap() as usize,
            learning_rate: f(&hp["learning_rate"]),
            scale_lr: false,
            lr_scheduler: LrScheduleKind::Cosine,
            lr_warmup_steps: 0,
            mixed_precision: mp,
            gradient_checkpointing,
            show_progress: false,
            ..TextualInversionConfig::default()
        };
        let dev = device();
        let mut tokenizer = CLIPTokenizer::from_pretrained(sd1().join("tokenizer")).unwrap();
        let mut text_encoder =
            CLIPTextModel::from_pretrained(sd1().join("text_encoder"), &dev).unwrap();
        let ids = add_placeholder_tokens(
            &mut tokenizer,
            &mut text_encoder,
            &config.placeholder_token,
            config.num_vectors,
            &config.initializer_token,
        )
        .unwrap();
        let prompts: Vec<String> = expected["results"]["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let input_ids = tokenize_captions(&tokenizer, &prompts)
            .unwrap()
            .input_ids_tensor(&dev)
            .unwrap();
        let unet = UNet2DConditionModel::from_pretrained(sd1().join("unet"), &dev).unwrap();
        let scheduler = load_noise_scheduler(&sd1()).unwrap();
        let trainer =
            TextualInversionTrainer::new(&config, text_encoder, unet, scheduler, &ids, 4, &dev)
                .unwrap();
        (trainer, input_ids)
    }

    pub(crate) fn draws(source: &WeightSource) -> NoiseDraws {
        let (t, _) = source.read_f32("timesteps/0").unwrap();
        NoiseDraws {
            noise: tensor(source, "noise/0", &device()),
            offset_noise: None,
            perturbation: None,
            timesteps: t.iter().map(|&v| v as usize).collect(),
        }
    }

    /// The placeholder rows of the table's gradient (the only rows that learn).
    fn row_gradients(t: &TextualInversionTrainer, grads: &FlatGradients) -> Vec<f32> {
        let table = grads.state_dict(&t.text_encoder().text_model.embeddings.token_embedding);
        let hidden = table[0].shape[1];
        let (first, last) = t.placeholder_rows();
        table[0].values[first * hidden..(last + 1) * hidden].to_vec()
    }

    /// The half-precision step against the f32 one, with the bound of
    /// [`half_precision_step_stays_close_to_f32`] over the text encoder's and the UNet's
    /// weights (the gradient crosses both).
    #[test]
    fn textual_inversion_half_precision_stays_close_to_f32() {
        let source = source();
        let latents: Tensor<4> = tensor(&source, "latents", &device());
        let (reference, ids) = ti_trainer(MixedPrecision::No);
        let layers = weight_layers(reference.text_encoder())
            + weight_layers(
                &UNet2DConditionModel::from_pretrained(sd1().join("unet"), &device()).unwrap(),
            );
        let loss32 = reference
            .loss(latents.clone(), ids.clone(), &draws(&source))
            .unwrap();
        let value32 = loss32.clone().inner().into_scalar::<f32>();
        let grads32 = row_gradients(&reference, &reference.gradients(loss32));
        for mp in [MixedPrecision::Bf16, MixedPrecision::Fp16] {
            let (mut t, _) = ti_trainer(mp);
            let loss = t
                .loss(latents.clone(), ids.clone(), &draws(&source))
                .unwrap();
            assert_eq!(loss.dtype(), DType::F32);
            let value = loss.clone().inner().into_scalar::<f32>();
            let grads = t.gradients(loss);
            assert!(
                grads
                    .tensors()
                    .iter()
                    .flatten()
                    .all(|g| g.dtype() == DType::F32),
                "the gradient reaches the f32 table"
            );
            assert_close_to_f32(
                "textual inversion",
                mp,
                layers,
                (value, row_gradients(&t, &grads)),
                (value32, &grads32),
            );
            let before = to_vec(t.token_embedding());
            t.step(latents.clone(), ids.clone(), &draws(&source))
                .unwrap()
                .unwrap();
            assert!(!t.last_step_skipped(), "{mp:?}");
            assert_eq!(t.grad_scaler().is_some(), mp == MixedPrecision::Fp16);
            all_f32(
                "textual inversion",
                &param_dtypes(&t.text_encoder().text_model.embeddings.token_embedding),
            );
            // Only the placeholder rows moved.
            let after = to_vec(t.token_embedding());
            let hidden = t.learned_embeds().dims()[1];
            let (first, _) = t.placeholder_rows();
            assert_eq!(&after[..first * hidden], &before[..first * hidden]);
            assert!(
                after[first * hidden..] != before[first * hidden..],
                "{mp:?}"
            );
        }
    }

    /// A scale that overflows fp16 skips the step: the table, the optimizer and the schedule
    /// stay, the scale halves; the next step at the default scale goes through at the learning
    /// rate the skipped step had.
    #[test]
    fn textual_inversion_fp16_overflow_skips_the_step() {
        let source = source();
        let latents: Tensor<4> = tensor(&source, "latents", &device());
        let (mut t, ids) = ti_trainer(MixedPrecision::Fp16);
        t.set_grad_scaler(overflowing_scaler()).unwrap();
        let before = to_vec(t.token_embedding());
        let stats = t
            .step(latents.clone(), ids.clone(), &draws(&source))
            .unwrap()
            .unwrap();
        assert!(stats.loss.is_finite());
        assert!(t.last_step_skipped());
        assert_eq!(t.global_step(), 1);
        assert_eq!(t.grad_scaler().unwrap().scale(), 2f32.powi(39));
        assert!(to_vec(t.token_embedding()) == before, "the table changed");
        t.set_grad_scaler(GradScaler::default()).unwrap();
        let next = t.step(latents, ids, &draws(&source)).unwrap().unwrap();
        assert!(!t.last_step_skipped());
        assert_eq!(
            next.lr, stats.lr,
            "the cosine schedule advanced on a skipped step"
        );
        assert!(to_vec(t.token_embedding()) != before);
        let (mut bf16, _) = ti_trainer(MixedPrecision::Bf16);
        let err = bf16
            .set_grad_scaler(GradScaler::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("mixed_precision"), "{err}");
    }

    /// `train_textual_inversion` in fp16 (UNet and VAE in fp16) resumes exactly, its loss
    /// scale included.
    #[test]
    fn textual_inversion_fp16_run_resumes_exactly() {
        let config = |out: &Path| TextualInversionConfig {
            pretrained_model: sd1(),
            train_data_dir: fixtures().join("text_to_image/data"),
            output_dir: out.to_path_buf(),
            placeholder_token: "<cat-toy>".into(),
            initializer_token: "red".into(),
            repeats: 1,
            resolution: 32,
            train_batch_size: 2,
            max_train_steps: Some(3),
            learning_rate: 1e-2,
            scale_lr: false,
            lr_warmup_steps: 0,
            checkpointing_steps: 2,
            save_steps: 100,
            mixed_precision: MixedPrecision::Fp16,
            show_progress: false,
            ..TextualInversionConfig::default()
        };
        let full_dir = tempfile::tempdir().unwrap();
        let full = train_textual_inversion(&config(full_dir.path()), &device()).unwrap();
        assert_eq!(full.losses().len(), 3);
        let ckpt = full_dir.path().join("checkpoint-2");
        assert!(ckpt.join("mixed_precision.json").is_file());
        let resumed_dir = tempfile::tempdir().unwrap();
        copy_dir(&ckpt, &resumed_dir.path().join("checkpoint-2"));
        let resumed = train_textual_inversion(
            &TextualInversionConfig {
                resume_from_checkpoint: Some("latest".into()),
                ..config(resumed_dir.path())
            },
            &device(),
        )
        .unwrap();
        assert_eq!(resumed.start_step, 2);
        assert_eq!(resumed.losses(), full.losses()[2..].to_vec());
        let embeds = |dir: &Path| std::fs::read(dir.join("learned_embeds.safetensors")).unwrap();
        assert!(embeds(full_dir.path()) == embeds(resumed_dir.path()));
    }
}
