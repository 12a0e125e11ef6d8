"""Graph-shaped entry points: what the ComfyUI nodes hand to the engine, and what they get back.

The nodes build small specs (which generator, which φ); :func:`plan_run` turns them plus the loop settings into a
:class:`RunPlan` whose :meth:`~RunPlan.key` names the run (so a host can find its earlier checkpoint) and whose
:meth:`~RunPlan.build` makes the :class:`~asd_engine.distill_2d.Distill2D` or :class:`~asd_engine.text_to_3d.TextTo3D`;
:func:`train` runs it with the host's progress/interrupt hooks and checkpoints it, and :class:`DistillationResult`
is what flows to Render Views / NeRF to Mesh / Save Checkpoint. Keeping this here keeps the nodes to parsing inputs
and returning outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import read_checkpoint_meta
from .discriminator import PhiConfig
from .distill import DistillConfig
from .errors import UserInputError
from .prior import DiffusionPrior
from .runs import DistillationRun, StepInfo


@dataclass
class ImageGeneratorSpec:
    """2D: one image of ``size`` px (None: the prior's own size), optimised as a latent or as pixels; ``jitter``:
    the largest random roll per step in model-space pixels (None: from the prior's recipe)."""

    size: int | None = None
    parameterization: str = "latent"
    lr: float | None = None
    seed: int = 0
    jitter: int | None = None
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


@dataclass
class RunPlan:
    """A run described but not yet built: its class, its config (``None`` fields still open: the prior's recipe
    fills them when the run is built) and its priors. Cheap to make, so a host can ask for :meth:`key` and look
    for an earlier checkpoint of the same run before building anything."""

    run_class: type
    config: object
    prior: DiffusionPrior
    phi_prior: DiffusionPrior | None = None

    def key(self) -> str:
        """16 hex digits naming this run: the same prior weights, prompt, settings, seed and step count give the
        same key (wherever the prior was loaded from); anything that changes the result changes it."""
        import hashlib
        import json

        from .recipe import resolve_recipe

        config = copy.deepcopy(self.config)
        resolve_recipe(config, self.prior.recipe)
        data = dataclasses.asdict(config)
        data.pop("from_recipe", None)
        data["model"] = self.prior.fingerprint()
        if self.phi_prior is not None:
            data["phi_model"] = self.phi_prior.fingerprint()
        data["kind"] = self.run_class.kind
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build(self, resume: str | os.PathLike | None = None) -> DistillationRun:
        """The run, fresh, or continued from ``resume`` (a checkpoint of a run with the same prompt and method) up
        to this plan's step count."""
        if not resume:
            return self.run_class(copy.deepcopy(self.config), prior=self.prior, phi_prior=self.phi_prior)
        resume_plan(self, resume)  # the same kind of run, prompt and method, or a clear error
        return self.run_class.from_checkpoint(resume, overrides={"steps": self.config.steps}, prior=self.prior,
                                              phi_prior=self.phi_prior)


def resume_plan(plan: RunPlan, resume: str | os.PathLike) -> RunPlan:
    """The plan of continuing checkpoint ``resume`` to ``plan``'s step count: the checkpoint's own settings (a
    resumed run keeps them), after checking that it is the same kind of run, prompt and method."""
    from .runs import config_from_dict

    meta = read_checkpoint_meta(resume, input_name="resume")
    stored = meta.get("config", {})
    if meta.get("kind") != plan.run_class.kind:
        raise UserInputError("resume", f"the checkpoint is a {meta.get('kind')} run, the generator makes a "
                             f"{plan.run_class.kind} run", "connect the generator type the checkpoint was trained with")
    for name in ("prompt", "method"):
        value = getattr(plan.config, name, None) or getattr(plan.config.distill, name)
        have = stored.get(name, stored.get("distill", {}).get(name))
        if have != value:
            raise UserInputError(name, f"'{value}' differs from the checkpoint's '{have}'",
                                 "set it back to the checkpoint's value to resume, or disconnect 'resume'")
    config = config_from_dict(plan.run_class.config_class, {**stored, "steps": plan.config.steps})
    return RunPlan(plan.run_class, config, plan.prior, plan.phi_prior)


def checkpoint_step(folder: str | os.PathLike | None) -> int | None:
    """The step a checkpoint folder holds, or None when there is no readable checkpoint there."""
    import json

    from .checkpoint import META_FILE

    try:
        return int(json.loads((Path(folder) / META_FILE).read_text())["step"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


def latest_checkpoint(folders: list, steps: int) -> Path | None:
    """Of ``folders`` (None entries allowed), the checkpoint furthest along that does not pass ``steps``."""
    usable = [(checkpoint_step(f), Path(f)) for f in folders if f]
    usable = [(step, path) for step, path in usable if step is not None and step <= steps]
    return max(usable, key=lambda item: item[0])[1] if usable else None


def training_memory_bytes(plan: RunPlan) -> int:
    """Memory to set aside for training beyond the frozen weights (activations kept for the backward passes of φ's
    LoRA and of the render, φ's Adam state): a heuristic of 1.5 × the UNet's weights per camera/image in the batch,
    NOT yet measured on a GPU (docs/benchmarks.md). A host frees this much before the first step."""
    unet_bytes = sum(p.numel() * p.element_size() for p in plan.prior.unet.parameters())
    return int(1.5 * unet_bytes * max(1, getattr(plan.config, "batch_size", 1)))


def plan_run(prior: DiffusionPrior, generator: ImageGeneratorSpec | NeRFGeneratorSpec, prompt: str, steps: int,
             negative_prompt: str = "", method: str = "asd", guidance_scale: float | None = None,
             weighting: str | None = None, t_min: float | None = None, t_max: float | None = None,
             phi_noise: str | None = None, discriminator: DiscriminatorSpec | None = None,
             background: str | None = None) -> RunPlan:
    """A 2D or 3D distillation on ``prior``, described. ``None`` for guidance scale, weighting, t range, φ noise and
    background means "from the prior's recipe" (``prior.recipe``)."""
    from .distill_2d import Distill2D, Distill2DConfig
    from .text_to_3d import TextTo3D, preset_config

    discriminator = discriminator or DiscriminatorSpec()
    phi_prior = discriminator.phi_prior if method != "sds" else None
    models = dict(model=prior.source, prediction_type=prior.prediction_type,
                  phi_model=phi_prior.source if phi_prior is not None else None)
    gamma = 0.0 if method != "asd" else discriminator.gamma
    distill_fields = dict(method=method, guidance_scale=guidance_scale, gamma=gamma, weighting=weighting,
                          t_min=t_min, t_max=t_max, phi_noise=phi_noise)
    if generator.kind == "nerf":
        config = preset_config(generator.preset, prompt, negative_prompt=negative_prompt, steps=steps,
                               seed=generator.seed, batch_size=generator.batch_size,
                               phi=copy.deepcopy(discriminator.phi), background=background, **models)
        if generator.resolution_schedule:
            config.resolution_schedule = list(generator.resolution_schedule)
        config.distill = dataclasses.replace(config.distill, **distill_fields)
        return RunPlan(TextTo3D, config, prior, phi_prior)
    config = Distill2DConfig(prompt=prompt, **models, negative_prompt=negative_prompt, steps=steps,
                             seed=generator.seed, size=generator.size, parameterization=generator.parameterization,
                             lr=generator.lr, jitter=generator.jitter, distill=DistillConfig(**distill_fields),
                             phi=copy.deepcopy(discriminator.phi),  # the run fills it from the recipe
                             background=background)
    return RunPlan(Distill2D, config, prior, phi_prior)


def make_run(prior: DiffusionPrior, generator: ImageGeneratorSpec | NeRFGeneratorSpec, prompt: str, steps: int,
             resume: str | os.PathLike | None = None, **settings) -> DistillationRun:
    """:func:`plan_run` built at once; with ``resume``, continue that checkpoint to ``steps``."""
    return plan_run(prior, generator, prompt, steps, **settings).build(resume)


@dataclass
class DistillationResult:
    """A finished (or interrupted) run, or one loaded from a checkpoint, as it flows between nodes: only what the
    output nodes need, on the CPU (a host cache may keep it for hours; the run, its optimisers and φ are not kept)."""

    kind: str                                  # "image" or "nerf"
    config: object
    step: int
    checkpoint: Path | None = None             # its checkpoint folder (Save ASD Checkpoint copies it)
    nerf: object | None = None                 # NeRFGenerator for 3D results, on the CPU
    image: torch.Tensor | None = None          # [1, 3, H, W] for 2D results (when it could be decoded), on the CPU
    losses: dict[str, list[float]] = field(default_factory=dict)  # per-step history: "loss" and "phi_loss"


def result_of(run: DistillationRun, checkpoint: Path | None) -> DistillationResult:
    """The result of ``run``; its NeRF moves to the CPU (the run is finished with it)."""
    losses = {name: list(values) for name, values in run.losses.items()}
    if run.kind == "text-to-3d":
        return DistillationResult("nerf", run.config, run.step, checkpoint, nerf=run.nerf.to("cpu"), losses=losses)
    return DistillationResult("image", run.config, run.step, checkpoint, image=run.images().cpu(), losses=losses)


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

    meta = read_checkpoint_meta(checkpoint, input_name="checkpoint")
    if meta.get("kind") == "text-to-3d":
        nerf, config, step = load_nerf(checkpoint, device=device, input_name="checkpoint")
        return DistillationResult("nerf", config, step, Path(checkpoint), nerf=nerf, losses=meta.get("losses", {}))
    if meta.get("kind") == "distill-2d":
        if prior is None:
            from .distill_2d import Distill2DConfig
            from .runs import config_from_dict

            return DistillationResult("image", config_from_dict(Distill2DConfig, meta["config"]), meta["step"],
                                      Path(checkpoint), losses=meta.get("losses", {}))
        run = Distill2D.from_checkpoint(checkpoint, prior=prior)
        return result_of(run, Path(checkpoint))
    raise UserInputError("checkpoint", f"'{checkpoint}' holds a {meta.get('kind')} checkpoint",
                         "choose a distill-2d or text-to-3d checkpoint")
