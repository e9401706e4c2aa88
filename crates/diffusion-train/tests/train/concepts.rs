//! Runs of the concept trainers on the tiny SD1 pipeline: textual inversion interrupted and
//! resumed from its checkpoint against the uninterrupted run; DreamBooth's class-image
//! generation (count, names, determinism, existing images kept); a DreamBooth LoRA run that
//! trains the text encoder, interrupted and resumed.

use std::path::{Path, PathBuf};

use diffusion_core::weights::SafetensorsFile;
use diffusion_train::textual_inversion::LEARNED_EMBEDS_NAME;
use diffusion_train::{
    DreamBoothConfig, LoraTrainConfig, LrScheduleKind, TextualInversionConfig,
    generate_class_images, train_dreambooth, train_textual_inversion,
};

use crate::{device, fixtures, sd1};

fn data() -> PathBuf {
    fixtures().join("text_to_image/data")
}

fn log(out: &Path) -> String {
    std::fs::read_to_string(out.join("logs/train_log.jsonl")).unwrap()
}

fn ti_config(out: &Path, resume: Option<&str>) -> TextualInversionConfig {
    TextualInversionConfig {
        pretrained_model: sd1(),
        train_data_dir: data(),
        output_dir: out.to_path_buf(),
        placeholder_token: "<cat-toy>".into(),
        initializer_token: "red".into(),
        num_vectors: 2,
        repeats: 1,
        resolution: 32,
        train_batch_size: 2,
        max_train_steps: Some(4),
        learning_rate: 5e-3,
        lr_scheduler: LrScheduleKind::Constant,
        lr_warmup_steps: 0,
        save_steps: 100,
        checkpointing_steps: 2,
        resume_from_checkpoint: resume.map(String::from),
        show_progress: false,
        ..TextualInversionConfig::default()
    }
}

/// Cut a run after its checkpoint at step 2, as a kill during step 4 leaves it: the later
/// checkpoint and the result gone, the log ending in a half-written line.
fn kill_after_step_2(out: &Path) {
    std::fs::remove_dir_all(out.join("checkpoint-4")).unwrap();
    let log_path = out.join("logs/train_log.jsonl");
    let lines: Vec<String> = log(out).lines().map(String::from).collect();
    let kept = format!("{}\n{{\"step\":3,\"ep", lines[..2].join("\n"));
    std::fs::write(&log_path, kept).unwrap();
}

#[test]
fn textual_inversion_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let report = train_textual_inversion(&ti_config(&straight, None), &device()).unwrap();
    assert_eq!(report.steps.len(), 4);
    assert_eq!(
        report.checkpoints,
        [straight.join("checkpoint-2"), straight.join("checkpoint-4")]
    );
    for sub in [
        "checkpoint-2/learned_embeds.safetensors",
        "checkpoint-2/optimizer/optimizer.json",
        "checkpoint-2/training_state.json",
    ] {
        assert!(straight.join(sub).is_file(), "{sub} missing");
    }

    let resumed = dir.path().join("resumed");
    train_textual_inversion(&ti_config(&resumed, None), &device()).unwrap();
    kill_after_step_2(&resumed);
    std::fs::remove_file(resumed.join(LEARNED_EMBEDS_NAME)).unwrap();
    let report = train_textual_inversion(&ti_config(&resumed, Some("latest")), &device()).unwrap();
    assert_eq!(report.start_step, 2);
    assert_eq!(report.steps.len(), 2);
    assert_eq!(log(&resumed), log(&straight));
    assert_eq!(log(&straight).lines().count(), 4);
    assert_eq!(
        std::fs::read(resumed.join(LEARNED_EMBEDS_NAME)).unwrap(),
        std::fs::read(straight.join(LEARNED_EMBEDS_NAME)).unwrap()
    );

    // A checkpoint of other placeholders is refused, naming the option.
    let other = TextualInversionConfig {
        num_vectors: 3,
        ..ti_config(&resumed, Some("checkpoint-2"))
    };
    let err = train_textual_inversion(&other, &device()).unwrap_err();
    assert!(
        err.to_string().contains("resume_from_checkpoint"),
        "unexpected error: {err}"
    );
}

fn class_config(class_dir: &Path, out: &Path) -> DreamBoothConfig {
    let mut c = DreamBoothConfig::lora_defaults();
    c.instance_data_dir = data();
    c.instance_prompt = "a photo of sks dog".into();
    c.class_data_dir = Some(class_dir.to_path_buf());
    c.class_prompt = Some("a photo of dog".into());
    c.with_prior_preservation = true;
    c.num_class_images = 5;
    c.sample_batch_size = 2;
    c.class_num_inference_steps = 2;
    c.train.pretrained_model = sd1();
    c.train.output_dir = out.to_path_buf();
    c.train.resolution = 32;
    c.train.train_batch_size = 1;
    c.train.lr_warmup_steps = 0;
    c.train.seed = 3;
    c.train.show_progress = false;
    c
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn class_images_fill_the_folder_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    // A missing folder is created and filled.
    let a = dir.path().join("a/class");
    let written = generate_class_images(&class_config(&a, dir.path()), &device()).unwrap();
    assert_eq!(written.len(), 5);
    let names = sorted_names(&a);
    assert_eq!(names.len(), 5);
    for (i, name) in names.iter().enumerate() {
        let (index, rest) = name.split_once('-').unwrap();
        assert_eq!(index, i.to_string(), "{name}");
        let hash = rest.strip_suffix(".png").unwrap();
        assert_eq!(hash.len(), 40, "{name}");
        // The name carries the SHA-1 of the image's RGB bytes, as the scripts name it.
        let image = diffusion_core::image::load_image(a.join(name)).unwrap();
        assert_eq!(
            diffusion_train::class_images::sha1_hex(image.as_raw()),
            hash
        );
    }
    // Distinct seeds per image: not five copies of one image.
    let hashes: std::collections::BTreeSet<&str> =
        names.iter().map(|n| n.split_once('-').unwrap().1).collect();
    assert_eq!(hashes.len(), 5);
    // A full folder is left alone.
    assert!(
        generate_class_images(&class_config(&a, dir.path()), &device())
            .unwrap()
            .is_empty()
    );

    // Two existing images are kept and counted; the three new ones are the same files a
    // batch size of 3 gives.
    let b = dir.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    for name in ["0.png", "1.png"] {
        std::fs::copy(data().join(name), b.join(name)).unwrap();
    }
    let mut config = class_config(&b, dir.path());
    config.sample_batch_size = 3;
    let written = generate_class_images(&config, &device()).unwrap();
    assert_eq!(written.len(), 3);
    let names = sorted_names(&b);
    assert_eq!(names.len(), 5);
    assert!(names.contains(&"0.png".to_string()) && names.contains(&"1.png".to_string()));
    assert_eq!(
        std::fs::read(b.join("0.png")).unwrap(),
        std::fs::read(data().join("0.png")).unwrap()
    );
    for (i, name) in sorted_names(&a).iter().enumerate().skip(2) {
        assert!(name.starts_with(&format!("{i}-")));
        assert_eq!(
            std::fs::read(b.join(name)).unwrap(),
            std::fs::read(a.join(name)).unwrap(),
            "image {i} depends on the batch size"
        );
    }
}

#[test]
fn dreambooth_text_encoder_lora_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("class");
    let config = |out: &Path, resume: Option<&str>| {
        let mut c = class_config(&class, out);
        c.num_class_images = 2;
        c.train_text_encoder = true;
        c.train.lora = Some(LoraTrainConfig {
            rank: 2,
            ..LoraTrainConfig::default()
        });
        c.train.learning_rate = 1e-3;
        c.train.max_train_steps = Some(4);
        c.train.checkpointing_steps = 2;
        c.train.resume_from_checkpoint = resume.map(String::from);
        c
    };
    let straight = dir.path().join("straight");
    let report = train_dreambooth(&config(&straight, None), &device()).unwrap();
    assert_eq!(report.steps.len(), 4);
    assert_eq!(sorted_names(&class).len(), 2, "class images generated");
    let file = SafetensorsFile::open(straight.join("pytorch_lora_weights.safetensors")).unwrap();
    let keys = file.keys();
    assert!(keys.iter().any(|k| k.starts_with("unet.")));
    assert_eq!(
        keys.iter()
            .filter(|k| k.starts_with("text_encoder.") && k.ends_with("linear_layer.up.weight"))
            .count(),
        8
    );
    let trained_up = file
        .read_f32("text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight")
        .unwrap()
        .0;
    assert!(
        trained_up.iter().any(|&v| v != 0.0),
        "the text-encoder LoRA did not move from its zero init"
    );

    let resumed = dir.path().join("resumed");
    train_dreambooth(&config(&resumed, None), &device()).unwrap();
    kill_after_step_2(&resumed);
    std::fs::remove_file(resumed.join("pytorch_lora_weights.safetensors")).unwrap();
    let report = train_dreambooth(&config(&resumed, Some("latest")), &device()).unwrap();
    assert_eq!(report.start_step, 2);
    assert_eq!(log(&resumed), log(&straight));
    assert_eq!(
        std::fs::read(resumed.join("pytorch_lora_weights.safetensors")).unwrap(),
        std::fs::read(straight.join("pytorch_lora_weights.safetensors")).unwrap()
    );
}

/// DreamBooth LoRA with prior preservation over two devices (one instance image and its class
/// image each) takes the steps of the one-device run on two instance images, and resumes
/// exactly.
#[test]
fn dreambooth_lora_over_two_devices_equals_the_global_batch_run_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("class");
    let config = |out: &Path, devices: usize, resume: Option<&str>| {
        let mut c = class_config(&class, out);
        c.num_class_images = 2;
        c.train.lora = Some(LoraTrainConfig {
            rank: 2,
            ..LoraTrainConfig::default()
        });
        c.train.learning_rate = 1e-3;
        c.train.max_train_steps = Some(4);
        c.train.checkpointing_steps = 2;
        c.train.train_batch_size = if devices == 0 { 2 } else { 1 };
        c.train.devices = vec!["cpu".into(); devices];
        c.train.resume_from_checkpoint = resume.map(String::from);
        c
    };
    let factors = |out: &Path| {
        let file = SafetensorsFile::open(out.join("pytorch_lora_weights.safetensors")).unwrap();
        file.keys()
            .iter()
            .map(|k| file.read_f32(k).unwrap().0)
            .collect::<Vec<_>>()
    };
    let one = dir.path().join("one");
    let single = train_dreambooth(&config(&one, 0, None), &device()).unwrap();
    let two = dir.path().join("two");
    let parallel = train_dreambooth(&config(&two, 2, None), &device()).unwrap();
    let losses = crate::max_abs_diff(&single.losses(), &parallel.losses());
    let weights = factors(&one)
        .iter()
        .zip(factors(&two))
        .map(|(a, b)| crate::max_abs_diff(a, &b))
        .fold(0.0f32, f32::max);
    eprintln!("DreamBooth LoRA, 2 devices vs 1: losses {losses:.2e}, saved factors {weights:.2e}");
    assert!(losses <= 1e-5, "losses differ by {losses}");
    assert!(weights <= 1e-5, "saved factors differ by {weights}");

    let straight_log = log(&two);
    let straight_lora = std::fs::read(two.join("pytorch_lora_weights.safetensors")).unwrap();
    kill_after_step_2(&two);
    std::fs::remove_file(two.join("pytorch_lora_weights.safetensors")).unwrap();
    let report = train_dreambooth(&config(&two, 2, Some("latest")), &device()).unwrap();
    assert_eq!(report.start_step, 2);
    assert_eq!(log(&two), straight_log);
    assert_eq!(
        std::fs::read(two.join("pytorch_lora_weights.safetensors")).unwrap(),
        straight_lora
    );
}
