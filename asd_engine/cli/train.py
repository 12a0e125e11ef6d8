"""Training commands: ``distill-2d``, ``text-to-3d``, ``demo`` and ``render``.

A run is built through :mod:`asd_engine.runs.plan`, as the nodes build theirs: the flags the user gave become field
values (:func:`.common.given_values`), the plan resolves the rest from the prior's recipe and validates, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ..devices import check_device
from ..distill import METHODS
from ..errors import UserInputError
from ..runs.configs import EXPORT_DEFAULTS, TOY_CPU_STEPS
from .common import (EXIT_INTERRUPTED, EXPORT_OUTPUTS, RUN_OUTPUTS, Parser, add_settings, earlier_run,
                     folder_contents, given_values, integer, is_output, locked_folder, quiet_libraries,
                     remove_outputs)

DEMO_OUT = "runs/demo"
VIEWS_RANGE = (1, 3600)            # one view per 0.1° at most
VIEW_SIZE_RANGE = (8, 4096)
# The fine marching-cubes grid spans only the object's bounding box: with fewer than 16 cells across it the surface is
# a few dozen faces (and 1 would divide by zero). Its points are held at once, ~20 bytes each: 21 GB at 1024.
MESH_RESOLUTION_RANGE = (16, 1024)
OVERWRITE_HELP = ("--out may hold an earlier run of this tool: replace that run's outputs (files it did not write "
                  "are kept; a folder without an earlier run is still refused)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", help="checkpoint folder of an earlier run: continue it up to --steps")
    p.add_argument("--preview-every", type=integer, help="write a preview every N steps (default steps/10)")
    p.add_argument("--checkpoint-every", type=integer,
                   help="write the checkpoint every N steps (default: with each preview, and at the end)")
    p.add_argument("--device", default="auto", help="torch device (default: CUDA if available, else CPU)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


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
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold an earlier run or render: replace its views, turntable and meshes (nothing "
                        "else there is touched)")
    add_export_options(p)
    p.set_defaults(handler=run_render)

    p = sub.add_parser("demo", help="text-to-3D with ASD on the embedded prior (toy-cpu preset, minutes on a CPU)",
                       description="Runs text-to-3d with the embedded toy prior and the toy-cpu preset: writes "
                                   "mesh.glb, mesh.obj, turntable.webp and views/ into --out.")
    p.add_argument("--prompt", default="a red cube", help="a colour and a shape the toy prior knows (default %(default)s)")
    p.add_argument("--method", choices=list(METHODS), default="asd")
    p.add_argument("--steps", type=integer, help=f"total steps (default: the toy-cpu preset's {TOY_CPU_STEPS})")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--out", default=DEMO_OUT,
                   help="output folder (default %(default)s, where a new demo replaces the previous demo's outputs)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(handler=run_demo)


def check_run_flags(args: argparse.Namespace) -> None:
    """The flags that are not settings, checked before anything is loaded or written (so a typo never costs a
    training run): step intervals and, for commands that export, the export flags."""
    for flag, value in (("--preview-every", args.preview_every), ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            raise UserInputError(flag, f"{value} is not a number of steps",
                                 f"use {flag} N with N ≥ 1, or leave it out for the default")
    if hasattr(args, "views"):
        check_export_flags(args)


def _check_range(name: str, value: int | None, bounds: tuple[int, int], why: str = "") -> None:
    low, high = bounds
    if value is not None and not low <= value <= high:
        raise UserInputError(name, f"{value} is out of range{why}", f"use {low} ≤ value ≤ {high}")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the ranges alone bound the sizes
        return None


def check_export_flags(args: argparse.Namespace) -> None:
    """``--views``, ``--view-size``, ``--mesh-resolution`` and ``--mesh-threshold`` in range, finite, and small enough
    for this machine's memory: refused before training, never after it."""
    _check_range("views", args.views, VIEWS_RANGE)
    _check_range("view_size", args.view_size, VIEW_SIZE_RANGE)
    _check_range("mesh_resolution", args.mesh_resolution, MESH_RESOLUTION_RANGE,
                 " (below 16 the mesh is a few faces; above 1024 its grid alone needs 20+ GB)")
    threshold = args.mesh_threshold
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        raise UserInputError("mesh_threshold", f"{threshold} is not a positive density",
                             "use a finite density > 0 (defaults: 5 for toy-cpu, 25 for the Stable Diffusion presets)")
    memory = _physical_memory()
    if memory is None:
        return
    largest = {key: max(d[key] for d in EXPORT_DEFAULTS.values()) for key in ("views", "size", "mesh_resolution")}
    views, size = args.views or largest["views"], args.view_size or largest["size"]
    resolution = args.mesh_resolution or largest["mesh_resolution"]
    # the turntable keeps 8 float channels per pixel (rgb, alpha, depth, normals), per view and once concatenated
    for name, given, needed, fix in (
            ("view_size" if args.view_size else "views", args.views or args.view_size,
             views * size * size * 8 * 4 * 2, "use fewer {=views} or a smaller {=view_size}"),
            ("mesh_resolution", args.mesh_resolution, resolution ** 3 * 20, "use a smaller {=mesh_resolution}")):
        if given and needed > memory:  # the presets' own sizes fit any machine that can train them
            raise UserInputError(name, f"the export needs about {needed / 2 ** 30:.0f} GiB of memory, this machine "
                                       f"has {memory / 2 ** 30:.0f} GiB", fix)


def _plan(args: argparse.Namespace, kind: str, mode: str, device):
    """The run's plan, fresh or resumed: the flags the user gave, by field name, to :func:`plan_run` (which loads
    the prior, resolves the rest from its recipe and validates, before anything is written)."""
    from ..runs.plan import plan_run

    given = given_values(args, mode)
    if not args.resume and "prompt" not in given:
        raise UserInputError("prompt", "no prompt given", "add {=prompt} TEXT, e.g. {=prompt} 'a red cube'")
    return plan_run(kind, given, device=device, resume=args.resume, explicit=True)


def resumes_into(out: Path, resume: str | None) -> bool:
    """Whether ``--resume`` is ``out``'s own checkpoint: then ``out`` is this run's folder and it continues there."""
    if not resume:
        return False
    given = Path(resume).expanduser().resolve()
    return given in ((out / "checkpoint").resolve(), (out / ".checkpoint.old").resolve())


def check_out(out: Path, args: argparse.Namespace, own: bool, patterns: tuple[str, ...] = RUN_OUTPUTS) -> list[str]:
    """The rule that nothing is lost: a run writes into a new or empty ``--out``, into its own folder when it
    resumes that folder's checkpoint, or, with ``--overwrite`` (or a new demo into the demo's folder), into a folder
    holding an earlier run of this tool, replacing that run's outputs. Returns the earlier outputs to replace
    (removed just before the first write); raises a :class:`UserInputError` naming ``out`` otherwise."""
    if own:
        return []
    try:
        outputs, others = folder_contents(out)
    except OSError as exc:
        raise UserInputError("out", f"cannot read '{out}' ({exc.strerror or exc})",
                             "choose a folder you can read and write") from None
    if not outputs and not others:
        return []
    earlier = earlier_run(out)
    if earlier is None:
        some = ", ".join(f"'{name}'" for name in (others or outputs)[:3])
        raise UserInputError("out", f"'{out}' is not empty ({some}) and holds no earlier run of this tool",
                             "choose a new or empty folder for {=out} (nothing here is replaced, not even with "
                             "{=overwrite})")
    if args.overwrite or (getattr(args, "replace_demo", False) and _is_demo(earlier)):
        return [name for name in outputs if is_output(name, patterns)]
    command = earlier.get("command")
    what = {None: "an earlier run's checkpoint", "render": "an earlier render"}.get(command, f"an earlier {command} run")
    checkpoint = out / "checkpoint"
    if args.command == "render":
        fix = "choose a new folder for {=out}, or add {=overwrite} to replace its views, turntable and meshes"
    elif args.command == "demo":
        fix = "give demo a new {=out} folder, or add {=overwrite} to replace that run's outputs"
    elif args.resume:
        fix = (f"resume into the checkpoint's own folder ({{=out}} {Path(args.resume).expanduser().resolve().parent}) "
               "or a new folder, or add {=overwrite} to replace the outputs here")
    elif (checkpoint / "checkpoint.json").is_file():
        fix = (f"continue it with {{=resume}} {checkpoint} {{=steps}} N, choose a new {{=out}} folder, or add "
               "{=overwrite} to replace its outputs (files it did not write are kept)")
    else:
        fix = ("choose a new folder for {=out}, or add {=overwrite} to replace its outputs (files it did not write "
               "are kept)")
    raise UserInputError("out", f"'{out}' already holds {what}", fix)


def _is_demo(earlier: dict[str, Any]) -> bool:
    """Whether an earlier run.json is a demo's: marked so, or (written before the mark existed) a toy-cpu
    text-to-3d run on the embedded prior."""
    if "demo" in earlier:
        return earlier["demo"] is True
    from ..prior import default_prior_path

    config = earlier.get("config") if isinstance(earlier.get("config"), dict) else {}
    return (earlier.get("command") == "text-to-3d" and config.get("preset") == "toy-cpu"
            and config.get("model") == str(default_prior_path()))


def replace_outputs(out: Path, outputs: list[str]) -> None:
    """Remove an earlier run's ``outputs`` from ``out`` (what --overwrite asked for), saying so."""
    if outputs:
        _, others = folder_contents(out)
        kept = f"; {len(others)} other entr{'y' if len(others) == 1 else 'ies'} kept" if others else ""
        sys.stderr.write(f"replacing the earlier run's outputs in {out} ({len(outputs)} files{kept})\n")
        remove_outputs(out, outputs)


def _write_synced(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file, fsync and rename: a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        _sync(f)
    os.replace(tmp, path)


def trim_metrics(path: Path, step: int) -> None:
    """A run resumed in its own folder from its checkpoint at ``step``: drop the lines after it (written before a
    crash or an abort, and about to be written again), broken lines and repeated steps, so each step is there once."""
    if not path.is_file():
        return
    kept, seen = [], set()
    lines = path.read_text().splitlines()
    for line in lines:
        try:
            line_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if line_step <= step and line_step not in seen:
            kept.append(line)
            seen.add(line_step)
    if len(kept) != len(lines):
        _write_synced(path, "".join(line + "\n" for line in kept))


def _drop_later_previews(out: Path, step: int) -> None:
    """Previews of steps after the checkpoint a run resumes in its own folder (the resumed run draws them again)."""
    for preview in (out / "previews").glob("step_*.png"):
        match = re.fullmatch(r"step_(\d+)\.png", preview.name)
        if match and int(match.group(1)) > step:
            preview.unlink(missing_ok=True)


def _sync(file) -> None:
    """Flush ``file`` to the disk: what a checkpoint's step says was done is in metrics.jsonl too, even after a
    SIGKILL or a power loss."""
    file.flush()
    os.fsync(file.fileno())


def _resume_hint(args: argparse.Namespace, out: Path, steps: int) -> str:
    checkpoint = out / "checkpoint"
    if args.command == "demo":  # demo has no --resume: the text-to-3d command continues its run
        return f"continue it with: python -m asd_engine text-to-3d --resume {checkpoint} --steps {steps} --out {out}"
    return f"resume with --resume {checkpoint} --steps {steps} --out {out}"


def train(args: argparse.Namespace, kind: str, mode: str, finish: Callable[[Any, Path], str]) -> int:
    """The shared driver of distill-2d and text-to-3d: check every flag, claim and lock ``--out``, build or resume,
    step with a progress bar, previews and checkpoints, Ctrl-C → checkpoint and exit 130, then ``finish`` writes
    the outputs. A Ctrl-C before the first step, or a second one, is one line and exit 130 too."""
    started = {"writing": False}
    try:
        check_run_flags(args)
        device = check_device(args.device)
        quiet_libraries()
        with locked_folder(args.out) as out:
            return _train_into(out, args, kind, mode, finish, device, started)
    except KeyboardInterrupt:  # while loading the model or building the run: the first step never began
        done = "no step was taken" if started["writing"] else "nothing was written"
        sys.stderr.write(f"\ninterrupted before training started; {done}\n")
        return EXIT_INTERRUPTED


def _train_into(out: Path, args: argparse.Namespace, kind: str, mode: str, finish: Callable[[Any, Path], str],
                device, started: dict[str, bool]) -> int:
    import torch

    from ..images import save_png
    from ..runs import checkpoint as checkpoint_module
    from ..runs.plan import checkpoint_step

    own = resumes_into(out, args.resume)
    earlier_outputs = check_out(out, args, own)
    with warnings.catch_warnings(record=True) as caught:
        notice = getattr(checkpoint_module, "ResumeNotice", None)
        if notice is not None:
            warnings.simplefilter("always", notice)  # every notice of this resume, shown once below
        plan = _plan(args, kind, mode, device)
        run = plan.build()
    for warning in caught:  # a notice is one line like every other message; anything else is shown as usual
        if notice is not None and issubclass(warning.category, notice):
            sys.stderr.write(f"notice: {warning.message}\n")
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    from tqdm import tqdm

    config = run.config
    phi_model = run.phi.prior if run.phi is not None and run.phi.prior is not run.prior else None
    for role, model in (("model", run.prior), ("φ model", phi_model)):
        if model is not None and model.detected:
            sys.stderr.write(f"{role}: {model.detected}\n")
    preview_every = args.preview_every or max(1, config.steps // 10)
    checkpoint_every = args.checkpoint_every or preview_every
    started["writing"] = True
    replace_outputs(out, earlier_outputs)
    demo = args.command == "demo"
    if own:
        trim_metrics(out / "metrics.jsonl", run.step)
        _drop_later_previews(out, run.step)
        demo = _is_demo(earlier_run(out) or {"demo": False})  # a demo continued by text-to-3d is still a demo
    # config.from_recipe names the values that came from the prior's recipe (all others: the user or the preset)
    _write_synced(out / "run.json", json.dumps({"command": args.command, "demo": demo,
                                                "config": dataclasses.asdict(config),
                                                "recipe": dataclasses.asdict(run.prior.recipe),
                                                "model_detected": run.prior.detected,
                                                "resumed_from": args.resume, "device": str(run.prior.device),
                                                "field_backend": run.nerf.field.backend if hasattr(run, "nerf")
                                                else None,  # the hash grid that ran (auto resolved)
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
    started_at = time.perf_counter()
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
            _sync(metrics)
            run.save_checkpoint(out / "checkpoint")

    try:
        try:
            run.run(on_step=on_step, should_stop=lambda: stop["requested"])
        finally:
            signal.signal(signal.SIGINT, previous)
            bar.close()
            _sync(metrics)
            metrics.close()
    except KeyboardInterrupt:  # the second Ctrl-C: stop now, mid-step, and keep the last checkpoint as it is
        kept = checkpoint_step(out / "checkpoint")
        where = (f"the checkpoint of step {kept} stays; {_resume_hint(args, out, config.steps)}" if kept is not None
                 else f"no checkpoint was written in {out}")
        sys.stderr.write(f"\naborted during step {run.step + 1}/{config.steps}; {where}\n")
        return EXIT_INTERRUPTED
    try:
        run.save_checkpoint(out / "checkpoint")
        if run.step < config.steps:
            save_png(run.preview(), out / "previews" / f"step_{run.step:06d}.png")
            sys.stderr.write(f"interrupted at step {run.step}/{config.steps}; "
                             f"{_resume_hint(args, out, config.steps)}\n")
            return EXIT_INTERRUPTED
        elapsed = time.perf_counter() - started_at
        print(f"{finish(run, out)} ({run.step} steps, {elapsed:.1f} s this session)")
    except KeyboardInterrupt:  # while writing the checkpoint or the outputs
        kept = checkpoint_step(out / "checkpoint")
        then = (f"; write the views and meshes with: python -m asd_engine render --checkpoint {out / 'checkpoint'} "
                f"--out {out} --overwrite" if kind == "text-to-3d" and kept == config.steps else "")
        sys.stderr.write(f"\ninterrupted while writing the outputs; the checkpoint in {out / 'checkpoint'} is at step "
                         f"{kept}{then}\n")
        return EXIT_INTERRUPTED
    return 0


def run_distill_2d(args: argparse.Namespace) -> int:
    from ..images import save_png

    def finish(run, out: Path) -> str:
        save_png(run.images(), out / "final.png")
        return f"wrote {out / 'final.png'}"

    return train(args, "distill-2d", "2d", finish)


def export(nerf, preset: str, out: Path, args: argparse.Namespace) -> str:
    """Views, animated turntable and meshes of ``nerf`` into ``out`` (sizes from the flags or the preset; the flags
    were checked by :func:`check_export_flags` before anything ran)."""
    from ..scene.export import export_outputs

    def given(name: str, default_key: str):
        value = getattr(args, name)
        return EXPORT_DEFAULTS[preset][default_key] if value is None else value

    written = export_outputs(nerf, out, views=given("views", "views"), size=given("view_size", "size"),
                             mesh_resolution=given("mesh_resolution", "mesh_resolution"),
                             mesh_threshold=given("mesh_threshold", "mesh_threshold"), background=args.background,
                             animation=args.animation)
    return "wrote " + ", ".join(str(p) for p in written)


def run_text_to_3d(args: argparse.Namespace) -> int:
    return train(args, "text-to-3d", "3d", finish=lambda run, out: export(run.nerf, run.config.preset, out, args))


def run_render(args: argparse.Namespace) -> int:
    """Views, turntable and meshes of a text-to-3d checkpoint into ``--out``, by the same folder rule as a run: a new
    or empty folder, or ``--overwrite`` to replace the views, turntable and meshes of an earlier run or render."""
    started = {"writing": False}
    try:
        check_export_flags(args)
        device = check_device(args.device)
        from ..runs.text_to_3d import load_nerf

        with locked_folder(args.out) as out:
            earlier_outputs = check_out(out, args, own=False, patterns=EXPORT_OUTPUTS)
            nerf, config, step = load_nerf(args.checkpoint, device=device)
            started["writing"] = True
            replace_outputs(out, earlier_outputs)
            # written first: it marks the folder as this tool's, so an interrupted render can be replaced
            _write_synced(out / "render.json", json.dumps({"command": "render", "checkpoint": str(
                Path(args.checkpoint).expanduser().resolve()), "step": step, "views": args.views,
                "view_size": args.view_size, "mesh_resolution": args.mesh_resolution,
                "mesh_threshold": args.mesh_threshold, "background": args.background}, indent=2))
            print(f"{export(nerf, config.preset, out, args)} (checkpoint step {step})")
    except KeyboardInterrupt:
        done = (f"the files in {args.out} may be incomplete (run it again with --overwrite)" if started["writing"]
                else "nothing was written")
        sys.stderr.write(f"\ninterrupted; {done}\n")
        return EXIT_INTERRUPTED
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """text-to-3d on the embedded toy prior. Repeating ``demo`` works: a new demo into the demo's default folder
    replaces the previous demo's outputs there (and only a demo's); any other folder follows the run folder rule."""
    from ..prior import default_prior_path
    from ..toy.quality import parse_toy_prompt

    try:
        parse_toy_prompt(args.prompt)  # the toy prior only knows its colours and shapes: refuse the rest up front
    except UserInputError as exc:
        raise UserInputError("prompt", exc.problem, exc.fix) from None
    parser = Parser(prog="python -m asd_engine")
    add_parsers(parser.add_subparsers(dest="command", parser_class=Parser))
    argv = ["text-to-3d", "--model", str(default_prior_path()), "--prompt", args.prompt, "--method", args.method,
            "--preset", "toy-cpu", "--seed", str(args.seed), "--out", args.out]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.overwrite:
        argv.append("--overwrite")
    parsed = parser.parse_args(argv)
    parsed.command = "demo"
    parsed.replace_demo = Path(args.out).expanduser().resolve() == Path(DEMO_OUT).resolve()
    return run_text_to_3d(parsed)
