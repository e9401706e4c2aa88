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

use crate::{device, fixtures, tensor};

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

fn t2i_trainer(case: &str, mixed_precision: MixedPrecision) -> TextToImageTrainer {
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

fn sd1() -> std::path::PathBuf {
    fixtures().join("../pipelines/sd/sd1")
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
/// exactly, and the scripts built on the same config that do not run half precision refuse it.
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

    let mut sdxl = diffusion_train::SdxlTrainConfig::default();
    sdxl.text_to_image.mixed_precision = "bf16".into();
    let err = sdxl.validate().unwrap_err().to_string();
    assert!(
        err.contains("mixed_precision") && err.contains("SDXL"),
        "{err}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}
