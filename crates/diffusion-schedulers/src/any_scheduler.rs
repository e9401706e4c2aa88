//! Runtime choice of scheduler: [`SchedulerKind`] names the classes this crate implements,
//! [`SchedulerSpec`] parses what users type (diffusers class names and A1111 names such as
//! `"DPM++ 2M Karras"`), and [`AnyScheduler`] holds any of them behind the [`Scheduler`] trait.

use std::collections::BTreeSet;
use std::path::Path;

use diffusion_core::burn::tensor::Tensor;
use diffusion_core::{Config, ConfigFile, Error, Result};
use serde_json::{Map, Value};

use crate::scheduler::{
    ConfiguredScheduler, Scheduler, SetTimesteps, StepOptions, StepOutput, config_path,
};
use crate::scheduling_consistency_models::{
    CMStochasticIterativeScheduler, CMStochasticIterativeSchedulerConfig,
};
use crate::scheduling_cosine_dpmsolver_multistep::{
    CosineDPMSolverMultistepScheduler, CosineDPMSolverMultistepSchedulerConfig,
};
use crate::scheduling_ddim::{DDIMScheduler, DDIMSchedulerConfig};
use crate::scheduling_ddim_inverse::{DDIMInverseScheduler, DDIMInverseSchedulerConfig};
use crate::scheduling_ddim_parallel::{DDIMParallelScheduler, DDIMParallelSchedulerConfig};
use crate::scheduling_ddpm::{DDPMScheduler, DDPMSchedulerConfig};
use crate::scheduling_ddpm_parallel::{DDPMParallelScheduler, DDPMParallelSchedulerConfig};
use crate::scheduling_deis_multistep::{DEISMultistepScheduler, DEISMultistepSchedulerConfig};
use crate::scheduling_dpmsolver_multistep::{
    DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig,
};
use crate::scheduling_dpmsolver_multistep_inverse::{
    DPMSolverMultistepInverseScheduler, DPMSolverMultistepInverseSchedulerConfig,
};
use crate::scheduling_dpmsolver_sde::{DPMSolverSDEScheduler, DPMSolverSDESchedulerConfig};
use crate::scheduling_dpmsolver_singlestep::{
    DPMSolverSinglestepScheduler, DPMSolverSinglestepSchedulerConfig,
};
use crate::scheduling_edm_dpmsolver_multistep::{
    EDMDPMSolverMultistepScheduler, EDMDPMSolverMultistepSchedulerConfig,
};
use crate::scheduling_edm_euler::{EDMEulerScheduler, EDMEulerSchedulerConfig};
use crate::scheduling_euler_ancestral_discrete::{
    EulerAncestralDiscreteScheduler, EulerAncestralDiscreteSchedulerConfig,
};
use crate::scheduling_euler_discrete::{EulerDiscreteScheduler, EulerDiscreteSchedulerConfig};
use crate::scheduling_flow_match_euler_discrete::{
    FlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteSchedulerConfig,
};
use crate::scheduling_flow_match_heun_discrete::{
    FlowMatchHeunDiscreteScheduler, FlowMatchHeunDiscreteSchedulerConfig,
};
use crate::scheduling_heun_discrete::{HeunDiscreteScheduler, HeunDiscreteSchedulerConfig};
use crate::scheduling_ipndm::{IPNDMScheduler, IPNDMSchedulerConfig};
use crate::scheduling_k_dpm_2_ancestral_discrete::{
    KDPM2AncestralDiscreteScheduler, KDPM2AncestralDiscreteSchedulerConfig,
};
use crate::scheduling_k_dpm_2_discrete::{KDPM2DiscreteScheduler, KDPM2DiscreteSchedulerConfig};
use crate::scheduling_lcm::{LCMScheduler, LCMSchedulerConfig};
use crate::scheduling_lms_discrete::{LMSDiscreteScheduler, LMSDiscreteSchedulerConfig};
use crate::scheduling_pndm::{PNDMScheduler, PNDMSchedulerConfig};
use crate::scheduling_repaint::{RePaintScheduler, RePaintSchedulerConfig};
use crate::scheduling_sde_ve::{ScoreSdeVeScheduler, ScoreSdeVeSchedulerConfig};
use crate::scheduling_tcd::{TCDScheduler, TCDSchedulerConfig};
use crate::scheduling_unipc_multistep::{UniPCMultistepScheduler, UniPCMultistepSchedulerConfig};

/// The scheduler classes this crate implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SchedulerKind {
    /// [`DDPMScheduler`].
    Ddpm,
    /// [`DDIMScheduler`].
    Ddim,
    /// [`EulerDiscreteScheduler`].
    Euler,
    /// [`EulerAncestralDiscreteScheduler`].
    EulerAncestral,
    /// [`DPMSolverMultistepScheduler`].
    DpmSolverMultistep,
    /// [`PNDMScheduler`].
    Pndm,
    /// [`HeunDiscreteScheduler`].
    Heun,
    /// [`LMSDiscreteScheduler`].
    Lms,
    /// [`DDIMInverseScheduler`].
    DdimInverse,
    /// [`LCMScheduler`].
    Lcm,
    /// [`UniPCMultistepScheduler`].
    UniPc,
    /// [`KDPM2DiscreteScheduler`].
    Kdpm2,
    /// [`KDPM2AncestralDiscreteScheduler`].
    Kdpm2Ancestral,
    /// [`DPMSolverSinglestepScheduler`].
    DpmSolverSinglestep,
    /// [`DEISMultistepScheduler`].
    Deis,
    /// [`FlowMatchEulerDiscreteScheduler`].
    FlowMatchEuler,
    /// [`FlowMatchHeunDiscreteScheduler`].
    FlowMatchHeun,
    /// [`IPNDMScheduler`].
    Ipndm,
    /// [`EDMEulerScheduler`].
    EdmEuler,
    /// [`DPMSolverMultistepInverseScheduler`].
    DpmSolverMultistepInverse,
    /// [`TCDScheduler`].
    Tcd,
    /// [`EDMDPMSolverMultistepScheduler`].
    EdmDpmSolverMultistep,
    /// [`CosineDPMSolverMultistepScheduler`].
    CosineDpmSolverMultistep,
    /// [`CMStochasticIterativeScheduler`].
    CmStochasticIterative,
    /// [`ScoreSdeVeScheduler`].
    ScoreSdeVe,
    /// [`RePaintScheduler`].
    RePaint,
    /// [`DPMSolverSDEScheduler`].
    DpmSolverSde,
    /// [`DDIMParallelScheduler`].
    DdimParallel,
    /// [`DDPMParallelScheduler`].
    DdpmParallel,
}

impl SchedulerKind {
    /// Whether this class's `step` takes `eta` (diffusers' `prepare_extra_step_kwargs` looks
    /// for it in the `step` signature; pipelines pass it only then).
    pub fn step_takes_eta(self) -> bool {
        matches!(self, Self::Ddim | Self::DdimParallel | Self::Tcd)
    }

    /// Whether this class's `step` takes a `generator` (draws noise, or may): pipelines pass
    /// one only then, as diffusers' `prepare_extra_step_kwargs`. Flow-match Euler takes one only
    /// with `stochastic_sampling`, so it is not listed. DPM++ SDE is listed although diffusers'
    /// `step` has no `generator`: without `noise_sampler_seed` it seeds its Brownian tree from
    /// the generator where diffusers uses torch's global one.
    pub fn step_takes_generator(self) -> bool {
        matches!(
            self,
            Self::Ddpm
                | Self::Ddim
                | Self::Tcd
                | Self::Euler
                | Self::EulerAncestral
                | Self::DpmSolverMultistep
                | Self::DpmSolverSinglestep
                | Self::Kdpm2Ancestral
                | Self::EdmEuler
                | Self::EdmDpmSolverMultistep
                | Self::CosineDpmSolverMultistep
                | Self::CmStochasticIterative
                | Self::ScoreSdeVe
                | Self::RePaint
                | Self::Lcm
                | Self::DpmSolverSde
                | Self::DdimParallel
                | Self::DdpmParallel
        )
    }

    /// Every kind, in a stable order.
    pub const ALL: &'static [SchedulerKind] = &[
        SchedulerKind::Ddpm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Pndm,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
        SchedulerKind::DdimInverse,
        SchedulerKind::Lcm,
        SchedulerKind::UniPc,
        SchedulerKind::Kdpm2,
        SchedulerKind::Kdpm2Ancestral,
        SchedulerKind::DpmSolverSinglestep,
        SchedulerKind::Deis,
        SchedulerKind::FlowMatchEuler,
        SchedulerKind::FlowMatchHeun,
        SchedulerKind::Ipndm,
        SchedulerKind::EdmEuler,
        SchedulerKind::DpmSolverMultistepInverse,
        SchedulerKind::Tcd,
        SchedulerKind::EdmDpmSolverMultistep,
        SchedulerKind::CosineDpmSolverMultistep,
        SchedulerKind::CmStochasticIterative,
        SchedulerKind::ScoreSdeVe,
        SchedulerKind::RePaint,
        SchedulerKind::DpmSolverSde,
        SchedulerKind::DdimParallel,
        SchedulerKind::DdpmParallel,
    ];

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddpm => DDPMSchedulerConfig::CLASS_NAME,
            Self::Ddim => DDIMSchedulerConfig::CLASS_NAME,
            Self::Euler => EulerDiscreteSchedulerConfig::CLASS_NAME,
            Self::EulerAncestral => EulerAncestralDiscreteSchedulerConfig::CLASS_NAME,
            Self::DpmSolverMultistep => DPMSolverMultistepSchedulerConfig::CLASS_NAME,
            Self::Pndm => PNDMSchedulerConfig::CLASS_NAME,
            Self::Heun => HeunDiscreteSchedulerConfig::CLASS_NAME,
            Self::Lms => LMSDiscreteSchedulerConfig::CLASS_NAME,
            Self::DdimInverse => DDIMInverseSchedulerConfig::CLASS_NAME,
            Self::Lcm => LCMSchedulerConfig::CLASS_NAME,
            Self::UniPc => UniPCMultistepSchedulerConfig::CLASS_NAME,
            Self::Kdpm2 => KDPM2DiscreteSchedulerConfig::CLASS_NAME,
            Self::Kdpm2Ancestral => KDPM2AncestralDiscreteSchedulerConfig::CLASS_NAME,
            Self::DpmSolverSinglestep => DPMSolverSinglestepSchedulerConfig::CLASS_NAME,
            Self::Deis => DEISMultistepSchedulerConfig::CLASS_NAME,
            Self::FlowMatchEuler => FlowMatchEulerDiscreteSchedulerConfig::CLASS_NAME,
            Self::FlowMatchHeun => FlowMatchHeunDiscreteSchedulerConfig::CLASS_NAME,
            Self::Ipndm => IPNDMSchedulerConfig::CLASS_NAME,
            Self::EdmEuler => EDMEulerSchedulerConfig::CLASS_NAME,
            Self::DpmSolverMultistepInverse => DPMSolverMultistepInverseSchedulerConfig::CLASS_NAME,
            Self::Tcd => TCDSchedulerConfig::CLASS_NAME,
            Self::EdmDpmSolverMultistep => EDMDPMSolverMultistepSchedulerConfig::CLASS_NAME,
            Self::CosineDpmSolverMultistep => CosineDPMSolverMultistepSchedulerConfig::CLASS_NAME,
            Self::CmStochasticIterative => CMStochasticIterativeSchedulerConfig::CLASS_NAME,
            Self::ScoreSdeVe => ScoreSdeVeSchedulerConfig::CLASS_NAME,
            Self::RePaint => RePaintSchedulerConfig::CLASS_NAME,
            Self::DpmSolverSde => DPMSolverSDESchedulerConfig::CLASS_NAME,
            Self::DdimParallel => DDIMParallelSchedulerConfig::CLASS_NAME,
            Self::DdpmParallel => DDPMParallelSchedulerConfig::CLASS_NAME,
        }
    }

    /// The kind whose diffusers class name is `name` (exact spelling).
    ///
    /// # Errors
    /// [`Error::UnknownName`] listing the known class names.
    pub fn from_class_name(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.class_name() == name)
            .ok_or_else(|| unknown(name))
    }

    /// The config keys of this class.
    pub fn known_keys(self) -> BTreeSet<String> {
        match self {
            Self::Ddpm => DDPMSchedulerConfig::known_keys(),
            Self::Ddim => DDIMSchedulerConfig::known_keys(),
            Self::Euler => EulerDiscreteSchedulerConfig::known_keys(),
            Self::EulerAncestral => EulerAncestralDiscreteSchedulerConfig::known_keys(),
            Self::DpmSolverMultistep => DPMSolverMultistepSchedulerConfig::known_keys(),
            Self::Pndm => PNDMSchedulerConfig::known_keys(),
            Self::Heun => HeunDiscreteSchedulerConfig::known_keys(),
            Self::Lms => LMSDiscreteSchedulerConfig::known_keys(),
            Self::DdimInverse => DDIMInverseSchedulerConfig::known_keys(),
            Self::Lcm => LCMSchedulerConfig::known_keys(),
            Self::UniPc => UniPCMultistepSchedulerConfig::known_keys(),
            Self::Kdpm2 => KDPM2DiscreteSchedulerConfig::known_keys(),
            Self::Kdpm2Ancestral => KDPM2AncestralDiscreteSchedulerConfig::known_keys(),
            Self::DpmSolverSinglestep => DPMSolverSinglestepSchedulerConfig::known_keys(),
            Self::Deis => DEISMultistepSchedulerConfig::known_keys(),
            Self::FlowMatchEuler => FlowMatchEulerDiscreteSchedulerConfig::known_keys(),
            Self::FlowMatchHeun => FlowMatchHeunDiscreteSchedulerConfig::known_keys(),
            Self::Ipndm => IPNDMSchedulerConfig::known_keys(),
            Self::EdmEuler => EDMEulerSchedulerConfig::known_keys(),
            Self::DpmSolverMultistepInverse => {
                DPMSolverMultistepInverseSchedulerConfig::known_keys()
            }
            Self::Tcd => TCDSchedulerConfig::known_keys(),
            Self::EdmDpmSolverMultistep => EDMDPMSolverMultistepSchedulerConfig::known_keys(),
            Self::CosineDpmSolverMultistep => CosineDPMSolverMultistepSchedulerConfig::known_keys(),
            Self::CmStochasticIterative => CMStochasticIterativeSchedulerConfig::known_keys(),
            Self::ScoreSdeVe => ScoreSdeVeSchedulerConfig::known_keys(),
            Self::RePaint => RePaintSchedulerConfig::known_keys(),
            Self::DpmSolverSde => DPMSolverSDESchedulerConfig::known_keys(),
            Self::DdimParallel => DDIMParallelSchedulerConfig::known_keys(),
            Self::DdpmParallel => DDPMParallelSchedulerConfig::known_keys(),
        }
    }
}

/// One alias: a user-facing name, the class it selects and the config keys it sets.
struct Alias {
    name: &'static str,
    kind: SchedulerKind,
    overrides: fn() -> Map<String, Value>,
}

/// A1111 sampler names (and other common short names) with the diffusers config they mean,
/// following diffusers' documentation of the A1111 equivalents.
const ALIASES: &[Alias] = &[
    Alias {
        name: "DDIM",
        kind: SchedulerKind::Ddim,
        overrides: Map::new,
    },
    Alias {
        name: "DDPM",
        kind: SchedulerKind::Ddpm,
        overrides: Map::new,
    },
    Alias {
        name: "Euler",
        kind: SchedulerKind::Euler,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(false))]),
    },
    Alias {
        name: "Euler Karras",
        kind: SchedulerKind::Euler,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(true))]),
    },
    Alias {
        name: "Euler a",
        kind: SchedulerKind::EulerAncestral,
        overrides: Map::new,
    },
    Alias {
        name: "DPM++ 2M",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: || dpm_2m("dpmsolver++", false),
    },
    Alias {
        name: "DPM++ 2M Karras",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: || dpm_2m("dpmsolver++", true),
    },
    Alias {
        name: "DPM++ 2M SDE",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: || dpm_2m("sde-dpmsolver++", false),
    },
    Alias {
        name: "DPM++ 2M SDE Karras",
        kind: SchedulerKind::DpmSolverMultistep,
        overrides: || dpm_2m("sde-dpmsolver++", true),
    },
    Alias {
        name: "PLMS",
        kind: SchedulerKind::Pndm,
        overrides: || overrides(&[("skip_prk_steps", Value::Bool(true))]),
    },
    Alias {
        name: "Heun",
        kind: SchedulerKind::Heun,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(false))]),
    },
    Alias {
        name: "LMS",
        kind: SchedulerKind::Lms,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(false))]),
    },
    Alias {
        name: "LMS Karras",
        kind: SchedulerKind::Lms,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(true))]),
    },
    Alias {
        name: "LCM",
        kind: SchedulerKind::Lcm,
        overrides: Map::new,
    },
    Alias {
        name: "UniPC",
        kind: SchedulerKind::UniPc,
        overrides: Map::new,
    },
    // diffusers' table of A1111 names maps "DPM++ SDE" to the singlestep solver, and the names
    // follow that table; k-diffusion's own `sample_dpmpp_sde` is DPMSolverSDEScheduler, which
    // is chosen by its class name.
    Alias {
        name: "DPM++ SDE",
        kind: SchedulerKind::DpmSolverSinglestep,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(false))]),
    },
    Alias {
        name: "DPM++ SDE Karras",
        kind: SchedulerKind::DpmSolverSinglestep,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(true))]),
    },
    Alias {
        name: "DPM2",
        kind: SchedulerKind::Kdpm2,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(false))]),
    },
    Alias {
        name: "DPM2 Karras",
        kind: SchedulerKind::Kdpm2,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(true))]),
    },
    Alias {
        name: "DPM2 a",
        kind: SchedulerKind::Kdpm2Ancestral,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(false))]),
    },
    Alias {
        name: "DPM2 a Karras",
        kind: SchedulerKind::Kdpm2Ancestral,
        overrides: || overrides(&[("use_karras_sigmas", Value::Bool(true))]),
    },
];

fn overrides(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// DPM++ 2M: second-order multistep DPM-Solver++ (or its SDE variant), with or without Karras
/// sigmas.
fn dpm_2m(algorithm: &str, karras: bool) -> Map<String, Value> {
    overrides(&[
        ("algorithm_type", Value::String(algorithm.into())),
        ("solver_order", Value::from(2)),
        ("use_karras_sigmas", Value::Bool(karras)),
    ])
}

/// A scheduler choice as a user writes it: the class and the config overrides its name implies
/// (A1111's "DPM++ 2M Karras" is a DPM-Solver with Karras sigmas, for instance).
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerSpec {
    /// The class.
    pub kind: SchedulerKind,
    /// Config keys the name sets, applied over the model's scheduler config.
    pub overrides: Map<String, Value>,
}

impl SchedulerSpec {
    /// Parse a diffusers class name (`"DDIMScheduler"`) or an alias (`"DDIM"`); aliases are
    /// matched without regard to case.
    ///
    /// # Errors
    /// [`Error::UnknownName`] listing every accepted name.
    pub fn parse(name: &str) -> Result<Self> {
        let trimmed = name.trim();
        if let Ok(kind) = SchedulerKind::from_class_name(trimmed) {
            return Ok(Self {
                kind,
                overrides: Map::new(),
            });
        }
        ALIASES
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(trimmed))
            .map(|a| Self {
                kind: a.kind,
                overrides: (a.overrides)(),
            })
            .ok_or_else(|| unknown(name))
    }

    /// Every name [`Self::parse`] accepts: class names, then aliases.
    pub fn known_names() -> Vec<&'static str> {
        SchedulerKind::ALL
            .iter()
            .map(|k| k.class_name())
            .chain(ALIASES.iter().map(|a| a.name))
            .collect()
    }
}

fn unknown(name: &str) -> Error {
    Error::UnknownName {
        kind: "scheduler",
        name: name.to_string(),
        known: SchedulerSpec::known_names().join(", "),
    }
}

/// Any scheduler of this crate, chosen at run time.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AnyScheduler {
    /// A [`DDPMScheduler`].
    Ddpm(DDPMScheduler),
    /// A [`DDIMScheduler`].
    Ddim(DDIMScheduler),
    /// An [`EulerDiscreteScheduler`].
    Euler(EulerDiscreteScheduler),
    /// An [`EulerAncestralDiscreteScheduler`].
    EulerAncestral(EulerAncestralDiscreteScheduler),
    /// A [`DPMSolverMultistepScheduler`].
    DpmSolverMultistep(DPMSolverMultistepScheduler),
    /// A [`PNDMScheduler`].
    Pndm(PNDMScheduler),
    /// A [`HeunDiscreteScheduler`].
    Heun(HeunDiscreteScheduler),
    /// An [`LMSDiscreteScheduler`].
    Lms(LMSDiscreteScheduler),
    /// A [`DDIMInverseScheduler`].
    DdimInverse(DDIMInverseScheduler),
    /// An [`LCMScheduler`].
    Lcm(LCMScheduler),
    /// A [`UniPCMultistepScheduler`].
    UniPc(UniPCMultistepScheduler),
    /// A [`KDPM2DiscreteScheduler`].
    Kdpm2(KDPM2DiscreteScheduler),
    /// A [`KDPM2AncestralDiscreteScheduler`].
    Kdpm2Ancestral(KDPM2AncestralDiscreteScheduler),
    /// A [`DPMSolverSinglestepScheduler`].
    DpmSolverSinglestep(DPMSolverSinglestepScheduler),
    /// A [`DEISMultistepScheduler`].
    Deis(DEISMultistepScheduler),
    /// A [`FlowMatchEulerDiscreteScheduler`].
    FlowMatchEuler(FlowMatchEulerDiscreteScheduler),
    /// A [`FlowMatchHeunDiscreteScheduler`].
    FlowMatchHeun(FlowMatchHeunDiscreteScheduler),
    /// An [`IPNDMScheduler`].
    Ipndm(IPNDMScheduler),
    /// An [`EDMEulerScheduler`].
    EdmEuler(EDMEulerScheduler),
    /// A [`DPMSolverMultistepInverseScheduler`].
    DpmSolverMultistepInverse(DPMSolverMultistepInverseScheduler),
    /// A [`TCDScheduler`].
    Tcd(TCDScheduler),
    /// An [`EDMDPMSolverMultistepScheduler`].
    EdmDpmSolverMultistep(EDMDPMSolverMultistepScheduler),
    /// A [`CosineDPMSolverMultistepScheduler`].
    CosineDpmSolverMultistep(CosineDPMSolverMultistepScheduler),
    /// A [`CMStochasticIterativeScheduler`].
    CmStochasticIterative(CMStochasticIterativeScheduler),
    /// A [`ScoreSdeVeScheduler`].
    ScoreSdeVe(ScoreSdeVeScheduler),
    /// A [`RePaintScheduler`].
    RePaint(RePaintScheduler),
    /// A [`DPMSolverSDEScheduler`].
    DpmSolverSde(DPMSolverSDEScheduler),
    /// A [`DDIMParallelScheduler`].
    DdimParallel(DDIMParallelScheduler),
    /// A [`DDPMParallelScheduler`].
    DdpmParallel(DDPMParallelScheduler),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnyScheduler::Ddpm($s) => $body,
            AnyScheduler::Ddim($s) => $body,
            AnyScheduler::Euler($s) => $body,
            AnyScheduler::EulerAncestral($s) => $body,
            AnyScheduler::DpmSolverMultistep($s) => $body,
            AnyScheduler::Pndm($s) => $body,
            AnyScheduler::Heun($s) => $body,
            AnyScheduler::Lms($s) => $body,
            AnyScheduler::DdimInverse($s) => $body,
            AnyScheduler::Lcm($s) => $body,
            AnyScheduler::UniPc($s) => $body,
            AnyScheduler::Kdpm2($s) => $body,
            AnyScheduler::Kdpm2Ancestral($s) => $body,
            AnyScheduler::DpmSolverSinglestep($s) => $body,
            AnyScheduler::Deis($s) => $body,
            AnyScheduler::FlowMatchEuler($s) => $body,
            AnyScheduler::FlowMatchHeun($s) => $body,
            AnyScheduler::Ipndm($s) => $body,
            AnyScheduler::EdmEuler($s) => $body,
            AnyScheduler::DpmSolverMultistepInverse($s) => $body,
            AnyScheduler::Tcd($s) => $body,
            AnyScheduler::EdmDpmSolverMultistep($s) => $body,
            AnyScheduler::CosineDpmSolverMultistep($s) => $body,
            AnyScheduler::CmStochasticIterative($s) => $body,
            AnyScheduler::ScoreSdeVe($s) => $body,
            AnyScheduler::RePaint($s) => $body,
            AnyScheduler::DpmSolverSde($s) => $body,
            AnyScheduler::DdimParallel($s) => $body,
            AnyScheduler::DdpmParallel($s) => $body,
        }
    };
}

impl From<DDPMScheduler> for AnyScheduler {
    fn from(s: DDPMScheduler) -> Self {
        Self::Ddpm(s)
    }
}

impl From<DDIMScheduler> for AnyScheduler {
    fn from(s: DDIMScheduler) -> Self {
        Self::Ddim(s)
    }
}

impl From<EulerDiscreteScheduler> for AnyScheduler {
    fn from(s: EulerDiscreteScheduler) -> Self {
        Self::Euler(s)
    }
}

impl From<EulerAncestralDiscreteScheduler> for AnyScheduler {
    fn from(s: EulerAncestralDiscreteScheduler) -> Self {
        Self::EulerAncestral(s)
    }
}

impl From<DPMSolverMultistepScheduler> for AnyScheduler {
    fn from(s: DPMSolverMultistepScheduler) -> Self {
        Self::DpmSolverMultistep(s)
    }
}

impl From<PNDMScheduler> for AnyScheduler {
    fn from(s: PNDMScheduler) -> Self {
        Self::Pndm(s)
    }
}

impl From<HeunDiscreteScheduler> for AnyScheduler {
    fn from(s: HeunDiscreteScheduler) -> Self {
        Self::Heun(s)
    }
}

impl From<LMSDiscreteScheduler> for AnyScheduler {
    fn from(s: LMSDiscreteScheduler) -> Self {
        Self::Lms(s)
    }
}

impl From<DDIMInverseScheduler> for AnyScheduler {
    fn from(s: DDIMInverseScheduler) -> Self {
        Self::DdimInverse(s)
    }
}

impl From<LCMScheduler> for AnyScheduler {
    fn from(s: LCMScheduler) -> Self {
        Self::Lcm(s)
    }
}

impl From<UniPCMultistepScheduler> for AnyScheduler {
    fn from(s: UniPCMultistepScheduler) -> Self {
        Self::UniPc(s)
    }
}

impl From<KDPM2DiscreteScheduler> for AnyScheduler {
    fn from(s: KDPM2DiscreteScheduler) -> Self {
        Self::Kdpm2(s)
    }
}

impl From<KDPM2AncestralDiscreteScheduler> for AnyScheduler {
    fn from(s: KDPM2AncestralDiscreteScheduler) -> Self {
        Self::Kdpm2Ancestral(s)
    }
}

impl From<DPMSolverSinglestepScheduler> for AnyScheduler {
    fn from(s: DPMSolverSinglestepScheduler) -> Self {
        Self::DpmSolverSinglestep(s)
    }
}

impl From<DEISMultistepScheduler> for AnyScheduler {
    fn from(s: DEISMultistepScheduler) -> Self {
        Self::Deis(s)
    }
}

impl From<FlowMatchEulerDiscreteScheduler> for AnyScheduler {
    fn from(s: FlowMatchEulerDiscreteScheduler) -> Self {
        Self::FlowMatchEuler(s)
    }
}

impl From<FlowMatchHeunDiscreteScheduler> for AnyScheduler {
    fn from(s: FlowMatchHeunDiscreteScheduler) -> Self {
        Self::FlowMatchHeun(s)
    }
}

impl From<IPNDMScheduler> for AnyScheduler {
    fn from(s: IPNDMScheduler) -> Self {
        Self::Ipndm(s)
    }
}

impl From<EDMEulerScheduler> for AnyScheduler {
    fn from(s: EDMEulerScheduler) -> Self {
        Self::EdmEuler(s)
    }
}

impl From<DPMSolverMultistepInverseScheduler> for AnyScheduler {
    fn from(s: DPMSolverMultistepInverseScheduler) -> Self {
        Self::DpmSolverMultistepInverse(s)
    }
}

impl From<TCDScheduler> for AnyScheduler {
    fn from(s: TCDScheduler) -> Self {
        Self::Tcd(s)
    }
}

impl From<EDMDPMSolverMultistepScheduler> for AnyScheduler {
    fn from(s: EDMDPMSolverMultistepScheduler) -> Self {
        Self::EdmDpmSolverMultistep(s)
    }
}

impl From<CosineDPMSolverMultistepScheduler> for AnyScheduler {
    fn from(s: CosineDPMSolverMultistepScheduler) -> Self {
        Self::CosineDpmSolverMultistep(s)
    }
}

impl From<CMStochasticIterativeScheduler> for AnyScheduler {
    fn from(s: CMStochasticIterativeScheduler) -> Self {
        Self::CmStochasticIterative(s)
    }
}

impl From<ScoreSdeVeScheduler> for AnyScheduler {
    fn from(s: ScoreSdeVeScheduler) -> Self {
        Self::ScoreSdeVe(s)
    }
}

impl From<RePaintScheduler> for AnyScheduler {
    fn from(s: RePaintScheduler) -> Self {
        Self::RePaint(s)
    }
}

impl From<DPMSolverSDEScheduler> for AnyScheduler {
    fn from(s: DPMSolverSDEScheduler) -> Self {
        Self::DpmSolverSde(s)
    }
}

impl From<DDIMParallelScheduler> for AnyScheduler {
    fn from(s: DDIMParallelScheduler) -> Self {
        Self::DdimParallel(s)
    }
}

impl From<DDPMParallelScheduler> for AnyScheduler {
    fn from(s: DDPMParallelScheduler) -> Self {
        Self::DdpmParallel(s)
    }
}

impl AnyScheduler {
    /// Which class this is.
    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddpm(_) => SchedulerKind::Ddpm,
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::Euler(_) => SchedulerKind::Euler,
            Self::EulerAncestral(_) => SchedulerKind::EulerAncestral,
            Self::DpmSolverMultistep(_) => SchedulerKind::DpmSolverMultistep,
            Self::Pndm(_) => SchedulerKind::Pndm,
            Self::Heun(_) => SchedulerKind::Heun,
            Self::Lms(_) => SchedulerKind::Lms,
            Self::DdimInverse(_) => SchedulerKind::DdimInverse,
            Self::Lcm(_) => SchedulerKind::Lcm,
            Self::UniPc(_) => SchedulerKind::UniPc,
            Self::Kdpm2(_) => SchedulerKind::Kdpm2,
            Self::Kdpm2Ancestral(_) => SchedulerKind::Kdpm2Ancestral,
            Self::DpmSolverSinglestep(_) => SchedulerKind::DpmSolverSinglestep,
            Self::Deis(_) => SchedulerKind::Deis,
            Self::FlowMatchEuler(_) => SchedulerKind::FlowMatchEuler,
            Self::FlowMatchHeun(_) => SchedulerKind::FlowMatchHeun,
            Self::Ipndm(_) => SchedulerKind::Ipndm,
            Self::EdmEuler(_) => SchedulerKind::EdmEuler,
            Self::DpmSolverMultistepInverse(_) => SchedulerKind::DpmSolverMultistepInverse,
            Self::Tcd(_) => SchedulerKind::Tcd,
            Self::EdmDpmSolverMultistep(_) => SchedulerKind::EdmDpmSolverMultistep,
            Self::CosineDpmSolverMultistep(_) => SchedulerKind::CosineDpmSolverMultistep,
            Self::CmStochasticIterative(_) => SchedulerKind::CmStochasticIterative,
            Self::ScoreSdeVe(_) => SchedulerKind::ScoreSdeVe,
            Self::RePaint(_) => SchedulerKind::RePaint,
            Self::DpmSolverSde(_) => SchedulerKind::DpmSolverSde,
            Self::DdimParallel(_) => SchedulerKind::DdimParallel,
            Self::DdpmParallel(_) => SchedulerKind::DdpmParallel,
        }
    }

    /// Read `scheduler_config.json` (`path` may be the file or its folder) and build the class
    /// its `_class_name` names.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Json`]; [`Error::ConfigField`] naming `_class_name` when it is
    /// missing; [`Error::UnknownName`] for a class this crate does not implement; else as the
    /// class's own loading.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = config_path(path.as_ref());
        Self::from_config_value(diffusion_core::config::read_json(&path)?, &path)
    }

    /// Build from a parsed config whose `_class_name` names the class; `origin` is used in
    /// error messages.
    ///
    /// # Errors
    /// As [`Self::from_config_file`] after reading.
    pub fn from_config_value(value: Value, origin: &Path) -> Result<Self> {
        let class = value
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::ConfigField {
                path: origin.to_path_buf(),
                field: "_class_name".into(),
                message: "missing: which scheduler is this?".into(),
            })?;
        let kind = SchedulerKind::from_class_name(class)?;
        Self::build(kind, value, origin)
    }

    /// Build `kind` from a config value (its `_class_name` is ignored).
    ///
    /// # Errors
    /// As the class's own loading.
    pub fn build(kind: SchedulerKind, value: Value, origin: &Path) -> Result<Self> {
        fn typed<S: ConfiguredScheduler>(value: Value, origin: &Path) -> Result<S> {
            let mut file = ConfigFile::<S::Config>::from_value(value, origin)?;
            file.class_name = Some(S::Config::CLASS_NAME.to_string());
            S::from_config_file(file)
        }
        Ok(match kind {
            SchedulerKind::Ddpm => Self::Ddpm(typed(value, origin)?),
            SchedulerKind::Ddim => Self::Ddim(typed(value, origin)?),
            SchedulerKind::Euler => Self::Euler(typed(value, origin)?),
            SchedulerKind::EulerAncestral => Self::EulerAncestral(typed(value, origin)?),
            SchedulerKind::DpmSolverMultistep => Self::DpmSolverMultistep(typed(value, origin)?),
            SchedulerKind::Pndm => Self::Pndm(typed(value, origin)?),
            SchedulerKind::Heun => Self::Heun(typed(value, origin)?),
            SchedulerKind::Lms => Self::Lms(typed(value, origin)?),
            SchedulerKind::DdimInverse => Self::DdimInverse(typed(value, origin)?),
            SchedulerKind::Lcm => Self::Lcm(typed(value, origin)?),
            SchedulerKind::UniPc => Self::UniPc(typed(value, origin)?),
            SchedulerKind::Kdpm2 => Self::Kdpm2(typed(value, origin)?),
            SchedulerKind::Kdpm2Ancestral => Self::Kdpm2Ancestral(typed(value, origin)?),
            SchedulerKind::DpmSolverSinglestep => Self::DpmSolverSinglestep(typed(value, origin)?),
            SchedulerKind::Deis => Self::Deis(typed(value, origin)?),
            SchedulerKind::FlowMatchEuler => Self::FlowMatchEuler(typed(value, origin)?),
            SchedulerKind::FlowMatchHeun => Self::FlowMatchHeun(typed(value, origin)?),
            SchedulerKind::Ipndm => Self::Ipndm(typed(value, origin)?),
            SchedulerKind::EdmEuler => Self::EdmEuler(typed(value, origin)?),
            SchedulerKind::DpmSolverMultistepInverse => {
                Self::DpmSolverMultistepInverse(typed(value, origin)?)
            }
            SchedulerKind::Tcd => Self::Tcd(typed(value, origin)?),
            SchedulerKind::EdmDpmSolverMultistep => {
                Self::EdmDpmSolverMultistep(typed(value, origin)?)
            }
            SchedulerKind::CosineDpmSolverMultistep => {
                Self::CosineDpmSolverMultistep(typed(value, origin)?)
            }
            SchedulerKind::CmStochasticIterative => {
                Self::CmStochasticIterative(typed(value, origin)?)
            }
            SchedulerKind::ScoreSdeVe => Self::ScoreSdeVe(typed(value, origin)?),
            SchedulerKind::RePaint => Self::RePaint(typed(value, origin)?),
            SchedulerKind::DpmSolverSde => Self::DpmSolverSde(typed(value, origin)?),
            SchedulerKind::DdimParallel => Self::DdimParallel(typed(value, origin)?),
            SchedulerKind::DdpmParallel => Self::DdpmParallel(typed(value, origin)?),
        })
    }

    /// diffusers' `TargetScheduler.from_config(source.config, **overrides)`: build another
    /// scheduler from this one's config. Keys this class shares with the target carry over,
    /// keys only this class knows are dropped (as diffusers does between compatible
    /// schedulers), unknown keys are kept, the spec's overrides win over all of them.
    ///
    /// # Errors
    /// As [`Self::build`] for the merged config.
    pub fn convert(source: &impl Scheduler, target: &SchedulerSpec) -> Result<Self> {
        let mut value = source.config_value();
        if let Value::Object(map) = &mut value {
            map.remove("_class_name");
            if let Ok(source_kind) = SchedulerKind::from_class_name(source.class_name()) {
                let target_keys = target.kind.known_keys();
                for key in source_kind.known_keys() {
                    if !target_keys.contains(&key) {
                        map.remove(&key);
                    }
                }
            }
            for (k, v) in &target.overrides {
                map.insert(k.clone(), v.clone());
            }
        }
        Self::build(target.kind, value, Path::new("<from_config>"))
    }

    /// The DDPM scheduler inside, if this is one.
    pub fn as_ddpm(&self) -> Option<&DDPMScheduler> {
        match self {
            Self::Ddpm(s) => Some(s),
            _ => None,
        }
    }

    /// The DDIM scheduler inside, if this is one.
    pub fn as_ddim(&self) -> Option<&DDIMScheduler> {
        match self {
            Self::Ddim(s) => Some(s),
            _ => None,
        }
    }

    /// The Euler scheduler inside, if this is one.
    pub fn as_euler(&self) -> Option<&EulerDiscreteScheduler> {
        match self {
            Self::Euler(s) => Some(s),
            _ => None,
        }
    }

    /// The Euler ancestral scheduler inside, if this is one.
    pub fn as_euler_ancestral(&self) -> Option<&EulerAncestralDiscreteScheduler> {
        match self {
            Self::EulerAncestral(s) => Some(s),
            _ => None,
        }
    }

    /// The DPM-Solver multistep scheduler inside, if this is one.
    pub fn as_dpm_solver_multistep(&self) -> Option<&DPMSolverMultistepScheduler> {
        match self {
            Self::DpmSolverMultistep(s) => Some(s),
            _ => None,
        }
    }

    /// The PNDM scheduler inside, if this is one.
    pub fn as_pndm(&self) -> Option<&PNDMScheduler> {
        match self {
            Self::Pndm(s) => Some(s),
            _ => None,
        }
    }

    /// The Heun scheduler inside, if this is one.
    pub fn as_heun(&self) -> Option<&HeunDiscreteScheduler> {
        match self {
            Self::Heun(s) => Some(s),
            _ => None,
        }
    }

    /// The LMS scheduler inside, if this is one.
    pub fn as_lms(&self) -> Option<&LMSDiscreteScheduler> {
        match self {
            Self::Lms(s) => Some(s),
            _ => None,
        }
    }

    /// The inverse DDIM scheduler inside, if this is one.
    pub fn as_ddim_inverse(&self) -> Option<&DDIMInverseScheduler> {
        match self {
            Self::DdimInverse(s) => Some(s),
            _ => None,
        }
    }

    /// The LCM scheduler inside, if this is one.
    pub fn as_lcm(&self) -> Option<&LCMScheduler> {
        match self {
            Self::Lcm(s) => Some(s),
            _ => None,
        }
    }

    /// The UniPC multistep scheduler inside, if this is one.
    pub fn as_unipc(&self) -> Option<&UniPCMultistepScheduler> {
        match self {
            Self::UniPc(s) => Some(s),
            _ => None,
        }
    }

    /// The KDPM2 scheduler inside, if this is one.
    pub fn as_kdpm2(&self) -> Option<&KDPM2DiscreteScheduler> {
        match self {
            Self::Kdpm2(s) => Some(s),
            _ => None,
        }
    }

    /// The KDPM2 ancestral scheduler inside, if this is one.
    pub fn as_kdpm2_ancestral(&self) -> Option<&KDPM2AncestralDiscreteScheduler> {
        match self {
            Self::Kdpm2Ancestral(s) => Some(s),
            _ => None,
        }
    }

    /// The DPM-Solver singlestep scheduler inside, if this is one.
    pub fn as_dpm_solver_singlestep(&self) -> Option<&DPMSolverSinglestepScheduler> {
        match self {
            Self::DpmSolverSinglestep(s) => Some(s),
            _ => None,
        }
    }

    /// The DEIS multistep scheduler inside, if this is one.
    pub fn as_deis(&self) -> Option<&DEISMultistepScheduler> {
        match self {
            Self::Deis(s) => Some(s),
            _ => None,
        }
    }

    /// The flow-matching Euler scheduler inside, if this is one.
    pub fn as_flow_match_euler(&self) -> Option<&FlowMatchEulerDiscreteScheduler> {
        match self {
            Self::FlowMatchEuler(s) => Some(s),
            _ => None,
        }
    }

    /// The flow-matching Heun scheduler inside, if this is one.
    pub fn as_flow_match_heun(&self) -> Option<&FlowMatchHeunDiscreteScheduler> {
        match self {
            Self::FlowMatchHeun(s) => Some(s),
            _ => None,
        }
    }

    /// The iPNDM scheduler inside, if this is one.
    pub fn as_ipndm(&self) -> Option<&IPNDMScheduler> {
        match self {
            Self::Ipndm(s) => Some(s),
            _ => None,
        }
    }

    /// The EDM Euler scheduler inside, if this is one.
    pub fn as_edm_euler(&self) -> Option<&EDMEulerScheduler> {
        match self {
            Self::EdmEuler(s) => Some(s),
            _ => None,
        }
    }

    /// The inverse DPM-Solver multistep scheduler inside, if this is one.
    pub fn as_dpm_solver_multistep_inverse(&self) -> Option<&DPMSolverMultistepInverseScheduler> {
        match self {
            Self::DpmSolverMultistepInverse(s) => Some(s),
            _ => None,
        }
    }

    /// The TCD scheduler inside, if this is one.
    pub fn as_tcd(&self) -> Option<&TCDScheduler> {
        match self {
            Self::Tcd(s) => Some(s),
            _ => None,
        }
    }

    /// The EDM DPM-Solver multistep scheduler inside, if this is one.
    pub fn as_edm_dpm_solver_multistep(&self) -> Option<&EDMDPMSolverMultistepScheduler> {
        match self {
            Self::EdmDpmSolverMultistep(s) => Some(s),
            _ => None,
        }
    }

    /// The cosine DPM-Solver multistep scheduler inside, if this is one.
    pub fn as_cosine_dpm_solver_multistep(&self) -> Option<&CosineDPMSolverMultistepScheduler> {
        match self {
            Self::CosineDpmSolverMultistep(s) => Some(s),
            _ => None,
        }
    }

    /// The consistency-model scheduler inside, if this is one.
    pub fn as_cm_stochastic_iterative(&self) -> Option<&CMStochasticIterativeScheduler> {
        match self {
            Self::CmStochasticIterative(s) => Some(s),
            _ => None,
        }
    }

    /// The score-SDE (VE) scheduler inside, if this is one.
    pub fn as_score_sde_ve(&self) -> Option<&ScoreSdeVeScheduler> {
        match self {
            Self::ScoreSdeVe(s) => Some(s),
            _ => None,
        }
    }

    /// The RePaint scheduler inside, if this is one.
    pub fn as_repaint(&self) -> Option<&RePaintScheduler> {
        match self {
            Self::RePaint(s) => Some(s),
            _ => None,
        }
    }

    /// The DPM-Solver++ (SDE) scheduler inside, if this is one.
    pub fn as_dpm_solver_sde(&self) -> Option<&DPMSolverSDEScheduler> {
        match self {
            Self::DpmSolverSde(s) => Some(s),
            _ => None,
        }
    }

    /// The parallel DDIM scheduler inside, if this is one.
    pub fn as_ddim_parallel(&self) -> Option<&DDIMParallelScheduler> {
        match self {
            Self::DdimParallel(s) => Some(s),
            _ => None,
        }
    }

    /// The parallel DDPM scheduler inside, if this is one.
    pub fn as_ddpm_parallel(&self) -> Option<&DDPMParallelScheduler> {
        match self {
            Self::DdpmParallel(s) => Some(s),
            _ => None,
        }
    }

    /// The training noise schedule (betas and `alphas_cumprod`); `None` for the flow-matching
    /// schedulers, which have none.
    pub fn noise_schedule(&self) -> Option<&crate::NoiseSchedule> {
        Some(match self {
            Self::Ddpm(s) => s.noise_schedule(),
            Self::Tcd(s) => s.noise_schedule(),
            Self::DpmSolverMultistepInverse(s) => s.noise_schedule(),
            Self::Ddim(s) => s.noise_schedule(),
            Self::Euler(s) => s.noise_schedule(),
            Self::EulerAncestral(s) => s.noise_schedule(),
            Self::DpmSolverMultistep(s) => s.noise_schedule(),
            Self::Pndm(s) => s.noise_schedule(),
            Self::Heun(s) => s.noise_schedule(),
            Self::Lms(s) => s.noise_schedule(),
            Self::DdimInverse(s) => s.noise_schedule(),
            Self::Lcm(s) => s.noise_schedule(),
            Self::UniPc(s) => s.noise_schedule(),
            Self::Kdpm2(s) => s.noise_schedule(),
            Self::Kdpm2Ancestral(s) => s.noise_schedule(),
            Self::DpmSolverSinglestep(s) => s.noise_schedule(),
            Self::Deis(s) => s.noise_schedule(),
            Self::RePaint(s) => s.noise_schedule(),
            Self::DpmSolverSde(s) => s.noise_schedule(),
            Self::DdimParallel(s) => s.noise_schedule(),
            Self::DdpmParallel(s) => s.noise_schedule(),
            Self::FlowMatchEuler(_)
            | Self::FlowMatchHeun(_)
            | Self::Ipndm(_)
            | Self::EdmEuler(_)
            | Self::EdmDpmSolverMultistep(_)
            | Self::CosineDpmSolverMultistep(_)
            | Self::CmStochasticIterative(_)
            | Self::ScoreSdeVe(_) => {
                return None;
            }
        })
    }
}

impl Scheduler for AnyScheduler {
    fn class_name(&self) -> &'static str {
        dispatch!(self, s => s.class_name())
    }

    fn config_value(&self) -> Value {
        dispatch!(self, s => s.config_value())
    }

    fn order(&self) -> usize {
        dispatch!(self, s => s.order())
    }

    fn init_noise_sigma(&self) -> f64 {
        dispatch!(self, s => s.init_noise_sigma())
    }

    fn num_train_timesteps(&self) -> usize {
        dispatch!(self, s => s.num_train_timesteps())
    }

    fn num_inference_steps(&self) -> Option<usize> {
        dispatch!(self, s => s.num_inference_steps())
    }

    fn set_timesteps_with(&mut self, request: SetTimesteps) -> Result<()> {
        dispatch!(self, s => s.set_timesteps_with(request))
    }

    fn timesteps(&self) -> &[f64] {
        dispatch!(self, s => s.timesteps())
    }

    fn sigmas(&self) -> Option<&[f64]> {
        dispatch!(self, s => s.sigmas())
    }

    fn step_index(&self) -> Option<usize> {
        dispatch!(self, s => s.step_index())
    }

    fn set_begin_index(&mut self, begin_index: usize) -> Result<()> {
        dispatch!(self, s => s.set_begin_index(begin_index))
    }

    fn scale_model_input<const D: usize>(
        &mut self,
        sample: Tensor<D>,
        timestep: f64,
    ) -> Result<Tensor<D>> {
        dispatch!(self, s => s.scale_model_input(sample, timestep))
    }

    fn step<const D: usize>(
        &mut self,
        model_output: Tensor<D>,
        timestep: f64,
        sample: Tensor<D>,
        options: StepOptions<'_, D>,
    ) -> Result<StepOutput<D>> {
        dispatch!(self, s => s.step(model_output, timestep, sample, options))
    }

    fn add_noise<const D: usize>(
        &self,
        original: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        dispatch!(self, s => s.add_noise(original, noise, timesteps))
    }

    fn get_velocity<const D: usize>(
        &self,
        sample: Tensor<D>,
        noise: Tensor<D>,
        timesteps: &[f64],
    ) -> Result<Tensor<D>> {
        dispatch!(self, s => s.get_velocity(sample, noise, timesteps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_parse() {
        assert_eq!(
            SchedulerSpec::parse("DDIMScheduler").unwrap().kind,
            SchedulerKind::Ddim
        );
        assert_eq!(
            SchedulerSpec::parse("ddim").unwrap().kind,
            SchedulerKind::Ddim
        );
        assert_eq!(
            SchedulerSpec::parse("DDPMScheduler").unwrap().kind,
            SchedulerKind::Ddpm
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = SchedulerSpec::parse("KarrasVeScheduler").unwrap_err();
        match err {
            Error::UnknownName { kind, name, known } => {
                assert_eq!(kind, "scheduler");
                assert_eq!(name, "KarrasVeScheduler");
                assert!(known.contains("DDIMScheduler") && known.contains("DDPMScheduler"));
            }
            other => panic!("expected UnknownName, got {other:?}"),
        }
    }

    #[test]
    fn convert_drops_source_only_keys_and_applies_overrides() {
        let ddpm = DDPMScheduler::new(DDPMSchedulerConfig {
            num_train_timesteps: 500,
            ..Default::default()
        })
        .unwrap();
        let mut spec = SchedulerSpec::parse("DDIM").unwrap();
        spec.overrides
            .insert("set_alpha_to_one".into(), Value::Bool(false));
        let ddim = AnyScheduler::convert(&ddpm, &spec).unwrap();
        let value = ddim.config_value();
        assert_eq!(value["_class_name"], "DDIMScheduler");
        assert_eq!(value["num_train_timesteps"], 500);
        assert_eq!(value["set_alpha_to_one"], false);
        assert!(value.get("variance_type").is_none());
        let ddim = ddim.as_ddim().unwrap();
        assert_eq!(ddim.final_alpha_cumprod(), ddim.alphas_cumprod()[0]);
    }
}
