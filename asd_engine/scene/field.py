"""The NeRF's neural fields: a multi-resolution hash grid, density/colour heads, and the background.

The hash grid is written here in pure PyTorch because no installable package provides one that runs on the CPU
(tiny-cuda-nn is CUDA-only and not on PyPI). It follows tiny-cuda-nn's HashGrid exactly — level resolutions,
the ``x·scale + 0.5`` offset, dense indexing for coarse levels, the (1, 2654435761, 805459861) XOR hash, the
parameter layout — so that when ``tinycudann`` is importable on CUDA it is used with the same parameters and
(within float tolerance) the same outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HASH_PRIMES = (1, 2654435761, 805459861)
# auto: tiny-cuda-nn on CUDA when it is installed, else the torch grid; torch: the reference; warp: fused kernels
# (pip install warp-lang; CPU and CUDA); tcnn: tiny-cuda-nn (CUDA only). Every backend has the same parameters.
FIELD_BACKENDS = ("auto", "torch", "warp", "tcnn")


@dataclass
class FieldConfig:
    """Geometry/appearance network settings (official recipe defaults: docs/engine.md#official-recipe)."""

    radius: float = 1.0                 # the scene is the cube [-radius, radius]^3
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4472692374403782  # finest level 4096 (tcnn's resolution rule)
    hidden_dim: int = 64
    density_blob_scale: float = 10.0    # "blob" density prior: + scale · (1 - |x| / std) before softplus
    density_blob_std: float = 0.5       # (its positive part, the seed ball, can fade: NeRFField.blob_seed)
    background_hidden_dim: int = 16
    backend: str = "auto"               # FIELD_BACKENDS: the hash grid's implementation (docs/engine.md#field-backends)


def resolve_backend(backend: str, device: torch.device, n_features_per_level: int) -> str:
    """The hash-grid implementation that runs for ``backend`` on ``device``: "torch", "warp" or "tcnn". Raises a
    :class:`UserInputError` naming ``nerf_field.backend`` when the one asked for cannot run here."""
    from ..errors import UserInputError

    if backend == "warp":
        from . import hash_kernels

        if not hash_kernels.available():
            raise UserInputError("nerf_field.backend", "warp is not installed in this Python",
                                 "pip install warp-lang (no compiler needed), or use {=nerf_field.backend} torch")
        if n_features_per_level != hash_kernels.FEATURES_PER_LEVEL:
            raise UserInputError("nerf_field.backend", f"the warp kernels are built for "
                                 f"{hash_kernels.FEATURES_PER_LEVEL} features per level, not {n_features_per_level}",
                                 "use {=nerf_field.backend} torch")
        return "warp"
    if backend == "tcnn" or (backend == "auto" and _tcnn_available(device)):
        return "tcnn"
    return "torch"


def runnable_backend(stored: str) -> str:
    """The backend to rebuild a saved field with: the stored one, or "auto" where Warp is not installed (every
    backend holds the same table, so a checkpoint trained with the kernels loads into the torch grid)."""
    if stored == "warp":
        from . import hash_kernels

        return "warp" if hash_kernels.available() else "auto"
    return stored


def _tcnn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # ImportError, or a build for another CUDA/torch
        return False
    return True


class HashGrid(nn.Module):
    """Multi-resolution hash encoding (Instant-NGP). ``x [N, 3]`` in [0, 1]³ → features ``[N, L·F]``."""

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.4472692374403782) -> None:
        super().__init__()
        self.n_levels, self.n_features = n_levels, n_features_per_level
        self.config = {"otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features_per_level,
                       "log2_hashmap_size": log2_hashmap_size, "base_resolution": base_resolution,
                       "per_level_scale": per_level_scale}
        log2_scale = math.log2(per_level_scale)
        scales, resolutions, sizes = [], [], []
        for level in range(n_levels):
            # float32 throughout, as tcnn computes exp2f(level · log2(scale)) · base - 1
            scale = (torch.exp2(torch.tensor(level * log2_scale, dtype=torch.float32)) * base_resolution - 1.0).item()
            resolution = math.ceil(scale) + 1
            dense = resolution ** 3
            size = min(-(-dense // 8) * 8, 2 ** log2_hashmap_size)  # 8-aligned; capped at the table size
            scales.append(scale), resolutions.append(resolution), sizes.append(size)
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("resolutions", torch.tensor(resolutions), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets[:-1]), persistent=False)
        self.n_dense = sum(r ** 3 <= s for r, s in zip(resolutions, sizes))  # coarse levels index densely
        self.register_buffer("strides", torch.tensor([[1, r, r * r] for r in resolutions]), persistent=False)
        self.register_buffer("primes", torch.tensor(HASH_PRIMES), persistent=False)
        # tcnn's initialisation: uniform in ±1e-4; the same flat [entries, F] layout tcnn uses
        self.params = nn.Parameter(torch.empty(offsets[-1], n_features_per_level).uniform_(-1e-4, 1e-4))

    # "torch": the ops below; "warp": the fused kernels of hash_kernels.py over the same table (set by NeRFField)
    kernel: str = "torch"

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features

    @staticmethod
    def _corners(per_dim: torch.Tensor, combine) -> torch.Tensor:
        """``[..., 3, 2]`` per-dimension values of the low/high corner → ``[..., 8]`` combined over the cube."""
        x, y, z = per_dim.unbind(-2)
        return combine(combine(x[..., :, None, None], y[..., None, :, None]), z[..., None, None, :]).flatten(-3)

    # A grad-enabled forward keeps ~160 B per point and level for backward (corner indices, weights, gathered
    # features): 40 GB for a 512 px render's 17 M samples at 16 levels. Above this many points each level is
    # recomputed in backward instead (torch.utils.checkpoint), so memory follows the output [N, L·F], as
    # tiny-cuda-nn's fused kernels' does, for about one more forward of the grid. Not part of the config: the
    # result is the same either way.
    checkpoint_points: int = 1 << 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.kernel == "warp":  # fused: nothing per corner is kept for backward, so no checkpointing either
            from .hash_kernels import warp_hash_encode

            return warp_hash_encode(self, x)
        if torch.is_grad_enabled() and x.shape[0] > self.checkpoint_points:
            from torch.utils.checkpoint import checkpoint

            return torch.cat([checkpoint(self._encode, x, level, level + 1, use_reentrant=False)
                              for level in range(self.n_levels)], dim=-1)
        return self._encode(x, 0, self.n_levels)

    def _encode(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Features of levels ``first … last-1``: ``x [N, 3]`` → ``[N, (last - first)·F]``."""
        n, levels = x.shape[0], last - first
        nd = min(max(self.n_dense - first, 0), levels)  # how many of these levels index densely
        scales, strides = self.scales[first:last], self.strides[first:last]
        sizes, offsets = self.sizes[first:last], self.offsets[first:last]
        pos = x[:, None, :] * scales[None, :, None] + 0.5                         # [N, l, 3]
        cell = pos.floor()
        frac = pos - cell
        low_high = torch.stack([cell.long(), cell.long() + 1], dim=-1)            # [N, l, 3, 2]
        # Per-dimension terms first, then the 8 corners: 6 products per point and level instead of 24.
        index = torch.empty(n, levels, 8, dtype=torch.long, device=x.device)
        if nd:
            dense = self._corners(low_high[:, :nd] * strides[None, :nd, :, None], torch.add)
            torch.remainder(dense, sizes[None, :nd, None], out=index[:, :nd])  # wrap-around, as tcnn
        if nd < levels:  # hashed levels: table sizes are powers of two, so "% size" is a bit mask
            hashed = self._corners(low_high[:, nd:] * self.primes[None, None, :, None], torch.bitwise_xor)
            torch.bitwise_and(hashed, (sizes[None, nd:, None] - 1), out=index[:, nd:])
        index += offsets[None, :, None]
        weight = self._corners(torch.stack([1.0 - frac, frac], dim=-1), torch.mul)  # [N, l, 8]
        # index_select's backward (index_add) is ~2.5x faster on the CPU than embedding's.
        features = torch.index_select(self.params, 0, index.view(-1)).view(n * levels, 8, self.n_features)
        return torch.bmm(weight.view(n * levels, 1, 8), features).view(n, levels * self.n_features)  # N may be 0


class TcnnHashGrid(nn.Module):
    """tiny-cuda-nn's HashGrid with the same config and parameter layout as :class:`HashGrid` (CUDA only)."""

    def __init__(self, grid: HashGrid) -> None:
        super().__init__()
        import tinycudann as tcnn

        self.encoding = tcnn.Encoding(3, grid.config, dtype=torch.float32)
        self.n_levels, self.n_features = grid.n_levels, grid.n_features
        with torch.no_grad():
            self.encoding.params.copy_(grid.params.detach().reshape(-1).to(self.encoding.params.device))

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoding(x.float()).float()


def mlp(in_dim: int, hidden: int, out_dim: int, hidden_layers: int = 1) -> nn.Sequential:
    """ReLU MLP without biases (as the recipe's VanillaMLP)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim, bias=False))
    return nn.Sequential(*layers)


class NeRFField(nn.Module):
    """Density and colour of points in the scene cube.

    ``density(p [N,3]) → [N]`` (softplus, with the "blob" bias that starts training from a centred ball);
    ``forward(p) → (density [N], rgb [N, 3])``; ``normals(p) → [N, 3]`` from the density gradient.

    The blob bias ``scale · (1 - |x| / std)`` has two parts. Outside ``std`` it is negative and keeps density out of
    the scene cube's corners. Inside it is positive, a ball of density that training starts from, and it stays
    there (Magic3D, threestudio): at the centre +scale, which the field must learn to cancel before anything
    hollow can form there (a torus's hole). ``blob_seed`` (a saved buffer, 1 = the permanent blob) scales the
    positive part only; a run can fade it to 0 (``TextTo3DConfig.blob_fade``).
    """

    def __init__(self, config: FieldConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        grid = HashGrid(config.n_levels, config.n_features_per_level, config.log2_hashmap_size,
                        config.base_resolution, config.per_level_scale)
        device = torch.device(device)
        self.backend = resolve_backend(config.backend, device, config.n_features_per_level)
        grid.kernel = "warp" if self.backend == "warp" else "torch"
        self.encoding: nn.Module = TcnnHashGrid(grid.to(device)) if self.backend == "tcnn" else grid
        self.density_head = mlp(self.encoding.output_dim, config.hidden_dim, 1)
        self.color_head = mlp(self.encoding.output_dim, config.hidden_dim, 3)
        self.register_buffer("blob_seed", torch.ones(()))
        self.to(device)

    def _features(self, points: torch.Tensor) -> torch.Tensor:
        unit = ((points / self.config.radius) * 0.5 + 0.5).clamp(0.0, 1.0)  # scene cube → [0, 1]³
        return self.encoding(unit)

    def _density_from(self, features: torch.Tensor, points: torch.Tensor, head_grad: bool = True) -> torch.Tensor:
        ramp = 1.0 - points.norm(dim=-1) / self.config.density_blob_std
        blob = self.config.density_blob_scale * (ramp.clamp_max(0.0) + self.blob_seed * ramp.clamp_min(0.0))
        if head_grad:
            logit = self.density_head(features)
        else:  # the head's weights as constants: a loss on these points moves only their own hash entries
            frozen = {name: p.detach() for name, p in self.density_head.named_parameters()}
            logit = torch.func.functional_call(self.density_head, frozen, (features,))
        return F.softplus(logit.squeeze(-1) + blob)

    def density(self, points: torch.Tensor, head_grad: bool = True) -> torch.Tensor:
        """``points [N, 3]`` → density ``[N]``; ``head_grad=False`` keeps gradients out of the density MLP, which
        every point shares (a local term, like the haze term, then cannot reshape the rest of the field)."""
        return self._density_from(self._features(points), points, head_grad)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._features(points)
        return self._density_from(features, points), torch.sigmoid(self.color_head(features))

    def color(self, points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.color_head(self._features(points)))

    def normals(self, points: torch.Tensor) -> torch.Tensor:
        """Unit outward normals ``-∇σ/|∇σ|`` at ``points [N, 3]`` (no graph is kept)."""
        with torch.enable_grad():
            p = points.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.density(p).sum(), p)
        return -F.normalize(grad, dim=-1)


def spherical_harmonics_deg3(directions: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of bands 0–2 (tcnn's "degree 3") of unit ``directions [N, 3]`` → ``[N, 9]``."""
    x, y, z = directions.unbind(-1)
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.94617469575755997 * z * z - 0.31539156525251999,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (x * x - y * y),
    ], dim=-1)


class Background(nn.Module):
    """Background colour by view direction: SH encoding → MLP (2 hidden layers) → sigmoid. ``[N, 3] → [N, 3]``."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = mlp(9, hidden, 3, hidden_layers=2)

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(spherical_harmonics_deg3(directions)))
