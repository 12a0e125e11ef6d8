"""Graph-shaped entry points: what the ComfyUI nodes hand to the engine, and what they get back.

The nodes build small specs (which generator, which φ), :func:`make_run` turns them plus the loop settings into a
:class:`~asd_engine.distill_2d.Distill2D` or :class:`~asd_engine.text_to_3d.TextTo3D`, :func:`train` runs it with
the host's progress/interrupt hooks and checkpoints it, and :class:`DistillationResult` is what flows to Render
Views / Export Mesh / Save Checkpoint. Keeping this here keeps the nodes to parsing inputs and returning outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_checkpoint
from .discriminator import PhiConfig
from .distill import DistillConfig
from .errors import UserInputError
from .prior import DiffusionPrior
from .runs import DistillationRun, StepInfo


@dataclass
class ImageGeneratorSpec:
    """2D: one image of ``size`` px (None: the prior's own size), optimised as a latent or as pixels."""

    size: int | None = None
    parameterization: str = "latent"
    lr: float | None = None
    seed: int = 0
    kind: str = "image"


@dataclass
class NeRFGeneratorSpec:
    """3D: a NeRF from a preset; ``resolution_schedule`` overrides the preset's (step, px) schedule."""

    preset: str = "toy-cpu"
    resolution_schedule: list[tuple[int, int]] | None = None
    batch_size: int = 1
    seed: int = 0
    kind: str = "nerf"


@dataclass
class DiscriminatorSpec:
    """φ's settings and ASD's γ (the γ is ignored by VSD, which is ASD with γ = 0, and by SDS)."""

    phi: PhiConfig = field(default_factory=PhiConfig)
    gamma: float | None = None                # None: the prior's recipe (official -0.75)
    phi_prior: DiffusionPrior | None = None   # a second model for φ (official: SD2.1-768 v); None: the prior


def parse_resolution_schedule(text: str, input_name: str = "resolution_schedule") -> list[tuple[int, int]] | None:
    """``""`` → None (preset default); ``"64"`` → [(0, 64)]; ``"0:64, 5000:512"`` → [(0, 64), (5000, 512)]."""
    text = text.strip()
    if not text:
        return None
    schedule = []
    try:
        for part in text.replace(";", ",").split(","):
            step, _, side = part.strip().rpartition(":")
            schedule.append((int(step) if step else 0, int(side)))
    except ValueError:
        raise UserInputError(input_name, f"cannot read '{text}'",
                             "write a size ('64') or step:size pairs ('0:64, 5000:512')") from None
    schedule.sort()
    if schedule[0][0] != 0 or any(side < 8 or side % 8 for _, side in schedule):
        raise UserInputError(input_name, f"'{text}' must start at step 0 with sizes that are multiples of 8",
                             "e.g. '0:64, 5000:512'")
    return schedule


def make_run(prior: DiffusionPrior, generator: ImageGeneratorSpec | NeRFGeneratorSpec, prompt: str, steps: int,
             negative_prompt: str = "", method: str = "asd", guidance_scale: float | None = None,
             weighting: str = "sds", t_min: float | None = None, t_max: float | None = None, phi_noise: str = "fresh",
             discriminator: DiscriminatorSpec | None = None, resume: str | os.PathLike | None = None,
             background: str | None = None) -> DistillationRun:
    """A ready-to-run 2D or 3D distillation on ``prior``; with ``resume``, continue that checkpoint to ``steps``.
    ``None`` for guidance scale, t range and background means "from the prior's recipe" (``prior.recipe``)."""
    from .distill_2d import Distill2D, Distill2DConfig
    from .text_to_3d import TextTo3D, preset_config

    run_class = TextTo3D if generator.kind == "nerf" else Distill2D
    if resume:
        _, meta = load_checkpoint(resume, input_name="resume")
        stored = meta.get("config", {})
        if meta.get("kind") != run_class.kind:
            raise UserInputError("resume", f"the checkpoint is a {meta.get('kind')} run, the generator is {generator.kind}",
                                 "connect the generator type the checkpoint was trained with")
        for name, value in (("prompt", prompt), ("method", method)):
            have = stored.get(name, stored.get("distill", {}).get(name))
            if have != value:
                raise UserInputError(name, f"'{value}' differs from the checkpoint's '{have}'",
                                     "set it back to the checkpoint's value to resume, or disconnect 'resume'")
        return run_class.from_checkpoint(resume, overrides={"steps": steps}, prior=prior,
                                         phi_prior=discriminator.phi_prior if discriminator else None)
    discriminator = discriminator or DiscriminatorSpec()
    phi_prior = discriminator.phi_prior if method != "sds" else None
    models = dict(model=prior.source, prediction_type=prior.prediction_type,
                  phi_model=phi_prior.source if phi_prior is not None else None)
    gamma = 0.0 if method != "asd" else discriminator.gamma
    distill_fields = dict(method=method, guidance_scale=guidance_scale, gamma=gamma, weighting=weighting,
                          t_min=t_min, t_max=t_max, phi_noise=phi_noise)
    if generator.kind == "nerf":
        config = preset_config(generator.preset, prompt, negative_prompt=negative_prompt, steps=steps,
                               seed=generator.seed, batch_size=generator.batch_size, phi=discriminator.phi,
                               background=background, **models)
        if generator.resolution_schedule:
            config.resolution_schedule = list(generator.resolution_schedule)
        config.distill = dataclasses.replace(config.distill, **distill_fields)
    else:
        config = Distill2DConfig(prompt=prompt, **models, negative_prompt=negative_prompt, steps=steps,
                                 seed=generator.seed, size=generator.size, parameterization=generator.parameterization,
                                 lr=generator.lr, distill=DistillConfig(**distill_fields),
                                 phi=copy.deepcopy(discriminator.phi),  # the run fills it from the recipe
                                 background=background)
    return run_class(config, prior=prior, phi_prior=phi_prior)


@dataclass
class DistillationResult:
    """A finished (or interrupted) run, or one loaded from a checkpoint, as it flows between nodes."""

    kind: str                                  # "image" or "nerf"
    config: object
    step: int
    checkpoint: Path | None = None
    run: DistillationRun | None = None         # present when the result comes from training in this session
    nerf: object | None = None                 # NeRFGenerator for 3D results
    image: torch.Tensor | None = None          # [1, 3, H, W] for 2D results (when it could be decoded)


def result_of(run: DistillationRun, checkpoint: Path | None) -> DistillationResult:
    if run.kind == "text-to-3d":
        return DistillationResult("nerf", run.config, run.step, checkpoint, run, nerf=run.nerf)
    return DistillationResult("image", run.config, run.step, checkpoint, run, image=run.images().cpu())


def train(run: DistillationRun, checkpoint_dir: str | os.PathLike,
          on_step: Callable[[StepInfo], None] | None = None, should_stop: Callable[[], bool] | None = None,
          is_interrupt: Callable[[BaseException], bool] = lambda exc: isinstance(exc, KeyboardInterrupt),
          ) -> DistillationResult:
    """Run to ``config.steps`` and checkpoint into ``checkpoint_dir``. An interrupt (raised by a callback between
    steps, so the state is consistent) writes the checkpoint first and then propagates."""
    checkpoint_dir = Path(checkpoint_dir)
    with torch.inference_mode(False), torch.enable_grad():
        try:
            run.run(on_step=on_step, should_stop=should_stop)
        except BaseException as exc:
            if is_interrupt(exc):
                run.save_checkpoint(checkpoint_dir)
            raise
        run.save_checkpoint(checkpoint_dir)
        return result_of(run, checkpoint_dir)


def load_result(checkpoint: str | os.PathLike, prior: DiffusionPrior | None = None,
                device: str | torch.device | None = None) -> DistillationResult:
    """A result from a checkpoint folder. 3D: the NeRF (no prior needed). 2D: the image, decoded with ``prior``
    when given (a latent image cannot be shown without its VAE)."""
    from .distill_2d import Distill2D
    from .text_to_3d import load_nerf

    _, meta = load_checkpoint(checkpoint, input_name="checkpoint")
    if meta.get("kind") == "text-to-3d":
        nerf, config, step = load_nerf(checkpoint, device=device, input_name="checkpoint")
        return DistillationResult("nerf", config, step, Path(checkpoint), nerf=nerf)
    if meta.get("kind") == "distill-2d":
        if prior is None:
            from .distill_2d import Distill2DConfig
            from .runs import config_from_dict

            return DistillationResult("image", config_from_dict(Distill2DConfig, meta["config"]), meta["step"],
                                      Path(checkpoint))
        run = Distill2D.from_checkpoint(checkpoint, prior=prior)
        return result_of(run, Path(checkpoint))
    raise UserInputError("checkpoint", f"'{checkpoint}' holds a {meta.get('kind')} checkpoint",
                         "choose a distill-2d or text-to-3d checkpoint")
