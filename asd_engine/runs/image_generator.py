"""What score distillation optimises (θ in the paper). 2D: one image; the NeRF generator lives beside it.

2D parameterisation (``ImageGenerator``):
- ``"latent"`` (default for latent models): θ *is* the model-space tensor ``x0``. No VAE pass per step, so a step
  costs only the UNet calls the method needs (the VAE decodes previews and the final image). This is how
  DreamFusion/ProlificDreamer-style 2D playgrounds distil from Stable Diffusion, and it keeps the benchmark's
  "step time ÷ UNet time" ratio honest.
- ``"pixel"``: θ is an RGB image encoded by the VAE (with gradients through the encoder) every step — exactly the
  path a NeRF render takes, so it is the 2D stand-in for the 3D pipeline. Costs one encoder pass forward+backward.
For a pixel-space prior (no VAE) both coincide: θ is the image in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserInputError
from ..prior.diffusion import DiffusionPrior

PARAMETERIZATIONS = ("latent", "pixel")


class ImageGenerator(nn.Module):
    """One image optimised directly. ``forward(rng) → x0 [1, C, h, w]`` in the prior's model space, rolled (with
    wrap-around) by a random shift of up to ``jitter`` model-space pixels along each axis when ``jitter > 0``: the 2D
    stand-in for the new camera a 3D render gets every step (why: docs/engine.md#recipe-jitter_2d).
    The gradient of a roll is the opposite roll, so every pixel of the image is still trained."""

    def __init__(self, prior: DiffusionPrior, size: int, parameterization: str, rng: torch.Generator,
                 background: str = "random", jitter: int = 0) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise UserInputError("parameterization", f"unknown parameterisation '{parameterization}'",
                                 f"use one of {', '.join(PARAMETERIZATIONS)}")
        self.prior = prior
        self.encodes = parameterization == "pixel" and prior.latent_space
        # Pixels start as the background the prior saw (its recipe): mid-grey for "random" (SD saw everything), white
        # for the toy prior, whose training images are a shape on white; any other start is read as object and
        # grows into a frame-filling one. A little noise breaks the symmetry.
        start = {"random": 0.5, "white": 1.0, "black": 0.0}[background]
        if self.encodes:  # RGB in [0, 1]
            init = start + 0.1 * torch.randn((1, 3, size, size), generator=rng)
        elif prior.latent_space:  # VAE latents: unit Gaussian, what the diffusion model calls pure noise
            init = torch.randn((1, *prior.sample_shape(size)), generator=rng)
        else:  # pixel-space prior ([-1, 1]): the same start as above; a unit Gaussian would be a noise image with a
            # third of its pixels beyond the clip range, and the residue shows as salt-and-pepper
            init = (2.0 * start - 1.0) + 0.2 * torch.randn((1, *prior.sample_shape(size)), generator=rng)
        self.param = nn.Parameter(init.to(prior.device))
        self.jitter = jitter

    def forward(self, rng: torch.Generator | None = None) -> torch.Tensor:
        x0 = self.prior.encode_images(self.param, generator=rng) if self.encodes else self.param
        if self.jitter > 0:  # no draw at 0, so runs without jitter keep their random stream
            shift = torch.randint(-self.jitter, self.jitter + 1, (2,), generator=rng).tolist()
            x0 = torch.roll(x0, shifts=shift, dims=(-2, -1))
        return x0

    @torch.no_grad()
    def images(self) -> torch.Tensor:
        """The current image ``[1, 3, H, W]`` in [0, 1]."""
        if self.encodes:
            return self.param.clamp(0.0, 1.0)
        return self.prior.decode(self.param)
