"""Peak GPU memory and steps/s of the text-to-3D presets on a full-size random-weight SD2.1 (issue: memory presets).

The prior is built from the shipped SD2 configs (asd_engine/assets/sd_configs/sd2.json: the published shapes) with
random weights, so the numbers are those of the real model without downloading it. Each preset runs at the recipe's
512 px stage (the stage that sets the peak): ``--warmup`` steps, then ``--steps`` timed ones.

    python benchmarks/gpu_memory.py                      # CUDA: quality and low-vram, φ on the prior
    python benchmarks/gpu_memory.py --phi-model          # the official pairing: φ on a second (768-v) UNet
    python benchmarks/gpu_memory.py --tiny --size 64     # a CPU smoke run of this script on a tiny SD2-shaped model

Prints one JSON line per preset: peak memory allocated (GiB, CUDA only), steps/s, and the 512-stage settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asd_engine.prior.diffusion import DiffusionPrior  # noqa: E402
from asd_engine.devices import resolve_precision  # noqa: E402
from asd_engine.prior.single_file import clip_tokenizer, family_config  # noqa: E402
from asd_engine.runs.text_to_3d import TextTo3D  # noqa: E402
from asd_engine.runs.configs import preset_config  # noqa: E402

TINY = {"unet": dict(block_out_channels=[64, 128], attention_head_dim=[1, 2], layers_per_block=1,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64),
        "vae": dict(block_out_channels=[32, 32], layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2),
        "text_encoder": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1)}


def random_sd2_prior(device: torch.device, dtype: torch.dtype, v_prediction: bool, tiny: bool) -> DiffusionPrior:
    """SD2.1-base (ε) or SD2.1-768 (v) shapes with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    published = family_config("sd2")
    configs = {part: dict(published[part]) for part in ("unet", "vae", "text_encoder", "scheduler")}
    if v_prediction:
        for part, values in published["v_prediction_overrides"].items():
            configs[part].update(values)
    configs["scheduler"]["prediction_type"] = "v_prediction" if v_prediction else "epsilon"
    if tiny:
        for part, values in TINY.items():
            configs[part].update(values)
    with torch.device(device):  # DiffusionPrior casts to dtype once (diffusers warns about needless casts)
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler = DDPMScheduler.from_config(configs["scheduler"])
    return DiffusionPrior(unet, text_encoder, clip_tokenizer("sd2"), scheduler, vae, device=device, dtype=dtype)


def measure(preset: str, args, device: torch.device) -> dict:
    dtype = resolve_precision(args.precision, device)
    prior = random_sd2_prior(device, dtype, v_prediction=False, tiny=args.tiny)
    phi_prior = random_sd2_prior(device, dtype, v_prediction=True, tiny=args.tiny) if args.phi_model else None
    config = preset_config(preset, "a zoomed out DSLR photo of a hamburger", steps=args.warmup + args.steps)
    config.resolution_schedule = [(0, args.size)]
    config.prior_resolution = 64 if args.tiny else None
    config.nerf_field.backend = args.field_backend
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = TextTo3D(config, prior=prior, phi_prior=phi_prior)
    with torch.enable_grad():
        for _ in range(args.warmup):
            run.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            run.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    result = {"preset": preset, "device": str(device), "precision": str(dtype).replace("torch.", ""),
              "render_px": args.size, "phi_on_second_model": args.phi_model, "tiny": args.tiny,
              "attention_slicing": config.attention_slicing, "vae_checkpointing": config.vae_checkpointing,
              "field_backend": run.nerf.field.backend, "steps_per_s": args.steps / seconds}
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="quality,low-vram")
    parser.add_argument("--size", type=int, default=512, help="render side of the measured stage (default 512)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--phi-model", action="store_true", help="φ on a second SD2.1-768-v UNet (official pairing)")
    parser.add_argument("--tiny", action="store_true", help="tiny SD2-shaped model (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--field-backend", default="auto", choices=["auto", "torch", "warp", "tcnn"],
                        help="the hash grid's implementation (docs/engine.md#field-backends)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for preset in args.presets.split(","):
        print(json.dumps(measure(preset.strip(), args, device)), flush=True)


if __name__ == "__main__":
    main()
