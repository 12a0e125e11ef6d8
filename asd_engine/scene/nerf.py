"""The 3D generator θ: a NeRF (hash-grid field + background) rendered through an occupancy grid.

``NeRFGenerator.render(cameras)`` returns image-shaped RGB, opacity, depth and (optionally) normals for a batch of
cameras; it is differentiable w.r.t. the field and background parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .cameras import Cameras
from .field import Background, FieldConfig, NeRFField
from .render import OccupancyGrid, RenderConfig, march, volume_render


@dataclass
class NeRFRender:
    """Image-shaped outputs for B cameras of H × W."""

    rgb: torch.Tensor        # [B, H, W, 3] composited over the background, in [0, 1]
    opacity: torch.Tensor    # [B, H, W, 1]
    depth: torch.Tensor      # [B, H, W, 1] (0 where nothing was hit)
    normals: torch.Tensor | None  # [B, H, W, 3] world-space unit normals (zero where empty), when asked for
    background: torch.Tensor  # [B, H, W, 3] the background that was composited
    samples: int             # field evaluations made


class NeRFGenerator(nn.Module):
    """Field + background + occupancy grid, with the render settings that go with them."""

    def __init__(self, field_config: FieldConfig, render_config: RenderConfig,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.field_config, self.render_config = field_config, render_config
        self.field = NeRFField(field_config, device=device)
        self.background = Background(field_config.background_hidden_dim).to(device)
        self.grid = OccupancyGrid(field_config.radius, render_config.grid_resolution).to(device)
        # marching step: `samples_per_ray` steps across the scene cube's diagonal
        self.step_size = 2.0 * math.sqrt(3.0) * field_config.radius / render_config.samples_per_ray

    @property
    def device(self) -> torch.device:
        return self.grid.occupancy.device

    def step_alpha(self, density: torch.Tensor) -> torch.Tensor:
        """Alpha ``1 − e^(−σ·step)`` of one marching step through ``density [...]`` (same shape): what the
        renderer compares with ``render_config.alpha_threshold`` to draw a sample or skip it."""
        return 1.0 - torch.exp(-density * self.step_size)

    def parameter_groups(self, lr_grid: float, lr_mlp: float, lr_background: float) -> list[dict]:
        """Optimiser groups with the recipe's learning rates (hash grid, MLP heads, background)."""
        return [{"params": list(self.field.encoding.parameters()), "lr": lr_grid, "name": "grid"},
                {"params": list(self.field.density_head.parameters()) + list(self.field.color_head.parameters()),
                 "lr": lr_mlp, "name": "mlp"},
                {"params": list(self.background.parameters()), "lr": lr_background, "name": "background"}]

    def update_grid(self, step: int, generator: torch.Generator) -> None:
        """Refresh the occupancy grid every ``grid_update_every`` steps (call at every training step)."""
        if step % self.render_config.grid_update_every == 0:
            self.grid.update(self.field.density, self.step_size, step, self.render_config, generator)

    def render(self, cameras: Cameras, generator: torch.Generator | None = None, training: bool = False,
               with_normals: bool = False, background: str | torch.Tensor = "learned") -> NeRFRender:
        """Render ``cameras``. ``training`` jitters the marching and (with probability ``background_random_prob``)
        replaces the background by a random solid colour per image, drawn from ``generator``. ``background`` is
        "learned", "white", "black" or a colour tensor ``[3]``."""
        cameras = cameras.to(self.device)
        origins, directions = cameras.rays()                                     # [B, H, W, 3]
        b, h, w = origins.shape[:3]
        o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
        keep, t_starts, t_ends = march(o, d, self.grid, self.step_size, self.render_config,
                                       density_fn=self.field.density, generator=generator, stratified=training)
        rays = volume_render(self.field, o, d, keep, t_starts, t_ends, with_normals=with_normals,
                             checkpoint_rays=self.render_config.checkpoint_rays if training else 0)
        bg = self._background(d, b, h, w, generator, training, background)
        rgb = rays.rgb.view(b, h, w, 3) + (1.0 - rays.opacity.view(b, h, w, 1)) * bg
        normals = None
        if rays.normals is not None:
            normals = torch.nn.functional.normalize(rays.normals, dim=-1).view(b, h, w, 3)
        return NeRFRender(rgb=rgb, opacity=rays.opacity.view(b, h, w, 1), depth=rays.depth.view(b, h, w, 1),
                          normals=normals, background=bg, samples=rays.samples)

    def _background(self, directions: torch.Tensor, b: int, h: int, w: int, generator: torch.Generator | None,
                    training: bool, background: str | torch.Tensor) -> torch.Tensor:
        if isinstance(background, torch.Tensor):
            return background.to(self.device).view(1, 1, 1, 3).expand(b, h, w, 3)
        if background in ("white", "black"):
            return torch.full((b, h, w, 3), 1.0 if background == "white" else 0.0, device=self.device)
        learned = self.background(directions).view(b, h, w, 3)
        if training and self.render_config.background_random_prob > 0:
            replace = torch.rand(b, generator=generator) < self.render_config.background_random_prob
            colours = torch.rand(b, 3, generator=generator)
            if replace.any():
                solid = colours.to(self.device).view(b, 1, 1, 3).expand(b, h, w, 3)
                learned = torch.where(replace.to(self.device).view(b, 1, 1, 1), solid, learned)
        return learned

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of θ, with the hash table in the portable [entries, features] layout of the torch backend."""
        state = {k: v for k, v in self.state_dict().items()}
        if self.field.backend == "tcnn":
            flat = state.pop("field.encoding.encoding.params")
            state["field.encoding.params"] = flat.view(-1, self.field_config.n_features_per_level)
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        tensors.setdefault("field.blob_seed", torch.ones(()))  # saved before the blob could fade: the permanent blob
        if self.field.backend == "tcnn":
            tensors["field.encoding.encoding.params"] = tensors.pop("field.encoding.params").reshape(-1)
        self.load_state_dict({k: v.to(self.device) for k, v in tensors.items()})
