"""Meshes and renders for other nodes: progress and cancel, NeRF to Mesh (core MESH, y-up), Save Coloured GLB (vertex
colours + workflow metadata), and a CPU-cached NeRF staying on the CPU. Plain Python, no ComfyUI, nothing trained."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from asd_engine.scene.export import extract_mesh, mesh_arrays, render_turntable, save_mesh
from asd_engine.scene.field import FieldConfig
from asd_engine.scene.nerf import NeRFGenerator
from asd_engine.scene.render import RenderConfig

CENTRE = (0.0, 0.0, 0.3)  # engine z-up: the ball sits above the origin, so in y-up files its vertices have y ≈ 0.3


class _BallField(torch.nn.Module):
    """Stands in for NeRFField: a ball of density 100 and radius 0.4 around CENTRE, coloured by position (so that a
    colour mix-up between vertices shows)."""

    def density(self, p: torch.Tensor) -> torch.Tensor:
        return ((p - p.new_tensor(CENTRE)).norm(dim=-1) < 0.4).float() * 100.0

    def color(self, p: torch.Tensor) -> torch.Tensor:
        return ((p + 1.0) / 2.0).clamp(0, 1)

    def forward(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # what the renderer calls
        return self.density(p), self.color(p)

    def normals(self, p: torch.Tensor) -> torch.Tensor:
        offset = p - p.new_tensor(CENTRE)
        return offset / offset.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _nerf(ball: bool = True) -> NeRFGenerator:
    """A tiny NeRF on the CPU: the ball field, or the untrained hash-grid field (a blob of density ≈ 10)."""
    nerf = NeRFGenerator(FieldConfig(n_levels=2, log2_hashmap_size=10, hidden_dim=8), RenderConfig())
    if ball:
        nerf.field = _BallField()
    return nerf


def _result(nerf: NeRFGenerator) -> SimpleNamespace:
    """What the output nodes read of an ASD_RESULT."""
    return SimpleNamespace(kind="nerf", nerf=nerf, step=0, config=None)


def _glb_json(path: Path) -> dict:
    """The glTF JSON chunk of a GLB: 12-byte header, then chunk length, chunk type 'JSON', the JSON."""
    data = path.read_bytes()
    magic, version, _ = struct.unpack("<4sII", data[:12])
    length, kind = struct.unpack("<II", data[12:20])
    assert magic == b"glTF" and version == 2 and kind == 0x4E4F534A
    return json.loads(data[20:20 + length])


@pytest.fixture
def out_nodes(pack):
    return __import__(pack.__name__ + ".nodes.output_nodes", fromlist=["NODE_CLASS_MAPPINGS"])


# ---------------------------------------------------------------------------------------------- engine
def test_progress_counts_reach_their_totals():
    nerf = _nerf(ball=False)
    calls = []
    render_turntable(nerf, views=3, size=16, on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    # coarse 64³ = one chunk, fine 80³ = two chunks, then the colouring
    mesh = extract_mesh(nerf, resolution=80, threshold=5.0, on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(mesh.faces) > 0


def test_an_exception_from_the_callback_propagates_and_nothing_is_written(out_nodes, tmp_path, monkeypatch):
    class Cancelled(Exception):
        pass

    def cancel_at_second(done: int, total: int) -> None:
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        extract_mesh(_nerf(), resolution=32, on_progress=cancel_at_second)
    with pytest.raises(Cancelled):
        render_turntable(_nerf(ball=False), views=3, size=16, on_progress=cancel_at_second)
    # through the node, as ComfyUI's Cancel does it: the interrupt check raises inside the engine's loop
    monkeypatch.chdir(tmp_path)
    checks = []

    def interrupt() -> None:
        checks.append(1)
        if len(checks) == 2:
            raise Cancelled

    monkeypatch.setattr(out_nodes.host, "check_interrupt", interrupt)
    nerf = _nerf()
    with pytest.raises(Cancelled):
        out_nodes.ASDExportNeRFMesh().export(_result(nerf), 32, "custom", 25.0, "glb+obj", "cancelled")
    assert not (tmp_path / "output").exists() and nerf.device.type == "cpu"


def test_glb_metadata_goes_into_asset_extras_and_colours_survive(tmp_path):
    import trimesh

    mesh = extract_mesh(_nerf(), resolution=32)
    metadata = {"prompt": json.dumps({"4": {"class_type": "ASDTrain"}}), "workflow": json.dumps({"nodes": []})}
    path = save_mesh(mesh, tmp_path / "m.glb", metadata=metadata)
    assert _glb_json(path)["asset"]["extras"] == metadata
    loaded = trimesh.load(path, force="mesh")
    assert loaded.visual.kind == "vertex" and len(loaded.faces) == len(mesh.faces)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.glb"]  # no temp file left
    with pytest.raises(ValueError, match="glb"):
        save_mesh(mesh, tmp_path / "m.obj", metadata=metadata)


# ---------------------------------------------------------------------------------------------- nodes
def test_nerf_to_mesh_is_a_core_mesh_in_the_files_y_up_axes(out_nodes, tmp_path):
    import trimesh

    nerf = _nerf()
    (mesh,) = out_nodes.ASDNeRFMesh().convert(_result(nerf), 32, "custom", 25.0)
    n, m = mesh.vertices.shape[1], mesh.faces.shape[1]
    assert mesh.vertices.shape == (1, n, 3) and mesh.vertices.dtype == torch.float32 and n > 0
    assert mesh.faces.shape == (1, m, 3) and mesh.faces.dtype == torch.int64 and m > 0
    assert mesh.vertex_colors.shape == (1, n, 3) and mesh.vertex_colors.dtype == torch.float32
    assert 0.0 <= float(mesh.vertex_colors.min()) and float(mesh.vertex_colors.max()) <= 1.0
    centre = mesh.vertices[0].mean(0)
    assert abs(float(centre[1]) - CENTRE[2]) < 0.05 and abs(float(centre[2])) < 0.05  # engine +z is file +y
    # the same arrays as Export Mesh's file
    engine_mesh = extract_mesh(nerf, resolution=32)
    vertices, faces, colours = mesh_arrays(engine_mesh)
    assert np.allclose(mesh.vertices[0].numpy(), vertices) and np.array_equal(mesh.faces[0].numpy(), faces)
    filed = trimesh.load(save_mesh(engine_mesh, tmp_path / "export.glb"), force="mesh")
    assert np.allclose(np.sort(filed.vertices, axis=0), np.sort(vertices, axis=0), atol=1e-5)
    expected = (colours * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(filed.visual.vertex_colors[:, :3][np.lexsort(filed.vertices.T)],
                          expected[np.lexsort(vertices.T)])


def test_save_coloured_glb_writes_colours_and_the_workflow(out_nodes, tmp_path, monkeypatch):
    import trimesh

    monkeypatch.chdir(tmp_path)  # outside ComfyUI, outputs go to ./output
    (mesh,) = out_nodes.ASDNeRFMesh().convert(_result(_nerf()), 32, "custom", 25.0)
    prompt, extra = {"4": {"class_type": "ASDTrain", "inputs": {}}}, {"workflow": {"nodes": [1, 2]}}
    out = out_nodes.ASDSaveMeshGLB().save(mesh, "coloured", prompt=prompt, extra_pnginfo=extra)
    (record,) = out["ui"]["3d"]
    path = tmp_path / "output" / record["subfolder"] / record["filename"]
    assert record["type"] == "output" and out["result"][0] == f"{record['subfolder']}/{record['filename']}"
    expected_extras = {"prompt": json.dumps(prompt), "workflow": json.dumps(extra["workflow"])}
    assert _glb_json(path)["asset"]["extras"] == expected_extras
    loaded = trimesh.load(path, force="mesh")
    assert len(loaded.faces) == mesh.faces.shape[1] and loaded.visual.kind == "vertex"
    expected = (mesh.vertex_colors[0].numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(loaded.visual.vertex_colors[:, :3], expected)
    # a plain core MESH (no colours, int32 faces, batch of two): plain GLBs, no metadata without a prompt
    plain = out_nodes.Mesh(mesh.vertices.expand(2, -1, -1), mesh.faces.int().expand(2, -1, -1))
    records = out_nodes.ASDSaveMeshGLB().save(plain, "plain")["ui"]["3d"]
    assert len(records) == 2
    for record in records:
        path = tmp_path / "output" / record["subfolder"] / record["filename"]
        assert "extras" not in _glb_json(path)["asset"] and len(trimesh.load(path, force="mesh").faces) > 0
    with pytest.raises(RuntimeError, match="mesh: .*vertices"):
        out_nodes.ASDSaveMeshGLB().save(SimpleNamespace(vertices=torch.zeros(5, 3)), "bad")


def test_a_nerf_on_the_cpu_stays_there_and_the_work_runs_on_the_engine_device(out_nodes, monkeypatch):
    nerf = _nerf(ball=False)
    images, _, _, _ = out_nodes.ASDRenderViews().render(_result(nerf), 2, 16, 15.0, 1.5, 70.0, "white")
    assert images.shape == (2, 16, 16, 3) and nerf.device.type == "cpu"
    # an accelerator as the engine's device: the NeRF is sent there for the work and back afterwards, also when the
    # work fails (no accelerator here: the spy records the moves instead of making them)
    moves = []
    monkeypatch.setattr(out_nodes, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(nerf, "to", lambda device: moves.append(torch.device(device)) or nerf)
    out_nodes.ASDNeRFMesh().convert(_result(nerf), 32, "custom", 5.0)
    assert moves == [torch.device("cuda"), torch.device("cpu")]
    moves.clear()
    monkeypatch.setattr(out_nodes.host, "check_interrupt", lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        out_nodes.ASDRenderViews().render(_result(nerf), 2, 16, 15.0, 1.5, 70.0, "white")
    assert moves == [torch.device("cuda"), torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_nerf_renders_on_cuda_and_returns_to_the_cpu(out_nodes, monkeypatch):
    nerf = _nerf(ball=False)
    monkeypatch.setattr(out_nodes, "default_device", lambda: torch.device("cuda"))
    seen = []
    monkeypatch.setattr(out_nodes.host, "check_interrupt", lambda: seen.append(nerf.device.type))
    images, _, _, _ = out_nodes.ASDRenderViews().render(_result(nerf), 2, 16, 15.0, 1.5, 70.0, "white")
    assert seen == ["cuda", "cuda"] and nerf.device.type == "cpu" and images.device.type == "cpu"


# ---------------------------------------------------------------------------------------------- colour space, MESH
def test_glb_vertex_colours_are_linear_and_obj_colours_are_the_renders(tmp_path):
    """glTF's COLOR_0 is linear: a GLB stores the field's sRGB colour converted (sRGB 0.5 → linear 0.214, where
    writing it unconverted made viewers show 0.735: washed out); OBJ has no colour space and keeps the display colour."""
    import trimesh

    from asd_engine.images import srgb_to_linear

    nerf = _nerf()
    nerf.field.color = lambda p: torch.full_like(p, 0.5)
    mesh = extract_mesh(nerf, resolution=32)
    glb = trimesh.load(save_mesh(mesh, tmp_path / "m.glb"), force="mesh").visual.vertex_colors[:, :3]
    obj = trimesh.load(save_mesh(mesh, tmp_path / "m.obj"), force="mesh").visual.vertex_colors[:, :3]
    assert np.all(obj == 128) and np.all(glb == 55)  # 0.5 → 128/255 sRGB; 0.214 → 55/255 linear
    assert abs(float(srgb_to_linear(np.array(0.5))) - 0.2140) < 1e-4
    assert float(srgb_to_linear(np.array(0.0))) == 0.0 and float(srgb_to_linear(np.array(1.0))) == pytest.approx(1.0)
    _, _, colours = mesh_arrays(mesh)  # what NeRF to Mesh puts in the MESH: linear too
    assert np.allclose(colours, srgb_to_linear(np.full(3, 128 / 255)), atol=1e-6)


def test_nerf_to_mesh_carries_every_field_later_core_reads(out_nodes):
    (mesh,) = out_nodes.ASDNeRFMesh().convert(_result(_nerf()), 32, "custom", 25.0)
    for name, absent in out_nodes.MESH_FIELDS.items():
        assert hasattr(mesh, name), name
        if name != "vertex_colors":
            assert getattr(mesh, name) == absent, name


def test_the_mesh_class_is_cores_public_type_then_the_3d_nodes_class(out_nodes, monkeypatch):
    """Inside a later ComfyUI the MESH is comfy_api.latest's Types.MESH (constructed as later core does:
    vertices, faces, then keywords); inside 0.3.x the 3D nodes' MESH (vertices, faces only), given the fields."""
    import sys
    from types import ModuleType

    class LaterMesh:  # later core's signature: every field a keyword, vertex_counts and face_counts together
        def __init__(self, vertices, faces, uvs=None, vertex_colors=None, vertex_counts=None, face_counts=None):
            self.vertices, self.faces, self.uvs, self.vertex_colors = vertices, faces, uvs, vertex_colors
            self.vertex_counts, self.face_counts = vertex_counts, face_counts

    class OldMesh:
        def __init__(self, vertices, faces):
            self.vertices, self.faces = vertices, faces

    latest, hunyuan = ModuleType("comfy_api.latest"), ModuleType("comfy_extras.nodes_hunyuan3d")
    latest.Types, hunyuan.MESH = SimpleNamespace(MESH=LaterMesh), OldMesh
    monkeypatch.setattr(out_nodes.host, "in_comfyui", lambda: True)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.setitem(sys.modules, "comfy_extras.nodes_hunyuan3d", hunyuan)
    v, f, c = torch.zeros(1, 3, 3), torch.tensor([[[0, 1, 2]]]), torch.ones(1, 3, 3)
    later = out_nodes.make_mesh(v, f, c)
    assert type(later) is LaterMesh and later.vertex_colors is c and later.normals is None and later.unlit is False
    latest.Types = SimpleNamespace()  # ComfyUI 0.3.64: Types without MESH
    old = out_nodes.make_mesh(v, f, c)
    assert type(old) is OldMesh and old.vertex_colors is c and old.vertex_counts is None and old.material is None
    monkeypatch.delitem(sys.modules, "comfy_extras.nodes_hunyuan3d")
    monkeypatch.setitem(sys.modules, "comfy_extras", None)  # no 3D nodes at all: the stand-in
    assert type(out_nodes.make_mesh(v, f, c)) is out_nodes.Mesh


def test_save_coloured_glb_honours_later_cores_padded_batches(out_nodes, tmp_path, monkeypatch):
    """Later core pads a batch of meshes of different sizes and says each one's real counts: only those are saved."""
    import trimesh

    monkeypatch.chdir(tmp_path)
    vertices = torch.tensor([[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 0], [1, 0, 0], [0, 1, 0], [9, 9, 9]]],
                            dtype=torch.float32)
    faces = torch.tensor([[[0, 1, 2], [0, 1, 3]], [[0, 1, 2], [0, 0, 0]]])
    mesh = out_nodes.Mesh(vertices, faces, vertex_counts=torch.tensor([4, 3]), face_counts=torch.tensor([2, 1]))
    records = out_nodes.ASDSaveMeshGLB().save(mesh, "padded")["ui"]["3d"]
    loaded = [trimesh.load(tmp_path / "output" / r["subfolder"] / r["filename"], force="mesh", process=False)
              for r in records]
    assert [(len(m.vertices), len(m.faces)) for m in loaded] == [(4, 2), (3, 1)]
    with pytest.raises(RuntimeError, match="vertex_counts or face_counts"):
        out_nodes.ASDSaveMeshGLB().save(out_nodes.Mesh(vertices, faces, vertex_counts=torch.tensor([4, 3])), "bad")
