"""The one way a run is described, built, trained and reloaded, by the CLI and the ComfyUI nodes alike.

A front door hands :func:`plan_run` the values it was given under their field names (:mod:`.settings`); the plan
takes the preset, loads the prior if none was passed, and resolves the open values from the prior's recipe once
(:func:`.settings.resolve`). :meth:`RunPlan.key` names the run (so a host can find its earlier checkpoint),
:meth:`RunPlan.build` makes the :class:`~.distill_2d.Distill2D` or :class:`~.text_to_3d.TextTo3D`, and
:func:`resume_plan` continues a checkpoint. :func:`train` runs a run with a host's progress/interrupt hooks, and
:class:`DistillationResult` is what flows to Render Views / NeRF to Mesh / Save Checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..devices import resolve_device, resolve_precision
from ..errors import UserInputError
from ..prior import default_prior_path
from ..prior.diffusion import DiffusionPrior
from ..prior.discriminator import PhiConfig
from ..prior.loading import load_prior
from . import settings
from .base import DistillationRun, StepInfo
from . import checkpoint as ckpt
from .checkpoint import read_checkpoint_meta
from .configs import Distill2DConfig, config_from_dict, preset_config
from .distill_2d import Distill2D
from .text_to_3d import TextTo3D, load_nerf

RUN_CLASSES = {cls.kind: cls for cls in (Distill2D, TextTo3D)}


@dataclass
class ImageGeneratorSpec:
    """2D: what Image Generator hands on (fields named as the config's; None: the prior's size / recipe)."""

    size: int | None = None
    parameterization: str = "latent"
    lr: float | None = None
    seed: int = 0
    jitter: int | None = None
    kind = Distill2D.kind

    def values(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class NeRFGeneratorSpec:
    """3D: what NeRF Generator hands on; ``resolution_schedule`` None: the preset's (step, px) schedule."""

    preset: str = "toy-cpu"
    resolution_schedule: list[tuple[int, int]] | None = None
    batch_size: int = 1
    seed: int = 0
    field_backend: str = "auto"
    kind = TextTo3D.kind

    def values(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["nerf_field.backend"] = values.pop("field_backend")
        return values


@dataclass
class DiscriminatorSpec:
    """What ASD Discriminator hands on: φ's settings and ASD's γ (None: the prior's recipe), and φ's own model."""

    phi: PhiConfig = field(default_factory=PhiConfig)
    gamma: float | None = None
    phi_prior: DiffusionPrior | None = None

    def values(self) -> dict[str, Any]:
        phi = {f"phi.{key}": value for key, value in dataclasses.asdict(self.phi).items()}
        return {**phi, "distill.gamma": self.gamma}


@dataclass
class RunPlan:
    """A run described, resolved and validated but not yet built: its class, its config and its priors. Cheap to
    keep, so a host can ask for :meth:`key` and look for an earlier checkpoint before building anything."""

    run_class: type
    config: object
    prior: DiffusionPrior
    phi_prior: DiffusionPrior | None = None
    resume: str | os.PathLike | None = None   # the checkpoint this plan continues

    def key(self) -> str:
        """16 hex digits naming this run: the same prior weights, prompt, settings, seed and step count give the
        same key (wherever the prior was loaded from); anything that changes the result changes it."""
        import hashlib
        import json

        data = dataclasses.asdict(self.config)
        data.pop("from_recipe", None)
        data["model"] = self.prior.fingerprint()
        if self.phi_prior is not None:
            data["phi_model"] = self.phi_prior.fingerprint()
        data["kind"] = self.run_class.kind
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build(self, resume: str | os.PathLike | None = None) -> DistillationRun:
        """The run, fresh, or continued up to this plan's step count from ``resume`` (default: the checkpoint the
        plan continues; a host may pass a later checkpoint of the same run)."""
        resume = resume or self.resume
        if not resume:
            return self.run_class(copy.deepcopy(self.config), prior=self.prior, phi_prior=self.phi_prior)
        if resume != self.resume:
            resume_plan(self, resume)  # the same kind of run, prompt and method, or a clear error
        return self.run_class.from_checkpoint(resume, overrides={"steps": self.config.steps}, prior=self.prior,
                                              phi_prior=self.phi_prior)


def base_config(kind: str, values: dict[str, Any]):
    """The defaults a ``kind`` run ("distill-2d" or "text-to-3d") starts from: its preset's (3D) or its config's."""
    if kind not in RUN_CLASSES:
        raise ValueError(f"unknown run kind {kind!r}")
    prompt = values.get("prompt") or ""
    if kind == TextTo3D.kind:
        return preset_config(values.get("preset") or "quality", prompt)
    return Distill2DConfig(prompt=prompt)


def load_priors(model: str | None, precision: str, prediction_type: str, phi_model: str | None,
                device: str | torch.device | None = None) -> tuple[DiffusionPrior, DiffusionPrior | None]:
    """The prior (``model``; None: the embedded prior) and φ's own model (``phi_model``, when given), loaded."""
    device = resolve_device(device)
    prior = load_prior(model or default_prior_path(), device=device, dtype=resolve_precision(precision, device),
                       prediction_type=prediction_type, input_name="model")
    phi_prior = None
    if phi_model:
        phi_prior = load_prior(phi_model, device=prior.device, dtype=prior.dtype, input_name="phi_model")
    return prior, phi_prior


def plan_run(kind: str, values: dict[str, Any], prior: DiffusionPrior | None = None,
             phi_prior: DiffusionPrior | None = None, device: str | torch.device | None = None,
             resume: str | os.PathLike | None = None, explicit: bool = False) -> RunPlan:
    """A ``kind`` run with ``values`` (field → value; ``None``: from the prior's recipe) on ``prior`` (None: loaded
    from the values), resolved against the prior's recipe and validated, once (:func:`.settings.resolve`).

    ``explicit``: the values are what a user typed (the CLI), so φ's settings in an SDS run are an error rather than
    ignored. ``resume``: continue that checkpoint instead; its settings apply and the values must agree with them."""
    if resume:
        return _resumed_plan(kind, values, resume, prior, phi_prior, device)
    config = base_config(kind, values)
    method = values.get("distill.method") or config.distill.method
    if prior is None:
        phi_model = values.get("phi_model") if method != "sds" else None
        prior, phi_prior = load_priors(values.get("model"), values.get("precision") or config.precision,
                                       values.get("prediction_type") or config.prediction_type, phi_model, device)
    values = {**values, "model": str(prior.source), "prediction_type": prior.prediction_type,
              "phi_model": str(phi_prior.source) if phi_prior is not None and method != "sds" else None}
    settings.resolve(config, prior.recipe, prior.native_size, values=values, explicit=explicit)
    return RunPlan(RUN_CLASSES[kind], config, prior, phi_prior if config.phi_model else None)


MODEL_FIELDS = ("model", "phi_model")  # checked by the weights' fingerprint on resume, not by their path


def _resumed_plan(kind: str, values: dict[str, Any], resume: str | os.PathLike, prior: DiffusionPrior | None,
                  phi_prior: DiffusionPrior | None, device: str | torch.device | None) -> RunPlan:
    """The plan of continuing checkpoint ``resume`` to ``values['steps']`` with the checkpoint's own settings.
    ``values['model']`` / ``values['phi_model']`` may name the same weights at a new place (a moved model folder)."""
    run_class = RUN_CLASSES[kind]
    meta = read_checkpoint_meta(resume, input_name="resume", run=True)
    stored = meta["config"]
    if meta["kind"] != kind:
        raise UserInputError("resume", f"the checkpoint is a {meta['kind']} run, not a {kind} run",
                             "resume it with the generator type it was trained with")
    if "steps" not in values:
        raise UserInputError("steps", "no total given for the resumed run", "add {=steps} N (the new total)")
    ckpt.check_config(run_class.config_class, stored, resume)
    check_resume_values(values, stored)
    data = {**run_class.config_class.older_values, **settings.official_where_absent(stored, run_class.config_class),
            "steps": values["steps"]}
    config = config_from_dict(run_class.config_class, data)
    settings.validate(config)  # a checkpoint is input like any other
    if meta["step"] > config.steps:
        raise UserInputError("steps", f"the checkpoint is already at step {meta['step']}",
                             f"use {{=steps}} ≥ {meta['step']} (the total, not the number of extra steps)")
    if prior is None:
        device = resolve_device(device)
        dtype = resolve_precision(config.precision, device)
        prior = _resumed_prior(meta, config, "model", values.get("model"), lambda path: load_prior(
            path, device=device, dtype=dtype, prediction_type=config.prediction_type, input_name="model"))
        phi_prior = None
        if config.phi_model and config.distill.uses_phi:
            phi_prior = _resumed_prior(meta, config, "phi_model", values.get("phi_model"), lambda path: load_prior(
                path, device=prior.device, dtype=prior.dtype, input_name="phi_model"))
    else:  # a host's priors (the nodes): they must hold the weights the run was trained with
        for role, given in (("model", prior), ("phi_model", phi_prior)):
            if given is not None and ckpt.weights_match(meta, role, given) is False:
                raise UserInputError(role, "its weights differ from the ones the checkpoint was trained with",
                                     "connect the model the run was trained with to resume it, or start a new run")
    return RunPlan(run_class, config, prior, phi_prior, resume=resume)


def _resumed_prior(meta: dict, config: Any, role: str, given: str | None,
                   load: Callable[[str], DiffusionPrior]) -> DiffusionPrior:
    """The ``role`` model ("model" / "phi_model") of a resumed run: the checkpoint's, or ``given`` (a path the user
    typed) when it holds the same weights (the checkpoint's fingerprint); records where it was found in ``config``."""
    stored = getattr(config, role) or (str(default_prior_path()) if role == "model" else None)
    known = role in (meta.get("fingerprints") or {})
    embedded = default_prior_path()
    if given is None and known and not Path(stored).exists() and Path(stored).name == embedded.name:
        given = str(embedded)  # the embedded prior of an engine installed elsewhere: recognised by its weights
    if given is None or given == stored:
        if not Path(stored).exists():
            fix = ("give {=" + role + "} with the same weights at their new place (they are recognised by their "
                   "content)" if known else f"put the model back at '{stored}' (this checkpoint is older than weight "
                   "fingerprints, so only that path is accepted)")
            raise UserInputError(role, f"the checkpoint's model '{stored}' no longer exists", fix)
        prior = load(stored)
        if ckpt.weights_match(meta, role, prior) is False:
            raise UserInputError(role, f"the weights at '{stored}' differ from the ones the checkpoint was trained "
                                 "with", "restore them, or give {=" + role + "} with the original weights")
        return prior
    if not known:
        where = (f"leave {{={role}}} out to resume on '{stored}'" if Path(stored).exists()
                 else f"put the model back at '{stored}'")
        raise UserInputError(role, f"'{given}' is not the checkpoint's model '{stored}', and this checkpoint is older "
                             "than weight fingerprints, so other weights cannot be recognised", where)
    prior = load(given)
    match = ckpt.weights_match(meta, role, prior)
    if match is False:
        raise UserInputError(role, f"the weights in '{given}' differ from the ones the checkpoint was trained with",
                             "give {=" + role + "} with the run's own weights, or start a new run without {=resume}")
    if match is None:  # fingerprints depend on the precision the weights were loaded at
        warnings.warn(f"the weights in '{given}' could not be compared with the checkpoint's: they were loaded at "
                      f"{str(prior.dtype).removeprefix('torch.')}, the checkpoint at "
                      f"{meta['fingerprints'].get('dtype')}; resuming on them as given", ckpt.ResumeNotice,
                      stacklevel=3)
    setattr(config, role, str(prior.source))  # the same weights: the run now records where they are
    return prior


def plan_from_specs(prior: DiffusionPrior, generator: ImageGeneratorSpec | NeRFGeneratorSpec,
                    values: dict[str, Any], discriminator: DiscriminatorSpec | None = None) -> RunPlan:
    """:func:`plan_run` from what the nodes hand on: a generator spec, φ's spec, and the loop's own values."""
    discriminator = discriminator or DiscriminatorSpec()
    phi_values = discriminator.values()
    if values.get("distill.method", "asd") != "asd":
        del phi_values["distill.gamma"]  # one φ node serves every method: VSD is ASD with γ = 0, SDS has no φ
    merged = {**generator.values(), **phi_values, **values}
    return plan_run(generator.kind, merged, prior=prior, phi_prior=discriminator.phi_prior)


def resume_plan(plan: RunPlan, resume: str | os.PathLike) -> RunPlan:
    """The plan of continuing checkpoint ``resume`` to ``plan``'s step count on ``plan``'s priors: the
    checkpoint's own settings, after checking it is the same kind of run with the same prompt and method."""
    given = {"prompt": plan.config.prompt, "distill.method": plan.config.distill.method, "steps": plan.config.steps}
    return _resumed_plan(plan.run_class.kind, given, resume, plan.prior, plan.phi_prior, None)


def check_resume_values(given: dict[str, Any], stored: dict[str, Any]) -> None:
    """A resumed run keeps its settings; a value that contradicts the checkpoint is an error, not a silent change.
    The models are the exception: the same weights may have moved (:func:`_resumed_prior` compares fingerprints)."""
    for name, value in given.items():
        if name == "steps" or name in MODEL_FIELDS:  # models: recognised by their weights (_resumed_prior)
            continue
        have: Any = stored
        for part in name.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if isinstance(value, tuple) or (isinstance(value, list) and isinstance(have, list)):
            value, have = json_like(value), json_like(have)
        if have != value:
            raise UserInputError(name, f"'{value}' differs from the checkpoint's '{have}'",
                                 "leave it as the checkpoint has it to resume (its settings apply), or start a new run")


def json_like(value: Any) -> Any:
    """Tuples as lists, recursively (how a checkpoint stores them)."""
    if isinstance(value, (list, tuple)):
        return [json_like(v) for v in value]
    return value


def _meta_value(folder: str | os.PathLike | None, key: str):
    """One entry of a checkpoint folder's metadata, or None when there is no readable checkpoint there."""
    import json

    from .checkpoint import META_FILE

    try:
        return json.loads((Path(folder) / META_FILE).read_text())[key]
    except (TypeError, OSError, ValueError, KeyError):
        return None


def checkpoint_step(folder: str | os.PathLike | None) -> int | None:
    """The step a checkpoint folder holds, or None when there is no readable checkpoint there."""
    try:
        return int(_meta_value(folder, "step"))
    except (TypeError, ValueError):
        return None


def checkpoint_kind(folder: str | os.PathLike | None) -> str | None:
    """"text-to-3d" or "distill-2d" for a checkpoint folder, None when there is no readable checkpoint there."""
    return _meta_value(folder, "kind")


def checkpoint_version(folder: str | os.PathLike | None) -> str:
    """Changes whenever the checkpoint in ``folder`` does (a longer run, or a resumed one, writes the same folder):
    its step and its files' modification times; "" for no checkpoint."""
    step = None if folder is None else checkpoint_step(folder)
    if step is None:
        return ""
    times = sorted((p.name, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())
    return f"step {step}: {times}"


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


def make_run(prior: DiffusionPrior, generator: ImageGeneratorSpec | NeRFGeneratorSpec, values: dict[str, Any],
             discriminator: DiscriminatorSpec | None = None,
             resume: str | os.PathLike | None = None) -> DistillationRun:
    """:func:`plan_from_specs` built at once; with ``resume``, continue that checkpoint to ``values['steps']``."""
    return plan_from_specs(prior, generator, values, discriminator).build(resume)


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
    meta = read_checkpoint_meta(checkpoint, input_name="checkpoint", run=True)
    if meta["kind"] == "text-to-3d":
        nerf, config, step = load_nerf(checkpoint, device=device, input_name="checkpoint")
        return DistillationResult("nerf", config, step, Path(checkpoint), nerf=nerf, losses=meta.get("losses", {}))
    if prior is None:
        ckpt.check_config(Distill2DConfig, meta["config"], checkpoint, "checkpoint")
        return DistillationResult("image", config_from_dict(Distill2DConfig, meta["config"]), meta["step"],
                                  Path(checkpoint), losses=meta.get("losses", {}))
    run = Distill2D.from_checkpoint(checkpoint, prior=prior, input_name="checkpoint")
    return result_of(run, Path(checkpoint))
