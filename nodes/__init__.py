"""ComfyUI node adapters over ``asd_engine``: parse inputs, call the engine, report progress, return outputs.

The node classes are not built yet (they are the node-pack issue's work). Until then the pack registers no nodes,
so ComfyUI loads it without errors and shows nothing. Everything the nodes will do is already reachable headless
through ``python -m asd_engine``.
"""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
