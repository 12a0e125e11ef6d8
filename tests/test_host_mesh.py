"""Host tests: the pack's meshes in a real ComfyUI — Train Loop → NeRF to Mesh (ASD) → core Save GLB and Save
Coloured GLB (ASD) — written where ComfyUI writes outputs, loadable by trimesh, with the workflow embedded; and a GLB's
colours in the real web page's 3D viewer (skipped with a clear message when no host or browser is here; the server is
the session's shared ``host`` fixture)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from workflows import comfy_client
from comfy_host import ROOT, browser_env, browser_missing_reason, fast, host_missing_reason, run_graph

reason = host_missing_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")


def _glb_json(path: Path) -> dict:
    """The glTF JSON chunk of a GLB (after the 12-byte header and the 8-byte chunk header)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[12:16])
    return json.loads(data[20:20 + length])


def test_nerf_to_mesh_feeds_core_save_glb_and_the_coloured_saver(host, tmp_path):
    import trimesh

    workflow = comfy_client.load_workflow(ROOT / "workflows" / "api" / "text_to_3d_asd.json")
    graph = fast({key: workflow[key] for key in ("1", "2", "3", "4")})  # prior → φ → NeRF → Train Loop (3 steps)
    graph["20"] = {"class_type": "ASDNeRFMesh", "inputs": {"result": ["4", 0], "resolution": 32, "threshold_source": "custom",
                                                  "threshold": 25.0}}
    graph["21"] = {"class_type": "SaveGLB", "inputs": {"mesh": ["20", 0], "filename_prefix": "host_mesh/core"}}
    graph["22"] = {"class_type": "ASDSaveMeshGLB", "inputs": {"mesh": ["20", 0], "filename_prefix": "host_mesh/asd"}}
    _, status, downloaded = run_graph(host, graph, tmp_path)
    assert status == "success", status + host.log_text()[-3000:]
    folder = host.base / "output" / "host_mesh"
    (core,), (ours,) = sorted(folder.glob("core_*.glb")), sorted(folder.glob("asd_*.glb"))
    assert {p.name for p in downloaded} >= {core.name, ours.name}  # both announced as "3d" UI outputs

    core_mesh = trimesh.load(core, force="mesh")
    our_mesh = trimesh.load(ours, force="mesh")
    assert len(core_mesh.faces) > 0 and len(our_mesh.faces) == len(core_mesh.faces)
    assert np.allclose(core_mesh.bounds, our_mesh.bounds, atol=1e-5)  # same MESH, same axes in both files
    assert our_mesh.visual.kind == "vertex" and len(np.unique(our_mesh.visual.vertex_colors, axis=0)) > 1

    extras = _glb_json(ours)["asset"]["extras"]
    prompt = json.loads(extras["prompt"])
    assert prompt["20"]["class_type"] == "ASDNeRFMesh" and prompt["22"]["class_type"] == "ASDSaveMeshGLB"
    assert json.loads(_glb_json(core)["asset"]["extras"]["prompt"]) == prompt  # embedded exactly as core does


def _saturation(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean HSV saturation (max − min) / max of the ``mask`` pixels of an ``[H, W, 3]`` image in [0, 1]."""
    pixels = rgb[mask]
    top = pixels.max(axis=1)
    return float(((top - pixels.min(axis=1)) / np.maximum(top, 1e-6)).mean())


@pytest.mark.skipif(browser_missing_reason() is not None, reason=browser_missing_reason() or "")
def test_a_glb_in_the_frontends_3d_viewer_has_the_turntables_colours(host, tmp_path):
    """The same red NeRF as a turntable render and as GLBs in core Load 3D's viewer (three.js, which reads COLOR_0
    as linear and shows sRGB): the GLB written the old way (sRGB values in COLOR_0) is washed out, the one written
    now (linear) has the turntable's saturation. ASD_WRITE_VIEWER_PICTURE=1 refreshes the picture in docs/nodes.md."""
    import os
    import shutil
    import subprocess

    import torch
    from PIL import Image

    from asd_engine.scene.export import extract_mesh, render_turntable, save_mesh, to_y_up, write_mesh
    from test_export_nodes import _nerf

    red = (0.8, 0.15, 0.1)
    nerf = _nerf()
    nerf.field.color = lambda p: p.new_tensor(red).expand(p.shape[0], 3)
    mesh = extract_mesh(nerf, resolution=64)
    folder = host.base / "input" / "3d" / f"asd_viewer_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    write_mesh(to_y_up(mesh), folder / "before.glb", linear_colours=True)  # the previous writer: no conversion
    save_mesh(mesh, folder / "after.glb")
    with torch.no_grad():
        turntable = render_turntable(nerf, views=1, size=256, elevation=25.0, distance=1.6)
    turntable_rgb = turntable.rgb[0].numpy()
    turntable_saturation = _saturation(turntable_rgb, turntable.alpha[0, ..., 0].numpy() > 0.9)

    files = [f"3d/{folder.name}/before.glb", f"3d/{folder.name}/after.glb"]
    proc = subprocess.run(["node", str(ROOT / "tests" / "ui" / "mesh_viewer.mjs"), host.url, str(tmp_path), *files],
                          env=browser_env(), capture_output=True, text=True, timeout=300)
    shutil.rmtree(folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == files
    shots = [np.asarray(Image.open(tmp_path / f"viewer_{i}.png").convert("RGB"), dtype=np.float32) / 255 for i in (0, 1)]
    # the object's pixels: red clearly above green and blue (the viewer's background and grid are grey)
    masks = [(shot[..., 0] - shot[..., 1:].max(axis=-1)) > 0.08 for shot in shots]
    assert all(mask.sum() > 2000 for mask in masks), [int(m.sum()) for m in masks]
    before, after = (_saturation(shot, mask) for shot, mask in zip(shots, masks))
    print(f"\nsaturation: turntable {turntable_saturation:.3f}, viewer before {before:.3f}, after {after:.3f}")
    assert abs(after - turntable_saturation) < 0.08, (turntable_saturation, before, after)
    assert before < turntable_saturation - 0.15, (turntable_saturation, before, after)
    if os.environ.get("ASD_WRITE_VIEWER_PICTURE"):
        tiles = [Image.fromarray((turntable_rgb * 255 + 0.5).astype(np.uint8))] + [
            Image.open(tmp_path / f"viewer_{i}.png").convert("RGB") for i in (0, 1)]
        height = 256
        tiles = [t.resize((round(t.width * height / t.height), height), Image.LANCZOS) for t in tiles]
        sheet = Image.new("RGB", (sum(t.width for t in tiles) + 16 * (len(tiles) - 1), height), "white")
        x = 0
        for tile in tiles:
            sheet.paste(tile, (x, 0))
            x += tile.width + 16
        sheet.save(ROOT / "docs" / "images" / "glb_viewer_colours.png", optimize=True)
