"""Single-file Stable Diffusion 1.x / 2.x checkpoints (``.safetensors`` in the original LDM key layout), offline.

ComfyUI users keep their models as one file in ``models/checkpoints``. This module turns such a file (or the same
layout handed over as a state dict, e.g. by ComfyUI's core Load Checkpoint) into a :class:`DiffusionPrior`:

1. :func:`inspect_single_file` reads only the safetensors header (names, shapes, metadata); pickle formats are
   refused by their name, never opened, and a truncated or corrupt file fails here with a one-line error.
2. :func:`classify` finds the family from the shapes (SD1: CLIP ViT-L text encoder under
   ``cond_stage_model.transformer.``; SD2: OpenCLIP ViT-H under ``cond_stage_model.model.``; the UNet's
   cross-attention width must agree) and refuses SDXL, SD3, Flux, inpainting/pix2pix/depth UNets, unCLIP and
   upscalers, files without VAE or text encoder.
3. :func:`detect_prediction` decides epsilon vs v: a user override, else the file's ModelSpec metadata, else
   ComfyUI's ``v_pred`` marker key, else ComfyUI's statistic on one SD2 norm bias; it says which signal decided.
4. :func:`derive_configs` starts from the shipped family configs (``assets/sd_configs/``, the published diffusers
   values) and replaces every field the weights determine (channels, levels, layers, widths), so real checkpoints
   get exactly the published configs and small test checkpoints their own.
5. diffusers' own LDM converters map the keys; models are built with ``from_config`` and loaded with
   ``strict=True``, so an incomplete file names its missing keys instead of failing later on meta tensors.
The tokenizer is CLIP's BPE vocabulary, shipped in ``assets/clip_tokenizer`` (MIT), built in code.
Nothing here touches the network.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import UserInputError
from .diffusion import PICKLE_SUFFIXES, DiffusionPrior

ASSETS = Path(__file__).resolve().parents[1] / "assets"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer."     # SD 1.x: Hugging Face CLIPTextModel keys
OPEN_CLIP = "cond_stage_model.model."        # SD 2.x: OpenCLIP keys
PREDICTION_CHOICES = ("auto", "epsilon", "v_prediction")
SUPPORTED = "Stable Diffusion 1.x, 2.x-base and 2.x-768 (v) single-file .safetensors checkpoints"
# ComfyUI's SD2 test (comfy/supported_models.py, SD20.model_type): v-models have a wider spread of this bias.
V_HEURISTIC_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_HEURISTIC_STD = 0.09


@dataclass
class CheckpointInfo:
    """What a checkpoint's header says: ``shapes`` of every tensor, its string ``metadata``, and the verdicts."""

    path: Path | None
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str = ""                 # "sd1" or "sd2"
    prediction_type: str = ""        # "epsilon" or "v_prediction"
    prediction_source: str = ""      # which signal decided the prediction type
    label: str = ""                  # what to call it when there is no file

    @property
    def name(self) -> str:
        return self.path.name if self.path else self.label or "the checkpoint"

    def describe(self) -> str:
        family = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}[self.family]
        return f"{self.name}: {family}, {self.prediction_type} ({self.prediction_source})"


def is_single_file(path: str | os.PathLike) -> bool:
    """True for a file path (folders are diffusers pipelines, handled by :meth:`DiffusionPrior.from_pretrained`)."""
    return Path(path).expanduser().is_file()


# ---------------------------------------------------------------------------------------------------- header
def inspect_single_file(path: str | os.PathLike, input_name: str = "model") -> CheckpointInfo:
    """Header only (no tensor data is read). Refuses pickle formats by their suffix without opening them."""
    from safetensors import SafetensorError, safe_open

    file = Path(path).expanduser()
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise UserInputError(input_name, f"'{file.name}' is a pickle checkpoint ({file.suffix}), which can run "
                             "arbitrary code when loaded, so it is not opened",
                             "convert it to .safetensors (e.g. with a trusted converter on a machine you can "
                             "risk) and load that file")
    if file.suffix.lower() != ".safetensors":
        raise UserInputError(input_name, f"'{file.name}' is not a .safetensors file",
                             f"use {SUPPORTED}, or a diffusers pipeline folder")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(input_name, f"'{file.name}' is not a readable safetensors file, it is truncated or "
                             f"corrupt ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                             "download or copy the file again") from None
    return CheckpointInfo(file, shapes, metadata)


def header_problem(path: str | os.PathLike) -> str | None:
    """Why the file at ``path`` cannot become a prior, judged from its header alone (no tensor data is read), or None
    when it can; for listing files quickly (loading checks everything again). Pickles have a problem: they are
    never opened."""
    try:
        info = inspect_single_file(path)
        classify(info)
        derive_configs(info)
    except UserInputError as exc:
        return exc.problem
    return None


# ---------------------------------------------------------------------------------------------------- family
def classify(info: CheckpointInfo, input_name: str = "model") -> str:
    """Set and return ``info.family`` ("sd1"/"sd2") from tensor names and shapes, or raise naming the family."""
    shapes, name = info.shapes, info.name

    def refuse(what: str) -> UserInputError:
        return UserInputError(input_name, f"'{name}' is {what}, which is not supported", f"use {SUPPORTED}")

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    if has("conditioner.embedders."):
        raise refuse("an SDXL checkpoint")
    if any("joint_blocks." in k for k in shapes) or has("text_encoders."):
        raise refuse("a Stable Diffusion 3 checkpoint")
    if any("double_blocks." in k for k in shapes):
        raise refuse("a Flux checkpoint")
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise refuse("not a Stable Diffusion checkpoint (no model.diffusion_model UNet; a LoRA, a UNet-only or a "
                     "diffusers-layout file?)")
    channels = conv_in[1]
    if channels != 4:
        kinds = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth-to-image model"}
        raise refuse(f"{kinds.get(channels, f'a UNet with {channels} input channels')} (4 are needed)")
    if has(UNET + "label_emb."):
        raise refuse("an unCLIP or upscaler model (its UNet takes an extra class/noise-level input)")
    if not has(VAE):
        raise UserInputError(input_name, f"'{name}' has no VAE (no first_stage_model.* weights)",
                             "use a full checkpoint that includes its VAE")
    cross = {shape[1] for key, shape in shapes.items() if key.startswith(UNET) and key.endswith("attn2.to_k.weight")}
    if len(cross) != 1:
        raise refuse("a UNet without (or with mixed) cross-attention")
    cross_dim = cross.pop()
    try:
        if has(CLIP_L):
            family, width = "sd1", _clip_l_shapes(shapes)["token_embedding"][1]
        elif has(OPEN_CLIP):
            family, width = "sd2", shapes[OPEN_CLIP + "token_embedding.weight"][1]
        else:
            family = None
    except KeyError as exc:
        raise UserInputError(input_name, f"'{name}' has an incomplete text encoder (no {exc})",
                             "download or copy the file again") from None
    if family is None:
        raise UserInputError(input_name, f"'{name}' has no text encoder (neither cond_stage_model.transformer.* "
                             "nor cond_stage_model.model.*)", "use a full checkpoint that includes its text encoder")
    if width != cross_dim:
        raise refuse(f"a {family.upper()}-style text encoder {width} wide feeding a UNet whose cross-attention "
                     f"expects {cross_dim}")
    info.family = family
    return family


def _clip_l_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """SD1 text-encoder shapes by short name, for both key styles (with or without ``text_model.``)."""
    stripped = {k[len(CLIP_L):].removeprefix("text_model."): s for k, s in shapes.items() if k.startswith(CLIP_L)}
    return {"token_embedding": stripped["embeddings.token_embedding.weight"],
            "position_embedding": stripped["embeddings.position_embedding.weight"],
            "fc1": stripped["encoder.layers.0.mlp.fc1.weight"],
            "layers": (_count(stripped, "encoder.layers."),)}


def _count(keys, prefix: str) -> int:
    """Number of numbered children ``prefix{i}.`` among ``keys``."""
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


# ---------------------------------------------------------------------------------------------------- v or epsilon
def detect_prediction(info: CheckpointInfo, override: str = "auto", read_tensor=None,
                      input_name: str = "prediction_type", override_source: str = "set by the user") -> str:
    """Set ``info.prediction_type``/``prediction_source``; ``read_tensor(key)`` loads one tensor (heuristic only)."""
    if override not in PREDICTION_CHOICES:
        raise UserInputError(input_name, f"'{override}' is not a prediction type", f"use one of {PREDICTION_CHOICES}")
    if override != "auto":
        info.prediction_type, info.prediction_source = override, override_source
        return override
    stated = info.metadata.get("modelspec.prediction_type", "").strip().lower()
    architecture = info.metadata.get("modelspec.architecture", "").lower()
    if stated in ("v", "v_prediction", "v-prediction"):
        decision = "v_prediction", "the file's modelspec.prediction_type metadata"
    elif stated in ("epsilon", "eps"):
        decision = "epsilon", "the file's modelspec.prediction_type metadata"
    elif architecture.endswith("-v"):
        decision = "v_prediction", f"the file's modelspec.architecture metadata ({architecture})"
    elif "v_pred" in info.shapes:
        decision = "v_prediction", "the v_pred marker ComfyUI writes into v-prediction checkpoints"
    elif info.family == "sd2" and V_HEURISTIC_KEY in info.shapes and read_tensor is not None:
        spread = float(read_tensor(V_HEURISTIC_KEY).float().std(unbiased=False))
        kind = "v_prediction" if spread > V_HEURISTIC_STD else "epsilon"
        decision = kind, f"ComfyUI's SD2 weight statistic (std {spread:.3f} {'>' if kind != 'epsilon' else '≤'} " \
                         f"{V_HEURISTIC_STD}; set prediction_type if this is wrong)"
    else:
        decision = "epsilon", ("Stable Diffusion 1.x predicts epsilon" if info.family == "sd1" else
                               "no v-prediction marker found; set prediction_type to v_prediction for a 768-v model")
    info.prediction_type, info.prediction_source = decision
    return decision[0]


# ---------------------------------------------------------------------------------------------------- configs
@functools.lru_cache(maxsize=None)
def family_config(family: str) -> dict:
    """The shipped reference configs of ``family`` (``assets/sd_configs/<family>.json``)."""
    return json.loads((ASSETS / "sd_configs" / f"{family}.json").read_text())


def derive_configs(info: CheckpointInfo, input_name: str = "model") -> dict[str, dict]:
    """diffusers/transformers configs for ``unet``, ``vae``, ``text_encoder``, ``scheduler`` (+ ``tokenizer``
    settings) of a classified checkpoint. Everything the shapes determine comes from the shapes; what they cannot
    tell (normalisation groups, activation, head counts) follows the family's rule, e.g. SD2's 64-wide heads."""
    try:
        return _derive_configs(info)
    except (KeyError, StopIteration, ValueError, IndexError) as exc:
        raise UserInputError(input_name, f"'{info.name}' has an unexpected layout (looked for {exc!s:.120})",
                             f"use {SUPPORTED}") from None


def _derive_configs(info: CheckpointInfo) -> dict[str, dict]:
    base = family_config(info.family)
    configs = {k: dict(v) for k, v in base.items() if not k.startswith("_") and k != "v_prediction_overrides"}
    if info.prediction_type == "v_prediction":
        for part, values in base.get("v_prediction_overrides", {}).items():
            configs[part].update(values)
    configs["scheduler"]["prediction_type"] = info.prediction_type
    configs["unet"].update(_unet_fields(info.shapes, info.family))
    configs["vae"].update(_vae_fields(info.shapes))
    configs["text_encoder"].update(_text_encoder_fields(info.shapes, info.family))
    return configs


def _unet_fields(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    inputs = {k[len(UNET + "input_blocks."):] for k in shapes if k.startswith(UNET + "input_blocks.")}
    count = max(int(k.split(".")[0]) for k in inputs) + 1             # N (L + 1) input blocks
    downsamplers = sorted(int(k.split(".")[0]) for k in inputs if ".0.op." in k)
    per_level = (downsamplers[0] if downsamplers else count)          # L + 1: L resnets, then a downsampler
    levels, layers = count // per_level, per_level - 1
    channels = [shapes[f"{UNET}input_blocks.{1 + i * per_level}.0.out_layers.3.weight"][0] for i in range(levels)]

    def attention(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    down = ["CrossAttnDownBlock2D" if attention(f"{UNET}input_blocks.{1 + i * per_level}.1.transformer_blocks.")
            else "DownBlock2D" for i in range(levels)]
    up = ["CrossAttnUpBlock2D" if attention(f"{UNET}output_blocks.{i * (layers + 1)}.1.transformer_blocks.")
          else "UpBlock2D" for i in range(levels)]
    depth = _count(shapes, UNET + "middle_block.1.transformer_blocks.")
    proj_in = next(s for k, s in shapes.items() if k.startswith(UNET) and k.endswith(".proj_in.weight"))
    cross = next(s for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight"))
    # Head counts are not in the weights: SD1 uses 8 heads everywhere, SD2 heads of 64 channels.
    heads = 8 if family == "sd1" else [max(1, c // 64) for c in channels]
    return {"in_channels": shapes[UNET + "input_blocks.0.0.weight"][1], "out_channels": shapes[UNET + "out.2.weight"][0],
            "block_out_channels": channels, "layers_per_block": layers, "down_block_types": down,
            "up_block_types": up, "cross_attention_dim": cross[1], "use_linear_projection": len(proj_in) == 2,
            "transformer_layers_per_block": max(depth, 1), "attention_head_dim": heads,
            "mid_block_type": "UNetMidBlock2DCrossAttn" if attention(UNET + "middle_block.") else None}


def _vae_fields(shapes: dict[str, tuple[int, ...]]) -> dict:
    levels = _count(shapes, VAE + "encoder.down.")
    return {"block_out_channels": [shapes[f"{VAE}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
            "layers_per_block": _count(shapes, VAE + "encoder.down.0.block."),
            "latent_channels": shapes[VAE + "quant_conv.weight"][0] // 2,
            "in_channels": shapes[VAE + "encoder.conv_in.weight"][1], "out_channels": shapes[VAE + "decoder.conv_out.weight"][0],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}


def _text_encoder_fields(shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    if family == "sd1":
        s = _clip_l_shapes(shapes)
        vocab, width = s["token_embedding"]
        positions, inner, layers = s["position_embedding"][0], s["fc1"][0], s["layers"][0]
    else:
        vocab, width = shapes[OPEN_CLIP + "token_embedding.weight"]
        positions = shapes[OPEN_CLIP + "positional_embedding"][0]
        inner = shapes[OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"][0]
        # SD2 conditions on the penultimate layer (+ the final LayerNorm): the last resblock is never used.
        layers = _count(shapes, OPEN_CLIP + "transformer.resblocks.") - 1
    return {"vocab_size": vocab, "hidden_size": width, "intermediate_size": inner, "num_hidden_layers": layers,
            "max_position_embeddings": positions, "num_attention_heads": max(1, width // 64)}


# ---------------------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=None)
def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49 408 tokens) and merges from the shipped BPE file, as OpenAI's tokenizer builds them."""
    # GPT-2/CLIP's reversible byte → printable-character table.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    alphabet = [chr(c) for c in codes]
    lines = gzip.open(ASSETS / "clip_tokenizer" / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read()
    merges = [tuple(line.split()) for line in lines.split("\n")[1:49152 - 256 - 2 + 1]]
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(family: str = "sd1"):
    """The CLIP tokenizer Stable Diffusion ``family`` uses (SD2 pads with "!", id 0, as OpenCLIP does)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    settings = family_config(family)["tokenizer"]
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=settings["model_max_length"],
                         pad_token=settings["pad_token"])


# ---------------------------------------------------------------------------------------------------- weights
def _converters():
    try:
        from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                         convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    except ImportError as exc:  # semi-private helpers: say which package to fix rather than fail obscurely
        raise ImportError(f"single-file loading needs diffusers' LDM converters ({exc}); install diffusers>=0.30") from exc
    return convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint


def _empty(build):
    """Build a module with its parameters on the meta device (no random init: seconds for a full SD); buffers stay
    real. The weights are then assigned, not copied."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _load_strict(module: torch.nn.Module, weights: dict[str, torch.Tensor], part: str, name: str,
                 input_name: str, dtype: torch.dtype) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserInputError(input_name, f"'{name}' is incomplete: its {part} lacks {len(missing)} weights "
                             f"(e.g. {missing[0]})", "download or copy the file again")
    wrong = [k for k in expected if tuple(weights[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserInputError(input_name, f"'{name}' has {part} weights of unexpected shape (e.g. {wrong[0]}: "
                             f"{tuple(weights[wrong[0]].shape)})", f"use {SUPPORTED}")
    # Integers cast to floats stay finite (F32 bits read as I32 become numbers near 1e9): catch the label itself.
    integer = [k for k in expected if expected[k].is_floating_point() and not weights[k].is_floating_point()]
    if integer:
        raise UserInputError(input_name, f"'{name}' stores its {part} weight {integer[0]} as "
                             f"{str(weights[integer[0]].dtype).removeprefix('torch.')} where the model needs floats "
                             "(a damaged or mislabelled file)", "download or copy the file again")
    # One dtype per module whatever the file mixes (ComfyUI exports fp32 UNets next to fp16 text encoders).
    module.load_state_dict({k: weights[k].to(dtype) for k in expected}, strict=True, assign=True)


def build_components(state_dict: dict[str, torch.Tensor], info: CheckpointInfo, input_name: str = "model",
                     dtype: torch.dtype = torch.float32):
    """``(unet, text_encoder, tokenizer, scheduler, vae)`` from an LDM-layout ``state_dict``, modules in ``dtype``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_conv, vae_conv, clip_conv, open_clip_conv = _converters()
    configs = derive_configs(info, input_name)
    unet = _empty(lambda: UNet2DConditionModel.from_config(configs["unet"]))
    _load_strict(unet, unet_conv(state_dict, unet.config), "UNet", info.name, input_name, dtype)
    vae = _empty(lambda: AutoencoderKL.from_config(configs["vae"]))
    _load_strict(vae, vae_conv(state_dict, vae.config), "VAE", info.name, input_name, dtype)
    text_encoder = _empty(lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])))
    layers = configs["text_encoder"]["num_hidden_layers"]
    if info.family == "sd1":
        weights = clip_conv(state_dict)
    else:  # only the layers SD2 uses: diffusers' converter skips the unused last one for full-size files only
        unused = f"{OPEN_CLIP}transformer.resblocks.{layers}."
        weights = open_clip_conv(text_encoder, {k: v for k, v in state_dict.items()
                                                if k.startswith(OPEN_CLIP) and not k.startswith(unused)})
    # transformers ≥ 5.6 dropped the "text_model." level of CLIPTextModel; very old SD1 files never had it.
    weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    if hasattr(text_encoder, "text_model"):
        weights = {f"text_model.{k}": v for k, v in weights.items()}
    _load_strict(text_encoder, weights, "text encoder", info.name, input_name, dtype)
    scheduler = DDPMScheduler.from_config(configs["scheduler"])
    return unet, text_encoder, clip_tokenizer(info.family), scheduler, vae


def load_single_file(path: str | os.PathLike, prediction_type: str = "auto", device=None,
                     dtype: torch.dtype = torch.float32, input_name: str = "model") -> DiffusionPrior:
    """A :class:`DiffusionPrior` from a single-file checkpoint; ``prior.source`` is the file, ``prior.detected``
    says what was detected and from which signal."""
    from safetensors.torch import load_file

    info = inspect_single_file(path, input_name)
    classify(info, input_name)  # refuse what is not supported before reading gigabytes
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; these weights must take part in autograd
        state_dict = load_file(str(info.path))
    return _build_prior(info, state_dict, prediction_type, str(info.path), device, dtype, input_name)


def prior_from_state_dict(state_dict: dict[str, torch.Tensor], prediction_type: str = "auto", device=None,
                          dtype: torch.dtype = torch.float32, source: str = "state dict", input_name: str = "model",
                          prediction_source: str = "set by the user") -> DiffusionPrior:
    """The same as :func:`load_single_file` for a state dict already in memory (ComfyUI's Load Checkpoint);
    ``prediction_source`` says where a given ``prediction_type`` came from."""
    info = CheckpointInfo(None, {k: tuple(v.shape) for k, v in state_dict.items()}, label=source)
    classify(info, input_name)
    return _build_prior(info, state_dict, prediction_type, source, device, dtype, input_name, prediction_source)


def _build_prior(info: CheckpointInfo, state_dict: dict[str, torch.Tensor], prediction_type: str, source: str,
                 device, dtype: torch.dtype, input_name: str,
                 prediction_source: str = "set by the user") -> DiffusionPrior:
    """Detection, conversion and the prior, shared by files and in-memory state dicts (``info`` classified)."""
    detect_prediction(info, prediction_type, state_dict.__getitem__, override_source=prediction_source)
    with torch.inference_mode(False):
        unet, text_encoder, tokenizer, scheduler, vae = build_components(state_dict, info, input_name, dtype)
    prior = DiffusionPrior(unet, text_encoder, tokenizer, scheduler, vae, device=resolve_device(device), dtype=dtype)
    prior.check_finite(input_name)
    prior.source, prior.detected = source, info.describe()
    return prior
