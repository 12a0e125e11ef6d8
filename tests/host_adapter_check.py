"""Run with ComfyUI's own Python (by test_host.py): core Load Checkpoint's MODEL/CLIP/VAE → our prior, compared with
what ComfyUI itself computes and with our single-file loader on the same file. Prints one JSON line."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

comfy_dir, pack_dir, checkpoint = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
os.chdir(comfy_dir)
sys.path.insert(0, str(comfy_dir))
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses its options at import
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.sd  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(pack_dir / "workflows"))
from make_workflows import load_pack  # noqa: E402  (the pack loader the tests and the workflow generator share)

pack = load_pack()
load_prior = importlib.import_module(pack.__name__ + ".asd_engine.prior.loading").load_prior
prior_from_state_dict = importlib.import_module(pack.__name__ + ".asd_engine.prior.single_file").prior_from_state_dict
comfy_bridge = importlib.import_module(pack.__name__ + ".nodes.comfy_bridge")

with torch.inference_mode():  # as ComfyUI runs nodes
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
    state, prediction = comfy_bridge.checkpoint_state_dict(model, clip, vae)
    from_nodes = prior_from_state_dict(state, prediction, device="cpu", source="Load Checkpoint",
                                       prediction_source="ComfyUI's model sampling")
    comfy_cond = clip.encode_from_tokens(clip.tokenize("a red cube")).float()
from_file = load_prior(checkpoint, device="cpu")

g = torch.Generator().manual_seed(0)
x_t, t = torch.randn((1, 4, 8, 8), generator=g), torch.tensor([500])
with torch.no_grad():
    ours = from_nodes.encode_prompt(["a red cube"])
    out_nodes = from_nodes.model_output(x_t, t, ours)
    out_file = from_file.model_output(x_t, t, from_file.encode_prompt(["a red cube"]))
    comfy_out = model.model.diffusion_model(x_t.to(model.model.get_dtype()), t.float(),
                                            context=ours.to(model.model.get_dtype())).float()
    decoded_nodes, decoded_file = from_nodes.decode(x_t), from_file.decode(x_t)
print(json.dumps({
    "detected": from_nodes.detected, "prediction": prediction,
    "params_requiring_no_inference": all(not p.is_inference() for p in from_nodes.unet.parameters()),
    "text_vs_comfyui": float((ours - comfy_cond).abs().max()),
    "unet_vs_comfyui": float((out_nodes - comfy_out).abs().max()),
    "unet_nodes_vs_file": float((out_nodes - out_file).abs().max()),
    "vae_nodes_vs_file": float((decoded_nodes - decoded_file).abs().max()),
}))
