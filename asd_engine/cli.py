"""Command line: ``python -m asd_engine <command> ...`` (headless runs without ComfyUI).

Commands:
  demo            text-to-3D with ASD on the embedded toy prior (the README's main command)
  distill-2d      distil one image from a diffusion prior with ASD / VSD / SDS
  text-to-3d      distil a NeRF from a diffusion prior; exports a mesh, a turntable and views
  render          re-render views, turntable and mesh from a text-to-3d checkpoint
  quality         measure ASD vs VSD vs SDS on the embedded prior against analytic ground truth
  clip-score      CLIP score of images against a prompt (local CLIP weights)
  toy-prior-report  sample grid, prompt fidelity, overhead tori's hole rate, loss curve of a toy prior
  train-toy-prior train the embedded toy prior on procedural shapes with known 3D truth
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
from typing import Any, Callable, Sequence

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


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"'{text}' is not on/off")
    return text == "on"


# flag → (dotted config field, argparse kwargs). Defaults are None so that a resumed run can tell which flags the
# user actually gave; the config dataclasses (and presets) hold the real defaults.
Settings = dict[str, tuple[str, dict[str, Any]]]
COMMON_SETTINGS: Settings = {
    "--model": ("model", dict(help="diffusers pipeline folder (model_index.json, unet/, ...) or a single-file SD "
                                   "1.x/2.x .safetensors checkpoint; default: the embedded toy prior")),
    "--prediction-type": ("prediction_type", dict(choices=["auto", "epsilon", "v_prediction"],
                          help="override what the model predicts (default auto: the folder's scheduler, or "
                               "detected from a single file's weights)")),
    "--phi-model": ("phi_model", dict(help="a second model (folder or single file) for φ, as the official recipe "
                                           "(SD2.1-768 v for φ, SD2.1-base as --model); default: φ on --model")),
    "--precision": ("precision", dict(choices=["auto", "fp32", "fp16", "bf16"],
                    help="frozen models' precision (default auto: fp16 on CUDA, fp32 elsewhere); θ and φ train in fp32")),
    "--attention-slicing": ("attention_slicing", dict(type=_on_off, metavar="on|off",
                            help="UNet attention one head at a time, for GPUs without memory-efficient SDPA (default off)")),
    "--vae-checkpointing": ("vae_checkpointing", dict(type=_on_off, metavar="on|off",
                            help="recompute the VAE encoder in backward (default: on in low-vram, else off)")),
    "--prompt": ("prompt", dict(help="text prompt")),
    "--negative-prompt": ("negative_prompt", dict(help="negative prompt for classifier-free guidance (default '')")),
    "--seed": ("seed", dict(type=_int, help="random seed (default 0)")),
    "--method": ("distill.method", dict(choices=["asd", "vsd", "sds"], help="distillation method (default asd)")),
    "--cfg": ("distill.guidance_scale", dict(type=float, help="classifier-free guidance scale (default: from the "
                                                          "prior's recipe; 7.5 for Stable Diffusion, 3 for the toy prior)")),
    "--gamma": ("distill.gamma", dict(type=float, help="ASD's γ in the φ loss (default: from the prior's recipe; "
                                                      "official -0.75; VSD is γ = 0)")),
    "--weighting": ("distill.weighting", dict(choices=["sds", "uniform", "sigma_over_alpha"],
                    help="w(t): sds = 1-ᾱ, uniform = 1, sigma_over_alpha = √((1-ᾱ)/ᾱ) (default: from the "
                         "prior's recipe; sds, but uniform for the toy prior's 2D runs)")),
    "--t-min": ("distill.t_min", dict(type=float, help="lowest timestep as a fraction of T (default: from the "
                                                      "prior's recipe; official 0.02)")),
    "--t-max": ("distill.t_max", dict(type=float, help="highest timestep as a fraction of T (default: from the "
                                                      "prior's recipe; official 0.98)")),
    "--train-background": ("background", dict(choices=["random", "white", "black"], help=
                           "what renders are composited over in training, and what 2D pixels start as (default: "
                           "from the prior's recipe; random for Stable Diffusion, white for the toy prior)")),
    "--t-anneal-step": ("distill.t_anneal_step", dict(type=_int,
                        help="from this step on use --t-max-annealed (2D default: never; 3D: per preset)")),
    "--t-max-annealed": ("distill.t_max_annealed", dict(type=float, help="t_max after annealing (default 0.5)")),
    "--phi-noise": ("distill.phi_noise", dict(choices=["fresh", "shared"],
                    help="φ step with its own t', eps' (fresh; official) or the generator's (shared, one UNet "
                         "call less) (default: from the prior's recipe; fresh for Stable Diffusion, shared for the "
                         "toy prior's 3D runs)")),
    "--phi": ("phi.kind", dict(choices=["lora", "ti"], help="discriminator φ: LoRA (default) or textual inversion")),
    "--lora-rank": ("phi.lora_rank", dict(type=_int, help="LoRA rank of φ (default 4)")),
    "--lora-targets": ("phi.lora_targets", dict(choices=["attention", "all"],  # discriminator.LORA_TARGETS (tested)
                       help="UNet layers φ's LoRA adapts: attention or all (every convolution and projection too); "
                            "default: from the prior's recipe (SD attention, toy prior all)")),
    "--phi-lr": ("phi.lr", dict(type=float, help="φ learning rate (default: LoRA from the prior's recipe, official "
                                                "1e-4, toy prior 1e-2; TI 5e-3)")),
    "--ti-tokens": ("phi.num_tokens", dict(type=_int, help="number of TI tokens of φ (default 1)")),
    "--ti-init": ("phi.init_word", dict(help="word whose embedding initialises the TI tokens (default 'object')")),
}
SETTINGS_2D: Settings = {
    **COMMON_SETTINGS,
    "--size": ("size", dict(type=_int, help="image side in pixels, a multiple of 8 (default: the prior's own size)")),
    "--param": ("parameterization", dict(choices=["latent", "pixel"],
                help="optimise the model-space latent (default) or RGB pixels through the VAE encoder")),
    "--lr": ("lr", dict(type=float, help="image learning rate (default 0.03 latent, 0.01 pixel)")),
    "--lr-decay-to": ("lr_decay_to", dict(type=float, help="the learning rate falls along a cosine to this fraction "
                                                          "of --lr by the last step (default 0.05; 1 = constant; an "
                                                          "extended run follows the cosine of its new total)")),
    "--jitter": ("jitter", dict(type=_int, help="each step the image is shown rolled by a random shift of up to this "
                                               "many pixels per axis (default: from the prior's recipe; 0 for Stable "
                                               "Diffusion, 1 for the toy prior; SDS 0)")),
    "--reference": ("references", dict(nargs="+", metavar="IMAGE",
                    help="real images of the target: enables the real-sample terms of the full L_D (Eq. 5)")),
    "--eta": ("distill.eta", dict(type=float, help="η of the real-sample term (default 0.5; needs --reference)")),
}
SETTINGS_3D: Settings = {
    **COMMON_SETTINGS,
    "--preset": ("preset", dict(choices=["toy-cpu", "quality", "low-vram"],
                 help="toy-cpu (small grid, prior resolution, minutes on a CPU), quality (the official recipe, GPU; "
                      "default), low-vram (≤ 12 GB GPUs)")),
    "--batch-size": ("batch_size", dict(type=_int, help="cameras per step (default 1)")),
    "--perp-neg": ("perp_neg", dict(type=_on_off, metavar="on|off", help="Perp-Neg guidance (preset default)")),
    "--view-prompts": ("view_dependent_prompts", dict(type=_on_off, metavar="on|off",
                       help="append ', front/side/back/overhead view' per camera (default on)")),
    "--camera-embedding": ("phi.camera_embedding", dict(type=_on_off, metavar="on|off",
                           help="condition the LoRA φ on the camera (default on)")),
    "--lambda-sparsity": ("lambda_sparsity", dict(type=float, help="weight of the sparsity regulariser (default: "
                                                                  "from the prior's recipe; official 10)")),
    "--blob-fade": ("blob_fade", dict(type=_on_off, metavar="on|off", help=
                    "fade the NeRF's initial ball of density to nothing by the second phase, so that the centre can "
                    "become empty (a torus's hole); default: from the prior's recipe (Stable Diffusion off, toy "
                    "prior on)")),
    "--overhead-elevation": ("overhead_elevation", dict(type=float, help=
                             "cameras above this elevation (degrees) are prompted ', overhead view' (default: from "
                             "the prior's recipe; 60 for Stable Diffusion, 30 for the toy prior)")),
}
PATH_SETTINGS = ("--model", "--phi-model", "--reference")
PHI_ONLY = ("--phi", "--phi-model", "--gamma", "--phi-noise", "--lora-rank", "--lora-targets", "--phi-lr",
            "--ti-tokens", "--ti-init", "--camera-embedding")


def _add_settings(p: argparse.ArgumentParser, settings: Settings) -> None:
    for flag, (_, kwargs) in settings.items():
        p.add_argument(flag, default=None, **kwargs)


def _add_run_options(p: argparse.ArgumentParser, steps_help: str, steps_required: bool) -> None:
    p.add_argument("--steps", type=_int, required=steps_required, help=steps_help)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", help="checkpoint folder of an earlier run: continue it up to --steps")
    p.add_argument("--preview-every", type=_int, help="write a preview every N steps (default steps/10)")
    p.add_argument("--checkpoint-every", type=_int,
                   help="write the checkpoint every N steps (default: with each preview, and at the end)")
    p.add_argument("--device", default="auto", help="torch device (default: CUDA if available, else CPU)")


def _add_export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--views", type=_int, help="turntable views (default per preset: 36 toy-cpu, 120 otherwise)")
    p.add_argument("--view-size", type=_int, help="turntable image side in px (default 128 toy-cpu, 512 otherwise)")
    p.add_argument("--mesh-resolution", type=_int, help="marching-cubes grid (default 128 toy-cpu, 256 otherwise)")
    p.add_argument("--mesh-threshold", type=float,
                   help="density isosurface level (default per preset: 5 toy-cpu, 25 otherwise)")
    p.add_argument("--background", choices=["white", "black", "learned"], default="white",
                   help="background of the turntable and views (default white)")
    p.add_argument("--animation", choices=["webp", "gif"], default="webp", help="turntable file format")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m asd_engine", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("distill-2d", help="distil one image with ASD / VSD / SDS",
                       description="Optimise an image with Adversarial Score Distillation (or VSD / SDS). "
                                   "Writes OUT/final.png, OUT/previews/, OUT/checkpoint/ and OUT/metrics.jsonl.")
    _add_settings(p, SETTINGS_2D)
    _add_run_options(p, "total number of steps (also when resuming)", steps_required=True)

    p = sub.add_parser("text-to-3d", help="distil a NeRF with ASD / VSD / SDS and export a mesh and turntable",
                       description="Text-to-3D with Adversarial Score Distillation (or VSD / SDS). Writes "
                                   "OUT/mesh.glb, OUT/mesh.obj, OUT/turntable.webp, OUT/views/, OUT/previews/, "
                                   "OUT/checkpoint/ and OUT/metrics.jsonl.")
    _add_settings(p, SETTINGS_3D)
    _add_run_options(p, "total number of steps (default per preset: 900 toy-cpu, 25000 otherwise)",
                     steps_required=False)
    _add_export_options(p)

    p = sub.add_parser("render", help="re-render views, turntable and mesh from a text-to-3d checkpoint",
                       description="Loads only the NeRF from a text-to-3d checkpoint (no diffusion model needed).")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by text-to-3d")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="torch device (default: CUDA if available, else CPU)")
    _add_export_options(p)

    p = sub.add_parser("demo", help="text-to-3D with ASD on the embedded prior (toy-cpu preset, minutes on a CPU)",
                       description="Runs text-to-3d with the embedded toy prior and the toy-cpu preset: writes "
                                   "mesh.glb, mesh.obj, turntable.webp and views/ into --out.")
    p.add_argument("--prompt", default="a red cube", help="a colour and a shape the toy prior knows (default %(default)s)")
    p.add_argument("--method", choices=["asd", "vsd", "sds"], default="asd")
    p.add_argument("--steps", type=_int, help="total steps (default: the toy-cpu preset's 900)")
    p.add_argument("--seed", type=_int, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")

    p = sub.add_parser("quality", help="measure ASD vs VSD vs SDS against analytic ground truth",
                       description="Runs each method × prompt × seed on the embedded prior and scores the results "
                                   "against exact renders of the prompt's shape and colour. Writes quality.json, "
                                   "quality.md and grid.png.")
    p.add_argument("--methods", default="asd,vsd,sds", help="comma-separated (default %(default)s)")
    p.add_argument("--prompts", default="a red cube;a green torus;a blue sphere;a yellow cone",
                   help="semicolon-separated toy prompts (default %(default)s)")
    p.add_argument("--seeds", type=_int, default=3, help="seeds per prompt (default 3)")
    p.add_argument("--steps", type=_int,
                   help="steps per run (default: the toy-cpu preset's 900 in 3d, the Train Loop node's 300 in 2d)")
    p.add_argument("--mode", choices=["3d", "2d"], default="3d")
    p.add_argument("--phi-noise", choices=["fresh", "shared"],
                   help="φ's noise (default: from the prior's recipe; shared for the toy prior)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: from the prior's recipe)")
    p.add_argument("--model", help="prior folder (default: the embedded toy prior)")
    p.add_argument("--out", required=True, help="output folder; a rerun with the same folder skips finished runs")

    p = sub.add_parser("clip-score", help="CLIP score of images against a prompt (the paper's Table 1 metric)",
                       description="Mean cosine similarity of CLIP image and text embeddings over the images "
                                   "(files, folders, or animated turntables), with CLIP weights from a local folder.")
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (e.g. clip-vit-base-patch16)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("images", nargs="+", help="image files, folders, or turntable .webp/.gif files")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("toy-prior-report",
                       help="sample grid, prompt fidelity, overhead tori's hole rate and loss curve of a toy prior")
    p.add_argument("--model", help="prior folder (default: the embedded toy prior)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-prompt", type=_int, default=10, help="samples per shape × colour prompt (default 10)")
    p.add_argument("--sampler-steps", type=_int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale for sampling (default 3)")

    p = sub.add_parser("train-toy-prior", help="train the embedded toy prior on procedural shapes (resumable)",
                       description="Renders the procedural shape dataset (cached in --work), trains the small "
                                   "pixel-space prior, checkpoints to --work/checkpoint and exports the EMA weights.")
    p.add_argument("--work", required=True, help="working folder (dataset cache, checkpoint); rerun to resume")
    p.add_argument("--export", help="pipeline folder to write at the end (default WORK/pipeline)")
    p.add_argument("--steps", type=_int, help="total training steps (default 4000)")
    p.add_argument("--batch-size", type=_int, help="images per step (default 32)")
    p.add_argument("--dataset-size", type=_int, help="rendered training images (default 40000)")
    p.add_argument("--seed", type=_int, help="seed of data and training (default 0)")
    p.add_argument("--init", help="fine-tune this toy-prior pipeline folder instead of training from scratch")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the exported weights (default 0.999)")
    p.add_argument("--overhead-elevation", type=float,
                   help="captions say 'overhead view' above this camera elevation in degrees (default 30)")

    p = sub.add_parser("tiny-pipeline", help="write a tiny random SD-architecture pipeline folder",
                       description="Writes a diffusers pipeline folder with the real Stable Diffusion component "
                                   "classes and random weights (a few MB). Good for trying the CLI; its images are noise.")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--pixel", action="store_true", help="pixel-space model (no VAE)")
    p.add_argument("--seed", type=_int, default=0)
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


def _normalise_paths(flag: str, value: Any) -> Any:
    if flag not in PATH_SETTINGS:
        return value
    if isinstance(value, list):
        return [str(Path(v).expanduser().resolve()) for v in value]
    return str(Path(value).expanduser().resolve())


def _given(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The settings flags the user actually gave, with paths made absolute."""
    values = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in settings}
    return {flag: _normalise_paths(flag, v) for flag, v in values.items() if v is not None}


def _new_config_data(given: dict[str, Any], settings: Settings, base: dict[str, Any]) -> dict[str, Any]:
    """Config dict for a new run: ``base`` (defaults or a preset) overlaid with the flags the user gave."""
    method = given.get("--method", "asd")
    if method == "sds":
        for flag in PHI_ONLY:
            if flag in given:
                raise UserInputError(flag, "SDS has no discriminator φ, so this has no effect",
                                     "leave it out, or use --method asd / vsd")
    if "--eta" in given and "--reference" not in given:
        raise UserInputError("--eta", "η weighs the real-sample term, which needs reference images",
                             "add --reference IMAGE ..., or leave --eta out")
    if "--model" not in given:
        from .toy_prior import default_prior_path

        if not (default_prior_path() / "model_index.json").is_file():
            raise UserInputError("--model", "no model given and the embedded prior is missing",
                                 "give a diffusers pipeline folder, or restore asd_engine/assets/toy-prior")
        given = {**given, "--model": str(default_prior_path())}
    if "--prompt" not in given:
        raise UserInputError("--prompt", "no prompt given", "add --prompt TEXT, e.g. --prompt 'a red cube'")
    data = json.loads(json.dumps(base))  # deep copy
    for flag, value in given.items():
        _set_dotted(data, settings[flag][0], value)
    if method == "vsd" and "--gamma" not in given:
        _set_dotted(data, "distill.gamma", 0.0)  # VSD = ASD with γ = 0
    return data


def _check_resume_flags(given: dict[str, Any], stored: dict[str, Any], settings: Settings) -> None:
    """A resumed run keeps its settings; a flag that contradicts the checkpoint is an error, not a silent change."""
    for flag, value in given.items():
        dotted = settings[flag][0]
        if _get_dotted(stored, dotted) != value:
            raise UserInputError(flag, f"differs from the checkpoint's value ({_get_dotted(stored, dotted)!r})",
                                 "leave it out when resuming (the checkpoint's settings apply), or start a new run")


def _train(args: argparse.Namespace, run_class, settings: Settings, base: Callable[[dict], dict],
           finish: Callable[[Any, Path], str]) -> int:
    """The shared driver of distill-2d and text-to-3d: build or resume, step with a progress bar, previews and
    checkpoints, Ctrl-C → checkpoint and exit 130, then ``finish`` writes the outputs."""
    import torch

    from .checkpoint import read_checkpoint_meta
    from .images import save_png
    from .loading import check_model_path
    from .runs import config_from_dict

    given = _given(args, settings)
    if args.steps is not None and args.steps <= 0:
        raise UserInputError("--steps", f"{args.steps} is not a positive step count", "use an integer ≥ 1")
    if args.resume:  # cheap checks first: nothing is loaded or written before the inputs are known to be good
        if args.steps is None:
            raise UserInputError("--steps", "no total given for the resumed run", "add --steps N (the new total)")
        meta = read_checkpoint_meta(args.resume)
        _check_resume_flags(given, meta.get("config", {}), settings)
    else:
        data = _new_config_data(given, settings, base(given))
        if args.steps is not None:
            data["steps"] = args.steps
        config = config_from_dict(run_class.config_class, data)
        config.validate()
        check_model_path(config.model)
        if config.phi_model:
            check_model_path(config.phi_model, "--phi-model")
    out = ensure_writable_dir(args.out)
    _quiet_libraries()
    from tqdm import tqdm

    if args.resume:
        run = run_class.from_checkpoint(args.resume, overrides={"steps": args.steps}, device=args.device)
    else:
        run = run_class(config, device=args.device)
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
    from .distill_2d import Distill2D
    from .images import save_png

    def finish(run, out: Path) -> str:
        save_png(run.images(), out / "final.png")
        return f"wrote {out / 'final.png'}"

    return _train(args, Distill2D, SETTINGS_2D, base=lambda given: {}, finish=finish)


def _export(nerf, preset: str, out: Path, args: argparse.Namespace) -> str:
    """Views, animated turntable and meshes of ``nerf`` into ``out`` (sizes from the flags or the preset)."""
    from .export import export_outputs
    from .text_to_3d import EXPORT_DEFAULTS

    defaults = EXPORT_DEFAULTS[preset]
    written = export_outputs(nerf, out, views=args.views or defaults["views"],
                             size=args.view_size or defaults["size"],
                             mesh_resolution=args.mesh_resolution or defaults["mesh_resolution"],
                             mesh_threshold=defaults["mesh_threshold"] if args.mesh_threshold is None
                             else args.mesh_threshold, background=args.background,
                             animation=args.animation)
    return "wrote " + ", ".join(str(p) for p in written)


def run_text_to_3d(args: argparse.Namespace) -> int:
    from .text_to_3d import TextTo3D, preset_config

    def base(given: dict[str, Any]) -> dict[str, Any]:
        return dataclasses.asdict(preset_config(given.get("--preset", "quality"), given.get("--prompt", "")))

    return _train(args, TextTo3D, SETTINGS_3D, base=base,
                  finish=lambda run, out: _export(run.nerf, run.config.preset, out, args))


def run_render(args: argparse.Namespace) -> int:
    from .text_to_3d import load_nerf

    nerf, config, step = load_nerf(args.checkpoint, device=args.device)
    out = ensure_writable_dir(args.out)
    print(f"{_export(nerf, config.preset, out, args)} (checkpoint step {step})")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .toy_prior import default_prior_path

    argv = ["text-to-3d", "--model", str(default_prior_path()), "--prompt", args.prompt, "--method", args.method,
            "--preset", "toy-cpu", "--seed", str(args.seed), "--out", args.out]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    return COMMANDS["text-to-3d"](build_parser().parse_args(argv))


def run_quality(args: argparse.Namespace) -> int:
    from .quality import QualitySettings, markdown_table, parse_toy_prompt, run_quality as run

    prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        if method not in ("asd", "vsd", "sds"):
            raise UserInputError("--methods", f"unknown method '{method}'", "use a comma list of asd, vsd, sds")
    for prompt in prompts:
        parse_toy_prompt(prompt)
    out = ensure_writable_dir(args.out)
    _quiet_libraries()
    settings = QualitySettings(methods=methods, prompts=prompts, seeds=args.seeds, steps=args.steps, mode=args.mode,
                               model=args.model, phi_noise=args.phi_noise, guidance_scale=args.cfg)
    result = run(settings, out, log=lambda line: sys.stderr.write(line + "\n"))
    table = markdown_table(result)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    return 0


def run_clip_score(args: argparse.Namespace) -> int:
    from .clip_score import ClipScorer, load_images

    images = load_images(args.images)
    _quiet_libraries()
    scores = ClipScorer(args.clip, device=args.device)(images, args.prompt)
    print(json.dumps({"prompt": args.prompt, "images": len(scores), "clip_score": float(scores.mean()),
                      "min": float(scores.min()), "max": float(scores.max())}))
    return 0


def run_toy_prior_report(args: argparse.Namespace) -> int:
    from .toy_prior import default_prior_path, report

    out = ensure_writable_dir(args.out)
    _quiet_libraries()
    result = report(Path(args.model) if args.model else default_prior_path(), out, per_prompt=args.per_prompt,
                    steps=args.sampler_steps, guidance_scale=args.cfg, log=lambda m: sys.stderr.write(m + "\n"))
    holes = {key: result["overhead_holes"][key] for key in ("mean", "data")}
    print(json.dumps(result["fidelity"] | {"per_prompt": "see report.json", "overhead_holes": holes}))
    return 0


def run_train_toy_prior(args: argparse.Namespace) -> int:
    from .toy_prior import ToyPriorConfig, train_toy_prior

    work = ensure_writable_dir(args.work, "--work")
    _quiet_libraries()
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                    ("dataset_size", args.dataset_size), ("seed", args.seed), ("lr", args.lr),
                                    ("overhead_elevation", args.overhead_elevation)) if v is not None}
    for key, value in overrides.items():
        if value <= 0 and key != "seed":
            raise UserInputError(f"--{key.replace('_', '-')}", f"{value} is not positive", "use a number > 0")
    if args.ema_decay is not None:
        if not 0.0 <= args.ema_decay < 1.0:
            raise UserInputError("--ema-decay", f"{args.ema_decay} is not in [0, 1)", "e.g. 0.999")
        overrides["ema_decay"] = args.ema_decay
    if args.init:
        overrides["init"] = args.init
    folder = train_toy_prior(ToyPriorConfig(**overrides), work, Path(args.export) if args.export else None,
                             log=lambda message: sys.stderr.write(message + "\n"))
    print(f"wrote the toy prior to {folder}")
    return 0


def run_tiny_pipeline(args: argparse.Namespace) -> int:
    out = ensure_writable_dir(args.out)
    _quiet_libraries()
    from .tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(out, prediction_type=args.prediction, latent=not args.pixel, seed=args.seed)
    print(f"wrote a tiny random {'pixel-space' if args.pixel else 'latent'} {args.prediction} pipeline to {out}")
    return 0


COMMANDS = {"distill-2d": run_distill_2d, "text-to-3d": run_text_to_3d, "render": run_render, "demo": run_demo,
            "quality": run_quality, "clip-score": run_clip_score, "toy-prior-report": run_toy_prior_report,
            "train-toy-prior": run_train_toy_prior, "tiny-pipeline": run_tiny_pipeline}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserInputError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
