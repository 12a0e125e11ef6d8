"""Host test: the pack's meshes in a real ComfyUI — Train Loop → NeRF to Mesh (ASD) → core Save GLB and Save
Coloured GLB (ASD) — written where ComfyUI writes outputs, loadable by trimesh, with the workflow embedded (skipped
with a clear message when no host is built here; the server is the session's shared ``host`` fixture)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from workflows import comfy_client
from comfy_host import ROOT, fast, host_missing_reason, run_graph

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
