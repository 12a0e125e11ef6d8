"""ComfyUI nodes that turn a trained NeRF into pictures and meshes (V1 API): Render Views, Export Mesh, NeRF to Mesh,
Save Coloured GLB.

Kept apart from the training nodes in ``asd_nodes.py``; all are thin adapters over ``asd_engine.scene.export``. A result's
NeRF may be cached on the CPU: the work runs on the engine's device and the NeRF goes back where it was. Meshes
cross to other packs as core's ``MESH`` (vertices ``[B, N, 3]`` float, faces ``[B, M, 3]`` int, y-up like every
mesh file the pack writes), with ``vertex_colors`` ``[B, N, 3]`` linear in [0, 1] (core's convention, and glTF's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..asd_engine.devices import default_device
from ..asd_engine.errors import UserInputError
from ..asd_engine.runs.configs import EXPORT_DEFAULTS
from . import comfy_bridge as host
from .asd_nodes import CUSTOM, FROM_PRESET, engine_call

RESULT_INPUT = ("ASD_RESULT", {"tooltip": "From ASD Train Loop or Load ASD Checkpoint (3D)."})
RESOLUTION_INPUT = ("INT", {"default": 128, "min": 16, "max": 512, "tooltip": "Marching-cubes grid size."})
THRESHOLD_INPUT = ("FLOAT", {"default": 25.0, "min": 0.0, "max": 1000.0, "step": 0.5,
                             "tooltip": "Density isosurface, when 'threshold_source' is custom (lowered with a "
                                        "warning if nothing reaches it)."})
THRESHOLD_SOURCE = ([FROM_PRESET, CUSTOM], {"default": FROM_PRESET, "tooltip": "Where 'threshold' comes from: the "
                    "result's preset (" + ", ".join(f"{p} {d['mesh_threshold']:g}" for p, d in EXPORT_DEFAULTS.items())
                    + "), or custom: the 'threshold' value."})


def mesh_threshold(result, threshold_source: str, threshold: float) -> float:
    """The isosurface to mesh ``result`` at: the value when custom, else its preset's."""
    if threshold_source == CUSTOM:
        return threshold
    return EXPORT_DEFAULTS[getattr(result.config, "preset", "quality")]["mesh_threshold"]


def _nerf_of(result, node: str):
    if result.kind != "nerf" or result.nerf is None:
        raise UserInputError("result", f"{node} needs a text-to-3D result (NeRF Generator), not a 2D run's",
                             "a 2D run's image is the Train Loop's 'preview' output")
    return result.nerf


class _NodeProgress:
    """The engine's ``on_progress`` for a node: ComfyUI's progress bar (made at the first report, when the engine
    knows the total) and Cancel, raised as ComfyUI's interrupt from inside the engine's loop."""

    def __init__(self) -> None:
        self.bar: host.Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        host.check_interrupt()
        if self.bar is None:
            self.bar = host.Progress(total)
        self.bar.update(done, total)


def _extract_mesh(result, node: str, resolution: int, threshold: float):
    """The result's mesh (``trimesh.Trimesh``, engine z-up), extracted on the engine's device."""
    from ..asd_engine.scene.export import extract_mesh, on_device

    nerf = _nerf_of(result, node)
    try:
        with on_device(nerf, default_device()):
            mesh = extract_mesh(nerf, resolution=resolution, threshold=threshold, on_progress=_NodeProgress())
    except UserInputError as exc:
        if exc.input_name != "checkpoint":
            raise
        # the engine names the NeRF's source as the CLI has it; on these nodes the NeRF arrives as 'result'
        raise UserInputError("result", exc.problem, exc.fix) from None
    if len(mesh.faces) == 0:  # nothing to write: say so, rather than a file no viewer opens
        raise UserInputError("result", "the NeRF is empty: its mesh has no faces",
                             "train longer (more {=steps}), or check the run's losses")
    return mesh


class ASDRenderViews:
    DESCRIPTION = ("Turntable renders of a trained NeRF: RGB, depth, alpha and normal images around the up axis, "
                   "ready for Save Image or Save Animated WEBP.")
    CATEGORY = "ASD/outputs"
    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("images", "depth", "alpha", "normals")
    OUTPUT_TOOLTIPS = ("RGB views [N, H, W, 3].", "Depth (near = white).", "Opacity masks [N, H, W].",
                       "World-space normals as colours.")
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "result": RESULT_INPUT,
            "views": ("INT", {"default": 36, "min": 1, "max": 360, "tooltip": "Number of views around the object."}),
            "size": ("INT", {"default": 256, "min": 16, "max": 2048, "step": 8, "tooltip": "Image side in pixels."}),
            "elevation": ("FLOAT", {"default": 15.0, "min": -89.0, "max": 89.0, "tooltip": "Camera elevation, degrees."}),
            "distance": ("FLOAT", {"default": 1.5, "min": 0.5, "max": 10.0, "step": 0.05,
                         "tooltip": "Camera distance from the centre (scene radius 1)."}),
            "fov": ("FLOAT", {"default": 70.0, "min": 10.0, "max": 120.0, "tooltip": "Vertical field of view, degrees."}),
            "background": (["white", "black", "learned"], {"default": "white", "tooltip": "Background colour."}),
        }}

    @engine_call
    def render(self, result, views, size, elevation, distance, fov, background):
        from ..asd_engine.scene.export import on_device, render_turntable

        nerf = _nerf_of(result, "Render Views")
        with on_device(nerf, default_device()):
            turntable = render_turntable(nerf, views=views, size=size, elevation=elevation, distance=distance,
                                         fovy=fov, background=background, on_progress=_NodeProgress())
        return (turntable.rgb.contiguous(), turntable.depth.expand(-1, -1, -1, 3).contiguous(),
                turntable.alpha[..., 0].contiguous(), turntable.normals.contiguous())


class ASDExportNeRFMesh:
    DESCRIPTION = ("Marching-cubes mesh of a trained NeRF with vertex colours, written to the output folder as "
                   "GLB and/or OBJ (y-up); connect 'mesh_path' to Preview3D to view it.")
    CATEGORY = "ASD/outputs"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("mesh_path",)
    OUTPUT_TOOLTIPS = ("The first written file, relative to the output folder (Preview3D's model_file).",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "result": RESULT_INPUT,
            "resolution": RESOLUTION_INPUT,
            "threshold_source": THRESHOLD_SOURCE,
            "threshold": THRESHOLD_INPUT,
            "format": (["glb", "obj", "glb+obj"], {"default": "glb", "tooltip": "File format(s)."}),
            "filename_prefix": ("STRING", {"default": "asd_mesh", "tooltip": "Files go to output/asd/<prefix>_NNNNN/."}),
        }}

    @engine_call
    def export(self, result, resolution, threshold_source, threshold, format, filename_prefix):
        from ..asd_engine.scene.export import save_mesh

        mesh = _extract_mesh(result, "Export Mesh", resolution, mesh_threshold(result, threshold_source, threshold))
        folder, relative = host.new_output_folder(filename_prefix)  # only now: a cancelled export leaves no folder
        files = []
        for suffix in format.split("+"):
            save_mesh(mesh, folder / f"mesh.{suffix}")
            files.append({"filename": f"mesh.{suffix}", "subfolder": relative, "type": "output"})
        host.show_text("saved " + ", ".join(host.output_label(folder / f["filename"]) for f in files))
        # "3d", as core Save GLB reports its files (queue history, API clients, the frontend's 3D outputs)
        return {"ui": {"3d": files}, "result": (f"{relative}/mesh.{format.split('+')[0]}",)}


# Every field later core's MESH (comfy_api.latest Types.MESH) has, with its "absent" value: its nodes read them
# directly (Save GLB, Rotate Mesh, ...), so a mesh of ours carries them all whichever class it is.
MESH_FIELDS = {"uvs": None, "vertex_colors": None, "texture": None, "metallic_roughness": None, "vertex_counts": None,
               "face_counts": None, "unlit": False, "normals": None, "tangents": None, "normal_map": None,
               "occlusion_in_mr": False, "material": None, "emissive": None}


class Mesh:
    """Stand-in for core's MESH where the host has none (outside ComfyUI): ``vertices`` ``[B, N, 3]`` float32,
    ``faces`` ``[B, M, 3]`` int64, and the other fields of later core's MESH (:data:`MESH_FIELDS`)."""

    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, **fields) -> None:
        self.vertices = vertices
        self.faces = faces
        for name, absent in MESH_FIELDS.items():
            setattr(self, name, fields.get(name, absent))


def _mesh_class() -> type:
    """Core's public MESH type where the host has one (``comfy_api.latest`` ``Types.MESH``, later core), else the 3D
    nodes' MESH class (ComfyUI 0.3.x, which later core keeps only for old imports), else :class:`Mesh`: so that other
    packs checking for core's class accept ours."""
    if host.in_comfyui():
        try:
            from comfy_api.latest import Types
            if getattr(Types, "MESH", None) is not None:
                return Types.MESH
        except ImportError:
            pass
        try:
            from comfy_extras.nodes_hunyuan3d import MESH
            return MESH
        except ImportError:  # a ComfyUI without the 3D nodes
            pass
    return Mesh


def make_mesh(vertices: torch.Tensor, faces: torch.Tensor, vertex_colors: torch.Tensor | None = None):
    """A MESH of the host's class with every field later core reads (:data:`MESH_FIELDS`), vertex colours linear in
    [0, 1] (core's convention: its Save GLB writes them as glTF's linear COLOR_0 unchanged)."""
    mesh = _mesh_class()(vertices, faces)
    for name, absent in MESH_FIELDS.items():
        if not hasattr(mesh, name):
            setattr(mesh, name, absent)
    mesh.vertex_colors = vertex_colors
    return mesh


class ASDNeRFMesh:
    DESCRIPTION = ("Marching-cubes mesh of a trained NeRF as core's MESH (y-up, like Export Mesh's files), for "
                   "core Save GLB and other packs' 3D nodes; it carries vertex colours for Save Coloured GLB (ASD).")
    CATEGORY = "ASD/outputs"
    RETURN_TYPES = ("MESH",)
    RETURN_NAMES = ("mesh",)
    OUTPUT_TOOLTIPS = ("Core MESH: vertices [1, N, 3], faces [1, M, 3], vertex_colors [1, N, 3] linear in 0..1 "
                       "(ComfyUI 0.3.x's Save GLB ignores the colours; later core's writes them).",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"result": RESULT_INPUT, "resolution": RESOLUTION_INPUT,
                             "threshold_source": THRESHOLD_SOURCE, "threshold": THRESHOLD_INPUT}}

    @engine_call
    def convert(self, result, resolution, threshold_source, threshold):
        from ..asd_engine.scene.export import mesh_arrays

        threshold = mesh_threshold(result, threshold_source, threshold)
        vertices, faces, colours = mesh_arrays(_extract_mesh(result, "NeRF to Mesh", resolution, threshold))
        return (make_mesh(torch.from_numpy(vertices)[None], torch.from_numpy(faces)[None],
                          torch.from_numpy(colours)[None]),)


def _mesh_items(mesh) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Core MESH (optionally with ``vertex_colors`` ``[B, N, 3 | 4]``, and later core's ``vertex_counts`` /
    ``face_counts`` ``[B]`` for zero-padded batches) → per batch item (vertices ``[N, 3]``, faces ``[M, 3]``,
    colours ``[N, 3 | 4]`` or None), checked so a wrong input fails with its name."""
    vertices, faces = getattr(mesh, "vertices", None), getattr(mesh, "faces", None)
    if not (torch.is_tensor(vertices) and torch.is_tensor(faces) and vertices.ndim == 3 and faces.ndim == 3
            and vertices.shape[-1] == 3 and faces.shape[-1] == 3 and len(vertices) == len(faces) > 0):
        raise UserInputError("mesh", "is not a MESH of vertices [B, N, 3] and faces [B, M, 3] with B ≥ 1",
                             "connect NeRF to Mesh (ASD) or another node's MESH output")
    colours = getattr(mesh, "vertex_colors", None)
    colours = None if colours is None else torch.as_tensor(colours)
    if colours is not None and (colours.shape[:2] != vertices.shape[:2] or colours.shape[-1] not in (3, 4)):
        raise UserInputError("mesh", f"its vertex_colors {tuple(colours.shape)} do not fit its vertices "
                             f"{tuple(vertices.shape)}", "give one RGB colour per vertex [B, N, 3], or none")
    counts = [getattr(mesh, "vertex_counts", None), getattr(mesh, "face_counts", None)]
    if any(c is not None for c in counts):
        if any(c is None or len(c) != len(vertices) for c in counts):
            raise UserInputError("mesh", "has vertex_counts or face_counts without the other, or not one per item",
                                 "give both [B], or neither")
        counts = [[int(n) for n in c] for c in counts]
    else:
        counts = [[vertices.shape[1]] * len(vertices), [faces.shape[1]] * len(faces)]
    return [(vertices[i, :nv].detach().float().cpu().numpy(), faces[i, :nf].detach().long().cpu().numpy(),
             None if colours is None else colours[i, :nv].detach().float().cpu().numpy())
            for i, (nv, nf) in enumerate(zip(*counts))]


def _workflow_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> dict[str, str]:
    """What core Save GLB embeds: ``prompt`` and each ``extra_pnginfo`` entry (the UI workflow) as JSON strings;
    nothing when ComfyUI runs with ``--disable-metadata``."""
    if host.in_comfyui():
        from comfy.cli_args import args

        if args.disable_metadata:
            return {}
    metadata = {} if prompt is None else {"prompt": json.dumps(prompt)}
    metadata.update({key: json.dumps(value) for key, value in (extra_pnginfo or {}).items()})
    return metadata


def _glb_targets(prefix: str, count: int) -> list[tuple[Path, dict[str, str]]]:
    """``count`` new GLB paths with their UI records: ComfyUI's own numbering (as core Save GLB) inside ComfyUI,
    files in a fresh ``output/asd/<prefix>_NNNNN`` folder outside."""
    if host.in_comfyui():
        import folder_paths

        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix,
                                                                              folder_paths.get_output_directory())
        names = [f"{name}_{counter + i:05}_.glb" for i in range(count)]
    else:
        folder, subfolder = host.new_output_folder(prefix)
        names = [f"mesh_{i:05}.glb" for i in range(count)]
    return [(Path(folder) / n, {"filename": n, "subfolder": subfolder, "type": "output"}) for n in names]


class ASDSaveMeshGLB:
    DESCRIPTION = ("Saves a MESH as GLB files (one per batch item) with its vertex colours when it has them (from "
                   "NeRF to Mesh) and the workflow embedded like core Save GLB; connect 'mesh_path' to Preview3D "
                   "to view it.")
    CATEGORY = "ASD/outputs"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("mesh_path",)
    OUTPUT_TOOLTIPS = ("The first written file, relative to the output folder (Preview3D's model_file).",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mesh": ("MESH", {"tooltip": "From NeRF to Mesh (ASD) (coloured) or any node's MESH (plain)."}),
            "filename_prefix": ("STRING", {"default": "asd_mesh",
                                "tooltip": "File name prefix in the output folder; may contain subfolders."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    @engine_call
    def save(self, mesh, filename_prefix, prompt=None, extra_pnginfo=None):
        from ..asd_engine.scene.export import mesh_from_arrays, write_mesh

        items = _mesh_items(mesh)
        metadata = _workflow_metadata(prompt, extra_pnginfo) or None
        records = []
        paths = []
        for (path, record), (vertices, faces, colours) in zip(_glb_targets(filename_prefix, len(items)), items):
            write_mesh(mesh_from_arrays(vertices, faces, colours), path, metadata, linear_colours=True)
            records.append(record)
            paths.append(path)
        host.show_text("saved " + ", ".join(host.output_label(path) for path in paths))
        # "3d" as core Save GLB reports its files (queue history, clients); the frontend's in-node viewer is wired
        # to the SaveGLB class only, hence the mesh_path output for Preview3D
        first = records[0]
        relative = f"{first['subfolder']}/{first['filename']}" if first["subfolder"] else first["filename"]
        return {"ui": {"3d": records}, "result": (relative,)}


NODE_CLASS_MAPPINGS = {
    "ASDRenderViews": ASDRenderViews,
    "ASDExportNeRFMesh": ASDExportNeRFMesh,
    "ASDNeRFMesh": ASDNeRFMesh,
    "ASDSaveMeshGLB": ASDSaveMeshGLB,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ASDRenderViews": "Render Views (ASD)",
    "ASDExportNeRFMesh": "Export Mesh (ASD)",
    "ASDNeRFMesh": "NeRF to Mesh (ASD)",
    "ASDSaveMeshGLB": "Save Coloured GLB (ASD)",
}
