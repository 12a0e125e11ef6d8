"""Text-to-3D: optimise a NeRF with SDS / VSD / ASD from a diffusion prior.

One step (Alg. 1): sample cameras → render (jittered marching, random solid backgrounds) → resize to the prior's
resolution → encode (VAE posterior sample, gradients through the encoder) → :func:`distill.distill_step` with the
view-dependent prompt (φ gets the camera) → + regularisers (sparsity, opacity entropy) → backward → Adam.

Presets: ``quality`` is the official ASD recipe (GPU, frozen models in fp16), ``low-vram`` keeps its 64 → 512 px
schedule and adds VAE-encoder checkpointing, a smaller table and chunked marching; ``toy-cpu`` is
a small grid at the prior's low resolution that finishes a short run on two CPU cores in minutes.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .cameras import CameraRanges, orbit_cameras, sample_cameras
from .devices import resolve_device
from .distill import DistillConfig, distill_step
from .errors import UserInputError
from .field import FieldConfig
from .nerf import NeRFGenerator, NeRFRender
from .prompts import ViewPrompts
from .render import RenderConfig
from .runs import DistillationRun, RunConfig, StepInfo, config_from_dict

PRESETS = ("toy-cpu", "quality", "low-vram")
# the toy-cpu preset's (and so the demo's) step count. Its second phase (t_max 0.5, opacity entropy) starts at step
# 300, when the toy prior's recipe has faded the blob's seed; a torus's hole opens during that phase, not before it
# (docs/quality.md, eighth round). After 300 second-phase steps it had opened in 2 of 6 evaluation runs; after 600
# in each tuning run followed that far, but in only 3 of 6 evaluation runs; longer second phases kept growing the
# object (ninth round). With the recipe's shared φ noise (tenth round) it opens in all 6 (a tuning run only after 750).
TOY_CPU_STEPS = 900
# turntable views, their size in px, the marching-cubes grid and its density isosurface for each preset's outputs.
# The official isosurface, 25, goes with 512 marching steps across the diagonal; toy-cpu marches 96, so the same
# opacity per step comes from ~5x less density, and its objects' inside sits at 10-25: at 25 only a few density
# peaks were meshed (a 900-step demo gave three fragments; at 5 one piece of the right size)
EXPORT_DEFAULTS = {"toy-cpu": {"views": 36, "size": 128, "mesh_resolution": 128, "mesh_threshold": 5.0},
                   "quality": {"views": 120, "size": 512, "mesh_resolution": 256, "mesh_threshold": 25.0},
                   "low-vram": {"views": 120, "size": 512, "mesh_resolution": 256, "mesh_threshold": 25.0}}


@dataclass
class TextTo3DConfig(RunConfig):
    """Everything that defines a text-to-3D run (stored in its checkpoints). Defaults = the ``quality`` preset."""

    mode = "3d"
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
    lambda_sparsity: float | None = None  # mean √(opacity² + 0.01); None: the prior's recipe (official 10)
    overhead_elevation: float | None = None  # "overhead view" above it (degrees); None: the prior's recipe (60)
    # fade the blob's seed ball (field.NeRFField) linearly to nothing by the second phase (`distill.t_anneal_step`);
    # None: the prior's recipe (official: the permanent blob)
    blob_fade: bool | None = None
    lambda_opacity_entropy: float = 1000.0  # mean binary entropy of the opacity, from `opacity_entropy_from` on
    opacity_entropy_from: int = 10_000
    cameras: CameraRanges = field(default_factory=CameraRanges)
    nerf_field: FieldConfig = field(default_factory=FieldConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(t_anneal_step=5000))

    def validate(self) -> None:
        super().validate()
        if self.preset not in PRESETS:
            raise UserInputError("--preset", f"unknown preset '{self.preset}'", f"use one of {', '.join(PRESETS)}")
        if self.batch_size < 1:
            raise UserInputError("--batch-size", f"{self.batch_size}", "use an integer ≥ 1")
        if self.overhead_elevation is not None and not 0.0 < self.overhead_elevation <= 90.0:
            raise UserInputError("--overhead-elevation", f"{self.overhead_elevation}°",
                                 "use an elevation in (0, 90] degrees")
        if not self.resolution_schedule or self.resolution_schedule[0][0] != 0 or any(
                r < 8 for _, r in self.resolution_schedule):
            raise UserInputError("--resolution", f"bad schedule {self.resolution_schedule}",
                                 "give (step, px) pairs starting at step 0 with sizes ≥ 8")


def preset_config(preset: str, prompt: str, **overrides: Any) -> TextTo3DConfig:
    """The config of a named preset, with ``overrides`` (top-level fields) applied."""
    if preset not in PRESETS:
        raise UserInputError("--preset", f"unknown preset '{preset}'", f"use one of {', '.join(PRESETS)}")
    config = TextTo3DConfig(prompt=prompt, preset=preset)
    if preset == "low-vram":  # the recipe's 64 → 512 px schedule, with every memory saver
        config.nerf_field = FieldConfig(log2_hashmap_size=18)
        config.render = RenderConfig(samples_per_ray=256, ray_chunk=8192)
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


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """Mean √(opacity² + 0.01) of ``opacity [B, H, W, 1]``: a smooth L1 pull towards empty space."""
    return (opacity.square() + 0.01).sqrt().mean()


def opacity_entropy(opacity: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of ``opacity [B, H, W, 1]``: pushes every ray to fully empty or fully opaque."""
    o = opacity.clamp(1e-4, 1.0 - 1e-4)
    return -(o * o.log() + (1.0 - o) * (1.0 - o).log()).mean()


def blob_seed(step: int, t_anneal_step: int | None, steps: int) -> float:
    """Weight of the blob's seed ball at ``step`` under ``blob_fade``: 1 → 0 linearly by the second phase's start
    (``t_anneal_step``; the run's last step when it has none)."""
    end = steps if t_anneal_step is None else t_anneal_step
    return max(0.0, 1.0 - step / end) if end > 0 else 0.0


class TextTo3D(DistillationRun):
    """A text-to-3D run; ``nerf`` is the generator θ."""

    kind = "text-to-3d"
    config_class = TextTo3DConfig
    has_cameras = True

    def _build(self) -> None:
        config, prior = self.config, self.prior
        self.prior_resolution = config.prior_resolution or int(prior.unet.config.sample_size) * prior.vae_scale_factor
        prior.check_image_size(self.prior_resolution, input_name="--prior-resolution")
        self.nerf = NeRFGenerator(config.nerf_field, config.render, device=prior.device)
        groups = self.nerf.parameter_groups(config.lr_grid, config.lr_mlp, config.lr_background)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.prompts = ViewPrompts(prior, config.prompt, config.negative_prompt,
                                   view_dependent=config.view_dependent_prompts, perp_neg=config.perp_neg,
                                   overhead_elevation=config.overhead_elevation)

    def resolution(self, step: int) -> int:
        return [side for start, side in self.config.resolution_schedule if start <= step][-1]

    def render_for_prior(self, cameras) -> tuple[NeRFRender, torch.Tensor]:
        """A training render of ``cameras`` and its model-space ``x0 [B, C, h, w]`` (resized to the prior's size,
        encoded with gradients)."""
        # "random": the learned background, swapped for a random solid colour at times (official); or the solid
        # colour a narrow prior saw in training (the toy prior reads any other background as part of the object)
        background = "learned" if self.config.background == "random" else self.config.background
        render = self.nerf.render(cameras, self.rng, training=True, background=background)
        images = render.rgb.permute(0, 3, 1, 2)                                  # [B, 3, H, W]
        if images.shape[-1] != self.prior_resolution:
            images = F.interpolate(images, size=(self.prior_resolution,) * 2, mode="bilinear", align_corners=False)
        return render, self.prior.encode_images(images, generator=self.rng)

    def train_step(self) -> StepInfo:
        config, step = self.config, self.step
        if config.blob_fade:  # clamp: never grows back when a run without a second phase is extended past its end
            self.nerf.field.blob_seed.clamp_(max=blob_seed(step, config.distill.t_anneal_step, config.steps))
        self.nerf.update_grid(step, self.rng)
        side = self.resolution(step)
        cameras = sample_cameras(config.batch_size, config.cameras, side, side, self.rng)
        render, x0 = self.render_for_prior(cameras)
        result = distill_step(x0, self.prior, self.phi, self.prompts.conditioning(cameras), config.distill, step,
                              self.rng)
        sparsity = sparsity_loss(render.opacity)
        loss = result.generator_loss + config.lambda_sparsity * sparsity
        extras = {"resolution": float(side), "sparsity": sparsity.item(), "samples": float(render.samples)}
        if step >= config.opacity_entropy_from and config.lambda_opacity_entropy > 0:
            entropy = opacity_entropy(render.opacity)
            loss = loss + config.lambda_opacity_entropy * entropy
            extras["opacity_entropy"] = entropy.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return StepInfo.of(self.step, config.steps, result, extras)

    @torch.no_grad()
    def preview(self, views: int = 4, size: int = 64) -> torch.Tensor:
        """``views`` renders around the object at the evaluation camera, side by side: ``[1, 3, size, views·size]``."""
        render = self.nerf.render(orbit_cameras(views, height=size, width=size), background="white")
        return render.rgb.permute(3, 1, 0, 2).reshape(3, size, views * size).unsqueeze(0)

    def generator_state(self) -> dict[str, torch.Tensor]:
        return self.nerf.state_tensors()

    def load_generator_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.nerf.load_state_tensors(tensors)


def load_nerf(directory: str | os.PathLike, device: str | torch.device | None = None,
              input_name: str = "--checkpoint") -> tuple[NeRFGenerator, TextTo3DConfig, int]:
    """Only the NeRF of a text-to-3d checkpoint (no diffusion model is loaded): ``(nerf, config, step)``."""
    tensors, meta = ckpt.load_checkpoint(directory, input_name=input_name)
    if meta.get("kind") != TextTo3D.kind:
        raise UserInputError(input_name, f"'{directory}' is a {meta.get('kind')} checkpoint, not a text-to-3d one",
                             "give the checkpoint/ folder of a text-to-3d run")
    config = config_from_dict(TextTo3DConfig, meta["config"])
    nerf = NeRFGenerator(config.nerf_field, config.render, device=resolve_device(device))
    nerf.load_state_tensors({k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")})
    return nerf.eval(), config, int(meta["step"])
