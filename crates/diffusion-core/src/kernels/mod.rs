//! Fused kernels for the two operations that dominate a diffusion UNet and VAE besides
//! convolutions and matmuls: GroupNorm (with an optional SiLU) and softmax attention.
//!
//! Each public function has a reference written in burn tensor ops and, with a CubeCL backend
//! compiled in (`cpu`, `cuda`, `wgpu` features), a CubeCL kernel registered through burn's
//! backend-extension mechanism. The kernel runs when the input lives on a CubeCL device without
//! autodiff (see [`uses_kernel`]); everywhere else (flex, ndarray, libtorch, autodiff devices)
//! the reference runs, and the reference is exactly the op sequence the models ran before these
//! kernels existed, so results there do not change.
//!
//! Both kernels read f16/bf16 inputs and accumulate in f32 (GroupNorm statistics, attention
//! scores, softmax and the weighted sum), writing the input dtype.
//!
//! `DIFFUSERS_RS_KERNELS=0` in the environment (or [`set_kernels_enabled`]) turns the kernels off,
//! `group_norm` / `attention` keeps only that one ([`set_kernel_enabled`]), so the same binary
//! measures kernel against burn op.

mod attention;
#[cfg(feature = "cubecl-kernels")]
mod extension;
mod group_norm;

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::Device;

pub use attention::{
    MATMUL_MIN_SCORES, attention, attention_burn, attention_matmul, attention_reference,
};
pub use group_norm::{group_norm, group_norm_reference};

/// Which kernels run: bit 0 GroupNorm, bit 1 attention, bit 7 set once decided (before that,
/// the environment is read).
static ENABLED: AtomicU8 = AtomicU8::new(0);
const DECIDED: u8 = 0x80;

/// One of the custom kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// [`group_norm`].
    GroupNorm,
    /// [`attention`].
    Attention,
}

impl Kernel {
    fn bit(self) -> u8 {
        match self {
            Self::GroupNorm => 1,
            Self::Attention => 2,
        }
    }
}

/// Turn every custom kernel on or off for the whole process.
pub fn set_kernels_enabled(enabled: bool) {
    ENABLED.store(DECIDED | if enabled { 3 } else { 0 }, Ordering::Relaxed);
}

/// Turn one custom kernel on or off for the whole process (the others keep their setting).
pub fn set_kernel_enabled(kernel: Kernel, enabled: bool) {
    let current = settings();
    let bits = if enabled {
        current | kernel.bit()
    } else {
        current & !kernel.bit()
    };
    ENABLED.store(DECIDED | bits, Ordering::Relaxed);
}

/// Whether `kernel` is switched on (it may still not apply to a device). Until set in code,
/// the environment decides: `DIFFUSERS_RS_KERNELS` unset or `1`/`on`/`all` turns both on,
/// `0`/`off`/`none` both off, `group_norm` or `attention` only that one.
pub fn kernel_enabled(kernel: Kernel) -> bool {
    settings() & kernel.bit() != 0
}

fn settings() -> u8 {
    let value = ENABLED.load(Ordering::Relaxed);
    if value & DECIDED != 0 {
        return value & !DECIDED;
    }
    let bits = match std::env::var("DIFFUSERS_RS_KERNELS") {
        Err(_) => 3,
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "0" | "off" | "none" | "false" => 0,
            "group_norm" | "groupnorm" => 1,
            "attention" => 2,
            _ => 3,
        },
    };
    ENABLED.store(DECIDED | bits, Ordering::Relaxed);
    bits
}

/// How [`attention`] computes f16 attention without a bias on a kernel device (with a bias, in
/// bf16 or f32, the flash kernel runs whatever the route). Until set with
/// [`set_attention_route`], `DIFFUSERS_RS_ATTENTION` decides (`auto`, `flash`, `matmul`,
/// `burn`; unset or anything else is `auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionRoute {
    /// [`attention_matmul`] from [`MATMUL_MIN_SCORES`] scores per head, the flash kernel below.
    Auto,
    /// This crate's flash kernel for every shape.
    Flash,
    /// [`attention_matmul`] for every shape.
    Matmul,
    /// [`attention_burn`]: burn's fused op (cubek's tensor-core flash kernels on CUDA).
    Burn,
}

impl AttentionRoute {
    const ALL: [Self; 4] = [Self::Auto, Self::Flash, Self::Matmul, Self::Burn];

    fn code(self) -> u8 {
        match self {
            Self::Auto => 1,
            Self::Flash => 2,
            Self::Matmul => 3,
            Self::Burn => 4,
        }
    }

    /// The lowercase name (`auto`, `flash`, `matmul`, `burn`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Flash => "flash",
            Self::Matmul => "matmul",
            Self::Burn => "burn",
        }
    }
}

impl std::str::FromStr for AttentionRoute {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| crate::Error::UnknownName {
                kind: "attention route",
                name: s.into(),
                known: "auto, flash, matmul, burn".into(),
            })
    }
}

/// The route, 0 until decided (then the environment is read).
static ROUTE: AtomicU8 = AtomicU8::new(0);

/// Choose the [`AttentionRoute`] for the whole process.
pub fn set_attention_route(route: AttentionRoute) {
    ROUTE.store(route.code(), Ordering::Relaxed);
}

/// The current [`AttentionRoute`] (see there for how it is decided).
pub fn attention_route() -> AttentionRoute {
    let code = ROUTE.load(Ordering::Relaxed);
    if let Some(route) = AttentionRoute::ALL.into_iter().find(|r| r.code() == code) {
        return route;
    }
    let route = std::env::var("DIFFUSERS_RS_ATTENTION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(AttentionRoute::Auto);
    set_attention_route(route);
    route
}

/// Whether [`group_norm`] (for [`Kernel::GroupNorm`]) or [`attention`] runs its custom kernel
/// for tensors on `device`: a CubeCL device (CUDA, wgpu, CubeCL CPU) without autodiff, in a
/// build with a CubeCL backend, with that kernel enabled.
pub fn uses_kernel(kernel: Kernel, device: &Device) -> bool {
    #[cfg(feature = "cubecl-kernels")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
            && kernel_enabled(kernel)
    }
    #[cfg(not(feature = "cubecl-kernels"))]
    {
        let _ = (kernel, device);
        false
    }
}

/// Whether both kernels run on `device` (see [`uses_kernel`]).
pub fn uses_kernels(device: &Device) -> bool {
    uses_kernel(Kernel::GroupNorm, device) && uses_kernel(Kernel::Attention, device)
}
