"""Image files ↔ tensors (float ``[B, 3, H, W]`` in [0, 1]); PNGs are written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserInputError


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` or ``[1, 3, H, W]`` in [0, 1] → 8-bit RGB PIL image (round to nearest)."""
    if image.dim() == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG via a temporary file and a rename (no half-written files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    to_pil(image).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL image → ``[1, 3, H, W]`` float in [0, 1] (the inverse of :func:`to_pil`)."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float().div(255.0).unsqueeze(0)


def read_png(path: str | os.PathLike) -> torch.Tensor:
    """An image file as it is (no crop, no resize) → ``[1, 3, H, W]`` in [0, 1]."""
    with Image.open(path) as img:
        return from_pil(img)


def load_image(path: str | os.PathLike, size: int, input_name: str = "references") -> torch.Tensor:
    """Read an image file, centre-crop to a square and resize to ``size`` → ``[1, 3, size, size]`` in [0, 1]."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UserInputError(input_name, f"cannot read image '{path}' ({exc})", "give a PNG/JPEG/WEBP file") from None
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return from_pil(img)


def srgb_to_linear(colours: np.ndarray) -> np.ndarray:
    """Display (sRGB-encoded) colours in [0, 1] → linear light, the IEC 61966-2-1 curve. glTF's COLOR_0 and
    ComfyUI's MESH ``vertex_colors`` are linear, while renders (and so the colour field) are sRGB. Any shape; an
    alpha channel must be split off first."""
    c = np.clip(np.asarray(colours, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)

