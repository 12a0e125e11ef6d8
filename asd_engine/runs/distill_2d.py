"""2D distillation: optimise one image with SDS / VSD / ASD from a diffusion prior.

Data flow of one step (Alg. 1 with a trivial "renderer"): ``x0 = image(θ)`` → :func:`distill.distill_step`
(updates φ, returns the generator's surrogate loss) → backward → Adam step on θ.

:class:`Distill2D` is the library entry point used by the CLI and the ComfyUI nodes; the step loop, callbacks and
exact checkpoints come from :class:`asd_engine.runs.base.DistillationRun`.
"""

from __future__ import annotations

import torch

from ..distill import Conditioning, distill_step
from ..errors import UserInputError
from ..images import load_image
from ..prior.memory import check_image_memory
from .base import DistillationRun, StepInfo, lr_factor
from .configs import DEFAULT_LR, Distill2DConfig
from .image_generator import ImageGenerator


class Distill2D(DistillationRun):
    """A 2D distillation run. ``prior`` may be passed in (e.g. shared between nodes); otherwise it is loaded."""

    kind = "distill-2d"
    config_class = Distill2DConfig

    def _build(self) -> None:
        config, prior = self.config, self.prior
        if config.size is None:
            config.size = prior.native_size
        prior.check_image_size(config.size)
        check_image_memory(config.size, prior, config.parameterization)  # before θ is allocated
        self.image = ImageGenerator(prior, config.size, config.parameterization, self.rng, config.background,
                                    config.jitter)
        self.base_lr = config.lr if config.lr is not None else DEFAULT_LR[config.parameterization]
        self.optimizer = torch.optim.Adam(self.image.parameters(), lr=self.base_lr)
        self.conditioning = Conditioning(cond=prior.encode_prompt([config.prompt]),
                                         uncond=prior.encode_prompt([config.negative_prompt]))
        self.references = None
        if config.references:
            with torch.no_grad():
                images = torch.cat([load_image(p, config.size) for p in config.references])
                self.references = prior.encode_images(images, sample=False)  # [R, C, h, w], posterior means

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
        for group in self.optimizer.param_groups:  # a function of the step alone: nothing to checkpoint
            group["lr"] = self.base_lr * lr_factor(self.step, self.config.steps, self.config.lr_decay_to,
                                                   start=self.lr_falls_from())
        self.optimizer.step()
        self.step += 1
        return StepInfo.of(self.step, self.config.steps, result)

    @torch.no_grad()
    def images(self) -> torch.Tensor:
        """Current image ``[1, 3, size, size]`` in [0, 1]."""
        return self.image.images()

    def preview(self) -> torch.Tensor:
        return self.images()

    def generator_state(self) -> dict[str, torch.Tensor]:
        return {"image": self.image.param}

    def load_generator_state(self, tensors: dict[str, torch.Tensor]) -> None:
        image = tensors.get("image")
        if image is None:
            raise UserInputError("resume", "the checkpoint holds no 2D image ('generator.image'): the state of "
                                 "another kind of run", "resume a distill-2d run from one of its own checkpoints")
        if image.shape != self.image.param.shape:  # copy_ would broadcast some wrong shapes without a word
            raise UserInputError("resume", f"the checkpoint's image is {tuple(image.shape)}, its settings ({{=size}} "
                                 f"{self.config.size}, {{=parameterization}} {self.config.parameterization}, the "
                                 f"model's space) make {tuple(self.image.param.shape)}",
                                 "use an intact checkpoint folder (this one was edited or damaged), or start a new run")
        with torch.no_grad():
            self.image.param.copy_(image.to(self.image.param.device))
