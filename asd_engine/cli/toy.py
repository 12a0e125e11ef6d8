"""The toy prior's and measuring commands: ``quality``, ``clip-score``, ``toy-prior-report``, ``train-toy-prior``
and ``tiny-pipeline``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..distill import PHI_NOISE
from ..errors import UserInputError
from ..runs.configs import TOY_CPU_STEPS
from ..runs.settings import BY_FIELD
from .common import ensure_writable_dir, integer, quiet_libraries


def add_parsers(sub) -> None:
    p = sub.add_parser("quality", help="measure ASD vs VSD vs SDS against analytic ground truth",
                       description="Runs each method × prompt × seed on the embedded prior and scores the results "
                                   "against exact renders of the prompt's shape and colour. Writes quality.json, "
                                   "quality.md and grid.png.")
    p.add_argument("--methods", default="asd,vsd,sds", help="comma-separated (default %(default)s)")
    p.add_argument("--prompts", default="a red cube;a green torus;a blue sphere;a yellow cone",
                   help="semicolon-separated toy prompts (default %(default)s)")
    p.add_argument("--seeds", type=integer, default=3, help="seeds per prompt (default 3)")
    p.add_argument("--steps", type=integer,
                   help=f"steps per run (default: the toy-cpu preset's {TOY_CPU_STEPS} in 3d, the Train Loop node's 300 "
                        "in 2d)")
    p.add_argument("--mode", choices=["3d", "2d"], default="3d")
    p.add_argument("--phi-noise", choices=list(PHI_NOISE),
                   help="φ's noise (default: from the prior's recipe; shared for the toy prior)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: from the prior's recipe)")
    p.add_argument("--model", help="prior folder (default: the embedded toy prior)")
    haze = BY_FIELD["lambda_haze"]  # the same flag and help as text-to-3d's
    p.add_argument(haze.flag, type=float, default=0.0, help=f"3d: {haze.help} (default %(default)s)")
    low = BY_FIELD["cameras.min_elevation"]  # the same flag and help as text-to-3d's
    p.add_argument(low.flag, type=float, help=f"3d: {low.help} (default: from the prior's recipe)")
    late = BY_FIELD["distill.guidance_scale_annealed"]  # the same flag and help as text-to-3d's
    p.add_argument(late.flag, type=float, help=f"3d: {late.help} (default: from the prior's recipe)")
    decay = BY_FIELD["lr_decay_to"]  # the same flag and help as text-to-3d's
    p.add_argument(decay.flag, type=float, help=f"3d: {decay.help} (default: the toy-cpu preset's)")
    batch = BY_FIELD["batch_size"]  # the same flag and help as text-to-3d's
    p.add_argument(batch.flag, type=integer, help=f"3d: {batch.help} (default: the toy-cpu preset's)")
    backend = BY_FIELD["nerf_field.backend"]  # the same flag, choices and help as text-to-3d's
    p.add_argument(backend.flag, choices=list(backend.choices), default="auto",
                   help=f"3d: {backend.help} (default %(default)s; the field backends give the same quality within "
                        "seed noise, docs/benchmarks.md#field-backends-on-the-cpu)")
    p.add_argument("--out", required=True, help="output folder; a rerun with the same folder skips finished runs")
    p.set_defaults(handler=run_quality)

    p = sub.add_parser("quality-report", help="the quality tables of finished harness folders, merged",
                       description="Reads the runs.jsonl of one or more `quality --out` folders (e.g. one evaluation "
                                   "split over two processes) and prints the per-method table and, in 3d, the "
                                   "per-prompt table with the prompts in the size target. Runs nothing.")
    p.add_argument("folders", nargs="+", help="harness output folders; one method's runs must share their settings")
    p.set_defaults(handler=run_quality_report)

    p = sub.add_parser("clip-score", help="CLIP score of images against a prompt (the paper's Table 1 metric)",
                       description="Mean cosine similarity of CLIP image and text embeddings over the images "
                                   "(files, folders, or animated turntables), with CLIP weights from a local folder.")
    p.add_argument("--clip", required=True, help="transformers CLIPModel folder (e.g. clip-vit-base-patch16)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("images", nargs="+", help="image files, folders, or turntable .webp/.gif files")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=run_clip_score)

    p = sub.add_parser("toy-prior-report",
                       help="sample grid, prompt fidelity, overhead tori's hole rate and loss curve of a toy prior")
    p.add_argument("--model", help="prior folder (default: the embedded toy prior)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--per-prompt", type=integer, default=10, help="samples per shape × colour prompt (default 10)")
    p.add_argument("--sampler-steps", type=integer, default=30, help="DDIM steps (default 30)")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale for sampling (default 3)")
    p.set_defaults(handler=run_toy_prior_report)

    p = sub.add_parser("train-toy-prior", help="train the embedded toy prior on procedural shapes (resumable)",
                       description="Renders the procedural shape dataset (cached in --work), trains the small "
                                   "pixel-space prior, checkpoints to --work/checkpoint and exports the EMA weights.")
    p.add_argument("--work", required=True, help="working folder (dataset cache, checkpoint); rerun to resume")
    p.add_argument("--export", help="pipeline folder to write at the end (default WORK/pipeline)")
    p.add_argument("--steps", type=integer, help="total training steps (default 4000)")
    p.add_argument("--batch-size", type=integer, help="images per step (default 32)")
    p.add_argument("--dataset-size", type=integer, help="rendered training images (default 40000)")
    p.add_argument("--seed", type=integer, help="seed of data and training (default 0)")
    p.add_argument("--init", help="fine-tune this toy-prior pipeline folder instead of training from scratch")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-4)")
    p.add_argument("--ema-decay", type=float, help="EMA decay of the exported weights (default 0.999)")
    p.add_argument("--overhead-elevation", type=float,
                   help="captions say 'overhead view' above this camera elevation in degrees (default 30)")
    p.add_argument("--max-elevation", type=float,
                   help="the training cameras' highest elevation in degrees, up to 90 (default 45; the lowest is -10)")
    p.set_defaults(handler=run_train_toy_prior)

    p = sub.add_parser("tiny-pipeline", help="write a tiny random SD-architecture pipeline folder",
                       description="Writes a diffusers pipeline folder with the real Stable Diffusion component "
                                   "classes and random weights (a few MB). Good for trying the CLI; its images are noise.")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--pixel", action="store_true", help="pixel-space model (no VAE)")
    p.add_argument("--seed", type=integer, default=0)
    p.set_defaults(handler=run_tiny_pipeline)


def run_quality(args: argparse.Namespace) -> int:
    from ..toy.quality import QualitySettings, check_quality_settings, markdown_table, run_quality as run

    prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = QualitySettings(methods=methods, prompts=prompts, seeds=args.seeds, steps=args.steps, mode=args.mode,
                               model=args.model, phi_noise=args.phi_noise, guidance_scale=args.cfg,
                               field_backend=args.field_backend, lambda_haze=args.lambda_haze,
                               min_elevation=args.min_elevation, guidance_scale_annealed=args.cfg_annealed,
                               lr_decay_to=args.lr_decay_to, batch_size=args.batch_size)
    check_quality_settings(settings)  # before the output folder is made: a refused harness leaves nothing behind
    out = ensure_writable_dir(args.out)
    quiet_libraries()
    result = run(settings, out, log=lambda line: sys.stderr.write(line + "\n"))
    table = markdown_table(result)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    return 0


def run_quality_report(args: argparse.Namespace) -> int:
    from ..toy.quality import report

    print(report([Path(folder) for folder in args.folders]))
    return 0


def run_clip_score(args: argparse.Namespace) -> int:
    from ..clip_score import ClipScorer, load_images

    images = load_images(args.images)
    quiet_libraries()
    scores = ClipScorer(args.clip, device=args.device)(images, args.prompt)
    print(json.dumps({"prompt": args.prompt, "images": len(scores), "clip_score": float(scores.mean()),
                      "min": float(scores.min()), "max": float(scores.max())}))
    return 0


def run_toy_prior_report(args: argparse.Namespace) -> int:
    from ..prior import default_prior_path
    from ..toy.trainer import report

    out = ensure_writable_dir(args.out)
    quiet_libraries()
    result = report(Path(args.model) if args.model else default_prior_path(), out, per_prompt=args.per_prompt,
                    steps=args.sampler_steps, guidance_scale=args.cfg, log=lambda m: sys.stderr.write(m + "\n"))
    holes = {key: result["overhead_holes"][key] for key in ("mean", "data")}
    print(json.dumps(result["fidelity"] | {"per_prompt": "see report.json", "overhead_holes": holes}))
    return 0


def run_train_toy_prior(args: argparse.Namespace) -> int:
    from ..toy.trainer import ToyPriorConfig, train_toy_prior

    work = ensure_writable_dir(args.work, "--work")
    quiet_libraries()
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                    ("dataset_size", args.dataset_size), ("seed", args.seed), ("lr", args.lr),
                                    ("overhead_elevation", args.overhead_elevation),
                                    ("max_elevation", args.max_elevation)) if v is not None}
    for key, value in overrides.items():
        if value <= 0 and key != "seed":
            raise UserInputError(f"--{key.replace('_', '-')}", f"{value} is not positive", "use a number > 0")
    if args.max_elevation is not None and not 0 < args.max_elevation <= 90:
        raise UserInputError("--max-elevation", f"{args.max_elevation} is not in (0, 90]",
                             "e.g. 45 (the default) or 80")
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
    quiet_libraries()
    from ..prior.tiny_pipeline import build_tiny_pipeline

    build_tiny_pipeline(out, prediction_type=args.prediction, latent=not args.pixel, seed=args.seed)
    print(f"wrote a tiny random {'pixel-space' if args.pixel else 'latent'} {args.prediction} pipeline to {out}")
    return 0
