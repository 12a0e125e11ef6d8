"""Makes the README's pictures from a demo/text-to-3d output folder (no GPU, no OpenGL).

    .venv/bin/python docs/make_readme_pictures.py runs/demo docs/images

Writes ``demo_views.jpg`` (every 4th turntable view over its normal map), ``demo_turntable.webp`` (the
turntable at 96 px) and ``demo_mesh.png`` (mesh.glb drawn with a painter's-algorithm rasteriser: triangles sorted
back to front, vertex colours × Lambert shading; good enough for a thumbnail).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def views_strip(run: Path, out: Path, step: int = 4) -> None:
    names = sorted((run / "views").glob("rgb_*.png"))[::step]
    rgb = [Image.open(p).convert("RGB") for p in names]
    normals = [Image.open(run / "views" / p.name.replace("rgb_", "normal_")).convert("RGB") for p in names]
    w, h = rgb[0].size
    strip = Image.new("RGB", (w * len(rgb), 2 * h), "white")
    for i, (a, b) in enumerate(zip(rgb, normals)):
        strip.paste(a, (i * w, 0))
        strip.paste(b, (i * w, h))
    strip.save(out / "demo_views.jpg", quality=85, optimize=True)


def small_turntable(run: Path, out: Path, size: int = 96) -> None:
    frames = []
    with Image.open(run / "turntable.webp") as animation:
        for index in range(animation.n_frames):
            animation.seek(index)
            frames.append(animation.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))
    frames[0].save(out / "demo_turntable.webp", save_all=True, append_images=frames[1:], duration=80, loop=0,
                   quality=80)


def mesh_picture(run: Path, out: Path, size: int = 320) -> None:
    import trimesh

    mesh = trimesh.load(run / "mesh.glb", force="mesh")
    v = mesh.vertices - mesh.vertices.mean(0)
    v = v / np.abs(v).max()
    # y-up file → view from the front-right, slightly above: rotate about y by 35°, tilt by 20°
    a, b = np.radians(35), np.radians(20)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    v = v @ ry.T @ rx.T
    faces = mesh.faces
    tri = v[faces]                                                    # [F, 3, 3]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    light = np.array([0.4, 0.6, 0.7]) / np.linalg.norm([0.4, 0.6, 0.7])
    shade = 0.35 + 0.65 * np.abs(normal @ light)
    colours = np.asarray(mesh.visual.vertex_colors)[faces][:, :, :3].mean(1) / 255.0
    order = np.argsort(tri[:, :, 2].mean(1))                          # far (small z) first
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    px = (tri[:, :, :2] * np.array([1, -1]) * 0.45 + 0.5) * size
    for f in order:
        colour = tuple(int(255 * min(1.0, c * shade[f])) for c in colours[f])
        draw.polygon([tuple(p) for p in px[f]], fill=colour)
    image.save(out / "demo_mesh.png", optimize=True)


if __name__ == "__main__":
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    views_strip(run, out)
    small_turntable(run, out)
    mesh_picture(run, out)
    print(f"wrote {out}/demo_views.jpg, demo_turntable.webp, demo_mesh.png")
