"""Loading a prior from any path a user gives: a diffusers pipeline folder or a single-file checkpoint.

The one-way layering is ``prior`` (the interface and folder loading) ← ``single_file`` (LDM-layout files) ←
``loading`` (this module, which picks between them); nothing lower imports anything higher.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserInputError
from .diffusion import DiffusionPrior
from .single_file import PREDICTION_CHOICES, is_single_file, load_single_file


def load_prior(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
               input_name: str = "model", prediction_type: str = "auto") -> DiffusionPrior:
    """A diffusers pipeline folder, or a single-file SD 1.x/2.x ``.safetensors`` checkpoint; offline.

    ``prediction_type`` ("auto", "epsilon", "v_prediction") overrides what the model says about itself.
    """
    if prediction_type not in PREDICTION_CHOICES:
        raise UserInputError("prediction_type", f"'{prediction_type}' is not a prediction type",
                             f"use one of {', '.join(PREDICTION_CHOICES)}")
    if is_single_file(path):
        return load_single_file(path, prediction_type, device=device, dtype=dtype, input_name=input_name)
    prior = DiffusionPrior.from_pretrained(path, device=device, dtype=dtype, input_name=input_name)
    if prediction_type != "auto" and prediction_type != prior.prediction_type:
        prior.prediction_type = prediction_type
        prior.detected = f"{Path(path).name}: {prediction_type} (set by the user; the folder says otherwise)"
    return prior
