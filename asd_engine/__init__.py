"""asd_engine: Adversarial Score Distillation (ASD, CVPR 2024) with SDS and VSD baselines, in pure PyTorch.

The engine never imports ComfyUI; the node pack (``nodes/``) adapts it. Library entry points:

- :class:`asd_engine.prior.DiffusionPrior` — a frozen diffusers pipeline (ε- or v-prediction, latent or pixel).
- :func:`asd_engine.discriminator.build_discriminator` — φ as LoRA or textual inversion on that prior.
- :func:`asd_engine.distill.distill_step` — one SDS/VSD/ASD step (the math lives in ``distill.py``).
- :class:`asd_engine.distill_2d.Distill2D` — a whole 2D distillation run with exact checkpoints.

Submodules are imported lazily so that ``python -m asd_engine --help`` and input checks stay fast.
"""

__version__ = "0.1.0"
