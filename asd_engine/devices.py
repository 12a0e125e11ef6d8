"""The one place that decides which torch device the engine uses.

Inside ComfyUI the node pack installs ComfyUI's own device choice (``comfy.model_management.get_torch_device``)
with :func:`set_device_provider`, so the engine follows ``--cpu``, ``--directml`` etc. without importing ComfyUI,
and its dtype policy for frozen diffusion models with :func:`set_precision_provider` (``--force-fp32``,
``--bf16-unet``, ...). Outside the host the default is CUDA when available, then Apple MPS, then the CPU, and "auto"
precision is fp16 on CUDA, fp32 elsewhere.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UserInputError

_provider: Callable[[], torch.device] | None = None
_precision_provider: Callable[[torch.device], torch.dtype] | None = None


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


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")  # what the engine trains on; "meta", "hpu", ... are torch's but not ours


def check_device(text: str | None) -> torch.device:
    """A device a user typed (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``) → the device, checked to exist here, so
    a wrong one is refused with one line before any model is loaded; raises a :class:`UserInputError` naming
    ``device``."""
    if text is None or text == "auto":
        return default_device()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UserInputError("device", f"'{text}' is not a torch device",
                             "use {=device} auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in DEVICE_TYPES:
        raise UserInputError("device", f"the engine does not run on '{device.type}' devices",
                             "use {=device} auto, cpu, cuda, cuda:N or mps")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        why = " (this torch is built without CUDA)" if device.type == "cuda" and torch.version.cuda is None else ""
        raise UserInputError("device", f"{device.type} is not available on this machine{why}",
                             "use {=device} cpu, or {=device} auto to take the best device there is")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise UserInputError("device", f"there is no {device.type}:{device.index} (this machine has {count})",
                             f"use {{=device}} {device.type}:0{f' … {device.type}:{count - 1}' if count > 1 else ''}")
    return device


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_precision_provider(provider: Callable[[torch.device], torch.dtype] | None) -> None:
    """Install a function ``device → dtype`` that decides "auto" precision (``None`` restores the default rule)."""
    global _precision_provider
    _precision_provider = provider


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The frozen models' dtype. ``auto``: the installed provider's choice (ComfyUI's policy inside the host), else
    fp16 on CUDA (as Stable Diffusion runs there) and fp32 elsewhere."""
    if precision == "auto":
        if _precision_provider is not None:
            return _precision_provider(torch.device(device))
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return PRECISIONS[precision]
