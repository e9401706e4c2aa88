"""The conv + attention block of benches/benches/backends.rs in PyTorch on CPU, for comparison.

Run with the oracle venv: fixtures/oracle/.venv/bin/python benches/python/bench_backends.py
"""
import sys
import time

import torch
import torch.nn.functional as F

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.set_num_threads(threads)


class Block(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = F.silu(self.conv(self.norm(x)))
        t = y.reshape(b, 1, c, h * w).transpose(2, 3)
        out = F.scaled_dot_product_attention(t, t, t)
        return out.transpose(2, 3).reshape(b, c, h, w)


for channels, size in [(64, 16), (128, 32)]:
    block = Block(channels).eval()
    x = torch.randn(1, channels, size, size)
    with torch.no_grad():
        for _ in range(3):
            block(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 3.0:
            block(x)
            n += 1
        ms = (time.perf_counter() - start) / n * 1e3
    print(f"torch {torch.__version__} threads={threads} {channels}ch_{size}x{size}: {ms:.3f} ms")
