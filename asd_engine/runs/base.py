"""What every distillation run shares: the prior, φ, one RNG, a step counter, the step loop and exact checkpoints.

A run is built from a config dataclass (stored verbatim in its checkpoints). Subclasses (:class:`Distill2D`,
:class:`TextTo3D`) add their generator θ, its optimiser and ``train_step``; this base class owns everything else,
so that resuming works the same way for 2D and 3D: a run resumed from step k reproduces a straight run bit for bit
on the same machine.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..devices import resolve_device, resolve_precision
from ..errors import TrainingDiverged, UserInputError
from ..prior import default_prior_path
from ..prior.diffusion import DiffusionPrior
from ..prior.discriminator import build_discriminator
from ..prior.loading import load_prior
from ..scene.field import runnable_backend
from . import checkpoint as ckpt, settings
from .configs import config_from_dict


def lr_factor(step: int, steps: int, decay_to: float, start: int = 0) -> float:
    """The generator's learning-rate factor at 0-based ``step``: 1 up to ``start``, then a cosine down to ``decay_to``
    at step ``steps`` (the last step is ``steps - 1``). 2D falls over the whole run; 3D from its second phase
    (``t_anneal_step``), since the first phase makes the shape at the full rate (docs/engine.md#lr-decay-3d)."""
    if step < start:
        return 1.0
    span = steps - start
    fraction = min((step - start) / span, 1.0) if span > 0 else 1.0
    return decay_to + (1.0 - decay_to) * 0.5 * (1.0 + math.cos(math.pi * fraction))


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

    def lr_falls_from(self) -> int:
        """The step from which the generator's learning rate falls (:func:`lr_factor`'s ``start``): 2D from step 0."""
        return 0

    def __init__(self, config, prior: DiffusionPrior | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, phi_prior: DiffusionPrior | None = None) -> None:
        if prior is None:
            if config.model is None:  # the embedded toy prior is the default everywhere
                config.model = str(default_prior_path())
            device = resolve_device(device)
            prior = load_prior(config.model, device=device, prediction_type=config.prediction_type,
                               dtype=dtype or resolve_precision(config.precision, device), input_name="model")
        if config.from_recipe is None:  # not planned (runs.plan resolves): a library caller's config
            settings.resolve(config, prior.recipe, prior.native_size)
        prior.set_memory_options(attention_slicing=config.attention_slicing, vae_checkpointing=config.vae_checkpointing)
        self.config, self.prior, self.step = config, prior, 0
        self.losses: dict[str, list[float]] = {"loss": [], "phi_loss": []}  # per step; kept in checkpoints
        torch.manual_seed(config.seed)  # peft's LoRA init draws from the global RNG
        self.rng = torch.Generator().manual_seed(config.seed)  # every random draw of the run comes from here
        self._build()
        if config.distill.uses_phi:
            if phi_prior is None and config.phi_model:
                phi_prior = load_prior(config.phi_model, device=prior.device, dtype=prior.dtype,
                                       input_name="phi_model")
            if phi_prior is not None:
                prior.check_shares_space(phi_prior, "phi_model")
        for model in (prior, phi_prior):  # fingerprint the weights before φ's adapter joins the UNet's tensors
            if model is not None and config.distill.uses_phi:
                model.fingerprint()
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
            for name, value in (("the generator's loss", info.generator_loss), ("φ's loss", info.phi_loss)):
                if value is not None and not math.isfinite(value):
                    raise TrainingDiverged(self.step, f"{name} is {value}")
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
        phi_prior = self.phi.prior if self.phi is not None else None
        # the weights' fingerprints let a resume recognise the models wherever they have moved since
        meta: dict[str, Any] = {"kind": self.kind, "step": self.step, "config": dataclasses.asdict(self.config),
                                "optimizer": optim_meta, "losses": self.losses,
                                "fingerprints": ckpt.fingerprints(self.prior, phi_prior)}
        if self.phi is not None:
            tensors.update({f"phi.{k}": v for k, v in self.phi.state_tensors().items()})
            phi_tensors, meta["phi_optimizer"] = ckpt.optimizer_state(self.phi.optimizer, "phi_optimizer")
            tensors.update(phi_tensors)
        for name, tensor in tensors.items():  # a checkpoint is what a resume trusts: never write a diverged state
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingDiverged(self.step, f"{name} holds non-finite values")
        return ckpt.save_checkpoint(directory, tensors, meta)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, overrides: dict[str, Any] | None = None,
                        prior: DiffusionPrior | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, phi_prior: DiffusionPrior | None = None,
                        input_name: str = "resume"):
        """Rebuild a run from its checkpoint; ``overrides`` may change ``steps`` (the new total). The checkpoint is
        untrusted input: a damaged or mismatched one is a :class:`UserInputError` naming ``input_name``."""
        tensors, meta = ckpt.load_checkpoint(directory, input_name=input_name, run=True)
        if meta["kind"] != cls.kind:
            raise UserInputError(input_name, f"'{directory}' is a {meta['kind']} checkpoint",
                                 f"resume a {cls.kind} run from one of its own checkpoints")
        ckpt.check_config(cls.config_class, meta["config"], directory, input_name)
        saved = settings.official_where_absent(meta["config"], cls.config_class)
        data = {**cls.config_class.older_values, **saved, **(overrides or {})}
        config = config_from_dict(cls.config_class, data)
        if hasattr(config, "nerf_field"):  # trained with the Warp kernels, resumed where Warp is not installed
            config.nerf_field.backend = runnable_backend(config.nerf_field.backend)
        if config.from_recipe is None:
            config.from_recipe = []  # stored settings are concrete: nothing is left for the recipe
        settings.validate(config)  # a checkpoint is input like any other
        if meta["step"] > config.steps:
            raise UserInputError("steps", f"the checkpoint is already at step {meta['step']}",
                                 f"use {{=steps}} ≥ {meta['step']} (the total, not the number of extra steps)")
        for role, given in (("model", prior), ("phi_model", phi_prior)):
            if given is not None and ckpt.weights_match(meta, role, given):
                setattr(config, role, str(given.source))  # the same weights, perhaps moved: record where they are
        with ckpt.built_from(directory, input_name, "a run"):
            run = cls(config, prior=prior, device=device, dtype=dtype, phi_prior=phi_prior)
        try:  # a run that cannot take the checkpoint's state must not leave φ's adapter in a shared prior
            generator = {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")}
            expected = run.generator_state()
            why = ckpt.state_mismatch(expected, generator, shapes_only=True)  # copy_ would broadcast a wrong shape
            if why is None:
                try:
                    run.load_generator_state(generator)
                except UserInputError:
                    raise
                except (RuntimeError, KeyError, ValueError) as exc:
                    why = ckpt.state_mismatch(expected, generator) or " ".join(str(exc).split())
            if why is not None:
                raise ckpt.state_does_not_fit(directory, input_name, why)
            ckpt.load_optimizer_state(run.optimizer, tensors, meta["optimizer"], "optimizer", input_name)
            if run.phi is not None:
                if "phi_optimizer" not in meta:
                    raise ckpt.state_does_not_fit(directory, input_name, "it has no φ, and its method needs one")
                run.phi.load_state_tensors({k[len("phi."):]: v for k, v in tensors.items() if k.startswith("phi.")})
                ckpt.load_optimizer_state(run.phi.optimizer, tensors, meta["phi_optimizer"], "phi_optimizer",
                                          input_name)
            try:
                run.rng.set_state(tensors["rng_state"])
            except (KeyError, RuntimeError, TypeError) as exc:
                raise ckpt.state_does_not_fit(directory, input_name,
                                              f"no valid rng_state ({type(exc).__name__})") from None
        except BaseException:
            if run.phi is not None and hasattr(run.phi, "remove"):  # textual inversion adds nothing to the prior
                run.phi.remove()
            raise
        run.step = meta["step"]
        run.losses = {name: list(meta.get("losses", {}).get(name, [])) for name in run.losses}
        saved_total = meta["config"].get("steps")
        if config.lr_decay_to != 1.0 and run.lr_falls_from() < run.step < config.steps and saved_total != config.steps:
            # the learning rate falls along a cosine to the total: a new total re-plans the rest of it
            done = "step 1 followed" if run.step == 1 else f"steps 1-{run.step} followed"
            rest = (f"step {config.steps} follows" if config.steps == run.step + 1
                    else f"steps {run.step + 1}-{config.steps} follow")
            warnings.warn(f"the learning rate's schedule is re-planned: {done} the cosine of a {saved_total}-step run "
                          f"and {rest} that of a {config.steps}-step run, so the result differs from a straight "
                          f"{config.steps}-step run (a constant learning rate extends exactly)",
                          ckpt.ResumeNotice, stacklevel=2)
        if (getattr(config, "blob_fade", False) and config.distill.t_anneal_step is None and saved_total != config.steps
                and 0 < run.step < config.steps):
            # without a second phase the 3D seed ball fades over the total: a new total re-plans the fade
            warnings.warn(f"the seed ball's fade is re-planned: it faded over a {saved_total}-step run and now fades "
                          f"over a {config.steps}-step run (it never grows back), so the result differs from a "
                          f"straight {config.steps}-step run", ckpt.ResumeNotice, stacklevel=2)
        return run
