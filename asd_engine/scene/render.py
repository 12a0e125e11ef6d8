"""Ray marching with an occupancy grid, and volume rendering.

Sampling: nerfacc's occupancy-grid traversal is CUDA-only (and JIT-compiles its extension when it is not
installed prebuilt), so the default sampler is written here in pure PyTorch with the same semantics as
nerfacc's ``OccGridEstimator``: fixed marching steps from the scene cube's entry point (jittered when training),
cells skipped where the grid is empty, samples dropped below an alpha threshold or after the transmittance falls
below ``early_stop_eps``. When nerfacc's compiled extension is installed and the device is CUDA, its traversal is
used instead (sampler "auto"). Either way the samples are "left-packed" into dense ``[R, S]`` tensors (each ray's
kept samples first, S = the most any ray kept), which nerfacc's batched volume-rendering ops accept on any device.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RenderConfig:
    """Ray marching and occupancy-grid settings (official recipe defaults: docs/engine.md#official-recipe)."""

    samples_per_ray: int = 512          # marching steps across the scene cube's diagonal
    grid_resolution: int = 32
    grid_update_every: int = 16
    grid_warmup_steps: int = 256        # before this, every cell is re-evaluated at each update
    grid_ema_decay: float = 0.95
    occupancy_threshold: float = 0.01   # on σ·step (≈ alpha) of a cell
    alpha_threshold: float = 0.01       # samples with a smaller alpha are skipped (0 keeps all)
    early_stop_eps: float = 1e-4        # samples behind a transmittance below this are skipped
    background_random_prob: float = 0.5  # training: replace the background by a random solid colour
    sampler: str = "auto"               # "auto", "torch" or "nerfacc" (CUDA with nerfacc's compiled extension)
    ray_chunk: int = 16384              # rays marched at once while sampling (memory bound, no gradients)


DENSITY_CHUNK = 1 << 19  # points whose density is evaluated at once while pruning; memory only, not in the config


def nerfacc_cuda_available(device: torch.device) -> bool:
    """True when nerfacc's *prebuilt* CUDA extension is installed (so nothing gets compiled at run time)."""
    return device.type == "cuda" and importlib.util.find_spec("nerfacc.csrc") is not None


class OccupancyGrid(nn.Module):
    """A ``resolution³`` grid over ``[-radius, radius]³`` marking where the density may be non-zero.

    Same update rule as nerfacc's ``OccGridEstimator``: each update evaluates ``σ·step`` at a random point in the
    chosen cells, keeps an exponential moving *maximum*, and marks cells above ``min(threshold, mean)``.
    Buffers are part of the state dict, so checkpoints restore the grid exactly.
    """

    def __init__(self, radius: float, resolution: int) -> None:
        super().__init__()
        self.radius, self.resolution = radius, resolution
        self.register_buffer("occupancy", torch.zeros(resolution, resolution, resolution))
        self.register_buffer("binary", torch.ones(resolution, resolution, resolution, dtype=torch.bool))

    def cell_of(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``points [..., 3]`` → (flat cell index ``[...]``, inside-the-cube mask ``[...]``)."""
        unit = (points + self.radius) / (2.0 * self.radius)
        inside = ((unit >= 0.0) & (unit < 1.0)).all(-1)
        ijk = (unit * self.resolution).long().clamp(0, self.resolution - 1)
        r = self.resolution
        return (ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2], inside

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        index, inside = self.cell_of(points)
        return self.binary.view(-1)[index] & inside

    @torch.no_grad()
    def update(self, density_fn, step_size: float, step: int, config: RenderConfig,
               generator: torch.Generator) -> None:
        r3 = self.resolution ** 3
        device = self.occupancy.device
        if step < config.grid_warmup_steps:
            cells = torch.arange(r3)
        else:  # a quarter of all cells at random, and as many among the occupied ones
            cells = torch.randint(r3, (r3 // 4,), generator=generator)
            occupied = self.binary.view(-1).nonzero().squeeze(-1).cpu()
            if len(occupied):
                pick = torch.randint(len(occupied), (r3 // 4,), generator=generator)
                cells = torch.cat([cells, occupied[pick]])
        r = self.resolution
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1).float()
        jitter = torch.rand(ijk.shape, generator=generator)
        points = ((ijk + jitter) / r * 2.0 - 1.0) * self.radius
        alpha = density_fn(points.to(device)).float() * step_size
        flat = self.occupancy.view(-1)
        cells = cells.to(device)
        flat[cells] = torch.maximum(flat[cells] * config.grid_ema_decay, alpha)
        threshold = min(config.occupancy_threshold, float(flat.mean()))
        self.binary.copy_(self.occupancy > threshold)


def ray_box(origins: torch.Tensor, directions: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry/exit distances ``[R]`` of rays ``[R, 3]`` through the cube ``[-radius, radius]³`` (entry ≥ 0)."""
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0, t1 = (-radius - origins) / safe, (radius - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far


def left_pack(keep: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each row's kept entries to the front, preserving order, and crop to the longest row.

    ``keep [R, S]`` bool, ``values`` ``[R, S, ...]`` → ``(keep' [R, S'], values' ...)``.
    """
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    width = max(int(keep.sum(1).max()) if keep.numel() else 0, 1)
    order = order[:, :width]
    packed = [torch.gather(keep, 1, order)]
    for v in values:
        index = order.view(*order.shape, *([1] * (v.dim() - 2))).expand(*order.shape, *v.shape[2:])
        packed.append(torch.gather(v, 1, index))
    return tuple(packed)


def _march_torch(origins, directions, grid: OccupancyGrid, step_size: float, jitter: torch.Tensor | None,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    near, far = ray_box(origins, directions, grid.radius)
    span = (far - near).clamp_min(0.0)
    n_steps = max(1, math.ceil(float(span.max()) / step_size)) if len(span) else 1
    offset = torch.full_like(near, 0.0) if jitter is None else jitter * step_size
    pieces = []
    k = torch.arange(n_steps, device=origins.device, dtype=torch.float32)
    for start in range(0, origins.shape[0], chunk):
        sl = slice(start, start + chunk)
        t_start = near[sl, None] + offset[sl, None] + k[None] * step_size           # [r, n]
        t_end = t_start + step_size
        mid = 0.5 * (t_start + t_end)
        points = origins[sl, None] + directions[sl, None] * mid[..., None]
        keep = (t_end <= far[sl, None] + 1e-6) & grid.occupied(points)
        pieces.append(left_pack(keep, t_start, t_end))
    width = max(p[0].shape[1] for p in pieces)
    pad = lambda x, fill: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)  # noqa: E731
    keep = torch.cat([pad(p[0], False) for p in pieces])
    return keep, torch.cat([pad(p[1], 0.0) for p in pieces]), torch.cat([pad(p[2], 0.0) for p in pieces])


def _march_nerfacc(origins, directions, grid: OccupancyGrid, step_size: float, stratified: bool):
    """nerfacc's CUDA traversal of the same grid, converted to the left-packed layout."""
    from nerfacc import OccGridEstimator

    r = grid.radius
    estimator = OccGridEstimator(roi_aabb=[-r, -r, -r, r, r, r], resolution=grid.resolution, levels=1)
    estimator = estimator.to(origins.device)
    estimator.binaries.copy_(grid.binary[None])
    ray_indices, t_starts, t_ends = estimator.sampling(origins, directions, render_step_size=step_size,
                                                       stratified=stratified)
    n_rays = origins.shape[0]
    counts = torch.bincount(ray_indices, minlength=n_rays)
    width = max(int(counts.max()) if len(ray_indices) else 0, 1)
    rank = torch.arange(len(ray_indices), device=origins.device) - (torch.cumsum(counts, 0) - counts)[ray_indices]
    keep = torch.zeros(n_rays, width, dtype=torch.bool, device=origins.device)
    starts, ends = torch.zeros(n_rays, width, device=origins.device), torch.zeros(n_rays, width, device=origins.device)
    keep[ray_indices, rank] = True
    starts[ray_indices, rank], ends[ray_indices, rank] = t_starts, t_ends
    return keep, starts, ends


@torch.no_grad()
def march(origins: torch.Tensor, directions: torch.Tensor, grid: OccupancyGrid, step_size: float,
          config: RenderConfig, density_fn=None, generator: torch.Generator | None = None,
          stratified: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples along rays ``[R, 3]`` → ``(keep [R, S], t_starts [R, S], t_ends [R, S])``, left-packed.

    With ``density_fn`` (``[N, 3] → [N]``), samples whose alpha is below ``config.alpha_threshold`` or whose
    transmittance is below ``config.early_stop_eps`` are dropped (evaluated without gradients).
    """
    use_nerfacc = config.sampler == "nerfacc" or (config.sampler == "auto" and nerfacc_cuda_available(origins.device))
    if use_nerfacc:
        keep, t_starts, t_ends = _march_nerfacc(origins, directions, grid, step_size, stratified)
    else:
        jitter = torch.rand(origins.shape[0], generator=generator).to(origins.device) if stratified else None
        keep, t_starts, t_ends = _march_torch(origins, directions, grid, step_size, jitter, config.ray_chunk)
    prune = density_fn is not None and (config.alpha_threshold > 0 or config.early_stop_eps > 0)
    if prune and keep.any():
        points = origins[:, None] + directions[:, None] * (0.5 * (t_starts + t_ends))[..., None]
        sigma = torch.zeros_like(t_starts)
        kept = points[keep]
        # in chunks: at 512 px the unpruned samples number ~10^8, and one grid forward over all of them would
        # gather ~4 KB per point (a 139 GB GPU ran out of memory here)
        sigma[keep] = torch.cat([density_fn(chunk).float() for chunk in kept.split(DENSITY_CHUNK)])
        alpha = 1.0 - torch.exp(-sigma * (t_ends - t_starts))
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], 1), 1)
        keep = keep & (alpha >= config.alpha_threshold) & (transmittance >= config.early_stop_eps)
        keep, t_starts, t_ends = left_pack(keep, t_starts, t_ends)
    return keep, t_starts, t_ends


@dataclass
class RayRender:
    """Per-ray results; all ``[R, ...]``."""

    rgb: torch.Tensor        # [R, 3] object colour composited over nothing (premultiplied by opacity)
    opacity: torch.Tensor    # [R, 1]
    depth: torch.Tensor      # [R, 1] expected distance along the ray of the visible surface (0 where empty)
    normals: torch.Tensor | None  # [R, 3] unit normals at the expected surface point (None unless asked for)
    samples: int             # field evaluations made for this render


def volume_render(field, origins: torch.Tensor, directions: torch.Tensor, keep: torch.Tensor,
                  t_starts: torch.Tensor, t_ends: torch.Tensor, with_normals: bool = False) -> RayRender:
    """Evaluate ``field`` at the kept samples and composite front to back (nerfacc's batched ops, any device)."""
    from nerfacc import accumulate_along_rays, render_weight_from_density

    mid = 0.5 * (t_starts + t_ends)
    points = (origins[:, None] + directions[:, None] * mid[..., None])[keep]   # [M, 3]
    sigma_kept, rgb_kept = field(points)
    sigmas = torch.zeros_like(t_starts, dtype=sigma_kept.dtype)
    sigmas[keep] = sigma_kept
    rgbs = torch.zeros(*t_starts.shape, 3, device=t_starts.device, dtype=rgb_kept.dtype)
    rgbs[keep] = rgb_kept
    weights, _, _ = render_weight_from_density(t_starts, t_ends, sigmas)       # [R, S]
    opacity = accumulate_along_rays(weights, None)
    depth = accumulate_along_rays(weights, mid[..., None])
    normals = None
    if with_normals:
        # One density gradient per ray, at its expected surface point (depth / opacity): the gradient costs a
        # backward pass, so this is ~S times cheaper than weighting per-sample normals, and sharper.
        normals = torch.zeros(origins.shape[0], 3, device=origins.device)
        hit = opacity.detach()[:, 0] > 0.05
        if hit.any():
            surface = origins[hit] + directions[hit] * (depth.detach()[hit] / opacity.detach()[hit])
            normals[hit] = field.normals(surface)
    return RayRender(rgb=accumulate_along_rays(weights, rgbs), opacity=opacity, depth=depth, normals=normals,
                     samples=int(keep.sum()))
