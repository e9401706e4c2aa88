"""The forwards of benches/src/bin/sd_gpu.rs in PyTorch/diffusers on a CUDA GPU, for the same
random-weight configs: one UNet2DConditionModel step at batch 2 (classifier-free guidance's
batch; 77 text tokens, timestep 500; SDXL with its pooled embedding and time ids) and one
AutoencoderKL decode at batch 1, and (`--kinds ...,pipeline`) one whole text-to-image call of
StableDiffusionPipeline / StableDiffusionXLPipeline (30 Euler steps, guidance 7.5, decode to
an output_type="pt" image; prompt_embeds given, so no text encoder runs), in f16, bf16 and f32. Prints one JSON object per line with
the time per forward (ms), peak GPU memory (torch.cuda.max_memory_allocated and _reserved),
the FLOPs of one forward (torch.utils.flop_counter) and the achieved TFLOP/s.

  python benches/python/bench_sd_gpu.py [--models sd15,sdxl] [--dtypes f16,bf16,f32]
                                        [--kinds unet,vae_decode,pipeline]
                                        [--iters 10] [--attention sdpa|math]
  python benches/python/bench_sd_gpu.py --flops-only > benches/python/sd_gpu_flops.json

`--flops-only` needs no GPU: it counts the FLOPs of every config on the meta device and prints
the table sd_gpu.rs reads to report TFLOP/s (FLOPs do not depend on the dtype).
"""
import argparse
import json
import time

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from torch.utils.flop_counter import FlopCounterMode

# Keep in step with benches/src/lib.rs `gpu_unet_configs` / `gpu_vae_configs`.
UNETS = {
    "sd15": (dict(sample_size=64, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3), 64, 77),
    "sdxl": (dict(sample_size=128, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816), 128, 77),
}
VAES = {
    "sd15": (dict(block_out_channels=[128, 256, 512, 512],
                  down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                  layers_per_block=2, sample_size=512), 64),
    "sdxl": (dict(block_out_channels=[128, 256, 512, 512],
                  down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
                  layers_per_block=2, sample_size=1024, scaling_factor=0.13025), 128),
}
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def unet_inputs(name, cfg, size, tokens, device, dtype):
    x = torch.randn(2, 4, size, size, device=device, dtype=dtype)
    states = torch.randn(2, tokens, cfg["cross_attention_dim"], device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device)
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2,
                                     device=device, dtype=dtype),
        }
    return (x, t, states), kwargs


# Stable Diffusion 1.5's scheduler config, with the Euler scheduler (sd_gpu.rs `euler_scheduler`).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)


def pipeline(name, device, dtype, steps):
    """(build, run) of one text-to-image call with precomputed text embeddings. The VAE is
    built with force_upcast=False so the decode runs in the pipeline's dtype, as sd_gpu.rs does
    (SDXL's pipeline would otherwise upcast an f16 VAE to f32)."""
    ucfg, size, tokens = UNETS[name]
    vcfg, _ = VAES[name]

    def build():
        unet = UNet2DConditionModel(**ucfg).to(device=device, dtype=dtype).eval()
        vae = AutoencoderKL(**vcfg, force_upcast=False).to(device=device, dtype=dtype).eval()
        scheduler = EulerDiscreteScheduler(**SCHEDULER)
        if name == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None,
                                             tokenizer=None, tokenizer_2=None, unet=unet,
                                             scheduler=scheduler)
        else:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                           scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe):
        embeds = torch.randn(2, tokens, ucfg["cross_attention_dim"], device=device, dtype=dtype)
        kwargs = dict(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1],
                      num_inference_steps=steps, guidance_scale=7.5, output_type="pt",
                      height=size * 8, width=size * 8)
        if name == "sdxl":
            pooled = torch.randn(2, 1280, device=device, dtype=dtype)
            kwargs.update(pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1])
        return lambda: pipe(**kwargs).images

    return build, run


def forwards(models, device, dtype, kinds=("unet", "vae_decode"), steps=30):
    """(kind, name, build, run) for every selected config."""
    out = []
    for name in models:
        if "pipeline" in kinds and name in UNETS and name in VAES:
            build, run = pipeline(name, device, dtype, steps)
            out.append(("pipeline", name, build, run))
        if "unet" in kinds and name in UNETS:
            cfg, size, tokens = UNETS[name]

            def build(cfg=cfg):
                return UNet2DConditionModel(**cfg).to(device=device, dtype=dtype).eval()

            def run(model, cfg=cfg, size=size, tokens=tokens, name=name):
                args, kwargs = unet_inputs(name, cfg, size, tokens, device, dtype)
                return lambda: model(*args, **kwargs).sample

            out.append(("unet", name, build, run))
        if "vae_decode" in kinds and name in VAES:
            cfg, size = VAES[name]

            def build(cfg=cfg):
                return AutoencoderKL(**cfg).to(device=device, dtype=dtype).eval()

            def run(model, size=size):
                z = torch.randn(1, 4, size, size, device=device, dtype=dtype)
                return lambda: model.decode(z).sample

            out.append(("vae_decode", name, build, run))
    return out


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--dtypes", default="f16,bf16,f32")
    parser.add_argument("--kinds", default="unet,vae_decode")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pipeline-iters", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", choices=["sdpa", "math"], default="sdpa",
                        help="math: materialise the scores (AttnProcessor), for comparison")
    parser.add_argument("--flops-only", action="store_true")
    args = parser.parse_args()
    models = args.models.split(",")
    kinds = args.kinds.split(",")

    if args.flops_only:
        table = {}
        with torch.device("meta"), torch.no_grad():
            for kind, name, build, run in forwards(models, "meta", torch.float32):
                table[f"{kind}/{name}"] = count_flops(run(build()))
        print(json.dumps(table, indent=2, sort_keys=True))
        return

    device = "cuda"
    gpu = torch.cuda.get_device_name()
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for kind, name, build, run in forwards(models, device, dtype, kinds, args.steps):
            with torch.no_grad():
                model = build()
                if args.attention == "math" and kind == "pipeline":
                    from diffusers.models.attention_processor import AttnProcessor
                    model.unet.set_attn_processor(AttnProcessor())
                    model.vae.set_attn_processor(AttnProcessor())
                elif args.attention == "math":
                    from diffusers.models.attention_processor import AttnProcessor
                    model.set_attn_processor(AttnProcessor())
                fn = run(model)
                if kind == "pipeline":
                    flops = None
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    ms = timed(fn, args.pipeline_iters, 1)
                else:
                    flops = count_flops(fn)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    ms = timed(fn, args.iters, args.warmup)
                row = {
                    "impl": f"diffusers-{args.attention}",
                    "torch": torch.__version__,
                    "gpu": gpu,
                    "kind": kind,
                    "model": name,
                    "dtype": dtype_name,
                    "ms": round(ms, 3),
                    "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                    "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
                }
                if flops is not None:
                    row.update(gflop=round(flops / 1e9, 1),
                               tflops=round(flops / (ms * 1e-3) / 1e12, 2))
                else:
                    row["steps"] = args.steps
                print(json.dumps(row), flush=True)
            del model, fn
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
