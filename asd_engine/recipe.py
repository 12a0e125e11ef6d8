"""A prior's own distillation defaults ("recipe"): what background it saw, how hard to guide it, which timesteps
teach something, how fast φ should move, how strongly to regularise.

Why this is not a global default: the official ASD recipe (DESIGN §2b) suits Stable Diffusion, which has seen every
kind of background and is sampled at CFG 7.5. A prior trained on narrow data needs its own: the embedded toy prior
saw only white backgrounds and is sampled at CFG 3, and given the official recipe it asks the NeRF to fill the frame
(measured in docs/quality.md). So the recipe travels *with the prior*: a small JSON file, ``asd_recipe.json``, in
the pipeline folder (``train-toy-prior`` writes it). Folders and single files without one get :data:`OFFICIAL`.

Run configs hold ``None`` for "from the prior"; :func:`resolve_recipe` fills those fields once, when a run is built,
and records which fields it filled (``RunConfig.from_recipe``), so run.json and checkpoints say where every value
came from, and a resumed run keeps the values it started with.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
import typing
from typing import Any

from .cameras import OVERHEAD_DEGREES
from .distill import PHI_NOISE, WEIGHTINGS
from .errors import UserInputError

RECIPE_FILE = "asd_recipe.json"
BACKGROUNDS = ("random", "white", "black")
LORA_TARGET_CHOICES = ("attention", "all")  # the layer sets of discriminator.LORA_TARGETS


@dataclass(frozen=True)
class Recipe:
    """Distillation defaults of one prior. Defaults = the official ASD recipe for Stable Diffusion (DESIGN §2b)."""

    name: str = "official ASD recipe (Stable Diffusion)"
    # What the generator is composited over while training, and what a 2D pixel image starts as. "random": a learned
    # background replaced by a random solid colour half of the time (the official recipe; SD saw every background);
    # "white"/"black": that solid colour, for priors that only ever saw it.
    background: str = "random"
    guidance_scale: float = 7.5
    gamma: float = -0.75                  # ASD's γ (VSD is ASD with γ = 0, SDS has no φ: both always get 0)
    t_min: float = 0.02
    t_max: float = 0.98
    # w(t) of the generator's update (distill.loss_weight): "sds" = 1 - ᾱ_t (official). `weighting_2d` overrides it
    # for 2D runs (None: the same), whose image *is* the parameter: there the only force that removes pixel-scale
    # noise acts at low t, which 1 - ᾱ_t all but switches off (measured on the toy prior, docs/quality.md).
    weighting: str = "sds"
    weighting_2d: str | None = None
    # 2D: each step the image is shown to the prior rolled by a random whole number of model-space pixels, up to this
    # many in each direction (0: never; official). Why: the 3D generator is seen through a new camera every step, a
    # 2D image through the same frame, so a fitting error of φ that sits at a fixed place (the toy prior's φ errs in
    # the corners, where zero padding meets the frame on two sides) keeps pushing the same pixels and leaves specks
    # there (measured on the toy prior, docs/quality.md "Seventh round"). The roll wraps around, so it suits priors
    # whose images have a flat border; Stable Diffusion's do not, hence 0. SDS runs (no φ, nothing to spread) always
    # get 0: rolled, SDS's edges blurred and its colours paled (measured, same place).
    jitter_2d: int = 0
    lora_lr: float = 1e-4                 # φ's learning rate when φ is a LoRA (TI keeps its own default)
    # Which UNet layers a LoRA φ adapts: "attention" (official: SD's UNet has attention at every latent resolution)
    # or "all" (every convolution too, for a UNet whose full-resolution layers have no attention).
    lora_targets: str = "attention"
    # Which t and ε φ's own step trains on: "fresh" draws its own (official, Alg. 1), "shared" reuses the generator's
    # (one UNet call less, and φ then learns at the generator's t range, which the second phase narrows). On the toy
    # prior shared noise opened every torus's hole where fresh noise left half shut (docs/quality.md "Tenth round").
    # `phi_noise_2d` overrides it for 2D runs (None: the same), where it was measured apart.
    phi_noise: str = "fresh"
    phi_noise_2d: str | None = None
    lambda_sparsity: float = 10.0         # 3D: weight of the sparsity term mean √(opacity² + 0.01)
    # 3D: fade the NeRF's initial ball of density (the "blob" seed) to nothing by the second phase. Official: it stays
    # (Magic3D, threestudio); a 25 000-step run has time to learn it away where it must. In the toy prior's 600-step
    # runs a permanent ball kept every torus's hole filled (docs/quality.md "Eighth round").
    blob_fade: bool = False
    # 3D: a camera above this elevation (degrees) is prompted ", overhead view" (DreamFusion's 60° for SD). A prior
    # should be prompted with the view words as it learned them: the toy prior's captions say "overhead" from 30°.
    overhead_elevation: float = OVERHEAD_DEGREES
    # Whole words rewritten before tokenising, for priors that know a narrow grammar: the toy prior's captions all
    # read "a <colour> <shape>", and "an" is no word it knows (its embedding moves further than a colour change).
    prompt_aliases: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str = "recipe") -> None:
        if self.background not in BACKGROUNDS:
            raise UserInputError(where, f"background '{self.background}' is not one of {', '.join(BACKGROUNDS)}",
                                 f"fix {RECIPE_FILE}")
        for key in ("weighting", "weighting_2d"):
            value = getattr(self, key)
            if value not in WEIGHTINGS and not (key == "weighting_2d" and value is None):
                raise UserInputError(where, f"{key} '{value}' is not one of {', '.join(WEIGHTINGS)}",
                                     f"fix {RECIPE_FILE}")
        for key in ("phi_noise", "phi_noise_2d"):
            value = getattr(self, key)
            if value not in PHI_NOISE and not (key == "phi_noise_2d" and value is None):
                raise UserInputError(where, f"{key} '{value}' is not one of {', '.join(PHI_NOISE)}",
                                     f"fix {RECIPE_FILE}")
        if self.lora_targets not in LORA_TARGET_CHOICES:
            raise UserInputError(where, f"lora_targets '{self.lora_targets}' is not one of "
                                        f"{', '.join(LORA_TARGET_CHOICES)}", f"fix {RECIPE_FILE}")
        if (not 0.0 <= self.t_min < self.t_max <= 1.0 or self.guidance_scale <= 0 or self.lora_lr <= 0
                or not isinstance(self.jitter_2d, int) or self.jitter_2d < 0 or not isinstance(self.blob_fade, bool)
                or not -1.0 <= self.gamma <= 0.0
                or self.lambda_sparsity < 0 or not 0.0 < self.overhead_elevation <= 90.0):
            raise UserInputError(where, f"out-of-range values in {self}", f"fix {RECIPE_FILE}")


OFFICIAL = Recipe()

# recipe field → dotted run-config field (a run without that field, e.g. 2D and sparsity, skips it)
RECIPE_FIELDS: dict[str, str] = {
    "background": "background",
    "guidance_scale": "distill.guidance_scale",
    "gamma": "distill.gamma",
    "t_min": "distill.t_min",
    "t_max": "distill.t_max",
    "weighting": "distill.weighting",  # in 2D runs: weighting_2d when the recipe sets it
    "jitter_2d": "jitter",  # 2D runs only
    "lora_lr": "phi.lr",
    "lora_targets": "phi.lora_targets",
    "phi_noise": "distill.phi_noise",  # in 2D runs: phi_noise_2d when the recipe sets it
    "lambda_sparsity": "lambda_sparsity",
    "blob_fade": "blob_fade",  # 3D runs only
    "overhead_elevation": "overhead_elevation",
}


def apply_aliases(prompt: str, aliases: dict[str, str]) -> str:
    """``prompt`` with every whole word found in ``aliases`` (case-insensitively) replaced by its alias."""
    if not aliases:
        return prompt
    return re.sub(r"[^\W\d_]+", lambda m: aliases.get(m.group(0).lower(), m.group(0)), prompt)


def read_recipe(folder: str | os.PathLike) -> Recipe:
    """The recipe stored in a pipeline folder, or :data:`OFFICIAL` when it has none. Unknown keys are an error
    (a typo would otherwise silently fall back to the official value)."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return OFFICIAL
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError("--model", f"'{path}' is not valid JSON ({exc})", f"fix or delete {RECIPE_FILE}") from None
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserInputError("--model", f"'{path}' has unknown keys {unknown}", f"use only {sorted(known)}")
    recipe = Recipe(**{"name": f"recipe of {Path(folder).name}", **data})
    recipe.validate(str(path))
    return recipe


def write_recipe(folder: str | os.PathLike, recipe: Recipe) -> Path:
    path = Path(folder) / RECIPE_FILE
    path.write_text(json.dumps(dataclasses.asdict(recipe), indent=2) + "\n")
    return path


def with_recipe(distill, recipe: Recipe = OFFICIAL):
    """A :class:`~asd_engine.distill.DistillConfig` copy with its ``None`` fields taken from ``recipe`` (for
    calling ``distill_step`` outside a run, which resolves its own config)."""
    resolved = dataclasses.replace(distill)
    resolve_recipe(SimpleNamespace(distill=resolved), recipe)  # the run's own rules; other fields are absent
    return resolved


def _get(config: Any, dotted: str) -> tuple[Any, str, bool]:
    """``(owner, leaf name, present)`` of a dotted field; absent when the config has no such field or parent."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not hasattr(config, name):
            return config, leaf, False
        config = getattr(config, name)
    return config, leaf, hasattr(config, leaf)


def official_where_absent(saved: dict[str, Any], config_class: type) -> dict[str, Any]:
    """A run config saved by an older version (``dataclasses.asdict`` form), with every recipe field that the
    config class has but ``saved`` lacks set to its :data:`OFFICIAL` value: before a recipe field existed the engine
    always used the official value (LoRA on attention, "overhead" above 60°), so a resumed run keeps what it started
    with instead of taking the prior's recipe of today (whose LoRA tensors, for one, would not match)."""
    saved = copy.deepcopy(saved)
    for key, dotted in RECIPE_FIELDS.items():
        *parents, leaf = dotted.split(".")
        owner, cls = saved, config_class
        for name in parents:
            owner, cls = owner.get(name), typing.get_type_hints(cls).get(name)
            if not isinstance(owner, dict) or not dataclasses.is_dataclass(cls):
                break
        else:
            if leaf in {f.name for f in dataclasses.fields(cls)} and leaf not in owner:
                owner[leaf] = getattr(OFFICIAL, key)
    return saved


def resolve_recipe(config: Any, recipe: Recipe) -> list[str]:
    """Fill every ``None`` field of ``config`` that the recipe covers; returns the dotted names it filled.

    φ's learning rate and LoRA targets come from the recipe only for a LoRA φ (textual inversion keeps its own
    default and has no LoRA). A 2D run (``config.mode == "2d"``) takes ``weighting_2d`` and ``phi_noise_2d`` where the
    recipe has them, and ``jitter_2d`` unless it is an SDS run (no φ to spread: 0)."""
    filled = []
    for key, dotted in RECIPE_FIELDS.items():
        owner, leaf, present = _get(config, dotted)
        value = getattr(recipe, key)
        if not present or getattr(owner, leaf) is not None:
            continue
        if key in ("lora_lr", "lora_targets") and owner.kind != "lora":
            continue
        if key == "gamma" and owner.method != "asd":
            value = 0.0
        if key in ("weighting", "phi_noise") and getattr(config, "mode", None) == "2d":
            value = value if getattr(recipe, f"{key}_2d") is None else getattr(recipe, f"{key}_2d")
        if key == "jitter_2d" and not config.distill.uses_phi:
            value = 0  # the roll spreads φ's fixed-place error; without φ (SDS) a rolled image only blurs
        setattr(owner, leaf, value)
        filled.append(dotted)
    return filled
