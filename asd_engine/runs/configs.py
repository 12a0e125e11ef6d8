"""The configs that define a run, stored verbatim in its checkpoints, and the 3D presets.

Fields are the settings' names (``distill.gamma``, ``phi.lr``, ``preset``): :mod:`.settings` describes every
user-facing one (flag, widget, recipe key, allowed values, help), fills the open ones from the prior's recipe and
validates them, once, when a run is planned. ``None`` in a field means "from the prior's recipe".
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..distill import DistillConfig
from ..errors import UserInputError
from ..prior.discriminator import PhiConfig
from ..scene.cameras import CameraRanges
from ..scene.field import FieldConfig
from ..scene.render import RenderConfig


def upgrade_stored(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a stored ``asdict`` form of ``cls``) in today's field names: a class with an ``upgrade`` hook
    rewrites what an older version stored (CameraRanges' elevation pair)."""
    return cls.upgrade(data) if hasattr(cls, "upgrade") else data


def config_from_dict(cls: type, data: dict[str, Any]):
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output; tuples come back as tuples."""
    data = upgrade_stored(cls, data)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif typing.get_origin(hint) is list and isinstance(value, list):
            value = [tuple(v) if isinstance(v, list) else v for v in value]
        kwargs[f.name] = value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise UserInputError("resume", f"the checkpoint has settings this version does not know: {sorted(unknown)}",
                             "resume with the engine version that wrote it")
    return cls(**kwargs)


@dataclass
class RunConfig:
    """Settings every run has; :class:`Distill2DConfig` and :class:`TextTo3DConfig` extend it."""

    mode: ClassVar[str | None] = None     # "2d" / "3d": which of the recipe's mode-specific values apply
    # Non-recipe fields added after checkpoints were written: the value such a checkpoint resumes with, i.e. what
    # the engine did before the field existed (recipe fields: recipe.official_where_absent).
    older_values: ClassVar[dict[str, Any]] = {}

    prompt: str
    model: str | None = None              # pipeline folder or single-file checkpoint; None: the embedded prior
    prediction_type: str = "auto"         # override of the model's epsilon / v_prediction
    phi_model: str | None = None          # a second model for φ (official: SD2.1-768 v); None: φ on the prior
    # Memory (frozen models only; θ and φ always train in fp32): "auto" = fp16 on CUDA, fp32 elsewhere.
    precision: str = "auto"
    attention_slicing: bool = False       # UNet attention in slices: lower peak, a little slower
    vae_checkpointing: bool = False       # recompute the VAE encoder in backward instead of storing activations
    negative_prompt: str = ""
    steps: int = 300
    seed: int = 0
    # What the generator is composited over while training (3D) or starts as (2D pixels): "random", "white" or
    # "black"; None: the prior's recipe (docs/engine.md#recipe-background).
    background: str | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    phi: PhiConfig = field(default_factory=PhiConfig)
    # the fields the prior's recipe filled; None until settings.resolve has run (once, when the run is planned)
    from_recipe: list[str] | None = None


DEFAULT_LR = {"latent": 3e-2, "pixel": 1e-2}


@dataclass
class Distill2DConfig(RunConfig):
    """Everything that defines a 2D run (stored in its checkpoints)."""

    mode = "2d"
    older_values = {"lr_decay_to": 1.0}  # checkpoints from before the falling learning rate resume at a constant one
    size: int | None = None  # None: the prior's native size (UNet sample size × VAE factor; 512 for SD 2.1-base)
    parameterization: str = "latent"
    lr: float | None = None  # None → DEFAULT_LR[parameterization]
    # the lr falls along a cosine to lr × lr_decay_to at the last step (1: constant); why: docs/engine.md#lr-decay-2d
    lr_decay_to: float = 0.05
    jitter: int | None = None  # None: from the prior's recipe (recipe.Recipe.jitter_2d); 0: the image never moves
    references: list[str] = field(default_factory=list)


PRESETS = ("toy-cpu", "quality", "low-vram")
# the toy-cpu preset's (and so the demo's) step count; why 900: docs/text_to_3d.md#preset-toy-cpu-steps
TOY_CPU_STEPS = 900
# turntable views, their size in px, the marching-cubes grid and its density isosurface for each preset's outputs
# (toy-cpu's 5 vs the official 25, because it marches 96 steps, not 512: docs/text_to_3d.md#export-mesh-threshold)
EXPORT_DEFAULTS = {"toy-cpu": {"views": 36, "size": 128, "mesh_resolution": 128, "mesh_threshold": 5.0},
                   "quality": {"views": 120, "size": 512, "mesh_resolution": 256, "mesh_threshold": 25.0},
                   "low-vram": {"views": 120, "size": 512, "mesh_resolution": 256, "mesh_threshold": 25.0}}


@dataclass
class TextTo3DConfig(RunConfig):
    """Everything that defines a text-to-3D run (stored in its checkpoints). Defaults = the ``quality`` preset."""

    mode = "3d"
    older_values = {"lr_decay_to": 1.0}  # checkpoints from before the 3D falling learning rate resume at a constant one
    steps: int = 25_000
    preset: str = "quality"
    batch_size: int = 1
    # (from step, render side in px); renders are resized to `prior_resolution` before encoding
    resolution_schedule: list[tuple[int, int]] = field(default_factory=lambda: [(0, 64), (5000, 512)])
    prior_resolution: int | None = None   # None: the prior's native size (UNet sample size × VAE factor)
    view_dependent_prompts: bool = True
    perp_neg: bool = True
    lr_grid: float = 1e-2
    lr_mlp: float = 1e-3
    lr_background: float = 1e-3
    # the three rates fall along a cosine from the second phase's start (`distill.t_anneal_step`) to this fraction of
    # themselves at the last step (1: constant, the official recipe); why: docs/engine.md#lr-decay-3d
    lr_decay_to: float = 1.0
    lambda_sparsity: float | None = None  # mean √(opacity² + 0.01); None: the prior's recipe (official 10)
    # mean alpha of the density too faint to render, at random points (text_to_3d.haze_loss); off by default: it
    # clears floaters but made the toy prior's objects larger (docs/text_to_3d.md#lambda-haze)
    lambda_haze: float = 0.0
    overhead_elevation: float | None = None  # "overhead view" above it (degrees); None: the prior's recipe (60)
    # fade the blob's seed ball (field.NeRFField) linearly to nothing by the second phase (`distill.t_anneal_step`);
    # None: the prior's recipe (official: the permanent blob)
    blob_fade: bool | None = None
    lambda_opacity_entropy: float = 1000.0  # mean binary entropy of the opacity, from `opacity_entropy_from` on
    opacity_entropy_from: int = 10_000
    # the training cameras; their elevation limits and how elevations are drawn between them, None: the prior's
    # recipe (official −10° to 45°, "mixed")
    cameras: CameraRanges = field(default_factory=lambda: CameraRanges(min_elevation=None, max_elevation=None,
                                                                       elevation_sampling=None))
    nerf_field: FieldConfig = field(default_factory=FieldConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(t_anneal_step=5000))


def preset_config(preset: str, prompt: str, **overrides: Any) -> TextTo3DConfig:
    """The config of a named preset, with ``overrides`` (top-level fields) applied."""
    if preset not in PRESETS:
        raise UserInputError("preset", f"unknown preset '{preset}'", f"use one of {', '.join(PRESETS)}")
    config = TextTo3DConfig(prompt=prompt, preset=preset)
    if preset == "low-vram":  # the recipe's 64 → 512 px schedule, with every memory saver
        config.nerf_field = FieldConfig(log2_hashmap_size=18)
        config.render = RenderConfig(samples_per_ray=256, ray_chunk=8192, checkpoint_rays=8192)
        config.vae_checkpointing = True  # attention stays on SDPA: on CUDA it is already the memory-lean kernel
    elif preset == "toy-cpu":
        config.steps = TOY_CPU_STEPS
        config.resolution_schedule = [(0, 32)]
        config.perp_neg = False
        config.nerf_field = FieldConfig(n_levels=8, log2_hashmap_size=15, base_resolution=16,
                                   per_level_scale=1.3459, hidden_dim=32)  # finest level 128
        config.render = RenderConfig(samples_per_ray=96, grid_warmup_steps=64, grid_update_every=8)
        config.distill = DistillConfig(t_anneal_step=300)
        config.opacity_entropy_from = 300
        config.lambda_opacity_entropy = 10.0
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"TextTo3DConfig has no field {key!r}")
        setattr(config, key, copy.deepcopy(value))
    return config


