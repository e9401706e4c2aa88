"""The matmuls, 3x3 convolutions, attention and GroupNorm of benches/benches/cpu_ops.rs in
PyTorch on CPU (attention as diffusers runs it: F.scaled_dot_product_attention).

Run with the oracle venv: fixtures/oracle/.venv/bin/python benches/python/bench_cpu_ops.py [threads]
Prints milliseconds and GFLOP/s (2 floating-point operations per multiply-add) per shape; for
GroupNorm, millions of elements per second.
"""
import sys
import time

import torch
import torch.nn.functional as F

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.set_num_threads(threads)

MATMUL_SIZES = [1024, 2048]
CONV_SHAPES = [(320, 64), (512, 32), (256, 64), (128, 128)]
ATTENTION_SHAPES = [(8, 4096, 4096, 40), (8, 1024, 1024, 80), (8, 4096, 77, 40)]
GROUP_NORM_SHAPES = [(320, 64), (128, 256)]


def timed(fn, flop, label, unit="GFLOP/s"):
    with torch.no_grad():
        for _ in range(2):
            fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0 or n < 3:
            fn()
            n += 1
        s = (time.perf_counter() - start) / n
    print(f"torch {torch.__version__} threads={threads} {label}: {s * 1e3:.2f} ms, "
          f"{flop / s / 1e9:.3f} {unit}")


for n in MATMUL_SIZES:
    a, b = torch.randn(n, n), torch.randn(n, n)
    timed(lambda: a @ b, 2 * n**3, f"matmul_f32 {n}x{n}")

for channels, size in CONV_SHAPES:
    x = torch.randn(1, channels, size, size)
    w = torch.randn(channels, channels, 3, 3) * 0.05
    bias = torch.zeros(channels)
    flop = 2 * channels * channels * 9 * size * size
    timed(lambda: F.conv2d(x, w, bias, padding=1), flop, f"conv3x3_f32 {channels}ch_{size}x{size}")

for heads, s_q, s_kv, d in ATTENTION_SHAPES:
    q = torch.randn(1, heads, s_q, d)
    k, v = torch.randn(1, heads, s_kv, d), torch.randn(1, heads, s_kv, d)
    flop = 4 * heads * s_q * s_kv * d
    timed(lambda: F.scaled_dot_product_attention(q, k, v), flop,
          f"attention_f32 {heads}x{s_q}x{s_kv}_d{d}")

for channels, size in GROUP_NORM_SHAPES:
    x = torch.randn(1, channels, size, size)
    gamma, beta = torch.ones(channels), torch.zeros(channels)
    timed(lambda: F.silu(F.group_norm(x, 32, gamma, beta, 1e-5)), channels * size * size,
          f"group_norm_silu_f32 {channels}ch_{size}x{size}", unit="Gelem/s")
