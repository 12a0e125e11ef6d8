"""The frozen diffusion prior behind one small interface.

A :class:`DiffusionPrior` wraps the components of a diffusers Stable-Diffusion-style pipeline folder
(``model_index.json`` + ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and optionally ``vae/``).
A folder without a VAE is a pixel-space model: its "latents" are RGB images scaled to [-1, 1].

Conventions (used throughout the engine):
- ``x0``/``x_t``: tensors in the model's input space, ``[B, C, h, w]`` (latents, or pixels in [-1, 1]);
  ``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - ...)``.
- ``t``: integer training timesteps ``[B]`` (long) in ``[0, num_train_timesteps)``.
- "output" is the UNet's native prediction (epsilon or v); :meth:`to_eps` converts it to epsilon. That
  conversion lives here and nowhere else.
- images are float ``[B, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import UserInputError
from .recipe import OFFICIAL, Recipe, apply_aliases, read_recipe

PIPELINE_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "text_encoder", "vae")  # the components with weight files (tokenizer, scheduler: text)
SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")
# Pickle formats run arbitrary code when unpickled (even torch.load with weights_only=True parses untrusted bytes): never
# opened, in a pipeline folder or as a single file; only .safetensors is read.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")  # safetensors header dtypes of real weights


@dataclass
class PipelineFolder:
    """What ``model_index.json`` says about a pipeline folder (validated, nothing loaded yet)."""

    path: Path
    components: dict[str, tuple[str, str] | None]

    @property
    def has_vae(self) -> bool:
        return self.components.get("vae") is not None


def inspect_pipeline_folder(path: str | os.PathLike, input_name: str = "model") -> PipelineFolder:
    """Check that ``path`` is a diffusers pipeline folder this engine can load, without loading weights.

    Raises :class:`UserInputError` naming ``input_name`` when it is not.
    """
    folder = Path(path).expanduser()
    try:
        folder.stat()
    except OSError as exc:  # Path.exists() hides a symlink loop as "does not exist", and raises on a permission
        if exc.errno == errno.ELOOP:
            raise UserInputError(input_name, f"'{folder}' is a symbolic link loop (its links point at each other, "
                                 "never at a file or folder)",
                                 "give the real pipeline folder or checkpoint file, or fix the links") from None
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # those two: "does not exist", below
            raise UserInputError(input_name, f"cannot read '{folder}' ({exc.strerror or exc})",
                                 "check that this user may read the path and the folders above it") from None
    if not folder.exists():
        raise UserInputError(input_name, f"'{folder}' does not exist",
                             "give the folder of a diffusers pipeline (the one holding model_index.json)")
    if not folder.is_dir():
        raise UserInputError(input_name, f"'{folder}' is a file, not a pipeline folder",
                             "give the folder of a diffusers pipeline (the one holding model_index.json), or a "
                             "single-file Stable Diffusion 1.x/2.x .safetensors checkpoint")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UserInputError(input_name, f"'{folder}' is not a diffusers pipeline folder (no model_index.json)",
                             "give the folder holding model_index.json, unet/, text_encoder/, tokenizer/ and scheduler/")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(input_name, f"'{index_file}' is not valid JSON ({exc})",
                             "restore the pipeline's model_index.json") from None
    except OSError as exc:
        raise UserInputError(input_name, f"cannot read '{index_file}' ({exc.strerror or exc})",
                             "check the file's permissions, or restore the pipeline's model_index.json") from None
    if not isinstance(index, dict):
        raise UserInputError(input_name, f"'{index_file}' holds a JSON {_json_kind(index)}, not an object of "
                             "components", "restore the pipeline's model_index.json (an object such as "
                             '{"unet": ["diffusers", "UNet2DConditionModel"], ...})')
    components: dict[str, tuple[str, str] | None] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            components[name] = (value[0], value[1])
        else:
            components[name] = None
    missing = [c for c in PIPELINE_COMPONENTS if components.get(c) is None or not (folder / c).is_dir()]
    if missing:
        raise UserInputError(input_name, f"pipeline folder '{folder}' lacks {', '.join(missing)}",
                             "use a Stable-Diffusion-style pipeline with unet/, text_encoder/, tokenizer/ and scheduler/")
    if components["unet"][1] != "UNet2DConditionModel":
        raise UserInputError(input_name, f"its UNet is a {components['unet'][1]}",
                             "use a Stable Diffusion 1.x/2.x-style pipeline (UNet2DConditionModel)")
    if components.get("vae") is not None and not (folder / "vae").is_dir():
        raise UserInputError(input_name, f"model_index.json names a VAE but '{folder / 'vae'}' is missing",
                             "restore the vae/ folder, or remove the 'vae' entry for a pixel-space model")
    for name in WEIGHT_COMPONENTS:
        if components.get(name) is not None:
            _check_weight_files(folder / name, input_name)
    return PipelineFolder(folder, components)


@contextlib.contextmanager
def _quiet_transformers_loading():
    """transformers draws a "Loading weights" bar when a checkpoint's keys do not match; the loader turns that case
    into one error line, which the bar would precede on the terminal."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def _json_kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _check_weight_files(component: Path, input_name: str) -> None:
    """A component folder must hold .safetensors weights; a pickle file without them is refused unopened (the
    loader reads only safetensors, so a pickle file beside them is never touched)."""
    files = sorted(p for p in component.iterdir() if p.is_file())
    if any(p.suffix.lower() == ".safetensors" for p in files):
        return
    pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise UserInputError(input_name, f"'{component.name}/{pickles[0].name}' is a pickle weights file (no "
                             ".safetensors beside it), which can run arbitrary code when loaded, so it is not opened",
                             f"convert the pipeline to safetensors on a machine you can risk (diffusers: load it and "
                             f"save_pretrained(..., safe_serialization=True)), or use a copy that ships "
                             f"{component.name}/*.safetensors")
    raise UserInputError(input_name, f"'{component}' holds no .safetensors weights",
                         f"restore the {component.name} component's .safetensors file")


def _integer_labelled_weights(folder: Path, part: str, module: torch.nn.Module) -> str | None:
    """The first tensor of ``folder/part``'s safetensors files stored with a non-float dtype where ``module`` has a
    float tensor, as ``"name (I32)"``: such data is loaded by casting the integers (F32 bits read as I32 become
    numbers near 1e9), so it must be caught from the header; None when every weight is stored as a float."""
    from safetensors import safe_open

    expected = module.state_dict()
    for file in sorted((folder / part).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                if dtype in FLOAT_DTYPES:
                    continue
                # transformers ≥ 5.6 dropped CLIPTextModel's "text_model." level; files may have it or not
                target = expected.get(key, expected.get(key.removeprefix("text_model."),
                                                        expected.get(f"text_model.{key}")))
                if target is not None and target.is_floating_point():
                    return f"{key} ({dtype})"
    return None


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen, eval mode, on ``device``; cast only when needed (diffusers warns about needless casts)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


class DiffusionPrior:
    """A frozen text-conditioned diffusion model (UNet + CLIP text encoder + optional VAE + noise schedule)."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, vae=None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _place(unet, self.device, dtype)
        self.text_encoder = _place(text_encoder, self.device, dtype)
        self.vae = None if vae is None else _place(vae, self.device, dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.prediction_type: str = scheduler.config.prediction_type
        if self.prediction_type not in SUPPORTED_PREDICTIONS:
            raise UserInputError("model", f"its scheduler predicts '{self.prediction_type}'",
                                 f"use a model whose scheduler prediction_type is one of {SUPPORTED_PREDICTIONS}")
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T]
        self.source: str | None = None      # the folder or file it was loaded from
        self.detected: str | None = None    # for single files: family and prediction type, and what decided them
        self.recipe: Recipe = OFFICIAL       # its distillation defaults (a pipeline folder may carry its own)
        self._warned_prompts: set[str] = set()  # prompts already warned about being cut (one warning each)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32, input_name: str = "model") -> "DiffusionPrior":
        """Load a diffusers pipeline folder offline (``local_files_only``); no network access is attempted."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = inspect_pipeline_folder(path, input_name)
        kw = dict(local_files_only=True, torch_dtype=dtype)
        weights = dict(kw, use_safetensors=True)  # never fall back to a pickle file (inspect refused lone ones)
        try:
            # loading info: a weight the file lacks (or names in a layout this library version does not read) is
            # left at random initialisation with only a logged warning; here it is refused
            unet, unet_info = UNet2DConditionModel.from_pretrained(folder.path, subfolder="unet",
                                                                   output_loading_info=True, **weights)
            with _quiet_transformers_loading():
                text_encoder, text_info = CLIPTextModel.from_pretrained(folder.path, subfolder="text_encoder",
                                                                        output_loading_info=True, **weights)
            tokenizer = CLIPTokenizer.from_pretrained(folder.path, subfolder="tokenizer", **kw)
            # Every DDPM-family scheduler (PNDM, DDIM, Euler, ...) shares the beta-schedule config; distillation
            # needs only its alphas_cumprod and prediction_type, which DDPMScheduler computes from that config.
            scheduler = DDPMScheduler.from_config(
                DDPMScheduler.load_config(folder.path, subfolder="scheduler", local_files_only=True))
            vae = AutoencoderKL.from_pretrained(folder.path, subfolder="vae", **weights) if folder.has_vae else None
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserInputError(input_name, f"could not load the pipeline in '{folder.path}' ({first_line})",
                                 "check that its weights and configs are complete (safetensors files, config.json)") from None
        for part, info in (("unet", unet_info), ("text_encoder", text_info)):
            missing = sorted(info.get("missing_keys") or [])
            if missing:
                raise UserInputError(input_name, f"its {part} weights do not fit its config: {len(missing)} "
                                     f"weights are missing (e.g. {missing[0]}), which would stay random",
                                     "download or copy the pipeline again; if it loads elsewhere, update this "
                                     "Python's packages (pip install -r requirements.txt: transformers ≥ 5.6 and "
                                     "diffusers ≥ 0.35.2 read every layout the pack ships)")
        for part, module in (("unet", unet), ("text_encoder", text_encoder), ("vae", vae)):
            mislabelled = None if module is None else _integer_labelled_weights(folder.path, part, module)
            if mislabelled:
                raise UserInputError(input_name, f"its {part} weight {mislabelled} is stored as integers where the "
                                     "model needs floats (a damaged or mislabelled safetensors file)",
                                     f"download or copy the {part} weights again")
        prior = cls(unet, text_encoder, tokenizer, scheduler, vae, device=resolve_device(device), dtype=dtype)
        prior.check_finite(input_name)
        prior.source = str(folder.path)
        prior.recipe = read_recipe(folder.path)
        return prior

    @torch.no_grad()
    def check_finite(self, input_name: str = "model") -> None:
        """Refuse weights that are NaN or infinite once loaded (a damaged file, data stored under the wrong dtype, or
        values too large for the precision they were cast to): every step would be NaN. One pass over the weights
        on their device, once per load (SD 1.5: well under a second on a GPU, about a second on a CPU)."""
        for part, module in self.modules().items():
            tensors = [(name, t) for name, t in (*module.named_parameters(), *module.named_buffers())
                       if t.is_floating_point()]
            if not tensors:
                continue
            # A sum is NaN or inf when any value is (20× faster than isfinite().all() on a CPU); fp32 accumulation
            # cannot overflow for real weights. One device sync per module; the culprit is looked up on failure.
            finite = torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for _, t in tensors]))
            if bool(finite.all()):
                continue
            name, tensor = tensors[int((~finite).nonzero()[0])]
            what = "NaN or infinite values" if not bool(torch.isfinite(tensor).all()) else \
                "values so large that computing with them overflows"
            cast = f" (after the cast to {str(self.dtype).removeprefix('torch.')})" if self.dtype != torch.float32 else ""
            raise UserInputError(input_name, f"its {part} weight {name} holds {what}{cast}: a damaged file, or data "
                                 "stored under the wrong type", "download or copy the model again" +
                                 (", or set {=precision} to fp32" if cast else ""))

    def set_memory_options(self, attention_slicing: bool = False, vae_checkpointing: bool = False) -> None:
        """Turn on memory savers (never off: a prior shared between runs keeps what any of them asked for).
        Attention already runs through PyTorch's scaled_dot_product_attention (diffusers' default processor), whose
        CUDA kernels do not materialise the attention matrix; slicing (one head at a time, diffusers' "max") is for
        devices without those kernels, where it replaces SDPA. VAE checkpointing recomputes the encoder's blocks
        during backward, which is where a 512 px render's gradient otherwise stores gigabytes of activations."""
        if attention_slicing:
            self.unet.set_attention_slice("max")
        if vae_checkpointing and self.vae is not None:
            self.vae.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ placement and identity
    def modules(self) -> torch.nn.ModuleDict:
        """The frozen networks as one module (the same objects, not copies): what a host's memory manager moves
        and measures. Created once, so a host can keep a handle on it."""
        if getattr(self, "_modules", None) is None:
            parts = {"unet": self.unet, "text_encoder": self.text_encoder}
            if self.vae is not None:
                parts["vae"] = self.vae
            self._modules = torch.nn.ModuleDict(parts)
        return self._modules

    def to(self, device: str | torch.device) -> "DiffusionPrior":
        """Move the networks (and any adapter a φ added to them) and the noise schedule to ``device``; in place."""
        device = torch.device(device)
        self.modules().to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        self.device = device
        return self

    def fingerprint(self) -> str:
        """A short content hash of the frozen weights (every tensor's name, shape, dtype and a strided sample of its
        values) plus the prediction type: two priors with the same fingerprint compute the same thing, wherever
        they were loaded from. Computed once (≈ 0.1 s for SD 1.5 on a CPU); identifies a training run's prior."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib

            digest = hashlib.sha256(self.prediction_type.encode())
            with torch.no_grad():
                for name, tensor in self.modules().state_dict().items():
                    flat = tensor.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.float32)
                    digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                    digest.update(sample.numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def check_shares_space(self, other: "DiffusionPrior", input_name: str) -> None:
        """φ on a second model must see the same noisy inputs: same model space and noise schedule."""
        problems = []
        if other.num_train_timesteps != self.num_train_timesteps or not torch.allclose(
                other.alphas_cumprod.cpu(), self.alphas_cumprod.cpu(), atol=1e-6):
            problems.append("a different noise schedule")
        if (other.latent_space, other.vae_scale_factor, other.unet.config.in_channels) != (
                self.latent_space, self.vae_scale_factor, self.unet.config.in_channels):
            problems.append("a different model space (VAE / channels)")
        elif self.vae is not None and other.vae.config.scaling_factor != self.vae.config.scaling_factor:
            problems.append("a different latent scaling factor")
        if problems:
            raise UserInputError(input_name, f"its model has {' and '.join(problems)} than the prior",
                                 "use a φ model of the same family as the prior (e.g. SD2.1-768 with SD2.1-base)")

    # ------------------------------------------------------------------ geometry
    @property
    def latent_space(self) -> bool:
        return self.vae is not None

    @property
    def native_size(self) -> int:
        """The side in pixels of the images the prior was trained on (UNet sample size × VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per model-space cell along each side (1 for pixel-space models)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sizes must be a multiple of this (8, as Stable Diffusion pipelines require, and of the VAE's
        downsampling). The UNet itself copes with odd feature sizes (diffusers passes explicit upsample sizes)."""
        return max(8, self.vae_scale_factor)

    def _fits(self, size: int) -> bool:
        if size <= 0 or size % self.size_multiple:
            return False
        # Every UNet level needs a feature map, and GroupNorm needs ≥ 2 values per group (a level's input has the
        # previous level's channels): SD is fine down to 64 px, tiny models need a few levels' worth of pixels.
        config, side = self.unet.config, size // self.vae_scale_factor
        channels = config.block_out_channels
        for level in range(len(channels)):
            level_side = side // 2 ** level
            if level_side < 1 or channels[max(level - 1, 0)] // config.norm_num_groups * level_side ** 2 < 2:
                return False
        return True

    def check_image_size(self, size: int, input_name: str = "size") -> None:
        if not self._fits(size):
            smallest = next(s for s in range(self.size_multiple, 4097, self.size_multiple) if self._fits(s))
            raise UserInputError(input_name, f"{size} px does not fit this model",
                                 f"use a multiple of {self.size_multiple} of at least {smallest} px")

    def sample_shape(self, size: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of the model-space tensor for a ``size``×``size`` image."""
        side = size // self.vae_scale_factor
        return (int(self.unet.config.in_channels), side, side)

    # ------------------------------------------------------------------ text
    def cut_text(self, prompt: str) -> str:
        """What of ``prompt`` (after the recipe's word aliases) falls beyond the tokenizer's window and is cut off
        (CLIP: 77 tokens with the start and end tokens); "" when it all fits."""
        text = apply_aliases(prompt, self.recipe.prompt_aliases)
        # verbose=False: transformers' own "sequence length is longer than" log says nothing about what is lost
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        room = self.tokenizer.model_max_length - self.tokenizer.num_special_tokens_to_add()
        return self.tokenizer.decode(ids[room:]).strip() if len(ids) > room else ""

    def warn_if_cut(self, prompt: str, what: str = "the prompt") -> bool:
        """Warn (once per prompt and prior) that the end of ``prompt`` does not fit the text encoder and is dropped,
        naming the dropped words; True when something is cut."""
        cut = self.cut_text(prompt)
        if cut and prompt not in self._warned_prompts:
            self._warned_prompts.add(prompt)
            warnings.warn(f"{what} '{prompt}' is longer than the model's text window of "
                          f"{self.tokenizer.model_max_length} tokens: '{cut}' is cut off and has no effect; shorten "
                          "it", stacklevel=3)
        return bool(cut)

    def tokenize(self, prompts: list[str], warn: bool = True) -> torch.Tensor:
        """``[B, L]`` token ids, padded/truncated to the tokenizer's max length (after the recipe's word aliases);
        ``warn``: say (once per prompt) what a too-long prompt loses."""
        if warn:
            for prompt in dict.fromkeys(prompts):
                self.warn_if_cut(prompt)
        prompts = [apply_aliases(p, self.recipe.prompt_aliases) for p in prompts]
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def encode_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids → ``[B, L, D]`` last hidden states (grad flows if the caller enables it)."""
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], warn: bool = True) -> torch.Tensor:
        """Prompts → frozen text embeddings ``[B, L, D]`` for the UNet's cross-attention (``warn``: as
        :meth:`tokenize`)."""
        return self.encode_token_ids(self.tokenize(prompts, warn=warn))

    # ------------------------------------------------------------------ images
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] → model space ``[B, C, h, w]``; gradients flow through the encoder.

        Latent models draw a sample of the VAE posterior (with ``generator``; ``sample=False`` takes its mean)
        and apply the VAE's scaling/shift factors.
        """
        pixels = images.to(self.device, self.dtype) * 2.0 - 1.0
        if self.vae is None:
            return pixels.float()
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator) if sample else posterior.mode()
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).float()

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model space ``[B, C, h, w]`` → images ``[B, 3, H, W]`` in [0, 1]."""
        if self.vae is None:
            return ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        shift = self.vae.config.shift_factor or 0.0
        latents = x0.to(self.dtype) / self.vae.config.scaling_factor + shift
        return ((self.vae.decode(latents).sample.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ noise schedule
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` timesteps → ``(alpha_t, sigma_t)``, each ``[B, 1, 1, 1]`` float32."""
        abar = self.alphas_cumprod[t.to(self.device)].view(-1, 1, 1, 1)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return alpha * x0 + sigma * eps

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Native UNet output → epsilon. For v-prediction ``eps = sigma_t * x_t + alpha_t * v``."""
        if self.prediction_type == "epsilon":
            return output
        alpha, sigma = self.alpha_sigma(t)
        return sigma * x_t + alpha * output

    def training_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output at ``x_t`` (epsilon, or ``v = alpha_t * eps - sigma_t * x0``)."""
        if self.prediction_type == "epsilon":
            return eps
        alpha, sigma = self.alpha_sigma(t)
        return alpha * eps - sigma * x0

    # ------------------------------------------------------------------ denoiser
    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """One UNet call: ``x_t [B,C,h,w]``, ``t [B]``, ``embeddings [B,L,D]`` → native output ``[B,C,h,w]`` (float32)."""
        if embeddings.shape[0] != x_t.shape[0]:  # one prompt for the whole batch
            embeddings = embeddings.expand(x_t.shape[0], -1, -1)
        out = self.unet(x_t.to(self.dtype), t.to(self.device), encoder_hidden_states=embeddings.to(self.dtype),
                        return_dict=False)[0]
        return out.float()

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance_scale: float, negatives: torch.Tensor | None = None,
               negative_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance in one batched UNet call.

        Returns ``(eps_cfg, output_cond)``: the guided epsilon ``eps_u + s (eps_c - eps_u)`` and the conditional
        native output (VSD/ASD's discriminator loss compares with it). All ``[B, C, h, w]``.
        With Perp-Neg, ``negatives [B, K, L, D]`` and ``negative_weights [B, K]`` add
        ``s · Σ_k w_k · perp(eps_k - eps_u, eps_c - eps_u)`` (the component perpendicular to the positive
        direction, per sample), still in the same single UNet call of ``(2 + K)·B``.
        """
        batch = x_t.shape[0]
        embeddings = [uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)]
        if negatives is not None:
            embeddings += list(negatives.unbind(1))
        n = len(embeddings)
        out = self.model_output(torch.cat([x_t] * n), torch.cat([t] * n), torch.cat(embeddings))
        outs = out.chunk(n)
        eps = [self.to_eps(o, x_t, t) for o in outs]
        direction = eps[1] - eps[0]
        if negatives is not None:
            positive = direction
            norm2 = positive.square().sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            for k, eps_negative in enumerate(eps[2:]):
                e = eps_negative - eps[0]
                perpendicular = e - (e * positive).sum(dim=(1, 2, 3), keepdim=True) / norm2 * positive
                direction = direction + negative_weights[:, k].view(-1, 1, 1, 1).to(e) * perpendicular
        return eps[0] + guidance_scale * direction, outs[1]
