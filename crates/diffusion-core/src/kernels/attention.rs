//! Softmax attention with scale `1/sqrt(head_dim)`.

use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, FloatDType, Tensor, module};

/// `softmax(q kᵀ / sqrt(D) + bias) v`, through the fused flash-style kernel where
/// [`super::uses_kernel`] says so (online softmax over key tiles, f32 accumulation, the score
/// matrix never written to memory), else through [`attention_reference`].
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
    #[cfg(feature = "cubecl-kernels")]
    if super::uses_kernel(super::Kernel::Attention, &q.device())
        && s_q * s_kv > 0
        && super::extension::attention_supported(&q, &v)
    {
        return super::extension::attention(q, k, v, bias);
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

fn upcast(t: Tensor<4>) -> Tensor<4> {
    if matches!(t.dtype(), DType::F16 | DType::BF16) {
        t.cast(FloatDType::F32)
    } else {
        t
    }
}
