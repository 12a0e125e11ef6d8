"""The training nodes of the previous version, under their old ids, so that saved workflows (UI and API format)
still load and run with their values meaning what they meant: cfg 0, t -1, learning rate 0, γ 1 and jitter -1 said
"from the prior's recipe" there. ComfyUI hides deprecated nodes from its node library; the current nodes are in
``asd_nodes.py`` (ASDTrain, ASDDiscriminatorLoRA / ASDDiscriminatorTI, ASDImage).
"""

from __future__ import annotations

from ..asd_engine.distill import METHODS, WEIGHTINGS
from ..asd_engine.errors import UserInputError
from ..asd_engine.prior.discriminator import LORA_TARGETS, PHI_KINDS, PhiConfig
from ..asd_engine.runs import plan as run_plan
from .asd_nodes import (CUSTOM, SEED_TOOLTIP, TRAIN_GRAPH_INPUTS, ASDImage, ASDTrain, _DiscriminatorNode, engine_call,
                        train_node)
from .output_nodes import RESOLUTION_INPUT, RESULT_INPUT, THRESHOLD_INPUT, ASDExportNeRFMesh, ASDNeRFMesh


class ASDDiscriminator(_DiscriminatorNode):
    DEPRECATED = True  # replaced by ASD Discriminator (LoRA) and (TI); kept so saved workflows load
    DESCRIPTION = ("Settings of ASD's discriminator φ: a LoRA on the prior's own UNet (optionally conditioned on "
                   "the camera) or textual-inversion tokens, its learning rate, and ASD's γ.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "phi_type": (list(PHI_KINDS), {"default": "lora", "tooltip": "LoRA adapter, or textual inversion tokens."}),
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
        if 0.0 < gamma < 1.0:
            raise UserInputError("distill.gamma", f"{gamma} is not a γ", "use -1 … 0, or 1 for the prior's recipe")
        return (run_plan.DiscriminatorSpec(phi=phi, gamma=None if gamma == 1.0 else gamma, phi_prior=phi_model),)


class ASDImageGenerator(ASDImage):
    DEPRECATED = True  # replaced by Image Generator (ASD), ASDImage; kept so saved workflows load

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

    @engine_call
    def build(self, size, parameterization, learning_rate, seed, jitter=None):
        # optional, so that API workflows saved before it existed still validate: absent or -1 = from the recipe
        return (run_plan.ImageGeneratorSpec(size=size, parameterization=parameterization, lr=learning_rate or None,
                                         seed=seed, jitter=None if jitter is None or jitter < 0 else jitter),)


class ASDTrainLoop(ASDTrain):
    DEPRECATED = True  # replaced by ASD Train Loop, ASDTrain; kept so saved workflows load

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **TRAIN_GRAPH_INPUTS,
            "method": (list(METHODS), {"default": "asd", "tooltip": "asd, or the baselines vsd (= γ 0) and sds (no φ)."}),
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
        # this version's markers for "the prior's recipe": cfg 0, t -1, "from prior"
        values = {"prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "distill.method": method,
                  "distill.guidance_scale": cfg or None,
                  "distill.weighting": None if weighting == "from prior" else weighting,
                  "distill.t_min": None if t_min < 0 else t_min, "distill.t_max": None if t_max < 0 else t_max,
                  "distill.phi_noise": None if noise_sharing == "from prior" else noise_sharing,
                  "background": None if background == "from prior" else background}
        return train_node(prior, generator, values, phi, resume)



class ASDExportMesh(ASDExportNeRFMesh):
    DEPRECATED = True  # replaced by Export Mesh (ASD), ASDExportNeRFMesh; its threshold was always the value

    @classmethod
    def INPUT_TYPES(cls):
        inputs = super().INPUT_TYPES()
        del inputs["required"]["threshold_source"]
        return inputs

    def export(self, result, resolution, threshold, format, filename_prefix):
        return super().export(result, resolution, CUSTOM, threshold, format, filename_prefix)


class ASDNeRFToMesh(ASDNeRFMesh):
    DEPRECATED = True  # replaced by NeRF to Mesh (ASD), ASDNeRFMesh; its threshold was always the value

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"result": RESULT_INPUT, "resolution": RESOLUTION_INPUT, "threshold": THRESHOLD_INPUT}}

    def convert(self, result, resolution, threshold):
        return super().convert(result, resolution, CUSTOM, threshold)


NODE_CLASS_MAPPINGS = {"ASDDiscriminator": ASDDiscriminator, "ASDImageGenerator": ASDImageGenerator,
                       "ASDTrainLoop": ASDTrainLoop, "ASDExportMesh": ASDExportMesh, "ASDNeRFToMesh": ASDNeRFToMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"ASDDiscriminator": "ASD Discriminator (LoRA/TI, legacy)",
                              "ASDImageGenerator": "Image Generator (ASD, legacy)",
                              "ASDTrainLoop": "ASD Train Loop (legacy)",
                              "ASDExportMesh": "Export Mesh (ASD, legacy)", "ASDNeRFToMesh": "NeRF to Mesh (ASD, legacy)"}
