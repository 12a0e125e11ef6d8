"""asd_engine: Adversarial Score Distillation (ASD, CVPR 2024) with SDS and VSD baselines, in pure PyTorch.

The engine never imports ComfyUI; the node pack (``nodes/``) adapts it. Library entry points:

- :func:`asd_engine.runs.plan.plan_run` — describe a 2D or 3D run (CLI and nodes build theirs the same way).
- :class:`asd_engine.prior.diffusion.DiffusionPrior` — a frozen diffusers pipeline (ε- or v-prediction, latent or pixel).
- :func:`asd_engine.prior.discriminator.build_discriminator` — φ as LoRA or textual inversion on that prior.
- :func:`asd_engine.distill.distill_step` — one SDS/VSD/ASD step (the math lives in ``distill.py``).
- :class:`asd_engine.runs.distill_2d.Distill2D`, :class:`asd_engine.runs.text_to_3d.TextTo3D` — whole runs with exact
  checkpoints; every setting is one row of :mod:`asd_engine.runs.settings`.

Heavy libraries (diffusers, transformers) load when a command needs a model, not for ``--help``.
"""

__version__ = "0.1.0"
