//! Every scheduler class runs inside the Stable Diffusion loop: the pipeline passes each one
//! exactly the step options its `step` takes (diffusers' `prepare_extra_step_kwargs`), so a
//! stochastic scheduler gets the generator and a deterministic one is not handed options it
//! refuses. Outputs must be finite images of the right shape. The one exception is RePaint,
//! whose steps need the known image and mask (RePaintPipeline): it must say so, naming
//! `original_image`, as its `step` does in diffusers.

use diffusion_core::image::{ImageOutput, OutputType};
use diffusion_core::{Device, Error};
use diffusion_pipelines::{
    DDPMPipeline, Generators, StableDiffusionArgs, StableDiffusionPipeline, UnconditionalArgs,
};
use diffusion_schedulers::{AnyScheduler, SchedulerKind, SchedulerSpec};

use crate::common::fixtures;

/// The output of a run that must succeed, or `None` after checking RePaint's typed refusal.
fn expect_runs<T>(kind: SchedulerKind, out: diffusion_core::Result<T>) -> Option<T> {
    match (kind, out) {
        (SchedulerKind::RePaint, Err(Error::InvalidArgument { name, .. })) => {
            assert_eq!(name, "original_image");
            None
        }
        (SchedulerKind::RePaint, Ok(_)) => panic!("RePaint ran without an image and mask"),
        (_, Ok(out)) => Some(out),
        (kind, Err(e)) => panic!("{}: {e}", kind.class_name()),
    }
}

#[test]
fn every_scheduler_runs_in_the_stable_diffusion_loop() {
    let device = Device::flex();
    let folder = fixtures().join("pipelines/sd/sd1");
    let base = StableDiffusionPipeline::from_pretrained(folder.to_str().unwrap(), &device).unwrap();
    for kind in SchedulerKind::ALL {
        let mut pipe = StableDiffusionPipeline::from_pipe(&base.components);
        pipe.components
            .set_scheduler(kind.class_name())
            .unwrap_or_else(|e| panic!("{}: {e}", kind.class_name()));
        let out = pipe.call(StableDiffusionArgs {
            prompt: vec!["a photo of an astronaut riding a horse".into()],
            num_inference_steps: 4,
            generator: Generators::Seed(0),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        });
        let Some(out) = expect_runs(*kind, out) else {
            continue;
        };
        let ImageOutput::Array(images) = out.images else {
            panic!("{}: expected an array", kind.class_name());
        };
        assert_eq!(images.shape, vec![1, 32, 32, 3], "{}", kind.class_name());
        assert!(
            images.data.iter().all(|v| v.is_finite()),
            "{}: non-finite output",
            kind.class_name()
        );
    }
}

/// The same for the unconditional loop (DDPMPipeline with a swapped scheduler, as `diffusers
/// sample --scheduler` runs it).
#[test]
fn every_scheduler_runs_in_the_unconditional_loop() {
    let device = Device::flex();
    let folder = fixtures().join("pipelines/unconditional/ddpm_tiny");
    for kind in SchedulerKind::ALL {
        let mut pipe = DDPMPipeline::from_pretrained(&folder, &device).unwrap();
        let spec = SchedulerSpec::parse(kind.class_name()).unwrap();
        pipe.scheduler = AnyScheduler::convert(&pipe.scheduler, &spec)
            .unwrap_or_else(|e| panic!("{}: {e}", kind.class_name()));
        let out = pipe.call(UnconditionalArgs {
            batch_size: 2,
            generator: Generators::Seed(0),
            num_inference_steps: Some(4),
            output_type: OutputType::Np,
            progress: false,
            ..Default::default()
        });
        let Some(out) = expect_runs(*kind, out) else {
            continue;
        };
        let ImageOutput::Array(images) = out.images else {
            panic!("{}: expected an array", kind.class_name());
        };
        assert_eq!(images.shape[0], 2, "{}", kind.class_name());
        assert!(
            images.data.iter().all(|v| v.is_finite()),
            "{}: non-finite output",
            kind.class_name()
        );
    }
}
