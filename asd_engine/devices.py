"""The one place that decides which torch device the engine uses.

Inside ComfyUI the node pack installs ComfyUI's own device choice (``comfy.model_management.get_torch_device``)
with :func:`set_device_provider`, so the engine follows ``--cpu``, ``--directml`` etc. without importing ComfyUI.
Outside the host the default is CUDA when available, then Apple MPS, then the CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

_provider: Callable[[], torch.device] | None = None


def set_device_provider(provider: Callable[[], torch.device] | None) -> None:
    """Install a function that returns the device to use (``None`` restores the default choice)."""
    global _provider
    _provider = provider


def default_device() -> torch.device:
    """The device new engine objects go to unless a caller names one."""
    if _provider is not None:
        return torch.device(_provider())
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` → :func:`default_device`; anything else is taken as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    return torch.device(device)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The frozen models' dtype: ``auto`` is fp16 on CUDA (as Stable Diffusion runs there) and fp32 elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return PRECISIONS[precision]
