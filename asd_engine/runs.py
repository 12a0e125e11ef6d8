"""What every distillation run shares: the prior, φ, one RNG, a step counter, the step loop and exact checkpoints.

A run is built from a config dataclass (stored verbatim in its checkpoints). Subclasses (:class:`Distill2D`,
:class:`TextTo3D`) add their generator θ, its optimiser and ``train_step``; this base class owns everything else,
so that resuming works the same way for 2D and 3D: a run resumed from step k reproduces a straight run bit for bit
on the same machine.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from . import checkpoint as ckpt
from .devices import resolve_device
from .discriminator import PhiConfig, build_discriminator
from .distill import DistillConfig
from .errors import UserInputError
from .loading import load_prior
from .prior import DiffusionPrior
from .recipe import BACKGROUNDS, official_where_absent, resolve_recipe


def config_from_dict(cls: type, data: dict[str, Any]):
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output; tuples come back as tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif typing.get_origin(hint) is list and isinstance(value, list):
            value = [tuple(v) if isinstance(v, list) else v for v in value]
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise UserInputError("--resume", f"the checkpoint has settings this version does not know: {sorted(unknown)}",
                             "resume with the engine version that wrote it")
    return cls(**kwargs)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The frozen models' dtype: ``auto`` is fp16 on CUDA (as Stable Diffusion runs there) and fp32 elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return PRECISIONS[precision]


@dataclass
class RunConfig:
    """Settings every run has; :class:`Distill2DConfig` and :class:`TextTo3DConfig` extend it."""

    mode: ClassVar[str | None] = None     # "2d" / "3d": which of the recipe's mode-specific values apply
    # Non-recipe fields added after checkpoints were written: the value such a checkpoint resumes with, i.e. what
    # the engine did before the field existed (recipe fields: recipe.official_where_absent).
    older_values: ClassVar[dict[str, Any]] = {}

    prompt: str
    model: str | None = None              # pipeline folder or single-file checkpoint; None: the embedded prior
    prediction_type: str = "auto"         # override of the model's epsilon / v_prediction
    phi_model: str | None = None          # a second model for φ (official: SD2.1-768 v); None: φ on the prior
    # Memory (frozen models only; θ and φ always train in fp32): "auto" = fp16 on CUDA, fp32 elsewhere.
    precision: str = "auto"
    attention_slicing: bool = False       # UNet attention in slices: lower peak, a little slower
    vae_checkpointing: bool = False       # recompute the VAE encoder in backward instead of storing activations
    negative_prompt: str = ""
    steps: int = 500
    seed: int = 0
    # What the generator is composited over while training (3D) or starts as (2D pixels): "random", "white" or
    # "black"; None: the prior's recipe (official: "random"; the toy prior saw only white).
    background: str | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    from_recipe: list[str] = field(default_factory=list)  # the fields the prior's recipe filled (set when built)

    def validate(self) -> None:
        if not self.prompt.strip():
            raise UserInputError("--prompt", "the prompt is empty", "describe what to make, e.g. 'a red cube'")
        if self.steps <= 0:
            raise UserInputError("--steps", f"{self.steps} is not a positive step count", "use an integer ≥ 1")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise UserInputError("--background", f"'{self.background}' is not a training background",
                                 f"use one of {', '.join(BACKGROUNDS)}")
        if self.precision not in ("auto", *PRECISIONS):
            raise UserInputError("--precision", f"'{self.precision}' is not a precision",
                                 f"use auto or one of {', '.join(PRECISIONS)}")
        self.distill.validate()
        if self.distill.uses_phi:
            self.phi.validate()


@dataclass
class StepInfo:
    """What a callback sees after each step."""

    step: int                 # steps done so far
    total: int
    generator_loss: float     # the score-distillation surrogate loss
    phi_loss: float | None    # None for SDS
    t: int                    # generator timestep of this step (first of the batch)
    grad_norm: float          # ‖w(t)(eps_cfg - eps_phi)‖
    extras: dict[str, float] = field(default_factory=dict)  # e.g. regularisers, render resolution
    phi_drift: float | None = None  # ‖eps_phi - eps_prior‖ / ‖eps_prior‖ (see distill.StepResult); None for SDS

    @classmethod
    def of(cls, step: int, total: int, result, extras: dict[str, float] | None = None) -> "StepInfo":
        """From a :class:`~asd_engine.distill.StepResult`."""
        return cls(step, total, result.generator_loss.item(), None if result.phi_loss is None else result.phi_loss.item(),
                   int(result.t[0]), result.grad_norm, extras or {}, result.phi_drift)


class DistillationRun:
    """Base of the 2D and 3D runs. Subclasses set ``kind`` and implement ``_build``, ``train_step``,
    ``generator_state``/``load_generator_state``; they create ``self.optimizer`` for θ."""

    kind = "run"
    config_class: type = object

    def __init__(self, config, prior: DiffusionPrior | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, phi_prior: DiffusionPrior | None = None) -> None:
        config.validate()
        if prior is None:
            if config.model is None:  # the embedded toy prior is the default everywhere
                from .toy_prior import default_prior_path

                config.model = str(default_prior_path())
            device = resolve_device(device)
            if dtype is None:
                dtype = resolve_precision(config.precision, device)
            prior = load_prior(config.model, device=device, dtype=dtype, prediction_type=config.prediction_type)
        # Every value the user left open comes from the prior's own recipe, once, here; the config then holds
        # concrete values (stored in checkpoints, so a resumed run keeps them) and says which ones were filled.
        config.from_recipe = sorted(set(config.from_recipe) | set(resolve_recipe(config, prior.recipe)))
        config.validate()
        prior.set_memory_options(attention_slicing=config.attention_slicing, vae_checkpointing=config.vae_checkpointing)
        self.config, self.prior, self.step = config, prior, 0
        self.losses: dict[str, list[float]] = {"loss": [], "phi_loss": []}  # per step; kept in checkpoints
        torch.manual_seed(config.seed)  # peft's LoRA init draws from the global RNG
        self.rng = torch.Generator().manual_seed(config.seed)  # every random draw of the run comes from here
        self._build()
        if config.distill.uses_phi:
            if phi_prior is None and config.phi_model:
                phi_prior = load_prior(config.phi_model, device=prior.device, dtype=prior.dtype,
                                                input_name="--phi-model")
            if phi_prior is not None:
                prior.check_shares_space(phi_prior, "--phi-model")
        self.phi = (build_discriminator(phi_prior or prior, config.prompt, config.phi, with_camera=self.has_cameras)
                    if config.distill.uses_phi else None)

    has_cameras = False

    def _build(self) -> None:
        raise NotImplementedError

    def train_step(self) -> StepInfo:
        raise NotImplementedError

    def generator_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_generator_state(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def preview(self) -> torch.Tensor:
        """A small picture of the current state ``[1, 3, H, W]`` in [0, 1] (progress previews)."""
        raise NotImplementedError

    def run(self, on_step: Callable[[StepInfo], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> int:
        """Run until ``config.steps``. ``should_stop`` is polled between steps (never mid-step, so a checkpoint
        taken after a stop is consistent). Returns the number of steps done."""
        while self.step < self.config.steps:
            if should_stop is not None and should_stop():
                break
            info = self.train_step()
            self.losses["loss"].append(info.generator_loss)
            if info.phi_loss is not None:
                self.losses["phi_loss"].append(info.phi_loss)
            if on_step is not None:
                on_step(info)
        return self.step

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        tensors: dict[str, torch.Tensor] = {"rng_state": self.rng.get_state()}
        tensors.update({f"generator.{k}": v for k, v in self.generator_state().items()})
        optim_tensors, optim_meta = ckpt.optimizer_state(self.optimizer, "optimizer")
        tensors.update(optim_tensors)
        meta: dict[str, Any] = {"kind": self.kind, "step": self.step, "config": dataclasses.asdict(self.config),
                                "optimizer": optim_meta, "losses": self.losses}
        if self.phi is not None:
            tensors.update({f"phi.{k}": v for k, v in self.phi.state_tensors().items()})
            phi_tensors, meta["phi_optimizer"] = ckpt.optimizer_state(self.phi.optimizer, "phi_optimizer")
            tensors.update(phi_tensors)
        return ckpt.save_checkpoint(directory, tensors, meta)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, overrides: dict[str, Any] | None = None,
                        prior: DiffusionPrior | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, phi_prior: DiffusionPrior | None = None):
        """Rebuild a run from its checkpoint; ``overrides`` may change ``steps`` (the new total)."""
        tensors, meta = ckpt.load_checkpoint(directory)
        if meta.get("kind") != cls.kind:
            raise UserInputError("--resume", f"'{directory}' is a {meta.get('kind')} checkpoint",
                                 f"resume a {cls.kind} run from one of its own checkpoints")
        saved = official_where_absent(meta["config"], cls.config_class)
        data = {**cls.config_class.older_values, **saved, **(overrides or {})}
        run = cls(config_from_dict(cls.config_class, data), prior=prior, device=device, dtype=dtype,
                  phi_prior=phi_prior)
        if meta["step"] > run.config.steps:
            raise UserInputError("--steps", f"the checkpoint is already at step {meta['step']}",
                                 f"use --steps ≥ {meta['step']} (the total, not the number of extra steps)")
        run.load_generator_state({k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")})
        ckpt.load_optimizer_state(run.optimizer, tensors, meta["optimizer"], "optimizer")
        if run.phi is not None:
            run.phi.load_state_tensors({k[len("phi."):]: v for k, v in tensors.items() if k.startswith("phi.")})
            ckpt.load_optimizer_state(run.phi.optimizer, tensors, meta["phi_optimizer"], "phi_optimizer")
        run.rng.set_state(tensors["rng_state"])
        run.step = int(meta["step"])
        run.losses = {name: list(meta.get("losses", {}).get(name, [])) for name in run.losses}
        return run
