//! Host loops for the flex (CPU) device: what [`super::group_norm`] and [`super::attention`]
//! run for f32 tensors there, without autodiff, instead of burn's op sequences.
//!
//! burn has no GroupNorm primitive and flex no extension point for new ones, so these take the
//! tensor's values out of flex, compute on the host with flex's own thread pool (rayon) and
//! matrix kernels (`gemm`), and hand a new tensor back.

use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::Kernel;

/// Whether `x` is an f32 tensor with elements on the flex device (not autodiff) and `kernel`
/// is switched on: the condition for the host loops.
pub(super) fn applies<const D: usize>(x: &Tensor<D>, kernel: Kernel) -> bool {
    x.dtype() == DType::F32 && x.shape().num_elements() > 0 && on_flex(&x.device(), kernel)
}

/// Whether `device` is the flex device (not autodiff) and `kernel` is switched on.
pub(super) fn on_flex(device: &burn::tensor::Device, kernel: Kernel) -> bool {
    matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_))
        && super::kernel_enabled(kernel)
}

/// Run `f` on the f32 values of `tensor` (on flex, f32), in row-major order: its own storage
/// when that is already contiguous (no copy, shared or not), else a contiguous copy.
pub(super) fn with_f32<const D: usize, R>(tensor: Tensor<D>, f: impl FnOnce(&[f32]) -> R) -> R {
    let primitive = tensor
        .try_into_primitive::<burn::backend::Flex>()
        .expect("a tensor on the flex device");
    let contiguous = primitive.to_contiguous();
    f(contiguous.storage::<f32>())
}

/// A raw pointer that host loops hand to their worker threads, each of which writes its own
/// disjoint part of the buffer (the loops' safety comments say which).
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);

impl SendPtr {
    /// The pointer `offset` elements on (a method, so that closures capture the whole
    /// `SendPtr` and not its raw field).
    ///
    /// # Safety
    /// As `pointer::add`: the result must stay within the buffer.
    pub(super) unsafe fn add(&self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

// SAFETY: the pointer is only dereferenced at offsets no other thread touches meanwhile.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// `e^x` in f32 without a library call, so that loops using it vectorise (`f32::exp` is a
/// call to libm per element; it took a third of the time of GroupNorm + SiLU).
/// `x = k ln 2 + r` with `k` rounded to nearest through the 1.5 · 2^23 trick and
/// `|r| ≤ ln 2 / 2`, `e^r` from its Taylor series to degree 7 (truncation below 1e-8
/// relative), `2^k` built in the exponent bits. `k` is read from the bits of the rounded
/// float (in [2^23, 2^24) one unit is one bit step), not with `as i32`, whose saturating
/// conversion does not vectorise. Inputs are clamped to [-87.3, 88.3], where `2^k` stays a
/// normal float: within 2e-7 relative of `f32::exp` there (a unit test checks), and SiLU's
/// `y / (1 + e^-y)` saturates to `0` and `y` beyond as it should.
///
/// With `FMA` set the multiply-adds are fused (`f32::mul_add`): half the operations and half
/// the dependency chain, for code compiled with the `fma` target feature (elsewhere `mul_add`
/// is a library call). Also within 2e-7 of `f32::exp`; the two variants differ in the last bits.
#[inline(always)]
pub(super) fn exp<const FMA: bool>(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const C: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let madd = |a: f32, b: f32, c: f32| if FMA { a.mul_add(b, c) } else { a * b + c };
    let x = x.clamp(-87.3, 88.3);
    let rounded = madd(x, std::f32::consts::LOG2_E, ROUND);
    let k = rounded - ROUND;
    let k_bits = rounded.to_bits().wrapping_sub(ROUND.to_bits());
    let r = madd(-k, LN2_LO, madd(-k, LN2_HI, x));
    let p = C[..7].iter().rev().fold(C[7], |p, &c| madd(p, r, c));
    p * f32::from_bits(k_bits.wrapping_add(127) << 23)
}

/// Scores held per block of query rows in [`attention_f32`]: 1 Mi f32 values (4 MiB, in L3).
/// Larger blocks mean fewer products per head, and the matrix kernel repacks all of the head's
/// keys for each one. Measured on the 2-core development machine (SD 1.5's 8 × 4096² self-attention,
/// head dim 40, release): 16 rows a block 361 ms, 64 rows 305, 128 rows 258, 256 rows 234,
/// 512 rows 321.
const BLOCK_SCORES: usize = 1 << 20;

/// Query rows per block in [`attention_f32`]: [`BLOCK_SCORES`] / `S_kv`, at most 256, at least 4
/// (for very long key sequences the block outgrows [`BLOCK_SCORES`] rather than shrink to
/// single rows).
fn block_rows(s_kv: usize) -> usize {
    (BLOCK_SCORES / s_kv.max(1)).clamp(4, 256)
}

/// `softmax(q kᵀ / sqrt(D)) v` in f32 on the host, for [`super::attention`] on flex.
///
/// burn-flex's own attention op (the reference's path) runs each head whole, every query row
/// against 64-key tiles with an online softmax, through `f32::exp`; at Stable Diffusion's head
/// dims (40-80) its products are thin and the output accumulator (all of a head's rows) is
/// re-read and rescaled for every tile, so it reached 20-40 GFLOP/s against PyTorch's 64-112
/// on two cores (docs/benchmarks.md). Here each head is cut into blocks of query rows
/// ([`block_rows`]); for a block, all its scores at once as one product `q_block kᵀ` (scaled by
/// `1/sqrt(D)` inside it), an exact softmax per row (max, then `exp` ([`exp`], which
/// vectorises) and an eight-lane sum), the product of those unnormalised probabilities with
/// `v`, and each output row divided by its sum. Blocks run in parallel (rayon), each product
/// on one thread (`gemm`, no nested parallelism).
///
/// The caller has checked the shapes ([`super::attention`]) and that `q`, `k` and `v` are f32
/// on flex ([`applies`]).
pub(super) fn attention_f32(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let device = q.device();
    let [b, h, s_q, d] = q.dims();
    let s_kv = k.dims()[2];
    let d_v = v.dims()[3];
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    // `convert` is a no-op on f32 data ([`applies`] checked `q`; `k` and `v` share its dtype).
    let data = |t: Tensor<4>| t.into_data().convert::<f32>();
    let (q, k, v) = (data(q), data(k), data(v));
    let (q, k, v) = (f32_values(&q), f32_values(&k), f32_values(&v));
    let mut out = vec![0.0f32; b * h * s_q * d_v];
    // No scratch for rows a head does not have (same blocks: one block of s_q rows either way).
    let rows = block_rows(s_kv).min(s_q.max(1));
    if d_v > 0 {
        out.par_chunks_mut(s_q * d_v)
            .enumerate()
            .for_each(|(head, out_head)| {
                let q_head = &q[head * s_q * d..(head + 1) * s_q * d];
                let k_head = &k[head * s_kv * d..(head + 1) * s_kv * d];
                let v_head = &v[head * s_kv * d_v..(head + 1) * s_kv * d_v];
                out_head
                    .par_chunks_mut(rows * d_v)
                    .enumerate()
                    .for_each_init(
                        || (vec![0.0f32; rows * s_kv], vec![0.0f32; rows]),
                        |(scores, sums), (block, out_block)| {
                            let first = block * rows;
                            let n = out_block.len() / d_v;
                            attention_block(
                                &q_head[first * d..(first + n) * d],
                                k_head,
                                v_head,
                                out_block,
                                (&mut scores[..n * s_kv], &mut sums[..n]),
                                (d, d_v, scale),
                            );
                        },
                    );
            });
    }
    Tensor::from_data(
        burn::tensor::TensorData::new(out, [b, h, s_q, d_v]),
        &device,
    )
}

fn f32_values(data: &burn::tensor::TensorData) -> &[f32] {
    data.as_slice::<f32>().expect("f32 after convert")
}

/// One block of [`attention_f32`]: `n` query rows (`q`: `[n, D]`) against a head's keys
/// (`k`: `[S_kv, D]`) and values (`v`: `[S_kv, D_v]`), into `out` (`[n, D_v]`), with
/// `scores` (`[n, S_kv]`) and `sums` (`[n]`) as scratch.
fn attention_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    (scores, sums): (&mut [f32], &mut [f32]),
    (d, d_v, scale): (usize, usize, f32),
) {
    let n = out.len() / d_v;
    let s_kv = v.len() / d_v;
    assert!(
        q.len() == n * d && k.len() == s_kv * d && scores.len() == n * s_kv && sums.len() == n,
        "attention block: inconsistent slices"
    );
    // scores[n, S_kv] = scale · q[n, D] · kᵀ, kᵀ read through k's strides (column j of kᵀ is
    // row j of k).
    // SAFETY: each pointer addresses a live slice spanning the dims and strides given with it
    // (checked above): q is n × d with row stride d, k is s_kv × d read as its transpose,
    // scores is n × s_kv; scores does not alias q or k.
    unsafe {
        gemm::gemm(
            n,
            s_kv,
            d,
            scores.as_mut_ptr(),
            1,
            s_kv as isize,
            false,
            q.as_ptr(),
            1,
            d as isize,
            k.as_ptr(),
            d as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    softmax_rows(scores, sums);
    // out[n, D_v] = p[n, S_kv] · v[S_kv, D_v], p the unnormalised probabilities.
    // SAFETY: scores is n × s_kv, v is s_kv × d_v, out is n × d_v, all row-major and live
    // (checked above); out aliases neither.
    unsafe {
        gemm::gemm(
            n,
            d_v,
            s_kv,
            out.as_mut_ptr(),
            1,
            d_v as isize,
            false,
            scores.as_ptr(),
            1,
            s_kv as isize,
            v.as_ptr(),
            1,
            d_v as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (row, &sum) in out.chunks_exact_mut(d_v).zip(sums.iter()) {
        let inverse = 1.0 / sum;
        for o in row {
            *o *= inverse;
        }
    }
}

/// Whether this x86-64 CPU has AVX2 and FMA, for the host loops' `#[target_feature]`
/// variants (the build targets baseline x86-64, which has neither).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// [`softmax_numerators`] of each row of `scores` (`sums.len()` rows), each sum into `sums`.
fn softmax_rows(scores: &mut [f32], sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { softmax_rows_avx2(scores, sums) };
    }
    softmax_rows_portable(scores, sums);
}

/// [`softmax_rows_portable`] compiled for AVX2 (eight f32 lanes; the build's baseline x86-64
/// target has four). Rust does not contract multiplies and adds into FMAs, so the results are
/// the same bits as the portable build's.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(scores: &mut [f32], sums: &mut [f32]) {
    softmax_rows_with::<true>(scores, sums);
}

fn softmax_rows_portable(scores: &mut [f32], sums: &mut [f32]) {
    softmax_rows_with::<false>(scores, sums);
}

#[inline(always)]
fn softmax_rows_with<const FMA: bool>(scores: &mut [f32], sums: &mut [f32]) {
    let width = scores.len() / sums.len().max(1);
    for (row, sum) in scores.chunks_exact_mut(width).zip(sums.iter_mut()) {
        *sum = softmax_numerators::<FMA>(row);
    }
}

/// Overwrite a row of scores with `exp(s - max)` and return their sum (at least 1: the
/// maximum's own term). Max and sum run in eight lanes, so both loops vectorise.
#[inline(always)]
fn softmax_numerators<const FMA: bool>(row: &mut [f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut blocks = row.chunks_exact(LANES);
    for block in &mut blocks {
        for (m, &s) in lanes.iter_mut().zip(block) {
            // Not `f32::max`: its NaN rule costs a compare and a blend per vector. A NaN
            // score (a NaN input) propagates through the exponentials and sums anyway.
            *m = if s > *m { s } else { *m };
        }
    }
    let max = blocks.remainder().iter().fold(
        lanes.into_iter().fold(f32::NEG_INFINITY, f32::max),
        |m, &s| m.max(s),
    );
    let mut lanes = [0.0f32; LANES];
    let mut blocks = row.chunks_exact_mut(LANES);
    for block in &mut blocks {
        for (acc, s) in lanes.iter_mut().zip(block) {
            *s = exp::<FMA>(*s - max);
            *acc += *s;
        }
    }
    let mut tail = 0.0f32;
    for s in blocks.into_remainder() {
        *s = exp::<FMA>(*s - max);
        tail += *s;
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{attention, attention_reference, relative_error, set_kernel_enabled};
    use burn::tensor::{Device, Distribution};

    /// The host loops' `exp`, with and without fused multiply-adds, against the exact
    /// exponential over its whole range.
    #[test]
    fn host_exp_matches_std() {
        for (name, exp) in [
            ("plain", exp::<false> as fn(f32) -> f32),
            ("fma", exp::<true>),
        ] {
            let mut worst = 0.0f64;
            let mut x = -87.3f32;
            while x <= 88.3 {
                let want = (x as f64).exp();
                let got = exp(x) as f64;
                worst = worst.max((got - want).abs() / want);
                x += 0.013_7;
            }
            assert!(worst < 2e-7, "{name}: worst relative error {worst:e}");
            assert_eq!(exp(-1000.0), exp(-87.3), "{name}");
            assert_eq!(exp(1000.0), exp(88.3), "{name}");
            assert!(exp(88.3).is_finite(), "{name}");
        }
    }

    /// The host loop against the reference (burn's attention op): self- and cross-attention at
    /// head dims 1 to 80, query rows that leave a partial last block, key sequences long enough
    /// for 4-row blocks, a single key, a value width other than the head dim, scores large
    /// enough that an unshifted softmax would overflow, and head-split views read through their
    /// strides. Switched off, `attention` runs the reference bit for bit; with a bias it always
    /// does.
    #[test]
    fn attention_host_loop_matches_reference() {
        set_kernel_enabled(Kernel::HostAttention, true);
        let device = Device::flex();
        // [b, h, s_q, s_kv, d, d_v], standard deviation of q
        let cases: [([usize; 6], f64); 8] = [
            ([2, 3, 37, 37, 40, 40], 1.0),
            ([1, 2, 19, 77, 64, 64], 1.0),
            ([1, 2, 130, 130, 80, 80], 1.0),
            ([2, 1, 9, 20_000, 8, 8], 1.0),
            ([1, 1, 5, 1, 4, 4], 1.0),
            ([1, 2, 70, 33, 16, 24], 1.0),
            ([1, 1, 12, 12, 1, 3], 1.0),
            ([1, 2, 50, 50, 40, 40], 40.0),
        ];
        for ([b, h, s_q, s_kv, d, d_v], spread) in cases {
            let random = |s: usize, width: usize, std: f64| {
                Tensor::<4>::random([b, h, s, width], Distribution::Normal(0.1, std), &device)
            };
            let (q, k, v) = (
                random(s_q, d, spread),
                random(s_kv, d, 1.0),
                random(s_kv, d_v, 1.0),
            );
            assert!(applies(&q, Kernel::HostAttention));
            let got = attention(q.clone(), k.clone(), v.clone(), None);
            assert_eq!(got.dims(), [b, h, s_q, d_v]);
            let want = attention_reference(q, k, v, None);
            let err = relative_error(got, want);
            eprintln!("{:?}: {err:e}", [b, h, s_q, s_kv, d, d_v]);
            assert!(
                err <= 1e-5,
                "{:?}, q std {spread}: {err:e}",
                [b, h, s_q, s_kv, d, d_v]
            );
        }

        // Views: q and k split into heads by swapping dims, as the attention processors do.
        let t = Tensor::<4>::random([2, 45, 3, 40], Distribution::Default, &device);
        let q = t.clone().swap_dims(1, 2);
        let k = t.clone().mul_scalar(0.5).swap_dims(1, 2);
        let v = Tensor::<4>::random([2, 45, 3, 24], Distribution::Default, &device).swap_dims(1, 2);
        let got = attention(q.clone(), k.clone(), v.clone(), None);
        let err = relative_error(
            got,
            attention_reference(q.clone(), k.clone(), v.clone(), None),
        );
        assert!(err <= 1e-5, "views: {err:e}");

        // f16 and bf16: computed in f32 and rounded back, like the reference, so the two differ
        // by a rounding of the output at most.
        for (dtype, bound) in [
            (burn::tensor::FloatDType::F16, 1e-3),
            (burn::tensor::FloatDType::BF16, 8e-3),
        ] {
            let (qh, kh, vh) = (
                q.clone().cast(dtype),
                k.clone().cast(dtype),
                v.clone().cast(dtype),
            );
            let got = attention(qh.clone(), kh.clone(), vh.clone(), None);
            assert_eq!(got.dtype(), DType::from(dtype));
            let want = attention_reference(qh, kh, vh, None);
            let f32 = burn::tensor::FloatDType::F32;
            let err = relative_error(got.cast(f32), want.cast(f32));
            assert!(err <= bound, "{dtype:?}: {err:e}");
        }

        // A bias always takes the reference.
        let bias = Tensor::<4>::random([2, 3, 45, 45], Distribution::Default, &device);
        attention(q.clone(), k.clone(), v.clone(), Some(bias.clone()))
            .into_data()
            .assert_eq(
                &attention_reference(q.clone(), k.clone(), v.clone(), Some(bias)).into_data(),
                true,
            );

        // Switched off, the reference bit for bit. (In this test, not its own: the switch is
        // process-wide and tests run in parallel.)
        let want = attention_reference(q.clone(), k.clone(), v.clone(), None);
        set_kernel_enabled(Kernel::HostAttention, false);
        let off = applies(&q, Kernel::HostAttention);
        let got = attention(q, k, v, None);
        set_kernel_enabled(Kernel::HostAttention, true);
        assert!(!off);
        got.into_data().assert_eq(&want.into_data(), true);
    }

    /// Inputs under autodiff keep the graph: a frozen query attending to trained keys and values
    /// (textual inversion's cross-attention) and trained GroupNorm affine parameters on a frozen
    /// input get the same gradients as through the references.
    #[test]
    fn host_loops_keep_autodiff_graphs() {
        set_kernel_enabled(Kernel::HostAttention, true);
        let device = Device::flex();
        let random = |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Default, &device);
        let (q, k, v) = (
            random([1, 2, 9, 8]),
            random([1, 2, 5, 8]),
            random([1, 2, 5, 8]),
        );
        let k_leaf = k.clone().autodiff().require_grad();
        let v_leaf = v.clone().autodiff().require_grad();
        let loss = attention(q.clone(), k_leaf.clone(), v_leaf.clone(), None).sum();
        let grads = loss.backward();
        let (k_ref, v_ref) = (k.autodiff().require_grad(), v.autodiff().require_grad());
        let want = attention_reference(q, k_ref.clone(), v_ref.clone(), None)
            .sum()
            .backward();
        for (leaf, reference) in [(&k_leaf, &k_ref), (&v_leaf, &v_ref)] {
            let got = leaf.grad(&grads).expect("a gradient through attention");
            let expected = reference.grad(&want).expect("a reference gradient");
            got.into_data().assert_eq(&expected.into_data(), true);
        }

        let x = random([2, 4, 3, 3]);
        let gamma = Tensor::<1>::random([4], Distribution::Default, &device);
        let beta = Tensor::<1>::random([4], Distribution::Default, &device);
        let norm = |gamma: &Tensor<1>, beta: &Tensor<1>| {
            let gamma = gamma.clone().autodiff().require_grad();
            let beta = beta.clone().autodiff().require_grad();
            let out =
                crate::kernels::group_norm(x.clone(), gamma.clone(), beta.clone(), 2, 1e-5, true);
            let grads = out.sum().backward();
            (gamma.grad(&grads), beta.grad(&grads))
        };
        let (g_gamma, g_beta) = norm(&gamma, &beta);
        let gamma_ref = gamma.clone().autodiff().require_grad();
        let beta_ref = beta.clone().autodiff().require_grad();
        let want = crate::kernels::group_norm_reference(
            x.clone(),
            gamma_ref.clone(),
            beta_ref.clone(),
            2,
            1e-5,
            true,
        )
        .sum()
        .backward();
        g_gamma
            .expect("a gradient for gamma")
            .into_data()
            .assert_eq(&gamma_ref.grad(&want).unwrap().into_data(), true);
        g_beta
            .expect("a gradient for beta")
            .into_data()
            .assert_eq(&beta_ref.grad(&want).unwrap().into_data(), true);
    }
}
