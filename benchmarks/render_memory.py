"""Peak memory of one training render and its backward, per preset: the CPU check of low-vram's chunked rendering.

Each case runs in its own Python process (a fresh heap): the NeRF of the preset's field and render settings is built
on its initial blob, the occupancy grid updated once, then one jittered ``side``² training render of a fixed
camera is rendered and backpropagated. Printed per case: kept samples, the bytes autograd stores for the backward
(saved tensors, measured with ``torch.autograd.graph.saved_tensors_hooks``), and the process's peak resident memory
during render + backward above what it held before (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).
Ratios to the first case are printed from the same run.

    OMP_NUM_THREADS=1 python benchmarks/render_memory.py --side 512                 # quality vs low-vram
    python benchmarks/render_memory.py --side 256 --cases quality,low-vram,low-vram:0 --backend torch

A case is ``preset`` or ``preset:checkpoint_rays`` (``low-vram:0`` = low-vram without chunked checkpointing). The
CPU peak says how the mechanism scales, not what a GPU's caching allocator will report: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(case: str, side: int, backend: str) -> dict:
    """Runs in the child process: one render + backward of ``case``; returns its numbers."""
    import torch

    sys.path.insert(0, str(ROOT))
    from asd_engine.runs.configs import preset_config
    from asd_engine.scene.cameras import orbit_cameras
    from asd_engine.scene.nerf import NeRFGenerator

    preset, _, rays = case.partition(":")
    config = preset_config(preset, "x")
    if rays:
        config.render.checkpoint_rays = int(rays)
    config.nerf_field.backend = backend
    torch.manual_seed(0)
    nerf = NeRFGenerator(config.nerf_field, config.render)
    nerf.update_grid(0, torch.Generator().manual_seed(0))
    cameras = orbit_cameras(1, elevation=15.0, distance=1.6, height=side, width=side)
    stored: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        stored[storage.data_ptr()] = storage.nbytes()
        return tensor

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _rss_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        render = nerf.render(cameras, torch.Generator().manual_seed(1), training=True)
    render.rgb.mean().backward()
    peak = _rss_kib("VmHWM")
    return {"case": case, "side": side, "backend": nerf.field.backend, "samples": render.samples,
            "checkpoint_rays": config.render.checkpoint_rays, "saved_mib": sum(stored.values()) / 2**20,
            "peak_mib": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--cases", default="quality,low-vram,low-vram:0")
    parser.add_argument("--backend", default="warp", help="hash-grid backend (warp keeps the CPU run short)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.side, args.backend)))
        return
    # large blocks straight from mmap, so that freed activations leave the resident set (glibc's dynamic
    # threshold would otherwise keep them in the heap and blur one case's peak into the next allocation)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = []
    for case in args.cases.split(","):
        child = subprocess.run([sys.executable, __file__, "--child", case, "--side", str(args.side), "--backend",
                                args.backend], capture_output=True, text=True, env=env)
        if child.returncode:
            sys.exit(f"{case}: the child failed\n{child.stderr[-2000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"# one {args.side} px training render + backward, {first['backend']} grid, initial blob")
    print(f"{'case':<14} {'ckpt rays':>9} {'samples':>10} {'saved MiB':>10} {'peak MiB':>9} {'saved ÷ first':>13} "
          f"{'peak ÷ first':>12}")
    for r in results:
        print(f"{r['case']:<14} {r['checkpoint_rays']:>9} {r['samples']:>10} {r['saved_mib']:>10.1f} "
              f"{r['peak_mib']:>9.1f} {r['saved_mib'] / first['saved_mib']:>13.3f} "
              f"{r['peak_mib'] / first['peak_mib']:>12.3f}")


if __name__ == "__main__":
    main()
