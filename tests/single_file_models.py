"""Tiny Stable-Diffusion-architecture checkpoints twice: as a diffusers pipeline folder and as the same weights in
the original single-file (LDM) layout, the way ComfyUI users keep them. Shapes follow the families' rules the
loader relies on (GroupNorm of 32, SD1 8 heads, SD2 64-wide heads, 64-wide text heads), so the loader derives the
tiny configs from the weights exactly as it derives the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from asd_engine.prior.single_file import clip_tokenizer
from ldm_layout import clip_l_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

TEXT_WIDTH = 64


def build_tiny_sd(out: Path, family: str = "sd1", prediction_type: str = "epsilon", marker: str = "none",
                  seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Write ``out/folder`` (diffusers) and ``out/<family>.safetensors`` (LDM layout); return both paths.

    ``marker``: how the file says it is v-prediction: "none", "v_pred" (ComfyUI's key) or "metadata" (ModelSpec).
    SD2 files get one more text-encoder layer than the folder: real SD2 files carry a last layer SD2 never uses.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd2 = family == "sd2"
    channels = (64, 128) if sd2 else (32, 64)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=[c // 64 for c in channels] if sd2 else 8,
        use_linear_projection=sd2)
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    layers = 2
    te_config = dict(hidden_size=TEXT_WIDTH, intermediate_size=96, num_attention_heads=1, vocab_size=49408,
                     max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
                     bos_token_id=49406, eos_token_id=49407, pad_token_id=0 if sd2 else 49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=layers, **te_config))
    file_text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=layers + sd2, **te_config))
    with torch.no_grad():  # random, not zero-initialised, so that every weight matters in the comparisons
        for module in (unet, vae, file_text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    text_encoder.load_state_dict(file_text_encoder.state_dict(), strict=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)

    folder = out / "folder"
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        part.save_pretrained(folder / name)
    scheduler.save_pretrained(folder / "scheduler")
    clip_tokenizer(family).save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))

    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    te_state = file_text_encoder.state_dict()
    state.update(open_clip_to_ldm(te_state) if sd2 else clip_l_to_ldm(te_state))
    metadata = None
    if marker == "v_pred":
        state["v_pred"] = torch.tensor([])
    elif marker == "metadata":
        metadata = {"modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon"}
    file = out / f"{family}.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(file), metadata=metadata)
    return folder, file


def build_comfy_sd1_checkpoint(path: Path, seed: int = 0) -> Path:
    """The smallest SD1 single file ComfyUI's core Load Checkpoint accepts cleanly (fp16, ~420 MiB).

    ComfyUI recognises SD1.5 by model_channels 320 and a 768-wide context, builds the VAE and the 12-layer CLIP-L
    from fixed configs (so those are full size), and allows a UNet of one level without a middle block.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # shapes only: random values are drawn directly in fp16 (seconds, not minutes)
        unet = UNet2DConditionModel(
            sample_size=8, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("UpBlock2D",),
            mid_block_type=None, block_out_channels=(320,), layers_per_block=1, cross_attention_dim=768,
            attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407))
    shapes = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config),
              **clip_l_to_ldm(text_encoder.state_dict())}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in shapes.items():
        if "position_ids" in key:
            continue
        scale = 0.02 if meta.ndim > 1 else 0.1  # norms ≈ 1 ± 0.1, biases ≈ 0 ± 0.1
        value = torch.randn(meta.shape, generator=g) * scale
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                         "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight", "in_layers.0.weight",
                         "out_layers.0.weight", "out.0.weight")):
            value = value + 1.0
        state[key] = value
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    return path
