"""Tiny random diffusers pipelines with the real Stable Diffusion architectures.

No model weights can be downloaded where this project is tested, so tests (and, until the embedded prior exists,
the README's main command) build a pipeline folder with the same component classes and file layout as Stable
Diffusion — ``UNet2DConditionModel``, ``CLIPTextModel`` + ``CLIPTokenizer`` (vocab.json/merges.txt), optionally
``AutoencoderKL``, a PNDM/DDIM scheduler — with a few thousand random weights, saved as safetensors. They load
through exactly the same code as a real model. Their outputs are noise-like: they test plumbing, not quality.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# The tokenizer is byte-level with no merges: every word becomes its characters (+ "</w>" on the last one), which
# covers any prompt with a 2 × 256 + 2 entry vocabulary.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_level_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return vocab


def _write_tokenizer(folder: Path, max_length: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
         "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    return len(vocab)


def build_tiny_pipeline(out_dir: str | os.PathLike, prediction_type: str = "epsilon", latent: bool = True,
                        seed: int = 0, cross_attention_dim: int = 32, block_out_channels: tuple[int, ...] = (32, 64),
                        layers_per_block: int = 1, attention_head_dim: int = 2, max_length: int = 77) -> Path:
    """Write a tiny random SD-architecture pipeline to ``out_dir`` and return its path.

    ``latent=True`` adds a 4-level ``AutoencoderKL`` (downsampling ×8 like SD's); ``latent=False`` makes a
    pixel-space model (no VAE). ``prediction_type`` is ``"epsilon"`` (PNDM scheduler, as SD 1.x/2.x-base) or
    ``"v_prediction"`` (DDIM scheduler, as SD 2.x-768). The UNet's size parameters let benchmarks build
    SD-shaped models of any width (SD 1.5: channels (320, 640, 1280, 1280), 2 layers, cross-attention 768, 8 heads).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = _write_tokenizer(out / "tokenizer", max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    text_encoder.save_pretrained(out / "text_encoder")
    channels = 4 if latent else 3
    n = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=8 if latent else 32, in_channels=channels, out_channels=channels,
        block_out_channels=block_out_channels, layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=min(32, block_out_channels[0]))
    unet.save_pretrained(out / "unet")
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
                  "tokenizer": ["transformers", "CLIPTokenizer"]}
    if latent:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=8, sample_size=64)
        vae.save_pretrained(out / "vae")
        components["vae"] = ["diffusers", "AutoencoderKL"]
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, prediction_type=prediction_type)
    if prediction_type == "epsilon":
        scheduler = PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **betas)
    else:
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **betas)
    scheduler.save_pretrained(out / "scheduler")
    components["scheduler"] = ["diffusers", type(scheduler).__name__]
    import diffusers

    index = {"_class_name": "StableDiffusionPipeline" if latent else "PixelSpaceTextToImagePipeline",
             "_diffusers_version": diffusers.__version__, **components}
    if latent:  # what a real SD folder says about the components it ships without
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
