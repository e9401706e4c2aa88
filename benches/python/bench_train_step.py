"""The training steps of benches/benches/train_step.rs in PyTorch/diffusers on CPU: one optimizer
step (forward, MSE on the noise, backward, clip_grad_norm_(1.0), AdamW) of

- text_to_image: the tiny SD1 UNet2DConditionModel (fixtures/pipelines/sd/sd1/unet), batch 2
  latents [2, 4, 16, 16] (32x32 images), text states [2, 77, 8];
- unconditional: the tiny UNet2DModel (fixtures/train/tiny_unet), batch 2 of 1x32x32.

OMP_NUM_THREADS=1 fixtures/oracle/.venv/bin/python benches/python/bench_train_step.py 1
"""
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
torch.set_num_threads(threads)
FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures"
BATCH = 2


def bench(name, model, x0, cond):
    scheduler = DDPMScheduler.from_pretrained(FIXTURES / "pipelines/sd/sd1", subfolder="scheduler")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 500])

    def step():
        noisy = scheduler.add_noise(x0, noise, t)
        pred = model(noisy, t, *cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.item()

    for _ in range(3):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 5.0 or n < 5:
        step()
        n += 1
    s = (time.perf_counter() - start) / n
    print(f"torch {torch.__version__} threads={threads} {name}: {s * 1e3:.2f} ms/step, "
          f"{BATCH / s:.1f} samples/s")


torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(FIXTURES / "pipelines/sd/sd1", subfolder="unet")
bench("text_to_image", unet, torch.randn(BATCH, 4, 16, 16), (torch.randn(BATCH, 77, 8),))
model = UNet2DModel.from_pretrained(FIXTURES / "train/tiny_unet")
bench("unconditional", model, torch.randn(BATCH, 1, 32, 32), ())
