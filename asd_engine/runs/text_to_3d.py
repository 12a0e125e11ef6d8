"""Text-to-3D: optimise a NeRF with SDS / VSD / ASD from a diffusion prior.

One step (Alg. 1): sample cameras → render (jittered marching, random solid backgrounds) → resize to the prior's
resolution → encode (VAE posterior sample, gradients through the encoder) → :func:`distill.distill_step` with the
view-dependent prompt (φ gets the camera) → + regularisers (sparsity, opacity entropy, haze) → backward → Adam.

Presets: ``quality`` is the official ASD recipe (GPU, frozen models in fp16), ``low-vram`` keeps its 64 → 512 px
schedule and adds VAE-encoder checkpointing, a smaller table, chunked marching and chunk-checkpointed renders;
``toy-cpu`` is
a small grid at the prior's low resolution that finishes a short run on two CPU cores in minutes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..devices import resolve_device
from ..distill import distill_step
from ..errors import UserInputError
from ..prior.prompts import ViewPrompts
from ..scene.cameras import orbit_cameras, sample_cameras
from ..scene.field import runnable_backend
from ..scene.nerf import NeRFGenerator, NeRFRender
from . import checkpoint as ckpt
from .base import DistillationRun, StepInfo, lr_factor
from .configs import TextTo3DConfig, config_from_dict


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """Mean √(opacity² + 0.01) of ``opacity [B, H, W, 1]``: a smooth L1 pull towards empty space."""
    return (opacity.square() + 0.01).sqrt().mean()


# random points of the scene cube per step for the haze term (a few % of a toy-cpu step's samples)
HAZE_POINTS = 4096


def haze_loss(nerf: NeRFGenerator, generator: torch.Generator, points: int = HAZE_POINTS) -> torch.Tensor:
    """Mean alpha (1 − e^(−σ·step)) of the density too faint to be drawn, at ``points`` uniform random points of
    the scene cube: points at or above the renderer's alpha threshold count 0.

    The marcher drops samples below that threshold, so no rendering loss reaches them: the sparsity term pushes haze
    just under it and leaves it there, unseen in renders but kept in the field (docs/text_to_3d.md#lambda-haze).
    """
    x = (torch.rand(points, 3, generator=generator) * 2.0 - 1.0) * nerf.field_config.radius   # [points, 3]
    # the density MLP, shared by every point, is held still: through it the term reshaped the object
    # (docs/text_to_3d.md#lambda-haze)
    alpha = nerf.step_alpha(nerf.field.density(x.to(nerf.device), head_grad=False))                   # [points]
    faint = alpha.detach() < nerf.render_config.alpha_threshold
    return (alpha * faint).sum() / points


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
        self.prior_resolution = config.prior_resolution or prior.native_size
        prior.check_image_size(self.prior_resolution, input_name="model")
        self.nerf = NeRFGenerator(config.nerf_field, config.render, device=prior.device)
        groups = self.nerf.parameter_groups(config.lr_grid, config.lr_mlp, config.lr_background)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # before a checkpoint's are loaded
        self.prompts = ViewPrompts(prior, config.prompt, config.negative_prompt,
                                   view_dependent=config.view_dependent_prompts, perp_neg=config.perp_neg,
                                   overhead_elevation=config.overhead_elevation)

    def lr_falls_from(self) -> int:
        """The second phase's start (step 0 without one): the first phase makes the shape at the full rates."""
        return self.config.distill.t_anneal_step or 0

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
        if images.shape[-1] > self.prior_resolution:  # box-filtered, as the toy prior's training renders were made
            images = F.interpolate(images, size=(self.prior_resolution,) * 2, mode="area")
        elif images.shape[-1] < self.prior_resolution:
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
        if render.samples == 0 and not getattr(self, "_warned_empty", False):
            import warnings

            self._warned_empty = True  # once per run: an emptied field stays empty, every later step would repeat it
            warnings.warn(f"step {step + 1} of {config.steps}: the NeRF is empty (its density is below what the "
                          "renderer draws everywhere, so every sample was pruned); a field without samples gets no "
                          "gradient, so training now only changes the background and the views will show nothing "
                          "but it; the run goes on. Start again with another seed, a lower sparsity weight or a "
                          "clearer prompt", stacklevel=2)
        if step >= config.opacity_entropy_from and config.lambda_opacity_entropy > 0:
            entropy = opacity_entropy(render.opacity)
            loss = loss + config.lambda_opacity_entropy * entropy
            extras["opacity_entropy"] = entropy.item()
        if config.lambda_haze > 0:  # no draw from the run's generator without it: older runs keep their stream
            haze = haze_loss(self.nerf, self.rng)
            loss = loss + config.lambda_haze * haze
            extras["haze"] = haze.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        factor = lr_factor(step, config.steps, config.lr_decay_to, start=self.lr_falls_from())
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):  # a function of the step alone
            group["lr"] = base * factor
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
              input_name: str = "checkpoint") -> tuple[NeRFGenerator, TextTo3DConfig, int]:
    """Only the NeRF of a text-to-3d checkpoint (no diffusion model is loaded): ``(nerf, config, step)``. The
    checkpoint is untrusted input: a damaged or mismatched one is a :class:`UserInputError` naming ``input_name``."""
    tensors, meta = ckpt.load_checkpoint(directory, input_name=input_name, run=True)
    if meta["kind"] != TextTo3D.kind:
        raise UserInputError(input_name, f"'{directory}' is a {meta['kind']} checkpoint, not a text-to-3d one",
                             "give the checkpoint/ folder of a text-to-3d run")
    ckpt.check_config(TextTo3DConfig, meta["config"], directory, input_name)
    config = config_from_dict(TextTo3DConfig, meta["config"])
    config.nerf_field.backend = runnable_backend(config.nerf_field.backend)
    with ckpt.built_from(directory, input_name, "a NeRF"):
        nerf = NeRFGenerator(config.nerf_field, config.render, device=resolve_device(device))
    generator = {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")}
    expected = nerf.state_tensors()
    why = ckpt.state_mismatch(expected, generator, shapes_only=True)
    if why is None:
        try:
            nerf.load_state_tensors(generator)
        except (RuntimeError, KeyError, ValueError) as exc:  # names that differ (another preset's, or a 2D run's)
            why = ckpt.state_mismatch(expected, generator) or " ".join(str(exc).split())
    if why is not None:
        raise ckpt.state_does_not_fit(directory, input_name, why)
    return nerf.eval(), config, meta["step"]
