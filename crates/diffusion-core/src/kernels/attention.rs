//! Softmax attention with scale `1/sqrt(head_dim)`.

use burn::tensor::ops::{AttentionModuleOptions, PadMode};
use burn::tensor::{DType, FloatDType, Tensor, module};

/// From this many scores per head (1024 × 1024, SD's 32×32 and 64×64 self-attention, the VAE's
/// mid-block), f16 attention without a bias on a kernel device runs as [`attention_matmul`]:
/// burn's autotuned tensor-core matmuls beat the flash kernel's scalar arithmetic there (H100,
/// SD 1.5 step 75.6 → 70.6 ms: see docs/kernels.md). Not bf16: scores rounded to its 8-bit
/// mantissa put the output 1.2e-2 from the exact result at 1024 tokens (H100), against 1.8e-3
/// for f16; bf16 stays on the flash kernel, which keeps the scores in f32.
pub const MATMUL_MIN_SCORES: usize = 1 << 20;

/// `softmax(q kᵀ / sqrt(D) + bias) v`, through the fused flash-style kernel where
/// [`super::uses_kernel`] says so (online softmax over key tiles, f32 accumulation, the score
/// matrix never written to memory), except for long f16 attention without a bias
/// ([`MATMUL_MIN_SCORES`] scores per head or more), which goes through [`attention_matmul`];
/// without a bias on the flex device (no autodiff, [`super::Kernel::HostAttention`] enabled)
/// through a host loop of blocked matrix products with an exact softmax per query row
/// (`kernels/host.rs`, within 1e-5 of the reference relative to the output's range; f16 and
/// bf16 computed in f32 and rounded back, as the reference does);
/// else through [`attention_reference`]. That is the default [`super::AttentionRoute::Auto`];
/// the other routes send all f16 attention without a bias on kernel devices to one path.
///
/// # Shapes
/// - `q`: `[B, H, S_q, D]`, `k`: `[B, H, S_kv, D]`, `v`: `[B, H, S_kv, D_v]`
/// - `bias`: `[B, H, S_q, S_kv]` (an expanded view of a smaller bias is fine)
/// - output: `[B, H, S_q, D_v]`, in the dtype of `q`
///
/// # Panics
/// When the shapes disagree.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Option<Tensor<4>>) -> Tensor<4> {
    let [b, h, s_q, d] = q.dims();
    let [bk, hk, s_kv, dk] = k.dims();
    let [bv, hv, s_v, _] = v.dims();
    assert!(
        [bk, hk, dk] == [b, h, d] && [bv, hv, s_v] == [b, h, s_kv],
        "attention: q {:?}, k {:?}, v {:?} do not fit together",
        q.dims(),
        k.dims(),
        v.dims()
    );
    if let Some(bias) = &bias {
        assert_eq!(bias.dims(), [b, h, s_q, s_kv], "attention: bias shape");
    }
    // Any input under autodiff (cross-attention to trained text states, with a frozen query)
    // keeps the reference, whose ops record the graph; the kernels and host loops do not.
    if q.is_autodiff()
        || k.is_autodiff()
        || v.is_autodiff()
        || bias.as_ref().is_some_and(Tensor::is_autodiff)
    {
        return attention_reference(q, k, v, bias);
    }
    #[cfg(feature = "cubecl-kernels")]
    if super::uses_kernel(super::Kernel::Attention, &q.device())
        && bias.is_none()
        && q.dtype() == DType::F16
    {
        match super::attention_route() {
            super::AttentionRoute::Burn => return attention_burn(q, k, v),
            super::AttentionRoute::Matmul => return attention_matmul(q, k, v),
            super::AttentionRoute::Auto if s_q * s_kv >= MATMUL_MIN_SCORES => {
                return attention_matmul(q, k, v);
            }
            super::AttentionRoute::Tune => return attention_tuned(q, k, v),
            _ => {}
        }
    }
    #[cfg(feature = "cubecl-kernels")]
    if super::uses_kernel(super::Kernel::Attention, &q.device())
        && s_q * s_kv > 0
        && super::extension::attention_supported(&q, &v)
    {
        return super::extension::attention(q, k, v, bias);
    }
    #[cfg(feature = "flex")]
    if bias.is_none() && s_kv > 0 {
        // f16/bf16 in f32 and back, as the reference does.
        let dtype = q.dtype();
        if [k.dtype(), v.dtype()] == [dtype; 2] {
            if dtype == DType::F32 && super::host::applies(&q, super::Kernel::HostAttention) {
                return super::host::attention_f32(q, k, v);
            }
            if matches!(dtype, DType::F16 | DType::BF16)
                && q.shape().num_elements() > 0
                && super::host::on_flex(&q.device(), super::Kernel::HostAttention)
            {
                let out = super::host::attention_f32(upcast(q), upcast(k), upcast(v));
                return out.cast(FloatDType::from(dtype));
            }
        }
    }
    attention_reference(q, k, v, bias)
}

/// [`attention`] through burn's `module::attention` op (which CubeCL backends implement with
/// their own kernels and other backends with matmul + softmax), in f32 for f16/bf16 inputs and
/// cast back: the scores of large activations overflow f16 (diffusers' `upcast_softmax`).
///
/// # Shapes
/// As [`attention`].
pub fn attention_reference(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<Tensor<4>>,
) -> Tensor<4> {
    let dtype = q.dtype();
    let out = module::attention(
        upcast(q),
        upcast(k),
        upcast(v),
        None,
        bias.map(upcast),
        AttentionModuleOptions::default(),
    );
    if out.dtype() == dtype {
        out
    } else {
        out.cast(FloatDType::from(dtype))
    }
}

/// [`attention`] without a bias through burn's own fused `module::attention` op in the input
/// dtype, with no upcast: on CUDA burn autotunes it between cubek's flash kernels (the
/// tensor-core one takes f16 tiles with f32 scores, softmax and accumulation; it needs head
/// dims that are multiples of 16) and its unfused fallback. Head dims that are not a multiple
/// of 16 (SD 1.5's 40) are zero-padded to the next one: the extra zero columns leave `q kᵀ`
/// unchanged, `q` is scaled by `sqrt(D_padded / D)` so burn's `1/sqrt(D_padded)` becomes
/// `1/sqrt(D)`, and the padded output columns are dropped.
///
/// Off by default ([`super::AttentionRoute::Burn`] selects it for f16 on kernel devices): on
/// backends without those kernels burn's op is matmul + softmax in the input dtype, whose f16
/// scores can overflow.
///
/// # Shapes
/// As [`attention`].
pub fn attention_burn(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let d = q.dims()[3];
    let d_v = v.dims()[3];
    let pad_to = |t: Tensor<4>, from: usize| {
        let to = from.next_multiple_of(16);
        if to == from {
            t
        } else {
            t.pad([(0, to - from)], PadMode::Constant(0.0))
        }
    };
    let padded = d.next_multiple_of(16);
    let q = if padded == d {
        q
    } else {
        q.mul_scalar((padded as f64 / d as f64).sqrt())
    };
    let out = module::attention(
        pad_to(q, d),
        pad_to(k, d),
        pad_to(v, d_v),
        None,
        None,
        AttentionModuleOptions::default(),
    );
    if d_v.next_multiple_of(16) == d_v {
        out
    } else {
        out.narrow(3, 0, d_v)
    }
}

/// [`attention`] without a bias as `softmax(q kᵀ / sqrt(D)) v` in three steps: the scores as
/// a matmul in the input dtype (`q` scaled first, as diffusers' `baddbmm(alpha=scale)`), the
/// softmax in f32 rounded back to the input dtype ([`super::softmax`]: one fused kernel on
/// kernel devices, so no f32 copy of the scores exists), the weighted sum as a matmul of those
/// probabilities (diffusers' `AttnProcessor` with `upcast_softmax`). The scores exist for one
/// chunk at a time, at most [`super::attention_chunk_scores`] of them (see
/// [`attention_matmul_chunked`]).
///
/// # Shapes
/// As [`attention`].
pub fn attention_matmul(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    attention_matmul_chunked(q, k, v, super::attention_chunk_scores())
}

/// [`attention_matmul`] with the scores materialised `max_scores` at most at a time: a chunk
/// of whole heads when one head's `S_q · S_kv` scores fit, else one head at a time in blocks
/// of query rows (a multiple of 128 rows where the budget allows at least 128), so that the
/// VAE's mid-block at SDXL's size (16,384² scores, 512 MiB in f16 for one head) stays within
/// the budget too. A budget below one query row's `S_kv` scores still takes one row at a time.
///
/// # Shapes
/// As [`attention`].
pub fn attention_matmul_chunked(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    max_scores: usize,
) -> Tensor<4> {
    let [b, h, s_q, d] = q.dims();
    let s_kv = k.dims()[2];
    let d_v = v.dims()[3];
    let heads = b * h;
    if heads == 0 || s_q == 0 || s_kv == 0 || d_v == 0 {
        // Nothing to chunk (and burn's reshape reads a 0 as "keep this dimension"). Without
        // keys the weighted sum is empty: zeros, as the reference's matmul gives.
        let dtype = FloatDType::from(q.dtype());
        return Tensor::<4>::zeros([b, h, s_q, d_v], &q.device()).cast(dtype);
    }
    let q = q
        .mul_scalar(1.0 / (d as f64).sqrt())
        .reshape([heads, s_q, d]);
    let k_t = k.reshape([heads, s_kv, d]).swap_dims(1, 2);
    let v = v.reshape([heads, s_kv, d_v]);
    let (heads_per_chunk, rows_per_chunk) = matmul_chunks(heads, s_q, s_kv, max_scores);
    let mut head_outputs = Vec::with_capacity(heads.div_ceil(heads_per_chunk));
    let mut head = 0;
    while head < heads {
        let len = heads_per_chunk.min(heads - head);
        let (q, k_t, v) = (
            q.clone().narrow(0, head, len),
            k_t.clone().narrow(0, head, len),
            v.clone().narrow(0, head, len),
        );
        let mut row_outputs = Vec::with_capacity(s_q.div_ceil(rows_per_chunk));
        let mut row = 0;
        while row < s_q {
            let rows = rows_per_chunk.min(s_q - row);
            let q = if rows == s_q {
                q.clone()
            } else {
                q.clone().narrow(1, row, rows)
            };
            let probabilities = super::softmax(q.matmul(k_t.clone()));
            row_outputs.push(probabilities.matmul(v.clone()));
            row += rows;
        }
        head_outputs.push(cat_or_single(row_outputs, 1));
        head += len;
    }
    cat_or_single(head_outputs, 0).reshape([b, h, s_q, d_v])
}

/// `(heads, query rows)` per chunk of [`attention_matmul_chunked`] for `heads` heads of
/// `s_q × s_kv` scores and a budget of `max_scores`.
fn matmul_chunks(heads: usize, s_q: usize, s_kv: usize, max_scores: usize) -> (usize, usize) {
    let per_head = s_q * s_kv;
    if per_head <= max_scores || s_q <= 1 {
        let heads_per_chunk = (max_scores / per_head.max(1)).clamp(1, heads.max(1));
        return (heads_per_chunk, s_q.max(1));
    }
    let rows = (max_scores / s_kv.max(1)).max(1);
    let rows = if rows >= 128 { rows / 128 * 128 } else { rows };
    (1, rows.min(s_q))
}

fn cat_or_single<const D: usize>(mut parts: Vec<Tensor<D>>, dim: usize) -> Tensor<D> {
    if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(parts, dim)
    }
}

/// The key of [`attention_tuned`]'s choices: the dims of `q`, `k`, `v` and the dtype.
type TuneKey = ([usize; 4], [usize; 4], [usize; 4], DType);

/// The route [`super::AttentionRoute::Tune`] keeps for each shape.
static TUNED: std::sync::LazyLock<super::tune::Choices<TuneKey>> =
    std::sync::LazyLock::new(|| super::tune::Choices::new("attention"));

/// What [`attention_tuned`] chose so far.
pub(super) fn tuned_choices() -> Vec<super::TunedChoice> {
    TUNED.reports()
}

/// [`attention`] (f16, no bias, on a kernel device) through whichever of the flash kernel (where
/// it takes the head dims), [`attention_matmul`] and, on CUDA, [`attention_burn`] ran this
/// shape fastest when it was first seen (see [`super::tune`]). burn's op is a candidate on
/// CUDA only: there its kernels keep scores and sums in f32, elsewhere it is matmul + softmax
/// in f16, whose scores can overflow.
#[cfg(feature = "cubecl-kernels")]
fn attention_tuned(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    type Run = fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>;
    let key = (q.dims(), k.dims(), v.dims(), q.dtype());
    let tuned = TUNED.get(&key);
    let device = q.device();
    let mut candidates: Vec<(&str, Run)> = Vec::with_capacity(3);
    if q.dims()[2] * k.dims()[2] > 0 && super::extension::attention_supported(&q, &v) {
        candidates.push(("flash", |q, k, v| {
            super::extension::attention(q, k, v, None)
        }));
    }
    candidates.push(("matmul", attention_matmul));
    if super::extension::on_cuda(&device) {
        candidates.push(("burn", attention_burn));
    }
    if let Some(index) = tuned {
        return (candidates[index].1)(q, k, v);
    }
    let names: Vec<&str> = candidates.iter().map(|(name, _)| *name).collect();
    let index = TUNED.choose(
        &key,
        || format!("q {:?}, k {:?}, v {:?}, {:?}", key.0, key.1, key.2, key.3),
        &names,
        |i| {
            let run = candidates[i].1;
            super::tune::time_on(&device, || run(q.clone(), k.clone(), v.clone()))
        },
    );
    (candidates[index].1)(q, k, v)
}

fn upcast(t: Tensor<4>) -> Tensor<4> {
    if matches!(t.dtype(), DType::F16 | DType::BF16) {
        t.cast(FloatDType::F32)
    } else {
        t
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};

    fn max_abs_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        a.sub(b).abs().max().into_scalar::<f32>()
    }

    /// The head-dim padding of [`attention_burn`] changes nothing but rounding: burn's op on
    /// `D = 40` padded to 48 (q rescaled) and on `D = 64` (no padding) equals the reference.
    #[test]
    fn burn_route_pads_head_dims_to_sixteen_without_changing_the_result() {
        let device = Device::flex();
        for [b, h, s_q, s_kv, d] in [[2, 3, 37, 37, 40], [1, 2, 19, 77, 64], [1, 1, 9, 5, 5]] {
            let random = |s: usize, seed: f64| {
                Tensor::<4>::random([b, h, s, d], Distribution::Normal(seed, 1.5), &device)
            };
            let (q, k, v) = (random(s_q, 0.3), random(s_kv, -0.2), random(s_kv, 0.1));
            let got = attention_burn(q.clone(), k.clone(), v.clone());
            assert_eq!(got.dims(), [b, h, s_q, d]);
            let want = attention_reference(q, k, v, None);
            let diff = max_abs_diff(got, want);
            assert!(diff < 1e-5, "d {d}: {diff:e}");
        }
        // Head-split views (read through their strides) and a value width other than D.
        let t = Tensor::<4>::random([2, 13, 3, 40], Distribution::Default, &device);
        let q = t.clone().swap_dims(1, 2);
        let k = t.clone().mul_scalar(0.5).swap_dims(1, 2);
        let v = Tensor::<4>::random([2, 3, 13, 24], Distribution::Default, &device);
        let got = attention_burn(q.clone(), k.clone(), v.clone());
        assert_eq!(got.dims(), [2, 3, 13, 24]);
        let diff = max_abs_diff(got, attention_reference(q, k, v, None));
        assert!(diff < 1e-5, "views: {diff:e}");
    }

    /// The chunks the matmul route takes at SD's shapes: whole heads while they fit, else
    /// blocks of query rows in multiples of 128.
    #[test]
    fn matmul_route_chunks_heads_then_query_rows() {
        let budget = 1 << 24;
        // SD 1.5 at 64×64 and 32×32 (batch 2 × 8 heads), the VAE mid-block at 512² and 1024².
        assert_eq!(matmul_chunks(16, 4096, 4096, budget), (1, 4096));
        assert_eq!(matmul_chunks(16, 1024, 1024, budget), (16, 1024));
        assert_eq!(matmul_chunks(1, 4096, 4096, budget), (1, 4096));
        assert_eq!(matmul_chunks(1, 16384, 16384, budget), (1, 1024));
        assert_eq!(matmul_chunks(16, 4096, 4096, 1 << 26), (4, 4096));
        // Rows below 128 are not rounded; one row at least, whatever the budget.
        assert_eq!(matmul_chunks(3, 50, 40, 1000), (1, 25));
        assert_eq!(matmul_chunks(3, 50, 40, 10), (1, 1));
        assert_eq!(matmul_chunks(2, 1000, 10, 1290), (1, 128));
        assert_eq!(matmul_chunks(2, 1, 10, 5), (1, 1));
    }

    /// Chunking by heads, by query rows, and a row at a time gives the reference's result.
    #[test]
    fn matmul_route_chunks_equal_the_reference() {
        let device = Device::flex();
        let [b, h, s_q, s_kv, d, d_v] = [2, 3, 37, 29, 8, 5];
        let random = |dims: [usize; 4], mean: f64| {
            Tensor::<4>::random(dims, Distribution::Normal(mean, 1.2), &device)
        };
        let q = random([b, h, s_q, d], 0.2);
        let k = random([b, h, s_kv, d], -0.1);
        let v = random([b, h, s_kv, d_v], 0.3);
        let want = attention_reference(q.clone(), k.clone(), v.clone(), None);
        for budget in [usize::MAX, 4 * s_q * s_kv, s_q * s_kv, 10 * s_kv, s_kv, 1] {
            let got = attention_matmul_chunked(q.clone(), k.clone(), v.clone(), budget);
            assert_eq!(got.dims(), [b, h, s_q, d_v]);
            let diff = max_abs_diff(got, want.clone());
            assert!(diff < 1e-5, "budget {budget}: {diff:e}");
        }
        // No queries: an empty output of the right shape.
        let no_queries = Tensor::<4>::zeros([b, h, 0, d], &device);
        let got = attention_matmul_chunked(no_queries, k, v, 16);
        assert_eq!(got.dims(), [b, h, 0, d_v]);
    }

    #[test]
    fn attention_routes_parse_by_name() {
        use super::super::AttentionRoute;
        for route in [
            AttentionRoute::Auto,
            AttentionRoute::Flash,
            AttentionRoute::Matmul,
            AttentionRoute::Burn,
            AttentionRoute::Tune,
        ] {
            assert_eq!(route.name().parse::<AttentionRoute>().unwrap(), route);
        }
        assert_eq!(
            " Burn ".parse::<AttentionRoute>().unwrap(),
            AttentionRoute::Burn
        );
        match "sdpa".parse::<AttentionRoute>() {
            Err(crate::Error::UnknownName { name, known, .. }) => {
                assert_eq!(name, "sdpa");
                assert!(known.contains("matmul"));
            }
            other => panic!("{other:?}"),
        }
    }
}
