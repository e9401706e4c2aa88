"""Single operators at Stable Diffusion 1.5 shapes in PyTorch on a CUDA GPU, the companion of
`sd_gpu --kinds ops` (benches/src/bin/sd_gpu.rs): 3x3 convolutions, linear layers, self- and
cross-attention (SDPA), GroupNorm+SiLU and an add, one JSON line each with ms and TFLOP/s.

  python benches/python/bench_ops_gpu.py [--dtypes f16,bf16] [--iters 20]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def ops(dtype):
    dev = "cuda"
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)
    out = []
    for c, hw in [(320, 64), (640, 32), (1280, 16), (1280, 8)]:
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dev, dtype)
        x = r(2, c, hw, hw)
        out.append((f"conv3x3_{c}x{hw}", 4.0 * hw * hw * c * c * 9, lambda conv=conv, x=x: conv(x)))
    # The VAE decoder's levels at a 512x512 decode (batch 1), as sd_gpu's `ops`.
    for c, hw in [(512, 64), (512, 128), (256, 256), (128, 512)]:
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dev, dtype)
        x = r(1, c, hw, hw)
        g = torch.ones(c, device=dev, dtype=dtype)
        b = torch.zeros(c, device=dev, dtype=dtype)
        out.append((f"vae_conv3x3_{c}x{hw}", 2.0 * hw * hw * c * c * 9,
                    lambda conv=conv, x=x: conv(x)))
        out.append((f"vae_group_norm_silu_{c}x{hw}", 0.0,
                    lambda x=x, g=g, b=b: F.silu(F.group_norm(x, 32, g, b, 1e-6))))
    xu = r(1, 512, 128, 128)
    out.append(("vae_upsample_nearest_512x128", 0.0,
                lambda: F.interpolate(xu, scale_factor=2.0, mode="nearest")))
    for rows, k, n in [(8192, 320, 2560), (8192, 1280, 320), (8192, 320, 320)]:
        lin = torch.nn.Linear(k, n).to(dev, dtype)
        x = r(rows, k)
        out.append((f"linear_{rows}x{k}x{n}", 2.0 * rows * k * n, lambda lin=lin, x=x: lin(x)))
    # (name, heads, query tokens, key tokens, head dim), as sd_gpu's `ops`.
    for name, heads, s_q, kv, d in [
        ("attn_self_4096x40", 8, 4096, 4096, 40),
        ("attn_cross_4096x77x40", 8, 4096, 77, 40),
        ("attn_self_1024x80", 8, 1024, 1024, 80),
        ("attn_cross_1024x77x80", 8, 1024, 77, 80),
        ("attn_self_4096x64_sdxl", 10, 4096, 4096, 64),
        ("attn_vae_4096x512", 1, 4096, 4096, 512),
    ]:
        batch = 1 if name.startswith("attn_vae") else 2
        q, k, v = r(batch, heads, s_q, d), r(batch, heads, kv, d), r(batch, heads, kv, d)
        out.append((name, 4.0 * batch * heads * s_q * kv * d,
                    lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)))
    # One chunk of attention's matmul route (4 heads of 4096x4096 scores), softmax upcast to f32
    # and rounded back, as diffusers' AttnProcessor with upcast_softmax.
    scores = r(4, 4096, 4096)
    out.append(("softmax_upcast_4x4096x4096", 0.0,
                lambda: scores.float().softmax(dim=-1).to(scores.dtype)))
    x = r(2, 320, 64, 64)
    g, b = torch.ones(320, device=dev, dtype=dtype), torch.zeros(320, device=dev, dtype=dtype)
    out.append(("group_norm_silu_320x64", 0.0, lambda: F.silu(F.group_norm(x, 32, g, b, 1e-5))))
    out.append(("add_320x64", 0.0, lambda: x + x))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="f16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with torch.no_grad():
        for dtype_name in args.dtypes.split(","):
            for name, flops, fn in ops(DTYPES[dtype_name]):
                for _ in range(args.warmup):
                    fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - start) / args.iters * 1e3
                print(json.dumps({"impl": "torch", "kind": "op", "op": name, "dtype": dtype_name,
                                  "ms": round(ms, 4),
                                  "tflops": round(flops / ms / 1e9, 2) if flops else None}),
                      flush=True)


if __name__ == "__main__":
    main()
