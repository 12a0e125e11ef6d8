"""A prior's own distillation defaults ("recipe"): background, CFG, γ, timesteps, w(t), φ's rate and noise,
regularisers, view words.

The official ASD recipe suits Stable Diffusion; a prior trained on narrow data needs its own, so the recipe travels
with the prior as ``asd_recipe.json`` in its pipeline folder (``train-toy-prior`` writes it; folders and single
files without one get :data:`OFFICIAL`). Why: docs/engine.md#the-recipe-belongs-to-the-prior.

Run configs hold ``None`` for "from the prior"; :func:`asd_engine.runs.settings.resolve` fills those fields once,
when a run is planned, and records which (``RunConfig.from_recipe``), so a resumed run keeps the values it started
with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..distill import PHI_NOISE, WEIGHTINGS
from ..errors import UserInputError
from ..scene.cameras import (ELEVATION_SAMPLING, ELEVATION_SAMPLINGS, MAX_ELEVATION_DEGREES, MIN_ELEVATION_DEGREES,
                             OVERHEAD_DEGREES)

RECIPE_FILE = "asd_recipe.json"
BACKGROUNDS = ("random", "white", "black")
LORA_TARGET_CHOICES = ("attention", "all")  # the layer sets of discriminator.LORA_TARGETS


@dataclass(frozen=True)
class Recipe:
    """Distillation defaults of one prior. Defaults = the official ASD recipe for Stable Diffusion
    (docs/engine.md#official-recipe)."""

    name: str = "official ASD recipe (Stable Diffusion)"
    # 3D training backdrop and 2D pixels' start: "random", "white" or "black"; docs/engine.md#recipe-background
    background: str = "random"
    guidance_scale: float = 7.5           # CFG of the generator's ε; docs/engine.md#recipe-guidance_scale
    # 3D: the CFG from the second phase (`t_anneal_step`) on; None: the CFG holds all run;
    # docs/engine.md#recipe-guidance_scale_annealed
    guidance_scale_annealed: float | None = None
    gamma: float = -0.75                  # ASD's γ (VSD, SDS: always 0); docs/engine.md#recipe-gamma
    t_min: float = 0.02                   # generator timesteps, fraction of T; docs/engine.md#recipe-t_min
    t_max: float = 0.98                   # docs/engine.md#recipe-t_max
    weighting: str = "sds"                # w(t) of the generator's update; docs/engine.md#recipe-weighting
    weighting_2d: str | None = None       # w(t) of 2D runs (None: `weighting`); docs/engine.md#recipe-weighting_2d
    # 2D: the image is rolled by up to this many model-space px per step (SDS: 0); docs/engine.md#recipe-jitter_2d
    jitter_2d: int = 0
    lora_lr: float = 1e-4                 # φ's lr as a LoRA (TI keeps its own); docs/engine.md#recipe-lora_lr
    # UNet layers a LoRA φ adapts: "attention" or "all"; docs/engine.md#recipe-lora_targets
    lora_targets: str = "attention"
    phi_noise: str = "fresh"              # φ's t, ε: "fresh" (own draw) or "shared"; docs/engine.md#recipe-phi_noise
    phi_noise_2d: str | None = None       # the same for 2D runs (None: `phi_noise`); docs/engine.md#recipe-phi_noise_2d
    # 3D: weight of the sparsity term mean √(opacity² + 0.01); docs/engine.md#recipe-lambda_sparsity
    lambda_sparsity: float = 10.0
    blob_fade: bool = False               # 3D: fade the seed ball by the second phase; docs/engine.md#recipe-blob_fade
    # 3D: cameras above this elevation (degrees) get ", overhead view"; docs/engine.md#recipe-overhead_elevation
    overhead_elevation: float = OVERHEAD_DEGREES
    # 3D: the training cameras' lowest elevation (degrees); docs/engine.md#recipe-min_elevation
    min_elevation: float = MIN_ELEVATION_DEGREES
    # 3D: the training cameras' highest elevation (degrees); docs/engine.md#recipe-max_elevation
    max_elevation: float = MAX_ELEVATION_DEGREES
    # 3D: how training elevations are drawn up to it; docs/engine.md#recipe-elevation_sampling
    elevation_sampling: str = ELEVATION_SAMPLING
    # whole words rewritten before tokenising; docs/engine.md#recipe-prompt_aliases
    prompt_aliases: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str = "recipe") -> None:
        for key in NUMBERS:  # a JSON string, null or true would otherwise fail below as a TypeError, or pass as 1
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError("model", f"{where}: {key} is {json.dumps(value)}, not a finite number",
                                     f"fix {RECIPE_FILE}")
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value not in choices and not (value is None and key in ("weighting_2d", "phi_noise_2d")):  # None: as 3D
                raise UserInputError("model", f"{where}: {key} '{value}' is not one of {', '.join(choices)}",
                                     f"fix {RECIPE_FILE}")
        if (not 0.0 <= self.t_min < self.t_max <= 1.0 or self.guidance_scale <= 0 or self.lora_lr <= 0
                or not isinstance(self.jitter_2d, int) or self.jitter_2d < 0 or not isinstance(self.blob_fade, bool)
                or not -1.0 <= self.gamma <= 0.0
                or self.lambda_sparsity < 0 or not 0.0 < self.overhead_elevation <= 90.0
                or not 0.0 < self.max_elevation <= 90.0 or not -90.0 <= self.min_elevation < self.max_elevation):
            raise UserInputError("model", f"{where}: out-of-range values in {self}", f"fix {RECIPE_FILE}")
        late = self.guidance_scale_annealed  # optional, so not among NUMBERS
        if late is not None and (isinstance(late, bool) or not isinstance(late, (int, float))
                                 or not math.isfinite(late) or late <= 0):
            raise UserInputError("model", f"{where}: guidance_scale_annealed is {json.dumps(late)}, not a guidance "
                                 "scale above 0", f"fix {RECIPE_FILE}, or use null for the CFG all run")


# the recipe's number fields, from its annotations (each checked for being a finite number before its range)
NUMBERS = tuple(f.name for f in dataclasses.fields(Recipe) if f.type == "float")
# the recipe's named-choice fields and the names each may hold, checked in this order
CHOICES = {"background": BACKGROUNDS, "weighting": WEIGHTINGS, "weighting_2d": WEIGHTINGS, "phi_noise": PHI_NOISE,
           "phi_noise_2d": PHI_NOISE, "elevation_sampling": ELEVATION_SAMPLINGS, "lora_targets": LORA_TARGET_CHOICES}
OFFICIAL = Recipe()

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
        raise UserInputError("model", f"'{path}' is not valid JSON ({exc})", f"fix or delete {RECIPE_FILE}") from None
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserInputError("model", f"'{path}' has unknown keys {unknown}", f"use only {sorted(known)}")
    recipe = Recipe(**{"name": f"recipe of {Path(folder).name}", **data})
    recipe.validate(str(path))
    return recipe


def write_recipe(folder: str | os.PathLike, recipe: Recipe) -> Path:
    path = Path(folder) / RECIPE_FILE
    path.write_text(json.dumps(dataclasses.asdict(recipe), indent=2) + "\n")
    return path
