//! Text-to-image, image-to-image and inpainting with one set of Stable Diffusion components,
//! shared between the three pipelines without reloading.
//!
//! ```bash
//! cargo run -p diffusion-pipelines --example stable_diffusion -- [MODEL] [PROMPT] [OUT_PREFIX]
//! ```
//! MODEL is a diffusers Stable Diffusion 1.x/2.x folder or Hub id (default: the tiny random
//! test pipeline in fixtures/pipelines/sd/sd1, which draws noise-like pictures in a second).
//! Writes `OUT_PREFIX-txt2img.png`, `-img2img.png` and `-inpaint.png`.

use diffusion_core::Device;
use diffusion_core::image::{ImageOutput, RgbImage, save_png};
use diffusion_pipelines::{
    Generators, StableDiffusionArgs, StableDiffusionImg2ImgArgs, StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintArgs, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
    StepControl,
};

fn first_image(out: ImageOutput) -> anyhow::Result<RgbImage> {
    match out {
        ImageOutput::Images(mut images) if !images.is_empty() => Ok(images.remove(0)),
        _ => anyhow::bail!("expected images"),
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/pipelines/sd/sd1"
        )
        .into()
    });
    let prompt = args
        .next()
        .unwrap_or_else(|| "a photo of an astronaut riding a horse".into());
    let prefix = args.next().unwrap_or_else(|| "stable-diffusion".into());
    let device = Device::default();

    let mut txt2img = StableDiffusionPipeline::from_pretrained(&model, &device)?;
    txt2img.components.set_scheduler("DPM++ 2M")?;
    let image = first_image(
        txt2img
            .call(StableDiffusionArgs {
                prompt: vec![prompt.clone()],
                num_inference_steps: 20,
                generator: Generators::Seed(0),
                // Report progress through the step callback instead of the built-in bar.
                progress: false,
                callback: Some(Box::new(|info| {
                    eprintln!("txt2img step {}/{}", info.step + 1, info.num_steps);
                    StepControl::Continue
                })),
                ..Default::default()
            })?
            .images,
    )?;
    save_png(format!("{prefix}-txt2img.png"), &image, &[])?;

    // The same weights, another pipeline.
    let mut img2img = StableDiffusionImg2ImgPipeline::from_pipe(&txt2img);
    let varied = first_image(
        img2img
            .call(StableDiffusionImg2ImgArgs {
                prompt: vec![format!("{prompt}, oil painting")],
                image: Some(image.clone().into()),
                strength: 0.6,
                num_inference_steps: 20,
                generator: Generators::Seed(1),
                ..Default::default()
            })?
            .images,
    )?;
    save_png(format!("{prefix}-img2img.png"), &varied, &[])?;

    // Repaint the centre quarter (a 4-channel model takes diffusers' legacy inpainting path).
    let (w, h) = image.dimensions();
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let inside = (w / 4..3 * w / 4).contains(&x) && (h / 4..3 * h / 4).contains(&y);
            pixels.extend([if inside { 255 } else { 0 }; 3]);
        }
    }
    let mask = RgbImage::from_raw(w, h, pixels).ok_or_else(|| anyhow::anyhow!("mask size"))?;
    let mut inpaint = StableDiffusionInpaintPipeline::from_pipe(&img2img);
    let repainted = first_image(
        inpaint
            .call(StableDiffusionInpaintArgs {
                prompt: vec![prompt],
                image: Some(image.into()),
                mask_image: Some(mask.into()),
                height: Some(h as usize),
                width: Some(w as usize),
                num_inference_steps: 20,
                generator: Generators::Seed(2),
                ..Default::default()
            })?
            .images,
    )?;
    save_png(format!("{prefix}-inpaint.png"), &repainted, &[])?;
    eprintln!("wrote {prefix}-{{txt2img,img2img,inpaint}}.png");
    Ok(())
}
