"""Fused hash-grid encoding kernels in NVIDIA Warp: one kernel computes a point's features at one level (all 8
corners, gather and blend), one kernel its backward (scatter-add into the table, and the input gradient).

Why by hand: the pure-torch :class:`~asd_engine.scene.field.HashGrid` materialises corner indices, weights and
gathered features per point and level (~160 B each) and launches dozens of ops; tiny-cuda-nn fuses them but is on no
package index and needs a CUDA compiler. Warp (``pip install warp-lang``) compiles these kernels itself, for the CPU
and for CUDA, with no system compiler (docs/engine.md#field-backends). The torch grid stays the reference: the kernels
compute the same function (tiny-cuda-nn's HashGrid: ``x·scale + 0.5``, dense coarse levels with wrap-around, the
(1, 2654435761, 805459861) XOR hash) on the same ``[entries, F]`` table, so checkpoints do not depend on the backend.
"""

from __future__ import annotations

import functools

import torch

# Warp's kernels are typed: one set for the features per level the recipe uses (2). Other values use the torch grid.
FEATURES_PER_LEVEL = 2


def available() -> bool:
    """Whether Warp can be imported here (``pip install warp-lang``)."""
    try:
        import warp  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    """Build the kernels once (Warp caches the compiled code on disk; the first build takes a few seconds)."""
    import warp as wp

    wp.config.quiet = True
    wp.init()
    # tiny-cuda-nn's primes as unsigned 32-bit constants (a literal above 2^31 would pass through int32 first)
    prime_y = wp.constant(wp.uint32(2654435761))
    prime_z = wp.constant(wp.uint32(805459861))

    @wp.func
    def corner_index(cx: int, cy: int, cz: int, resolution: int, size: int, dense: int) -> int:
        if dense != 0:
            # the field clamps points into the grid, so coordinates are ≥ 0; the second modulo keeps a NaN point's
            # (undefined) coordinates inside the table instead of reading memory outside it
            return ((cx + cy * resolution + cz * resolution * resolution) % size + size) % size
        h = wp.uint32(cx) ^ (wp.uint32(cy) * prime_y) ^ (wp.uint32(cz) * prime_z)
        return int(h & wp.uint32(size - 1))  # table sizes of hashed levels are powers of two

    @wp.func
    def cell(x: wp.array2d(dtype=wp.float32), i: int, scale: float):
        """Point ``i``'s cell at a level (lowest corner) and its position in it, tiny-cuda-nn's ``x·scale + 0.5``."""
        px = x[i, 0] * scale + 0.5
        py = x[i, 1] * scale + 0.5
        pz = x[i, 2] * scale + 0.5
        fx = wp.floor(px)
        fy = wp.floor(py)
        fz = wp.floor(pz)
        return px - fx, py - fy, pz - fz, int(fx), int(fy), int(fz)

    @wp.func
    def corner_of(tx: float, ty: float, tz: float, cx: int, cy: int, cz: int, corner: int, level: int,
                  resolutions: wp.array(dtype=wp.int32), sizes: wp.array(dtype=wp.int32),
                  offsets: wp.array(dtype=wp.int32), n_dense: int):
        """Corner ``corner`` (bits: x, y, z high) of the cell → its per-axis weights and its table row."""
        bx = corner & 1
        by = (corner >> 1) & 1
        bz = (corner >> 2) & 1
        wx = wp.where(bx == 1, tx, 1.0 - tx)
        wy = wp.where(by == 1, ty, 1.0 - ty)
        wz = wp.where(bz == 1, tz, 1.0 - tz)
        dense = wp.where(level < n_dense, 1, 0)
        row = offsets[level] + corner_index(cx + bx, cy + by, cz + bz, resolutions[level], sizes[level], dense)
        return wx, wy, wz, row

    @wp.kernel
    def forward(x: wp.array2d(dtype=wp.float32), table: wp.array2d(dtype=wp.float32),
                scales: wp.array(dtype=wp.float32), resolutions: wp.array(dtype=wp.int32),
                sizes: wp.array(dtype=wp.int32), offsets: wp.array(dtype=wp.int32), n_dense: int,
                out: wp.array2d(dtype=wp.float32)):
        i, level = wp.tid()
        tx, ty, tz, cx, cy, cz = cell(x, i, scales[level])
        a0 = float(0.0)
        a1 = float(0.0)
        for corner in range(8):
            wx, wy, wz, row = corner_of(tx, ty, tz, cx, cy, cz, corner, level, resolutions, sizes, offsets, n_dense)
            w = wx * wy * wz
            a0 += w * table[row, 0]
            a1 += w * table[row, 1]
        out[i, level * 2 + 0] = a0
        out[i, level * 2 + 1] = a1

    @wp.kernel
    def backward(x: wp.array2d(dtype=wp.float32), table: wp.array2d(dtype=wp.float32),
                 scales: wp.array(dtype=wp.float32), resolutions: wp.array(dtype=wp.int32),
                 sizes: wp.array(dtype=wp.int32), offsets: wp.array(dtype=wp.int32), n_dense: int,
                 grad_out: wp.array2d(dtype=wp.float32), want_x: int,
                 grad_table: wp.array2d(dtype=wp.float32), grad_x: wp.array3d(dtype=wp.float32)):
        i, level = wp.tid()
        scale = scales[level]
        tx, ty, tz, cx, cy, cz = cell(x, i, scale)
        g0 = grad_out[i, level * 2 + 0]
        g1 = grad_out[i, level * 2 + 1]
        dx = float(0.0)
        dy = float(0.0)
        dz = float(0.0)
        for corner in range(8):
            wx, wy, wz, row = corner_of(tx, ty, tz, cx, cy, cz, corner, level, resolutions, sizes, offsets, n_dense)
            w = wx * wy * wz
            wp.atomic_add(grad_table, row, 0, w * g0)
            wp.atomic_add(grad_table, row, 1, w * g1)
            if want_x != 0:
                blend = table[row, 0] * g0 + table[row, 1] * g1
                # d(weight)/d(position): ±1 on the axis, the other two axes' weights
                sx = wp.where((corner & 1) == 1, 1.0, -1.0)
                sy = wp.where(((corner >> 1) & 1) == 1, 1.0, -1.0)
                sz = wp.where(((corner >> 2) & 1) == 1, 1.0, -1.0)
                dx += sx * wy * wz * blend
                dy += wx * sy * wz * blend
                dz += wx * wy * sz * blend
        if want_x != 0:  # per level, summed over levels by the caller (no atomics on x)
            grad_x[i, level, 0] = dx * scale
            grad_x[i, level, 1] = dy * scale
            grad_x[i, level, 2] = dz * scale

    return wp, forward, backward


def _level_arrays(grid, wp, device):
    """The grid's per-level constants as Warp arrays on ``device`` (cached on the grid per device)."""
    cache = grid.__dict__.setdefault("_warp_levels", {})
    key = str(device)
    if key not in cache:
        cache[key] = (wp.from_torch(grid.scales.float().contiguous()),
                      wp.from_torch(grid.resolutions.to(torch.int32).contiguous()),
                      wp.from_torch(grid.sizes.to(torch.int32).contiguous()),
                      wp.from_torch(grid.offsets.to(torch.int32).contiguous()))
    return cache[key]


class _WarpHashEncoding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, grid) -> torch.Tensor:
        wp, forward_kernel, _ = _kernels()
        x = x.detach().float().contiguous()
        table_c = table.detach().contiguous()
        out = torch.empty(x.shape[0], grid.n_levels * FEATURES_PER_LEVEL, device=x.device, dtype=torch.float32)
        if x.shape[0]:
            device = wp.device_from_torch(x.device)
            levels = _level_arrays(grid, wp, x.device)
            wp.launch(forward_kernel, dim=(x.shape[0], grid.n_levels), device=device,
                      inputs=[wp.from_torch(x), wp.from_torch(table_c), *levels, int(grid.n_dense)],
                      outputs=[wp.from_torch(out)])
        ctx.grid = grid
        ctx.save_for_backward(x, table_c)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        wp, _, backward_kernel = _kernels()
        x, table = ctx.saved_tensors
        grid, want_x = ctx.grid, ctx.needs_input_grad[0]
        grad_table = torch.zeros_like(table)
        grad_x = torch.zeros(x.shape[0], grid.n_levels, 3, device=x.device) if want_x else torch.zeros(1, 1, 3,
                                                                                                      device=x.device)
        if x.shape[0]:
            device = wp.device_from_torch(x.device)
            levels = _level_arrays(grid, wp, x.device)
            wp.launch(backward_kernel, dim=(x.shape[0], grid.n_levels), device=device,
                      inputs=[wp.from_torch(x), wp.from_torch(table), *levels, int(grid.n_dense),
                              wp.from_torch(grad_out.float().contiguous()), int(want_x)],
                      outputs=[wp.from_torch(grad_table), wp.from_torch(grad_x)])
        return (grad_x.sum(1) if want_x else None), grad_table, None


def warp_hash_encode(grid, x: torch.Tensor) -> torch.Tensor:
    """``x [N, 3]`` in [0, 1]³ → features ``[N, L·2]`` of ``grid`` (a :class:`HashGrid` with 2 features per level),
    differentiable in ``x`` and in ``grid.params``."""
    return _WarpHashEncoding.apply(x, grid.params, grid)
