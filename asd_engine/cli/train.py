"""Training commands: ``distill-2d``, ``text-to-3d``, ``demo`` and ``render``.

A run is built through :mod:`asd_engine.runs.plan`, as the nodes build theirs: the flags the user gave become field
values (:func:`.common.given_values`), the plan resolves the rest from the prior's recipe and validates, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..distill import METHODS
from ..errors import UserInputError
from ..runs.configs import EXPORT_DEFAULTS, TOY_CPU_STEPS
from .common import EXIT_INTERRUPTED, Parser, add_settings, ensure_writable_dir, given_values, integer, quiet_libraries


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", help="checkpoint folder of an earlier run: continue it up to --steps")
    p.add_argument("--preview-every", type=integer, help="write a preview every N steps (default steps/10)")
    p.add_argument("--checkpoint-every", type=integer,
                   help="write the checkpoint every N steps (default: with each preview, and at the end)")
    p.add_argument("--device", default="auto", help="torch device (default: CUDA if available, else CPU)")


def add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=integer, help="turntable views (default per preset: 36 toy-cpu, 120 otherwise)")
    p.add_argument("--view-size", type=integer, help="turntable image side in px (default 128 toy-cpu, 512 otherwise)")
    p.add_argument("--mesh-resolution", type=integer, help="marching-cubes grid (default 128 toy-cpu, 256 otherwise)")
    p.add_argument("--mesh-threshold", type=float,
                   help="density isosurface level (default per preset: 5 toy-cpu, 25 otherwise)")
    p.add_argument("--background", choices=["white", "black", "learned"], default="white",
                   help="background of the turntable and views (default white)")
    p.add_argument("--animation", choices=["webp", "gif"], default="webp", help="turntable file format")


def add_parsers(sub) -> None:
    p = sub.add_parser("distill-2d", help="distil one image with ASD / VSD / SDS",
                       description="Optimise an image with Adversarial Score Distillation (or VSD / SDS). "
                                   "Writes OUT/final.png, OUT/previews/, OUT/checkpoint/ and OUT/metrics.jsonl.")
    add_settings(p, "2d")
    add_run_options(p)
    p.set_defaults(handler=run_distill_2d)

    p = sub.add_parser("text-to-3d", help="distil a NeRF with ASD / VSD / SDS and export a mesh and turntable",
                       description="Text-to-3D with Adversarial Score Distillation (or VSD / SDS). Writes "
                                   "OUT/mesh.glb, OUT/mesh.obj, OUT/turntable.webp, OUT/views/, OUT/previews/, "
                                   "OUT/checkpoint/ and OUT/metrics.jsonl.")
    add_settings(p, "3d")
    add_run_options(p)
    add_export_options(p)
    p.set_defaults(handler=run_text_to_3d)

    p = sub.add_parser("render", help="re-render views, turntable and mesh from a text-to-3d checkpoint",
                       description="Loads only the NeRF from a text-to-3d checkpoint (no diffusion model needed).")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by text-to-3d")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="torch device (default: CUDA if available, else CPU)")
    add_export_options(p)
    p.set_defaults(handler=run_render)

    p = sub.add_parser("demo", help="text-to-3D with ASD on the embedded prior (toy-cpu preset, minutes on a CPU)",
                       description="Runs text-to-3d with the embedded toy prior and the toy-cpu preset: writes "
                                   "mesh.glb, mesh.obj, turntable.webp and views/ into --out.")
    p.add_argument("--prompt", default="a red cube", help="a colour and a shape the toy prior knows (default %(default)s)")
    p.add_argument("--method", choices=list(METHODS), default="asd")
    p.add_argument("--steps", type=integer, help=f"total steps (default: the toy-cpu preset's {TOY_CPU_STEPS})")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    p.set_defaults(handler=run_demo)


def _plan(args: argparse.Namespace, kind: str, mode: str):
    """The run's plan, fresh or resumed: the flags the user gave, by field name, to :func:`plan_run` (which loads
    the prior, resolves the rest from its recipe and validates, before anything is written)."""
    from ..runs.plan import plan_run

    given = given_values(args, mode)
    if not args.resume and "prompt" not in given:
        raise UserInputError("prompt", "no prompt given", "add {=prompt} TEXT, e.g. {=prompt} 'a red cube'")
    return plan_run(kind, given, device=args.device, resume=args.resume, explicit=True)


def train(args: argparse.Namespace, kind: str, mode: str, finish: Callable[[Any, Path], str]) -> int:
    """The shared driver of distill-2d and text-to-3d: build or resume, step with a progress bar, previews and
    checkpoints, Ctrl-C → checkpoint and exit 130, then ``finish`` writes the outputs."""
    import torch

    from ..images import save_png

    quiet_libraries()
    plan = _plan(args, kind, mode)
    out = ensure_writable_dir(args.out)
    from tqdm import tqdm

    run = plan.build()
    config = run.config
    phi_model = run.phi.prior if run.phi is not None and run.phi.prior is not run.prior else None
    for role, model in (("model", run.prior), ("φ model", phi_model)):
        if model is not None and model.detected:
            sys.stderr.write(f"{role}: {model.detected}\n")
    preview_every = args.preview_every or max(1, config.steps // 10)
    checkpoint_every = args.checkpoint_every or preview_every
    # config.from_recipe names the values that came from the prior's recipe (all others: the user or the preset)
    (out / "run.json").write_text(json.dumps({"command": args.command, "config": dataclasses.asdict(config),
                                              "recipe": dataclasses.asdict(run.prior.recipe),
                                              "model_detected": run.prior.detected,
                                              "resumed_from": args.resume, "device": str(run.prior.device),
                                              "torch": torch.__version__}, indent=2))
    stop = {"requested": False}

    def request_stop(_signum, _frame) -> None:
        if stop["requested"]:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        stop["requested"] = True
        sys.stderr.write("\nstopping after this step (Ctrl-C again to abort without a checkpoint)...\n")

    previous = signal.signal(signal.SIGINT, request_stop)
    bar = tqdm(total=config.steps, initial=run.step, desc=f"{config.distill.method} {args.command}", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    metrics = open(out / "metrics.jsonl", "a")

    def on_step(info) -> None:
        metrics.write(json.dumps(dataclasses.asdict(info)) + "\n")
        postfix = {"t": info.t, "loss_g": f"{info.generator_loss:.3g}"}
        if info.phi_loss is not None:
            postfix["loss_phi"] = f"{info.phi_loss:.3g}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if info.step % preview_every == 0 and info.step < config.steps:
            save_png(run.preview(), out / "previews" / f"step_{info.step:06d}.png")
        if info.step % checkpoint_every == 0 and info.step < config.steps:
            run.save_checkpoint(out / "checkpoint")

    try:
        run.run(on_step=on_step, should_stop=lambda: stop["requested"])
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        metrics.close()
    run.save_checkpoint(out / "checkpoint")
    if run.step < config.steps:
        save_png(run.preview(), out / "previews" / f"step_{run.step:06d}.png")
        sys.stderr.write(f"interrupted at step {run.step}/{config.steps}; resume with "
                         f"--resume {out / 'checkpoint'} --steps {config.steps}\n")
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - started
    print(f"{finish(run, out)} ({run.step} steps, {elapsed:.1f} s this session)")
    return 0


def run_distill_2d(args: argparse.Namespace) -> int:
    from ..images import save_png

    def finish(run, out: Path) -> str:
        save_png(run.images(), out / "final.png")
        return f"wrote {out / 'final.png'}"

    return train(args, "distill-2d", "2d", finish)


def export(nerf, preset: str, out: Path, args: argparse.Namespace) -> str:
    """Views, animated turntable and meshes of ``nerf`` into ``out`` (sizes from the flags or the preset)."""
    from ..scene.export import export_outputs

    defaults = EXPORT_DEFAULTS[preset]
    written = export_outputs(nerf, out, views=args.views or defaults["views"],
                             size=args.view_size or defaults["size"],
                             mesh_resolution=args.mesh_resolution or defaults["mesh_resolution"],
                             mesh_threshold=defaults["mesh_threshold"] if args.mesh_threshold is None
                             else args.mesh_threshold, background=args.background,
                             animation=args.animation)
    return "wrote " + ", ".join(str(p) for p in written)


def run_text_to_3d(args: argparse.Namespace) -> int:
    return train(args, "text-to-3d", "3d", finish=lambda run, out: export(run.nerf, run.config.preset, out, args))


def run_render(args: argparse.Namespace) -> int:
    from ..runs.text_to_3d import load_nerf

    nerf, config, step = load_nerf(args.checkpoint, device=args.device)
    out = ensure_writable_dir(args.out)
    print(f"{export(nerf, config.preset, out, args)} (checkpoint step {step})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..prior import default_prior_path

    parser = Parser(prog="python -m asd_engine")
    add_parsers(parser.add_subparsers(dest="command", parser_class=Parser))
    argv = ["text-to-3d", "--model", str(default_prior_path()), "--prompt", args.prompt, "--method", args.method,
            "--preset", "toy-cpu", "--seed", str(args.seed), "--out", args.out]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    return run_text_to_3d(parser.parse_args(argv))
