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
mod resample;
mod softmax;
mod tune;

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use burn::tensor::Device;

pub use attention::{
    MATMUL_MIN_SCORES, attention, attention_burn, attention_matmul, attention_matmul_chunked,
    attention_reference,
};
pub use conv::{conv2d, conv2d_reference, conv2d_split_k, split_k_factor};
pub use group_norm::{group_norm, group_norm_reference};
pub use resample::{upsample_nearest, upsample_nearest_reference};
pub use softmax::{softmax, softmax_reference};
pub use tune::{TunedChoice, tuned_choices};

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
/// `burn`, `tune`; unset or anything else is `auto`).
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
    /// Per shape, whichever of `flash`, `matmul` and (on CUDA) `burn` ran it fastest when it
    /// was first seen: each is timed on the device then (see [`tuned_choices`]). A shape must
    /// have run once before a CUDA graph captures it.
    Tune,
}

/// A process-wide choice among named routes, kept in an atomic (0 until decided; then the
/// environment variable [`Route::ENV`] is read once).
trait Route: Copy + PartialEq + 'static {
    /// Every route, in the order their names are listed in errors.
    const ALL: &'static [Self];
    /// What the routes choose, for errors ("attention route").
    const KIND: &'static str;
    /// The environment variable read when nothing was set in code.
    const ENV: &'static str;
    /// The route when the variable is unset or names no route.
    const DEFAULT: Self;

    fn name(self) -> &'static str;

    fn code(self) -> u8 {
        let index = Self::ALL.iter().position(|r| *r == self).expect("listed");
        u8::try_from(index + 1).expect("few routes")
    }

    fn parse(s: &str) -> crate::Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|r| r.name() == name)
            .ok_or_else(|| crate::Error::UnknownName {
                kind: Self::KIND,
                name: s.into(),
                known: Self::ALL
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn store(self, cell: &AtomicU8) {
        cell.store(self.code(), Ordering::Relaxed);
    }

    fn load(cell: &AtomicU8) -> Self {
        let code = cell.load(Ordering::Relaxed);
        if let Some(route) = Self::ALL.iter().copied().find(|r| r.code() == code) {
            return route;
        }
        let route = std::env::var(Self::ENV)
            .ok()
            .and_then(|v| Self::parse(&v).ok())
            .unwrap_or(Self::DEFAULT);
        route.store(cell);
        route
    }
}

impl Route for AttentionRoute {
    const ALL: &'static [Self] = &[
        Self::Auto,
        Self::Flash,
        Self::Matmul,
        Self::Burn,
        Self::Tune,
    ];
    const KIND: &'static str = "attention route";
    const ENV: &'static str = "DIFFUSERS_RS_ATTENTION";
    const DEFAULT: Self = Self::Auto;

    fn name(self) -> &'static str {
        AttentionRoute::name(self)
    }
}

impl AttentionRoute {
    /// The lowercase name (`auto`, `flash`, `matmul`, `burn`, `tune`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Flash => "flash",
            Self::Matmul => "matmul",
            Self::Burn => "burn",
            Self::Tune => "tune",
        }
    }
}

impl std::str::FromStr for AttentionRoute {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Route::parse(s)
    }
}

/// The attention route, 0 until decided (then the environment is read).
static ATTENTION_ROUTE: AtomicU8 = AtomicU8::new(0);

/// Choose the [`AttentionRoute`] for the whole process.
pub fn set_attention_route(route: AttentionRoute) {
    route.store(&ATTENTION_ROUTE);
}

/// The current [`AttentionRoute`] (see there for how it is decided).
pub fn attention_route() -> AttentionRoute {
    Route::load(&ATTENTION_ROUTE)
}

/// The most scores [`attention_matmul`] holds at a time unless set otherwise: 2^24, 32 MiB in
/// f16. One head of SD's 64×64 self-attention (4096² scores) is one chunk; a larger head (the
/// VAE mid-block at SDXL's size) goes in blocks of query rows.
pub const DEFAULT_ATTENTION_CHUNK_SCORES: usize = 1 << 24;

/// The score budget of [`attention_matmul`], 0 until decided (then the environment is read).
static ATTENTION_CHUNK: AtomicUsize = AtomicUsize::new(0);

/// Set how many scores [`attention_matmul`] materialises at most at a time, for the whole
/// process (0 restores [`DEFAULT_ATTENTION_CHUNK_SCORES`]). Larger chunks mean fewer, larger
/// launches; smaller ones a lower peak of memory.
pub fn set_attention_chunk_scores(scores: usize) {
    let scores = if scores == 0 {
        DEFAULT_ATTENTION_CHUNK_SCORES
    } else {
        scores
    };
    ATTENTION_CHUNK.store(scores, Ordering::Relaxed);
}

/// The score budget of [`attention_matmul`]. Until set with [`set_attention_chunk_scores`],
/// `DIFFUSERS_RS_ATTENTION_CHUNK` decides: a count of scores with an optional binary suffix
/// (`16M` is 2^24, `64M`, `512K`, `1G`); unset, zero or unreadable is
/// [`DEFAULT_ATTENTION_CHUNK_SCORES`].
pub fn attention_chunk_scores() -> usize {
    let scores = ATTENTION_CHUNK.load(Ordering::Relaxed);
    if scores != 0 {
        return scores;
    }
    let scores = std::env::var("DIFFUSERS_RS_ATTENTION_CHUNK")
        .ok()
        .and_then(|v| parse_count(&v))
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_ATTENTION_CHUNK_SCORES);
    ATTENTION_CHUNK.store(scores, Ordering::Relaxed);
    scores
}

/// A count with an optional binary suffix (`K`, `M`, `G`: 2^10, 2^20, 2^30).
fn parse_count(value: &str) -> Option<usize> {
    let value = value.trim();
    let (digits, shift) = match value.chars().last()?.to_ascii_uppercase() {
        'K' => (&value[..value.len() - 1], 10),
        'M' => (&value[..value.len() - 1], 20),
        'G' => (&value[..value.len() - 1], 30),
        _ => (value, 0),
    };
    digits.trim().parse::<usize>().ok()?.checked_mul(1 << shift)
}

/// How [`conv2d`] runs on a CubeCL device (on flex its host loop runs, elsewhere burn's op).
/// Until set with [`set_conv_route`], `DIFFUSERS_RS_CONV` decides (`burn`, `split_k`, `tune`;
/// unset or anything else is `burn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvRoute {
    /// burn's `module::conv2d` (its autotuned implicit GEMM on GPUs) for every shape.
    Burn,
    /// [`conv2d_split_k`] where [`split_k_factor`] accepts the shape (many channels over few
    /// positions), burn's op elsewhere.
    SplitK,
    /// Where [`split_k_factor`] accepts the shape, whichever of burn's op and the split-K route
    /// ran it fastest when it was first seen: both are timed on the device then (see
    /// [`tuned_choices`]); burn's op elsewhere. A shape must have run once before a CUDA graph
    /// captures it.
    Tune,
}

impl Route for ConvRoute {
    const ALL: &'static [Self] = &[Self::Burn, Self::SplitK, Self::Tune];
    const KIND: &'static str = "convolution route";
    const ENV: &'static str = "DIFFUSERS_RS_CONV";
    const DEFAULT: Self = Self::Burn;

    fn name(self) -> &'static str {
        ConvRoute::name(self)
    }
}

impl ConvRoute {
    /// The lowercase name (`burn`, `split_k`, `tune`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Burn => "burn",
            Self::SplitK => "split_k",
            Self::Tune => "tune",
        }
    }
}

impl std::str::FromStr for ConvRoute {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Route::parse(s)
    }
}

/// The convolution route, 0 until decided (then the environment is read).
static CONV_ROUTE: AtomicU8 = AtomicU8::new(0);

/// Choose the [`ConvRoute`] for the whole process.
pub fn set_conv_route(route: ConvRoute) {
    route.store(&CONV_ROUTE);
}

/// The current [`ConvRoute`] (see there for how it is decided).
pub fn conv_route() -> ConvRoute {
    Route::load(&CONV_ROUTE)
}

/// How loaded convolution weights are laid out in memory. Their shape is always PyTorch's
/// `[C_out, C_in, K_h, K_w]`; the choice is whether that is contiguous memory or a view of
/// channels-last `[C_out, K_h, K_w, C_in]` memory. Until set with [`set_conv_weight_layout`],
/// `DIFFUSERS_RS_CONV_WEIGHTS` decides (`auto`, `pytorch`, `channels_last`; unset or anything
/// else is `auto`).
///
/// burn's convolution on CubeCL devices views its operands as channels-last and copies any
/// operand whose channels are not adjacent in memory (burn-cubecl 0.22.1 `conv_forward`,
/// cubek-convolution 0.3.1 `has_valid_layout`): a contiguous `[C_out, C_in, 3, 3]` weight is
/// copied on every call; a channels-last one is read where it lies. The host loop on flex
/// multiplies PyTorch's layout directly, so it copies the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvWeightLayout {
    /// Channels-last on CubeCL devices without autodiff, PyTorch's layout elsewhere.
    Auto,
    /// PyTorch's contiguous `[C_out, C_in, K_h, K_w]` everywhere.
    Pytorch,
    /// Channels-last on every device without autodiff (on flex only to test the layout: its
    /// convolution then copies the weight on every call).
    ChannelsLast,
}

impl Route for ConvWeightLayout {
    const ALL: &'static [Self] = &[Self::Auto, Self::Pytorch, Self::ChannelsLast];
    const KIND: &'static str = "convolution weight layout";
    const ENV: &'static str = "DIFFUSERS_RS_CONV_WEIGHTS";
    const DEFAULT: Self = Self::Auto;

    fn name(self) -> &'static str {
        ConvWeightLayout::name(self)
    }
}

impl ConvWeightLayout {
    /// The lowercase name (`auto`, `pytorch`, `channels_last`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Pytorch => "pytorch",
            Self::ChannelsLast => "channels_last",
        }
    }
}

impl std::str::FromStr for ConvWeightLayout {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Route::parse(s)
    }
}

/// The convolution weight layout, 0 until decided (then the environment is read).
static CONV_WEIGHT_LAYOUT: AtomicU8 = AtomicU8::new(0);

/// Choose the [`ConvWeightLayout`] for the whole process. It applies to weights loaded or cast
/// afterwards (and to the order in which [`conv2d_split_k`] gathers its columns).
pub fn set_conv_weight_layout(layout: ConvWeightLayout) {
    layout.store(&CONV_WEIGHT_LAYOUT);
}

/// The current [`ConvWeightLayout`] (see there for how it is decided).
pub fn conv_weight_layout() -> ConvWeightLayout {
    Route::load(&CONV_WEIGHT_LAYOUT)
}

/// Whether convolution weights on `device` are laid out channels-last under the current
/// [`ConvWeightLayout`]: never on an autodiff device (the reordering would be recorded in the
/// graph, and the parameters would stop being leaves).
pub fn conv_weights_channels_last(device: &Device) -> bool {
    if device.is_autodiff() {
        return false;
    }
    match conv_weight_layout() {
        ConvWeightLayout::Auto => on_kernel_device(device),
        ConvWeightLayout::Pytorch => false,
        ConvWeightLayout::ChannelsLast => true,
    }
}

/// What the GroupNorm kernel does with an input whose channels are adjacent in memory (an
/// NCHW view of NHWC memory, as burn's convolution returns on CubeCL devices). Until set with
/// [`set_group_norm_layout`], `DIFFUSERS_RS_GROUP_NORM_LAYOUT` decides (`keep`, `contiguous`;
/// unset or anything else is `keep`). Any other layout is copied to PyTorch's contiguous one
/// first, either way.
///
/// burn's convolution on CubeCL devices copies an input whose channels are not adjacent into
/// channels-last memory, and hands its output back as an NCHW view of channels-last memory;
/// burn's fused element-wise blocks keep that order. A GroupNorm that made its input contiguous
/// therefore cost two copies between two convolutions: its own, and the next convolution's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupNormLayout {
    /// Read a channels-last input where it lies and write the output channels-last too.
    Keep,
    /// Copy every input that is not contiguous in PyTorch's order first, and write contiguous
    /// output. [`activations_channels_last`] is then false, so the models also go back to
    /// their PyTorch-order forms of spatial attention, upsampling and skip concatenation: the
    /// behaviour before session 15, kept to measure against.
    Contiguous,
}

impl Route for GroupNormLayout {
    const ALL: &'static [Self] = &[Self::Keep, Self::Contiguous];
    const KIND: &'static str = "group norm layout";
    const ENV: &'static str = "DIFFUSERS_RS_GROUP_NORM_LAYOUT";
    const DEFAULT: Self = Self::Keep;

    fn name(self) -> &'static str {
        GroupNormLayout::name(self)
    }
}

impl GroupNormLayout {
    /// The lowercase name (`keep`, `contiguous`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Contiguous => "contiguous",
        }
    }
}

impl std::str::FromStr for GroupNormLayout {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        Route::parse(s)
    }
}

/// The GroupNorm layout, 0 until decided (then the environment is read).
static GROUP_NORM_LAYOUT: AtomicU8 = AtomicU8::new(0);

/// Choose the [`GroupNormLayout`] for the whole process (it applies to GroupNorms called
/// afterwards).
pub fn set_group_norm_layout(layout: GroupNormLayout) {
    layout.store(&GROUP_NORM_LAYOUT);
}

/// The current [`GroupNormLayout`] (see there for how it is decided).
pub fn group_norm_layout() -> GroupNormLayout {
    Route::load(&GROUP_NORM_LAYOUT)
}

/// The element strides of `tensor`'s memory as the kernels and burn's ops see it: on a CubeCL
/// device once the operations pending in burn's fusion stream have run (this waits for them),
/// on flex its layout. `None` on other backends and under autodiff. For finding out which
/// layout a model hands from one operation to the next (channels-last activations, see
/// [`GroupNormLayout`]); the values are unchanged.
pub fn memory_strides<const D: usize>(tensor: burn::tensor::Tensor<D>) -> Option<Vec<isize>> {
    if tensor.is_autodiff() {
        return None;
    }
    #[cfg(feature = "cubecl-kernels")]
    if on_kernel_device(&tensor.device()) {
        return extension::cube_strides(tensor);
    }
    #[cfg(feature = "flex")]
    if matches!(
        tensor.device().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    ) {
        let primitive = tensor.try_into_primitive::<burn::backend::Flex>().ok()?;
        return Some(primitive.layout().strides().to_vec());
    }
    let _ = tensor;
    None
}

/// Whether feature maps on `device` are expected to be channels-last in memory: on CubeCL
/// devices without autodiff, where burn's convolutions return NCHW views of channels-last
/// memory, burn's element-wise ops keep that order and the GroupNorm kernel keeps it too
/// ([`GroupNormLayout::Keep`]). Models use it to pick, between two equivalent ways of turning a
/// feature map into tokens and back, the one that is a view rather than a copy in that layout.
/// Only memory traffic depends on it, never a value.
pub fn activations_channels_last(device: &Device) -> bool {
    !device.is_autodiff()
        && uses_kernel(Kernel::GroupNorm, device)
        && group_norm_layout() == GroupNormLayout::Keep
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

    #[test]
    fn counts_parse_with_binary_suffixes() {
        assert_eq!(parse_count("16M"), Some(1 << 24));
        assert_eq!(parse_count(" 64m "), Some(1 << 26));
        assert_eq!(parse_count("512K"), Some(1 << 19));
        assert_eq!(parse_count("1G"), Some(1 << 30));
        assert_eq!(parse_count("1000"), Some(1000));
        assert_eq!(parse_count("M"), None);
        assert_eq!(parse_count("lots"), None);
        assert_eq!(parse_count(""), None);
        assert_eq!(parse_count(&format!("{}G", usize::MAX)), None);
    }

    #[test]
    fn conv_routes_parse() {
        assert_eq!(" Split_K ".parse::<ConvRoute>().unwrap(), ConvRoute::SplitK);
        for route in [ConvRoute::Burn, ConvRoute::SplitK, ConvRoute::Tune] {
            assert_eq!(route.name().parse::<ConvRoute>().unwrap(), route);
        }
        match "cudnn".parse::<ConvRoute>() {
            Err(crate::Error::UnknownName { kind, name, known }) => {
                assert_eq!((kind, name.as_str()), ("convolution route", "cudnn"));
                assert_eq!(known, "burn, split_k, tune");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conv_weight_layouts_parse() {
        use ConvWeightLayout::*;
        for layout in [Auto, Pytorch, ChannelsLast] {
            assert_eq!(layout.name().parse::<ConvWeightLayout>().unwrap(), layout);
        }
        match "nhwc".parse::<ConvWeightLayout>() {
            Err(crate::Error::UnknownName { kind, known, .. }) => {
                assert_eq!(kind, "convolution weight layout");
                assert_eq!(known, "auto, pytorch, channels_last");
            }
            other => panic!("{other:?}"),
        }
        // Never on an autodiff device, whatever the setting; `auto` is PyTorch's layout on flex.
        // (The setting is process-wide, so only `auto`, the default, is looked at here.)
        assert!(!conv_weights_channels_last(&Device::flex().autodiff()));
        if conv_weight_layout() == Auto {
            assert!(!conv_weights_channels_last(&Device::flex()));
        }
    }

    #[test]
    fn group_norm_layouts_parse() {
        for layout in [GroupNormLayout::Keep, GroupNormLayout::Contiguous] {
            assert_eq!(layout.name().parse::<GroupNormLayout>().unwrap(), layout);
        }
        assert_eq!(
            " Keep ".parse::<GroupNormLayout>().unwrap(),
            GroupNormLayout::Keep
        );
        match "nchw".parse::<GroupNormLayout>() {
            Err(crate::Error::UnknownName { kind, known, .. }) => {
                assert_eq!(kind, "group norm layout");
                assert_eq!(known, "keep, contiguous");
            }
            other => panic!("{other:?}"),
        }
    }
}
