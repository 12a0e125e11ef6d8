"""How much memory a 2D run's image needs, checked against what the device has free before any long work starts.

The estimate is a floor, not a forecast: the image θ with its gradient and Adam's two moments, and the largest
activations a step or a decode of that image cannot avoid (the VAE decoder's full-resolution feature maps, the
encoder's saved activations when θ is pixels, the UNet's first-level feature maps of the classifier-free-guidance
batch). Real peaks are higher, so a size refused here could never have run; a size let through may still run out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import UserInputError
from .diffusion import DiffusionPrior

GB = 1024 ** 3
COMMON_SIZES = (64, 128, 256, 512, 768, 1024, 1536, 2048, 4096)  # what a refusal may suggest instead


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a ``size`` × ``size`` 2D run needs at least, by what needs them."""

    size: int
    image_bytes: int        # θ, its gradient and Adam's two moments (fp32)
    activation_bytes: int   # the largest activations of one step or one decode (the prior's precision)

    @property
    def total(self) -> int:
        return self.image_bytes + self.activation_bytes

    def describe(self) -> str:
        return (f"at least {_gb(self.total)} (the image and its optimiser state {_gb(self.image_bytes)}, "
                f"activations {_gb(self.activation_bytes)})")


def _gb(n: float) -> str:
    for unit, scale in (("TB", 1024 * GB), ("GB", GB), ("MB", 1024 ** 2)):
        if n >= 0.1 * scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n / 1024 ** 2:.2g} MB"


def image_memory_estimate(size: int, prior: DiffusionPrior, parameterization: str = "latent") -> MemoryEstimate:
    """A floor on the memory a 2D run of ``size`` px on ``prior`` needs (``parameterization``: "latent" or
    "pixel", as :class:`~asd_engine.runs.image_generator.ImageGenerator`)."""
    element = torch.finfo(prior.dtype).bits // 8
    channels, side, _ = prior.sample_shape(size)
    encodes = parameterization == "pixel" and prior.latent_space
    theta = (3 * size * size if encodes else channels * side * side) * 4 * 4  # value, grad, Adam m and v; fp32
    unet = prior.unet.config
    # CFG batch of 2, three live maps (input, normalised, convolved) of the UNet's first level at the model's side
    activations = [2 * 3 * unet.block_out_channels[0] * side * side * element]
    if prior.vae is not None:
        vae = prior.vae.config
        widest_full = vae.block_out_channels[min(1, len(vae.block_out_channels) - 1)]
        # decoding: the last up block's upsampled input and two of its maps at full resolution
        activations.append(3 * widest_full * size * size * element)
        if encodes:  # pixels → latents with gradients: every full-resolution map of the encoder is kept for backward
            activations.append((2 + 4 * vae.layers_per_block) * vae.block_out_channels[0] * size * size * element)
    return MemoryEstimate(size, theta, max(activations))


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for this process on ``device``: CUDA's free memory plus what PyTorch's cache holds unused; the
    system's available RAM on a CPU; None where it cannot be told (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:  # not a dependency: POSIX's count of free pages is a lower bound of what is available
            try:
                return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
            except (ValueError, OSError, AttributeError):
                return None
    return None


def check_image_memory(size: int, prior: DiffusionPrior, parameterization: str = "latent",
                       input_name: str = "size") -> MemoryEstimate:
    """Refuse a 2D ``size`` whose :func:`image_memory_estimate` exceeds the free memory of the prior's device."""
    estimate = image_memory_estimate(size, prior, parameterization)
    free = available_memory(prior.device)
    if free is not None and estimate.total > free:
        fits = [s for s in (prior.native_size, *COMMON_SIZES) if s < size and prior._fits(s)
                and image_memory_estimate(s, prior, parameterization).total <= free]
        hint = "" if not fits else f" (the model's own {fits[0]} px)" if fits[0] == prior.native_size else \
            f" (e.g. {max(fits)} px)"
        fix = "use a smaller {=size}" + hint + \
            (", or a machine with more memory" if prior.device.type == "cpu" else ", or a GPU with more memory")
        raise UserInputError(input_name, f"{size} px needs {estimate.describe()}, but {prior.device} has "
                             f"{_gb(free)} free", fix)
    return estimate
