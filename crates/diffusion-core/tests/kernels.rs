//! The fused GroupNorm, attention and softmax kernels, and the split-K convolution route,
//! against their tensor-op references, on a CubeCL device: the CubeCL CPU runtime (`--features cpu`, LLVM), wgpu (`--features wgpu`, lavapipe
//! without a GPU) or CUDA. `cargo xtask test-kernels` sets up and runs these.
//!
//! `KERNEL_TEST_DEVICE=cpu|wgpu|cuda` picks the device when several are compiled in.
//! Errors are relative to the largest reference magnitude: `max |kernel - ref| / max |ref|`.
//! Attention is checked against the exact result (f64 on the host, from the inputs as given):
//! on CUDA, burn's own attention op, the tensor-op reference, runs its matmuls in TF32 and is
//! itself ~5e-4 off in f32, so it is reported beside the kernel rather than used as the truth.
#![cfg(feature = "cubecl-kernels")]

use diffusion_core::burn::tensor::ops::ConvOptions;
use diffusion_core::burn::tensor::{DType, Device, Distribution, FloatDType, Tensor};
use diffusion_core::kernels::{
    AttentionRoute, ConvRoute, ConvWeightLayout, GroupNormLayout, attention, attention_burn,
    attention_matmul_chunked, attention_reference, conv2d, conv2d_reference, group_norm,
    group_norm_reference, memory_strides, set_attention_route, set_conv_route,
    set_conv_weight_layout, set_group_norm_layout, softmax, softmax_reference, split_k_factor,
    tuned_choices, upsample_nearest, upsample_nearest_reference, uses_kernels,
};
use diffusion_core::tensor::to_vec;

fn device() -> Device {
    if let Ok(name) = std::env::var("KERNEL_TEST_DEVICE") {
        return wanted_device(&name);
    }
    if cfg!(feature = "cpu") {
        wanted_device("cpu")
    } else if cfg!(feature = "wgpu") {
        wanted_device("wgpu")
    } else {
        wanted_device("cuda")
    }
}

fn wanted_device(name: &str) -> Device {
    match name {
        #[cfg(feature = "cpu")]
        "cpu" => Device::cpu(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0),
        other => panic!("KERNEL_TEST_DEVICE={other} is not compiled into this build"),
    }
}

/// The float dtypes this device runs (bf16 is broken on the CubeCL CPU runtime, see
/// shared/STACK_NOTES.md, and missing on lavapipe).
fn dtypes(device: &Device) -> Vec<(FloatDType, f32)> {
    let mut out = vec![(FloatDType::F32, 1e-5)];
    if device.supports_dtype(DType::F16) {
        out.push((FloatDType::F16, 1e-2));
    }
    let cpu = std::env::var("KERNEL_TEST_DEVICE").map_or(cfg!(feature = "cpu"), |d| d == "cpu");
    if device.supports_dtype(DType::BF16) && !cpu {
        out.push((FloatDType::BF16, 1e-2));
    }
    out
}

fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims());
    assert_eq!(got.dtype(), want.dtype());
    let got = to_vec(got.cast(FloatDType::F32));
    let want = to_vec(want.cast(FloatDType::F32));
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(diff.is_finite(), "non-finite output");
    diff / scale
}

fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.3, 1.5), device)
}

#[test]
fn the_test_device_runs_the_kernels() {
    assert!(uses_kernels(&device()));
}

#[test]
fn group_norm_matches_reference() {
    let device = device();
    // (shape, groups): odd sizes, SD-like 32 groups, and one group of 8/2 * 97 * 181 = 70228
    // elements (more than 65536, split over several statistics cubes).
    let cases: [([usize; 4], usize); 4] = [
        ([2, 6, 5, 7], 3),
        ([1, 5, 3, 3], 5),
        ([2, 64, 8, 8], 32),
        ([1, 8, 97, 181], 2),
    ];
    for (dtype, tolerance) in dtypes(&device) {
        for (shape, groups) in cases {
            for silu in [false, true] {
                let x = random(shape, &device).cast(dtype);
                let gamma = random([shape[1]], &device).cast(dtype);
                let beta = random([shape[1]], &device).cast(dtype);
                let got = group_norm(x.clone(), gamma.clone(), beta.clone(), groups, 1e-6, silu);
                let want = group_norm_reference(x, gamma, beta, groups, 1e-6, silu);
                let err = relative_error(got, want);
                println!("group_norm {dtype:?} {shape:?} groups {groups} silu {silu}: {err:.2e}");
                assert!(err <= tolerance, "{dtype:?} {shape:?} silu {silu}: {err:e}");
            }
        }
    }
}

#[test]
fn group_norm_of_rank_3_and_a_large_offset() {
    // [B, C, H*W] as the attention blocks use it, with a mean well away from zero (two-pass
    // statistics keep the variance exact; at offsets near 100 the f32 rounding of the mean in
    // kernel and reference alone differs by about 1e-5 of the output).
    let device = device();
    let x = random([2, 12, 41], &device).add_scalar(10.0);
    let gamma = random([12], &device);
    let beta = random([12], &device);
    let got = group_norm(x.clone(), gamma.clone(), beta.clone(), 4, 1e-5, true);
    let want = group_norm_reference(x, gamma, beta, 4, 1e-5, true);
    let err = relative_error(got, want);
    println!("group_norm rank 3, offset 10: {err:.2e}");
    assert!(err <= 1e-5, "{err:e}");
}

/// The element strides of contiguous memory of `shape`, with the dimensions in `order` (outer
/// to inner), as strides of `shape`'s own dimensions.
fn strides_in_order(shape: &[usize], order: &[usize]) -> Vec<isize> {
    let mut strides = vec![0isize; shape.len()];
    let mut next = 1isize;
    for &d in order.iter().rev() {
        strides[d] = next;
        next *= shape[d] as isize;
    }
    strides
}

#[test]
fn group_norm_keeps_channels_last_memory() {
    // burn's convolution hands back NCHW views of channels-last memory; the kernel reads such
    // an input where it lies and writes its output in the same order (or, with
    // `GroupNormLayout::Contiguous`, copies it first and writes contiguous output). Cases:
    // odd sizes, one channel per group, SD's 320 channels (10 per group: vectors of 2), 1280
    // over 4x4 (40 per group), a group of 4 * 97 * 181 = 70228 elements over many chunks of
    // positions, and rank 3 (`[B, C, L]` over `[B, L, C]` memory).
    let device = device();
    let cases: [(Vec<usize>, usize); 7] = [
        (vec![2, 6, 5, 7], 3),
        (vec![1, 5, 3, 3], 5),
        (vec![2, 64, 8, 8], 32),
        (vec![2, 320, 9, 7], 32),
        (vec![2, 1280, 4, 4], 32),
        (vec![1, 8, 97, 181], 2),
        (vec![2, 12, 41], 4),
    ];
    for (dtype, tolerance) in dtypes(&device) {
        for (shape, groups) in &cases {
            let rank = shape.len();
            // [B, *, C] memory, viewed as [B, C, *].
            let mut memory_shape = vec![shape[0]];
            memory_shape.extend(&shape[2..]);
            memory_shape.push(shape[1]);
            let mut to_nchw = vec![0, rank - 1];
            to_nchw.extend(1..rank - 1);
            let mut nhwc_order = vec![0];
            nhwc_order.extend(2..rank);
            nhwc_order.push(1);
            let nhwc = strides_in_order(shape, &nhwc_order);
            let contiguous = strides_in_order(shape, &(0..rank).collect::<Vec<_>>());
            for silu in [false, true] {
                let (errors, layouts) = if rank == 4 {
                    let x = random(
                        [
                            memory_shape[0],
                            memory_shape[1],
                            memory_shape[2],
                            memory_shape[3],
                        ],
                        &device,
                    )
                    .cast(dtype)
                    .permute([to_nchw[0], to_nchw[1], to_nchw[2], to_nchw[3]]);
                    run_layouts(x, *groups, silu)
                } else {
                    let x = random([memory_shape[0], memory_shape[1], memory_shape[2]], &device)
                        .cast(dtype)
                        .permute([to_nchw[0], to_nchw[1], to_nchw[2]]);
                    run_layouts(x, *groups, silu)
                };
                let [input, kept, copied] = layouts;
                assert_eq!(input, nhwc, "{shape:?}: the input is not channels-last");
                assert_eq!(kept, nhwc, "{shape:?}: keep wrote another layout");
                assert_eq!(
                    copied, contiguous,
                    "{shape:?}: contiguous wrote another layout"
                );
                for (name, err) in [("keep", errors.0), ("contiguous", errors.1)] {
                    println!(
                        "group_norm channels-last {dtype:?} {shape:?} groups {groups} silu {silu} {name}: {err:.2e}"
                    );
                    assert!(
                        err <= tolerance,
                        "{dtype:?} {shape:?} silu {silu} {name}: {err:e}"
                    );
                }
            }
        }
    }
    set_group_norm_layout(GroupNormLayout::Keep);
}

/// GroupNorm of `x` (`[B, C, *]`, groups, SiLU) under both [`GroupNormLayout`]s: the errors of
/// each against the reference, and the strides of the input and of the two outputs.
fn run_layouts<const D: usize>(
    x: Tensor<D>,
    groups: usize,
    silu: bool,
) -> ((f32, f32), [Vec<isize>; 3]) {
    let device = x.device();
    let channels = x.dims()[1];
    let dtype = FloatDType::from(x.dtype());
    let gamma = random([channels], &device).cast(dtype);
    let beta = random([channels], &device).cast(dtype);
    let input = memory_strides(x.clone()).expect("a kernel device");
    let want = group_norm_reference(x.clone(), gamma.clone(), beta.clone(), groups, 1e-6, silu);
    set_group_norm_layout(GroupNormLayout::Keep);
    let kept = group_norm(x.clone(), gamma.clone(), beta.clone(), groups, 1e-6, silu);
    set_group_norm_layout(GroupNormLayout::Contiguous);
    let copied = group_norm(x, gamma, beta, groups, 1e-6, silu);
    set_group_norm_layout(GroupNormLayout::Keep);
    let layouts = [
        input,
        memory_strides(kept.clone()).expect("a kernel device"),
        memory_strides(copied.clone()).expect("a kernel device"),
    ];
    let errors = (
        relative_error(kept, want.clone()),
        relative_error(copied, want),
    );
    (errors, layouts)
}

#[test]
fn nearest_upsampling_equals_block_repeats_and_keeps_channels_last() {
    // On a kernel device `upsample_nearest` is burn's nearest interpolation; its values must be
    // the reference's block repeats exactly, for channels-last and contiguous inputs, and a
    // channels-last input must give channels-last output (no copy on either side).
    let device = device();
    for (dtype, _) in dtypes(&device) {
        for (shape, factor) in [([2, 6, 5, 7], 2), ([1, 3, 4, 3], 3), ([1, 512, 8, 8], 2)] {
            let [b, c, h, w] = shape;
            let out_shape = [b, c, h * factor, w * factor];
            let nhwc_strides = |[b, c, h, w]: [usize; 4]| {
                let _ = b;
                vec![(h * w * c) as isize, 1, (w * c) as isize, c as isize]
            };
            let channels_last = random([b, h, w, c], &device)
                .cast(dtype)
                .permute([0, 3, 1, 2]);
            let contiguous = random(shape, &device).cast(dtype);
            for (name, x) in [("channels-last", channels_last), ("contiguous", contiguous)] {
                let input = memory_strides(x.clone()).expect("a kernel device");
                let got = upsample_nearest(x.clone(), factor);
                let want = upsample_nearest_reference(x, factor);
                assert_eq!(got.dims(), out_shape);
                let strides = memory_strides(got.clone()).expect("a kernel device");
                if name == "channels-last" {
                    assert_eq!(input, nhwc_strides(shape), "the input is not channels-last");
                    assert_eq!(strides, nhwc_strides(out_shape), "{dtype:?} {shape:?}");
                }
                let (got, want) = (
                    to_vec(got.cast(FloatDType::F32)),
                    to_vec(want.cast(FloatDType::F32)),
                );
                assert!(
                    got == want,
                    "{dtype:?} {shape:?} x{factor} {name}: values differ"
                );
                println!("upsample_nearest {dtype:?} {shape:?} x{factor} {name}: equal");
            }
        }
    }
}

#[test]
fn flash_attention_writes_heads_interleaved() {
    // The kernel writes `[B, S, H, D]` memory and returns its `[B, H, S, D]` view, so that
    // merging the heads (`swap_dims(1, 2)` and a reshape) is a view; the values are unchanged.
    let device = device();
    let q = random([2, 8, 37, 40], &device);
    let k = random([2, 8, 77, 40], &device);
    let v = random([2, 8, 77, 40], &device);
    let out = attention(q.clone(), k.clone(), v.clone(), None);
    assert_eq!(
        memory_strides(out.clone()),
        Some(vec![37 * 8 * 40, 40, 8 * 40, 1])
    );
    let merged = out.swap_dims(1, 2).reshape([2, 37, 320]);
    assert_eq!(memory_strides(merged.clone()), Some(vec![37 * 320, 320, 1]));
    let want = attention_reference(q, k, v, None)
        .swap_dims(1, 2)
        .reshape([2, 37, 320]);
    let err = relative_error(merged, want);
    println!("flash attention, merged heads: {err:.2e}");
    assert!(err <= 1e-5, "{err:e}");
}

fn attention_case(
    device: &Device,
    dtype: FloatDType,
    tolerance: f32,
    [b, h, s_q, s_kv, d]: [usize; 5],
    with_bias: bool,
) {
    let q = random([b, h, s_q, d], device).cast(dtype);
    let k = random([b, h, s_kv, d], device).cast(dtype);
    let v = random([b, h, s_kv, d], device).cast(dtype);
    // diffusers' keep-mask bias `(1 - m) * -10000`, expanded from [B, 1, 1, S_kv].
    let bias = with_bias.then(|| {
        let keep = Tensor::<4>::random([b, 1, 1, s_kv], Distribution::Bernoulli(0.8), device);
        keep.sub_scalar(1.0)
            .mul_scalar(10000.0)
            .cast(dtype)
            .expand([b, h, s_q, s_kv])
    });
    let exact = exact_attention(&q, &k, &v, bias.as_ref());
    let got = attention(q.clone(), k.clone(), v.clone(), bias.clone());
    let want = attention_reference(q, k, v, bias);
    let err = error_to_exact(got, &exact);
    let reference_err = error_to_exact(want, &exact);
    println!(
        "attention {dtype:?} [b {b}, h {h}, s_q {s_q}, s_kv {s_kv}, d {d}] bias {with_bias}: \
         kernel {err:.2e}, tensor-op reference {reference_err:.2e}"
    );
    assert!(err <= tolerance, "{dtype:?} d {d} s_kv {s_kv}: {err:e}");
}

/// `softmax(q kᵀ / sqrt(D) + bias) v` in f64 on the host, from the tensors' values.
fn exact_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: Option<&Tensor<4>>,
) -> Vec<f64> {
    let host = |t: &Tensor<4>| -> Vec<f64> {
        to_vec(t.clone().cast(FloatDType::F32))
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let [b, h, s_q, d] = q.dims();
    let s_kv = k.dims()[2];
    let d_v = v.dims()[3];
    let (q, k, v) = (host(q), host(k), host(v));
    let bias = bias.map(host);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f64; b * h * s_q * d_v];
    let mut scores = vec![0f64; s_kv];
    for bh in 0..b * h {
        for i in 0..s_q {
            let qi = &q[(bh * s_q + i) * d..][..d];
            for (j, score) in scores.iter_mut().enumerate() {
                let kj = &k[(bh * s_kv + j) * d..][..d];
                let dot: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                let add = bias
                    .as_ref()
                    .map_or(0.0, |bias| bias[(bh * s_q + i) * s_kv + j]);
                *score = dot * scale + add;
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let row = &mut out[(bh * s_q + i) * d_v..][..d_v];
            for (j, w) in weights.iter().enumerate() {
                let vj = &v[(bh * s_kv + j) * d_v..][..d_v];
                for (o, x) in row.iter_mut().zip(vj) {
                    *o += w / sum * x;
                }
            }
        }
    }
    out
}

/// `max |got - exact| / max |exact|`.
fn error_to_exact(got: Tensor<4>, exact: &[f64]) -> f32 {
    let got = to_vec(got.cast(FloatDType::F32));
    assert_eq!(got.len(), exact.len());
    let scale = exact.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    let diff = got
        .iter()
        .zip(exact)
        .fold(0f64, |m, (g, e)| m.max((f64::from(*g) - e).abs()));
    assert!(diff.is_finite(), "non-finite output");
    (diff / scale) as f32
}

/// The upcast softmax kernel against `softmax(x.float()).to(dtype)` in burn ops: rows that
/// vectorize (4,096 and 1,000 wide) and rows that do not (77, 37), a large common offset (the
/// maximum must be subtracted), a transposed view (made contiguous first) and more rows than
/// one launch dimension holds (the cube grid goes 2-D).
#[test]
fn softmax_matches_reference() {
    let device = device();
    for (dtype, tolerance) in dtypes(&device) {
        let check = |x: Tensor<3>, label: &str| {
            let x = x.cast(dtype);
            // With the input still held elsewhere the kernel writes a new tensor ...
            let got = softmax(x.clone());
            let want = softmax_reference(x.clone());
            assert_eq!(got.dtype(), want.dtype());
            let err = relative_error(got, want.clone());
            // ... and with nothing else holding it (the reference already computed), it may
            // overwrite the input in place.
            let want = Tensor::<3>::from_data(want.into_data(), &device).cast(dtype);
            let err_in_place = relative_error(softmax(x), want);
            println!("softmax {dtype:?} {label}: {err:.2e}, input consumed {err_in_place:.2e}");
            assert!(err <= tolerance, "{dtype:?} {label}: {err:e}");
            assert!(
                err_in_place <= tolerance,
                "{dtype:?} {label}, input consumed: {err_in_place:e}"
            );
        };
        let peaky =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 6.0), &device);
        check(peaky([2, 3, 4096]), "rows of 4096");
        check(peaky([1, 5, 1000]), "rows of 1000");
        check(peaky([2, 3, 77]), "rows of 77");
        check(
            peaky([1, 4, 37]).add_scalar(1000.0),
            "rows of 37, offset 1000",
        );
        check(peaky([2, 64, 37]).swap_dims(1, 2), "transposed view");
        check(peaky([1, 70_000, 8]), "70,000 rows");
    }
}

#[test]
fn attention_matches_reference_for_sd_head_dims() {
    let device = device();
    for (dtype, tolerance) in dtypes(&device) {
        for d in [40, 64, 80, 128, 160] {
            // Self-attention with an odd token count.
            attention_case(&device, dtype, tolerance, [2, 2, 37, 37, d], false);
            // Cross-attention to 77 (one CLIP prompt) and 154 keys (two, SDXL long prompts).
            attention_case(&device, dtype, tolerance, [2, 2, 19, 77, d], false);
            attention_case(&device, dtype, tolerance, [1, 3, 11, 154, d], true);
        }
    }
}

#[test]
fn long_half_precision_attention() {
    // 1024 × 1024 scores per head (SD's 32×32 self-attention, MATMUL_MIN_SCORES): f16 takes
    // the matmul-softmax-matmul path (three heads, so the head reshape is exercised), bf16 the
    // flash kernel (its 8-bit mantissa is too coarse for materialised scores: 1.2e-2 on an H100).
    let device = device();
    for (dtype, tolerance) in dtypes(&device) {
        if dtype != FloatDType::F32 {
            attention_case(&device, dtype, tolerance, [1, 3, 1024, 1024, 40], false);
            attention_case(&device, dtype, tolerance, [1, 1, 1024, 1024, 160], false);
        }
    }
    // The matmul route's chunks under a budget smaller than one head: blocks of 256 query rows
    // (the multiple of 128 within 300 rows' scores), then 100 rows (a budget under 128 rows,
    // taken as it is: ten blocks and a last one of 24), as the VAE mid-block at SDXL's size runs.
    if device.supports_dtype(DType::F16) {
        let half = |shape: [usize; 4]| random(shape, &device).cast(FloatDType::F16);
        let (q, k, v) = (
            half([1, 2, 1024, 40]),
            half([1, 2, 1024, 40]),
            half([1, 2, 1024, 40]),
        );
        let exact = exact_attention(&q, &k, &v, None);
        for budget in [300 * 1024, 100 * 1024] {
            let got = attention_matmul_chunked(q.clone(), k.clone(), v.clone(), budget);
            let err = error_to_exact(got, &exact);
            println!("matmul route, {budget} scores a chunk: {err:.2e}");
            assert!(err <= 1e-2, "budget {budget}: {err:e}");
        }
    }
}

#[test]
fn attention_single_head_vae_width_and_head_split_views() {
    let device = device();
    // The VAE mid-block attends with one head of 512 channels.
    attention_case(&device, FloatDType::F32, 1e-5, [1, 1, 9, 9, 512], false);
    // Views as `Attention::split_heads` makes them ([B, S, H, D] swapped): read by stride.
    let t = random([2, 13, 3, 40], &device);
    let q = t.clone().swap_dims(1, 2);
    let k = t.clone().mul_scalar(0.5).swap_dims(1, 2);
    let v = t.swap_dims(1, 2);
    let exact = exact_attention(&q, &k, &v, None);
    let got = attention(q.clone(), k.clone(), v.clone(), None);
    let want = attention_reference(q, k, v, None);
    let err = error_to_exact(got, &exact);
    let reference_err = error_to_exact(want, &exact);
    println!(
        "attention head-split views: kernel {err:.2e}, tensor-op reference {reference_err:.2e}"
    );
    assert!(err <= 1e-5, "{err:e}");
}

/// The `burn` attention route (burn's fused op in f16, head dims zero-padded to a multiple of
/// 16: cubek's tensor-core flash kernel on CUDA, its fallback elsewhere) against the exact
/// result, on SD's head dims, odd and tile-sized token counts, 77 keys and head-split views.
#[test]
fn burn_route_attention_in_half_precision() {
    let device = device();
    if !device.supports_dtype(DType::F16) {
        return;
    }
    let case = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, label: &str| {
        let exact = exact_attention(&q, &k, &v, None);
        let err = error_to_exact(attention_burn(q, k, v), &exact);
        println!("burn route {label}: {err:.2e}");
        assert!(err <= 1e-2, "{label}: {err:e}");
    };
    let half = |shape: [usize; 4]| random(shape, &device).cast(FloatDType::F16);
    for d in [40, 64, 80, 160] {
        for [b, h, s_q, s_kv] in [[2, 2, 37, 37], [1, 2, 64, 64], [2, 1, 256, 77]] {
            case(
                half([b, h, s_q, d]),
                half([b, h, s_kv, d]),
                half([b, h, s_kv, d]),
                &format!("[b {b}, h {h}, s_q {s_q}, s_kv {s_kv}, d {d}]"),
            );
        }
    }
    let t = half([2, 64, 3, 40]);
    case(
        t.clone().swap_dims(1, 2),
        t.clone().mul_scalar(0.5).swap_dims(1, 2),
        t.swap_dims(1, 2),
        "head-split views, d 40",
    );
}

/// A direct convolution in f64 on the host (one group, padding `pad` on every side, stride
/// `stride`), from the inputs as given.
fn exact_conv(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: &Tensor<1>,
    stride: usize,
    pad: usize,
) -> Vec<f64> {
    let [b, c_in, h, w] = x.dims();
    let [c_out, _, k_h, k_w] = weight.dims();
    let host = |t: Vec<f32>| t.into_iter().map(f64::from).collect::<Vec<_>>();
    let (xs, ws, bs) = (
        host(to_vec(x.clone().cast(FloatDType::F32))),
        host(to_vec(weight.clone().cast(FloatDType::F32))),
        host(to_vec(bias.clone().cast(FloatDType::F32))),
    );
    let (h_out, w_out) = (
        (h + 2 * pad - k_h) / stride + 1,
        (w + 2 * pad - k_w) / stride + 1,
    );
    let mut out = Vec::with_capacity(b * c_out * h_out * w_out);
    for n in 0..b {
        for o in 0..c_out {
            for oy in 0..h_out {
                for ox in 0..w_out {
                    let mut acc = bs[o];
                    for i in 0..c_in {
                        for ky in 0..k_h {
                            for kx in 0..k_w {
                                let (y, x) = (oy * stride + ky, ox * stride + kx);
                                if y < pad || x < pad || y - pad >= h || x - pad >= w {
                                    continue;
                                }
                                acc += ws[((o * c_in + i) * k_h + ky) * k_w + kx]
                                    * xs[((n * c_in + i) * h + y - pad) * w + x - pad];
                            }
                        }
                    }
                    out.push(acc);
                }
            }
        }
    }
    out
}

/// `max |got - exact| / max |exact|` of a convolution's output.
fn conv_error(got: Tensor<4>, exact: &[f64]) -> f32 {
    let got = to_vec(got.cast(FloatDType::F32));
    assert_eq!(got.len(), exact.len());
    let scale = exact.iter().fold(0f64, |m, e| m.max(e.abs()));
    let diff = got
        .iter()
        .zip(exact)
        .fold(0f64, |m, (g, e)| m.max((f64::from(*g) - e).abs()));
    (diff / scale) as f32
}

/// The `tune` routes: each new shape is timed through every candidate on the device, the
/// fastest serves it from then on, and what was chosen is listed by `tuned_choices`. Whatever
/// wins, the result must be within the dtype's tolerance of the exact one, on the first call
/// (while tuning) and the next (from the choice).
#[test]
fn tuned_routes_match_exact_and_report_their_choices() {
    let device = device();
    set_attention_route(AttentionRoute::Tune);
    set_conv_route(ConvRoute::Tune);
    if device.supports_dtype(DType::F16) {
        let half = |shape: [usize; 4]| random(shape, &device).cast(FloatDType::F16);
        for [b, h, s_q, s_kv, d] in [[1, 2, 64, 64, 40], [2, 1, 96, 77, 64]] {
            let (q, k, v) = (
                half([b, h, s_q, d]),
                half([b, h, s_kv, d]),
                half([b, h, s_kv, d]),
            );
            let exact = exact_attention(&q, &k, &v, None);
            for call in ["tuning", "tuned"] {
                let got = attention(q.clone(), k.clone(), v.clone(), None);
                let err = error_to_exact(got, &exact);
                println!("tuned attention [{b}, {h}, {s_q}, {s_kv}, {d}] ({call}): {err:.2e}");
                assert!(err <= 1e-2, "{call}: {err:e}");
            }
            let shape = format!("q {:?}", [b, h, s_q, d]);
            let choices: Vec<_> = tuned_choices()
                .into_iter()
                .filter(|c| c.op == "attention" && c.shape.starts_with(&shape))
                .collect();
            assert_eq!(choices.len(), 1, "{shape}: {choices:?}");
            let names: Vec<&str> = choices[0]
                .times_ms
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            // burn's op only on CUDA (elsewhere its f16 scores can overflow).
            let cuda = std::env::var("KERNEL_TEST_DEVICE").is_ok_and(|d| d == "cuda")
                || !(cfg!(feature = "cpu") || cfg!(feature = "wgpu"));
            let want: &[&str] = if cuda {
                &["flash", "matmul", "burn"]
            } else {
                &["flash", "matmul"]
            };
            assert_eq!(names, want);
            assert!(names.contains(&choices[0].chosen.as_str()));
            println!("  chose {} of {:?}", choices[0].chosen, choices[0].times_ms);
        }
    }
    let x = random([2, 256, 8, 8], &device);
    let weight = random([192, 256, 3, 3], &device).mul_scalar(0.05);
    let bias = random([192], &device);
    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    let splits = split_k_factor(&x, &weight, &options).expect("a split-K shape");
    let exact = exact_conv(&x, &weight, &bias, 1, 1);
    let burn = conv_error(
        conv2d_reference(
            x.clone(),
            weight.clone(),
            Some(bias.clone()),
            options.clone(),
        ),
        &exact,
    );
    for call in ["tuning", "tuned"] {
        let got = conv2d(
            x.clone(),
            weight.clone(),
            Some(bias.clone()),
            options.clone(),
        );
        let err = conv_error(got, &exact);
        println!("tuned conv ({call}): {err:.2e} (burn's conv {burn:.2e})");
        assert!(err <= 1e-5_f32.max(2.0 * burn), "{call}: {err:e}");
    }
    let choices: Vec<_> = tuned_choices()
        .into_iter()
        .filter(|c| c.op == "conv2d")
        .collect();
    assert_eq!(choices.len(), 1, "{choices:?}");
    let names: Vec<&str> = choices[0]
        .times_ms
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["burn".to_string(), format!("split_k/{splits}")]);
    println!("  chose {} of {:?}", choices[0].chosen, choices[0].times_ms);
    set_attention_route(AttentionRoute::Auto);
    set_conv_route(ConvRoute::Burn);
}

/// The split-K convolution route (`conv2d` with `ConvRoute::SplitK`: a batched matrix product
/// over an im2col buffer, partial sums in f32) and burn's convolution against the exact result,
/// on a 3×3 convolution over an 8×8 map with many channels (the shape the route is for) and a
/// strided downsampling one, each with the weight in PyTorch's memory layout and channels-last
/// (`ConvWeightLayout`), and the route's im2col rows in both orders. The route and burn's
/// convolution must be within the dtype's tolerance, or no further off than twice burn's own
/// convolution of the plain weight (on CUDA both multiply f32 in TF32; on lavapipe burn's f16
/// convolution accumulates in f16).
#[test]
fn split_k_convolution_matches_exact() {
    let device = device();
    set_conv_route(ConvRoute::SplitK);
    for (dtype, tolerance) in dtypes(&device) {
        for ([b, c_in, c_out, hw], stride) in [([2, 256, 192, 8], 1), ([2, 128, 64, 16], 2)] {
            let x = random([b, c_in, hw, hw], &device).cast(dtype);
            let weight = random([c_out, c_in, 3, 3], &device)
                .mul_scalar(0.05)
                .cast(dtype);
            let bias = random([c_out], &device).cast(dtype);
            let options = ConvOptions::new([stride, stride], [1, 1], [1, 1], 1);
            assert!(split_k_factor(&x, &weight, &options).is_some());
            let exact = exact_conv(&x, &weight, &bias, stride, 1);
            let error = |t: Tensor<4>| conv_error(t, &exact);
            // The weight in PyTorch's memory layout and as a view of channels-last memory (as
            // loaded on kernel devices), with the route's im2col rows in either order.
            let channels_last = channels_last_view(weight.clone());
            // burn's convolution of the plain weight bounds both routes' errors.
            let burn_plain = error(conv2d_reference(
                x.clone(),
                weight.clone(),
                Some(bias.clone()),
                options.clone(),
            ));
            let limit = tolerance.max(2.0 * burn_plain);
            for layout in [ConvWeightLayout::Auto, ConvWeightLayout::Pytorch] {
                set_conv_weight_layout(layout);
                for (memory, weight) in [("pytorch", &weight), ("channels-last", &channels_last)] {
                    let route = conv2d(
                        x.clone(),
                        weight.clone(),
                        Some(bias.clone()),
                        options.clone(),
                    );
                    assert_eq!(route.dtype(), x.dtype());
                    let route = error(route);
                    let burn = error(conv2d_reference(
                        x.clone(),
                        weight.clone(),
                        Some(bias.clone()),
                        options.clone(),
                    ));
                    println!(
                        "split-K conv {dtype:?} [{b}, {c_in} -> {c_out}, {hw}², stride {stride}], \
                         {memory} weight, {} order: {route:.2e} (burn's conv {burn:.2e})",
                        layout.name()
                    );
                    assert!(
                        route <= limit && burn <= limit,
                        "{dtype:?} {c_in} -> {c_out} at {hw}², {memory} weight, {layout:?}: \
                         {route:e}, burn's conv {burn:e} (of the plain weight {burn_plain:e})"
                    );
                }
            }
        }
    }
    set_conv_weight_layout(ConvWeightLayout::Auto);
    set_conv_route(ConvRoute::Burn);
}

/// `weight` (`[C_out, C_in, K_h, K_w]`) as a view of channels-last `[C_out, K_h, K_w, C_in]`
/// memory, the layout convolution weights are loaded in on kernel devices.
fn channels_last_view(weight: Tensor<4>) -> Tensor<4> {
    let [o, i, h, w] = weight.dims();
    weight
        .permute([0, 2, 3, 1])
        .reshape([o * h * w * i])
        .reshape([o, h, w, i])
        .permute([0, 3, 1, 2])
}
