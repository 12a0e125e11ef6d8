"""Run with ComfyUI's own Python (by test_host.py) and ComfyUI's command-line flags: the dtype Load SD Model (ASD)
gives the prior with precision "auto", beside the dtype core's policy chooses for a diffusion model. Prints one JSON
line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

comfy_dir, pack_dir, flags = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
os.chdir(comfy_dir)
sys.path.insert(0, str(comfy_dir))
sys.argv = [sys.argv[0], "--cpu", *flags]  # ComfyUI parses its options at import
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pack_dir / "workflows"))
from make_workflows import TOY_PRIOR, load_pack  # noqa: E402

pack = load_pack()
with torch.inference_mode():  # as ComfyUI runs nodes
    (prior,) = pack.NODE_CLASS_MAPPINGS["ASDLoadPrior"]().load(TOY_PRIOR, "auto", "auto")
    (chosen,) = pack.NODE_CLASS_MAPPINGS["ASDLoadPrior"]().load(TOY_PRIOR, "fp32", "auto")
print(json.dumps({"auto": str(next(prior.unet.parameters()).dtype), "fp32": str(next(chosen.unet.parameters()).dtype),
                  "core": str(mm.unet_dtype(mm.get_torch_device()))}))
