"""ComfyUI-ASD: Adversarial Score Distillation (CVPR 2024) nodes for ComfyUI.

ComfyUI imports this file when the pack sits in ``custom_nodes/``. It only exports the node mappings; all the
training code is in ``asd_engine/`` (pure PyTorch, no ComfyUI imports) and the node adapters are in ``nodes/``.
This file must also import in plain Python (the tests import it without ComfyUI).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
