"""ComfyUI node adapters over ``asd_engine``: parse inputs, call the engine, report progress, return outputs.

Importing this package inside ComfyUI also installs ComfyUI's device choice into the engine and registers the
``models/asd`` folder; in plain Python (tests) it only defines the node classes. Training nodes live in
``asd_nodes.py``, the nodes that turn a NeRF into pictures and meshes in ``output_nodes.py``, the previous
version's nodes (kept so saved workflows load) in ``legacy_nodes.py``.
"""

from . import asd_nodes, comfy_bridge, legacy_nodes, output_nodes

comfy_bridge.setup()

NODE_CLASS_MAPPINGS = {**asd_nodes.NODE_CLASS_MAPPINGS, **output_nodes.NODE_CLASS_MAPPINGS,
                       **legacy_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**asd_nodes.NODE_DISPLAY_NAME_MAPPINGS, **output_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **legacy_nodes.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
