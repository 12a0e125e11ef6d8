"""Score a finished text-to-3D run on the toy prior against the analytic truth (how the README's demo is measured).

Loads only the NeRF (and its config, for the prompt) from ``RUN/checkpoint`` and prints one JSON line with the quality harness's own 3D metrics
(`quality.evaluate_nerf`: silhouette IoU, area ratio, colour error, top IoU, hole opening) and, beside them, what
the 2D harness's judge (`ToyJudge`, plain and scale-normalised) reads in 8 turntable views at 32 px and the given
elevations. The shape and colour come from the run's prompt (`parse_toy_prompt`), as in the harness.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/score_run.py runs/demo [--elevations 15,30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asd_engine.scene.export import render_turntable  # noqa: E402
from asd_engine.toy.quality import evaluate_nerf, parse_toy_prompt  # noqa: E402
from asd_engine.runs.text_to_3d import load_nerf  # noqa: E402
from asd_engine.toy.data import COLOURS, SHAPES, ToyJudge  # noqa: E402


def judge_views(nerf, judges: dict[str, ToyJudge], elevation: float, views: int = 8,
                size: int = 32) -> dict[str, dict[str, int]]:
    """How many of ``views`` turntable renders each judge reads as each shape and colour: ``{judge: {label: n}}``."""
    images = render_turntable(nerf, views=views, size=size, elevation=elevation).rgb.permute(0, 3, 1, 2).clamp(0, 1)
    counts = {}
    for name, judge in judges.items():
        shapes, colours = judge(images)
        labels = [f"{list(COLOURS)[c] if c >= 0 else 'none'} {list(SHAPES)[s] if s >= 0 else 'none'}"
                  for s, c in zip(shapes.tolist(), colours.tolist())]
        counts[name] = {label: labels.count(label) for label in sorted(set(labels))}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a text-to-3d output folder (holding checkpoint/)")
    parser.add_argument("--elevations", default="15,30", help="judge's turntable elevations in degrees (default 15,30)")
    args = parser.parse_args()
    run = Path(args.run)
    nerf, config, step = load_nerf(run / "checkpoint", device="cpu")
    shape, colour = parse_toy_prompt(config.prompt)
    judges = {"plain": ToyJudge(), "cropped": ToyJudge(scale_normalised=True)}  # each renders its bank once
    # hole_opening is NaN for shapes without a hole, written as the harness's journal writes it
    result = {"run": str(run), "prompt": config.prompt, "step": step, **evaluate_nerf(nerf, shape, colour),
              "judge": {e: judge_views(nerf, judges, float(e)) for e in args.elevations.split(",")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
