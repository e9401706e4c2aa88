"""The forwards of benches/benches/sd_models.rs in PyTorch/diffusers on CPU: one
UNet2DConditionModel forward (batch 2, 77 text tokens, timestep 500) and one VAE decode
(batch 1), random weights, for the same configs.

fixtures/oracle/.venv/bin/python benches/python/bench_sd_models.py [threads] [tiny|sd15]
"""
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
only = sys.argv[2] if len(sys.argv) > 2 else ""
torch.set_num_threads(threads)

unets = {
    "sd_tiny": (dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                     in_channels=4, out_channels=4,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=32, norm_num_groups=2), 32),
    "sd15": (dict(sample_size=64, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3), 64),
}
vaes = {
    "sd_tiny": (dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                     down_block_types=["DownEncoderBlock2D"] * 2,
                     up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
                     norm_num_groups=2), 32),
    "sd15": (dict(block_out_channels=[128, 256, 512, 512],
                  down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                  layers_per_block=2, sample_size=512), 32),
}


def timed(fn, min_seconds=3.0, min_runs=3):
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or n < min_runs:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e3


with torch.no_grad():
    for name, (cfg, size) in unets.items():
        if only not in name:
            continue
        model = UNet2DConditionModel(**cfg).eval()
        x = torch.randn(2, 4, size, size)
        states = torch.randn(2, 77, cfg["cross_attention_dim"])
        t = torch.tensor([500.0])
        ms = timed(lambda: model(x, t, states))
        print(f"torch {torch.__version__} threads={threads} unet {name} batch2: {ms:.1f} ms")
    for name, (cfg, size) in vaes.items():
        if only not in name:
            continue
        model = AutoencoderKL(**cfg).eval()
        z = torch.randn(1, 4, size, size)
        ms = timed(lambda: model.decode(z))
        print(f"torch {torch.__version__} threads={threads} vae decode {name} latent{size}: {ms:.1f} ms")
