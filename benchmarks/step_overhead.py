"""Step overhead of 2D distillation: one step's wall time ÷ the UNet calls that step must make, timed alone.

For each method (and φ-noise mode) the script times, interleaved in one process:
- ``step``: ``Distill2D.train_step()`` (sampling, UNet calls, φ toggling/hooks, φ update, generator update);
- ``calls``: the same UNet calls made directly, with the same batch shapes and adapter states (the φ forward with
  gradients includes its backward), i.e. the work no implementation can avoid.
``ratio = median(step) / median(calls)`` (target ≤ 1.15). It also prints steps/s of fresh vs shared φ noise.

Run:  .venv/bin/python benchmarks/step_overhead.py [--model-size small|tiny|sd15] [--size 512] [--repeats 5]
The model is an SD-architecture pipeline with random weights built on the fly (timings do not depend on weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asd_engine.prior.discriminator import PhiConfig  # noqa: E402
from asd_engine.distill import DistillConfig  # noqa: E402
from asd_engine.runs.distill_2d import Distill2D  # noqa: E402
from asd_engine.runs.configs import Distill2DConfig  # noqa: E402
from asd_engine.prior.diffusion import DiffusionPrior  # noqa: E402
from asd_engine.prior.tiny_pipeline import build_tiny_pipeline  # noqa: E402

MODEL_SIZES = {
    # name: (UNet block_out_channels, layers_per_block, cross-attention dim, heads, default image size)
    "tiny": ((32, 64), 1, 32, 2, 64),
    "small": ((64, 128, 256, 256), 2, 256, 4, 256),
    "sd15": ((320, 640, 1280, 1280), 2, 768, 8, 512),
}


def _unet_calls(run: Distill2D, method: str, phi_noise: str) -> float:
    """Seconds for exactly the UNet work of one step, each call timed alone with adapters set up beforehand."""
    prior, phi = run.prior, run.phi
    x = run.image.param.detach()
    batch, t = x.shape[0], torch.full((x.shape[0],), 500, dtype=torch.long, device=x.device)
    cond, uncond = run.conditioning.cond, run.conditioning.uncond
    unet = prior.unet
    total = 0.0

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.no_grad():  # batched CFG call: 2B
        total += timed(lambda: unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]), return_dict=False))
    if method == "sds":
        return total
    phi._set_enabled(True)
    try:
        if phi_noise == "fresh":
            with torch.no_grad():  # φ's prediction for the generator
                total += timed(lambda: unet(x, t, phi.embeddings, return_dict=False))

        def phi_update() -> None:  # φ forward with gradients + backward
            out = unet(x, t, phi.embeddings, return_dict=False)[0]
            out.square().mean().backward()
        total += timed(phi_update)
        for p in phi.parameters():
            p.grad = None
    finally:
        phi._set_enabled(False)
    if method == "asd" and phi_noise == "fresh":
        with torch.no_grad():  # prior's conditional prediction for the γ term at t'
            total += timed(lambda: unet(x, t, cond, return_dict=False))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="small")
    parser.add_argument("--size", type=int, help="image size in px (default per model size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    channels, layers, cross, heads, default_size = MODEL_SIZES[args.model_size]
    size = args.size or default_size
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_pipeline(tmp, block_out_channels=channels, layers_per_block=layers, cross_attention_dim=cross,
                            attention_head_dim=heads)
        prior = DiffusionPrior.from_pretrained(tmp, device=args.device)
    params = sum(p.numel() for p in prior.unet.parameters()) / 1e6
    print(f"# step_overhead: UNet {args.model_size} {channels} ({params:.1f} M params), {size} px "
          f"(latent {prior.sample_shape(size)}), device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (median)")
    print(f"{'method':<6} {'phi noise':<9} {'step ms':>9} {'calls ms':>9} {'ratio':>6} {'steps/s':>8}")
    steps_per_s = {}
    for method, phi_noise in (("asd", "fresh"), ("asd", "shared"), ("vsd", "fresh"), ("vsd", "shared"),
                              ("sds", "fresh")):
        gamma = 0.0 if method == "vsd" else -0.75
        config = Distill2DConfig(prompt="a red cube", size=size, steps=10_000, parameterization="latent",
                                 distill=DistillConfig(method=method, gamma=gamma, phi_noise=phi_noise),
                                 phi=PhiConfig(kind="lora"))
        run = Distill2D(config, prior=prior)
        run.train_step()  # warm-up (allocator, autograd graph caches)
        _unet_calls(run, method, phi_noise)
        step_times, call_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run.train_step()
            step_times.append(time.perf_counter() - start)
            call_times.append(_unet_calls(run, method, phi_noise))
        step, calls = statistics.median(step_times), statistics.median(call_times)
        steps_per_s[(method, phi_noise)] = 1.0 / step
        print(f"{method:<6} {phi_noise:<9} {step * 1e3:9.1f} {calls * 1e3:9.1f} {step / calls:6.3f} {1 / step:8.3f}")
        if run.phi is not None:
            run.phi.remove()
    for method in ("asd", "vsd"):
        speedup = steps_per_s[(method, "shared")] / steps_per_s[(method, "fresh")]
        print(f"# {method}: shared-noise steps/s ÷ fresh-noise steps/s = {speedup:.2f}")


if __name__ == "__main__":
    main()
