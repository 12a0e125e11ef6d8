"""ComfyUI node adapters over ``asd_engine``: parse inputs, call the engine, report progress, return outputs.

Importing this package inside ComfyUI also installs ComfyUI's device choice into the engine and registers the
``models/asd`` folder; in plain Python (tests) it only defines the node classes.
"""

from . import comfy_bridge
from .asd_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

comfy_bridge.setup()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
