"""2D distillation: optimise one image with SDS / VSD / ASD from a diffusion prior.

Data flow of one step (Alg. 1 with a trivial "renderer"): ``x0 = image(θ)`` → :func:`distill.distill_step`
(updates φ, returns the generator's surrogate loss) → backward → Adam step on θ.

:class:`Distill2D` is the library entry point used by the CLI and the ComfyUI nodes: it owns the prior, φ, the
image and the RNG, runs steps (with callbacks for progress, previews and stopping), and saves/restores exact
checkpoints: a run resumed from step k reproduces a straight run bit for bit on the same machine.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from .discriminator import PhiConfig, build_discriminator
from .distill import Conditioning, DistillConfig, distill_step
from .errors import UserInputError
from .generators import ImageGenerator
from .images import load_image
from .prior import DiffusionPrior

DEFAULT_LR = {"latent": 3e-2, "pixel": 1e-2}


@dataclass
class Distill2DConfig:
    """Everything that defines a 2D run (stored in its checkpoints)."""

    prompt: str
    model: str | None = None
    negative_prompt: str = ""
    steps: int = 500
    size: int = 512
    seed: int = 0
    parameterization: str = "latent"
    lr: float | None = None  # None → DEFAULT_LR[parameterization]
    references: list[str] = field(default_factory=list)
    distill: DistillConfig = field(default_factory=DistillConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)

    def validate(self) -> None:
        if not self.prompt.strip():
            raise UserInputError("--prompt", "the prompt is empty", "describe the image to distil, e.g. 'a red cube'")
        if self.steps <= 0:
            raise UserInputError("--steps", f"{self.steps} is not a positive step count", "use an integer ≥ 1")
        if self.size <= 0 or self.size % 8:
            raise UserInputError("--size", f"{self.size} px is not a positive multiple of 8",
                                 "use e.g. 512 for Stable Diffusion (64 or 32 for tiny models)")
        if self.lr is not None and self.lr <= 0:
            raise UserInputError("--lr", f"{self.lr} is not a positive learning rate", "use e.g. 0.03")
        self.distill.validate()
        if self.distill.uses_phi:
            self.phi.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Distill2DConfig":
        data = dict(data)
        data["distill"] = DistillConfig(**data.get("distill", {}))
        data["phi"] = PhiConfig(**data.get("phi", {}))
        return cls(**data)


@dataclass
class StepInfo:
    """What a callback sees after each step."""

    step: int                 # steps done so far
    total: int
    generator_loss: float
    phi_loss: float | None
    t: int                    # generator timestep of this step
    grad_norm: float


class Distill2D:
    """A 2D distillation run. ``prior`` may be passed in (e.g. shared between nodes); otherwise it is loaded."""

    def __init__(self, config: Distill2DConfig, prior: DiffusionPrior | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        config.validate()
        if prior is None:
            if config.model is None:
                raise UserInputError("--model", "no model given", "give a diffusers pipeline folder")
            prior = DiffusionPrior.from_pretrained(config.model, device=device, dtype=dtype)
        prior.check_image_size(config.size)
        self.config, self.prior, self.step = config, prior, 0
        torch.manual_seed(config.seed)  # peft's LoRA init draws from the global RNG
        self.rng = torch.Generator().manual_seed(config.seed)  # every random draw of the run comes from here
        self.image = ImageGenerator(prior, config.size, config.parameterization, self.rng)
        lr = config.lr if config.lr is not None else DEFAULT_LR[config.parameterization]
        self.optimizer = torch.optim.Adam(self.image.parameters(), lr=lr)
        self.phi = build_discriminator(prior, config.prompt, config.phi) if config.distill.uses_phi else None
        self.conditioning = Conditioning(cond=prior.encode_prompt([config.prompt]),
                                         uncond=prior.encode_prompt([config.negative_prompt]))
        self.references = None
        if config.references:
            with torch.no_grad():
                images = torch.cat([load_image(p, config.size) for p in config.references])
                self.references = prior.encode_images(images, sample=False)  # [R, C, h, w], posterior means

    # ---------------------------------------------------------------- training
    def train_step(self) -> StepInfo:
        """One step of Alg. 1; returns its losses."""
        reference = None
        if self.references is not None:
            index = int(torch.randint(len(self.references), (1,), generator=self.rng))
            reference = self.references[index:index + 1]
        x0 = self.image(self.rng)
        result = distill_step(x0, self.prior, self.phi, self.conditioning, self.config.distill, self.step,
                              self.rng, reference=reference)
        self.optimizer.zero_grad(set_to_none=True)
        result.generator_loss.backward()
        self.optimizer.step()
        self.step += 1
        return StepInfo(self.step, self.config.steps, result.generator_loss.item(),
                        None if result.phi_loss is None else result.phi_loss.item(), int(result.t[0]),
                        result.grad_norm)

    def run(self, on_step: Callable[[StepInfo], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> int:
        """Run until ``config.steps``. ``should_stop`` is polled between steps (never mid-step, so a checkpoint
        taken after a stop is consistent). Returns the number of steps done."""
        while self.step < self.config.steps:
            if should_stop is not None and should_stop():
                break
            info = self.train_step()
            if on_step is not None:
                on_step(info)
        return self.step

    @torch.no_grad()
    def images(self) -> torch.Tensor:
        """Current image ``[1, 3, size, size]`` in [0, 1]."""
        return self.image.images()

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        tensors: dict[str, torch.Tensor] = {"image.param": self.image.param, "rng_state": self.rng.get_state()}
        optim_tensors, optim_meta = ckpt.optimizer_state(self.optimizer, "image_optimizer")
        tensors.update(optim_tensors)
        meta: dict[str, Any] = {"kind": "distill-2d", "step": self.step, "config": self.config.to_dict(),
                                "image_optimizer": optim_meta}
        if self.phi is not None:
            tensors.update({f"phi.{k}": v for k, v in self.phi.state_tensors().items()})
            phi_tensors, meta["phi_optimizer"] = ckpt.optimizer_state(self.phi.optimizer, "phi_optimizer")
            tensors.update(phi_tensors)
        return ckpt.save_checkpoint(directory, tensors, meta)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, overrides: dict[str, Any] | None = None,
                        prior: DiffusionPrior | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> "Distill2D":
        """Rebuild a run from its checkpoint; ``overrides`` may change ``steps`` (the new total)."""
        tensors, meta = ckpt.load_checkpoint(directory)
        if meta.get("kind") != "distill-2d":
            raise UserInputError("--resume", f"'{directory}' is a {meta.get('kind')} checkpoint",
                                 "resume a 2D run from a distill-2d checkpoint")
        data = meta["config"]
        data.update(overrides or {})
        run = cls(Distill2DConfig.from_dict(data), prior=prior, device=device, dtype=dtype)
        if meta["step"] > run.config.steps:
            raise UserInputError("--steps", f"the checkpoint is already at step {meta['step']}",
                                 f"use --steps ≥ {meta['step']} (the total, not the number of extra steps)")
        with torch.no_grad():
            run.image.param.copy_(tensors["image.param"].to(run.image.param.device))
        ckpt.load_optimizer_state(run.optimizer, tensors, meta["image_optimizer"], "image_optimizer")
        if run.phi is not None:
            run.phi.load_state_tensors({k[len("phi."):]: v for k, v in tensors.items() if k.startswith("phi.")})
            ckpt.load_optimizer_state(run.phi.optimizer, tensors, meta["phi_optimizer"], "phi_optimizer")
        run.rng.set_state(tensors["rng_state"])
        run.step = int(meta["step"])
        return run
