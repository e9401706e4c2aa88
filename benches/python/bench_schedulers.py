"""The scheduler loops of benches/benches/schedulers.rs in diffusers: 30 steps of
scale_model_input + step on [2, 4, 64, 64] latents with a fixed model output, SD 1.5's
scheduler config.

fixtures/oracle/.venv/bin/python benches/python/bench_schedulers.py [threads]
"""
import sys
import time

import torch
import diffusers

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
              steps_offset=1, clip_sample=False)
base = diffusers.PNDMScheduler.from_config(config)
names = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
         "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
         "HeunDiscreteScheduler", "LMSDiscreteScheduler", "LCMScheduler",
         "UniPCMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
         "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "TCDScheduler"]
latents = torch.randn(2, 4, 64, 64)
model_output = torch.randn(2, 4, 64, 64)
for name in names:
    scheduler = getattr(diffusers, name).from_config(base.config)
    takes_generator = "generator" in scheduler.step.__code__.co_varnames

    def loop():
        scheduler.set_timesteps(30)
        g = torch.Generator().manual_seed(0)
        x = latents
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            kw = {"generator": g} if takes_generator else {}
            x = scheduler.step(model_output, t, x, **kw).prev_sample
        return x

    loop()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0 or n < 5:
        loop()
        n += 1
    print(f"diffusers {diffusers.__version__} {name}: {(time.perf_counter() - start) / n * 1e3:.2f} ms")
