//! The CubeCL kernels behind [`super::group_norm`] and [`super::attention`], registered with
//! burn's dispatch through `#[backend_extension]` (the `Fusion` selector makes them work on the
//! fused CubeCL backend burn uses by default: they run as opaque operations in a fused stream).
//!
//! Every kernel reads its input dtype and computes in f32. Sizes that depend on the hardware
//! (units per cube, shared memory) are read from the device, so the same kernels run on CUDA,
//! wgpu and the CubeCL CPU runtime (which has as many units per cube as host threads).

use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{DType, FloatDType, Shape, Tensor as BurnTensor};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::{into_contiguous, untile};
use burn_cubecl::ops::{permute_nchw_to_nhwc, permute_nhwc_to_nchw};
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim, calculate_cube_count_elemwise};

/// Elements of one group that one cube reduces in the statistics pass: large groups (a VAE
/// decoder at 512² has a million elements per group) are split over many cubes and the partial
/// (count, mean, M2) triples are merged with Chan's formula.
const GROUP_NORM_CHUNK: usize = 8192;
/// Positions that one unit of the channels-last statistics pass reads (for one vector of
/// channels): short enough to give small maps many units, long enough that the partial
/// triples stay a small fraction of the input.
const GROUP_NORM_NHWC_POSITIONS: usize = 32;
/// Preferred units per cube for the reductions and for attention query rows.
const PREFERRED_UNITS: u32 = 256;
const ATTENTION_UNITS: u32 = 64;
/// Largest head dim the attention kernel keeps per unit (q row and accumulator in registers).
const MAX_HEAD_DIM: usize = 512;

#[backend_extension(Cube, Fusion)]
pub trait DiffusionKernels: Backend {
    /// GroupNorm (+ SiLU) of a `[B, C, *]` tensor with `[C]` affine parameters. With
    /// `keep_channels_last`, an input whose memory is channels-last is read where it lies and
    /// the output is channels-last too; any other input is made contiguous first.
    #[fusion(dtype = x, shape = x)]
    fn fused_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
        keep_channels_last: bool,
    ) -> FloatTensor<Self>;

    /// `softmax(q kᵀ / sqrt(D)) v` on `[B, H, S, D]` tensors.
    #[fusion(dtype = q, shape = attention_shape(q, v))]
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Softmax over the last dimension, computed in f32, written in the input dtype.
    #[fusion(dtype = x, shape = x)]
    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `softmax(q kᵀ / sqrt(D) + bias) v`, `bias` `[B, H, S_q, S_kv]`.
    #[fusion(dtype = q, shape = attention_shape(q, v))]
    fn fused_attention_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

fn attention_shape(q: &Shape, v: &Shape) -> Shape {
    Shape::new([q[0], q[1], q[2], v[3]])
}

impl DiffusionKernels for CubeBackend {
    fn fused_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
        keep_channels_last: bool,
    ) -> FloatTensor<Self> {
        launch_group_norm(x, gamma, beta, groups, eps, silu, keep_channels_last)
    }

    fn fused_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        launch_softmax(x)
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launch_attention(q, k, v, None)
    }

    fn fused_attention_bias(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        launch_attention(q, k, v, Some(bias))
    }
}

/// The tensor-level entry of the GroupNorm kernel (the device was checked by the caller).
pub(super) fn group_norm<const D: usize>(
    x: BurnTensor<D>,
    gamma: BurnTensor<1>,
    beta: BurnTensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> BurnTensor<D> {
    let dtype = x.dtype();
    let out = Dispatch::fused_group_norm(
        x.into_dispatch(),
        same_dtype(gamma, dtype).into_dispatch(),
        same_dtype(beta, dtype).into_dispatch(),
        groups,
        eps,
        silu,
        super::group_norm_layout() == super::GroupNormLayout::Keep,
    );
    BurnTensor::from_dispatch(out)
}

/// The tensor-level entry of the softmax kernel (the device was checked by the caller).
pub(super) fn softmax<const D: usize>(x: BurnTensor<D>) -> BurnTensor<D> {
    BurnTensor::from_dispatch(Dispatch::fused_softmax(x.into_dispatch()))
}

/// The element strides of a tensor on a CubeCL device, after the operations pending in
/// burn's fusion stream ran (`None` for a tensor on another backend).
pub(super) fn cube_strides<const D: usize>(tensor: BurnTensor<D>) -> Option<Vec<isize>> {
    let fused = tensor.try_into_primitive::<burn_cubecl::Cube>().ok()?;
    let client = fused.client.clone();
    let cube = client.resolve_tensor_float::<CubeBackend>(fused);
    Some(cube.meta.strides().iter().map(|&s| s as isize).collect())
}

/// Whether `device` is a CUDA device.
pub(super) fn on_cuda(device: &burn::tensor::Device) -> bool {
    matches!(
        device.as_dispatch(),
        burn::backend::DispatchDevice::Cube(cube) if cube.runtime() == cubecl::RuntimeId::Cuda
    )
}

/// Whether the attention kernel takes these inputs (float dtypes, head dims it holds).
pub(super) fn attention_supported(q: &BurnTensor<4>, v: &BurnTensor<4>) -> bool {
    matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && q.dims()[3] <= MAX_HEAD_DIM
        && v.dims()[3] <= MAX_HEAD_DIM
}

/// The tensor-level entry of the attention kernel (the device was checked by the caller).
pub(super) fn attention(
    q: BurnTensor<4>,
    k: BurnTensor<4>,
    v: BurnTensor<4>,
    bias: Option<BurnTensor<4>>,
) -> BurnTensor<4> {
    let dtype = q.dtype();
    let k = same_dtype(k, dtype).into_dispatch();
    let v = same_dtype(v, dtype).into_dispatch();
    let out = match bias {
        Some(bias) => Dispatch::fused_attention_bias(
            q.into_dispatch(),
            k,
            v,
            same_dtype(bias, dtype).into_dispatch(),
        ),
        None => Dispatch::fused_attention(q.into_dispatch(), k, v),
    };
    BurnTensor::from_dispatch(out)
}

fn same_dtype<const D: usize>(t: BurnTensor<D>, dtype: DType) -> BurnTensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// Units per cube: `preferred` clamped to the device, rounded down to a power of two (the
/// reductions halve it).
fn units_per_cube(tensor: &CubeTensor, preferred: u32) -> u32 {
    let hardware = &tensor.client.properties().hardware;
    let max = preferred
        .min(hardware.max_units_per_cube)
        .min(hardware.max_cube_dim.0)
        .max(1);
    1 << (31 - max.leading_zeros())
}

fn empty_contiguous(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    let bytes = shape.num_elements() * dtype.size();
    let handle = like.client.empty(bytes.max(dtype.size()));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

#[allow(clippy::too_many_arguments)]
fn launch_group_norm(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    groups: usize,
    eps: f64,
    silu: bool,
    keep_channels_last: bool,
) -> CubeTensor {
    let x = untile(x);
    let gamma = into_contiguous(gamma);
    let beta = into_contiguous(beta);
    if keep_channels_last && !x.is_contiguous() {
        let nhwc = permute_nchw_to_nhwc(x.clone());
        if nhwc.is_contiguous() {
            let out = group_norm_channels_last(nhwc, gamma, beta, groups, eps, silu);
            return permute_nhwc_to_nchw(out);
        }
    }
    group_norm_contiguous(into_contiguous(x), gamma, beta, groups, eps, silu)
}

/// GroupNorm of a contiguous `[B, C, *]` tensor: each group is one run of memory.
fn group_norm_contiguous(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> CubeTensor {
    let shape = x.meta.shape().clone();
    let numel = shape.num_elements();
    let (batch, channels) = (shape[0], shape[1]);
    let spatial = numel / (batch * channels);
    let group_size = channels / groups * spatial;
    let n_groups = batch * groups;
    let splits = group_size.div_ceil(GROUP_NORM_CHUNK);
    let dtype = x.dtype;
    let client = x.client.clone();
    // Vectors never straddle two channels (they divide the spatial size), so never two groups
    // or two statistics chunks (the chunk is a multiple of every vector size).
    let vector = widest_vector(&x, spatial);

    let partials = empty_contiguous(&x, Shape::new([n_groups * splits * 3]), DType::F32);
    let out = empty_contiguous(&x, shape, dtype);

    let units = units_per_cube(&x, PREFERRED_UNITS);
    group_norm_partial_kernel::launch(
        &client,
        CubeCount::Static(splits as u32, n_groups as u32, 1),
        CubeDim::new_1d(units),
        vector,
        x.clone().into_tensor_arg(),
        partials.clone().into_tensor_arg(),
        (group_size / vector) as u32,
        (GROUP_NORM_CHUNK / vector) as u32,
        units as usize,
        dtype_to_storage_type(dtype),
    );
    // The partials of group `s` are entries `s * splits ..` (one per chunk).
    let stats = combine_group_stats(&x, partials, n_groups, 1, splits, 1, 1, eps);

    let vectors = numel / vector;
    let cube_dim = CubeDim::new_1d(units);
    group_norm_apply_kernel::launch(
        &client,
        calculate_cube_count_elemwise(&client, vectors, cube_dim),
        cube_dim,
        vector,
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        stats.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        vectors as u32,
        spatial as u32,
        channels as u32,
        (channels / groups) as u32,
        silu,
        dtype_to_storage_type(dtype),
    );
    out
}

/// GroupNorm of a contiguous channels-last `[B, *, C]` tensor (the NHWC memory behind an NCHW
/// view): a group is a strided set of short runs, so the statistics pass gives each unit one
/// vector of channels over a few positions, and neighbouring units read neighbouring channels
/// (whole rows of memory per cube).
fn group_norm_channels_last(
    x: CubeTensor,
    gamma: CubeTensor,
    beta: CubeTensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> CubeTensor {
    let shape = x.meta.shape().clone();
    let numel = shape.num_elements();
    let channels = shape[shape.num_dims() - 1];
    let batch = shape[0];
    let positions = numel / (batch * channels);
    let per_group = channels / groups;
    let dtype = x.dtype;
    let client = x.client.clone();
    // A vector divides a group's channels, so it never straddles two groups, and gamma and
    // beta load as vectors of the same channels.
    let vector = widest_vector(&x, per_group);
    let channel_vectors = channels / vector;
    let group_vectors = per_group / vector;
    let splits = positions.div_ceil(GROUP_NORM_NHWC_POSITIONS);
    let n_groups = batch * groups;

    // One (count, mean, M2) per unit: per sample, per chunk of positions, per channel vector.
    let threads = batch * splits * channel_vectors;
    let partials = empty_contiguous(&x, Shape::new([threads * 3]), DType::F32);
    let out = empty_contiguous(&x, shape, dtype);

    let units = units_per_cube(&x, PREFERRED_UNITS);
    let cube_dim = CubeDim::new_1d(units);
    group_norm_nhwc_partial_kernel::launch(
        &client,
        calculate_cube_count_elemwise(&client, threads, cube_dim),
        cube_dim,
        vector,
        x.clone().into_tensor_arg(),
        partials.clone().into_tensor_arg(),
        threads as u32,
        positions as u32,
        channel_vectors as u32,
        splits as u32,
        GROUP_NORM_NHWC_POSITIONS as u32,
        dtype_to_storage_type(dtype),
    );
    let stats = combine_group_stats(
        &x,
        partials,
        n_groups,
        groups,
        splits,
        channel_vectors,
        group_vectors,
        eps,
    );

    let vectors = numel / vector;
    group_norm_nhwc_apply_kernel::launch(
        &client,
        calculate_cube_count_elemwise(&client, vectors, cube_dim),
        cube_dim,
        vector,
        x.into_tensor_arg(),
        gamma.into_tensor_arg(),
        beta.into_tensor_arg(),
        stats.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        vectors as u32,
        channel_vectors as u32,
        (positions * channel_vectors) as u32,
        group_vectors as u32,
        groups as u32,
        silu,
        dtype_to_storage_type(dtype),
    );
    out
}

/// Merge the statistics passes' partial (count, mean, M2) triples into each group's mean and
/// `sqrt(var + eps)`, one cube per group. The partials of group `g` of sample `n` (`groups`
/// per sample) are, for each chunk `k < splits`, the `entries` consecutive triples from
/// `(n * splits + k) * stride + g * entries`.
#[allow(clippy::too_many_arguments)]
fn combine_group_stats(
    like: &CubeTensor,
    partials: CubeTensor,
    n_groups: usize,
    groups: usize,
    splits: usize,
    stride: usize,
    entries: usize,
    eps: f64,
) -> CubeTensor {
    let stats = empty_contiguous(like, Shape::new([n_groups * 2]), DType::F32);
    let units = units_per_cube(like, PREFERRED_UNITS);
    group_norm_combine_kernel::launch(
        &like.client,
        CubeCount::Static(n_groups as u32, 1, 1),
        CubeDim::new_1d(units),
        partials.into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        groups as u32,
        splits as u32,
        stride as u32,
        entries as u32,
        eps as f32,
        units as usize,
    );
    stats
}

/// The widest vector (elements per load) the device prefers for `tensor`'s dtype that divides
/// `divides`, 1 when none does.
fn widest_vector(tensor: &CubeTensor, divides: usize) -> VectorSize {
    tensor
        .client
        .io_optimized_vector_sizes(tensor.dtype.size())
        .filter(|&n| n > 0 && divides.is_multiple_of(n))
        .max()
        .unwrap_or(1)
}

/// One cube per (chunk, group): the chunk's element count, mean and sum of squared deviations
/// (two passes over the chunk, so no cancellation), reduced over the cube in shared memory.
/// Sizes and positions count vectors of `N` elements.
#[cube(launch)]
fn group_norm_partial_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    partials: &mut Tensor<f32>,
    group_size: u32,
    chunk: u32,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let split = CUBE_POS_X as usize;
    let group = CUBE_POS_Y as usize;
    let splits = CUBE_COUNT_X as usize;
    let size = group_size as usize;
    let start = split * chunk as usize;
    let mut end = start + chunk as usize;
    if end > size {
        end = size;
    }
    let base = group * size;
    let unit = UNIT_POS_X as usize;
    let lanes = x.vector_size();
    let mut shared = Shared::<[f32]>::new_slice(units);

    let mut sum = 0.0f32;
    let mut i = start + unit;
    while i < end {
        let v = Vector::<f32, N>::cast_from(x[base + i]);
        #[unroll]
        for l in 0..lanes {
            sum += v.extract(l);
        }
        i += units;
    }
    let count = f32::cast_from((end - start) * lanes);
    let mean = cube_reduce(&mut shared, unit, sum, false) / count;

    let mut m2 = 0.0f32;
    let mut j = start + unit;
    while j < end {
        let d = Vector::<f32, N>::cast_from(x[base + j]) - Vector::new(mean);
        let d2 = d * d;
        #[unroll]
        for l in 0..lanes {
            m2 += d2.extract(l);
        }
        j += units;
    }
    let m2 = cube_reduce(&mut shared, unit, m2, false);
    if unit == 0 {
        let o = (group * splits + split) * 3;
        partials[o] = count;
        partials[o + 1] = mean;
        partials[o + 2] = m2;
    }
}

/// Every unit of the cube contributes `value`; every unit gets the sum (or, with `take_max`,
/// the maximum) of all of them. `shared` holds one f32 per unit (a power of two); it is free
/// again when this returns.
#[cube]
fn cube_reduce(
    shared: &mut Shared<[f32]>,
    unit: usize,
    value: f32,
    #[comptime] take_max: bool,
) -> f32 {
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            if take_max {
                shared[unit] = max(shared[unit], shared[unit + stride]);
            } else {
                shared[unit] += shared[unit + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let result = shared[0];
    sync_cube();
    result
}

/// One cube per group: merge the group's partial (count, mean, M2) triples (Chan et al.) into
/// its mean and `sqrt(var + eps)` (biased variance, as `torch.nn.GroupNorm`). Each unit merges
/// every `units`-th triple, then the units' results merge pairwise in shared memory. Every
/// stored triple has a positive count; a unit that got none has count 0 and is skipped.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn group_norm_combine_kernel(
    partials: &Tensor<f32>,
    stats: &mut Tensor<f32>,
    groups: u32,
    splits: u32,
    stride: u32,
    entries: u32,
    eps: f32,
    #[comptime] units: usize,
) {
    let s = CUBE_POS_X as usize;
    let unit = UNIT_POS_X as usize;
    let sample = s / groups as usize;
    let group = s % groups as usize;
    let per_split = entries as usize;
    let total = splits as usize * per_split;

    let mut n = 0.0f32;
    let mut mean = 0.0f32;
    let mut m2 = 0.0f32;
    let mut e = unit;
    while e < total {
        let chunk = e / per_split;
        let o = ((sample * splits as usize + chunk) * stride as usize
            + group * per_split
            + e % per_split)
            * 3;
        let nb = partials[o];
        let mb = partials[o + 1];
        let m2b = partials[o + 2];
        if n == 0.0 {
            mean = mb;
            m2 = m2b;
        } else {
            let sum = n + nb;
            let delta = mb - mean;
            mean += delta * nb / sum;
            m2 += m2b + delta * delta * n * nb / sum;
        }
        n += nb;
        e += units;
    }

    // (count, mean, M2) of unit `u` at `u`, `units + u`, `2 * units + u`.
    let mut shared = Shared::<[f32]>::new_slice(3 * units);
    shared[unit] = n;
    shared[units + unit] = mean;
    shared[2 * units + unit] = m2;
    sync_cube();
    // A runtime value (CUBE_DIM_X is `units`): a comptime one cannot change in the loop.
    let mut half = CUBE_DIM_X as usize / 2;
    while half > 0 {
        if unit < half {
            let other = unit + half;
            let nb = shared[other];
            if nb > 0.0 {
                let na = shared[unit];
                if na == 0.0 {
                    shared[units + unit] = shared[units + other];
                    shared[2 * units + unit] = shared[2 * units + other];
                } else {
                    let sum = na + nb;
                    let delta = shared[units + other] - shared[units + unit];
                    shared[units + unit] += delta * nb / sum;
                    shared[2 * units + unit] +=
                        shared[2 * units + other] + delta * delta * na * nb / sum;
                }
                shared[unit] = na + nb;
            }
        }
        sync_cube();
        half /= 2;
    }
    if unit == 0 {
        stats[2 * s] = shared[units];
        stats[2 * s + 1] = (shared[2 * units] / shared[0] + eps).sqrt();
    }
}

/// The channels-last statistics pass: one unit per (sample, chunk of positions, vector of
/// channels), counting, for the vector's channels over the chunk's positions, the mean and
/// the sum of squared deviations from it (two passes, no cancellation), per lane, then merged
/// over the lanes (all in one group). Position `p` of sample `n` starts at vector
/// `(n * positions + p) * channel_vectors`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn group_norm_nhwc_partial_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    partials: &mut Tensor<f32>,
    threads: u32,
    positions: u32,
    channel_vectors: u32,
    splits: u32,
    chunk: u32,
    #[define(F)] _dtype: ElemType,
) {
    let t = ABSOLUTE_POS;
    if t >= threads as usize {
        terminate!();
    }
    let row = channel_vectors as usize;
    let rest = t / row;
    let split = rest % splits as usize;
    let sample = rest / splits as usize;
    let start = split * chunk as usize;
    let mut end = start + chunk as usize;
    if end > positions as usize {
        end = positions as usize;
    }
    let base = sample * positions as usize * row + t % row;

    let mut sum = Vector::<f32, N>::new(0.0f32);
    let mut p = start;
    while p < end {
        sum += Vector::<f32, N>::cast_from(x[base + p * row]);
        p += 1;
    }
    let count = f32::cast_from(end - start);
    let lane_mean = sum / Vector::new(count);
    let mut lane_m2 = Vector::<f32, N>::new(0.0f32);
    let mut q = start;
    while q < end {
        let d = Vector::<f32, N>::cast_from(x[base + q * row]) - lane_mean;
        lane_m2 += d * d;
        q += 1;
    }

    let lanes = x.vector_size();
    let mut mean = 0.0f32;
    #[unroll]
    for l in 0..lanes {
        mean += lane_mean.extract(l);
    }
    mean /= f32::cast_from(lanes);
    let mut m2 = 0.0f32;
    #[unroll]
    for l in 0..lanes {
        let d = lane_mean.extract(l) - mean;
        m2 += lane_m2.extract(l) + count * d * d;
    }
    let o = t * 3;
    partials[o] = count * f32::cast_from(lanes);
    partials[o + 1] = mean;
    partials[o + 2] = m2;
}

/// Element-wise over channels-last memory, a vector of `N` channels of one position per unit:
/// normalise with the group's statistics, apply the affine and the SiLU in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn group_norm_nhwc_apply_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<Vector<F, N>>,
    beta: &Tensor<Vector<F, N>>,
    stats: &Tensor<f32>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    channel_vectors: u32,
    sample_vectors: u32,
    group_vectors: u32,
    groups: u32,
    #[comptime] silu: bool,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let cv = i % channel_vectors as usize;
    let sample = i / sample_vectors as usize;
    let g = sample * groups as usize + cv / group_vectors as usize;
    let y = normalize_affine::<N>(
        Vector::<f32, N>::cast_from(x[i]),
        stats,
        g,
        Vector::<f32, N>::cast_from(gamma[cv]),
        Vector::<f32, N>::cast_from(beta[cv]),
        silu,
    );
    out[i] = Vector::<F, N>::cast_from(y);
}

/// `(x - mean) / std * gamma + beta` with group `g`'s statistics from `stats` (mean, std
/// pairs), then SiLU when `silu`; all in f32.
#[cube]
fn normalize_affine<N: Size>(
    x: Vector<f32, N>,
    stats: &Tensor<f32>,
    g: usize,
    gamma: Vector<f32, N>,
    beta: Vector<f32, N>,
    #[comptime] silu: bool,
) -> Vector<f32, N> {
    let mean = Vector::<f32, N>::new(stats[2 * g]);
    let std = Vector::<f32, N>::new(stats[2 * g + 1]);
    let mut y = (x - mean) / std * gamma + beta;
    if silu {
        y = y / (Vector::new(1.0f32) + (Vector::new(0.0f32) - y).exp());
    }
    y
}

/// Element-wise, a vector of `N` elements of one channel per unit: normalise with the group's
/// statistics, apply the affine and the SiLU in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn group_norm_apply_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    gamma: &Tensor<F>,
    beta: &Tensor<F>,
    stats: &Tensor<f32>,
    out: &mut Tensor<Vector<F, N>>,
    vectors: u32,
    spatial: u32,
    channels: u32,
    channels_per_group: u32,
    #[comptime] silu: bool,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i >= vectors as usize {
        terminate!();
    }
    let c_all = channels as usize;
    let cpg = channels_per_group as usize;
    let nc = i * x.vector_size() / spatial as usize;
    let c = nc % c_all;
    let n = nc / c_all;
    let g = n * (c_all / cpg) + c / cpg;
    let y = normalize_affine::<N>(
        Vector::<f32, N>::cast_from(x[i]),
        stats,
        g,
        Vector::<f32, N>::new(f32::cast_from(gamma[c])),
        Vector::<f32, N>::new(f32::cast_from(beta[c])),
        silu,
    );
    out[i] = Vector::<F, N>::cast_from(y);
}

/// Rows per launch dimension (CUDA's limit for the y and z cube counts).
const MAX_CUBES_PER_DIM: usize = 65_535;

fn launch_softmax(x: CubeTensor) -> CubeTensor {
    let x = into_contiguous(x);
    let shape = x.meta.shape().clone();
    let numel = shape.num_elements();
    let row_len = shape[shape.num_dims() - 1];
    let rows = numel / row_len;
    let dtype = x.dtype;
    let client = x.client.clone();
    // Every row starts on a vector boundary.
    let vector = widest_vector(&x, row_len);
    let units = units_per_cube(&x, PREFERRED_UNITS);
    let cubes_x = rows.min(MAX_CUBES_PER_DIM);
    let count = CubeCount::Static(cubes_x as u32, rows.div_ceil(cubes_x) as u32, 1);
    let row_vectors = (row_len / vector) as u32;
    // Each unit reads an element for the last time just before writing it, so a tensor nothing
    // else holds (attention's scores) is overwritten in place.
    let (out, out_arg) = if x.can_mut() {
        let alias = x.as_tensor_alias(0);
        (x.clone(), alias)
    } else {
        let out = empty_contiguous(&x, shape, dtype);
        let arg = out.clone().into_tensor_arg();
        (out, arg)
    };
    softmax_kernel::launch(
        &client,
        count,
        CubeDim::new_1d(units),
        vector,
        x.into_tensor_arg(),
        out_arg,
        rows as u32,
        row_vectors,
        units as usize,
        dtype_to_storage_type(dtype),
    );
    out
}

/// One cube per row: the row's maximum, then the sum of `exp(x - max)`, each reduced over the
/// cube in shared memory, then `exp(x - max) / sum` written in the input dtype; f32 throughout.
/// A row is read three times; at attention's row lengths (a few thousand) the second and third
/// reads come from cache.
#[cube(launch)]
fn softmax_kernel<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    out: &mut Tensor<Vector<F, N>>,
    rows: u32,
    row_vectors: u32,
    #[comptime] units: usize,
    #[define(F)] _dtype: ElemType,
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    // The same for every unit of the cube, so no unit is left waiting at a barrier.
    if row >= rows as usize {
        terminate!();
    }
    let n = row_vectors as usize;
    let base = row * n;
    let unit = UNIT_POS_X as usize;
    let lanes = x.vector_size();
    let mut shared = Shared::<[f32]>::new_slice(units);

    let mut m = f32::new(-3.0e38);
    let mut i = unit;
    while i < n {
        let v = Vector::<f32, N>::cast_from(x[base + i]);
        #[unroll]
        for l in 0..lanes {
            m = max(m, v.extract(l));
        }
        i += units;
    }
    let row_max = cube_reduce(&mut shared, unit, m, true);

    let mut sum = 0.0f32;
    let mut j = unit;
    while j < n {
        let e = (Vector::<f32, N>::cast_from(x[base + j]) - Vector::new(row_max)).exp();
        #[unroll]
        for l in 0..lanes {
            sum += e.extract(l);
        }
        j += units;
    }
    let inv = 1.0f32 / cube_reduce(&mut shared, unit, sum, false);

    let mut k = unit;
    while k < n {
        let e = (Vector::<f32, N>::cast_from(x[base + k]) - Vector::new(row_max)).exp();
        out[base + k] = Vector::<F, N>::cast_from(e * Vector::new(inv));
        k += units;
    }
}

fn launch_attention(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    bias: Option<CubeTensor>,
) -> CubeTensor {
    let q_shape = q.meta.shape().clone();
    let v_shape = v.meta.shape().clone();
    let (batch, heads, seq_q, head_dim) = (q_shape[0], q_shape[1], q_shape[2], q_shape[3]);
    let val_dim = v_shape[3];
    let dtype = q.dtype;
    let client = q.client.clone();
    // Written as `[B, S_q, H, D_v]` memory and returned as its `[B, H, S_q, D_v]` view, so that
    // merging the heads afterwards (`swap_dims(1, 2)` then a reshape to `[B, S_q, H * D_v]`)
    // is a view rather than a copy.
    let out = empty_contiguous(&q, Shape::new([batch, seq_q, heads, val_dim]), dtype);

    // Key/value tiles in shared memory (f32): as many keys as fit in half the shared memory.
    let max_shared = client.properties().hardware.max_shared_memory_size;
    let mut tile = 32usize;
    while tile > 1 && tile * (head_dim + val_dim) * 4 > max_shared / 2 {
        tile /= 2;
    }
    let units = units_per_cube(&q, ATTENTION_UNITS);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let has_bias = bias.is_some();
    // Without a bias the kernel never reads it; any tensor fills the slot.
    let bias = bias.unwrap_or_else(|| q.clone());

    flash_attention_kernel::launch(
        &client,
        CubeCount::Static((seq_q as u32).div_ceil(units), (batch * heads) as u32, 1),
        CubeDim::new_1d(units),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        bias.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        scale,
        head_dim,
        val_dim,
        tile,
        units as usize,
        has_bias,
        dtype_to_storage_type(dtype),
    );
    burn_cubecl::ops::permute(out, &[0, 2, 1, 3])
}

/// Flash-style attention: one unit per query row, key/value tiles staged in shared memory by
/// the whole cube, online softmax (running max and sum rescaled once per tile), f32 throughout.
/// Inputs are read through their strides (head-split views and expanded biases need no copy);
/// the output is written as contiguous `[B, S_q, H, D_v]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn flash_attention_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] val_dim: usize,
    #[comptime] tile: usize,
    #[comptime] units: usize,
    #[comptime] has_bias: bool,
    #[define(F)] _dtype: ElemType,
) {
    let heads = q.shape(1);
    let seq_q = q.shape(2);
    let seq_kv = k.shape(2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let unit = UNIT_POS_X as usize;
    let row = CUBE_POS_X as usize * units + unit;
    let active = row < seq_q;
    let mut row_c = row;
    if !active {
        row_c = seq_q - 1;
    }

    let q_base = b * q.stride(0) + h * q.stride(1) + row_c * q.stride(2);
    let k_base = b * k.stride(0) + h * k.stride(1);
    let v_base = b * v.stride(0) + h * v.stride(1);
    let bias_base = b * bias.stride(0) + h * bias.stride(1) + row_c * bias.stride(2);

    let mut q_row = Array::<f32>::new(head_dim);
    for d in 0..head_dim {
        q_row[d] = f32::cast_from(q[q_base + d * q.stride(3)]) * scale;
    }
    let mut acc = Array::<f32>::new(val_dim);
    for d in 0..val_dim {
        acc[d] = 0.0f32;
    }
    let mut scores = Array::<f32>::new(tile);
    let mut k_tile = Shared::<[f32]>::new_slice(tile * head_dim);
    let mut v_tile = Shared::<[f32]>::new_slice(tile * val_dim);

    let mut m = f32::new(-3.0e38);
    let mut l = f32::new(0.0);
    // `div_ceil` has no CubeCL expansion.
    #[allow(clippy::manual_div_ceil)]
    let n_tiles = (seq_kv + tile - 1) / tile;
    for t in 0..n_tiles {
        let start = t * tile;
        let mut count = seq_kv - start;
        if count > tile {
            count = tile;
        }
        let mut idx = unit;
        while idx < tile * head_dim {
            let j = idx / head_dim;
            let mut val = f32::new(0.0);
            if j < count {
                val = f32::cast_from(
                    k[k_base + (start + j) * k.stride(2) + (idx % head_dim) * k.stride(3)],
                );
            }
            k_tile[idx] = val;
            idx += units;
        }
        let mut idv = unit;
        while idv < tile * val_dim {
            let j = idv / val_dim;
            let mut val = f32::new(0.0);
            if j < count {
                val = f32::cast_from(
                    v[v_base + (start + j) * v.stride(2) + (idv % val_dim) * v.stride(3)],
                );
            }
            v_tile[idv] = val;
            idv += units;
        }
        sync_cube();

        let mut tile_max = f32::new(-3.0e38);
        for j in 0..count {
            let mut s = 0.0f32;
            for d in 0..head_dim {
                s += q_row[d] * k_tile[j * head_dim + d];
            }
            if has_bias {
                s += f32::cast_from(bias[bias_base + (start + j) * bias.stride(3)]);
            }
            scores[j] = s;
            tile_max = max(tile_max, s);
        }
        let m_new = max(m, tile_max);
        let correction = (m - m_new).exp();
        l *= correction;
        for d in 0..val_dim {
            acc[d] *= correction;
        }
        for j in 0..count {
            let p = (scores[j] - m_new).exp();
            l += p;
            for d in 0..val_dim {
                acc[d] += p * v_tile[j * val_dim + d];
            }
        }
        m = m_new;
        sync_cube();
    }

    if active {
        // `out` is `[B, S_q, H, D_v]` memory.
        let o = ((b * seq_q + row) * heads + h) * val_dim;
        for d in 0..val_dim {
            out[o + d] = F::cast_from(acc[d] / l);
        }
    }
}
