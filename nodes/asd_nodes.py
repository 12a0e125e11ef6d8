"""ComfyUI nodes of the pack (V1 API). Each node parses its inputs, calls ``asd_engine`` and returns outputs.

Graph: Load SD Model → ASD Discriminator (LoRA/TI) → NeRF Generator / Image Generator → ASD Train Loop →
Render Views / Export Mesh / Save ASD Checkpoint; Load ASD Checkpoint feeds Train Loop's ``resume`` or the
output nodes. Custom types are pack-prefixed: ASD_PRIOR, ASD_PHI, ASD_GENERATOR, ASD_RESULT, ASD_CHECKPOINT.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from ..asd_engine import specs
from ..asd_engine.discriminator import LORA_TARGETS, PhiConfig
from ..asd_engine.distill import WEIGHTINGS
from ..asd_engine.errors import UserInputError
from ..asd_engine.loading import load_prior
from ..asd_engine.prior import DiffusionPrior
from ..asd_engine.runs import PRECISIONS
from . import comfy_bridge as host

METHODS = ["asd", "vsd", "sds"]
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
# Seeds stay as typed: no "control after generate" widget (the frontend would add one set to "randomize" for an
# input named seed, and every Queue would then throw the trained run away and train a new one).
SEED_TOOLTIP = ("Seed of the whole run; it stays fixed between Queues (a finished run is reused). For a new run, "
                "change it, or drive it from a Primitive node set to 'randomize'.")


class _PriorNode:
    """What the two prior loaders share: output, category, the precision input, and the device/memory steps."""

    CATEGORY = "ASD/loaders"
    RETURN_TYPES = ("ASD_PRIOR",)
    RETURN_NAMES = ("prior",)
    OUTPUT_TOOLTIPS = ("The frozen prior; φ adapters are added to it per training run, never copied.",)
    PRECISION_INPUT = (["auto", *PRECISIONS], {"default": "auto", "tooltip":
                       "Weights' precision of the frozen prior: auto = fp16 on a GPU, fp32 on the CPU (as the CLI); "
                       "φ always trains in fp32."})

    @staticmethod
    def _placement(precision: str) -> tuple[torch.device, torch.dtype]:
        """Where a new prior waits (ComfyUI's offload device: Train Loop loads it to the GPU through ComfyUI's
        model management, and gives it back after) and its dtype, chosen for the device it will compute on."""
        from ..asd_engine.devices import default_device
        from ..asd_engine.runs import resolve_precision

        return host.offload_device(), resolve_precision(precision, default_device())

    @staticmethod
    def _report(node: str, prior: DiffusionPrior) -> tuple[DiffusionPrior]:
        if prior.detected:  # ComfyUI's console: which family and ε/v, and which signal decided
            logging.info("[ASD] %s: %s", node, prior.detected)
        prior.fingerprint()  # identifies the runs trained on it; computed now, before any φ adapter is added
        host.register_prior(prior)
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
        device, dtype = self._placement(precision)
        return self._report("Load SD Model", load_prior(
            host.model_path(model), device=device, dtype=dtype, input_name="model", prediction_type=prediction_type))


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
        device, dtype = self._placement(precision)
        return self._report("Prior from checkpoint", prior_from_state_dict(
            state, prediction, device=device, dtype=dtype, source="Load Checkpoint",
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
                                         "(Stable Diffusion 1e-4, toy prior 1e-2), 5e-3 for TI."}),
            "gamma": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 1.0, "step": 0.05,
                      "tooltip": "ASD's γ in the discriminator loss, -1 … 0 (0 turns ASD into VSD); 1 = default: from "
                                 "the prior's recipe (Stable Diffusion: the official -0.75)."}),
            "camera_embedding": ("BOOLEAN", {"default": True,
                                 "tooltip": "Condition the LoRA φ on the camera (3D runs, as the official code)."}),
        }, "optional": {
            "phi_model": ("ASD_PRIOR", {"tooltip": "A second model for φ (the official recipe: SD2.1-768 v for φ, "
                                                   "SD2.1-base as the prior). Empty: φ lives on the prior itself."}),
            "lora_targets": (["from prior", *LORA_TARGETS], {"default": "from prior",
                             "tooltip": "UNet layers the LoRA adapts: attention or all (every convolution too); "
                                        "from prior = the prior's recipe (Stable Diffusion: the official attention; "
                                        "toy prior: all)."}),
        }}

    @engine_call
    def build(self, phi_type, lora_rank, ti_tokens, learning_rate, gamma, camera_embedding, phi_model=None,
              lora_targets=None):
        # optional, so that API workflows saved before it existed still validate: absent = from the prior's recipe
        phi = PhiConfig(kind=phi_type, lora_rank=lora_rank,
                        lora_targets=None if lora_targets in (None, "from prior") else lora_targets,
                        num_tokens=ti_tokens,
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
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                     "tooltip": SEED_TOOLTIP}),
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
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                     "tooltip": SEED_TOOLTIP}),
        }, "optional": {
            "jitter": ("INT", {"default": -1, "min": -1, "max": 64, "tooltip":
                       "Each step the prior sees the image rolled by a random shift of up to this many pixels (of "
                       "its latent, for Stable Diffusion) per axis; 0 = never. -1 = default: from the prior's recipe "
                       "(Stable Diffusion 0, toy prior 1; SDS runs 0)."}),
        }}

    def build(self, size, parameterization, learning_rate, seed, jitter=None):
        # optional, so that API workflows saved before it existed still validate: absent or -1 = from the recipe
        return (specs.ImageGeneratorSpec(size=size, parameterization=parameterization, lr=learning_rate or None,
                                         seed=seed, jitter=None if jitter is None or jitter < 0 else jitter),)


class ASDTrainLoop:
    DESCRIPTION = ("Runs Adversarial Score Distillation (or the VSD / SDS baselines) with live progress and a "
                   "preview. Each run keeps its checkpoint in output/asd/train/<prompt>_<run id>: queueing the same "
                   "run again reuses it, and after a Cancel it resumes where it stopped.")
    CATEGORY = "ASD/train"
    RETURN_TYPES = ("ASD_RESULT", "IMAGE", "ASD_CHECKPOINT", "LOSS_MAP")
    RETURN_NAMES = ("result", "preview", "checkpoint", "loss")
    OUTPUT_TOOLTIPS = ("The trained NeRF or image, for Render Views / NeRF to Mesh / Save ASD Checkpoint.",
                       "The final image (2D) or four views of the NeRF (3D).",
                       "This run's checkpoint folder; connect to another Train Loop's 'resume' to train further.",
                       "Per-step losses for core Plot Loss Graph ('loss': the generator's, 'phi_loss': φ's).")
    FUNCTION = "train"
    OUTPUT_NODE = True  # a graph that only trains is complete; the node shows the final preview
    PREVIEW_SECONDS = 3.0  # progress previews at most this often (a render costs a step on small runs)

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
            "weighting": (["from prior", *WEIGHTINGS], {"default": "from prior", "tooltip":
                          "w(t): 1-ᾱ (sds), 1 (uniform), or √((1-ᾱ)/ᾱ). Default: from the prior's recipe "
                          "(sds; the toy prior's 2D runs: uniform)."}),
            "t_min": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Lowest timestep as a fraction of T; -1 = default: from the prior's recipe (0.02)."}),
            "t_max": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                      "tooltip": "Highest timestep as a fraction of T (3D presets anneal it later); -1 = default: "
                                 "from the prior's recipe (0.98)."}),
            "background": (["from prior", "random", "white", "black"], {"default": "from prior", "tooltip":
                           "What renders are composited over in training (3D) and 2D pixels start as. Default: from "
                           "the prior's recipe (random colours for Stable Diffusion, white for the toy prior, which "
                           "only saw white)."}),
            "noise_sharing": (["from prior", "fresh", "shared"], {"default": "from prior", "tooltip":
                              "φ step with its own t' and noise (fresh, official) or the generator's (shared, one UNet "
                              "call less). Default: from the prior's recipe (fresh for Stable Diffusion; the toy "
                              "prior: shared in 3D, where it opened the torus's hole, fresh in 2D)."}),
        }, "optional": {
            "phi": ("ASD_PHI", {"tooltip": "From ASD Discriminator; default: LoRA rank 4, γ from the prior's recipe."}),
            "resume": ("ASD_CHECKPOINT", {"tooltip": "Continue this checkpoint up to 'steps' (same prompt/method; its "
                                                     "settings are used). Not needed after a Cancel: the same run "
                                                     "resumes by itself."}),
        }}

    @engine_call
    def train(self, prior, generator, prompt, negative_prompt, method, steps, cfg, weighting, t_min, t_max,
              noise_sharing, background="from prior", phi=None, resume=None):
        # 0 / -1 / "from prior" are the widgets' way of saying None: the prior's recipe decides
        plan = specs.plan_run(prior, generator, prompt, steps, negative_prompt=negative_prompt, method=method,
                              guidance_scale=cfg or None, weighting=None if weighting == "from prior" else weighting,
                              t_min=None if t_min < 0 else t_min,
                              t_max=None if t_max < 0 else t_max, discriminator=phi,
                              phi_noise=None if noise_sharing == "from prior" else noise_sharing,
                              background=None if background == "from prior" else background)
        if resume:
            plan = specs.resume_plan(plan, resume)
        checkpoint = host.train_folder(prompt, plan.key()) / "checkpoint"
        start = specs.latest_checkpoint([checkpoint, resume], steps)
        with host.priors_loaded([prior, plan.phi_prior], specs.training_memory_bytes(plan)):
            result, preview = self._train(plan, start, checkpoint)
        images = host.to_comfy_images(preview)
        return {"ui": {"images": host.save_preview(images)},
                "result": (result, images, str(result.checkpoint), result.losses)}

    @staticmethod
    def _train(plan, start, checkpoint):
        run = plan.build(resume=start)
        if start is not None:  # a finished run is rebuilt from its checkpoint and runs no step
            logging.info("[ASD] Train Loop: %s %s at step %d of %d", "resuming" if run.step < run.config.steps
                         else "reusing the finished run in", start, run.step, run.config.steps)
        progress = Progress(run)
        try:
            result = specs.train(run, checkpoint, on_step=progress.on_step, is_interrupt=host.is_interrupt)
            # the last step's progress preview is the final picture; a finished run that ran no step renders it
            return result, progress.final if progress.final is not None else run.preview()
        finally:
            if run.phi is not None and hasattr(run.phi, "remove"):
                run.phi.remove()  # the prior is shared: leave it exactly as loaded


class Progress:
    """Progress bar from the run's current step (so a resume shows where it starts), a preview at most every
    ``PREVIEW_SECONDS`` and at the end; raises ComfyUI's interrupt between steps."""

    def __init__(self, run) -> None:
        self.run = run
        self.bar = host.Progress(run.config.steps)
        self.bar.update(run.step, run.config.steps)
        self.last_preview = time.monotonic()
        self.final: torch.Tensor | None = None  # the preview rendered at the last step

    def on_step(self, info) -> None:
        preview = None
        if info.step == info.total or time.monotonic() - self.last_preview >= ASDTrainLoop.PREVIEW_SECONDS:
            preview, self.last_preview = self.run.preview(), time.monotonic()
        if info.step == info.total:
            self.final = preview
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
        if result.checkpoint is None or specs.checkpoint_step(result.checkpoint) is None:
            raise UserInputError("result", "it has no checkpoint folder to save",
                                 "connect an ASD Train Loop or Load ASD Checkpoint result")
        shutil.copytree(result.checkpoint, folder / "checkpoint")
        return {"ui": {"text": [f"{relative}/checkpoint"]}, "result": (str(folder / "checkpoint"),)}


class ASDLoadCheckpoint:
    DESCRIPTION = ("Loads an ASD checkpoint folder from output/asd/ (runs and saved checkpoints) or models/asd/: as "
                   "'resume' for ASD Train Loop, and as a result for Render Views / NeRF to Mesh (2D results need the "
                   "prior to decode). Only folders in the list can be loaded.")
    CATEGORY = "ASD/checkpoints"
    RETURN_TYPES = ("ASD_CHECKPOINT", "ASD_RESULT")
    RETURN_NAMES = ("checkpoint", "result")
    OUTPUT_TOOLTIPS = ("The checkpoint folder.", "Its NeRF (3D) or image (2D, with 'prior').")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (sorted(host.checkpoint_choices()), {"tooltip":
                           "A checkpoint folder under output/asd or models/asd (refresh the page after training to "
                           "see new ones). Paths elsewhere are refused, so a shared server never reads other folders."}),
        }, "optional": {
            "prior": ("ASD_PRIOR", {"tooltip": "Needed to decode a 2D (latent) result."}),
        }}

    @engine_call
    def load(self, checkpoint, prior=None):
        folders = host.checkpoint_choices()
        if checkpoint not in folders:  # ComfyUI's validation refuses it too; this guards direct calls
            raise UserInputError("checkpoint", f"'{checkpoint}' is not a checkpoint folder under output/asd or "
                                 "models/asd (absolute, ~ and .. paths are refused)",
                                 "choose one from the list; refresh the page after training")
        path = folders[checkpoint]
        with host.priors_loaded([prior]):
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
