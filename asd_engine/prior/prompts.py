"""Text conditioning for text-to-3D: view-dependent prompts and Perp-Neg.

View-dependent prompting (DreamFusion) appends ", front view" / ", side view" / ", back view" / ", overhead view"
to the prompt according to each training camera (thresholds in :meth:`Cameras.view_index`; the overhead elevation is
the prior's recipe value: DreamFusion's 60° for Stable Diffusion). φ always sees the
view-independent prompt and the camera (official ASD recipe).

Perp-Neg (Armandpour et al. 2023) reduces the "Janus" problem: the positive embedding interpolates between the
neighbouring views, and the two other views act as negative prompts whose guidance direction is only applied
perpendicular to the positive one. The interpolation rule and the shifted-exponential weights are those of
threestudio's implementation (Apache-2.0); the perpendicular projection is computed per sample here.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..distill import Conditioning
from ..scene.cameras import OVERHEAD_DEGREES, VIEWS, Cameras, wrap_degrees
from .diffusion import DiffusionPrior

VIEW_SUFFIX = {view: f", {view} view" for view in VIEWS}
# shifted exponential decay a·exp(-b·r) + c, per neighbour pair (threestudio's defaults)
PERP_NEG_FRONT_SIDE = (4.0, 0.5, -2.426)
PERP_NEG_SIDE_FRONT = (4.0, 0.5, -2.426)
PERP_NEG_SIDE_BACK = (1.0, 0.5, -0.606)
PERP_NEG_FRONT_SIDE_BACK = (1.0, 0.5, 0.967)


def _decay(params: tuple[float, float, float], r: float) -> float:
    a, b, c = params
    return a * math.exp(-b * r) + c


class ViewPrompts:
    """Encodes the prompt once per view and builds each step's :class:`Conditioning` from the cameras."""

    def __init__(self, prior: DiffusionPrior, prompt: str, negative_prompt: str = "",
                 view_dependent: bool = True, perp_neg: bool = False,
                 overhead_elevation: float = OVERHEAD_DEGREES) -> None:
        """``overhead_elevation``: cameras above it (degrees) get the overhead prompt (the prior's recipe value)."""
        self.view_dependent, self.perp_neg = view_dependent, perp_neg
        self.overhead_elevation = overhead_elevation
        self.base = prior.encode_prompt([prompt])                                       # [1, L, D]
        if view_dependent and not prior.cut_text(prompt):  # a cut prompt has been named once already
            cut = {v: prior.cut_text(prompt + VIEW_SUFFIX[v]) for v in VIEWS}
            if any(cut.values()):  # the suffixes go last: the model never learns which view it sees
                longest = max(cut.values(), key=len)
                warnings.warn(f"the prompt '{prompt}' leaves no room in the model's text window of "
                              f"{prior.tokenizer.model_max_length} tokens for its view suffixes: '{longest}' is cut "
                              "off, so view-dependent prompting has no effect for some views; shorten the prompt",
                              stacklevel=2)
        self.views = prior.encode_prompt([prompt + VIEW_SUFFIX[v] for v in VIEWS], warn=False)  # [4, L, D]
        self.uncond = prior.encode_prompt([negative_prompt])                            # [1, L, D]
        self.prompts = {v: prompt + VIEW_SUFFIX[v] for v in VIEWS}

    def conditioning(self, cameras: Cameras) -> Conditioning:
        batch = len(cameras)
        camera = cameras.embedding().to(self.base.device)
        uncond = self.uncond.expand(batch, -1, -1)
        if not self.view_dependent:
            return Conditioning(self.base.expand(batch, -1, -1), uncond, camera)
        index = cameras.view_index(overhead_degrees=self.overhead_elevation).to(self.views.device)
        if not self.perp_neg:
            return Conditioning(self.views[index], uncond, camera)
        positives, negatives, weights = [], [], []
        front, side, back, overhead = self.views
        for view, azimuth in zip(index.tolist(), wrap_degrees(cameras.azimuth).abs().tolist()):
            if view == VIEWS.index("overhead"):
                positives.append(overhead)
                negatives += [self.uncond[0], self.uncond[0]]
                weights += [0.0, 0.0]
            elif azimuth < 90.0:  # between front (0°) and side (90°)
                r = 1.0 - azimuth / 90.0
                positives.append(r * front + (1.0 - r) * side)
                negatives += [front, side]
                weights += [-_decay(PERP_NEG_FRONT_SIDE, r), -_decay(PERP_NEG_SIDE_FRONT, 1.0 - r)]
            else:  # between side (90°) and back (180°)
                r = 2.0 - azimuth / 90.0
                positives.append(r * side + (1.0 - r) * back)
                negatives += [side, front]
                weights += [-_decay(PERP_NEG_SIDE_BACK, r), -_decay(PERP_NEG_FRONT_SIDE_BACK, r)]
        return Conditioning(torch.stack(positives), uncond, camera,
                            negatives=torch.stack(negatives).view(batch, 2, *self.base.shape[1:]),
                            negative_weights=torch.tensor(weights, device=self.base.device).view(batch, 2))
