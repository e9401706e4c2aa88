//! 2-D convolution.

use burn::tensor::ops::ConvOptions;
use burn::tensor::{Tensor, module};

/// `torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)`, with
/// per-side padding as burn's [`ConvOptions`] holds it.
///
/// For f32 tensors on the flex device without autodiff and with one group
/// ([`super::Kernel::HostConv`] enabled) through a host loop of `gemm` products over an
/// im2col buffer ([`host`]); else through burn's `module::conv2d` (the reference: what
/// `burn::nn::conv::Conv2d::forward` runs).
///
/// # Shapes
/// - `x`: `[B, C_in, H, W]`
/// - `weight`: `[C_out, C_in / groups, K_h, K_w]`
/// - `bias`: `[C_out]`
/// - output: `[B, C_out, H_out, W_out]`
///
/// # Panics
/// As burn's `conv2d` when the shapes disagree.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(plan) = host::Plan::new(&x, &weight, bias.as_ref(), &options) {
        return host::conv2d_f32(x, weight, bias, &plan);
    }
    let route = super::conv_route();
    // Tuning is the last condition: it times the shape once, and only where split-K applies.
    if route != super::ConvRoute::Burn
        && super::on_kernel_device(&x.device())
        && !(x.is_autodiff()
            || weight.is_autodiff()
            || bias.as_ref().is_some_and(Tensor::is_autodiff))
        && let Some(splits) = split_k_factor(&x, &weight, &options)
        && (route == super::ConvRoute::SplitK
            || tuned_split_k(&x, &weight, &bias, &options, splits))
    {
        return conv2d_split_k(x, weight, bias, options, splits);
    }
    module::conv2d(x, weight, bias, options)
}

/// The key of [`tuned_split_k`]'s choices: input and weight dims, stride, padding, dilation,
/// whether there is a bias, and the dtype.
type TuneKey = (
    [usize; 4],
    [usize; 4],
    [usize; 2],
    [(usize, usize); 2],
    [usize; 2],
    bool,
    burn::tensor::DType,
);

/// The route [`super::ConvRoute::Tune`] keeps for each shape (index 0 burn's op, 1 split-K).
static TUNED: std::sync::LazyLock<super::tune::Choices<TuneKey>> =
    std::sync::LazyLock::new(|| super::tune::Choices::new("conv2d"));

/// What [`super::ConvRoute::Tune`] chose so far.
pub(super) fn tuned_choices() -> Vec<super::TunedChoice> {
    TUNED.reports()
}

/// Whether the split-K route with `splits` ran this convolution faster than burn's op when
/// the shape was first seen (both timed then, see [`super::tune`]).
fn tuned_split_k(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Option<Tensor<1>>,
    options: &ConvOptions<2>,
    splits: usize,
) -> bool {
    let key: TuneKey = (
        x.dims(),
        weight.dims(),
        options.stride,
        options.padding,
        options.dilation,
        bias.is_some(),
        x.dtype(),
    );
    if let Some(index) = TUNED.get(&key) {
        return index == 1;
    }
    let device = x.device();
    let names = ["burn".to_string(), format!("split_k/{splits}")];
    let index = TUNED.choose(
        &key,
        || {
            format!(
                "x {:?}, weight {:?}, stride {:?}, padding {:?}, dilation {:?}, bias {}, {:?}",
                key.0, key.1, key.2, key.3, key.4, key.5, key.6
            )
        },
        &[names[0].as_str(), names[1].as_str()],
        |i| {
            super::tune::time_on(&device, || {
                let (x, w, b, o) = (x.clone(), weight.clone(), bias.clone(), options.clone());
                if i == 1 {
                    conv2d_split_k(x, w, b, o, splits)
                } else {
                    module::conv2d(x, w, b, o)
                }
            })
        },
    );
    index == 1
}

/// Output tiles a GPU matrix kernel is assumed to cut a product into along each side.
const SPLIT_K_TILE: usize = 128;
/// Work groups [`split_k_factor`] aims for: two waves of an H100's 132 multiprocessors.
const SPLIT_K_TARGET_GROUPS: usize = 264;
/// The fewest reduction elements (`C_in · K_h · K_w / splits`) one split keeps.
const SPLIT_K_MIN_DEPTH: usize = 256;

/// How many slices [`conv2d`]'s split-K route ([`super::ConvRoute::SplitK`]) cuts the
/// reduction of `conv2d(x, weight, _, options)` into, or `None` where it leaves the
/// convolution to burn: one group only, and only where the product `[C_out, C_in · K_h · K_w]
/// · [C_in · K_h · K_w, B · H_out · W_out]` has too few output tiles of
/// [`SPLIT_K_TILE`]² to fill half of [`SPLIT_K_TARGET_GROUPS`] (SD 1.5's UNet on its 8×8, 16×16
/// and 32×32 feature maps: 1280 channels over 128 positions make 10 tiles for 132 multiprocessors).
/// The factor doubles while the tiles times the factor stay under the target and each slice
/// keeps at least [`SPLIT_K_MIN_DEPTH`] of the reduction, dividing it evenly.
pub fn split_k_factor(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    options: &ConvOptions<2>,
) -> Option<usize> {
    let [batch, c_in, h, w] = x.dims();
    let [c_out, c_per_group, k_h, k_w] = weight.dims();
    if options.groups != 1 || c_per_group != c_in || weight.shape().num_elements() == 0 {
        return None;
    }
    let [h_out, w_out] = conv_output_size([h, w], [k_h, k_w], options)?;
    let positions = batch * h_out * w_out;
    let depth = c_in * k_h * k_w;
    let tiles = c_out.div_ceil(SPLIT_K_TILE) * positions.div_ceil(SPLIT_K_TILE);
    if positions == 0 || tiles == 0 || 2 * tiles >= SPLIT_K_TARGET_GROUPS {
        return None;
    }
    let mut splits = 1;
    while tiles * splits < SPLIT_K_TARGET_GROUPS
        && depth % (2 * splits) == 0
        && depth / (2 * splits) >= SPLIT_K_MIN_DEPTH
    {
        splits *= 2;
    }
    (splits > 1).then_some(splits)
}

/// The output size of a convolution, `None` when the kernel does not fit in the padded input.
fn conv_output_size(
    size: [usize; 2],
    kernel: [usize; 2],
    options: &ConvOptions<2>,
) -> Option<[usize; 2]> {
    let out = |axis: usize| {
        let (begin, end) = options.padding[axis];
        let span = options.dilation[axis] * (kernel[axis] - 1) + 1;
        (size[axis] + begin + end)
            .checked_sub(span)
            .map(|room| room / options.stride[axis] + 1)
    };
    Some([out(0)?, out(1)?])
}

/// [`conv2d`] as a split-K matrix product in burn tensor ops, for GPUs, where burn's implicit
/// GEMM convolution launches one work group per output tile and so leaves most of the
/// multiprocessors idle on small feature maps with many channels.
///
/// The im2col matrix `[C_in · K_h · K_w, B · H_out · W_out]` is gathered from shifted (strided,
/// dilated) slices of the padded input, its rows in the order of the weight's memory so that
/// the weight is only reshaped: `[K_h · K_w, C_in, B, H_out, W_out]` where convolution weights
/// are channels-last on this device ([`super::conv_weights_channels_last`]), else
/// `[C_in, K_h · K_w, B, H_out, W_out]`, PyTorch's order. (A weight laid out the other way is
/// copied by the reshape; the result is the same either way.) Its rows and the
/// weight's columns are cut into `splits` slices, multiplied as one batched product
/// `[splits, C_out, depth / splits] · [splits, depth / splits, positions]`, and the partial
/// products are summed in f32 (whatever the input dtype), then the bias is added and the
/// result rounded to the input dtype. Any backend runs it; [`conv2d`] takes it on CubeCL
/// devices with [`super::ConvRoute::SplitK`] chosen, for the shapes [`split_k_factor`]
/// accepts.
///
/// # Panics
/// If the group count is not 1, the shapes disagree, the kernel is empty or does not fit in
/// the padded input, or `splits` is 0 or does not divide `C_in · K_h · K_w`.
pub fn conv2d_split_k(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
    splits: usize,
) -> Tensor<4> {
    let channels_last = super::conv_weights_channels_last(&weight.device());
    split_k_in_order(x, weight, bias, options, splits, channels_last)
}

/// [`conv2d_split_k`] with the im2col rows in channels-last order (`[K_h · K_w, C_in]`,
/// `channels_last`) or PyTorch's (`[C_in, K_h · K_w]`).
fn split_k_in_order(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
    splits: usize,
    channels_last: bool,
) -> Tensor<4> {
    use burn::tensor::ops::PadMode;
    use burn::tensor::{FloatDType, Slice};

    let [batch, c_in, h, w] = x.dims();
    let [c_out, c_per_group, k_h, k_w] = weight.dims();
    assert!(
        options.groups == 1 && c_per_group == c_in && k_h > 0 && k_w > 0,
        "conv2d_split_k: one group and a non-empty kernel only (weight {:?}, input {:?})",
        weight.dims(),
        x.dims()
    );
    let [h_out, w_out] = conv_output_size([h, w], [k_h, k_w], &options)
        .expect("conv2d_split_k: the kernel is larger than the padded input");
    let depth = c_in * k_h * k_w;
    assert!(
        splits > 0 && depth % splits == 0,
        "conv2d_split_k: {splits} splits do not divide a reduction of {depth}"
    );
    let dtype = x.dtype();
    let [(top, bottom), (left, right)] = options.padding;
    // [C_in, B, H + pads, W + pads]: channels first so the stacked taps land in weight order.
    let x = x
        .swap_dims(0, 1)
        .pad([(top, bottom), (left, right)], PadMode::Constant(0.0));
    let taps = (0..k_h)
        .flat_map(|ky| (0..k_w).map(move |kx| (ky, kx)))
        .map(|(ky, kx)| {
            let along = |axis: usize, tap: usize, len: usize| {
                let start = tap * options.dilation[axis];
                Slice::new(
                    start as isize,
                    Some((start + (len - 1) * options.stride[axis] + 1) as isize),
                    options.stride[axis] as isize,
                )
            };
            x.clone().slice([
                Slice::full(),
                Slice::full(),
                along(0, ky, h_out),
                along(1, kx, w_out),
            ])
        })
        .collect::<Vec<_>>();
    let positions = batch * h_out * w_out;
    // [K_h · K_w, C_in, B, H_out, W_out] or [C_in, K_h · K_w, B, H_out, W_out]
    // → [splits, depth / splits, positions].
    let columns = Tensor::stack::<5>(taps, if channels_last { 0 } else { 1 }).reshape([
        splits,
        depth / splits,
        positions,
    ]);
    // [C_out, depth] in the same order (channels-last: [C_out, K_h, K_w, C_in]), a reshape of
    // the weight's memory → [splits, C_out, depth / splits], a strided view.
    let weight = if channels_last {
        weight.permute([0, 2, 3, 1])
    } else {
        weight
    };
    let weight = weight
        .reshape([c_out, splits, depth / splits])
        .swap_dims(0, 1);
    let partials = weight.matmul(columns);
    let mut out = partials
        .cast(FloatDType::F32)
        .sum_dim(0)
        .reshape([c_out, positions]);
    if let Some(bias) = bias {
        out = out + bias.cast(FloatDType::F32).reshape([c_out, 1]);
    }
    out.cast(dtype)
        .reshape([c_out, batch, h_out, w_out])
        .swap_dims(0, 1)
}

/// The reference of [`conv2d`]: burn's `module::conv2d`.
pub fn conv2d_reference(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    module::conv2d(x, weight, bias, options)
}

/// Convolution on the CPU as blocked matrix products.
///
/// burn-flex's convolution (the reference on flex) converts the whole input to NHWC and the
/// weights to `[C_out, K_h, K_w, C_in]` on one thread for every call, multiplies tiles of 512
/// output positions through an im2col buffer, and scatters each product into the NCHW output one
/// element at a time with a stride of the output plane, then adds the bias in another pass; it
/// ran SD's 3×3 convolutions at 55-75% of PyTorch's oneDNN speed (docs/benchmarks.md). Here, per
/// image and block of output rows, an im2col buffer `[C_in · K_h · K_w, rows · W_out]` is
/// filled straight from the NCHW input (each of its rows is a shifted copy of an input row,
/// zero-padded at the edges), and one `gemm` product `weight[C_out, C_in · K_h · K_w] · col`
/// writes the output block in place in the NCHW output (row stride `H_out · W_out`), onto the
/// bias written there first. The weight needs no reordering: PyTorch's `[C_out, C_in, K_h, K_w]`
/// flattens to exactly the im2col row order. A 1×1 convolution with stride 1 and no padding
/// multiplies the input itself, without a buffer. Blocks run in parallel on flex's rayon pool;
/// when there are too few of them for the pool, each product is split by `gemm` instead.
#[cfg(feature = "flex")]
pub(super) mod host {
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    use super::super::Kernel;
    use super::super::host::{SendPtr, applies, with_f32};

    /// Output positions per block (`rows · W_out`, whole rows, at least one row): the im2col
    /// buffer is `C_in · K_h · K_w` times that, 4.5 MiB for a 3×3 convolution from 512
    /// channels. Measured on SD's 3×3 convolutions (320-512 channels at 32-64², 128 at 128²;
    /// 2 threads, release, two sweeps): 128 positions 154-168 GFLOP/s, 256 151-171, 384
    /// 145-151, 1024 114-154, 2048 142-146, 4096 76-152; burn-flex's convolution 91-130.
    const BLOCK_POSITIONS: usize = 256;

    /// The sizes of one convolution the host loop computes.
    #[derive(Clone, Copy, Debug)]
    pub(in crate::kernels) struct Plan {
        batch: usize,
        c_in: usize,
        c_out: usize,
        size_in: [usize; 2],
        size_out: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
    }

    impl Plan {
        /// The plan of `conv2d(x, weight, bias, options)` when the host loop takes it: f32
        /// tensors on flex without autodiff, [`Kernel::HostConv`] on, one group, shapes that
        /// fit together and a non-empty output. `None` sends the call to the reference.
        pub(in crate::kernels) fn new(
            x: &Tensor<4>,
            weight: &Tensor<4>,
            bias: Option<&Tensor<1>>,
            options: &ConvOptions<2>,
        ) -> Option<Self> {
            let [batch, c_in, h, w] = x.dims();
            let [c_out, c_per_group, k_h, k_w] = weight.dims();
            let f32_plain = |dtype: DType, autodiff: bool| dtype == DType::F32 && !autodiff;
            if options.groups != 1
                || c_per_group != c_in
                || !f32_plain(weight.dtype(), weight.is_autodiff())
                || x.is_autodiff()
                || bias
                    .is_some_and(|b| !f32_plain(b.dtype(), b.is_autodiff()) || b.dims() != [c_out])
                || !applies(x, Kernel::HostConv)
                || weight.shape().num_elements() == 0
            {
                return None;
            }
            let size_out = super::conv_output_size([h, w], [k_h, k_w], options)?;
            // Padding after the input only limits the output size (computed above); every
            // position reads the input through the begin padding.
            let padding = [options.padding[0].0, options.padding[1].0];
            (size_out[0] * size_out[1] > 0).then_some(Self {
                batch,
                c_in,
                c_out,
                size_in: [h, w],
                size_out,
                kernel: [k_h, k_w],
                stride: options.stride,
                padding,
                dilation: options.dilation,
            })
        }

        /// A 1×1 convolution with stride 1 and no padding: the input plane is the im2col
        /// matrix.
        fn pointwise(&self) -> bool {
            self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
        }

        fn col_len(&self) -> usize {
            self.c_in * self.kernel[0] * self.kernel[1]
        }
    }

    /// [`super::conv2d`] through the host loop, for a call [`Plan::new`] accepted.
    pub(in crate::kernels) fn conv2d_f32(
        x: Tensor<4>,
        weight: Tensor<4>,
        bias: Option<Tensor<1>>,
        plan: &Plan,
    ) -> Tensor<4> {
        let device = x.device();
        let [h_out, w_out] = plan.size_out;
        let plane_out = h_out * w_out;
        let mut out = vec![0.0f32; plan.batch * plan.c_out * plane_out];
        // The products add onto the bias.
        let read_dst = bias.is_some();
        if let Some(bias) = bias {
            with_f32(bias, |bias| {
                out.par_chunks_mut(plane_out)
                    .enumerate()
                    .for_each(|(i, plane)| plane.fill(bias[i % plan.c_out]));
            });
        }
        let rows = (BLOCK_POSITIONS / w_out).clamp(1, h_out);
        let blocks_per_image = h_out.div_ceil(rows);
        let blocks = plan.batch * blocks_per_image;
        // Enough blocks for every thread (two each, for balance), or split each product.
        let threads = rayon::current_num_threads();
        let inner = if blocks >= 2 * threads {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let dst = SendPtr(out.as_mut_ptr());
        with_f32(weight, |weight| {
            with_f32(x, |x| {
                let run = |block: usize, col: &mut Vec<f32>| {
                    let image = block / blocks_per_image;
                    let first_row = (block % blocks_per_image) * rows;
                    let n_rows = rows.min(h_out - first_row);
                    let input = &x[image * plan.c_in * plan.size_in[0] * plan.size_in[1]..]
                        [..plan.c_in * plan.size_in[0] * plan.size_in[1]];
                    let offset = image * plan.c_out * plane_out + first_row * w_out;
                    // SAFETY: blocks write disjoint sets of output positions (their own rows
                    // of their own image), within `out`, which outlives this loop.
                    unsafe {
                        block_product(
                            plan,
                            input,
                            weight,
                            (first_row, n_rows),
                            dst.add(offset),
                            read_dst,
                            col,
                            inner,
                        );
                    }
                };
                match inner {
                    gemm::Parallelism::None => (0..blocks)
                        .into_par_iter()
                        .for_each_init(Vec::new, |col, block| run(block, col)),
                    _ => {
                        let mut col = Vec::new();
                        (0..blocks).for_each(|block| run(block, &mut col));
                    }
                }
            })
        });
        let shape = [plan.batch, plan.c_out, h_out, w_out];
        Tensor::from_data(TensorData::new(out, shape), &device)
    }

    /// Output rows `first_row..first_row + n_rows` of one image: the im2col buffer of those
    /// rows (unless the convolution is pointwise), then `dst[C_out, positions] (+)= weight · col`.
    ///
    /// # Safety
    /// `dst` must point at the image's output element `[0, first_row, 0]`, with the image's
    /// `C_out` planes of `H_out · W_out` after it, and no other thread may access the block's
    /// positions of those planes meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_product(
        plan: &Plan,
        input: &[f32],
        weight: &[f32],
        (first_row, n_rows): (usize, usize),
        dst: *mut f32,
        read_dst: bool,
        col: &mut Vec<f32>,
        parallelism: gemm::Parallelism,
    ) {
        let [h_out, w_out] = plan.size_out;
        let positions = n_rows * w_out;
        let k = plan.col_len();
        let (rhs, rhs_rs) = if plan.pointwise() {
            (
                input[first_row * w_out..].as_ptr(),
                (h_out * w_out) as isize,
            )
        } else {
            col.resize(k * positions, 0.0);
            fill_columns(plan, input, first_row, n_rows, col);
            (col.as_ptr(), positions as isize)
        };
        // SAFETY: weight is C_out × k row-major; rhs is k × positions with row stride rhs_rs
        // (the input's planes, or the buffer just filled); dst is C_out × positions with row
        // stride H_out · W_out, valid and exclusive by the caller's contract, and aliases
        // neither.
        unsafe {
            gemm::gemm(
                plan.c_out,
                positions,
                k,
                dst,
                1,
                (h_out * w_out) as isize,
                read_dst,
                weight.as_ptr(),
                1,
                k as isize,
                rhs,
                1,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// The im2col rows of output rows `first_row..first_row + n_rows` into `col`
    /// (`[C_in · K_h · K_w, n_rows · W_out]`): row `(c, ky, kx)`, position `(oy, ox)` holds
    /// `x[c, oy · s_h - p_h + ky · d_h, ox · s_w - p_w + kx · d_w]`, zero outside the input.
    fn fill_columns(plan: &Plan, input: &[f32], first_row: usize, n_rows: usize, col: &mut [f32]) {
        let [h, w] = plan.size_in;
        let [_, w_out] = plan.size_out;
        let [k_h, k_w] = plan.kernel;
        let [s_h, s_w] = plan.stride;
        let [p_h, p_w] = plan.padding;
        let [d_h, d_w] = plan.dilation;
        let positions = n_rows * w_out;
        for (tap, row) in col.chunks_exact_mut(positions).enumerate() {
            let c = tap / (k_h * k_w);
            let (ky, kx) = ((tap / k_w) % k_h, tap % k_w);
            let plane = &input[c * h * w..(c + 1) * h * w];
            // Output columns whose input column lies inside: ox · s_w + kx · d_w - p_w in [0, w).
            let shift = (kx * d_w) as isize - p_w as isize;
            let lo = ((-shift).max(0) as usize).div_ceil(s_w).min(w_out);
            let hi = if (w as isize) - shift <= 0 {
                0
            } else {
                ((w as isize - shift) as usize).div_ceil(s_w).min(w_out)
            }
            .max(lo);
            for (r, out_row) in row.chunks_exact_mut(w_out).enumerate() {
                let iy = ((first_row + r) * s_h + ky * d_h) as isize - p_h as isize;
                if iy < 0 || iy >= h as isize {
                    out_row.fill(0.0);
                    continue;
                }
                let source = &plane[iy as usize * w..][..w];
                out_row[..lo].fill(0.0);
                out_row[hi..].fill(0.0);
                let first = (lo * s_w) as isize + shift;
                if s_w == 1 {
                    let first = first as usize;
                    out_row[lo..hi].copy_from_slice(&source[first..first + (hi - lo)]);
                } else {
                    for (o, i) in out_row[lo..hi]
                        .iter_mut()
                        .zip((first as usize..).step_by(s_w))
                    {
                        *o = source[i];
                    }
                }
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Distribution, Tensor};

    use super::super::{Kernel, relative_error, set_kernel_enabled};
    use super::*;
    use crate::Device;

    /// `[batch, c_in, c_out, h, w]`, kernel, stride, padding (begin, end) per axis, dilation.
    type Case = (
        [usize; 5],
        [usize; 2],
        [usize; 2],
        [(usize, usize); 2],
        [usize; 2],
    );

    /// A case's random input, weight and bias, and its options.
    fn random_case(
        ([b, c_in, c_out, h, w], kernel, stride, padding, dilation): Case,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>, Tensor<1>, ConvOptions<2>) {
        let x = Tensor::<4>::random([b, c_in, h, w], Distribution::Normal(0.0, 1.0), device);
        let weight = Tensor::<4>::random(
            [c_out, c_in, kernel[0], kernel[1]],
            Distribution::Normal(0.0, 0.3),
            device,
        );
        let bias = Tensor::<1>::random([c_out], Distribution::Normal(0.0, 1.0), device);
        let options = ConvOptions::new_with_padding(stride, padding, dilation, 1);
        (x, weight, bias, options)
    }

    /// The host loop against burn's convolution: 3×3 with padding 1 (the UNet's and VAE's),
    /// strided downsampling with the asymmetric padding diffusers' `Downsample2D` uses, 1×1
    /// pointwise and padded, dilation, kernels wider than the input with padding, non-square
    /// sizes, blocks that end inside the output, batches, with and without a bias, and inputs
    /// that are views (read through a copy). Switched off, and with two groups, `conv2d` runs
    /// the reference bit for bit.
    #[test]
    fn conv_host_loop_matches_reference() {
        set_kernel_enabled(Kernel::HostConv, true);
        let device = Device::flex();
        let cases: [Case; 10] = [
            ([2, 8, 12, 17, 23], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            (
                [1, 32, 16, 64, 64],
                [3, 3],
                [1, 1],
                [(1, 1), (1, 1)],
                [1, 1],
            ),
            ([2, 6, 6, 16, 16], [3, 3], [2, 2], [(0, 1), (0, 1)], [1, 1]),
            ([1, 5, 7, 15, 13], [3, 3], [2, 2], [(1, 1), (1, 1)], [1, 1]),
            ([3, 9, 4, 10, 11], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            ([1, 4, 3, 10, 11], [1, 1], [1, 1], [(1, 1), (0, 2)], [1, 1]),
            ([1, 3, 5, 12, 14], [3, 3], [1, 1], [(2, 2), (2, 2)], [2, 2]),
            ([1, 2, 3, 4, 5], [7, 7], [1, 1], [(3, 3), (3, 3)], [1, 1]),
            ([2, 4, 5, 9, 40], [3, 5], [1, 3], [(1, 2), (2, 0)], [1, 1]),
            ([1, 3, 4, 1, 1], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
        ];
        for case in cases {
            let (x, weight, bias, options) = random_case(case, &device);
            for bias in [Some(bias), None] {
                let case = format!("{case:?}, bias {}", bias.is_some());
                assert!(
                    host::Plan::new(&x, &weight, bias.as_ref(), &options).is_some(),
                    "{case}: not taken"
                );
                let got = conv2d(x.clone(), weight.clone(), bias.clone(), options.clone());
                let want = conv2d_reference(x.clone(), weight.clone(), bias, options.clone());
                assert_eq!(got.dims(), want.dims(), "{case}");
                let err = relative_error(got, want);
                assert!(err <= 1e-5, "{case}: {err:e}");
            }
        }

        // A view (channels and rows swapped back and forth through a transpose).
        let t = Tensor::<4>::random([1, 20, 6, 18], Distribution::Default, &device);
        let x = t.swap_dims(1, 2);
        let weight = Tensor::<4>::random([5, 6, 3, 3], Distribution::Default, &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let err = relative_error(
            conv2d(x.clone(), weight.clone(), None, options.clone()),
            conv2d_reference(x.clone(), weight.clone(), None, options.clone()),
        );
        assert!(err <= 1e-5, "view: {err:e}");

        // Two groups: the reference.
        let grouped = ConvOptions::new([1, 1], [1, 1], [1, 1], 2);
        let w2 = Tensor::<4>::random([4, 3, 3, 3], Distribution::Default, &device);
        let x2 = Tensor::<4>::random([1, 6, 8, 8], Distribution::Default, &device);
        assert!(host::Plan::new(&x2, &w2, None, &grouped).is_none());
        conv2d(x2.clone(), w2.clone(), None, grouped.clone())
            .into_data()
            .assert_eq(&conv2d_reference(x2, w2, None, grouped).into_data(), true);

        // Switched off: the reference bit for bit. (In this test, not its own: the switch is
        // process-wide and tests run in parallel.)
        let want = conv2d_reference(x.clone(), weight.clone(), None, options.clone());
        set_kernel_enabled(Kernel::HostConv, false);
        let off = host::Plan::new(&x, &weight, None, &options).is_none();
        let got = conv2d(x, weight, None, options);
        set_kernel_enabled(Kernel::HostConv, true);
        assert!(off);
        got.into_data().assert_eq(&want.into_data(), true);
    }

    /// Under autodiff the reference runs and records the graph: the gradients of the input,
    /// weight and bias equal the reference's bit for bit.
    #[test]
    fn conv_host_loop_keeps_autodiff_graphs() {
        set_kernel_enabled(Kernel::HostConv, true);
        let device = Device::flex();
        let x = Tensor::<4>::random([1, 3, 6, 6], Distribution::Default, &device);
        let w = Tensor::<4>::random([4, 3, 3, 3], Distribution::Default, &device);
        let b = Tensor::<1>::random([4], Distribution::Default, &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let grads =
            |f: fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4>| {
                // Only the weight trained: the input is frozen, as in a UNet's first layer.
                let w = w.clone().autodiff().require_grad();
                let b = b.clone().autodiff().require_grad();
                let out = f(
                    x.clone().autodiff(),
                    w.clone(),
                    Some(b.clone()),
                    options.clone(),
                );
                let g = out.powi_scalar(2).sum().backward();
                (
                    w.grad(&g).expect("weight gradient").into_data(),
                    b.grad(&g).expect("bias gradient").into_data(),
                )
            };
        let (gw, gb) = grads(conv2d);
        let (rw, rb) = grads(conv2d_reference);
        gw.assert_eq(&rw, true);
        gb.assert_eq(&rb, true);
    }

    /// `weight` (`[C_out, C_in, K_h, K_w]`) as a view of channels-last memory.
    fn channels_last_view(weight: Tensor<4>) -> Tensor<4> {
        let [o, i, h, w] = weight.dims();
        weight
            .permute([0, 2, 3, 1])
            .reshape([o * h * w * i])
            .reshape([o, h, w, i])
            .permute([0, 3, 1, 2])
    }

    /// The split-K route in burn ops against burn's convolution, on flex: 3×3 with padding,
    /// strided with asymmetric padding, dilated, pointwise, non-square kernels and strides, a
    /// view as input, for several split counts, with and without a bias, in f32 (≤ 1e-5 of the
    /// output's range) and f16 (≤ 1e-2, the partial products summed in f32). Both im2col
    /// orders run, each with the weight in both memory layouts.
    #[test]
    fn conv_split_k_matches_reference() {
        use burn::tensor::FloatDType;
        let device = Device::flex();
        let cases: [Case; 6] = [
            ([2, 16, 24, 8, 8], [3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
            ([1, 8, 5, 9, 7], [3, 3], [2, 2], [(0, 1), (0, 1)], [1, 1]),
            ([2, 4, 6, 11, 10], [3, 3], [1, 1], [(2, 2), (2, 2)], [2, 2]),
            ([3, 12, 4, 5, 6], [1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
            ([2, 6, 3, 9, 20], [3, 5], [1, 3], [(1, 2), (2, 0)], [1, 1]),
            ([1, 2, 3, 4, 5], [7, 7], [1, 1], [(3, 3), (3, 3)], [1, 1]),
        ];
        for case in cases {
            let (x, weight, bias, options) = random_case(case, &device);
            let ([_, c_in, ..], kernel, ..) = case;
            let depth = c_in * kernel[0] * kernel[1];
            for splits in [1, 2, 3, 4, depth].into_iter().filter(|s| depth % s == 0) {
                for bias in [Some(bias.clone()), None] {
                    let case = format!("{case:?}, {splits} splits, bias {}", bias.is_some());
                    let want =
                        conv2d_reference(x.clone(), weight.clone(), bias.clone(), options.clone());
                    let got = conv2d_split_k(
                        x.clone(),
                        weight.clone(),
                        bias.clone(),
                        options.clone(),
                        splits,
                    );
                    assert_eq!(got.dims(), want.dims(), "{case}");
                    let err = relative_error(got, want.clone());
                    assert!(err <= 1e-5, "{case}: {err:e}");
                    for channels_last in [false, true] {
                        for w in [weight.clone(), channels_last_view(weight.clone())] {
                            let got = split_k_in_order(
                                x.clone(),
                                w,
                                bias.clone(),
                                options.clone(),
                                splits,
                                channels_last,
                            );
                            let err = relative_error(got, want.clone());
                            let case = format!("{case}, channels-last order {channels_last}");
                            assert!(err <= 1e-5, "{case}: {err:e}");
                        }
                    }

                    let half = |t: Tensor<4>| t.cast(FloatDType::F16);
                    let got = conv2d_split_k(
                        half(x.clone()),
                        half(weight.clone()),
                        bias.map(|b| b.cast(FloatDType::F16)),
                        options.clone(),
                        splits,
                    );
                    assert_eq!(got.dtype(), burn::tensor::DType::F16, "{case}");
                    let err = relative_error(got.cast(FloatDType::F32), want);
                    assert!(err <= 1e-2, "{case}, f16: {err:e}");
                }
            }
        }

        // A view (channels and rows swapped back and forth through a transpose).
        let t = Tensor::<4>::random([2, 20, 6, 18], Distribution::Default, &device);
        let x = t.swap_dims(1, 2);
        let weight = Tensor::<4>::random([5, 6, 3, 3], Distribution::Default, &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let err = relative_error(
            conv2d_split_k(x.clone(), weight.clone(), None, options.clone(), 6),
            conv2d_reference(x, weight, None, options),
        );
        assert!(err <= 1e-5, "view: {err:e}");
    }

    /// Which SD 1.5 and SDXL convolutions the split-K route takes, and into how many slices.
    #[test]
    fn split_k_factor_takes_small_maps_with_many_channels() {
        let device = Device::flex();
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let factor = |[b, c_in, c_out, hw]: [usize; 4], options: &ConvOptions<2>| {
            let x = Tensor::<4>::empty([b, c_in, hw, hw], &device);
            let weight = Tensor::<4>::empty([c_out, c_in, 3, 3], &device);
            split_k_factor(&x, &weight, options)
        };
        // SD 1.5 UNet at batch 2: 8×8 (10 tiles) up to 32 slices of 360, 16×16 (40 tiles)
        // into 8, 32×32 with 640 channels (80 tiles) into 4; the up blocks' concatenated
        // inputs likewise.
        assert_eq!(factor([2, 1280, 1280, 8], &options), Some(32));
        assert_eq!(factor([2, 2560, 1280, 8], &options), Some(32));
        assert_eq!(factor([2, 1280, 1280, 16], &options), Some(8));
        assert_eq!(factor([2, 640, 640, 32], &options), Some(4));
        // 64×64 latents (192 tiles) and SDXL's 32×32 with 1280 channels (160 tiles): burn's op.
        assert_eq!(factor([2, 320, 320, 64], &options), None);
        assert_eq!(factor([2, 1280, 1280, 32], &options), None);
        // Small reductions stay whole; groups are not split.
        assert_eq!(factor([1, 16, 16, 4], &options), None);
        let grouped = ConvOptions::new([1, 1], [1, 1], [1, 1], 2);
        assert_eq!(factor([2, 1280, 1280, 8], &grouped), None);
        // A kernel larger than the padded input, or an empty one: no convolution to split.
        let x = Tensor::<4>::empty([1, 64, 2, 2], &device);
        let weight = Tensor::<4>::empty([64, 64, 7, 7], &device);
        assert_eq!(split_k_factor(&x, &weight, &options), None);
        let weight = Tensor::<4>::empty([64, 64, 0, 3], &device);
        assert_eq!(split_k_factor(&x, &weight, &options), None);
    }
}
