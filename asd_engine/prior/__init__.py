"""The frozen diffusion prior and what lives on it.

- :mod:`.diffusion`: :class:`~.diffusion.DiffusionPrior`, one small interface over a diffusers pipeline (prompts,
  latents, noise predictions with CFG, α/σ); ε- and v-prediction are converted here and nowhere else.
- :mod:`.loading`, :mod:`.single_file`: pipeline folders and single-file checkpoints, offline.
- :func:`default_prior_path`: the embedded toy prior's folder, the default model everywhere.
- :mod:`.recipe`: the prior's own distillation defaults (``asd_recipe.json``).
- :mod:`.discriminator`: φ, a LoRA or textual-inversion tokens on the prior's UNet.
- :mod:`.prompts`: view-dependent prompts; :mod:`.tiny_pipeline`: tiny random SD-architecture pipelines for tests.
"""

from pathlib import Path

# The embedded toy prior ships in the package's assets; it is every front door's default model.
EMBEDDED_PRIOR = Path(__file__).resolve().parents[1] / "assets" / "toy-prior"


def default_prior_path() -> Path:
    """The embedded prior's folder (the default model); its trainer lives in :mod:`asd_engine.toy`."""
    return EMBEDDED_PRIOR
