"""ComfyUI nodes of the pack (V1 API). Each node parses its inputs, calls ``asd_engine`` and returns outputs.

Graph: Load SD Model → ASD Discriminator (LoRA/TI) → NeRF Generator / Image Generator → ASD Train Loop →
Render Views / Export Mesh / Save ASD Checkpoint; Load ASD Checkpoint feeds Train Loop's ``resume`` or the
output nodes. Custom types are pack-prefixed: ASD_PRIOR, ASD_PHI, ASD_GENERATOR, ASD_RESULT, ASD_CHECKPOINT.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from ..asd_engine import specs
from ..asd_engine.discriminator import PhiConfig
from ..asd_engine.errors import UserInputError
from ..asd_engine.loading import load_prior
from ..asd_engine.prior import DiffusionPrior
from ..asd_engine.runs import PRECISIONS
from . import comfy_bridge as host

METHODS = ["asd", "vsd", "sds"]
WEIGHTINGS = ["sds", "uniform", "sigma_over_alpha"]
PRESETS = ["toy-cpu", "quality", "low-vram"]


def engine_call(method):
    """Node functions run the engine outside ComfyUI's inference mode (its tensors cannot take part in autograd,
    which training and normal maps need) and turn the engine's user errors into the one-line message ComfyUI shows."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            with torch.inference_mode(False):
                return method(*args, **kwargs)
        except UserInputError as exc:
            raise RuntimeError(str(exc)) from None
    return wrapper


PREDICTION_TYPES = ["auto", "epsilon", "v_prediction"]


class _PriorNode:
    """What the two prior loaders share: output, category, the precision input, and the device/memory steps."""

    CATEGORY = "ASD/loaders"
    RETURN_TYPES = ("ASD_PRIOR",)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The frozen prior; φ adapters are added to it per training run, never copied.",)
    PRECISION_INPUT = (list(PRECISIONS), {"default": "fp32",
                       "tooltip": "Weights' precision of the frozen prior; φ always trains in fp32."})

    @staticmethod
    def _device_with_room(size_bytes: int) -> torch.device:
        from ..asd_engine.devices import default_device

        device = default_device()
        host.free_memory_for(size_bytes, device)
        return device

    @staticmethod
    def _report(node: str, prior: DiffusionPrior) -> tuple[DiffusionPrior]:
        if prior.detected:  # ComfyUI's console: which family and ε/v, and which signal decided
            logging.info("[ASD] %s: %s", node, prior.detected)
        return (prior,)


class ASDLoadPrior(_PriorNode):
    DESCRIPTION = ("Loads a frozen diffusion prior for score distillation: the embedded 32 px toy prior, a diffusers "
                   "Stable Diffusion 1.x/2.x pipeline folder from models/asd or models/diffusers, or a single-file "
                   "SD 1.x / 2.x (v) .safetensors checkpoint from models/checkpoints.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.model_choices() or [host.EMBEDDED_PRIOR],
                      {"tooltip": "A pipeline folder (model_index.json, unet/, ...) or a single-file SD 1.x/2.x "
                                  ".safetensors checkpoint (family and v-prediction are detected from the weights)."}),
            "precision": cls.PRECISION_INPUT,
            "prediction_type": (PREDICTION_TYPES, {"default": "auto", "tooltip":
                                "auto: the folder's scheduler, or detected from the checkpoint (the console says "
                                "which signal decided); set it when a 768-v model is not detected."}),
        }}

    @engine_call
    def load(self, model: str, precision: str, prediction_type: str = "auto"):
        path = host.model_path(model)
        files = [path] if path.is_file() else list(path.rglob("*.safetensors"))
        device = self._device_with_room(sum(f.stat().st_size for f in files))
        return self._report("Load SD Model", load_prior(
            path, device=device, dtype=PRECISIONS[precision], input_name="model", prediction_type=prediction_type))


class ASDPriorFromCheckpoint(_PriorNode):
    DESCRIPTION = ("Makes an ASD prior from the MODEL, CLIP and VAE of the core Load Checkpoint node (SD 1.x / 2.x), "
                   "so the checkpoint you already load feeds ASD. LoRAs applied to MODEL/CLIP upstream are baked in. "
                   "The prior is a second copy of the weights in memory.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "From Load Checkpoint (its prediction type, incl. a ModelSamplingDiscrete "
                                           "override, is used)."}),
            "clip": ("CLIP", {"tooltip": "From the same Load Checkpoint."}),
            "vae": ("VAE", {"tooltip": "From the same Load Checkpoint."}),
            "precision": cls.PRECISION_INPUT,
        }}

    @engine_call
    def convert(self, model, clip, vae, precision: str):
        from ..asd_engine.single_file import prior_from_state_dict

        state, prediction = host.checkpoint_state_dict(model, clip, vae)
        device = self._device_with_room(sum(v.numel() * v.element_size() for v in state.values()))
        return self._report("Prior from checkpoint", prior_from_state_dict(
            state, prediction, device=device, dtype=PRECISIONS[precision], source="Load Checkpoint",
            input_name="model", prediction_source="ComfyUI's model sampling"))


class ASDDiscriminator:
    DESCRIPTION = ("Settings of ASD's discriminator φ: a LoRA on the prior's own UNet (optionally conditioned on "
                   "the camera) or textual-inversion tokens, its learning rate, and ASD's γ.")
    CATEGORY = "ASD/setup"
    RETURN_TYPES = ("ASD_PHI",)
    RETURN_NAMES = ("phi",)
    OUTPUT_TOOLTIPS = ("φ settings for ASD Train Loop (VSD uses them with γ = 0; SDS ignores them).",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "phi_type": (["lora", "ti"], {"default": "lora", "tooltip": "LoRA adapter, or textual inversion tokens."}),
            "lora_rank": ("INT", {"default": 4, "min": 1, "max": 128, "tooltip": "LoRA rank (official: 4)."}),
            "ti_tokens": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Number of textual-inversion tokens."}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-5,
                              "tooltip": "φ's AdamW learning rate; 0 = default: from the prior's recipe for LoRA "
                                         "(Stable Diffusion 1e-4, toy prior 1e-3), 5e-3 for TI."}),
            "gamma": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                      "tooltip": "ASD's γ in the discriminator loss, -1 … 0 (0 turns ASD into VSD); 1 = default: from "
                                 "the prior's recipe (Stable Diffusion: the official -0.75)."}),
            "camera_embedding": ("BOOLEAN", {"default": True,
                                 "tooltip": "Condition the LoRA φ on the camera (3D runs, as the official code)."}),
        }, "optional": {
            "phi_model": ("ASD_PRIOR", {"tooltip": "A second model for φ (the official recipe: SD2.1-768 v for φ, "
                                                   "SD2.1-base as the prior). Empty: φ lives on the prior itself."}),
        }}

    @engine_call
    def build(self, phi_type, lora_rank, ti_tokens, learning_rate, gamma, camera_embedding, phi_model=None):
        phi = PhiConfig(kind=phi_type, lora_rank=lora_rank, num_tokens=ti_tokens,
                        lr=learning_rate or None, camera_embedding=camera_embedding)
        phi.validate()
        if 0.0 < gamma < 1.0:
            raise UserInputError("gamma", f"{gamma} is not a γ", "use -1 … 0, or 1 for the prior's recipe")
        return (specs.DiscriminatorSpec(phi=phi, gamma=None if gamma == 1.0 else gamma, phi_prior=phi_model),)


class ASDNeRFGenerator:
    DESCRIPTION = ("A NeRF to distil (text-to-3D): hash-grid field, occupancy-grid renderer and background, with "
                   "a preset: toy-cpu (minutes on a CPU), quality (the official recipe, GPU), low-vram.")
    CATEGORY = "ASD/setup"
    RETURN_TYPES = ("ASD_GENERATOR",)
    RETURN_NAMES = ("generator",)
    OUTPUT_TOOLTIPS = ("What ASD Train Loop optimises.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "preset": (PRESETS, {"default": "toy-cpu", "tooltip": "Grid size, render resolutions and defaults."}),
            "resolution_schedule": ("STRING", {"default": "", "tooltip":
                                    "Render sizes by step, e.g. '0:64, 5000:512'; empty = the preset's."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": "Cameras per step."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seed of the whole run."}),
        }}

    @engine_call
    def build(self, preset, resolution_schedule, batch_size, seed):
        schedule = specs.parse_resolution_schedule(resolution_schedule)
        return (specs.NeRFGeneratorSpec(preset=preset, resolution_schedule=schedule, batch_size=batch_size, seed=seed),)


class ASDImageGenerator:
    DESCRIPTION = "One image to distil (2D): optimised as the prior's latent, or as RGB pixels through its VAE."
    CATEGORY = "ASD/setup"
    RETURN_TYPES = ("ASD_GENERATOR",)
    RETURN_NAMES = ("generator",)
    OUTPUT_TOOLTIPS = ("What ASD Train Loop optimises.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "size": ("INT", {"default": 512, "min": 8, "max": 2048, "step": 8, "tooltip": "Image side in pixels."}),
            "parameterization": (["latent", "pixel"], {"default": "latent", "tooltip":
                                 "latent: no VAE pass per step (fast); pixel: RGB through the VAE encoder."}),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-4,
                              "tooltip": "Adam learning rate of the image; 0 = default (0.03 latent, 0.01 pixel)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "Seed of the whole run."}),
        }}

    def build(self, size, parameterization, learning_rate, seed):
        return (specs.ImageGeneratorSpec(size=size, parameterization=parameterization, lr=learning_rate or None,
                                         seed=seed),)


class ASDTrainLoop:
    DESCRIPTION = ("Runs Adversarial Score Distillation (or the VSD / SDS baselines) with live progress and a "
                   "preview. Cancel stops it within a step and leaves a resumable checkpoint in output/asd/.")
    CATEGORY = "ASD/train"
    RETURN_TYPES = ("ASD_RESULT", "IMAGE", "ASD_CHECKPOINT")
    RETURN_NAMES = ("result", "preview", "checkpoint")
    OUTPUT_TOOLTIPS = ("The trained NeRF or image, for Render Views / Export Mesh / Save ASD Checkpoint.",
                       "The final image (2D) or four views of the NeRF (3D).",
                       "Folder of the checkpoint written at the end (or on cancel); connect to 'resume'.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prior": ("ASD_PRIOR", {"tooltip": "From Load SD Model."}),
            "generator": ("ASD_GENERATOR", {"tooltip": "From NeRF Generator or Image Generator."}),
            "prompt": ("STRING", {"multiline": True, "default": "a red cube", "tooltip": "What to make."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "Classifier-free guidance's negative prompt."}),
            "method": (METHODS, {"default": "asd", "tooltip": "asd, or the baselines vsd (= γ 0) and sds (no φ)."}),
            "steps": ("INT", {"default": 300, "min": 1, "max": 100_000, "tooltip": "Total steps (also when resuming)."}),
            "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                    "tooltip": "Classifier-free guidance scale of the prior; 0 = default: from the prior's recipe "
                               "(Stable Diffusion 7.5, toy prior 3)."}),
            "weighting": (WEIGHTINGS, {"default": "sds", "tooltip": "w(t): 1-ᾱ (sds), 1, or √((1-ᾱ)/ᾱ)."}),
            "t_min": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Lowest timestep as a fraction of T; -1 = default: from the prior's recipe (0.02)."}),
            "t_max": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Highest timestep as a fraction of T (3D presets anneal it later); -1 = default: "
                                 "from the prior's recipe (0.98)."}),
            "background": (["from prior", "random", "white", "black"], {"default": "from prior", "tooltip":
                           "What renders are composited over in training (3D) and 2D pixels start as. Default: from "
                           "the prior's recipe (random colours for Stable Diffusion, white for the toy prior, which "
                           "only saw white)."}),
            "noise_sharing": (["fresh", "shared"], {"default": "fresh", "tooltip":
                              "φ step with its own t' and noise (official) or the generator's (one UNet call less)."}),
            "filename_prefix": ("STRING", {"default": "asd", "tooltip": "Checkpoints go to output/asd/<prefix>_NNNNN."}),
        }, "optional": {
            "phi": ("ASD_PHI", {"tooltip": "From ASD Discriminator; default: LoRA rank 4, γ -0.75."}),
            "resume": ("ASD_CHECKPOINT", {"tooltip": "Continue this checkpoint up to 'steps' (same prompt/method)."}),
        }}

    @engine_call
    def train(self, prior, generator, prompt, negative_prompt, method, steps, cfg, weighting, t_min, t_max,
              noise_sharing, filename_prefix, background="from prior", phi=None, resume=None):
        # 0 / -1 / "from prior" are the widgets' way of saying None: the prior's recipe decides
        run = specs.make_run(prior, generator, prompt, steps, negative_prompt=negative_prompt, method=method,
                             guidance_scale=cfg or None, weighting=weighting, t_min=None if t_min < 0 else t_min,
                             t_max=None if t_max < 0 else t_max, phi_noise=noise_sharing, discriminator=phi,
                             resume=resume, background=None if background == "from prior" else background)
        folder, _ = host.new_output_folder(filename_prefix)
        progress = Progress(run)
        try:
            result = specs.train(run, folder / "checkpoint", on_step=progress.on_step, is_interrupt=host.is_interrupt)
        finally:
            if run.phi is not None and hasattr(run.phi, "remove"):
                run.phi.remove()  # the prior is shared: leave it exactly as loaded
        return (result, host.to_comfy_images(run.preview()), str(result.checkpoint))


class Progress:
    """Progress bar with a preview about 20 times per run; raises ComfyUI's interrupt between steps."""

    def __init__(self, run) -> None:
        self.run = run
        self.every = max(1, run.config.steps // 20)
        self.bar = host.Progress(run.config.steps)

    def on_step(self, info) -> None:
        preview = self.run.preview() if info.step % self.every == 0 or info.step == info.total else None
        self.bar.update(info.step, info.total, preview)
        host.check_interrupt()


class ASDSaveCheckpoint:
    DESCRIPTION = "Saves a result's checkpoint (safetensors + JSON) to output/asd/<prefix>_NNNNN/checkpoint."
    CATEGORY = "ASD/checkpoints"
    RETURN_TYPES = ("ASD_CHECKPOINT",)
    RETURN_NAMES = ("checkpoint",)
    OUTPUT_TOOLTIPS = ("The saved checkpoint folder.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "result": ("ASD_RESULT", {"tooltip": "From ASD Train Loop or Load ASD Checkpoint."}),
            "filename_prefix": ("STRING", {"default": "asd_checkpoint", "tooltip": "Folder name prefix."}),
        }}

    @engine_call
    def save(self, result, filename_prefix):
        import shutil

        folder, relative = host.new_output_folder(filename_prefix)
        target = folder / "checkpoint"
        if result.run is not None:
            result.run.save_checkpoint(target)
        elif result.checkpoint is not None:
            shutil.copytree(result.checkpoint, target)
        else:
            raise RuntimeError("Save ASD Checkpoint: this result has neither a live run nor a checkpoint folder")
        return {"ui": {"text": [f"{relative}/checkpoint"]}, "result": (str(target),)}


class ASDLoadCheckpoint:
    DESCRIPTION = ("Loads an ASD checkpoint folder (from output/asd/ or any path): as 'resume' for ASD Train Loop, "
                   "and as a result for Render Views / Export Mesh (2D results need the prior to decode).")
    CATEGORY = "ASD/checkpoints"
    RETURN_TYPES = ("ASD_CHECKPOINT", "ASD_RESULT")
    RETURN_NAMES = ("checkpoint", "result")
    OUTPUT_TOOLTIPS = ("The checkpoint folder.", "Its NeRF (3D) or image (2D, with 'prior').")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": ("STRING", {"default": "", "tooltip":
                           "Checkpoint folder: absolute, or relative to the output folder (e.g. asd/asd_00001/checkpoint)."}),
        }, "optional": {
            "prior": ("ASD_PRIOR", {"tooltip": "Needed to decode a 2D (latent) result."}),
        }}

    @engine_call
    def load(self, checkpoint, prior=None):
        path = Path(checkpoint).expanduser()
        if not path.is_absolute():
            path = host.output_dir() / path
        return (str(path), specs.load_result(path, prior=prior))


NODE_CLASS_MAPPINGS = {
    "ASDLoadPrior": ASDLoadPrior,
    "ASDPriorFromCheckpoint": ASDPriorFromCheckpoint,
    "ASDDiscriminator": ASDDiscriminator,
    "ASDNeRFGenerator": ASDNeRFGenerator,
    "ASDImageGenerator": ASDImageGenerator,
    "ASDTrainLoop": ASDTrainLoop,
    "ASDSaveCheckpoint": ASDSaveCheckpoint,
    "ASDLoadCheckpoint": ASDLoadCheckpoint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ASDLoadPrior": "Load SD Model (ASD)",
    "ASDPriorFromCheckpoint": "ASD Prior from Checkpoint",
    "ASDDiscriminator": "ASD Discriminator (LoRA/TI)",
    "ASDNeRFGenerator": "NeRF Generator (ASD)",
    "ASDImageGenerator": "Image Generator (ASD)",
    "ASDTrainLoop": "ASD Train Loop",
    "ASDSaveCheckpoint": "Save ASD Checkpoint",
    "ASDLoadCheckpoint": "Load ASD Checkpoint",
}
