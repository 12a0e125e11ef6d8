"""Test helper: write diffusers/transformers state dicts in Stable Diffusion's original single-file (LDM) layout.

diffusers ships only the LDM → diffusers direction (and a full-size-only script the other way), so the tests build
their single-file checkpoints with this generic inverse, written from the layout rules: N levels of L layers map to
``input_blocks.{1 + i(L+1) + j}`` etc. The loader under test then has to undo it with diffusers' converters.
"""

from __future__ import annotations

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _unet_prefixes(config) -> dict[str, str]:
    layers, levels = config["layers_per_block"], len(config["block_out_channels"])
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    for i in range(levels):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{n}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{n}.1."
        if i < levels - 1:
            attention = config["up_block_types"][i].startswith("CrossAttn")
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{2 if attention else 1}."
    return m


def _rename(state: dict[str, torch.Tensor], prefixes: dict[str, str], inner) -> dict[str, torch.Tensor]:
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))  # longest prefix wins
    out = {}
    for key, value in state.items():
        for old, new in ordered:
            if key.startswith(old):
                rest, value = inner(old, key[len(old):], value)
                out[new + rest] = value
                break
        else:
            out[key] = value
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    def inner(prefix, rest, value):
        if ".resnets." in prefix:
            for a, b in RESNET:
                if rest.startswith(a + "."):
                    return b + rest[len(a):], value
        return rest, value
    return {"model.diffusion_model." + k: v for k, v in _rename(state, _unet_prefixes(config), inner).items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    m = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}
    for i in range(levels):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{levels - 1 - i}.block.{j}."
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    for side in ("encoder", "decoder"):
        m[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        m[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        m[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    attention = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}

    def inner(prefix, rest, value):
        if prefix.endswith("attentions.0."):
            for a, b in attention.items():
                if rest.startswith(a):
                    if rest.endswith("weight") and value.ndim == 2:  # LDM's attention projections are 1×1 convs
                        value = value[:, :, None, None]
                    return b + rest[len(a):], value
        return rest.replace("conv_shortcut", "nin_shortcut"), value
    return {"first_stage_model." + k: v for k, v in _rename(state, m, inner).items()}


def clip_l_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP names, with q/k/v packed into ``in_proj``."""
    prefix, out, packed = "cond_stage_model.model.", {}, {}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    for key, value in state.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key.startswith("encoder.layers."):
            _, _, index, *rest = key.split(".")
            rest, base = ".".join(rest), f"{prefix}transformer.resblocks.{index}."
            if rest.split(".")[:2] in (["self_attn", p] for p in ("q_proj", "k_proj", "v_proj")):
                packed.setdefault((base, rest.split(".")[-1]), {})[rest.split(".")[1][0]] = value
                continue
            for a, b in (("self_attn.", "attn."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                rest = rest.replace(a, b)
            out[base + rest] = value
    for (base, kind), qkv in packed.items():
        out[base + f"attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    width = out[prefix + "token_embedding.weight"].shape[1]
    out[prefix + "text_projection"] = torch.eye(width)  # [width, proj]; unused by SD
    return out
