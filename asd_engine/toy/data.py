"""Procedural ground truth: analytic shapes × named colours rendered from the NeRF trainer's own cameras.

This is what the embedded toy prior is trained on and what the quality harness measures against. Every image is
an exact render of a known 3D scene — a shape centred at the origin, Lambert-shaded by a fixed world light (so
its appearance does not depend on the view, like the NeRF's colour field), on a white background — from a camera
drawn by :func:`asd_engine.scene.cameras.sample_cameras` with the trainer's :class:`CameraRanges` (z-up, front = +x).
Captions use the same view words and thresholds as the view-dependent prompts: ``"a red cube, side view"``; the
elevation above which a view is "overhead" is the prior's own (its recipe's ``overhead_elevation``).
Everything is a deterministic function of a seed; nothing is stored in the repository.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..prior.prompts import VIEW_SUFFIX
from ..scene.cameras import (MAX_ELEVATION_DEGREES, MIN_ELEVATION_DEGREES, OVERHEAD_DEGREES, VIEWS, CameraRanges,
                             Cameras, orbit_cameras, sample_cameras)
from ..scene.render import ray_box

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus")
COLOURS = {  # albedo (linear RGB in [0, 1])
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.30, 0.85),
    "yellow": (0.95, 0.82, 0.15), "purple": (0.55, 0.20, 0.75), "orange": (0.95, 0.50, 0.08),
}
LIGHT = (0.6, 0.3, 0.9)      # world-space direction towards the light
AMBIENT = 0.45
BACKGROUND = 1.0             # white


def shape_sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance ``[N]`` of points ``[N, 3]`` to ``shape`` (sizes fit the NeRF's initial blob, |p| ≲ 0.5)."""
    x, y, z = p.unbind(-1)
    if shape == "sphere":
        return p.norm(dim=-1) - 0.42
    if shape == "cube":
        q = p.abs() - 0.30
        return q.clamp_min(0).norm(dim=-1) + q.amax(-1).clamp_max(0) - 0.02  # slightly rounded edges
    radial = torch.sqrt(x * x + y * y)
    if shape == "cylinder":
        d = torch.stack([radial - 0.30, z.abs() - 0.38], dim=-1)
        return d.clamp_min(0).norm(dim=-1) + d.amax(-1).clamp_max(0)
    if shape == "cone":  # base radius 0.40 at z = -0.38, apex at z = +0.38 (a capped cone with top radius 0)
        h, r1 = 0.38, 0.40
        qx, qy = radial, z
        ca_x = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx)))
        ca_y = qy.abs() - h
        k2x, k2y = -r1, 2 * h
        s = ((-qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)
        s = s.clamp(0, 1)
        cb_x, cb_y = qx + k2x * s, qy - h + k2y * s
        sign = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
        return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))
    if shape == "torus":
        return torch.sqrt((radial - 0.30) ** 2 + z * z) - 0.13
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


@torch.no_grad()
def render_shapes(shapes: list[str], colours: list[str], cameras: Cameras, supersample: int = 2,
                  iterations: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Sphere-trace one shape per camera → ``(images [B, 3, H, W], alpha [B, 1, H, W])`` in [0, 1].

    Rendered at ``supersample``× the cameras' resolution and box-filtered down (anti-aliasing).
    """
    b, h, w = len(cameras), cameras.height, cameras.width
    hi = cameras.with_resolution(h * supersample, w * supersample)
    origins, directions = (v.reshape(b, -1, 3) for v in hi.rays())
    light = F.normalize(torch.tensor(LIGHT), dim=0)
    colour = torch.full((b, origins.shape[1], 3), BACKGROUND)
    hit_all = torch.zeros(b, origins.shape[1], dtype=torch.bool)
    for shape in set(shapes):  # all images of one shape are traced together
        index = torch.tensor([i for i, s in enumerate(shapes) if s == shape])
        o, d = origins[index].reshape(-1, 3), directions[index].reshape(-1, 3)
        near, far = ray_box(o, d, 1.0)
        t = near.clone()
        hit = torch.zeros_like(t, dtype=torch.bool)
        for _ in range(iterations):
            distance = shape_sdf(shape, o + d * t[:, None])
            hit |= distance < 1e-3
            t = torch.where(hit, t, t + distance)
        hit &= t < far
        points = o + d * t[:, None]
        offsets = torch.eye(3) * 1e-3
        normal = F.normalize(torch.stack([shape_sdf(shape, points + offsets[k]) - shape_sdf(shape, points - offsets[k])
                                          for k in range(3)], dim=-1), dim=-1)
        shade = AMBIENT + (1 - AMBIENT) * (normal @ light).clamp_min(0)           # [n·rays]
        albedo = torch.tensor([COLOURS[colours[i]] for i in index.tolist()])     # [n, 3]
        lit = shade.view(len(index), -1, 1) * albedo[:, None, :]
        hit = hit.view(len(index), -1)
        colour[index] = torch.where(hit[..., None], lit, colour[index])
        hit_all[index] = hit
    images = colour.permute(0, 2, 1).reshape(b, 3, h * supersample, w * supersample)
    alpha = hit_all.float().view(b, 1, h * supersample, w * supersample)
    return F.avg_pool2d(images, supersample), F.avg_pool2d(alpha, supersample)


def caption(colour: str, shape: str, view: str | None) -> str:
    """``"a red cube"`` or ``"a red cube, side view"`` (the view-dependent prompts' exact suffix)."""
    return f"a {colour} {shape}" + ("" if view is None else VIEW_SUFFIX[view])


@dataclass
class ToyBatch:
    images: torch.Tensor      # [B, 3, H, W] in [0, 1]
    alpha: torch.Tensor       # [B, 1, H, W]
    captions: list[str]
    shapes: list[int]         # index into SHAPES
    colours: list[int]        # index into COLOURS
    cameras: Cameras


def data_cameras(max_elevation: float = MAX_ELEVATION_DEGREES,
                 min_elevation: float = MIN_ELEVATION_DEGREES) -> CameraRanges:
    """The cameras the toy data are drawn from (the prior's training renders, the judge's bank): the official
    distance, fov and azimuth ranges, elevations uniform in degrees, as every toy dataset so far was made."""
    return CameraRanges(min_elevation=min_elevation, max_elevation=max_elevation, elevation_sampling="degrees")


def sample_batch(batch: int, size: int, generator: torch.Generator, ranges: CameraRanges | None = None,
                 plain_caption_prob: float = 0.2, overhead_elevation: float = OVERHEAD_DEGREES) -> ToyBatch:
    """Random shapes, colours and trainer cameras; a caption without a view word with ``plain_caption_prob``, else
    the camera's view word ("overhead" above ``overhead_elevation`` degrees)."""
    cameras = sample_cameras(batch, ranges or data_cameras(), size, size, generator)
    shapes = torch.randint(len(SHAPES), (batch,), generator=generator).tolist()
    colours = torch.randint(len(COLOURS), (batch,), generator=generator).tolist()
    plain = (torch.rand(batch, generator=generator) < plain_caption_prob).tolist()
    names = list(COLOURS)
    images, alpha = render_shapes([SHAPES[s] for s in shapes], [names[c] for c in colours], cameras)
    views = cameras.view_index(overhead_degrees=overhead_elevation).tolist()
    captions = [caption(names[c], SHAPES[s], None if p else VIEWS[v])
                for s, c, p, v in zip(shapes, colours, plain, views)]
    return ToyBatch(images, alpha, captions, shapes, colours, cameras)


def _chromaticity(rgb: torch.Tensor) -> torch.Tensor:
    return rgb / rgb.sum(-1, keepdim=True).clamp_min(1e-6)


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box ``(row0, row1, col0, col1)`` (ends exclusive) of one mask ``[H, W]`` (bool); ``None`` if empty."""
    rows, cols = mask.any(1).nonzero().squeeze(-1), mask.any(0).nonzero().squeeze(-1)
    if len(rows) == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_box(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Scale-normalise silhouettes: each mask ``[B, H, W]`` (bool) cropped to the square around its bounding box
    (the longer side, centred, so aspect ratios survive: a tall cylinder stays tall) and resized to ``size``².
    Returns ``[B, size, size]`` bool; an empty mask stays empty."""
    out = torch.zeros(masks.shape[0], size, size, dtype=torch.bool)
    for i, mask in enumerate(masks):
        box = mask_box(mask)
        if box is None:
            continue
        r0, r1, c0, c1 = box
        side = max(r1 - r0, c1 - c0)
        square = torch.zeros(side, side)
        dr, dc = (side - (r1 - r0)) // 2, (side - (c1 - c0)) // 2
        square[dr:dr + r1 - r0, dc:dc + c1 - c0] = mask[r0:r1, c0:c1].float()
        out[i] = F.interpolate(square[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0] > 0.5
    return out


def foreground_masks(images: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """``images [B, 3, H, W]`` → foreground masks ``[B, H, W]``: pixels more than ``threshold`` (in any channel) from
    the image's own background, the median colour of its border. Not assumed white: a sampled image's background is
    tinted."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)
    background = border.median(dim=-1).values                             # [B, 3]
    return (images - background[:, :, None, None]).abs().amax(1) > threshold


def enclosed_holes(masks: torch.Tensor) -> torch.Tensor:
    """Foreground masks ``[B, H, W]`` → the background pixels each one encloses ``[B, H, W]`` (what filling its holes
    adds: a torus's hole, seen from above)."""
    from scipy.ndimage import binary_fill_holes  # scipy comes with scikit-image

    masks = masks.cpu()
    filled = torch.stack([torch.from_numpy(binary_fill_holes(mask.numpy())) for mask in masks])
    return filled & ~masks


class ToyJudge:
    """Tells which shape and colour an image shows, using ground-truth renders only.

    Colour: nearest *per-class mean chromaticity of true renders* (rgb / (r + g + b) of the mean foreground
    colour: white-light shading scales the albedo, which chromaticity ignores, so lit and shaded views agree). Shape: nearest neighbour (by IoU) of the binarised foreground
    mask in a bank of true masks from the trainer's camera distribution. The background is estimated from the
    image border (median), not assumed white. ``scale_normalised``: both the mask and the bank are first cropped
    to their bounding squares (:func:`crop_to_box`), so a right shape at the wrong size still counts as right.
    """

    def __init__(self, size: int = 32, bank_per_shape: int = 300, seed: int = 1234,
                 scale_normalised: bool = False) -> None:
        self.scale_normalised = scale_normalised
        g = torch.Generator().manual_seed(seed)
        masks, labels, colour_sums = [], [], torch.zeros(len(COLOURS), 3)
        counts = torch.zeros(len(COLOURS))
        names = list(COLOURS)
        for s, shape in enumerate(SHAPES):
            cams = sample_cameras(bank_per_shape, data_cameras(), size, size, g)
            cols = torch.randint(len(COLOURS), (bank_per_shape,), generator=g).tolist()
            images, alpha = render_shapes([shape] * bank_per_shape, [names[c] for c in cols], cams)
            masks.append(self._normalise(alpha[:, 0] > 0.5, size))
            labels += [s] * bank_per_shape
            for image, a, c in zip(images, alpha, cols):
                fg = a[0] > 0.5
                colour_sums[c] += _chromaticity(image[:, fg].mean(-1))
                counts[c] += 1
        self.bank = torch.cat(masks).flatten(1).float()       # [M, H·W]
        self.bank_labels = torch.tensor(labels)
        self.colour_means = colour_sums / counts[:, None]      # [C, 3]
        self.size = size

    def _normalise(self, masks: torch.Tensor, size: int) -> torch.Tensor:
        return crop_to_box(masks, size) if self.scale_normalised else masks

    def foreground(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` → foreground masks ``[B, H, W]`` (:func:`foreground_masks`)."""
        return foreground_masks(images)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] → ``(shape index [B], colour index [B])`` (-1 where empty)."""
        if images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="area")
        fg = self.foreground(images)
        flat = self._normalise(fg, self.size).flatten(1).float()
        inter = flat @ self.bank.T
        union = flat.sum(1, keepdim=True) + self.bank.sum(1)[None] - inter
        shape = self.bank_labels[(inter / union.clamp_min(1)).argmax(1)]
        mean_colour = (images * fg[:, None]).sum((2, 3)) / fg.sum((1, 2)).clamp_min(1)[:, None]
        colour = (_chromaticity(mean_colour)[:, None] - self.colour_means[None]).norm(dim=-1).argmin(1)
        empty = fg.flatten(1).sum(1) < 4
        return torch.where(empty, -1, shape), torch.where(empty, -1, colour)


def truth_views(shape: str, colour: str, views: int = 8, size: int = 64, elevation: float = 15.0,
                distance: float = 1.5, fovy: float = 70.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth renders at the evaluation orbit (the NeRF's turntable cameras): images, alpha."""
    cams = orbit_cameras(views, elevation, distance, fovy, size, size)
    return render_shapes([shape] * views, [colour] * views, cams)


def best_rotation_iou(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[float, int]:
    """Mean silhouette IoU of ``predicted`` vs ``truth`` alpha ``[V, 1, H, W]`` over V orbit views, maximised over
    cyclic shifts of the views (rotations about the up axis: the shapes are symmetric or nearly so)."""
    p, t = predicted[:, 0] > 0.5, truth[:, 0] > 0.5
    best, best_shift = -1.0, 0
    for shift in range(p.shape[0]):
        q = torch.roll(p, shift, dims=0)
        inter, union = (q & t).sum((1, 2)).float(), (q | t).sum((1, 2)).float()
        iou = float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean())
        if iou > best:
            best, best_shift = iou, shift
    return best, best_shift


def colour_error(predicted: torch.Tensor, predicted_alpha: torch.Tensor, truth: torch.Tensor,
                 truth_alpha: torch.Tensor) -> float:
    """Mean absolute RGB difference of the mean foreground colours (0 = same colour; NaN if either is empty)."""
    def mean_fg(images, alpha):
        fg = alpha[:, 0] > 0.5
        return images.permute(1, 0, 2, 3)[:, fg].mean(-1) if fg.any() else torch.full((3,), math.nan)
    return float((mean_fg(predicted, predicted_alpha) - mean_fg(truth, truth_alpha)).abs().mean())
