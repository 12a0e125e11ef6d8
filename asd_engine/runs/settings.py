"""Every user-facing setting of a run in one table, one resolver and one validation.

Each :class:`Setting` row names a config field (``distill.gamma``), its CLI flag (``--gamma``), its node widget
(``gamma``), the prior's recipe key that fills it when the user leaves it open (``gamma``), its allowed values (taken
from the module that owns them) and its help. Front doors (the CLI, the ComfyUI nodes) build their flags and widgets
from these rows, hand the values they were given to :func:`asd_engine.runs.plan.plan_run` under the field names, and
translate the field names in errors back into their own with :func:`flag_of` / :func:`widget_of`.

:func:`resolve` is the only place that fills a ``None`` ("from the prior's recipe") and applies the method rules
(γ = 0 unless ASD, the recipe's 2D variants, no jitter for SDS); it runs once, when a run is planned, and ends with
:func:`validate`, the only validation. Why each recipe value is what it is: docs/engine.md#the-recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any

from ..devices import PRECISIONS
from ..distill import METHODS, PHI_NOISE, WEIGHTINGS, DistillConfig
from ..errors import UserInputError
from ..prior.discriminator import LORA_TARGETS, PHI_KINDS
from ..prior.recipe import BACKGROUNDS, OFFICIAL, Recipe
from ..prior.single_file import PREDICTION_CHOICES
from ..scene.cameras import ELEVATION_SAMPLINGS
from ..scene.field import FIELD_BACKENDS
from .configs import PRESETS, Distill2DConfig, RunConfig, preset_config, upgrade_stored
from .image_generator import PARAMETERIZATIONS

BOTH, ONLY_2D, ONLY_3D = ("2d", "3d"), ("2d",), ("3d",)


@dataclass(frozen=True)
class Setting:
    """One user-facing setting. ``low``/``high`` bound numbers (inclusive unless ``*_open``); ``choices`` bound
    strings; ``recipe`` is the :class:`~asd_engine.prior.recipe.Recipe` key that fills it when left ``None``."""

    field: str                         # dotted config field
    flag: str | None                   # CLI flag (None: no flag)
    widget: str | None                 # node input (None: not on a node)
    help: str
    kind: type = str                   # str, int, float, bool, list ("path" lists)
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    recipe: str | None = None
    modes: tuple[str, ...] = BOTH
    phi_only: bool = False             # meaningless without φ (SDS)

    def applies_to(self, mode: str | None) -> bool:
        return mode is None or mode in self.modes

    def range_text(self) -> str:
        lo = "" if self.low is None else f"{self.show(self.low)} {'<' if self.low_open else '≤'} "
        hi = "" if self.high is None else f" {'<' if self.high_open else '≤'} {self.show(self.high)}"
        return f"{lo}value{hi}"

    def show(self, number: float) -> str:
        return str(int(number)) if self.kind is int else f"{number:g}"


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("prompt", "--prompt", "prompt", "what to make, e.g. 'a red cube'"),
    S("negative_prompt", "--negative-prompt", "negative_prompt", "negative prompt of classifier-free guidance"),
    S("model", "--model", "model", "diffusers pipeline folder or single-file SD 1.x/2.x .safetensors; default: the "
                                   "embedded toy prior"),
    S("prediction_type", "--prediction-type", "prediction_type",
      "what the model predicts; auto: the folder's scheduler, or detected from a single file's weights",
      choices=PREDICTION_CHOICES),
    S("phi_model", "--phi-model", "phi_model", "a second model for φ (official: SD2.1-768 v for φ, SD2.1-base as "
                                               "the prior); default: φ on the prior", phi_only=True),
    S("precision", "--precision", "precision", "frozen models' precision; auto: fp16 on CUDA, fp32 elsewhere "
                                               "(θ and φ always train in fp32)", choices=("auto", *PRECISIONS)),
    S("attention_slicing", "--attention-slicing", None, "UNet attention one head at a time (lower peak memory)",
      kind=bool),
    S("vae_checkpointing", "--vae-checkpointing", None, "recompute the VAE encoder in backward", kind=bool),
    S("seed", "--seed", "seed", "seed of every random draw of the run", kind=int, low=0, high=2 ** 63 - 1),
    S("steps", "--steps", "steps", "total steps (also when resuming)", kind=int, low=1),
    S("background", "--train-background", "background",
      "what renders are composited over in training (3D) and 2D pixels start as", choices=BACKGROUNDS,
      recipe="background"),
    S("distill.method", "--method", "method", "asd, or the baselines vsd (ASD with γ = 0) and sds (no φ)",
      choices=METHODS),
    S("distill.guidance_scale", "--cfg", "cfg", "classifier-free guidance scale of the prior", kind=float, low=0,
      recipe="guidance_scale"),
    S("distill.gamma", "--gamma", "gamma", "ASD's γ in the discriminator loss (0 makes ASD VSD)", kind=float,
      low=-1, high=0, recipe="gamma", phi_only=True),
    S("distill.eta", "--eta", None, "η of the real-sample term (needs references)", kind=float, low=0,
      modes=ONLY_2D, phi_only=True),
    S("distill.weighting", "--weighting", "weighting", "w(t): sds = 1-ᾱ, uniform = 1, sigma_over_alpha = √((1-ᾱ)/ᾱ)",
      choices=WEIGHTINGS, recipe="weighting"),
    S("distill.t_min", "--t-min", "t_min", "lowest timestep as a fraction of T", kind=float, low=0, high=1,
      recipe="t_min"),
    S("distill.t_max", "--t-max", "t_max", "highest timestep as a fraction of T", kind=float, low=0, high=1,
      recipe="t_max"),
    S("distill.t_anneal_step", "--t-anneal-step", None, "from this step on, t_max is the annealed t_max", kind=int,
      low=0),
    S("distill.t_max_annealed", "--t-max-annealed", None, "t_max after annealing", kind=float, low=0, high=1,
      low_open=True),
    S("distill.guidance_scale_annealed", "--cfg-annealed", None, "classifier-free guidance scale of the second "
      "phase, from the anneal step on (none: the CFG holds all run, as a CFG given without this one does)",
      kind=float, low=0, recipe="guidance_scale_annealed", modes=ONLY_3D),
    S("distill.phi_noise", "--phi-noise", "noise_sharing", "φ's step with its own t', ε' (fresh; official) or the "
                                                         "generator's (shared: two UNet calls fewer)",
      choices=PHI_NOISE, recipe="phi_noise", phi_only=True),
    S("phi.kind", "--phi", "phi_type", "discriminator φ: a LoRA or textual-inversion tokens", choices=PHI_KINDS,
      phi_only=True),
    S("phi.lora_rank", "--lora-rank", "lora_rank", "LoRA rank of φ", kind=int, low=1, high=1024, phi_only=True),
    S("phi.lora_targets", "--lora-targets", "lora_targets", "UNet layers φ's LoRA adapts: attention, or all (every "
                                                            "convolution too)", choices=tuple(LORA_TARGETS),
      recipe="lora_targets", phi_only=True),
    S("phi.lr", "--phi-lr", "learning_rate", "φ's learning rate (textual inversion: 5e-3 when left open)",
      kind=float, low=0, low_open=True, recipe="lora_lr", phi_only=True),
    S("phi.num_tokens", "--ti-tokens", "ti_tokens", "number of textual-inversion tokens of φ", kind=int, low=1,
      high=64, phi_only=True),
    S("phi.init_word", "--ti-init", "ti_init_word", "word whose embedding initialises the TI tokens",
      phi_only=True),
    S("phi.camera_embedding", "--camera-embedding", "camera_embedding", "condition the LoRA φ on the camera",
      kind=bool, modes=ONLY_3D, phi_only=True),
    S("phi.camera_dropout", None, None, "probability that φ's camera is zeroed for a step", kind=float, low=0,
      high=1, modes=ONLY_3D, phi_only=True),
    S("lr_decay_to", "--lr-decay-to", None, "the generator's learning rates fall along a cosine to this fraction of "
                                            "their start by the last step, in 3D from the second phase's start (1: "
                                            "constant)", kind=float, low=0, high=1, low_open=True),
    # 2D
    S("size", "--size", "size", "image side in pixels, a multiple of 8; default: the prior's own size", kind=int,
      low=8, modes=ONLY_2D),
    S("parameterization", "--param", "parameterization", "optimise the model-space latent, or RGB pixels through "
                                                         "the VAE encoder", choices=PARAMETERIZATIONS, modes=ONLY_2D),
    S("lr", "--lr", "learning_rate", "the image's learning rate; default: 0.03 latent, 0.01 pixel",
      kind=float, low=0, low_open=True, modes=ONLY_2D),
    S("jitter", "--jitter", "jitter", "each step the image is shown rolled by up to this many pixels per axis",
      kind=int, low=0, high=64, recipe="jitter_2d", modes=ONLY_2D),
    S("references", "--reference", None, "real images of the target: the real-sample terms of the full L_D "
                                         "(Eq. 5)", kind=list, modes=ONLY_2D),
    # 3D
    S("preset", "--preset", "preset", "toy-cpu (small grid at the prior's size, minutes on a CPU), quality (the "
                                      "official recipe, GPU), low-vram", choices=PRESETS, modes=ONLY_3D),
    S("batch_size", "--batch-size", "batch_size", "cameras per step", kind=int, low=1, high=64, modes=ONLY_3D),
    S("perp_neg", "--perp-neg", None, "Perp-Neg guidance", kind=bool, modes=ONLY_3D),
    S("view_dependent_prompts", "--view-prompts", None, "append ', front/side/back/overhead view' per camera",
      kind=bool, modes=ONLY_3D),
    S("lambda_sparsity", "--lambda-sparsity", None, "weight of the sparsity regulariser", kind=float, low=0,
      recipe="lambda_sparsity", modes=ONLY_3D),
    S("lambda_haze", "--lambda-haze", None, "weight of the haze regulariser: density too faint for the renderer to "
                                            "draw, at random points (0: off)", kind=float, low=0, modes=ONLY_3D),
    S("blob_fade", "--blob-fade", None, "fade the NeRF's initial ball of density to nothing by the second phase",
      kind=bool, recipe="blob_fade", modes=ONLY_3D),
    S("overhead_elevation", "--overhead-elevation", None, "cameras above this elevation (degrees) are prompted "
                                                          "', overhead view'", kind=float, low=0, high=90,
      low_open=True, recipe="overhead_elevation", modes=ONLY_3D),
    S("cameras.min_elevation", "--min-elevation", None, "the training cameras' lowest elevation (degrees; below 0 "
      "looks up at the object's underside)", kind=float, low=-90, high=90, high_open=True, recipe="min_elevation",
      modes=ONLY_3D),
    S("cameras.max_elevation", "--max-elevation", None, "the training cameras' highest elevation (degrees)",
      kind=float, low=0, high=90, low_open=True, recipe="max_elevation", modes=ONLY_3D),
    S("cameras.elevation_sampling", "--elevation-sampling", None, "how training elevations are drawn: degrees "
      "(uniform in the angle), sphere (uniform over the sphere: fewer views from near the top), mixed (one of the "
      "two per batch, the official code's)", choices=ELEVATION_SAMPLINGS, recipe="elevation_sampling",
      modes=ONLY_3D),
    S("resolution_schedule", "--resolution-schedule", "resolution_schedule",
      "render sizes by step, e.g. '0:64, 5000:512'", kind=list, modes=ONLY_3D),
    S("nerf_field.backend", "--field-backend", "field_backend", "hash-grid implementation: auto (tiny-cuda-nn on CUDA "
      "when installed, else torch), torch (the reference), warp (fused kernels, CPU and CUDA: pip install "
      "warp-lang), tcnn", choices=FIELD_BACKENDS, modes=ONLY_3D),
)
del S
BY_FIELD: dict[str, Setting] = {s.field: s for s in SETTINGS}

# Inputs that are not config fields, by the name the engine's errors use: (CLI flag, node widget).
INPUTS: dict[str, tuple[str | None, str | None]] = {
    "resume": ("--resume", "resume"),
    "checkpoint": ("--checkpoint", "checkpoint"),
    "out": ("--out", None),
    "overwrite": ("--overwrite", None),  # CLI: a fresh run may replace an earlier run's outputs in --out
    "device": ("--device", None),
    "views": ("--views", "views"),
    "view_size": ("--view-size", "size"),
    "mesh_resolution": ("--mesh-resolution", "resolution"),
    "mesh_threshold": ("--mesh-threshold", "threshold"),
    "clip": ("--clip", None),           # clip-score: the CLIP model folder
    "images": (None, None),             # clip-score: its positional image files (the CLI names it "images")
    "folders": (None, None),            # quality-report: its positional harness folders (the CLI names it "folders")
    "mode": ("--mode", None),           # quality harness: 3d or 2d
    "prompts": ("--prompts", None),     # quality harness: its toy prompts
    "methods": ("--methods", None),     # quality harness: the methods it compares
    "seeds": ("--seeds", None),         # quality harness: seeds per prompt
    "init": ("--init", None),           # train-toy-prior: the pipeline folder to fine-tune
    "result": (None, "result"),         # nodes: an ASD_RESULT input (Render Views, NeRF to Mesh, Save Checkpoint)
    "mesh": (None, "mesh"),             # nodes: Save Mesh's MESH input
}


def parse_resolution_schedule(text: str, input_name: str = "resolution_schedule") -> list[tuple[int, int]] | None:
    """``""`` → None (preset default); ``"64"`` → [(0, 64)]; ``"0:64, 5000:512"`` → [(0, 64), (5000, 512)]."""
    text = text.strip()
    if not text:
        return None
    schedule = []
    try:
        for part in text.replace(";", ",").split(","):
            step, _, side = part.strip().rpartition(":")
            schedule.append((int(step) if step else 0, int(side)))
    except ValueError:
        raise UserInputError(input_name, f"cannot read '{text}'",
                             "write a size ('64') or step:size pairs ('0:64, 5000:512')") from None
    check_schedule(sorted(schedule))
    return sorted(schedule)


def flag_of(name: str) -> str:
    """The CLI's name for a field or input (the name itself when it has none)."""
    if name in BY_FIELD:
        return BY_FIELD[name].flag or name
    return (INPUTS.get(name, (None, None))[0]) or name


def widget_of(name: str) -> str:
    """The nodes' name for a field or input (the name itself when it has none)."""
    if name in BY_FIELD:
        return BY_FIELD[name].widget or name
    return (INPUTS.get(name, (None, None))[1]) or name


def settings_for(mode: str | None) -> list[Setting]:
    """The rows that apply to a ``"2d"`` or ``"3d"`` run (``None``: all)."""
    return [s for s in SETTINGS if s.applies_to(mode)]


def get_field(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def set_field(config: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        config = getattr(config, name)
    setattr(config, leaf, value)


def has_field(config: Any, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(config, name):
            return False
        config = getattr(config, name)
    return True


def recipe_value(setting: Setting, recipe: Recipe, mode: str | None, method: str) -> Any:
    """What the recipe gives ``setting`` in a ``mode`` run of ``method``, after the method rules."""
    key = setting.recipe
    if key == "gamma" and method != "asd":
        return 0.0                          # VSD is ASD with γ = 0; SDS has no φ
    if key == "jitter_2d" and method == "sds":
        return 0                            # the roll spreads φ's fixed-place error; SDS has none, and only blurs
    value = getattr(recipe, key)
    if mode == "2d" and key in ("weighting", "phi_noise") and getattr(recipe, f"{key}_2d") is not None:
        value = getattr(recipe, f"{key}_2d")
    return value


def default_text(setting: Setting, mode: str) -> str:
    """The help's default: the prior's recipe (with the official and the toy prior's values), or the config's."""
    if setting.recipe:
        from ..prior import default_prior_path
        from ..prior.recipe import read_recipe

        def shown(value: Any) -> str:  # an optional recipe value (guidance_scale_annealed) may be left out: none
            return "none" if value is None else show_value(value)

        official = recipe_value(setting, OFFICIAL, mode, "asd")
        toy_recipe = read_recipe(default_prior_path())
        toy = shown(recipe_value(setting, toy_recipe, mode, "asd"))
        toy_2d = shown(recipe_value(setting, toy_recipe, "2d", "asd"))
        if mode == "3d" and "2d" in setting.modes and toy_2d != toy:  # one widget for both (the Train Loop node)
            toy = f"{toy} in 3D, {toy_2d} in 2D"
        return f"default: from the prior's recipe (Stable Diffusion {shown(official)}, toy prior {toy})"
    if mode == "3d":
        values = {p: get_field(preset_config(p, ""), setting.field) for p in PRESETS}
        if len(set(map(repr, values.values()))) > 1:
            return "default per preset: " + ", ".join(f"{p} {show_value(v)}" for p, v in values.items())
        value = next(iter(values.values()))
    else:
        value = get_field(Distill2DConfig(prompt=""), setting.field)
    return "" if value in (None, "", []) else f"default {show_value(value)}"


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "" if value is None else str(value)


def _cfg_holds(setting: Setting, cfg_chosen: bool) -> bool:
    """True for the second phase's CFG when the caller chose the CFG: a chosen CFG holds all run unless the second
    phase's is chosen too, so the recipe does not fill it."""
    return cfg_chosen and setting.field == "distill.guidance_scale_annealed"


def resolve(config: RunConfig, recipe: Recipe, native_size: int | None = None, values: dict[str, Any] | None = None,
            explicit: bool = False) -> list[str]:
    """The one resolver. Sets ``values`` (field → value; ``None``: open) on ``config``, checks that values a user
    typed (``explicit``) have an effect, fills every open recipe-backed field from ``recipe`` with the method rules
    and a 2D run's open size with the prior's ``native_size``, then :func:`validate`. Records and returns the
    filled fields (``config.from_recipe``)."""
    values = {name: value for name, value in (values or {}).items() if value is not None}
    for name, value in values.items():
        if not has_field(config, name):
            raise ValueError(f"a {type(config).__name__} has no setting {name!r}")
        set_field(config, name, copy.deepcopy(value))
    if explicit:
        unused_with(config.distill.method, values)
    mode, method = type(config).mode, config.distill.method
    cfg_chosen = config.distill.guidance_scale is not None  # by a front door's values or a library caller's config
    filled = []
    if mode == "2d" and config.size is None and native_size is not None:
        config.size = native_size
        filled.append("size")
    for setting in settings_for(mode):
        if setting.recipe is None or not has_field(config, setting.field):
            continue
        if setting.field in ("phi.lr", "phi.lora_targets") and config.phi.kind != "lora":
            continue  # textual inversion has its own lr and no LoRA
        if _cfg_holds(setting, cfg_chosen):
            continue
        if get_field(config, setting.field) is None:
            set_field(config, setting.field, recipe_value(setting, recipe, mode, method))
            filled.append(setting.field)
    config.from_recipe = sorted(set(config.from_recipe or []) | set(filled))
    validate(config)
    return filled


def with_recipe(distill: DistillConfig, recipe: Recipe = OFFICIAL, mode: str = "3d") -> DistillConfig:
    """A copy of ``distill`` resolved against ``recipe`` (for calling ``distill_step`` outside a run)."""
    cfg_chosen = distill.guidance_scale is not None
    distill = dataclasses.replace(distill)
    for setting in SETTINGS:
        if not setting.applies_to(mode) or _cfg_holds(setting, cfg_chosen):
            continue
        if setting.field.startswith("distill.") and setting.recipe and getattr(distill, setting.field[8:]) is None:
            setattr(distill, setting.field[8:], recipe_value(setting, recipe, mode, distill.method))
    _check_distill(distill)
    return distill


def _fail(field: str, problem: str, fix: str) -> None:
    raise UserInputError(field, problem, fix)


def _check_value(setting: Setting, value: Any) -> None:
    name = setting.field
    if value is None:
        return  # open: the recipe (or the run's own default) fills it
    if setting.kind is bool:
        if not isinstance(value, bool):
            _fail(name, f"{value!r} is not on/off", "use on or off (true/false)")
        return
    if setting.kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (setting.kind is int
                                                                             and not isinstance(value, int)):
            _fail(name, f"{value!r} is not a{'n integer' if setting.kind is int else ' number'}",
                  f"give a number in {setting.range_text()}")
        if not math.isfinite(value):
            _fail(name, f"{value} is not a finite number", f"give a number in {setting.range_text()}")
        too_low = setting.low is not None and (value <= setting.low if setting.low_open else value < setting.low)
        too_high = setting.high is not None and (value >= setting.high if setting.high_open else value > setting.high)
        if too_low or too_high:
            _fail(name, f"{setting.show(value)} is out of range", f"use {setting.range_text()}")
        return
    if setting.kind is str:
        if not isinstance(value, str):
            _fail(name, f"{value!r} is not text", "give a text value")
        if setting.choices is not None and value not in setting.choices:
            _fail(name, f"'{value}' is not one of {', '.join(setting.choices)}",
                  f"use one of {', '.join(setting.choices)}")


def check_setting(field: str, value: Any) -> None:
    """Refuse ``value`` for the setting ``field`` as a run would (its kind, range and choices); None passes."""
    _check_value(BY_FIELD[field], value)


def _check_distill(distill: DistillConfig) -> None:
    t_min = distill.t_min if distill.t_min is not None else 0.0
    t_max = distill.t_max if distill.t_max is not None else 1.0
    if not t_min < t_max:
        _fail("distill.t_min", f"t_min {t_min:g} is not below t_max {t_max:g}", "use {=distill.t_min} < {=distill.t_max}")
    if not t_min < distill.t_max_annealed:
        _fail("distill.t_max_annealed", f"{distill.t_max_annealed:g} is not above t_min {t_min:g}",
              "use {=distill.t_min} < {=distill.t_max_annealed}")
    if distill.method == "vsd" and distill.gamma not in (None, 0.0):
        _fail("distill.gamma", f"VSD is ASD with γ = 0, got γ = {distill.gamma:g}",
              "set {=distill.method} to asd to use γ, or leave {=distill.gamma} open for VSD")


def validate(config: RunConfig) -> None:
    """Check every setting of ``config`` against its row and the rules between fields; raises a
    :class:`UserInputError` naming the field (front doors translate it to a flag or widget). The one validation."""
    mode = type(config).mode
    for setting in settings_for(mode):
        if has_field(config, setting.field):
            _check_value(setting, get_field(config, setting.field))
    if not isinstance(config.prompt, str) or not config.prompt.strip():
        _fail("prompt", "the prompt is empty", "describe what to make, e.g. 'a red cube'")
    _check_distill(config.distill)
    if "{phi}" not in config.phi.prompt_template:
        _fail("phi.prompt_template", "the template has no {phi} placeholder", "include {phi}, e.g. '{phi} {prompt}'")
    if mode == "2d":
        if config.size is not None and config.size % 8:
            _fail("size", f"{config.size} px is not a multiple of 8", "use e.g. 512 for Stable Diffusion, 32 for the "
                                                                      "toy prior")
        for path in config.references:
            if not isinstance(path, str):
                _fail("references", f"{path!r} is not a file path", "give image files")
    if mode == "3d":
        check_schedule(config.resolution_schedule)
        low, high = config.cameras.min_elevation, config.cameras.max_elevation
        if low is not None and high is not None and low >= high:
            _fail("cameras.min_elevation", f"the lowest camera ({low:g}°) is not below the highest ({high:g}°)",
                  "set {=cameras.min_elevation} below {=cameras.max_elevation}")


def check_schedule(schedule: list[tuple[int, int]]) -> None:
    """A render schedule starts at step 0, and its sizes are multiples of 8."""
    if not schedule or schedule[0][0] != 0 or any(side < 8 or side % 8 for _, side in schedule):
        _fail("resolution_schedule", f"{schedule} does not start at step 0 with sizes that are multiples of 8",
              "e.g. '0:64, 5000:512'")


def unused_with(method: str, given: dict[str, Any]) -> None:
    """A front door's check of the fields a user set explicitly: φ's settings do nothing in an SDS run, and η
    only weighs reference images."""
    if method == "sds":
        for name in given:
            if BY_FIELD[name].phi_only:
                _fail(name, "SDS has no discriminator φ, so this has no effect",
                      "leave it out, or set {=distill.method} to asd or vsd")
    if "distill.eta" in given and not given.get("references"):
        _fail("distill.eta", "η weighs the real-sample term, which needs reference images",
              "add {=references}, or leave {=distill.eta} out")


def official_where_absent(saved: dict[str, Any], config_class: type) -> dict[str, Any]:
    """A run config saved by an older version (``dataclasses.asdict`` form), with every recipe-backed field that
    the config class has but ``saved`` lacks set to its :data:`OFFICIAL` value: before a recipe field existed the
    engine always used the official value, so a resumed run keeps what it started with. Where a config class's
    ``upgrade`` hook says what an older form meant, that wins (``elevation_sampling``: runs stored before it drew
    uniform in degrees, not the official "mixed")."""
    saved = copy.deepcopy(saved)
    for setting in settings_for(config_class.mode):
        if setting.recipe is None:
            continue
        *parents, leaf = setting.field.split(".")
        owner, cls = saved, config_class
        for name in parents:
            child, cls = owner.get(name), typing.get_type_hints(cls).get(name)
            if not isinstance(child, dict) or not dataclasses.is_dataclass(cls):
                break
            owner[name] = upgrade_stored(cls, child)  # a class may know what its older forms meant
            owner = owner[name]
        else:
            if leaf in {f.name for f in dataclasses.fields(cls)} and leaf not in owner:
                owner[leaf] = getattr(OFFICIAL, setting.recipe)
    return saved


__all__ = ["Setting", "SETTINGS", "BY_FIELD", "INPUTS", "flag_of", "widget_of", "settings_for", "resolve",
           "validate", "with_recipe", "unused_with", "official_where_absent"]
