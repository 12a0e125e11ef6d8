"""Writes the pack's shareable workflows in both ComfyUI formats from one description per graph.

UI format (``workflows/NAME.json``): what the canvas saves and loads — ComfyUI lists it in its template browser
(it scans a pack's ``workflows/`` folder as well as ``example_workflows/``). API format (``workflows/api/NAME.json``):
what ``POST /prompt`` and ``python workflows/comfy_client.py`` take. ``tests/test_workflows.py`` converts every UI
file back to the API form and checks that the two describe the same graph.

Run from the repository root after changing a graph or a node's inputs: ``python workflows/make_workflows.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Inputs of the core nodes used here (ComfyUI v0.3.x): (name, type) in declaration order.
CORE_INPUTS = {
    "SaveImage": [("images", "IMAGE"), ("filename_prefix", "STRING")],
    "SaveAnimatedWEBP": [("images", "IMAGE"), ("filename_prefix", "STRING"), ("fps", "FLOAT"),
                         ("lossless", "BOOLEAN"), ("quality", "INT"), ("method", "COMBO")],
    "Preview3D": [("model_file", "STRING")],
    "CheckpointLoaderSimple": [("ckpt_name", "COMBO")],
    "SaveGLB": [("mesh", "MESH"), ("filename_prefix", "STRING")],
    "LossGraphNode": [("loss", "LOSS_MAP"), ("filename_prefix", "STRING")],
}
CORE_OUTPUTS: dict[str, list[tuple[str, str]]] = {
    "SaveImage": [], "SaveAnimatedWEBP": [], "Preview3D": [], "SaveGLB": [], "LossGraphNode": [],
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
}
# Models a graph needs, by file name: the frontend offers the download when a node's properties.models names the
# file its widget selects (the official ASD recipe's prior is Stable Diffusion 2.1 base, 512 px, ε-prediction).
MODELS = {
    "v2-1_512-ema-pruned.safetensors": {
        "name": "v2-1_512-ema-pruned.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors",
    },
}
LINK_TYPES = {"IMAGE", "MASK"}


def load_pack():
    name = "comfyui_asd_workflows"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def node_inputs(class_type: str) -> list[tuple[str, str]]:
    """(name, type) of every input in declaration order; combos are "COMBO"."""
    if class_type in CORE_INPUTS:
        return CORE_INPUTS[class_type]
    spec = load_pack().NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    return [(name, "COMBO" if isinstance(value[0], list) else value[0]) for name, value in inputs.items()]


def node_outputs(class_type: str) -> list[tuple[str, str]]:
    if class_type in CORE_OUTPUTS:
        return CORE_OUTPUTS[class_type]
    cls = load_pack().NODE_CLASS_MAPPINGS[class_type]
    return list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES))


def is_widget(kind: str) -> bool:
    return kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def input_options(class_type: str, name: str) -> dict:
    if class_type in CORE_INPUTS:
        return {}
    spec = load_pack().NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    value = {**spec.get("required", {}), **spec.get("optional", {})}[name]
    return value[1] if len(value) > 1 else {}


def has_seed_control(class_type: str, name: str) -> bool:
    """Whether the ComfyUI frontend adds a 'control_after_generate' widget value after this input: when the input
    asks for one, or (by the frontend's legacy rule) when an INT is named seed / noise_seed and does not say."""
    return input_options(class_type, name).get("control_after_generate", name in ("seed", "noise_seed"))


# ------------------------------------------------------------------------------------------------- graphs
# Each node: id → (class_type, title, (x, y), {input: value | (source id, output slot)})
TOY_PRIOR = "asd-toy-prior (embedded, 32 px)"


def prior_and_phi(camera_embedding: bool) -> dict:
    """Nodes 1 (Load SD Model, the embedded prior) and 2 (φ: LoRA rank 4, learning rate and γ from the prior's
    recipe) that the toy graphs start with."""
    return {
        1: ("ASDLoadPrior", "Load SD Model", (40, 60), {"model": TOY_PRIOR, "precision": "auto", "prediction_type": "auto"}),
        2: ("ASDDiscriminatorLoRA", "ASD Discriminator (LoRA)", (40, 240),
            {"lora_rank": 4, "lora_targets": "from prior", "learning_rate_source": "from prior",
             "learning_rate": 1e-4, "gamma_source": "from prior", "gamma": -0.75,
             "camera_embedding": camera_embedding}),
    }


# the Train Loop's widgets left to the generator's preset (steps) and the prior's recipe (CFG, w(t), t range,
# training background, φ noise); the values beside the "custom" choices are the official recipe's
RECIPE_DEFAULTS = {"steps_source": "from preset", "steps": 900, "cfg_source": "from prior", "cfg": 7.5,
                   "weighting": "from prior", "t_range_source": "from prior", "t_min": 0.02, "t_max": 0.98,
                   "background": "from prior", "noise_sharing": "from prior"}

NERF_TOY = ("ASDNeRFGenerator", "NeRF Generator", (40, 520),
            {"preset": "toy-cpu", "resolution_schedule": "", "batch_size": 1, "seed": 0, "field_backend": "auto"})
MESH_FROM_PRESET = {"threshold_source": "from preset", "threshold": 25.0}  # toy-cpu's preset meshes at 5


def text_to_3d() -> dict:
    return {
        **prior_and_phi(camera_embedding=True),
        3: NERF_TOY,
        4: ("ASDTrain", "ASD Train Loop", (420, 60),
            {"prior": (1, 0), "generator": (3, 0), "prompt": "a red cube", "negative_prompt": "", "method": "asd",
             **RECIPE_DEFAULTS, "phi": (2, 0)}),
        5: ("ASDRenderViews", "Render Views", (820, 60),
            {"result": (4, 0), "views": 36, "size": 128, "elevation": 15.0, "distance": 1.5, "fov": 70.0,
             "background": "white"}),
        6: ("SaveAnimatedWEBP", "Turntable", (1180, 60),
            {"images": (5, 0), "filename_prefix": "asd/turntable", "fps": 12.0, "lossless": False, "quality": 90,
             "method": "default"}),
        7: ("SaveImage", "Depth maps", (1180, 420), {"images": (5, 1), "filename_prefix": "asd/depth"}),
        8: ("ASDExportNeRFMesh", "Export Mesh", (820, 460),
            {"result": (4, 0), "resolution": 128, **MESH_FROM_PRESET, "format": "glb+obj",
             "filename_prefix": "asd_mesh"}),
        9: ("Preview3D", "Preview mesh", (1180, 760), {"model_file": (8, 0)}),
    }


def image_2d() -> dict:
    return {
        **prior_and_phi(camera_embedding=False),
        3: ("ASDImage", "Image Generator", (40, 520),
            {"size_source": "from prior", "size": 512, "parameterization": "latent", "learning_rate_source": "default",
             "learning_rate": 0.03, "jitter_source": "from prior", "jitter": 0, "seed": 0}),
        4: ("ASDTrain", "ASD Train Loop", (420, 60),
            {"prior": (1, 0), "generator": (3, 0), "prompt": "a blue torus", "negative_prompt": "", "method": "asd",
             **RECIPE_DEFAULTS, "steps": 300, "phi": (2, 0)}),
        5: ("SaveImage", "Distilled image", (820, 60), {"images": (4, 1), "filename_prefix": "asd/image_2d"}),
    }


def compare_methods() -> dict:
    graph = {**prior_and_phi(camera_embedding=True), 3: NERF_TOY}
    for row, method in enumerate(("sds", "vsd", "asd")):
        base = 10 + 10 * row
        y = 60 + 420 * row
        graph[base] = ("ASDTrain", f"Train Loop ({method.upper()})", (420, y),
                       {"prior": (1, 0), "generator": (3, 0), "prompt": "a red cube", "negative_prompt": "",
                        "method": method, **RECIPE_DEFAULTS, "phi": (2, 0)})
        graph[base + 1] = ("ASDRenderViews", f"Render Views ({method.upper()})", (820, y),
                           {"result": (base, 0), "views": 36, "size": 128, "elevation": 15.0, "distance": 1.5,
                            "fov": 70.0, "background": "white"})
        graph[base + 2] = ("SaveAnimatedWEBP", f"Turntable ({method.upper()})", (1180, y),
                           {"images": (base + 1, 0), "filename_prefix": f"asd/compare_{method}", "fps": 12.0,
                            "lossless": False, "quality": 90, "method": "default"})
    return graph


def mesh_for_core() -> dict:
    """Toy text-to-3D ending in core nodes: NeRF to Mesh → core Save GLB (and the coloured saver), loss → core Plot
    Loss Graph."""
    graph = {key: value for key, value in text_to_3d().items() if key in (1, 2, 3, 4)}
    graph[4][3]["prompt"] = "a yellow cone"
    graph.update({
        5: ("ASDNeRFMesh", "NeRF to Mesh", (820, 60), {"result": (4, 0), "resolution": 128, **MESH_FROM_PRESET}),
        6: ("SaveGLB", "Save GLB (core)", (1180, 60), {"mesh": (5, 0), "filename_prefix": "mesh/asd_core"}),
        7: ("ASDSaveMeshGLB", "Save Coloured GLB", (1180, 360), {"mesh": (5, 0), "filename_prefix": "asd_mesh"}),
        8: ("LossGraphNode", "Plot Loss Graph (core)", (820, 420), {"loss": (4, 3), "filename_prefix": "asd_loss"}),
    })
    return graph


SD21 = "v2-1_512-ema-pruned.safetensors"


def text_to_3d_sd21() -> dict:
    """The official recipe on Stable Diffusion 2.1 base through core Load Checkpoint (GPU: hours, not minutes)."""
    _, _, _, phi_inputs = prior_and_phi(camera_embedding=True)[2]
    return {
        10: ("CheckpointLoaderSimple", "Load Checkpoint (SD 2.1 base)", (40, 60), {"ckpt_name": SD21}),
        1: ("ASDPriorFromCheckpoint", "ASD Prior from Checkpoint", (40, 260),
            {"model": (10, 0), "clip": (10, 1), "vae": (10, 2), "precision": "auto"}),
        2: ("ASDDiscriminatorLoRA", "ASD Discriminator (LoRA)", (40, 460), phi_inputs),
        3: ("ASDNeRFGenerator", "NeRF Generator", (40, 720),
            {"preset": "quality", "resolution_schedule": "", "batch_size": 1, "seed": 0, "field_backend": "auto"}),
        4: ("ASDTrain", "ASD Train Loop", (420, 60),
            {"prior": (1, 0), "generator": (3, 0), "prompt": "a DSLR photo of a hamburger", "negative_prompt": "",
             "method": "asd", **RECIPE_DEFAULTS, "steps": 25000, "phi": (2, 0)}),
        5: ("ASDRenderViews", "Render Views", (820, 60),
            {"result": (4, 0), "views": 72, "size": 512, "elevation": 15.0, "distance": 1.5, "fov": 70.0,
             "background": "white"}),
        6: ("SaveAnimatedWEBP", "Turntable", (1180, 60),
            {"images": (5, 0), "filename_prefix": "asd/turntable_sd21", "fps": 24.0, "lossless": False,
             "quality": 90, "method": "default"}),
        7: ("ASDNeRFMesh", "NeRF to Mesh", (820, 460), {"result": (4, 0), "resolution": 256, **MESH_FROM_PRESET}),
        8: ("ASDSaveMeshGLB", "Save Coloured GLB", (1180, 460), {"mesh": (7, 0), "filename_prefix": "asd_sd21"}),
        9: ("LossGraphNode", "Plot Loss Graph (core)", (820, 760), {"loss": (4, 3), "filename_prefix": "asd_loss"}),
    }


GRAPHS = {"text_to_3d_asd": text_to_3d, "image_2d_asd": image_2d, "compare_sds_vsd_asd": compare_methods,
          "mesh_to_core_save_glb": mesh_for_core, "text_to_3d_sd21": text_to_3d_sd21}


# ------------------------------------------------------------------------------------------------- writers
def to_api(graph: dict) -> dict:
    api = {}
    for node_id, (class_type, title, _, inputs) in graph.items():
        api[str(node_id)] = {
            "class_type": class_type,
            "inputs": {k: ([str(v[0]), v[1]] if isinstance(v, tuple) else v) for k, v in inputs.items()},
            "_meta": {"title": title},
        }
    return api


def properties(class_type: str, inputs: dict) -> dict:
    """A UI node's properties; ``models`` lists the files its widgets name that the frontend can download."""
    models = [MODELS[v] for v in inputs.values() if isinstance(v, str) and v in MODELS]
    return {"Node name for S&R": class_type, **({"models": models} if models else {})}


def to_ui(graph: dict) -> dict:
    links, nodes = [], []
    link_of: dict[tuple[int, str], int] = {}
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node_id, (class_type, _, _, inputs) in graph.items():
        for name, value in inputs.items():
            if isinstance(value, tuple):
                source, slot = value
                link_id = len(links) + 1
                target_slot = [n for n, _ in node_inputs(class_type)].index(name)
                kind = node_outputs(graph[source][0])[slot][1]
                links.append([link_id, source, slot, node_id, target_slot, kind])
                link_of[(node_id, name)] = link_id
                outgoing.setdefault((source, slot), []).append(link_id)
    for order, (node_id, (class_type, title, pos, inputs)) in enumerate(graph.items()):
        ui_inputs, widgets = [], []
        for name, kind in node_inputs(class_type):
            linked = (node_id, name) in link_of
            if not is_widget(kind):
                ui_inputs.append({"name": name, "type": kind, "link": link_of.get((node_id, name))})
                continue
            if linked:  # a widget fed by a link keeps its widget entry
                ui_inputs.append({"name": name, "type": kind, "widget": {"name": name}, "link": link_of[(node_id, name)]})
                widgets.append("")
            else:
                widgets.append(inputs[name])
            if has_seed_control(class_type, name):
                widgets.append("fixed")
        outputs = [{"name": name, "type": kind, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
                   for slot, (name, kind) in enumerate(node_outputs(class_type))]
        nodes.append({"id": node_id, "type": class_type, "title": title, "pos": list(pos), "size": [320, 200],
                      "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs, "outputs": outputs,
                      "properties": properties(class_type, inputs), "widgets_values": widgets})
    return {"last_node_id": max(graph), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}


def main() -> None:
    (HERE / "api").mkdir(exist_ok=True)
    for name, make in GRAPHS.items():
        graph = make()
        (HERE / f"{name}.json").write_text(json.dumps(to_ui(graph), indent=2) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(to_api(graph), indent=2) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
