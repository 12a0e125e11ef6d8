"""Ray marching with an occupancy grid, and volume rendering.

Sampling: nerfacc's occupancy-grid traversal is CUDA-only (and JIT-compiles its extension when it is not
installed prebuilt), so the default sampler is written here in pure PyTorch with the same semantics as
nerfacc's ``OccGridEstimator``: fixed marching steps from the scene cube's entry point (jittered when training),
cells skipped where the grid is empty, samples dropped below an alpha threshold or after the transmittance falls
below ``early_stop_eps``. When nerfacc's compiled extension is installed and the device is CUDA, its traversal is
used instead (sampler "auto"). Either way the samples are "left-packed" into dense ``[R, S]`` tensors (each ray's
kept samples first, S = the most any ray kept); compositing then works on the kept samples only (packed).
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
    # training renders: rays per gradient-checkpointed chunk (0: one piece). The backward then holds one chunk's
    # field activations instead of the whole image's, for a second field forward (docs/benchmarks.md#render-memory)
    checkpoint_rays: int = 0


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


def _march_torch(origins, directions, grid: OccupancyGrid, step_size: float, jitter: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    near, far = ray_box(origins, directions, grid.radius)
    span = (far - near).clamp_min(0.0)
    n_steps = max(1, math.ceil(float(span.max()) / step_size)) if len(span) else 1
    offset = torch.full_like(near, 0.0) if jitter is None else jitter * step_size
    k = torch.arange(n_steps, device=origins.device, dtype=torch.float32)
    t_start = near[:, None] + offset[:, None] + k[None] * step_size           # [r, n]
    t_end = t_start + step_size
    mid = 0.5 * (t_start + t_end)
    points = origins[:, None] + directions[:, None] * mid[..., None]
    keep = (t_end <= far[:, None] + 1e-6) & grid.occupied(points)
    return left_pack(keep, t_start, t_end)


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
    prune = density_fn is not None and (config.alpha_threshold > 0 or config.early_stop_eps > 0)
    jitter = None
    if stratified and not use_nerfacc:
        jitter = torch.rand(origins.shape[0], generator=generator).to(origins.device)
    # The torch marcher goes in chunks of rays, each pruned before the next is marched: the unpruned candidates
    # are the marcher's peak memory. nerfacc's traversal returns all rays' candidates at once.
    chunk = max(origins.shape[0], 1) if use_nerfacc else config.ray_chunk
    pieces = []
    for start in range(0, max(origins.shape[0], 1), chunk):
        o, d = origins[start:start + chunk], directions[start:start + chunk]
        if use_nerfacc:
            keep, t_starts, t_ends = _march_nerfacc(o, d, grid, step_size, stratified)
        else:
            keep, t_starts, t_ends = _march_torch(o, d, grid, step_size,
                                                  None if jitter is None else jitter[start:start + chunk])
        if prune and keep.any():
            keep, t_starts, t_ends = left_pack(_visible(o, d, keep, t_starts, t_ends, density_fn, config),
                                               t_starts, t_ends)
        pieces.append((keep, t_starts, t_ends))
    width = max(keep.shape[1] for keep, _, _ in pieces)
    pad = lambda x, fill: torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill)  # noqa: E731
    return tuple(torch.cat([pad(piece[i], fill) for piece in pieces]) for i, fill in enumerate((False, 0.0, 0.0)))


# The pruning pass walks the packed candidates front to back in slabs of these many columns (doubling up to the
# last): a ray whose transmittance has fallen below `early_stop_eps` gets no density call behind its surface.
FIRST_SLAB = 8


def _visible(origins: torch.Tensor, directions: torch.Tensor, keep: torch.Tensor, t_starts: torch.Tensor,
             t_ends: torch.Tensor, density_fn, config: RenderConfig) -> torch.Tensor:
    """``keep [R, S]`` (left-packed candidates) → the candidates whose alpha reaches ``config.alpha_threshold`` and
    whose transmittance reaches ``config.early_stop_eps`` (nerfacc's ``render_visibility_from_density``).

    Same answer as evaluating the density at every candidate, without evaluating it where it cannot matter: the
    transmittance only falls along a ray, so once it is below ``early_stop_eps`` every later candidate is dropped
    anyway. On a formed, opaque object most candidates lie behind its front surface.
    """
    n_rays, width = keep.shape
    visible = torch.zeros_like(keep)
    transmittance = torch.ones(n_rays, device=keep.device)     # in front of the current slab
    alive = torch.ones(n_rays, dtype=torch.bool, device=keep.device)
    start, slab = 0, FIRST_SLAB
    while start < width:
        cols = slice(start, start + slab)
        rows = (alive & keep[:, start]).nonzero().squeeze(-1)   # left-packed: a ray's first column in the slab
        if not len(rows):
            break
        k = keep[rows, cols]
        t0, t1 = t_starts[rows, cols], t_ends[rows, cols]
        points = origins[rows, None] + directions[rows, None] * (0.5 * (t0 + t1))[..., None]
        sigma = torch.zeros_like(t0)
        # in chunks: at 512 px the candidates number ~10^8, and one grid forward over all of them would
        # gather ~4 KB per point (a 139 GB GPU ran out of memory here)
        sigma[k] = torch.cat([density_fn(chunk).float() for chunk in points[k].split(DENSITY_CHUNK)])
        alpha = 1.0 - torch.exp(-sigma * (t1 - t0))
        through = torch.cumprod(1.0 - alpha, dim=1)                             # inclusive, within the slab
        before = transmittance[rows, None] * torch.cat([torch.ones_like(through[:, :1]), through[:, :-1]], 1)
        visible[rows, cols] = k & (alpha >= config.alpha_threshold) & (before >= config.early_stop_eps)
        transmittance[rows] = transmittance[rows] * through[:, -1]
        alive[rows] = transmittance[rows] >= config.early_stop_eps
        start, slab = start + slab, slab * 2
    return visible


@dataclass
class RayRender:
    """Per-ray results; all ``[R, ...]``."""

    rgb: torch.Tensor        # [R, 3] object colour composited over nothing (premultiplied by opacity)
    opacity: torch.Tensor    # [R, 1]
    depth: torch.Tensor      # [R, 1] expected distance along the ray of the visible surface (0 where empty)
    normals: torch.Tensor | None  # [R, 3] unit normals at the expected surface point (None unless asked for)
    samples: int             # field evaluations made for this render


def volume_render(field, origins: torch.Tensor, directions: torch.Tensor, keep: torch.Tensor,
                  t_starts: torch.Tensor, t_ends: torch.Tensor, with_normals: bool = False,
                  checkpoint_rays: int = 0) -> RayRender:
    """Evaluate ``field`` at the kept samples and composite them front to back.

    ``checkpoint_rays > 0`` (and gradients on): composite that many rays at a time under activation checkpointing,
    so the backward recomputes one chunk's field forward at a time instead of storing every sample's activations.
    Same values and gradients either way.
    """
    chunked = checkpoint_rays > 0 and torch.is_grad_enabled() and origins.shape[0] > checkpoint_rays
    if chunked:
        from torch.utils.checkpoint import checkpoint

        parts = []
        for start in range(0, origins.shape[0], checkpoint_rays):
            rows = slice(start, start + checkpoint_rays)
            k = keep[rows]
            width = max(int(k.sum(1).max()), 1)  # left-packed: this chunk's rows need only their longest prefix
            parts.append(checkpoint(_composite, field, origins[rows], directions[rows], k[:, :width],
                                    t_starts[rows, :width], t_ends[rows, :width], use_reentrant=False))
        rgb, opacity, depth = (torch.cat(p) for p in zip(*parts))
    else:
        rgb, opacity, depth = _composite(field, origins, directions, keep, t_starts, t_ends)
    normals = None
    if with_normals:
        # One density gradient per ray, at its expected surface point (depth / opacity): the gradient costs a
        # backward pass, so this is ~S times cheaper than weighting per-sample normals, and sharper.
        normals = torch.zeros(origins.shape[0], 3, device=origins.device)
        hit = opacity.detach()[:, 0] > 0.05
        if hit.any():
            surface = origins[hit] + directions[hit] * (depth.detach()[hit] / opacity.detach()[hit])
            normals[hit] = field.normals(surface)
    return RayRender(rgb=rgb, opacity=opacity, depth=depth, normals=normals, samples=int(keep.sum()))


def _composite(field, origins: torch.Tensor, directions: torch.Tensor, keep: torch.Tensor, t_starts: torch.Tensor,
               t_ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rays ``[R, 3]`` and their left-packed samples ``[R, S]`` → ``(rgb [R, 3], opacity [R, 1], depth [R, 1])``.

    nerfacc's formula (``render_weight_from_density``: w = exp(-Σ_{j<i} σ_j δ_j) · (1 - exp(-σ_i δ_i))) on the M kept
    samples, packed: only the optical depth is laid out ``[R, S]`` for its per-ray prefix sum. Written here because
    nerfacc's packed scans need its compiled CUDA extension, and its batched ops would hold colours, weights and
    their gradients for every ``[R, S]`` slot (~2.7 slots per kept sample in a training render).
    """
    rows, cols = keep.nonzero(as_tuple=True)                                   # [M]: ray-major, front to back
    mid = 0.5 * (t_starts + t_ends)[rows, cols]                                # [M]
    points = origins[rows] + directions[rows] * mid[:, None]                   # [M, 3]
    sigma, rgb = field(points)
    tau = sigma.float() * (t_ends - t_starts)[rows, cols]                      # [M] optical depth of each sample
    optical = torch.zeros_like(t_starts).index_put((rows, cols), tau)          # [R, S]
    before = (torch.cumsum(optical, dim=1) - optical)[rows, cols]              # [M] in front of each sample
    weights = torch.exp(-before) * -torch.expm1(-tau)                          # [M] transmittance · alpha
    n_rays = origins.shape[0]
    accumulate = lambda values: values.new_zeros(n_rays, values.shape[1]).index_add(0, rows, values)  # noqa: E731
    return (accumulate(weights[:, None] * rgb), accumulate(weights[:, None]),
            accumulate((weights * mid)[:, None]))
