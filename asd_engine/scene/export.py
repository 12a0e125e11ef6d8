"""Outputs of a 3D run: turntable renders (RGB, alpha, depth, normals), an animated turntable, and a coloured mesh.

Meshes: the activated density is sampled on a coarse grid to find the object's bounding box, then on a fine grid
inside it; marching cubes (scikit-image) extracts the isosurface at ``threshold`` (official recipe: 25). If nothing
exceeds it, the threshold falls back to a quarter of the peak density with a warning; a field whose density the
renderer would not draw anywhere is empty (:class:`EmptyField`), and has no mesh. Components with fewer than
``min_component_fraction`` of the largest component's faces (floaters) are dropped. Vertex colours come from the
colour field (sRGB, like the renders; a GLB stores them linear, as glTF defines COLOR_0). Files are y-up (glTF/OBJ
convention; the engine's world is z-up) and written atomically; a GLB can carry string metadata in its glTF
``asset.extras`` (as ComfyUI's Save GLB embeds the workflow).

Long calls take ``on_progress(done, total)``, called after each unit of work (a view, a density chunk, the mesh
colouring): a host shows progress with it and may raise from it to cancel — the exception propagates untouched,
and since files are only written after the work is done, nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import UserInputError
from ..images import save_png, srgb_to_linear, to_pil
from .cameras import orbit_cameras
from .nerf import NeRFGenerator

# z-up (engine) → y-up (glTF, OBJ, three.js/ComfyUI's Preview3D): rotate -90° about x: (x, y, z) → (x, z, -y)
Z_UP_TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
DENSITY_CHUNK = 262_144  # points per density query: bounds memory, and is the unit of progress/cancel in meshing

OnProgress = Callable[[int, int], None]  # (done, total) after each unit of work; may raise to cancel


class EmptyField(UserInputError):
    """The NeRF has no density the renderer would draw (an emptied or collapsed field): there is no surface to
    mesh. :func:`export_outputs` reports it as one line and writes everything else."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when one of them leaves the index open."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@contextlib.contextmanager
def on_device(nerf: NeRFGenerator, device: torch.device) -> Iterator[NeRFGenerator]:
    """Move ``nerf`` to ``device`` for the ``with`` block and back to where it was afterwards, even on an error or
    a cancel: a host may cache the NeRF on the CPU between uses and render it on the accelerator."""
    home = nerf.device
    moved = not _same_device(home, device)
    if moved:
        nerf.to(device)
    try:
        yield nerf
    finally:
        if moved:
            nerf.to(home)


@dataclass
class Turntable:
    """``N`` views around the object; all ``[N, H, W, C]`` float in [0, 1]."""

    rgb: torch.Tensor
    alpha: torch.Tensor     # C = 1
    depth: torch.Tensor     # C = 1, normalised per turntable: near = 1 (white), far/empty = 0
    normals: torch.Tensor   # C = 3, (n + 1) / 2 of world-space normals, grey where empty


@torch.no_grad()
def render_turntable(nerf: NeRFGenerator, views: int = 120, size: int = 256, elevation: float = 15.0,
                     distance: float = 1.5, fovy: float = 70.0, background: str = "white",
                     on_progress: OnProgress | None = None) -> Turntable:
    """Render ``views`` cameras evenly around the up axis (defaults: the official evaluation cameras) on the NeRF's
    device → images ``[views, size, size, C]`` on the CPU. ``on_progress(i, views)`` after each view.
    One view at a time: on a CPU that is ~1.5× faster than batching views (smaller working set)."""
    cameras = orbit_cameras(views, elevation, distance, fovy, size, size)
    parts = []
    for i in range(views):
        parts.append(nerf.render(cameras[i], with_normals=True, background=background))
        if on_progress is not None:
            on_progress(i + 1, views)
    rgb = torch.cat([p.rgb for p in parts]).clamp(0, 1).cpu()
    alpha = torch.cat([p.opacity for p in parts]).clamp(0, 1).cpu()
    depth = torch.cat([p.depth for p in parts]).cpu()
    normals = torch.cat([p.normals for p in parts]).cpu()
    hit = alpha > 0.5
    if hit.any():
        near, far = depth[hit].min(), depth[hit].max()
        depth_vis = torch.where(hit, 1.0 - (depth - near) / (far - near).clamp_min(1e-6) * 0.8, torch.zeros_like(depth))
    else:
        depth_vis = torch.zeros_like(depth)
    normals_vis = torch.where(alpha > 0.05, (normals + 1.0) / 2.0, torch.full_like(normals, 0.5))
    return Turntable(rgb, alpha, depth_vis.clamp(0, 1), normals_vis.clamp(0, 1))


def save_views(turntable: Turntable, folder: str | os.PathLike) -> list[Path]:
    """``views/rgb_000.png``, ``alpha_000.png``, ``depth_000.png``, ``normal_000.png`` for each view."""
    folder = Path(folder)
    written = []
    for i in range(turntable.rgb.shape[0]):
        for name, images in (("rgb", turntable.rgb), ("alpha", turntable.alpha), ("depth", turntable.depth),
                             ("normal", turntable.normals)):
            image = images[i].permute(2, 0, 1)
            if image.shape[0] == 1:
                image = image.expand(3, -1, -1)
            written.append(save_png(image, folder / f"{name}_{i:03d}.png"))
    return written


def save_animation(frames: torch.Tensor, path: str | os.PathLike, fps: int = 30) -> Path:
    """Frames ``[N, H, W, 3]`` → animated WEBP (or GIF, by the suffix), looping, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [to_pil(frame.permute(2, 0, 1)) for frame in frames]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    kwargs = {"lossless": False, "quality": 90} if path.suffix.lower() == ".webp" else {}
    images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, **kwargs)
    os.replace(tmp, path)
    return path


def _grid_chunks(resolution: int) -> int:
    return -(-resolution ** 3 // DENSITY_CHUNK)


def _counter(total: int, on_progress: OnProgress | None) -> Callable[[], None]:
    """A ``tick()`` that reports one more finished unit of ``total`` to ``on_progress``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total)
    return tick


@torch.no_grad()
def density_grid(nerf: NeRFGenerator, lo: np.ndarray, hi: np.ndarray, resolution: int,
                 tick: Callable[[], None] = lambda: None) -> np.ndarray:
    """Density on a ``resolution``³ grid spanning the box ``[lo, hi]`` → ``[R, R, R]`` (x, y, z); ``tick()`` after
    each chunk."""
    axes = [torch.linspace(float(lo[i]), float(hi[i]), resolution) for i in range(3)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    values = []
    for i in range(0, len(points), DENSITY_CHUNK):
        values.append(nerf.field.density(points[i:i + DENSITY_CHUNK].to(nerf.device)).float().cpu())
        tick()
    return torch.cat(values).reshape(resolution, resolution, resolution).numpy()


@torch.no_grad()
def extract_mesh(nerf: NeRFGenerator, resolution: int = 256, threshold: float = 25.0,
                 coarse_resolution: int = 64, min_component_fraction: float = 0.01,
                 on_progress: OnProgress | None = None):
    """Marching-cubes mesh of the density with vertex colours → ``trimesh.Trimesh`` in engine (z-up) coordinates,
    vertex colours RGBA uint8 ``[N, 4]``, sRGB like the renders (files convert them where their format wants
    linear). ``on_progress(done, total)`` after each density chunk of the coarse and the fine grid and after the
    colouring (``total`` is known up front)."""
    import trimesh
    from skimage.measure import marching_cubes

    tick = _counter(_grid_chunks(coarse_resolution) + _grid_chunks(resolution) + 1, on_progress)
    radius = nerf.field_config.radius
    lo, hi = np.full(3, -radius), np.full(3, radius)
    coarse = density_grid(nerf, lo, hi, coarse_resolution, tick)
    peak = float(coarse.max())
    if not np.isfinite(peak):
        raise UserInputError("checkpoint", f"the NeRF's density is not finite ({peak}): its training diverged",
                             "resume from an earlier checkpoint of the run, or train again with another {=seed}")
    # the renderer skips samples whose alpha is below its threshold: a field that never reaches it renders as
    # background only, and a mesh of it would be a surface of noise nobody can see
    drawn = float(nerf.step_alpha(torch.tensor(peak, dtype=torch.float64)))
    if peak <= 0.0 or drawn < nerf.render_config.alpha_threshold:
        raise EmptyField("checkpoint", f"the NeRF is empty: its highest density ({peak:.3g}) is below what the "
                         "renderer draws, so its views show only the background and there is no surface to mesh",
                         "train again with another {=seed}, a lower {=lambda_sparsity} or a clearer {=prompt}")
    level = threshold
    if peak < threshold:
        level = 0.25 * peak
        warnings.warn(f"no density reaches the mesh threshold {threshold:g} (peak {peak:.3g}); "
                      f"extracting at {level:.3g} instead", stacklevel=3)  # 3: past torch.no_grad's wrapper
    inside = np.argwhere(coarse > level)
    cell = (hi - lo) / (coarse_resolution - 1)
    lo_fine = np.maximum(lo, lo + (inside.min(0) - 1) * cell)
    hi_fine = np.minimum(hi, lo + (inside.max(0) + 1) * cell)
    fine = density_grid(nerf, lo_fine, hi_fine, resolution, tick)
    if fine.max() <= level:  # the coarse grid saw a peak the fine one missed: fall back to the coarse grid
        fine, lo_fine, hi_fine, resolution = coarse, lo, hi, coarse_resolution
    spacing = (hi_fine - lo_fine) / (resolution - 1)
    vertices, faces, _, _ = marching_cubes(fine, level=level, spacing=tuple(spacing))
    vertices = vertices + lo_fine
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=True)
    parts = mesh.split(only_watertight=False)
    if len(parts) > 1:
        largest = max(len(p.faces) for p in parts)
        mesh = trimesh.util.concatenate([p for p in parts if len(p.faces) >= min_component_fraction * largest])
    colours = nerf.field.color(torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32)).to(nerf.device))
    rgba = np.concatenate([(colours.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8),
                           np.full((len(mesh.vertices), 1), 255, np.uint8)], axis=1)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    tick()
    return mesh


def to_y_up(mesh):
    """A copy of ``mesh`` (engine z-up) in file coordinates: y-up, as glTF, OBJ and ComfyUI's Preview3D expect."""
    upright = mesh.copy()
    upright.apply_transform(Z_UP_TO_Y_UP)
    return upright


def mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mesh`` from :func:`extract_mesh` (engine z-up) → the y-up arrays :func:`save_mesh` writes: vertices
    ``[N, 3]`` float32, faces ``[M, 3]`` int64, vertex colours ``[N, 3]`` float32 in [0, 1], linear (as glTF's
    COLOR_0 and ComfyUI's MESH carry them)."""
    upright = to_y_up(mesh)
    colours = srgb_to_linear(np.asarray(upright.visual.vertex_colors, dtype=np.float32)[:, :3] / 255.0)
    return (np.asarray(upright.vertices, dtype=np.float32), np.asarray(upright.faces, dtype=np.int64), colours)


def mesh_from_arrays(vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray | None = None):
    """Vertices ``[N, 3]``, faces ``[M, 3]`` and optional colours ``[N, 3 | 4]`` float in [0, 1] → a
    ``trimesh.Trimesh`` kept exactly as given (no merging, no axis change, colours in their own colour space)."""
    import trimesh

    mesh = trimesh.Trimesh(vertices=np.asarray(vertices, dtype=np.float64), faces=np.asarray(faces, dtype=np.int64),
                           process=False)
    if colours is not None:
        rgba = (np.clip(np.asarray(colours, dtype=np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
        if rgba.shape[1] == 3:
            rgba = np.concatenate([rgba, np.full((len(rgba), 1), 255, np.uint8)], axis=1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh


def _glb_bytes(mesh, metadata: dict[str, str] | None, linear_colours: bool) -> bytes:
    """GLB of ``mesh`` (vertex colours as COLOR_0, which glTF defines as linear: sRGB colours are converted) with
    ``metadata`` in the glTF ``asset.extras``, where ComfyUI's Save GLB puts the workflow (trimesh has no argument
    for it, but lets the glTF tree be edited before packing). trimesh stores COLOR_0 as 8-bit."""
    from trimesh.exchange.gltf import export_glb

    if mesh.visual.kind == "vertex" and not linear_colours:
        mesh = mesh.copy()
        rgba = np.asarray(mesh.visual.vertex_colors, dtype=np.float32) / 255.0
        rgba[:, :3] = srgb_to_linear(rgba[:, :3])
        mesh.visual.vertex_colors = (rgba * 255 + 0.5).astype(np.uint8)

    def add_extras(tree: dict) -> None:
        tree["asset"].setdefault("extras", {}).update(metadata)

    return export_glb(mesh.scene(), tree_postprocessor=add_extras if metadata else None)


def write_mesh(mesh, path: str | os.PathLike, metadata: dict[str, str] | None = None,
               linear_colours: bool = False) -> Path:
    """Write ``mesh`` as it is (already in file coordinates) as GLB, OBJ or PLY (by suffix) with its vertex colours,
    atomically (temp file + rename: a reader never sees half a file). ``metadata`` (str → str) goes into a GLB's
    ``asset.extras``; the other formats have no place for it. Vertex colours are sRGB unless ``linear_colours``; a
    GLB gets them linear (glTF's COLOR_0), OBJ and PLY as given (no colour space in those formats; viewers show
    them as display colours)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if metadata and suffix != ".glb":
        raise ValueError(f"metadata can only be embedded in a .glb file, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        if suffix == ".glb":
            tmp.write_bytes(_glb_bytes(mesh, metadata, linear_colours))
        elif suffix == ".obj":
            mesh.export(tmp, file_type="obj", include_color=True, include_normals=True)
        else:
            mesh.export(tmp, file_type=suffix.lstrip("."))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    return path


def save_mesh(mesh, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``mesh`` (engine z-up, from :func:`extract_mesh`) as GLB or OBJ (by suffix), y-up, with vertex colours,
    atomically; ``metadata`` (str → str, e.g. the workflow JSON) is embedded in a GLB's ``asset.extras``."""
    return write_mesh(to_y_up(mesh), path, metadata)


def export_outputs(nerf: NeRFGenerator, out: str | os.PathLike, views: int = 120, size: int = 512,
                   mesh_resolution: int = 256, mesh_threshold: float = 25.0, background: str = "white",
                   animation: str = "webp") -> list[Path]:
    """Everything a text-to-3D run delivers: ``views/*.png``, ``turntable.<webp|gif>``, ``mesh.glb``, ``mesh.obj``.
    An empty NeRF gets its views and turntable (background only) and one warning line instead of the meshes."""
    out = Path(out)
    turntable = render_turntable(nerf, views=views, size=size, background=background)
    save_views(turntable, out / "views")
    written = [out / "views", save_animation(turntable.rgb, out / f"turntable.{animation}")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mesh = extract_mesh(nerf, resolution=mesh_resolution, threshold=mesh_threshold)
        except EmptyField as exc:
            mesh = None
            sys.stderr.write(f"warning: no mesh written: {exc.problem}\n")
    for warning in caught:
        sys.stderr.write(f"warning: {warning.message}\n")
    if mesh is None:
        return written
    written += [save_mesh(mesh, out / "mesh.glb"), save_mesh(mesh, out / "mesh.obj")]
    return written
