"""Cameras for text-to-3D: sampling, look-at poses, rays, view names.

Conventions (the same as threestudio's and the official ASD code's, and the ones the embedded prior's dataset
must use): world up is +z; a camera at elevation e, azimuth a, distance d sits at
``d · (cos e cos a, cos e sin a, sin e)`` and looks at the origin; azimuth 0 (the +x axis) is the *front*.
Camera-to-world matrices are OpenGL-style: columns (right, up, back, position), the camera looks along −z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VIEWS = ("front", "side", "back", "overhead")
OVERHEAD_DEGREES = 60.0  # DreamFusion's: above this elevation a view is "overhead" (a prior's recipe may differ)
MIN_ELEVATION_DEGREES = -10.0  # the official recipe's lowest training camera (a prior's recipe may differ)
MAX_ELEVATION_DEGREES = 45.0  # the official recipe's highest training camera (a prior's recipe may differ)
# How training elevations are drawn between the two limits: "degrees" uniform in the angle, "sphere" uniform over the
# sphere's area (uniform in sin e: fewer views near the top), "mixed" one of the two per batch with probability ½
# (the official ASD code's camera sampler, which is threestudio's). docs/engine.md#recipe-elevation_sampling
ELEVATION_SAMPLINGS = ("mixed", "degrees", "sphere")
ELEVATION_SAMPLING = "mixed"  # the official recipe's (a prior's recipe may differ)


@dataclass
class CameraRanges:
    """Where training cameras are drawn from (official recipe: docs/engine.md#official-recipe). Angles in degrees.
    A text-to-3D run leaves the elevation limits and ``elevation_sampling`` open (``None``) for the prior's recipe to
    fill (docs/engine.md#recipe-min_elevation)."""

    min_elevation: float | None = MIN_ELEVATION_DEGREES
    max_elevation: float | None = MAX_ELEVATION_DEGREES
    elevation_sampling: str | None = ELEVATION_SAMPLING
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (1.0, 1.5)
    fovy: tuple[float, float] = (40.0, 70.0)

    @staticmethod
    def upgrade(saved: dict) -> dict:
        """A stored (``asdict``) form in today's fields: the elevation range once was one pair, and every run
        stored before ``elevation_sampling`` existed drew its elevations uniform in degrees."""
        saved = dict(saved)
        if "elevation" in saved:
            saved["min_elevation"], saved["max_elevation"] = saved.pop("elevation")
        saved.setdefault("elevation_sampling", "degrees")
        return saved


@dataclass
class Cameras:
    """A batch of B pinhole cameras rendering ``height × width`` images."""

    c2w: torch.Tensor        # [B, 4, 4] camera-to-world
    fovy: torch.Tensor       # [B] vertical field of view, radians
    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor    # [B] degrees, in (-180, 180]
    distance: torch.Tensor   # [B]
    height: int
    width: int

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index: int | slice) -> "Cameras":
        """A sub-batch (an int keeps the batch dimension)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return Cameras(self.c2w[index], self.fovy[index], self.elevation[index], self.azimuth[index],
                       self.distance[index], self.height, self.width)

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.elevation.to(device),
                       self.azimuth.to(device), self.distance.to(device), self.height, self.width)

    def with_resolution(self, height: int, width: int) -> "Cameras":
        return Cameras(self.c2w, self.fovy, self.elevation, self.azimuth, self.distance, height, width)

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions, each ``[B, H, W, 3]``, through pixel centres."""
        device = self.c2w.device
        focal = 0.5 * self.height / torch.tan(0.5 * self.fovy)  # [B]
        j, i = torch.meshgrid(torch.arange(self.height, device=device, dtype=torch.float32) + 0.5,
                              torch.arange(self.width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        f = focal.view(-1, 1, 1)
        x, y = (i - 0.5 * self.width) / f, -(j - 0.5 * self.height) / f  # [B, H, W]
        directions = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # camera space, [B, H, W, 3]
        world = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], directions)
        world = world / world.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand_as(world)
        return origins, world

    def embedding(self) -> torch.Tensor:
        """Flattened camera-to-world matrices ``[B, 16]`` (φ's camera condition, as the official code)."""
        return self.c2w.reshape(-1, 16)

    def view_index(self, front_degrees: float = 30.0, back_degrees: float = 30.0,
                   overhead_degrees: float = OVERHEAD_DEGREES) -> torch.Tensor:
        """Index into :data:`VIEWS` per camera ``[B]``: overhead above ``overhead_degrees`` elevation, front within
        ``front_degrees`` of azimuth 0, back within ``back_degrees`` of 180, side otherwise."""
        azimuth = wrap_degrees(self.azimuth)
        index = torch.full_like(azimuth, VIEWS.index("side"), dtype=torch.long)
        index[azimuth.abs() < front_degrees] = VIEWS.index("front")
        index[azimuth.abs() > 180.0 - back_degrees] = VIEWS.index("back")
        index[self.elevation > overhead_degrees] = VIEWS.index("overhead")
        return index


def wrap_degrees(angle: torch.Tensor) -> torch.Tensor:
    """Wrap angles to (-180, 180]."""
    return -((-angle + 180.0) % 360.0 - 180.0)


def look_at(position: torch.Tensor) -> torch.Tensor:
    """Camera positions ``[B, 3]`` → camera-to-world ``[B, 4, 4]`` looking at the origin with +z up."""
    forward = -position / position.norm(dim=-1, keepdim=True)
    up_world = torch.tensor([0.0, 0.0, 1.0], device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, up_world, dim=-1)
    # straight above/below the origin the world up is parallel to the view direction: use +x as "right"
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([0.0, 1.0, 0.0], device=position.device).expand_as(right), right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, device=position.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -forward, position
    c2w[:, 3, 3] = 1.0
    return c2w


def cameras_from_angles(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor,
                        fovy_degrees: torch.Tensor, height: int, width: int) -> Cameras:
    """Cameras from per-camera angles in degrees (all ``[B]``)."""
    e, a = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    position = torch.stack([distance * torch.cos(e) * torch.cos(a), distance * torch.cos(e) * torch.sin(a),
                            distance * torch.sin(e)], dim=-1)
    return Cameras(look_at(position), torch.deg2rad(fovy_degrees), elevation, wrap_degrees(azimuth), distance,
                   height, width)


def sample_cameras(batch: int, ranges: CameraRanges, height: int, width: int,
                   generator: torch.Generator) -> Cameras:
    """Random training cameras: elevation between its limits as ``ranges.elevation_sampling`` says, distance and fov
    uniform, azimuth stratified over the batch (each camera in its own 1/B slice of the range), all drawn from
    ``generator``."""
    def uniform(low_high: tuple[float, float]) -> torch.Tensor:
        low, high = low_high
        return low + (high - low) * torch.rand(batch, generator=generator)

    if ranges.min_elevation is None or ranges.max_elevation is None or ranges.elevation_sampling is None:
        raise ValueError("CameraRanges is open: resolve the run's settings first (runs.plan)")
    elevation = sample_elevations(torch.rand(batch, generator=generator), ranges, generator)
    distance, fovy = uniform(ranges.distance), uniform(ranges.fovy)
    low, high = ranges.azimuth
    azimuth = low + (high - low) * (torch.rand(batch, generator=generator) + torch.arange(batch)) / batch
    return cameras_from_angles(elevation, azimuth, distance, fovy, height, width)


def sample_elevations(u: torch.Tensor, ranges: CameraRanges, generator: torch.Generator) -> torch.Tensor:
    """Elevations in degrees ``[B]`` from uniform draws ``u [B]`` in [0, 1): uniform in the angle, or by inverse
    transform uniform in sin e (equal area on the sphere), or per batch one of the two ("mixed", a coin drawn from
    ``generator``)."""
    low, high = ranges.min_elevation, ranges.max_elevation
    sampling = ranges.elevation_sampling
    if sampling == "mixed":
        sampling = "degrees" if torch.rand(1, generator=generator).item() < 0.5 else "sphere"
    if sampling == "degrees":
        return low + (high - low) * u
    if sampling == "sphere":
        sin_low, sin_high = math.sin(math.radians(low)), math.sin(math.radians(high))
        return torch.rad2deg(torch.asin(sin_low + (sin_high - sin_low) * u))
    raise ValueError(f"elevation_sampling '{ranges.elevation_sampling}' is not one of {ELEVATION_SAMPLINGS}")


def orbit_cameras(count: int, elevation: float = 15.0, distance: float = 1.5, fovy: float = 70.0,
                  height: int = 256, width: int = 256, start_azimuth: float = 0.0) -> Cameras:
    """``count`` cameras evenly around the up axis (turntables, evaluation; official eval: 15°, 1.5, 70°)."""
    azimuth = start_azimuth + torch.arange(count, dtype=torch.float32) * (360.0 / count)
    full = lambda v: torch.full((count,), float(v))  # noqa: E731
    return cameras_from_angles(full(elevation), azimuth, full(distance), full(fovy), height, width)

