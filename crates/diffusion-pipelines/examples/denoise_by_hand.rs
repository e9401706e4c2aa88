//! The "Understanding diffusion" walkthrough in Rust: a UNet2DModel and a DDPMScheduler loaded
//! separately, and the denoising loop written by hand.
//!
//! ```bash
//! cargo run -p diffusion-pipelines --example denoise_by_hand -- [MODEL_DIR] [OUT.png]
//! ```
//! MODEL_DIR is a DDPMPipeline folder (default: the bundled models/ddpm-digits).

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::{nhwc_to_images, save_png, tensor_to_nhwc};
use diffusion_core::tensor::randn_tensor;
use diffusion_core::{Device, NoiseSource, TorchGenerator};
use diffusion_models::ModelMixin;
use diffusion_models::UNet2DModel;
use diffusion_models::unets::unet_2d::SampleSize;
use diffusion_schedulers::{ConfiguredScheduler, DDPMScheduler, Scheduler, StepOptions};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = args
        .next()
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/ddpm-digits").into());
    let out = args.next().unwrap_or_else(|| "denoised.png".into());
    let device = Device::flex();

    // Load the model and the scheduler.
    let model = UNet2DModel::from_pretrained(format!("{model_dir}/unet"), &device)?;
    let mut scheduler = DDPMScheduler::load(format!("{model_dir}/scheduler"))?;

    // Set the number of timesteps: 50 evenly spaced ones out of the 1000 trained.
    scheduler.set_timesteps(50)?;
    println!("timesteps: {:?}...", &scheduler.timesteps()[..5]);

    // Random noise the shape of the output, from a torch-compatible generator: the same seed
    // gives the same noise as torch.randn(..., generator=torch.Generator().manual_seed(0)).
    let size = match model.config().sample_size {
        Some(SampleSize::Square(s)) => s,
        Some(SampleSize::Rect([h, _])) => h,
        None => anyhow::bail!("the model config has no sample_size"),
    };
    let channels = model.config().in_channels;
    let mut generator = TorchGenerator::new(0);
    let mut input: Tensor<4> = randn_tensor(
        [1, channels, size, size],
        NoiseSource::Single(&mut generator),
        &device,
    )?;

    // The denoising loop: the model predicts the noise, the scheduler removes some of it.
    for &t in scheduler.timesteps().to_vec().iter() {
        let noisy_residual = model.forward(
            input.clone(),
            Tensor::from_floats([t as f32], &device),
            None,
        )?;
        input = scheduler
            .step(
                noisy_residual,
                t,
                input,
                StepOptions::default().with_generator(&mut generator),
            )?
            .prev_sample;
    }

    // [-1, 1] to [0, 1], then to 8-bit pixels.
    let image = (input / 2.0 + 0.5).clamp(0.0, 1.0);
    let pixels = nhwc_to_images(&tensor_to_nhwc(image));
    save_png(&out, &pixels[0], &[])?;
    println!("wrote {out}");
    Ok(())
}
