"""ComfyUI nodes of the pack (V1 API). Each node parses its inputs, calls ``asd_engine`` and returns outputs.

Graph: Load SD Model → ASD Discriminator (LoRA) or (TI) → NeRF Generator / Image Generator → ASD Train Loop →
Render Views / Export Mesh / Save ASD Checkpoint; Load ASD Checkpoint feeds Train Loop's ``resume`` or the
output nodes. Custom types are pack-prefixed: ASD_PRIOR, ASD_PHI, ASD_GENERATOR, ASD_RESULT, ASD_CHECKPOINT.

Widgets come from the engine's settings table (``asd_engine/runs/settings.py``): their choices, ranges and tooltips.
A value that defaults to the prior's recipe or the preset has an explicit ``<name>_source`` choice beside it
("from prior" / "from preset", or "custom" for the value widget). The nodes of the previous version keep their ids
in ``legacy_nodes.py``, so saved workflows still load with their values mapped. ``SEARCH_ALIASES`` are words
ComfyUI's node search also matches (read by core releases from early 2026; 0.3.x ignores them).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import time

import torch

from ..asd_engine.errors import TrainingDiverged, UserInputError
from ..asd_engine.prior.diffusion import DiffusionPrior
from ..asd_engine.prior.discriminator import PhiConfig, TextualInversionDiscriminator
from ..asd_engine.prior.loading import load_prior
from ..asd_engine.prior.recipe import OFFICIAL
from ..asd_engine.runs import plan as run_plan, settings
from ..asd_engine.runs.configs import TOY_CPU_STEPS, Distill2DConfig
from . import comfy_bridge as host


def engine_call(method):
    """Node functions check their inputs against their own INPUT_TYPES (:func:`check_inputs`), run the engine
    outside ComfyUI's inference mode (its tensors cannot take part in autograd, which training and normal maps
    need) and turn the engine's user errors, and a missing requirement, into the one-line message ComfyUI shows."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        check_inputs(type(self), signature, self, args, kwargs)
        try:
            with torch.inference_mode(False):
                return method(self, *args, **kwargs)
        except UserInputError as exc:
            raise RuntimeError(exc.render(settings.widget_of)) from None
        except TrainingDiverged as exc:
            raise RuntimeError(str(exc)) from None
        except ModuleNotFoundError:  # a requirement not installed in ComfyUI's Python
            missing = host.missing_requirements()
            if not missing:
                raise
            raise RuntimeError(host.install_hint(missing)) from None
    return wrapper


# Where each of the pack's link types comes from (the fix of a wrong value), and how to recognise one. By class
# name, not isinstance: the engine may be imported twice (as the pack's subpackage and as ``asd_engine``).
LINK_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ASD_PRIOR": ("Load SD Model (ASD) or ASD Prior from Checkpoint", ("DiffusionPrior",)),
    "ASD_PHI": ("ASD Discriminator (LoRA) or (TI)", ("DiscriminatorSpec",)),
    "ASD_GENERATOR": ("NeRF Generator (ASD) or Image Generator (ASD)", ("NeRFGeneratorSpec", "ImageGeneratorSpec")),
    "ASD_RESULT": ("ASD Train Loop or Load ASD Checkpoint", ()),          # duck-typed: what the nodes read
    "ASD_CHECKPOINT": ("Load ASD Checkpoint, Save ASD Checkpoint or a Train Loop's 'checkpoint'", ()),
}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _input_problem(kind, options: dict, value) -> tuple[str, str] | None:
    """Why ``value`` cannot be an input declared ``(kind, options)`` → (problem, fix), or None when it can.
    ComfyUI's own validation converts and range-checks widget values of a queued graph, but lets NaN through
    and checks nothing for a direct Python call; this is the same check, plus finiteness, for both."""
    low, high = options.get("min"), options.get("max")
    bounds = f"{'' if low is None else _number(low) + ' ≤ '}value{'' if high is None else ' ≤ ' + _number(high)}"
    if isinstance(kind, list):
        if isinstance(value, str) and value in kind:
            return None
        listed = ", ".join(map(str, kind)) if len(kind) <= 12 else f"the {len(kind)} in its list"
        return f"{_show(value)} is not one of {listed}", f"choose one of {listed}"
    if kind in ("INT", "FLOAT"):
        integer = kind == "INT"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return f"{_show(value)} is not a{'n integer' if integer else ' number'}", f"give a number in {bounds}"
        if not math.isfinite(value):
            return f"{value} is not a finite number", f"give a number in {bounds}"
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{_number(value)} is out of range", f"use {bounds}"
        return None
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else (f"{_show(value)} is not on/off", "use true or false")
    if kind == "STRING":
        return None if isinstance(value, str) else (f"{_show(value)} is not text", "give a text value")
    if kind in LINK_TYPES:
        source, classes = LINK_TYPES[kind]
        if kind == "ASD_RESULT":
            fits = hasattr(value, "kind")
        elif kind == "ASD_CHECKPOINT":
            fits = isinstance(value, (str, os.PathLike))
        else:
            fits = any(c.__name__ in classes for c in type(value).__mro__)
        return None if fits else (f"{_show(value)} is not an {kind}", f"connect the output of {source}")
    # other packs' and core types (MODEL, CLIP, VAE, MESH): only their absence is ours to catch
    return None if value is not None else (f"None is not a {kind}", f"connect a node's {kind} output")


def check_inputs(node: type, signature: inspect.Signature, self, args: tuple, kwargs: dict) -> None:
    """Refuse, as the one-line error ComfyUI shows (``widget: problem; fix``), a call of ``node``'s function whose
    values do not fit the node's INPUT_TYPES: None or a wrong type from Python, NaN or an out-of-range number
    from API JSON, a combo value that is not in the list. Optional inputs may be None (not connected)."""
    try:
        given = signature.bind_partial(self, *args, **kwargs).arguments
    except TypeError as exc:
        raise RuntimeError(f"{node.__name__}: {exc}; give each input once, by its name") from None
    for name, parameter in signature.parameters.items():
        if name not in given and parameter.default is parameter.empty:
            raise RuntimeError(f"{name}: no value given; connect it or set its widget")
    spec = node.INPUT_TYPES()
    required, optional = spec.get("required", {}), spec.get("optional", {})
    for name, value in given.items():
        declared = required.get(name) or optional.get(name)
        if declared is None or (value is None and name in optional):
            continue
        kind, options = declared[0], (declared[1] if len(declared) > 1 else {})
        if name in getattr(node, "CHOICES_CHECKED_BY_NODE", ()):
            kind = "STRING"  # a list read from disk: the node says itself why a value is not in it
        problem = _input_problem(kind, options, value)
        if problem is not None:
            raise RuntimeError(f"{name}: {problem[0]}; {problem[1]}")


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
    PRECISION_INPUT = (list(settings.BY_FIELD["precision"].choices), {"default": "auto", "tooltip":
                       "Weights' precision of the frozen prior: auto = ComfyUI's choice for diffusion models (fp16 "
                       "on most GPUs, fp32 on the CPU; --force-fp32, --bf16-unet etc. apply); φ always trains in fp32."})

    @staticmethod
    def _placement(precision: str) -> tuple[torch.device, torch.dtype]:
        """Where a new prior waits (ComfyUI's offload device: Train Loop loads it to the GPU through ComfyUI's
        model management, and gives it back after) and its dtype, chosen for the device it will compute on."""
        from ..asd_engine.devices import default_device, resolve_precision

        return host.offload_device(), resolve_precision(precision, default_device())

    @staticmethod
    def _report(node: str, prior: DiffusionPrior) -> tuple[DiffusionPrior]:
        if prior.detected:  # ComfyUI's console: which family and ε/v, and which signal decided
            logging.info("[ASD] %s: %s", node, prior.detected)
        prior.fingerprint()  # identifies the runs trained on it; computed now, before any φ adapter is added
        host.register_prior(prior)
        return (prior,)


class ASDLoadPrior(_PriorNode):
    SEARCH_ALIASES = ["stable diffusion", "score distillation", "text to 3d"]
    DESCRIPTION = ("Loads a frozen diffusion prior for score distillation: the embedded 32 px toy prior, a diffusers "
                   "Stable Diffusion 1.x/2.x pipeline folder from models/asd or models/diffusers, or a single-file "
                   "SD 1.x / 2.x (v) .safetensors checkpoint from models/checkpoints.")
    FUNCTION = "load"
    CHOICES_CHECKED_BY_NODE = ("model",)  # model_path says where a model must be to be listed

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (host.model_choices() or [host.EMBEDDED_PRIOR],
                      {"tooltip": "A pipeline folder (model_index.json, unet/, ...) or a single-file SD 1.x/2.x "
                                  ".safetensors checkpoint (family and v-prediction are detected from the weights)."}),
            "precision": cls.PRECISION_INPUT,
            "prediction_type": (list(settings.BY_FIELD["prediction_type"].choices), {"default": "auto", "tooltip":
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
        from ..asd_engine.prior.single_file import prior_from_state_dict

        state, prediction = host.checkpoint_state_dict(model, clip, vae)
        device, dtype = self._placement(precision)
        return self._report("Prior from checkpoint", prior_from_state_dict(
            state, prediction, device=device, dtype=dtype, source="Load Checkpoint",
            input_name="model", prediction_source="ComfyUI's model sampling"))


# A setting's widget pair: "<name>_source" says where the value comes from, "<name>" holds it when it is "custom"
FROM_PRIOR, FROM_PRESET, DEFAULT, CUSTOM = "from prior", "from preset", "default", "custom"


def _mode_of(field: str) -> str:
    return "3d" if "3d" in settings.BY_FIELD[field].modes else "2d"


def setting_tooltip(field: str, mode: str | None = None) -> str:
    """A widget's tooltip from the settings table: what the setting does and where its default comes from."""
    row = settings.BY_FIELD[field]
    default = settings.default_text(row, mode or _mode_of(field))
    text = row.help[0].upper() + row.help[1:]
    return f"{text}. {default[0].upper() + default[1:]}." if default else f"{text}."


def setting_widget(field: str, default, step: float | None = None, mode: str | None = None,
                   tooltip: str | None = None) -> tuple:
    """A value widget whose range and choices come from the settings table."""
    row = settings.BY_FIELD[field]
    options = {"default": default, "tooltip": tooltip or setting_tooltip(field, mode)}
    if row.choices is not None:
        return (list(row.choices), options)
    if row.kind is bool:
        return ("BOOLEAN", options)
    if row.kind is str:
        return ("STRING", options)
    if row.low is not None:
        options["min"] = row.low + (step or 0) if row.low_open else row.low
    options["max"] = row.high if row.high is not None else (100_000 if row.kind is int else 1000.0)
    if step is not None:
        options["step"] = step
    return ("INT" if row.kind is int else "FLOAT", options)


def source_widget(name: str, choices: tuple[str, ...], explains: str) -> tuple[str, tuple]:
    """The explicit choice beside a value widget: where ``name``'s value comes from."""
    return f"{name}_source", (list(choices), {"default": choices[0], "tooltip":
                              f"Where '{name}' comes from: {explains}; custom: the '{name}' value."})


def chosen(source: str, value):
    """The value to hand the engine: None (the engine's default, the prior's recipe or the preset) unless custom."""
    return value if source == CUSTOM else None


def _recipe_explains(field: str, mode: str | None = None) -> str:
    return settings.default_text(settings.BY_FIELD[field], mode or _mode_of(field)).replace("default: ", "")


class _DiscriminatorNode:
    """What the two φ nodes share: output, category, ASD's γ and φ's own model."""

    CATEGORY = "ASD/setup"
    RETURN_TYPES = ("ASD_PHI",)
    RETURN_NAMES = ("phi",)
    OUTPUT_TOOLTIPS = ("φ for ASD Train Loop (VSD uses it with γ = 0; SDS has no φ).",)
    FUNCTION = "build"

    @staticmethod
    def gamma_inputs() -> dict:
        name, source = source_widget("gamma", (FROM_PRIOR, CUSTOM), _recipe_explains("distill.gamma"))
        return {name: source, "gamma": setting_widget("distill.gamma", OFFICIAL.gamma, step=0.05)}

    @staticmethod
    def phi_model_input() -> dict:
        return {"phi_model": ("ASD_PRIOR", {"tooltip": "A second model for φ (the official recipe: SD2.1-768 v for φ, "
                                                       "SD2.1-base as the prior). Empty: φ lives on the prior."})}


class ASDDiscriminatorLoRA(_DiscriminatorNode):
    SEARCH_ALIASES = ["vsd", "prolificdreamer", "variational score distillation", "lora"]
    DESCRIPTION = ("ASD's discriminator φ as a LoRA on the prior's own UNet (optionally conditioned on the camera), "
                   "its learning rate, and ASD's γ.")

    @classmethod
    def INPUT_TYPES(cls):
        lr_name, lr_source = source_widget("learning_rate", (FROM_PRIOR, CUSTOM), _recipe_explains("phi.lr"))
        return {"required": {
            "lora_rank": setting_widget("phi.lora_rank", PhiConfig.lora_rank),
            "lora_targets": ([FROM_PRIOR, *settings.BY_FIELD["phi.lora_targets"].choices], {
                "default": FROM_PRIOR, "tooltip": setting_tooltip("phi.lora_targets")}),
            lr_name: lr_source,
            "learning_rate": setting_widget("phi.lr", OFFICIAL.lora_lr, step=1e-5),
            **cls.gamma_inputs(),
            "camera_embedding": setting_widget("phi.camera_embedding", PhiConfig.camera_embedding),
        }, "optional": cls.phi_model_input()}

    @engine_call
    def build(self, lora_rank, lora_targets, learning_rate_source, learning_rate, gamma_source, gamma,
              camera_embedding, phi_model=None):
        phi = PhiConfig(kind="lora", lora_rank=lora_rank, lora_targets=None if lora_targets == FROM_PRIOR else lora_targets,
                        lr=chosen(learning_rate_source, learning_rate), camera_embedding=camera_embedding)
        return (run_plan.DiscriminatorSpec(phi=phi, gamma=chosen(gamma_source, gamma), phi_prior=phi_model),)


class ASDDiscriminatorTI(_DiscriminatorNode):
    SEARCH_ALIASES = ["vsd", "textual inversion", "score distillation"]
    DESCRIPTION = "ASD's discriminator φ as textual-inversion tokens (only their embeddings train), and ASD's γ."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ti_tokens": setting_widget("phi.num_tokens", PhiConfig.num_tokens),
            "ti_init_word": setting_widget("phi.init_word", PhiConfig.init_word),
            "learning_rate": setting_widget("phi.lr", TextualInversionDiscriminator.default_lr, step=1e-4,
                                            tooltip="φ's learning rate (textual inversion's own default: "
                                                    f"{TextualInversionDiscriminator.default_lr:g})."),
            **cls.gamma_inputs(),
        }, "optional": cls.phi_model_input()}

    @engine_call
    def build(self, ti_tokens, ti_init_word, learning_rate, gamma_source, gamma, phi_model=None):
        phi = PhiConfig(kind="ti", num_tokens=ti_tokens, init_word=ti_init_word, lr=learning_rate)
        return (run_plan.DiscriminatorSpec(phi=phi, gamma=chosen(gamma_source, gamma), phi_prior=phi_model),)


class ASDNeRFGenerator:
    SEARCH_ALIASES = ["text to 3d", "nerf", "dreamfusion", "prolificdreamer", "3d"]
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
            "preset": setting_widget("preset", "toy-cpu", tooltip="Grid size, render resolutions, step count and "
                                     "mesh isosurface: toy-cpu (minutes on a CPU), quality (the official recipe, "
                                     "GPU), low-vram."),
            "resolution_schedule": ("STRING", {"default": "", "tooltip":
                                    "Render sizes by step, e.g. '0:64, 5000:512'; empty = the preset's."}),
            "batch_size": setting_widget("batch_size", 1),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                     "tooltip": SEED_TOOLTIP}),
        }, "optional": {  # optional: graphs saved before it existed still validate
            "field_backend": setting_widget("nerf_field.backend", "auto"),
        }}

    @engine_call
    def build(self, preset, resolution_schedule, batch_size, seed, field_backend=None):
        schedule = settings.parse_resolution_schedule(resolution_schedule)
        return (run_plan.NeRFGeneratorSpec(preset=preset, resolution_schedule=schedule, batch_size=batch_size,
                                           seed=seed, field_backend=field_backend or "auto"),)


class ASDImage:
    SEARCH_ALIASES = ["score distillation", "sds", "2d"]
    DESCRIPTION = "One image to distil (2D): optimised as the prior's latent, or as RGB pixels through its VAE."
    CATEGORY = "ASD/setup"
    RETURN_TYPES = ("ASD_GENERATOR",)
    RETURN_NAMES = ("generator",)
    OUTPUT_TOOLTIPS = ("What ASD Train Loop optimises.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        size_name, size_source = source_widget("size", (FROM_PRIOR, CUSTOM), "the prior's own size (32 px for the "
                                               "toy prior, 512 for Stable Diffusion 2.1 base)")
        lr_name, lr_source = source_widget("learning_rate", (DEFAULT, CUSTOM), "0.03 for a latent, 0.01 for pixels")
        jitter_name, jitter_source = source_widget("jitter", (FROM_PRIOR, CUSTOM), _recipe_explains("jitter"))
        return {"required": {
            size_name: size_source,
            "size": setting_widget("size", 512, step=8),
            "parameterization": setting_widget("parameterization", "latent"),
            lr_name: lr_source,
            "learning_rate": setting_widget("lr", 0.03, step=1e-4),
            jitter_name: jitter_source,
            "jitter": setting_widget("jitter", 0),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "control_after_generate": False,
                     "tooltip": SEED_TOOLTIP}),
        }}

    @engine_call
    def build(self, size_source, size, parameterization, learning_rate_source, learning_rate, jitter_source, jitter,
              seed):
        return (run_plan.ImageGeneratorSpec(size=chosen(size_source, size), parameterization=parameterization,
                                         lr=chosen(learning_rate_source, learning_rate), seed=seed,
                                         jitter=chosen(jitter_source, jitter)),)


def _option(value: str):
    """A combo's value for the engine: None for "from prior"."""
    return None if value == FROM_PRIOR else value


# the Train Loop's links and prompts (its previous version, legacy_nodes.ASDTrainLoop, has the same)
TRAIN_GRAPH_INPUTS = {
    "prior": ("ASD_PRIOR", {"tooltip": "From Load SD Model."}),
    "generator": ("ASD_GENERATOR", {"tooltip": "From NeRF Generator or Image Generator."}),
    "prompt": ("STRING", {"multiline": True, "default": "a red cube", "tooltip": "What to make."}),
    "negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Classifier-free guidance's negative prompt."}),
}


class ASDTrain:
    SEARCH_ALIASES = ["text to 3d", "nerf", "sds", "vsd", "dreamfusion", "prolificdreamer", "score distillation",
                      "adversarial score distillation"]
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
        steps_name, steps_source = source_widget("steps", (FROM_PRESET, CUSTOM), "the generator's: the NeRF preset's "
                                                 f"({_recipe_explains('steps', '3d')}), 2D "
                                                 f"{settings.show_value(settings.get_field(Distill2DConfig(''), 'steps'))}")
        cfg_name, cfg_source = source_widget("cfg", (FROM_PRIOR, CUSTOM), _recipe_explains("distill.guidance_scale"))
        t_name, t_source = source_widget("t_range", (FROM_PRIOR, CUSTOM), "the prior's recipe (Stable Diffusion "
                                         f"{OFFICIAL.t_min}–{OFFICIAL.t_max}); custom: 't_min' and 't_max'")
        combo = {field: ([FROM_PRIOR, *settings.BY_FIELD[field].choices],
                         {"default": FROM_PRIOR, "tooltip": setting_tooltip(field)})
                 for field in ("distill.weighting", "background", "distill.phi_noise")}
        return {"required": {
            **TRAIN_GRAPH_INPUTS,
            "method": setting_widget("distill.method", "asd"),
            steps_name: steps_source,
            "steps": setting_widget("steps", TOY_CPU_STEPS, tooltip="Total steps (also when resuming), when "
                                    "'steps_source' is custom."),
            cfg_name: cfg_source,
            "cfg": setting_widget("distill.guidance_scale", OFFICIAL.guidance_scale, step=0.1),
            "weighting": combo["distill.weighting"],
            t_name: t_source,
            "t_min": setting_widget("distill.t_min", OFFICIAL.t_min, step=0.01),
            "t_max": setting_widget("distill.t_max", OFFICIAL.t_max, step=0.01),
            "background": combo["background"],
            "noise_sharing": combo["distill.phi_noise"],
        }, "optional": {
            "phi": ("ASD_PHI", {"tooltip": "From ASD Discriminator (LoRA) or (TI); default: a LoRA of rank 4, γ "
                                           "from the prior's recipe."}),
            "resume": ("ASD_CHECKPOINT", {"tooltip": "Continue this checkpoint up to 'steps' (same prompt/method; its "
                                                     "settings are used). Not needed after a Cancel: the same run "
                                                     "resumes by itself."}),
        }}

    @engine_call
    def train(self, prior, generator, prompt, negative_prompt, method, steps_source, steps, cfg_source, cfg,
              weighting, t_range_source, t_min, t_max, background, noise_sharing, phi=None, resume=None):
        values = {"prompt": prompt, "negative_prompt": negative_prompt, "distill.method": method,
                  "steps": chosen(steps_source, steps), "distill.guidance_scale": chosen(cfg_source, cfg),
                  "distill.weighting": _option(weighting), "distill.t_min": chosen(t_range_source, t_min),
                  "distill.t_max": chosen(t_range_source, t_max), "background": _option(background),
                  "distill.phi_noise": _option(noise_sharing)}
        return train_node(prior, generator, values, phi, resume)


def train_node(prior, generator, values: dict, phi=None, resume=None) -> dict:
    """What a Train Loop node does with its values (field → value; None: the engine's default)."""
    if resume is not None:  # only the folders Load ASD Checkpoint lists: a graph must not read the server's disk
        resume = host.allowed_checkpoint(resume, input_name="resume")
    plan = run_plan.plan_from_specs(prior, generator, values, discriminator=phi)
    if resume is not None:
        plan = run_plan.resume_plan(plan, resume)
    checkpoint = host.train_folder(plan.config.prompt, plan.key()) / "checkpoint"
    start = run_plan.latest_checkpoint([checkpoint, resume], plan.config.steps)
    with host.priors_loaded([prior, plan.phi_prior], run_plan.training_memory_bytes(plan)):
        result, preview = _train(plan, start, checkpoint)
    host.show_text(f"checkpoint: {host.output_label(result.checkpoint)} (step {plan.config.steps})")
    images = host.to_comfy_images(preview)
    return {"ui": {"images": host.save_preview(images)},
            "result": (result, images, str(result.checkpoint), result.losses)}


def _train(plan, start, checkpoint):
    run = plan.build(resume=start)
    if start is not None:  # a finished run is rebuilt from its checkpoint and runs no step
        host.show_text(f"{'resuming' if run.step < run.config.steps else 'reusing the finished run in'} "
                       f"{host.output_label(start)} at step {run.step} of {run.config.steps}")
    progress = Progress(run)
    try:
        result = run_plan.train(run, checkpoint, on_step=progress.on_step, is_interrupt=host.is_interrupt)
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
        if info.step == info.total or time.monotonic() - self.last_preview >= ASDTrain.PREVIEW_SECONDS:
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

        folder, _ = host.new_output_folder(filename_prefix)
        step = None if result.checkpoint is None else run_plan.checkpoint_step(result.checkpoint)
        if step is None:
            raise UserInputError("result", "it has no checkpoint folder to save",
                                 "connect an ASD Train Loop or Load ASD Checkpoint result")
        shutil.copytree(result.checkpoint, folder / "checkpoint")
        host.show_text(f"saved {host.output_label(folder / 'checkpoint')} (step {step})")
        return (str(folder / "checkpoint"),)


class ASDLoadCheckpoint:
    DESCRIPTION = ("Loads an ASD checkpoint folder from output/asd/ (runs and saved checkpoints) or models/asd/: as "
                   "'resume' for ASD Train Loop, and as a result for Render Views / NeRF to Mesh (2D results need the "
                   "prior to decode). Only folders in the list can be loaded.")
    CATEGORY = "ASD/checkpoints"
    RETURN_TYPES = ("ASD_CHECKPOINT", "ASD_RESULT")
    RETURN_NAMES = ("checkpoint", "result")
    OUTPUT_TOOLTIPS = ("The checkpoint folder.", "Its NeRF (3D) or image (2D, with 'prior').")
    FUNCTION = "load"
    CHOICES_CHECKED_BY_NODE = ("checkpoint",)  # load refuses other paths with the allowlist's message

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (sorted(host.checkpoint_choices()), {"tooltip":
                           "A checkpoint folder under output/asd or models/asd (refresh the page after training to "
                           "see new ones). Paths elsewhere are refused, so a shared server never reads other folders."}),
        }, "optional": {
            "prior": ("ASD_PRIOR", {"lazy": True, "tooltip": "Needed to decode a 2D result; a 3D checkpoint never "
                                                             "loads it (the linked loader does not run)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, checkpoint, prior=None):
        """ComfyUI reuses this node's outputs while this stays the same: so they are refreshed when the checkpoint
        on disk changed (a Train Loop trained the run further), not only when another folder is chosen."""
        return run_plan.checkpoint_version(host.checkpoint_choices().get(checkpoint))

    def check_lazy_status(self, checkpoint, prior=None):
        """Ask ComfyUI for 'prior' only for a 2D checkpoint (its image needs the VAE): a 3D one needs no prior."""
        folder = host.checkpoint_choices().get(checkpoint)
        if prior is None and run_plan.checkpoint_kind(folder) not in (None, "text-to-3d"):
            return ["prior"]
        return []

    @engine_call
    def load(self, checkpoint, prior=None):
        folders = host.checkpoint_choices()
        if checkpoint not in folders:  # ComfyUI's validation refuses it too; this guards direct calls
            raise UserInputError("checkpoint", f"'{checkpoint}' is not a checkpoint folder under output/asd or "
                                 "models/asd (absolute, ~ and .. paths are refused)",
                                 "choose one from the list; refresh the page after training")
        path = folders[checkpoint]
        with host.priors_loaded([prior]):
            return (str(path), run_plan.load_result(path, prior=prior))


NODE_CLASS_MAPPINGS = {
    "ASDLoadPrior": ASDLoadPrior,
    "ASDPriorFromCheckpoint": ASDPriorFromCheckpoint,
    "ASDDiscriminatorLoRA": ASDDiscriminatorLoRA,
    "ASDDiscriminatorTI": ASDDiscriminatorTI,
    "ASDNeRFGenerator": ASDNeRFGenerator,
    "ASDImage": ASDImage,
    "ASDTrain": ASDTrain,
    "ASDSaveCheckpoint": ASDSaveCheckpoint,
    "ASDLoadCheckpoint": ASDLoadCheckpoint,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ASDLoadPrior": "Load SD Model (ASD)",
    "ASDPriorFromCheckpoint": "ASD Prior from Checkpoint",
    "ASDDiscriminatorLoRA": "ASD Discriminator (LoRA)",
    "ASDDiscriminatorTI": "ASD Discriminator (TI)",
    "ASDNeRFGenerator": "NeRF Generator (ASD)",
    "ASDImage": "Image Generator (ASD)",
    "ASDTrain": "ASD Train Loop",
    "ASDSaveCheckpoint": "Save ASD Checkpoint",
    "ASDLoadCheckpoint": "Load ASD Checkpoint",
}
