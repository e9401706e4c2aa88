//! `diffusers`: generate and train diffusion models from the terminal.

mod controlnet;
mod edit_cycle;
mod edit_instruct_pix2pix;
mod edit_pix2pix_zero;
mod generate;
mod metadata;
mod output;
mod sample;
mod train;
mod train_concepts;
mod train_controlnet;
mod train_instruct_pix2pix;
mod train_sdxl;

use clap::{Parser, Subcommand};

/// Diffusion models in Rust: diffusers' models, schedulers and pipelines on burn.
#[derive(Parser, Debug)]
#[command(name = "diffusers", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sample images from an unconditional model (DDPMPipeline / DDIMPipeline).
    ///
    /// With no --model, uses the small digits model trained by this project (models/ddpm-digits).
    Sample(sample::SampleArgs),
    /// Text to image with Stable Diffusion 1.x / 2.x or SDXL (StableDiffusionPipeline,
    /// StableDiffusionXLPipeline).
    Txt2img(generate::Txt2ImgArgs),
    /// Image to image: repaint --image guided by the prompt (StableDiffusionImg2ImgPipeline,
    /// StableDiffusionXLImg2ImgPipeline; SDXL refiners too).
    Img2img(generate::Img2ImgArgs),
    /// Inpainting: repaint the white part of --mask in --image (StableDiffusionInpaintPipeline,
    /// StableDiffusionXLInpaintPipeline; 9-channel inpainting checkpoints, or any checkpoint
    /// with the legacy method).
    Inpaint(generate::InpaintArgs),
    /// Text to image steered by a control image (edges, depth, pose, ...) through a ControlNet
    /// (StableDiffusionControlNetPipeline).
    Controlnet(controlnet::ControlNetArgs),
    /// Edit an image by rewording its description (CycleDiffusionPipeline, DDIM): --source-prompt
    /// says what --image shows, --prompt what it should show; what they share is kept.
    EditCycle(edit_cycle::EditCycleArgs),
    /// Edit an image along a text direction, keeping its structure (Pix2Pix Zero,
    /// StableDiffusionPix2PixZeroPipeline): the mean of the --target-prompt captions minus that
    /// of the --source-prompt captions; --image is inverted under its --caption first.
    EditPix2pixZero(edit_pix2pix_zero::EditPix2PixZeroArgs),
    /// Edit an image by following a written instruction (StableDiffusionInstructPix2PixPipeline):
    /// --prompt says what to change in --image ("make it winter").
    EditInstructPix2pix(edit_instruct_pix2pix::EditInstructPix2PixArgs),
    /// Train a model (diffusers' training examples as commands).
    #[command(subcommand)]
    Train(train::TrainCommand),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Txt2img(args) => generate::txt2img(args),
        Command::Img2img(args) => generate::img2img(args),
        Command::Inpaint(args) => generate::inpaint(args),
        Command::Controlnet(args) => controlnet::run(args),
        Command::EditCycle(args) => edit_cycle::run(args),
        Command::EditPix2pixZero(args) => edit_pix2pix_zero::run(args),
        Command::EditInstructPix2pix(args) => edit_instruct_pix2pix::run(args),
        Command::Train(command) => train::run(command),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
