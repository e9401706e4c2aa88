//! Host and tensor overhead of a whole denoising loop per scheduler, without a model: 30 steps
//! of `scale_model_input` + `step` on Stable Diffusion 1.5-sized latents (`[2, 4, 64, 64]`, the
//! batch classifier-free guidance runs), the model output replaced by a fixed tensor. Compare
//! the per-step time with one UNet forward (benches/sd_models.rs): it should be negligible.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use diffusion_benches::cpu_devices;
use diffusion_core::NoiseSource;
use diffusion_core::TorchGenerator;
use diffusion_core::burn::tensor::{Distribution, Tensor};
use diffusion_schedulers::{AnyScheduler, Scheduler, SchedulerKind, SchedulerSpec, StepOptions};

const STEPS: usize = 30;

/// diffusers' Stable Diffusion 1.5 scheduler config, as every scheduler is built from it.
fn sd15_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
    })
}

fn bench_loops(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler_loop_30_steps");
    group.sample_size(10);
    let base = AnyScheduler::from_config_value(sd15_config(), std::path::Path::new("sd15"))
        .expect("SD 1.5 scheduler config");
    for (device_name, device) in cpu_devices() {
        let latents = Tensor::<4>::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
        let model_output =
            Tensor::<4>::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
        for kind in SchedulerKind::ALL {
            if matches!(
                kind,
                SchedulerKind::FlowMatchEuler
                    | SchedulerKind::FlowMatchHeun
                    | SchedulerKind::RePaint
            ) {
                // Flow-matching schedulers belong to flow models, not to this config; RePaint
                // steps need an image and mask (RePaintPipeline).
                continue;
            }
            let spec = SchedulerSpec::parse(kind.class_name()).expect("known class");
            let mut scheduler = AnyScheduler::convert(&base, &spec).expect("converts");
            let id = BenchmarkId::new(device_name, kind.class_name());
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    scheduler.set_timesteps(STEPS).expect("set_timesteps");
                    let mut generator = TorchGenerator::new(0);
                    let mut x = latents.clone();
                    for t in scheduler.timesteps().to_vec() {
                        let input = scheduler.scale_model_input(x.clone(), t).expect("scale");
                        drop(input);
                        let options = StepOptions {
                            generator: Some(NoiseSource::Single(&mut generator)),
                            ..StepOptions::default()
                        };
                        let options = if kind.step_takes_generator() {
                            options
                        } else {
                            StepOptions::default()
                        };
                        x = scheduler
                            .step(model_output.clone(), t, x, options)
                            .expect("step")
                            .prev_sample;
                    }
                    x.into_data()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_loops);
criterion_main!(benches);
