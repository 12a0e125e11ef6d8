"""Rendering throughput of the pure-torch NeRF path, and where a text-to-3D step spends its time.

Part 1 — rays/s of a training render (forward + backward through the hash grid) for the toy-cpu and quality
field/render settings, after the occupancy grid has been updated on the initial "blob"; with each hash-grid backend
in ``--backends`` (default torch and warp when installed), and the ratio of each to torch measured in the same run.
Part 2 — one TextTo3D toy-cpu step split into: render forward, VAE/pixel encode, distill_step (the prior's UNet
calls and φ's update), and the rest (backward through render + encoder, Adam). Shares are of the whole step.

Run:  .venv/bin/python benchmarks/render_throughput.py [--device cpu|cuda] [--repeats 5] [--backends torch,warp]
The prior is an SD-architecture pixel-space pipeline with random weights (the size of the planned embedded prior:
UNet channels (32, 64, 64), 32 px); timings do not depend on the weights.
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

import asd_engine.runs.text_to_3d as t3d  # noqa: E402
from asd_engine.runs.configs import preset_config  # noqa: E402
from asd_engine.scene.cameras import CameraRanges, sample_cameras  # noqa: E402
from asd_engine.scene.nerf import NeRFGenerator  # noqa: E402
from asd_engine.prior.tiny_pipeline import build_tiny_pipeline  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def render_throughput(preset: str, side: int, batch: int, repeats: int, device: torch.device, sampler: str,
                      backend: str = "torch") -> float:
    """Prints one line; returns the median seconds of a render + backward."""
    config = preset_config(preset, "x")
    config.render.sampler = sampler
    config.nerf_field.backend = backend
    torch.manual_seed(0)
    nerf = NeRFGenerator(config.nerf_field, config.render, device=device)
    g = torch.Generator().manual_seed(0)
    nerf.update_grid(0, g)
    # cameras from their own generator: every sampler and backend renders the same views (the marcher's jitter
    # draws from `g`, nerfacc's does not; sharing one generator once made nerfacc look 2.2x sparser)
    views = torch.Generator().manual_seed(1)
    times, samples = [], []
    for i in range(repeats + 1):
        cams = sample_cameras(batch, CameraRanges(), side, side, views)
        _sync(device)
        start = time.perf_counter()
        out = nerf.render(cams, g, training=True)
        out.rgb.mean().backward()
        _sync(device)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - start)
            samples.append(out.samples)
        nerf.zero_grad(set_to_none=True)
    t = statistics.median(times)
    rays = batch * side * side
    print(f"{preset:<9} {side:>4}px x{batch}  {nerf.field.backend:<5} {sampler:<7} {rays / t:>10.0f} rays/s  "
          f"{statistics.median(samples) / rays:6.1f} samples/ray  {t * 1e3:8.1f} ms/render+backward")
    return t


def step_breakdown(repeats: int, device: torch.device, sampler: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_pipeline(tmp, prediction_type="v_prediction", latent=False, block_out_channels=(32, 64, 64),
                            cross_attention_dim=64)
        config = preset_config("toy-cpu", "a red cube", model=tmp, steps=10_000)
        config.render.sampler = sampler
        run = t3d.TextTo3D(config, device=device)
    parts = {"render": [], "encode": [], "distill": []}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync(device)
            parts[name][-1] += time.perf_counter() - start
            return result
        return wrapper

    run.nerf.render = timed("render", run.nerf.render)
    run.prior.encode_images = timed("encode", run.prior.encode_images)
    t3d.distill_step = timed("distill", t3d.distill_step)
    totals = []
    for i in range(repeats + 2):
        for values in parts.values():
            values.append(0.0)
        _sync(device)
        start = time.perf_counter()
        run.train_step()
        _sync(device)
        totals.append(time.perf_counter() - start)
    # drop the warm-ups; grid updates (every 8 steps in toy-cpu) are part of "rest"
    total = statistics.median(totals[2:])
    med = {k: statistics.median(v[2:]) for k, v in parts.items()}
    rest = total - sum(med.values())
    print(f"toy-cpu step ({run.config.distill.method}, {run.resolution(0)} px, prior {run.prior_resolution} px): "
          f"{total * 1e3:.1f} ms")
    for name, value in (*med.items(), ("backward+adam+grid", rest)):
        print(f"  {name:<20} {value * 1e3:8.1f} ms  {100 * value / total:5.1f} %")
    render_share = (med["render"] + rest) / total
    print(f"  rendering (forward + backward/other) ≈ {100 * render_share:.0f} %, prior (UNet calls + φ) ≈ "
          f"{100 * (med['distill'] + med['encode']) / total:.0f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampler", default="torch", choices=["torch", "nerfacc", "auto"],
                        help="ray marcher: the pure-torch one, or nerfacc's CUDA traversal (JIT-built if not prebuilt)")
    parser.add_argument("--sides", default="32,64", help="toy-cpu render sides to time")
    parser.add_argument("--quality-side", type=int, default=64, help="render side for the quality preset")
    parser.add_argument("--backends", default=None, help="hash-grid backends to compare, e.g. torch,warp (default: "
                        "torch, and warp when installed)")
    args = parser.parse_args()
    from asd_engine.scene import hash_kernels

    backends = args.backends.split(",") if args.backends else ["torch"] + (["warp"] * hash_kernels.available())
    device = torch.device(args.device)
    print(f"# render_throughput: device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    cases = [("toy-cpu", int(s)) for s in args.sides.split(",")] + [("quality", args.quality_side)]
    for preset, side in cases:
        seconds = {b: render_throughput(preset, side, 1, args.repeats, device, args.sampler, b) for b in backends}
        for backend in (b for b in backends if b != "torch" and "torch" in seconds):
            print(f"  {preset} {side}px: {backend} renders+backwards {seconds['torch'] / seconds[backend]:.2f}x as "
                  f"fast as torch")
    step_breakdown(max(args.repeats, 8), device, args.sampler)


if __name__ == "__main__":
    main()
