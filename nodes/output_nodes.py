"""ComfyUI nodes that turn a trained NeRF into pictures and meshes (V1 API): Render Views, Export Mesh.

Kept apart from the training nodes in ``asd_nodes.py``; both are thin adapters over ``asd_engine.export``.
"""

from __future__ import annotations

from . import comfy_bridge as host
from .asd_nodes import engine_call


def _nerf_of(result, node: str):
    if result.kind != "nerf" or result.nerf is None:
        raise RuntimeError(f"{node}: needs a text-to-3D result (NeRF Generator); a 2D run's image is the Train "
                           f"Loop's 'preview' output")
    return result.nerf


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
            "result": ("ASD_RESULT", {"tooltip": "From ASD Train Loop or Load ASD Checkpoint (3D)."}),
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
        from ..asd_engine.export import render_turntable

        turntable = render_turntable(_nerf_of(result, "Render Views"), views=views, size=size, elevation=elevation,
                                     distance=distance, fovy=fov, background=background)
        return (turntable.rgb.contiguous(), turntable.depth.expand(-1, -1, -1, 3).contiguous(),
                turntable.alpha[..., 0].contiguous(), turntable.normals.contiguous())


class ASDExportMesh:
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
            "result": ("ASD_RESULT", {"tooltip": "From ASD Train Loop or Load ASD Checkpoint (3D)."}),
            "resolution": ("INT", {"default": 128, "min": 16, "max": 512, "tooltip": "Marching-cubes grid size."}),
            "threshold": ("FLOAT", {"default": 25.0, "min": 0.0, "max": 1000.0, "step": 0.5,
                          "tooltip": "Density isosurface (lowered with a warning if nothing reaches it)."}),
            "format": (["glb", "obj", "glb+obj"], {"default": "glb", "tooltip": "File format(s)."}),
            "filename_prefix": ("STRING", {"default": "asd_mesh", "tooltip": "Files go to output/asd/<prefix>_NNNNN/."}),
        }}

    @engine_call
    def export(self, result, resolution, threshold, format, filename_prefix):
        from ..asd_engine.export import extract_mesh, save_mesh

        mesh = extract_mesh(_nerf_of(result, "Export Mesh"), resolution=resolution, threshold=threshold)
        folder, relative = host.new_output_folder(filename_prefix)
        files = []
        for suffix in format.split("+"):
            save_mesh(mesh, folder / f"mesh.{suffix}")
            files.append({"filename": f"mesh.{suffix}", "subfolder": relative, "type": "output"})
        return {"ui": {"asd_files": files}, "result": (f"{relative}/mesh.{format.split('+')[0]}",)}


NODE_CLASS_MAPPINGS = {
    "ASDRenderViews": ASDRenderViews,
    "ASDExportMesh": ASDExportMesh,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ASDRenderViews": "Render Views (ASD)",
    "ASDExportMesh": "Export Mesh (ASD)",
}
