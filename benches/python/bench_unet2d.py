"""The UNet2DModel forwards of benches/benches/unet2d.rs in PyTorch/diffusers on CPU.

fixtures/oracle/.venv/bin/python benches/python/bench_unet2d.py [threads]
"""
import sys
import time

import torch
from diffusers import UNet2DModel

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.set_num_threads(threads)

configs = {
    "digits16": (dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                      block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8,
                      down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")), 16),
    "cifar10_32": (dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                        block_out_channels=(128, 256, 256, 256),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")), 32),
}

for name, (cfg, size) in configs.items():
    model = UNet2DModel(**cfg).eval()
    for batch in (1, 8):
        x = torch.randn(batch, cfg["in_channels"], size, size)
        t = torch.tensor([500.0])
        with torch.no_grad():
            for _ in range(2):
                model(x, t)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < 3.0 or n < 3:
                model(x, t)
                n += 1
            ms = (time.perf_counter() - start) / n * 1e3
        print(f"torch {torch.__version__} threads={threads} {name} batch{batch}: {ms:.2f} ms")
