"""Run with ComfyUI's own Python (by test_host.py): our nodes executed in-process the way ComfyUI executes them, while
watching ComfyUI's model management (``comfy.model_management.current_loaded_models``). Prints one JSON line.

What it reports: whether the prior is in ComfyUI's list of loaded models after Load SD Model, at every progress
update of a Train Loop, and after it (finished, and cancelled); the memory the Train Loop asked ComfyUI to free;
where the prior's weights are afterwards; whether a model ComfyUI loaded before the run (not ours) is still loaded
after it; and whether any run or optimiser object is still alive.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

comfy_dir, pack_dir = Path(sys.argv[1]), Path(sys.argv[2])
os.chdir(comfy_dir)
sys.path.insert(0, str(comfy_dir))
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its options at import
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pack_dir / "workflows"))
from make_workflows import TOY_PRIOR, load_pack  # noqa: E402

out = tempfile.mkdtemp()
folder_paths.set_output_directory(out)
folder_paths.set_temp_directory(out)
pack = load_pack()
nodes = {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}
runs = importlib.import_module(pack.__name__ + ".asd_engine.runs.base")

with torch.inference_mode():  # as ComfyUI runs nodes
    (prior,) = nodes["ASDLoadPrior"].load(TOY_PRIOR, "auto", "auto")


def prior_loaded() -> bool:
    """What ComfyUI's model management reports: is a model over this prior's networks in its loaded list?"""
    return any(m.model is not None and m.model.model is prior.modules() for m in mm.current_loaded_models)


seen, asked = [], []
update = comfy.utils.ProgressBar.update_absolute
load_models_gpu = mm.load_models_gpu


def watching_update(self, value, total=None, preview=None):
    seen.append(prior_loaded())
    if cancel_at and value == cancel_at:
        mm.interrupt_current_processing(True)  # what POST /interrupt does
    return update(self, value, total, preview)


def watching_load(models, memory_required=0, **kwargs):
    asked.append(memory_required)
    return load_models_gpu(models, memory_required=memory_required, **kwargs)


comfy.utils.ProgressBar.update_absolute = watching_update
mm.load_models_gpu = watching_load


def train(steps):
    (generator,) = nodes["ASDNeRFGenerator"].build("toy-cpu", "", 1, 0)
    with torch.inference_mode():
        return nodes["ASDTrain"].train(prior, generator, "a red cube", "", "asd", "custom", steps, "from prior", 7.5,
                                       "sds", "from prior", 0.02, 0.98, "from prior", "fresh")


# a model of someone else's, loaded by ComfyUI before our run: releasing the prior must leave it loaded
bystander = comfy.model_patcher.ModelPatcher(torch.nn.Linear(8, 8), load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
load_models_gpu([bystander])


def bystander_loaded() -> bool:
    return any(m.model is bystander for m in mm.current_loaded_models)


after_load = prior_loaded()
cancel_at = None
train(3)
during, after = list(seen), prior_loaded()
bystander_after = bystander_loaded()
seen.clear()
cancel_at = 2
try:
    train(6)
    cancelled = False
except mm.InterruptProcessingException:
    cancelled = True
mm.interrupt_current_processing(False)
gc.collect()
alive = [type(o).__name__ for o in gc.get_objects()
         if isinstance(o, (runs.DistillationRun, torch.optim.Optimizer))]
print(json.dumps({
    "after_load": after_load, "during_training": during, "after_training": after,
    "cancelled": cancelled, "during_cancelled": list(seen), "after_cancel": prior_loaded(),
    "bystander_before": bystander_after, "bystander_after_cancel": bystander_loaded(), "memory_required": asked, "unet_bytes": sum(p.numel() * p.element_size() for p in prior.unet.parameters()),
    "prior_device": str(next(prior.unet.parameters()).device), "offload_device": str(mm.unet_offload_device()),
    "lora_left": any("lora_" in k for k in prior.unet.state_dict()), "alive": alive,
}))
