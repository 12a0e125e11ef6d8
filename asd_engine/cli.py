"""Command line: ``python -m asd_engine <command> ...`` (headless runs without ComfyUI).

Commands:
  distill-2d      distil one image from a diffusion prior with ASD / VSD / SDS
  tiny-pipeline   write a tiny random Stable-Diffusion-architecture pipeline (for tests and trying the CLI)

User errors print one line ``error: <input>: <problem>; <fix>`` on stderr and exit with status 2; an interrupted
run (Ctrl-C) finishes its current step, writes a resumable checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import UserInputError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}; see `python -m asd_engine {self.prog.split()[-1]} --help`\n")
        sys.exit(EXIT_USER_ERROR)


def _int(text: str) -> int:
    """Integers are parsed here and range-checked by the config (so the message says what range is valid)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


# flag → (dotted config field, argparse kwargs). Defaults are None so that a resumed run can tell which flags the
# user actually gave; the config dataclasses hold the real defaults.
DISTILL_2D_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--model": ("model", dict(help="diffusers pipeline folder (model_index.json, unet/, text_encoder/, ...)")),
    "--prompt": ("prompt", dict(help="text prompt")),
    "--negative-prompt": ("negative_prompt", dict(help="negative prompt for classifier-free guidance (default '')")),
    "--size": ("size", dict(type=_int, help="image side in pixels, a multiple of 8 (default 512)")),
    "--seed": ("seed", dict(type=_int, help="random seed (default 0)")),
    "--param": ("parameterization", dict(choices=["latent", "pixel"],
                help="optimise the model-space latent (default) or RGB pixels through the VAE encoder")),
    "--lr": ("lr", dict(type=float, help="image learning rate (default 0.03 latent, 0.01 pixel)")),
    "--reference": ("references", dict(nargs="+", metavar="IMAGE",
                    help="real images of the target: enables the real-sample terms of the full L_D (Eq. 5)")),
    "--method": ("distill.method", dict(choices=["asd", "vsd", "sds"], help="distillation method (default asd)")),
    "--cfg": ("distill.guidance_scale", dict(type=float, help="classifier-free guidance scale (default 7.5)")),
    "--gamma": ("distill.gamma", dict(type=float, help="ASD's γ in the φ loss (default -0.75; VSD is γ = 0)")),
    "--eta": ("distill.eta", dict(type=float, help="η of the real-sample term (default 0.5; needs --reference)")),
    "--weighting": ("distill.weighting", dict(choices=["sds", "uniform", "sigma_over_alpha"],
                    help="w(t): sds = 1-ᾱ (default), uniform, sigma_over_alpha = √((1-ᾱ)/ᾱ)")),
    "--t-min": ("distill.t_min", dict(type=float, help="lowest timestep as a fraction of T (default 0.02)")),
    "--t-max": ("distill.t_max", dict(type=float, help="highest timestep as a fraction of T (default 0.98)")),
    "--t-anneal-step": ("distill.t_anneal_step", dict(type=_int,
                        help="from this step on use --t-max-annealed (default: no annealing)")),
    "--t-max-annealed": ("distill.t_max_annealed", dict(type=float, help="t_max after annealing (default 0.5)")),
    "--phi-noise": ("distill.phi_noise", dict(choices=["fresh", "shared"],
                    help="φ step with its own t', eps' (fresh, default) or the generator's (shared, one UNet call less)")),
    "--phi": ("phi.kind", dict(choices=["lora", "ti"], help="discriminator φ: LoRA (default) or textual inversion")),
    "--lora-rank": ("phi.lora_rank", dict(type=_int, help="LoRA rank of φ (default 4)")),
    "--phi-lr": ("phi.lr", dict(type=float, help="φ learning rate (default 1e-4 LoRA, 5e-3 TI)")),
    "--ti-tokens": ("phi.num_tokens", dict(type=_int, help="number of TI tokens of φ (default 1)")),
    "--ti-init": ("phi.init_word", dict(help="word whose embedding initialises the TI tokens (default 'object')")),
}


def _add_distill_2d(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill-2d", help="distil one image with ASD / VSD / SDS",
                       description="Optimise an image with Adversarial Score Distillation (or VSD / SDS). "
                                   "Writes OUT/final.png, OUT/previews/, OUT/checkpoint/ and OUT/metrics.jsonl.")
    for flag, (_, kwargs) in DISTILL_2D_SETTINGS.items():
        p.add_argument(flag, default=None, **kwargs)
    p.add_argument("--steps", type=_int, required=True, help="total number of steps (also when resuming)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", help="checkpoint folder of an earlier run: continue it up to --steps")
    p.add_argument("--preview-every", type=_int, help="write a preview every N steps (default steps/10)")
    p.add_argument("--checkpoint-every", type=_int,
                   help="write the checkpoint every N steps (default: with each preview, and at the end)")
    p.add_argument("--device", default="auto", help="torch device (default: CUDA if available, else CPU)")


def _add_tiny_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-pipeline", help="write a tiny random SD-architecture pipeline folder",
                       description="Writes a diffusers pipeline folder with the real Stable Diffusion component "
                                   "classes and random weights (a few MB). Good for trying the CLI; its images are noise.")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--pixel", action="store_true", help="pixel-space model (no VAE)")
    p.add_argument("--seed", type=_int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m asd_engine", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_distill_2d(sub)
    _add_tiny_pipeline(sub)
    return parser


def _quiet_libraries() -> None:
    """Library progress bars and INFO chatter would bury our own progress bar."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging_module in (diffusers_logging, transformers_logging):
        logging_module.set_verbosity_error()
        logging_module.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def ensure_writable_dir(path: str, input_name: str = "--out") -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a :class:`UserInputError`."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(input_name, f"cannot write to '{folder}' ({exc.strerror or exc})",
                             "choose a folder you can write to") from None
    return folder


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def _get_dotted(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key, {}) if isinstance(data, dict) else {}
    return data


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {flag: getattr(args, flag[2:].replace("-", "_")) for flag in DISTILL_2D_SETTINGS
            if getattr(args, flag[2:].replace("-", "_")) is not None}


def _distill_2d_config_data(args: argparse.Namespace, given: dict[str, Any]) -> dict[str, Any]:
    """Config dict for a new run from the flags the user gave (defaults come from the dataclasses)."""
    method = given.get("--method", "asd")
    if method == "sds":
        for flag in ("--phi", "--gamma", "--phi-noise", "--lora-rank", "--phi-lr", "--ti-tokens", "--ti-init"):
            if flag in given:
                raise UserInputError(flag, "SDS has no discriminator φ, so this has no effect",
                                     "leave it out, or use --method asd / vsd")
    if "--eta" in given and "--reference" not in given:
        raise UserInputError("--eta", "η weighs the real-sample term, which needs reference images",
                             "add --reference IMAGE ..., or leave --eta out")
    if "--model" not in given:
        raise UserInputError("--model", "no model given",
                             "give a diffusers pipeline folder (`python -m asd_engine tiny-pipeline --out DIR` makes a tiny one)")
    if "--prompt" not in given:
        raise UserInputError("--prompt", "no prompt given", "add --prompt TEXT, e.g. --prompt 'a red cube'")
    data: dict[str, Any] = {"steps": args.steps}
    for flag, value in given.items():
        _set_dotted(data, DISTILL_2D_SETTINGS[flag][0], value)
    if method == "vsd" and "--gamma" not in given:
        _set_dotted(data, "distill.gamma", 0.0)  # VSD = ASD with γ = 0
    data["model"] = str(Path(given["--model"]).expanduser().resolve())
    if "--reference" in given:
        data["references"] = [str(Path(p).expanduser().resolve()) for p in given["--reference"]]
    return data


def _check_resume_flags(given: dict[str, Any], stored: dict[str, Any]) -> None:
    """A resumed run keeps its settings; a flag that contradicts the checkpoint is an error, not a silent change."""
    for flag, value in given.items():
        dotted = DISTILL_2D_SETTINGS[flag][0]
        if flag in ("--model", "--reference"):
            value = ([str(Path(v).expanduser().resolve()) for v in value] if isinstance(value, list)
                     else str(Path(value).expanduser().resolve()))
        if _get_dotted(stored, dotted) != value:
            raise UserInputError(flag, f"differs from the checkpoint's value ({_get_dotted(stored, dotted)!r})",
                                 "leave it out when resuming (the checkpoint's settings apply), or start a new run")


def run_distill_2d(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_checkpoint
    from .distill_2d import Distill2D, Distill2DConfig
    from .images import save_png
    from .prior import inspect_pipeline_folder
    from .runs import config_from_dict

    given = _given_settings(args)
    if args.steps <= 0:
        raise UserInputError("--steps", f"{args.steps} is not a positive step count", "use an integer ≥ 1")
    if args.resume:  # cheap checks first: nothing is loaded or written before the inputs are known to be good
        _, meta = load_checkpoint(args.resume)
        _check_resume_flags(given, meta.get("config", {}))
    else:
        config = config_from_dict(Distill2DConfig, _distill_2d_config_data(args, given))
        config.validate()
        inspect_pipeline_folder(config.model)
    out = ensure_writable_dir(args.out)
    _quiet_libraries()
    from tqdm import tqdm

    if args.resume:
        run = Distill2D.from_checkpoint(args.resume, overrides={"steps": args.steps}, device=args.device)
    else:
        run = Distill2D(config, device=args.device)
    config = run.config
    preview_every = args.preview_every or max(1, config.steps // 10)
    checkpoint_every = args.checkpoint_every or preview_every
    (out / "run.json").write_text(json.dumps({"command": "distill-2d", "config": dataclasses.asdict(config),
                                              "resumed_from": args.resume, "device": str(run.prior.device),
                                              "torch": torch.__version__}, indent=2))

    stop = {"requested": False}

    def request_stop(_signum, _frame) -> None:
        if stop["requested"]:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        stop["requested"] = True
        sys.stderr.write("\nstopping after this step (Ctrl-C again to abort without a checkpoint)...\n")

    previous = signal.signal(signal.SIGINT, request_stop)
    bar = tqdm(total=config.steps, initial=run.step, desc=f"{config.distill.method} 2D", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    metrics = open(out / "metrics.jsonl", "a")

    def on_step(info) -> None:
        metrics.write(json.dumps(vars(info)) + "\n")
        postfix = {"t": info.t, "loss_g": f"{info.generator_loss:.3g}"}
        if info.phi_loss is not None:
            postfix["loss_phi"] = f"{info.phi_loss:.3g}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if info.step % preview_every == 0 and info.step < config.steps:
            save_png(run.images(), out / "previews" / f"step_{info.step:06d}.png")
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
        save_png(run.images(), out / "previews" / f"step_{run.step:06d}.png")
        sys.stderr.write(f"interrupted at step {run.step}/{config.steps}; resume with "
                         f"--resume {out / 'checkpoint'} --steps {config.steps}\n")
        return EXIT_INTERRUPTED
    save_png(run.images(), out / "final.png")
    elapsed = time.perf_counter() - started
    print(f"wrote {out / 'final.png'} ({run.step} steps, {elapsed:.1f} s this session)")
    return 0


def run_tiny_pipeline(args: argparse.Namespace) -> int:
    out = ensure_writable_dir(args.out)
    _quiet_libraries()
    from .tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(out, prediction_type=args.prediction, latent=not args.pixel, seed=args.seed)
    print(f"wrote a tiny random {'pixel-space' if args.pixel else 'latent'} {args.prediction} pipeline to {out}")
    return 0


COMMANDS = {"distill-2d": run_distill_2d, "tiny-pipeline": run_tiny_pipeline}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserInputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
