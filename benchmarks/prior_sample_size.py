"""How large the toy prior draws its objects at each CFG scale, against the truth (docs/quality.md#cfg).

For each plain caption ("a blue cube"), ``--samples`` prior samples (the prior's own DDIM, 30 steps, seeds 0…N−1)
against as many exact renders from the prior's own training cameras (``data_cameras``, its recipe's top, seed 1):
the judge's foreground masks (`foreground_masks`), their mean area (samples ÷ truth: 1 = the truth's size) and the
mean height ÷ width of their bounding boxes. A distillation that draws samples of the prior's CFG-guided
distribution (ASD, VSD) inherits that distribution's size, so this says which CFG the prior draws true sizes at.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prior_sample_size.py --cfg 1,2,3,5 [--shapes cube,torus]
      [--guidance-interval 0.5,1]  (~20 s per caption and CFG on one CPU core)

``--guidance-interval LO,HI`` guides only the sampler's steps with t/T in [LO, HI] (scale 1 elsewhere): which noise
levels set the size (docs/history/quality-rounds.md#round-20).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asd_engine.prior import default_prior_path  # noqa: E402
from asd_engine.prior.diffusion import DiffusionPrior  # noqa: E402
from asd_engine.scene.cameras import sample_cameras  # noqa: E402
from asd_engine.toy.data import data_cameras, foreground_masks, mask_box, render_shapes  # noqa: E402
from asd_engine.toy.trainer import sample_images  # noqa: E402


def mask_sizes(images: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(box height, box width, area)`` in pixels of each image's foreground mask (``images [B, 3, H, W]``);
    images with no foreground are left out."""
    sizes = []
    for mask in foreground_masks(images):
        box = mask_box(mask)
        if box is not None:
            r0, r1, c0, c1 = box
            sizes.append((r1 - r0, c1 - c0, int(mask.sum())))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="1,2,3,5", help="comma-separated CFG scales")
    parser.add_argument("--shapes", default="cube,torus,cylinder")
    parser.add_argument("--colours", default="red,blue,green")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--guidance-interval", default="0,1", metavar="LO,HI",
                        help="CFG only at the sampler's steps with t/T in [LO, HI], scale 1 elsewhere (default: all)")
    parser.add_argument("--max-elevation", type=float,
                        help="the training cameras' top (default: the prior's recipe, the views it was fine-tuned on)")
    args = parser.parse_args()
    scales = [float(c) for c in args.cfg.split(",")]
    try:
        interval = tuple(float(v) for v in args.guidance_interval.split(","))
    except ValueError:
        interval = ()
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
        parser.error(f"--guidance-interval {args.guidance_interval}: give LO,HI with 0 ≤ LO ≤ HI ≤ 1, e.g. 0.5,1")
    prior = DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")
    n = args.samples
    top = prior.recipe.max_elevation if args.max_elevation is None else args.max_elevation
    cameras = sample_cameras(n, data_cameras(top), 32, 32, torch.Generator().manual_seed(1))
    print("| caption | " + " | ".join(f"area, CFG {s:g}" for s in scales) + " | height/width, truth | "
          + " | ".join(f"height/width, CFG {s:g}" for s in scales) + " |")
    print("|---|" + "---:|" * (2 * len(scales) + 1))
    for shape in args.shapes.split(","):
        for colour in args.colours.split(","):
            truth, _ = render_shapes([shape] * n, [colour] * n, cameras)
            true_sizes = mask_sizes(truth)
            true_area = statistics.fmean(s[2] for s in true_sizes)
            areas, ratios = [], []
            for scale in scales:
                with torch.no_grad():
                    samples = sample_images(prior, [f"a {colour} {shape}"] * n, list(range(n)), guidance_scale=scale,
                                            guidance_interval=interval)
                sizes = mask_sizes(samples)
                areas.append(statistics.fmean(s[2] for s in sizes) / true_area)
                ratios.append(statistics.fmean(s[0] / s[1] for s in sizes))
            print(f"| a {colour} {shape} | " + " | ".join(f"{a:.2f}" for a in areas)
                  + f" | {statistics.fmean(s[0] / s[1] for s in true_sizes):.2f} | "
                  + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
