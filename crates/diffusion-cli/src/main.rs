//! `diffusers`: generate and train diffusion models from the terminal.

mod metadata;
mod sample;
mod train;

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
    /// Train a model (diffusers' training examples as commands).
    #[command(subcommand)]
    Train(train::TrainCommand),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Train(command) => train::run(command),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
