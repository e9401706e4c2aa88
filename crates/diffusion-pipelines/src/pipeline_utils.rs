//! What every pipeline shares: seeds and generators, progress bars, step callbacks, outputs.

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::image::ImageOutput;
use diffusion_core::{Error, NoiseSource, Result, TorchGenerator};

/// Where a pipeline's randomness comes from, as diffusers' `generator=` argument.
#[derive(Clone, Debug, Default)]
pub enum Generators {
    /// A fresh random seed (like calling a pipeline without a generator).
    #[default]
    Random,
    /// One generator for the whole batch: `torch.Generator().manual_seed(seed)`.
    Seed(u64),
    /// One generator per image: `[torch.Generator().manual_seed(s) for s in seeds]`, so each image
    /// depends only on its own seed.
    Seeds(Vec<u64>),
}

impl Generators {
    /// Build the generators for a batch of `batch_size` images.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a seed list does not match the batch size.
    pub fn instantiate(&self, batch_size: usize) -> Result<Vec<TorchGenerator>> {
        match self {
            Self::Random => Ok(vec![TorchGenerator::new(random_seed())]),
            Self::Seed(s) => Ok(vec![TorchGenerator::new(*s)]),
            Self::Seeds(seeds) if seeds.len() == batch_size => {
                Ok(seeds.iter().map(|&s| TorchGenerator::new(s)).collect())
            }
            Self::Seeds(seeds) => Err(Error::invalid_argument(
                "generator",
                format!(
                    "{} seeds were given for a batch of {batch_size} images; give one seed, or \
                     one per image",
                    seeds.len()
                ),
            )),
        }
    }

    /// The seed of each image, for metadata (`None` for random).
    pub fn seeds(&self) -> Option<Vec<u64>> {
        match self {
            Self::Random => None,
            Self::Seed(s) => Some(vec![*s]),
            Self::Seeds(s) => Some(s.clone()),
        }
    }
}

/// A seed from the clock and process id, for runs without a fixed seed.
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 finaliser: nearby clock values give unrelated seeds.
    let mut z = nanos ^ ((std::process::id() as u64) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 0x7fff_ffff_ffff_ffff
}

/// The noise source over a list of generators: one shared, or one per image.
pub fn noise_source(generators: &mut [TorchGenerator]) -> NoiseSource<'_> {
    if generators.len() == 1 {
        NoiseSource::Single(&mut generators[0])
    } else {
        NoiseSource::PerImage(generators)
    }
}

/// What a step callback tells the pipeline.
// Returned once per step; boxing the tensor would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum StepControl {
    /// Go on with the latents as they are.
    Continue,
    /// Go on with these latents instead (diffusers' `callback_on_step_end` returning `latents`).
    ReplaceLatents(Tensor<4>),
    /// Stop denoising now and decode what there is (`pipe._interrupt = True`).
    Interrupt,
}

/// What a step callback sees after each denoising step.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Step number, from 0.
    pub step: usize,
    /// Total number of steps.
    pub num_steps: usize,
    /// The timestep just taken.
    pub timestep: f64,
    /// The latents after the step.
    pub latents: &'a Tensor<4>,
}

/// A boxed step callback (`callback_on_step_end`).
pub type StepCallback<'a> = Box<dyn FnMut(StepInfo<'_>) -> StepControl + 'a>;

/// `callback_on_step_end` after denoising step `step` of `num_steps` (at `timestep`): calls
/// `callback` when there is one, puts the latents it returns in place of `latents`, and says
/// whether it asked to stop (`true`: break out of the loop and decode what there is).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `callback` when it returns latents of another shape.
pub(crate) fn after_step(
    callback: Option<&mut StepCallback<'_>>,
    step: usize,
    num_steps: usize,
    timestep: f64,
    latents: &mut Tensor<4>,
) -> Result<bool> {
    let Some(callback) = callback else {
        return Ok(false);
    };
    let info = StepInfo {
        step,
        num_steps,
        timestep,
        latents,
    };
    match callback(info) {
        StepControl::Continue => Ok(false),
        StepControl::ReplaceLatents(new) => {
            let shape = latents.dims();
            if new.dims() != shape {
                return Err(Error::invalid_argument(
                    "callback",
                    format!(
                        "returned latents of shape {:?}, expected {shape:?}",
                        new.dims()
                    ),
                ));
            }
            *latents = new;
            Ok(false)
        }
        StepControl::Interrupt => Ok(true),
    }
}

/// A progress bar over denoising steps, hidden when disabled or not on a terminal.
pub(crate) fn progress_bar(steps: usize, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} denoising [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A pipeline's result (`ImagePipelineOutput`).
#[derive(Clone, Debug)]
pub struct ImagePipelineOutput {
    /// The images in the requested [`diffusion_core::image::OutputType`].
    pub images: ImageOutput,
    /// Whether a callback interrupted the loop before the last step.
    pub interrupted: bool,
}
