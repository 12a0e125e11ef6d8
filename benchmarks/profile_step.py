"""Where one text-to-3D training step spends its time, part by part.

Parts: marcher candidates (the occupancy-grid traversal), pruning pass (density at every candidate, alpha and
transmittance cuts), field forward (density and colour at the kept samples), compositing (nerfacc's weights and
sums), VAE encode, UNet calls (every forward of the prior and of φ), φ update (φ's backward and Adam), θ backward
(through compositing, the field and the encoder), θ optimiser (Adam), grid update, and the rest. The field's own
backward happens inside θ backward; it is measured alone afterwards, at the step's sample count, and shown as a share
of θ backward.

    python benchmarks/profile_step.py --preset toy-cpu --side 64                    # the embedded toy prior (CPU)
    python benchmarks/profile_step.py --preset quality --side 64 --prior sd21      # full-size random SD2.1 (GPU)
    python benchmarks/profile_step.py --preset quality --side 512 --prior sd21 --device cuda --json out.jsonl

Prints a table (median over ``--steps`` after one warm-up) and, with ``--json``, appends one JSON line. Timing
synchronises the device around each part, which costs a little overlap on a GPU; the total is measured the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asd_engine.distill as distill  # noqa: E402
import asd_engine.runs.text_to_3d as t3d  # noqa: E402
import asd_engine.scene.nerf as nerf_module  # noqa: E402
import asd_engine.scene.render as render  # noqa: E402
from asd_engine.devices import resolve_device, resolve_precision  # noqa: E402
from asd_engine.prior import default_prior_path  # noqa: E402
from asd_engine.prior.loading import load_prior  # noqa: E402
from asd_engine.runs.configs import preset_config  # noqa: E402

PARTS = ("marcher candidates", "pruning pass", "field forward", "compositing", "VAE encode", "UNet calls",
         "φ update", "θ backward", "θ optimiser", "grid update")


class Clock:
    """Exclusive wall time per part: a part's time excludes the parts timed inside it. On CUDA also the peak memory
    allocated while each part was the innermost one running (where a step's peak happens)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.stack, self.names = device, defaultdict(float), [], []
        self.peaks: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _close_peak_window(self) -> None:
        """Credit the peak since the last part boundary to the part running in between, and start a new window."""
        if self.device.type == "cuda":
            name = self.names[-1] if self.names else "rest"
            self.peaks[name] = max(self.peaks[name], torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def part(self, name: str):
        self.sync()
        self._close_peak_window()
        start = time.perf_counter()
        self.stack.append(0.0)
        self.names.append(name)
        try:
            yield
        finally:
            self.sync()
            self._close_peak_window()
            self.names.pop()
            elapsed = time.perf_counter() - start
            inner = self.stack.pop()
            self.times[name] += elapsed - inner
            if self.stack:
                self.stack[-1] += elapsed

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)
        return timed


def build_run(args, device: torch.device) -> t3d.TextTo3D:
    dtype = resolve_precision("auto", device)
    if args.prior == "toy":
        prior = load_prior(default_prior_path(), device=device, dtype=dtype)
    else:
        from gpu_memory import random_sd2_prior  # the full-size random SD2.1 of the memory benchmark

        prior = random_sd2_prior(device, dtype, v_prediction=False, tiny=args.prior == "tiny-sd2")
    prompt = "a red cube" if args.prior == "toy" else "a zoomed out DSLR photo of a hamburger"  # toy: 16 tokens
    config = preset_config(args.preset, prompt, steps=args.steps + 1)
    config.resolution_schedule = [(0, args.side)]
    config.nerf_field.backend = args.field_backend
    if args.prior == "tiny-sd2":
        config.prior_resolution = 64
    return t3d.TextTo3D(config, prior=prior, device=device)


def instrument(run: t3d.TextTo3D, clock: Clock) -> dict:
    """Wrap the parts of a step in ``clock``; returns what the field-backward measurement needs."""
    seen = {"samples": 0}
    render._march_torch = clock.wrap("marcher candidates", render._march_torch)
    render._march_nerfacc = clock.wrap("marcher candidates", render._march_nerfacc)
    nerf_module.march = clock.wrap("pruning pass", render.march)          # minus the candidates timed inside
    volume_render = render.volume_render

    def counted_volume_render(*args, **kwargs):
        result = volume_render(*args, **kwargs)
        seen["samples"] = result.samples
        return result

    nerf_module.volume_render = clock.wrap("compositing", counted_volume_render)  # minus the field forward
    field = run.nerf.field
    field.forward = clock.wrap("field forward", field.forward)
    run.prior.encode_images = clock.wrap("VAE encode", run.prior.encode_images)
    for model in {id(m): m for m in (run.prior.unet, getattr(run.phi, "prior", run.prior).unet)}.values():
        model.forward = clock.wrap("UNet calls", model.forward)
    t3d.distill_step = clock.wrap("φ update", distill.distill_step)     # minus its UNet calls
    run.optimizer.step = clock.wrap("θ optimiser", run.optimizer.step)
    run.nerf.update_grid = clock.wrap("grid update", run.nerf.update_grid)
    backward = torch.Tensor.backward

    def timed_backward(self, *args, **kwargs):
        name = "φ update" if clock.stack else "θ backward"  # φ's backward runs inside distill_step
        with clock.part(name):
            return backward(self, *args, **kwargs)

    torch.Tensor.backward = timed_backward
    return seen


def field_backward_alone(run: t3d.TextTo3D, samples: int, clock: Clock, repeats: int = 3) -> float:
    """Seconds of the field's forward+backward minus its forward, at ``samples`` random points in the scene."""
    field = run.nerf.field
    forward = type(field).forward
    points = (torch.rand(max(samples, 1), 3, device=run.nerf.device) * 2 - 1) * field.config.radius * 0.5
    times = []
    for _ in range(repeats):
        clock.sync()
        start = time.perf_counter()
        with torch.no_grad():
            forward(field, points)
        clock.sync()
        middle = time.perf_counter()
        sigma, rgb = forward(field, points)
        torch.Tensor.backward(sigma.sum() + rgb.sum())
        clock.sync()
        end = time.perf_counter()
        times.append((end - middle) - (middle - start))
        field.zero_grad(set_to_none=True)
    return max(statistics.median(times), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="toy-cpu", choices=["toy-cpu", "quality", "low-vram"])
    parser.add_argument("--side", type=int, default=64, help="render side in px (the prior gets its own size)")
    parser.add_argument("--prior", default="toy", choices=["toy", "sd21", "tiny-sd2"],
                        help="toy: the embedded prior; sd21: a full-size random SD2.1; tiny-sd2: an SD2-shaped tiny one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--field-backend", default="auto", choices=["auto", "torch", "warp", "tcnn"])
    parser.add_argument("--json", help="append one JSON line with the medians to this file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run = build_run(args, device)
    clock = Clock(device)
    seen = instrument(run, clock)
    rows, totals, samples = defaultdict(list), [], []
    for index in range(args.steps + 1):
        clock.times.clear()
        clock.sync()
        start = time.perf_counter()
        run.train_step()
        clock.sync()
        if index:  # the first step is a warm-up (allocations, kernels, caches)
            totals.append(time.perf_counter() - start)
            samples.append(seen["samples"])
            for name in PARTS:
                rows[name].append(clock.times.get(name, 0.0))
    total = statistics.median(totals)
    median = {name: statistics.median(rows[name]) for name in PARTS}
    median["rest"] = max(total - sum(median.values()), 0.0)
    field_backward = field_backward_alone(run, int(statistics.median(samples)), clock)
    rays = run.config.batch_size * args.side * args.side
    print(f"# profile_step: {args.preset}, {args.side} px, prior {args.prior} ({run.prior_resolution} px), "
          f"{run.config.distill.method}, device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"field backend {run.nerf.field.backend}, median of {args.steps} steps")
    print(f"# {statistics.median(samples) / rays:.1f} samples per ray kept, {statistics.median(samples):.0f} samples")
    print(f"{'part':<22}{'ms':>10}{'share':>8}")
    for name, value in median.items():
        print(f"{name:<22}{value * 1e3:>10.1f}{100 * value / total:>7.1f}%")
    print(f"{'step':<22}{total * 1e3:>10.1f}{100.0:>7.1f}%   ({1 / total:.2f} steps/s)")
    print(f"  of θ backward, the field's backward alone: {field_backward * 1e3:.1f} ms "
          f"({100 * field_backward / total:.1f}% of the step)")
    if clock.peaks:
        print("# peak GiB allocated while each part ran (innermost part; over all steps):")
        for name, peak in sorted(clock.peaks.items(), key=lambda item: -item[1]):
            print(f"  {name:<22}{peak / 2 ** 30:>8.2f}")
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps({"preset": args.preset, "side": args.side, "prior": args.prior,
                                     "field_backend": run.nerf.field.backend,
                                     "device": str(device), "step_ms": total * 1e3,
                                     "parts_ms": {k: v * 1e3 for k, v in median.items()},
                                     "field_backward_ms": field_backward * 1e3,
                                     "peak_gib_by_part": {k: v / 2 ** 30 for k, v in clock.peaks.items()},
                                     "samples": statistics.median(samples)}) + "\n")


if __name__ == "__main__":
    main()
