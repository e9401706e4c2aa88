//! GroupNorm with an optional fused SiLU.

use burn::tensor::{DType, FloatDType, Tensor, activation};

/// `torch.nn.GroupNorm(groups, C, eps)(x) * gamma + beta`, followed by SiLU when `silu` is set,
/// through the fused kernel where [`super::uses_kernel`] says so, through a fused host loop
/// for f32 tensors on the flex device (without autodiff, [`super::Kernel::GroupNorm`] enabled),
/// else through [`group_norm_reference`].
///
/// The kernel computes the statistics in f32 for every input dtype and applies the affine and
/// the activation in f32 before rounding to the input dtype. The host loop computes the
/// statistics in f64; it is within 1e-5 of the reference relative to the output's range.
///
/// # Shapes
/// - `x`: `[B, C, *]` (rank ≥ 3)
/// - `gamma`, `beta`: `[C]`
/// - output: the shape of `x`
///
/// # Panics
/// When `C` is not a multiple of `groups` or `gamma`/`beta` do not have `C` elements.
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<D> {
    let channels = x.dims()[1];
    assert!(
        D >= 3 && groups > 0 && channels.is_multiple_of(groups),
        "group_norm: {channels} channels (rank {D}) cannot be split into {groups} groups"
    );
    assert_eq!(
        gamma.dims(),
        [channels],
        "group_norm: gamma must have C elements"
    );
    assert_eq!(
        beta.dims(),
        [channels],
        "group_norm: beta must have C elements"
    );
    // With any input under autodiff (trained affine parameters on a frozen input, too) the
    // reference runs: its ops record the graph, the kernel and the host loop do not.
    if x.is_autodiff() || gamma.is_autodiff() || beta.is_autodiff() {
        return group_norm_reference(x, gamma, beta, groups, eps, silu);
    }
    #[cfg(feature = "cubecl-kernels")]
    if super::uses_kernel(super::Kernel::GroupNorm, &x.device()) && x.shape().num_elements() > 0 {
        return super::extension::group_norm(x, gamma, beta, groups, eps, silu);
    }
    #[cfg(feature = "flex")]
    if uses_host_kernel(&x) {
        return host::group_norm_f32(x, gamma, beta, groups, eps, silu);
    }
    group_norm_reference(x, gamma, beta, groups, eps, silu)
}

/// Whether [`group_norm`] takes the fused host loop of [`host`]: an f32 tensor on the flex
/// device (no autodiff) with [`super::Kernel::GroupNorm`] enabled.
#[cfg(feature = "flex")]
fn uses_host_kernel<const D: usize>(x: &Tensor<D>) -> bool {
    super::host::applies(x, super::Kernel::GroupNorm)
}

/// GroupNorm (+ SiLU) on the CPU as one fused loop over the tensor's memory.
///
/// burn's op sequence (the reference) makes about ten passes over the tensor on flex, with an
/// intermediate tensor for each; it ran at 73 million elements per second on SD 1.5's
/// 320-channel 64×64 activations, ten times slower than PyTorch (docs/benchmarks.md). burn has
/// no GroupNorm primitive and flex no extension point for one, so the tensor's f32 values are
/// normalised in place on the host: per (sample, group), the mean and the sum of squared
/// deviations in f64 (two passes, no cancellation; eight partial sums each), then one pass applying
/// `x * (gamma * rstd) + (beta - mean * gamma * rstd)` and SiLU. Groups run in parallel (rayon,
/// flex's own thread pool).
#[cfg(feature = "flex")]
mod host {
    use burn::tensor::Tensor;
    use rayon::prelude::*;

    use super::super::host::{avx2_fma, exp};

    pub(super) fn group_norm_f32<const D: usize>(
        x: Tensor<D>,
        gamma: Tensor<1>,
        beta: Tensor<1>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Tensor<D> {
        let device = x.device();
        let shape = x.shape();
        let channels = shape[1];
        let spatial = shape[2..].iter().product::<usize>();
        let per_group = channels / groups;
        let gamma = gamma.into_data().convert::<f32>();
        let beta = beta.into_data().convert::<f32>();
        let (gamma, beta) = (
            gamma.as_slice::<f32>().expect("f32 after convert"),
            beta.as_slice::<f32>().expect("f32 after convert"),
        );
        let mut data = x.into_data();
        let values = data
            .as_mut_slice::<f32>()
            .expect("an f32 tensor's data is f32");
        let group_len = per_group * spatial;
        values
            .par_chunks_mut(group_len)
            .enumerate()
            .for_each(|(index, chunk)| {
                let first_channel = (index % groups) * per_group;
                let group = Group {
                    spatial,
                    gamma: &gamma[first_channel..first_channel + per_group],
                    beta: &beta[first_channel..first_channel + per_group],
                    eps,
                    silu,
                };
                normalize_group_dispatch(chunk, &group);
            });
        Tensor::from_data(data, &device)
    }

    /// `Σ f(v)` over `values` in f64, in eight independent lanes so that the additions are not
    /// one dependency chain and vectorise.
    #[inline(always)]
    fn lane_sum(values: &[f32], f: impl Fn(f64) -> f64) -> f64 {
        const LANES: usize = 8;
        let mut acc = [0.0f64; LANES];
        let mut blocks = values.chunks_exact(LANES);
        for block in &mut blocks {
            for (a, &v) in acc.iter_mut().zip(block) {
                *a += f(v as f64);
            }
        }
        let tail: f64 = blocks.remainder().iter().map(|&v| f(v as f64)).sum();
        acc.iter().sum::<f64>() + tail
    }

    /// What [`normalize_group`] needs besides the values: the row length, the group's channels'
    /// affine parameters, epsilon, and whether SiLU follows.
    struct Group<'a> {
        spatial: usize,
        gamma: &'a [f32],
        beta: &'a [f32],
        eps: f64,
        silu: bool,
    }

    /// [`normalize_group`] compiled for AVX2 and FMA where the CPU has them (the build's
    /// baseline x86-64 target has neither), else for the baseline.
    fn normalize_group_dispatch(chunk: &mut [f32], group: &Group<'_>) {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (`avx2_fma`).
            return unsafe { normalize_group_avx2(chunk, group) };
        }
        normalize_group::<false>(chunk, group);
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn normalize_group_avx2(chunk: &mut [f32], group: &Group<'_>) {
        normalize_group::<true>(chunk, group);
    }

    /// Normalise one group (`channels` rows of `spatial` values) in place; `FMA`: fuse the
    /// affine's and the exponential's multiply-adds (only where the CPU has FMA).
    #[inline(always)]
    fn normalize_group<const FMA: bool>(chunk: &mut [f32], group: &Group<'_>) {
        let Group {
            spatial,
            gamma,
            beta,
            eps,
            silu,
        } = *group;
        let n = chunk.len() as f64;
        let mean = lane_sum(chunk, |v| v) / n;
        let m2 = lane_sum(chunk, |v| {
            let d = v - mean;
            d * d
        });
        let rstd = 1.0 / (m2 / n + eps).sqrt();
        for ((row, &g), &b) in chunk.chunks_mut(spatial).zip(gamma).zip(beta) {
            let scale = g as f64 * rstd;
            let shift = (b as f64 - mean * scale) as f32;
            let scale = scale as f32;
            if silu {
                for v in row.iter_mut() {
                    let y = if FMA {
                        v.mul_add(scale, shift)
                    } else {
                        *v * scale + shift
                    };
                    *v = y / (1.0 + exp::<FMA>(-y));
                }
            } else {
                for v in row.iter_mut() {
                    *v = if FMA {
                        v.mul_add(scale, shift)
                    } else {
                        *v * scale + shift
                    };
                }
            }
        }
    }
}

/// [`group_norm`] in burn tensor ops: the same op sequence as `burn::nn::GroupNorm::forward`
/// (statistics widened to f32 for f16 inputs, two passes: mean, then the mean of squared
/// deviations), then `activation::silu`, so on every backend it equals what the models computed
/// with `GroupNorm` bit for bit.
///
/// # Shapes
/// As [`group_norm`].
pub fn group_norm_reference<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<D> {
    let shape = x.shape();
    let batch = shape[0];
    let channels = shape[1];
    let hidden = shape[2..].iter().product::<usize>() * channels / groups;
    let x = x.reshape([batch, groups, hidden]);
    let original = x.dtype();
    let widen = matches!(original, DType::F16);
    let x = if widen { x.cast(FloatDType::F32) } else { x };
    let mean = x.clone().mean_dim(2);
    let x = x.sub(mean);
    let var = x.clone().square().mean_dim(2);
    let normalized = x.div(var.add_scalar(eps).sqrt());
    let normalized = if widen {
        normalized.cast(FloatDType::from(original))
    } else {
        normalized
    };
    let mut affine_shape = [1; D];
    affine_shape[1] = channels;
    let out = normalized
        .reshape(shape)
        .mul(gamma.reshape(affine_shape))
        .add(beta.reshape(affine_shape));
    if silu { activation::silu(out) } else { out }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::kernels::relative_error;
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::{Device, Distribution};

    /// The reference is `burn::nn::GroupNorm` exactly, in every float dtype flex has; so is
    /// `group_norm` in f16 and bf16 (the host loop takes only f32).
    #[test]
    fn reference_is_burn_group_norm_bit_for_bit() {
        let device = Device::flex();
        for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
            let mut norm = GroupNormConfig::new(3, 6).with_epsilon(1e-6).init(&device);
            let gamma = Tensor::<1>::random([6], Distribution::Default, &device).cast(dtype);
            let beta = Tensor::<1>::random([6], Distribution::Default, &device).cast(dtype);
            norm.gamma = Some(Param::from_tensor(gamma.clone()));
            norm.beta = Some(Param::from_tensor(beta.clone()));
            let x = Tensor::<4>::random([2, 6, 5, 3], Distribution::Normal(0.5, 2.0), &device)
                .cast(dtype);
            let want = norm.forward(x.clone());
            let got = group_norm_reference(x.clone(), gamma.clone(), beta.clone(), 3, 1e-6, false);
            got.into_data().assert_eq(&want.clone().into_data(), true);
            let got = group_norm_reference(x.clone(), gamma.clone(), beta.clone(), 3, 1e-6, true);
            got.into_data()
                .assert_eq(&activation::silu(want.clone()).into_data(), true);
            if dtype != FloatDType::F32 {
                let got = group_norm(x.clone(), gamma.clone(), beta.clone(), 3, 1e-6, false);
                got.into_data().assert_eq(&want.clone().into_data(), true);
                let got = group_norm(x, gamma, beta, 3, 1e-6, true);
                got.into_data()
                    .assert_eq(&activation::silu(want).into_data(), true);
            }
        }
    }

    /// `group_norm` and `group_norm_reference` of `x`, flattened.
    fn both<const D: usize>(
        x: Tensor<D>,
        (gamma, beta, groups, silu): (Tensor<1>, Tensor<1>, usize, bool),
    ) -> (Tensor<1>, Tensor<1>) {
        let got = group_norm(x.clone(), gamma.clone(), beta.clone(), groups, 1e-5, silu);
        let want = group_norm_reference(x, gamma, beta, groups, 1e-5, silu);
        (got.reshape([-1]), want.reshape([-1]))
    }

    /// The fused host loop on flex (f32) against the tensor-op reference: ranks 3 to 5, one
    /// and several channels per group, a single group, batches, a large common offset (where a
    /// one-pass variance would cancel), with and without SiLU; the input tensor still held
    /// elsewhere is left untouched; switched off, the reference runs.
    #[test]
    fn host_loop_matches_reference() {
        let device = Device::flex();
        assert!(uses_host_kernel(&Tensor::<3>::zeros([1, 2, 2], &device)));
        let cases: [(Vec<usize>, usize, f64); 6] = [
            (vec![2, 6, 5, 3], 3, 0.0),
            (vec![1, 64, 16, 16], 32, 0.0),
            (vec![3, 8, 7], 8, 0.0),
            (vec![2, 4, 3, 2, 5], 1, 0.0),
            (vec![1, 32, 9, 11], 32, 100.0),
            (vec![2, 12, 1, 1], 4, 0.0),
        ];
        for (shape, groups, offset) in cases {
            let channels = shape[1];
            let gamma = Tensor::<1>::random([channels], Distribution::Normal(1.0, 0.5), &device);
            let beta = Tensor::<1>::random([channels], Distribution::Normal(0.0, 0.5), &device);
            let x = Tensor::<1>::random(
                [shape.iter().product::<usize>()],
                Distribution::Normal(offset, 2.0),
                &device,
            );
            let before = x.clone().into_data();
            for silu in [false, true] {
                let norm = (gamma.clone(), beta.clone(), groups, silu);
                let (got, want) = match shape.len() {
                    3 => both(x.clone().reshape([shape[0], shape[1], shape[2]]), norm),
                    4 => both(
                        x.clone().reshape([shape[0], shape[1], shape[2], shape[3]]),
                        norm,
                    ),
                    _ => both(
                        x.clone()
                            .reshape([shape[0], shape[1], shape[2], shape[3], shape[4]]),
                        norm,
                    ),
                };
                let err = relative_error(got, want);
                eprintln!("{shape:?}, {groups} groups, offset {offset}, silu {silu}: {err:e}");
                assert!(
                    err <= 1e-5,
                    "{shape:?}, {groups} groups, offset {offset}, silu {silu}: {err:e}"
                );
            }
            x.into_data().assert_eq(&before, true);
        }

        // With the GroupNorm kernel switched off, flex runs the reference bit for bit. (In this
        // test, not its own: the switch is process-wide and tests run in parallel.)
        let x = Tensor::<4>::random([1, 8, 4, 4], Distribution::Normal(0.0, 1.0), &device);
        let gamma = Tensor::<1>::ones([8], &device);
        let beta = Tensor::<1>::zeros([8], &device);
        let want = group_norm_reference(x.clone(), gamma.clone(), beta.clone(), 4, 1e-5, true);
        super::super::set_kernel_enabled(super::super::Kernel::GroupNorm, false);
        let off = uses_host_kernel(&x);
        let got = group_norm(x, gamma, beta, 4, 1e-5, true);
        super::super::set_kernel_enabled(super::super::Kernel::GroupNorm, true);
        assert!(!off);
        got.into_data().assert_eq(&want.into_data(), true);
    }
}
