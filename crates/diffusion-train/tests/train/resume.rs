//! Checkpoints resume exactly: a run resumed from step k continues with the same losses, log
//! and final weights as the run that was never interrupted.

use diffusion_models::ModelMixin;
use std::path::Path;

use diffusion_models::UNet2DModel;
use diffusion_schedulers::{ConfiguredScheduler, DDPMScheduler};
use diffusion_train::run::LOG_FILE;
use diffusion_train::{ImageDataset, TrainConfig, train_unconditional};

use crate::{copy_dir, device, fixtures, read};

fn dataset() -> ImageDataset {
    ImageDataset::from_digits_csv_gz(fixtures().join("digits_head.csv.gz"), 8).unwrap()
}

fn config(output_dir: &Path) -> TrainConfig {
    let model = UNet2DModel::from_pretrained(fixtures().join("tiny_unet"), &device())
        .unwrap()
        .config()
        .clone();
    TrainConfig {
        output_dir: output_dir.to_path_buf(),
        model,
        train_batch_size: 6, // 16 images: batches of 6, 6 and 4
        max_train_steps: Some(7),
        learning_rate: 2e-3,
        lr_warmup_steps: 2,
        use_ema: true,
        random_flip: true,
        seed: 42,
        checkpointing_steps: 4,
        save_model_epochs: 1,
        show_progress: false,
        ..TrainConfig::default()
    }
}

#[test]
fn resumed_run_continues_exactly() {
    let data = dataset();
    let full_dir = tempfile::tempdir().unwrap();
    let full = train_unconditional(&config(full_dir.path()), &data, &device()).unwrap();
    assert_eq!(full.steps.len(), 7);
    assert_eq!(full.checkpoints, [full_dir.path().join("checkpoint-4")]);
    let losses = full.losses();
    assert!(losses.iter().all(|l| l.is_finite()));
    // Every step draws new data, noise and timesteps.
    assert!(losses.windows(2).all(|w| w[0] != w[1]), "{losses:?}");

    // A second run in another folder, killed after step 5: the checkpoint at 4 exists, the log
    // has a step past it and a torn last line, and a half-written checkpoint lies around.
    let killed_dir = tempfile::tempdir().unwrap();
    let killed = killed_dir.path();
    copy_dir(
        &full_dir.path().join("checkpoint-4"),
        &killed.join("checkpoint-4"),
    );
    let full_log = String::from_utf8(read(&full_dir.path().join(LOG_FILE))).unwrap();
    let lines: Vec<&str> = full_log.lines().collect();
    std::fs::create_dir_all(killed.join("logs")).unwrap();
    std::fs::write(
        killed.join(LOG_FILE),
        format!("{}\n{{\"step\": 6, \"lo", lines[..5].join("\n")),
    )
    .unwrap();
    std::fs::create_dir_all(killed.join(".checkpoint-6.partial-1/unet")).unwrap();

    let resumed_config = TrainConfig {
        resume_from_checkpoint: Some("latest".into()),
        ..config(killed)
    };
    let resumed = train_unconditional(&resumed_config, &data, &device()).unwrap();
    assert_eq!(resumed.start_step, 4);
    let resumed_losses = resumed.losses();
    assert_eq!(
        resumed_losses,
        losses[4..],
        "losses after the resume differ"
    );
    for (a, b) in resumed.steps.iter().zip(&full.steps[4..]) {
        assert_eq!(a, b);
    }
    assert_eq!(
        String::from_utf8(read(&killed.join(LOG_FILE))).unwrap(),
        full_log
    );
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
    ] {
        assert_eq!(
            read(&killed.join(file)),
            read(&full_dir.path().join(file)),
            "{file}"
        );
    }
}

#[test]
fn checkpoints_and_pipeline_folder_load_back() {
    let data = dataset();
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        max_train_steps: Some(4),
        checkpointing_steps: 2,
        checkpoints_total_limit: Some(1),
        ..config(dir.path())
    };
    let report = train_unconditional(&config, &data, &device()).unwrap();
    assert_eq!(report.checkpoints.len(), 2);
    // Only the newest checkpoint is kept.
    assert!(!dir.path().join("checkpoint-2").exists());
    let ckpt = dir.path().join("checkpoint-4");
    for file in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/diffusion_pytorch_model.safetensors",
        "optimizer/exp_avg.safetensors",
        "optimizer/exp_avg_sq.safetensors",
        "optimizer/optimizer.json",
        "scheduler/scheduler_config.json",
        "training_state.json",
    ] {
        assert!(ckpt.join(file).is_file(), "missing {file}");
    }
    // diffusers' EMAModel.from_pretrained reads its state from the EMA folder's config.json.
    let ema_config: serde_json::Value =
        serde_json::from_slice(&read(&ckpt.join("unet_ema/config.json"))).unwrap();
    assert_eq!(ema_config["optimization_step"], 4);
    assert_eq!(ema_config["_class_name"], "UNet2DModel");
    assert_eq!(ema_config["power"], 0.75);

    // The output folder is a DDPMPipeline folder.
    let index: serde_json::Value =
        serde_json::from_slice(&read(&dir.path().join("model_index.json"))).unwrap();
    assert_eq!(index["_class_name"], "DDPMPipeline");
    assert_eq!(
        index["unet"],
        serde_json::json!(["diffusers", "UNet2DModel"])
    );
    assert_eq!(
        index["scheduler"],
        serde_json::json!(["diffusers", "DDPMScheduler"])
    );
    let unet = UNet2DModel::from_pretrained(dir.path().join("unet"), &device()).unwrap();
    assert_eq!(unet.config().in_channels, 1);
    DDPMScheduler::load(dir.path().join("scheduler")).unwrap();

    // A checkpoint whose optimizer state misses a tensor is refused, naming the key.
    let broken = dir
        .path()
        .join("checkpoint-4/optimizer/exp_avg.safetensors");
    let source = diffusion_core::weights::WeightSource::open(&broken).unwrap();
    let mut tensors = Vec::new();
    for key in source.keys().filter(|k| *k != "conv_in.bias") {
        let (values, shape) = source.read_f32(key).unwrap();
        tensors.push(diffusion_core::weights::NamedTensor {
            key: key.to_string(),
            shape,
            values,
        });
    }
    drop(source);
    diffusion_core::weights::write_safetensors(&broken, &tensors, Default::default()).unwrap();
    let resume = TrainConfig {
        resume_from_checkpoint: Some("checkpoint-4".into()),
        max_train_steps: Some(6),
        ..config.clone()
    };
    let err = train_unconditional(&resume, &data, &device())
        .unwrap_err()
        .to_string();
    assert!(err.contains("conv_in.bias"), "{err}");
    let missing = TrainConfig {
        resume_from_checkpoint: Some("checkpoint-99".into()),
        ..config
    };
    assert!(train_unconditional(&missing, &data, &device()).is_err());
}
