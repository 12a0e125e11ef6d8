"""Makes docs/quality.md's torus picture from quality-harness folders (their kept checkpoints; no GPU).

    .venv/bin/python docs/make_torus_pictures.py OUT.png LABEL=HARNESS_DIR [LABEL=HARNESS_DIR ...]

One row per torus prompt (seed 0 of the first folder's tori; blank where a folder has no such run), per folder three
panels: the NeRF from the evaluation orbit (15°), the NeRF from above (75°, where the hole shows) and the mesh's solid
seen from above (black where the solid inside the toy export's isosurface covers a column: what ``mesh.glb`` holds);
the truth first, the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the engine is the repository's
from asd_engine.runs.text_to_3d import load_nerf  # noqa: E402
from asd_engine.scene.export import density_grid, render_turntable  # noqa: E402
from asd_engine.toy.data import shape_sdf, truth_views  # noqa: E402
from asd_engine.scene.field import FieldConfig  # noqa: E402
from asd_engine.toy.quality import GEOMETRY_RESOLUTION, MESH_LEVEL, TOP_ELEVATION, grid_points  # noqa: E402

SIZE = 96


def _image(rgb: torch.Tensor) -> Image.Image:
    """``[H, W, 3]`` or ``[3, H, W]`` in [0, 1] → a SIZE × SIZE picture."""
    if rgb.shape[0] == 3:
        rgb = rgb.permute(1, 2, 0)
    array = (rgb.clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    return Image.fromarray(array).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def _from_above(solid: np.ndarray) -> Image.Image:
    """A ``[n, n, n]`` (x, y, z) solid seen from above: black where a column holds any of it."""
    covered = solid.any(axis=2).T[::-1]            # rows: y from top to bottom, columns: x
    return Image.fromarray(np.where(covered, 0, 255).astype(np.uint8)).convert("RGB").resize(
        (SIZE, SIZE), Image.Resampling.NEAREST)


def _crop(n: int) -> slice:
    """The middle half of the grid: the toy shapes fit within |p| ≤ 0.5 of the radius-1 scene."""
    return slice(n // 4, 3 * n // 4)


def panels_of_nerf(nerf) -> list[Image.Image]:
    side = render_turntable(nerf, views=1, size=SIZE).rgb[0]
    top = render_turntable(nerf, views=1, size=SIZE, elevation=TOP_ELEVATION).rgb[0]
    radius, n = nerf.field_config.radius, GEOMETRY_RESOLUTION
    solid = density_grid(nerf, np.full(3, -radius), np.full(3, radius), n) > MESH_LEVEL
    return [_image(side), _image(top), _from_above(solid[_crop(n), _crop(n)])]


def panels_of_truth(shape: str, colour: str) -> list[Image.Image]:
    side, _ = truth_views(shape, colour, views=1, size=SIZE)
    top, _ = truth_views(shape, colour, views=1, size=SIZE, elevation=TOP_ELEVATION)
    n = GEOMETRY_RESOLUTION  # the toy NeRF's own scene cube (toy-cpu keeps FieldConfig's radius)
    solid = (shape_sdf(shape, grid_points(FieldConfig().radius, n)) < 0).view(n, n, n).numpy()
    return [_image(side[0]), _image(top[0]), _from_above(solid[_crop(n), _crop(n)])]


def main(out: Path, folders: list[tuple[str, Path]]) -> None:
    first = folders[0][1] / "checkpoints"
    tori = sorted(d.name.split("__")[1] for d in first.iterdir() if "torus" in d.name and d.name.endswith("seed0"))
    labels = ["truth"] + [label for label, _ in folders]
    rows = []
    for name in tori:
        colour = name.split("_")[1]
        row = panels_of_truth("torus", colour)
        for _, folder in folders:
            checkpoint = next((folder / "checkpoints").glob(f"*__{name}__seed0"), None)
            if checkpoint is None:  # this folder has no run of that prompt: blank panels
                row += [Image.new("RGB", (SIZE, SIZE), "white")] * 3
                continue
            nerf, _, _ = load_nerf(checkpoint)
            row += panels_of_nerf(nerf)
        rows.append(row)
    head = 18
    picture = Image.new("RGB", (SIZE * 3 * len(labels), head + SIZE * len(rows)), "white")
    draw = ImageDraw.Draw(picture)
    for i, label in enumerate(labels):
        draw.text((i * 3 * SIZE + 4, 3), f"{label}: 15°, 75°, mesh from above", fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            picture.paste(panel, (c * SIZE, head + r * SIZE))
    picture.save(out, optimize=True)
    print(f"wrote {out}: rows {', '.join(tori)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(Path(sys.argv[1]), [(a.split("=", 1)[0], Path(a.split("=", 1)[1])) for a in sys.argv[2:]])
