"""How strongly do the 3D regularisers act, compared with score distillation? Gradient-norm ratios from one run.

At a few points of a toy-cpu run on the embedded prior, one training render is scored by the distillation surrogate
and by each regulariser separately, and the norm of each one's gradient on the NeRF's parameters (hash grid, and
density/colour MLPs) is printed, with the ratio regulariser ÷ distillation. A ratio of ~1e-3 means the regulariser
is decoration; ~0.1–1 means it competes. The weights are the run's (the prior's recipe unless given).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/regulariser_ratio.py [--prompt "a red cube"] [--steps 0,100,250]
      [--lambda-sparsity X] [--background random|white]   (defaults: the prior's recipe)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asd_engine.scene.cameras import sample_cameras  # noqa: E402
from asd_engine.distill import distill_step  # noqa: E402
from asd_engine.runs.text_to_3d import TextTo3D, opacity_entropy, sparsity_loss  # noqa: E402
from asd_engine.runs.configs import preset_config  # noqa: E402


def gradient_norms(run: TextTo3D, probes: int) -> dict[str, list[float]]:
    """Per probe: ‖∂L/∂θ‖ of the distillation surrogate, λ·sparsity and λ·entropy (the last even before it starts)."""
    config, nerf = run.config, run.nerf
    params = [p for p in nerf.field.parameters() if p.requires_grad]
    norms: dict[str, list[float]] = {"distillation": [], "sparsity": [], "opacity_entropy": []}
    for _ in range(probes):
        cameras = sample_cameras(1, config.cameras, run.prior_resolution, run.prior_resolution, run.rng)
        render, x0 = run.render_for_prior(cameras)
        result = distill_step(x0, run.prior, run.phi, run.prompts.conditioning(cameras), config.distill, run.step,
                              run.rng)
        terms = {"distillation": result.generator_loss,
                 "sparsity": config.lambda_sparsity * sparsity_loss(render.opacity),
                 "opacity_entropy": config.lambda_opacity_entropy * opacity_entropy(render.opacity)}
        for name, term in terms.items():
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            norms[name].append(float(torch.sqrt(sum((g.square().sum() for g in grads if g is not None),
                                                    torch.tensor(0.0)))))
    return norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="a red cube")
    parser.add_argument("--steps", default="0,100,250", help="training steps at which to measure")
    parser.add_argument("--probes", type=int, default=4, help="renders per measurement (medians are printed)")
    parser.add_argument("--lambda-sparsity", type=float)
    parser.add_argument("--background", choices=["random", "white", "black"])
    args = parser.parse_args()
    torch.manual_seed(0)
    at = sorted(int(s) for s in args.steps.split(","))
    config = preset_config("toy-cpu", args.prompt, steps=max(at) + 1, lambda_sparsity=args.lambda_sparsity,
                           background=args.background)
    run = TextTo3D(config)
    print(f"prior recipe: {run.prior.recipe.name}; λ_sparsity {run.config.lambda_sparsity}, "
          f"λ_entropy {run.config.lambda_opacity_entropy} (from step {run.config.opacity_entropy_from}), "
          f"background {run.config.background}, cfg {run.config.distill.guidance_scale}")
    print("| step | ‖∇ distillation‖ | ‖∇ λ·sparsity‖ | sparsity ÷ distillation | ‖∇ λ·entropy‖ | entropy ÷ distillation |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with torch.enable_grad():
        for step in at:
            while run.step < step:
                run.train_step()
            n = {k: statistics.median(v) for k, v in gradient_norms(run, args.probes).items()}
            d = max(n["distillation"], 1e-12)
            print(f"| {step} | {d:.3g} | {n['sparsity']:.3g} | {n['sparsity'] / d:.3g} | "
                  f"{n['opacity_entropy']:.3g} | {n['opacity_entropy'] / d:.3g} |")


if __name__ == "__main__":
    main()
