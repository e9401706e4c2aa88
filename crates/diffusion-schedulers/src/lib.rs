//! diffusers' noise schedulers on burn.
//!
//! Every scheduler keeps its schedule maths on the host in `f64` and touches tensors only in
//! [`Scheduler::step`], [`Scheduler::scale_model_input`], [`Scheduler::add_noise`] and
//! [`Scheduler::get_velocity`]. Module paths mirror diffusers' (`schedulers/scheduling_ddim.py`
//! is [`scheduling_ddim`]), configs are serde mirrors of `scheduler_config.json` whose `Default`
//! is the Python `__init__` default, and [`AnyScheduler`] picks a scheduler at run time from a
//! class name or an A1111 alias.
//!
//! # Precision
//!
//! Parity with diffusers comes first. Schedules are `Vec<f64>` holding exactly the float32
//! values diffusers holds. Per-step scalars are evaluated in the precision diffusers evaluates
//! them: DDPM and DDIM compute their coefficients on 0-d float32 tensors, and near `t = 0`
//! `1 - alpha_t / alpha_{t-1}` cancels enough that an `f64` evaluation moves diffusers' own
//! DDPM test loop sum by 0.02, twice its tolerance; so those coefficients are float32 here too.
//! The sigma schedulers likewise keep diffusers' split: sigma spacings (Karras, exponential,
//! `np.interp`) in `f64` as numpy computes them, stored sigmas and step scalars in float32 as
//! torch holds them. Tensor arithmetic follows diffusers' operation order.
//!
//! # Randomness
//!
//! Noise is never drawn from a hidden global generator: a step that needs noise takes a
//! [`diffusion_core::TorchGenerator`] (or caller-made noise) through [`StepOptions`] and fails
//! with a typed error without one. Draws follow `torch.randn` on a CPU generator, so a seeded
//! run reproduces a seeded diffusers run. The exception is
//! [`CosineDPMSolverMultistepScheduler`], whose noise diffusers draws from torchsde's Brownian
//! tree: there the step takes its noise as `variance_noise`. [`DPMSolverSDEScheduler`] draws
//! from a port of that tree ([`brownian_tree`]) seeded by `noise_sampler_seed`, or by an
//! integer drawn from the step's generator where diffusers draws it from torch's global one.
//!
//! ```no_run
//! use diffusion_core::tensor::randn_tensor;
//! use diffusion_core::{Device, NoiseSource, TorchGenerator};
//! use diffusion_schedulers::{AnyScheduler, Scheduler, SchedulerSpec, StepOptions};
//!
//! # fn main() -> diffusion_core::Result<()> {
//! let device = Device::default();
//! let model_scheduler = AnyScheduler::from_config_file("model/scheduler")?;
//! let mut scheduler =
//!     AnyScheduler::convert(&model_scheduler, &SchedulerSpec::parse("DPM++ 2M Karras")?)?;
//! scheduler.set_timesteps(25)?;
//! let mut generator = TorchGenerator::new(0);
//! let mut latents = randn_tensor([1, 4, 64, 64], NoiseSource::Single(&mut generator), &device)?
//!     .mul_scalar(scheduler.init_noise_sigma());
//! for t in scheduler.timesteps().to_vec() {
//!     let input = scheduler.scale_model_input(latents.clone(), t)?;
//!     let noise_pred = input; // the UNet goes here
//!     latents = scheduler
//!         .step(noise_pred, t, latents, StepOptions::default().with_generator(&mut generator))?
//!         .prev_sample;
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod any_scheduler;
pub mod brownian_tree;
pub mod ops;
pub mod schedule;
pub mod scheduler;
pub mod scheduling_consistency_models;
pub mod scheduling_cosine_dpmsolver_multistep;
pub mod scheduling_ddim;
pub mod scheduling_ddim_inverse;
pub mod scheduling_ddim_parallel;
pub mod scheduling_ddpm;
pub mod scheduling_ddpm_parallel;
pub mod scheduling_deis_multistep;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_dpmsolver_multistep_inverse;
pub mod scheduling_dpmsolver_sde;
pub mod scheduling_dpmsolver_singlestep;
pub mod scheduling_edm_dpmsolver_multistep;
pub mod scheduling_edm_euler;
pub mod scheduling_euler_ancestral_discrete;
pub mod scheduling_euler_discrete;
pub mod scheduling_flow_match_euler_discrete;
pub mod scheduling_flow_match_heun_discrete;
pub mod scheduling_heun_discrete;
pub mod scheduling_ipndm;
pub mod scheduling_k_dpm_2_ancestral_discrete;
pub mod scheduling_k_dpm_2_discrete;
pub mod scheduling_lcm;
pub mod scheduling_lms_discrete;
pub mod scheduling_pndm;
pub mod scheduling_repaint;
pub mod scheduling_sde_ve;
pub mod scheduling_tcd;
pub mod scheduling_unipc_multistep;
pub mod sigmas;

pub use any_scheduler::{AnyScheduler, SchedulerKind, SchedulerSpec};
pub use schedule::{BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
pub use scheduler::{ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput};
pub use scheduling_consistency_models::{
    CMStochasticIterativeScheduler, CMStochasticIterativeSchedulerConfig,
};
pub use scheduling_cosine_dpmsolver_multistep::{
    CosineDPMSolverMultistepScheduler, CosineDPMSolverMultistepSchedulerConfig,
};
pub use scheduling_ddim::{DDIMScheduler, DDIMSchedulerConfig};
pub use scheduling_ddim_inverse::{DDIMInverseScheduler, DDIMInverseSchedulerConfig};
pub use scheduling_ddim_parallel::{DDIMParallelScheduler, DDIMParallelSchedulerConfig};
pub use scheduling_ddpm::{DDPMScheduler, DDPMSchedulerConfig, VarianceType};
pub use scheduling_ddpm_parallel::{DDPMParallelScheduler, DDPMParallelSchedulerConfig};
pub use scheduling_deis_multistep::{DEISMultistepScheduler, DEISMultistepSchedulerConfig};
pub use scheduling_dpmsolver_multistep::{
    DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig,
};
pub use scheduling_dpmsolver_multistep_inverse::{
    DPMSolverMultistepInverseScheduler, DPMSolverMultistepInverseSchedulerConfig,
};
pub use scheduling_dpmsolver_sde::{DPMSolverSDEScheduler, DPMSolverSDESchedulerConfig};
pub use scheduling_dpmsolver_singlestep::{
    DPMSolverSinglestepScheduler, DPMSolverSinglestepSchedulerConfig,
};
pub use scheduling_edm_dpmsolver_multistep::{
    EDMDPMSolverMultistepScheduler, EDMDPMSolverMultistepSchedulerConfig,
};
pub use scheduling_edm_euler::{EDMEulerScheduler, EDMEulerSchedulerConfig};
pub use scheduling_euler_ancestral_discrete::{
    EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerConfig,
};
pub use scheduling_euler_discrete::{EulerDiscreteScheduler, EulerDiscreteSchedulerConfig};
pub use scheduling_flow_match_euler_discrete::{
    FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerConfig,
};
pub use scheduling_flow_match_heun_discrete::{
    FlowMatchHeunDiscreteScheduler, FlowMatchHeunDiscreteSchedulerConfig,
};
pub use scheduling_heun_discrete::{HeunDiscreteScheduler, HeunDiscreteSchedulerConfig};
pub use scheduling_ipndm::{IPNDMScheduler, IPNDMSchedulerConfig};
pub use scheduling_k_dpm_2_ancestral_discrete::{
    KDPM2AncestralDiscreteScheduler, KDPM2AncestralDiscreteSchedulerConfig,
};
pub use scheduling_k_dpm_2_discrete::{KDPM2DiscreteScheduler, KDPM2DiscreteSchedulerConfig};
pub use scheduling_lcm::{LCMScheduler, LCMSchedulerConfig};
pub use scheduling_lms_discrete::{LMSDiscreteScheduler, LMSDiscreteSchedulerConfig};
pub use scheduling_pndm::{PNDMScheduler, PNDMSchedulerConfig};
pub use scheduling_repaint::{RePaintScheduler, RePaintSchedulerConfig};
pub use scheduling_sde_ve::{ScoreSdeVeScheduler, ScoreSdeVeSchedulerConfig, SdeVeOutput};
pub use scheduling_tcd::{TCDScheduler, TCDSchedulerConfig};
pub use scheduling_unipc_multistep::{UniPCMultistepScheduler, UniPCMultistepSchedulerConfig};
