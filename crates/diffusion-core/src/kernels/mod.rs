//! Fused kernels for the operations that dominate a diffusion UNet and VAE besides
//! convolutions and matmuls: GroupNorm (with an optional SiLU), softmax attention, and the
//! upcast softmax of attention's matmul route.
//!
//! Each public function has a reference written in burn tensor ops and, with a CubeCL backend
//! compiled in (`cpu`, `cuda`, `wgpu` features), a CubeCL kernel registered through burn's
//! backend-extension mechanism. The kernel runs when the input lives on a CubeCL device without
//! autodiff (see [`uses_kernel`]). On the flex device (without autodiff), [`group_norm`] of f32
//! tensors runs a host loop instead of burn's ops, and so does [`attention`] without a bias
//! ([`Kernel::HostAttention`]). Everywhere else (ndarray,
//! libtorch, autodiff, half precision on flex) the reference runs, and the reference is exactly
//! the op sequence the models ran before these kernels existed.
//!
//! The kernels read f16/bf16 inputs and accumulate in f32 (GroupNorm statistics, attention
//! scores, softmax and the weighted sum), writing the input dtype.
//!
//! `DIFFUSERS_RS_KERNELS=0` in the environment (or [`set_kernels_enabled`]) turns the kernels off;
//! a comma-separated list of `group_norm`, `attention`, `softmax`, `host_attention`,
//! `host_conv` keeps only those ([`set_kernel_enabled`]), so the same binary measures kernel against burn op.

mod attention;
mod conv;
#[cfg(feature = "cubecl-kernels")]
mod extension;
mod group_norm;
#[cfg(feature = "flex")]
mod host;
mod softmax;

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::Device;

pub use attention::{
    MATMUL_MIN_SCORES, attention, attention_burn, attention_matmul, attention_reference,
};
pub use conv::{conv2d, conv2d_reference, conv2d_split_k, split_k_factor};
pub use group_norm::{group_norm, group_norm_reference};
pub use softmax::{softmax, softmax_reference};

/// Which kernels run: bit 0 GroupNorm, bit 1 attention, bit 2 softmax, bits 3 and 4 the host
/// attention and convolution loops, bit 7 set once decided
/// (before that, the environment is read).
static ENABLED: AtomicU8 = AtomicU8::new(0);
const DECIDED: u8 = 0x80;

/// One of the custom kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// [`group_norm`].
    GroupNorm,
    /// [`attention`].
    Attention,
    /// [`softmax`] (attention's matmul route).
    Softmax,
    /// [`attention`]'s host loop on the flex device (f32, f16, bf16 without a bias).
    HostAttention,
    /// [`conv2d`]'s host loop on the flex device (f32, one group).
    HostConv,
}

impl Kernel {
    fn bit(self) -> u8 {
        match self {
            Self::GroupNorm => 1,
            Self::Attention => 2,
            Self::Softmax => 4,
            Self::HostAttention => 8,
            Self::HostConv => 16,
        }
    }
}

/// The bits of all the kernels, each on by default.
const ALL_KERNELS: u8 = 31;

/// Turn every custom kernel on or off for the whole process.
pub fn set_kernels_enabled(enabled: bool) {
    ENABLED.store(
        DECIDED | if enabled { ALL_KERNELS } else { 0 },
        Ordering::Relaxed,
    );
}

/// Turn one custom kernel on or off for the whole process (the others keep their setting).
pub fn set_kernel_enabled(kernel: Kernel, enabled: bool) {
    settings(); // the environment's choice first, for the other kernels
    // One atomic update, so that concurrent calls for different kernels both take effect.
    let _ = ENABLED.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
        let bits = if enabled {
            current | kernel.bit()
        } else {
            current & !kernel.bit()
        };
        Some(DECIDED | bits)
    });
}

/// Whether `kernel` is switched on (it may still not apply to a device). Until set in code,
/// the environment decides: `DIFFUSERS_RS_KERNELS` unset or `1`/`on`/`all` turns all on,
/// `0`/`off`/`none` all off, a comma-separated list of `group_norm`, `attention`, `softmax`,
/// `host_attention`, `host_conv` only those (anything else in the list is ignored).
pub fn kernel_enabled(kernel: Kernel) -> bool {
    settings() & kernel.bit() != 0
}

fn settings() -> u8 {
    let value = ENABLED.load(Ordering::Relaxed);
    if value & DECIDED != 0 {
        return value & !DECIDED;
    }
    let bits = match std::env::var("DIFFUSERS_RS_KERNELS") {
        Err(_) => ALL_KERNELS,
        Ok(v) => parse_kernels(&v),
    };
    ENABLED.store(DECIDED | bits, Ordering::Relaxed);
    bits
}

/// The kernel bits a `DIFFUSERS_RS_KERNELS` value selects.
fn parse_kernels(value: &str) -> u8 {
    let value = value.trim().to_ascii_lowercase();
    match value.as_str() {
        "0" | "off" | "none" | "false" => return 0,
        "" | "1" | "on" | "all" | "true" => return ALL_KERNELS,
        _ => {}
    }
    let bits = value
        .split(',')
        .map(|name| match name.trim() {
            "group_norm" | "groupnorm" => Kernel::GroupNorm.bit(),
            "attention" => Kernel::Attention.bit(),
            "softmax" => Kernel::Softmax.bit(),
            "all" => ALL_KERNELS,
            "host_attention" => Kernel::HostAttention.bit(),
            "host_conv" => Kernel::HostConv.bit(),
            _ => 0,
        })
        .fold(0, |bits, bit| bits | bit);
    // A value naming no kernel (a typo) keeps the default rather than silently turning
    // everything off.
    if bits == 0 { ALL_KERNELS } else { bits }
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

/// How [`conv2d`] runs on a CubeCL device (on flex its host loop runs, elsewhere burn's op).
/// Until set with [`set_conv_route`], `DIFFUSERS_RS_CONV` decides (`burn`, `split_k`; unset or
/// anything else is `burn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvRoute {
    /// burn's `module::conv2d` (its autotuned implicit GEMM on GPUs) for every shape.
    Burn,
    /// [`conv2d_split_k`] where [`split_k_factor`] accepts the shape (many channels over few
    /// positions), burn's op elsewhere.
    SplitK,
}

impl ConvRoute {
    const ALL: [Self; 2] = [Self::Burn, Self::SplitK];

    fn code(self) -> u8 {
        match self {
            Self::Burn => 1,
            Self::SplitK => 2,
        }
    }

    /// The lowercase name (`burn`, `split_k`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Burn => "burn",
            Self::SplitK => "split_k",
        }
    }
}

impl std::str::FromStr for ConvRoute {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| crate::Error::UnknownName {
                kind: "convolution route",
                name: s.into(),
                known: "burn, split_k".into(),
            })
    }
}

/// The convolution route, 0 until decided (then the environment is read).
static CONV_ROUTE: AtomicU8 = AtomicU8::new(0);

/// Choose the [`ConvRoute`] for the whole process.
pub fn set_conv_route(route: ConvRoute) {
    CONV_ROUTE.store(route.code(), Ordering::Relaxed);
}

/// The current [`ConvRoute`] (see there for how it is decided).
pub fn conv_route() -> ConvRoute {
    let code = CONV_ROUTE.load(Ordering::Relaxed);
    if let Some(route) = ConvRoute::ALL.into_iter().find(|r| r.code() == code) {
        return route;
    }
    let route = std::env::var("DIFFUSERS_RS_CONV")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ConvRoute::Burn);
    set_conv_route(route);
    route
}

/// Whether `device` is a CubeCL device (CUDA, wgpu, CubeCL CPU) in a build with a CubeCL
/// backend: where the custom kernels and routes can run.
pub fn on_kernel_device(device: &Device) -> bool {
    #[cfg(feature = "cubecl-kernels")]
    {
        matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_))
    }
    #[cfg(not(feature = "cubecl-kernels"))]
    {
        let _ = device;
        false
    }
}

/// Whether [`group_norm`] (for [`Kernel::GroupNorm`]) or [`attention`] runs its custom kernel
/// for tensors on `device`: a CubeCL device (CUDA, wgpu, CubeCL CPU) without autodiff, in a
/// build with a CubeCL backend, with that kernel enabled.
pub fn uses_kernel(kernel: Kernel, device: &Device) -> bool {
    on_kernel_device(device) && kernel_enabled(kernel)
}

/// Whether every kernel runs on `device` (see [`uses_kernel`]).
pub fn uses_kernels(device: &Device) -> bool {
    uses_kernel(Kernel::GroupNorm, device)
        && uses_kernel(Kernel::Attention, device)
        && uses_kernel(Kernel::Softmax, device)
}

/// Largest `|got - want| / max |want|`: how the host loops' tests compare with the references.
#[cfg(all(test, feature = "flex"))]
fn relative_error<const D: usize>(
    got: burn::tensor::Tensor<D>,
    want: burn::tensor::Tensor<D>,
) -> f32 {
    let scale = want.clone().abs().max().into_scalar::<f32>().max(1e-30);
    (got - want).abs().max().into_scalar::<f32>() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lists_parse() {
        assert_eq!(parse_kernels("off"), 0);
        assert_eq!(parse_kernels(" ON "), ALL_KERNELS);
        assert_eq!(parse_kernels("group_norm"), 1);
        assert_eq!(parse_kernels("attention,softmax"), 6);
        assert_eq!(parse_kernels("softmax, groupnorm"), 5);
        assert_eq!(parse_kernels("bogus"), ALL_KERNELS);
        assert_eq!(parse_kernels("group_norm,host_attention"), 9);
        assert_eq!(parse_kernels("host_conv"), 16);
        assert_eq!(parse_kernels("all"), 31);
    }
}
