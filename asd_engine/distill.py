"""SDS, VSD and Adversarial Score Distillation (ASD): the math, in one code path.

Notation as in the ASD supplement (Alg. 1, Eq. 3 and 5): ``x_t = alpha_t x0 + sigma_t eps``; ``eps_y`` the prior's
conditional prediction, ``eps_cfg = eps_u + s (eps_y - eps_u)`` its guided prediction, ``eps_phi`` φ's prediction.

- Generator (Eq. 3): ``grad_x0 = w(t) (eps_cfg - eps_phi)``; SDS sets ``eps_phi := eps``. Applied as the surrogate
  loss ``0.5 Σ (x0 - sg(x0 - grad))² / B`` so that autograd carries it through ``∂x0/∂θ``.
- φ (L'_D, the text-only upper bound): ``‖phi - target‖² + γ ‖phi - prior_cond‖²`` in the model's native
  prediction space (ε or v, as the official code), mean-reduced. γ = 0 is VSD's LoRA loss, so VSD *is* ASD
  with γ = 0 (one code path; the γ term's extra UNet call is skipped when it is multiplied by zero).
- With real samples (reference images) the full L_D of Eq. 5 adds ``- ‖phi_r - target_r‖² + η ‖phi_r - prior_r‖²``.
  Note: with the paper's η = 1/2 this term is not bounded below in ``phi_r``; keep reference runs short or raise η.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("asd", "vsd", "sds")
WEIGHTINGS = ("sds", "uniform", "sigma_over_alpha")
PHI_NOISE = ("fresh", "shared")


@dataclass
class DistillConfig:
    """Distillation settings; defaults: the official ASD configs (docs/engine.md#official-recipe). ASD and VSD share
    all but γ. ``None`` (CFG, γ, w(t), t range): "from the prior's recipe" (:mod:`asd_engine.prior.recipe`), filled
    when a run is built."""

    method: str = "asd"
    guidance_scale: float | None = None   # None: the prior's recipe (official: 7.5)
    gamma: float | None = None    # ASD's γ in L'_D (None: the prior's recipe, official -0.75); VSD is γ = 0
    eta: float = 0.5              # η of the real-sample term (Eq. 5), used only with reference images
    weighting: str | None = None  # w(t): sds 1-ᾱ_t, uniform 1, sigma_over_alpha √((1-ᾱ_t)/ᾱ_t); None: the recipe
    t_min: float | None = None    # generator timesteps are uniform integers in [t_min·T, t_max(step)·T] (official
    t_max: float | None = None    # 0.02 and 0.98; None: the prior's recipe)
    t_max_annealed: float = 0.5   # t_max from step `t_anneal_step` on (official 3D recipe: 980 → 500 at step 5000)
    t_anneal_step: int | None = None  # absolute step, so a resumed or extended run keeps the same schedule
    guidance_scale_annealed: float | None = None  # CFG from `t_anneal_step` on; None once resolved: the CFG holds
    phi_noise: str | None = None  # "fresh": φ draws its own t', eps' (official); "shared": reuses t, eps; None: recipe

    @property
    def uses_phi(self) -> bool:
        return self.method != "sds"


def time_schedule(step: int, config: DistillConfig, num_train_timesteps: int) -> tuple[int, int]:
    """Inclusive integer timestep range ``(lo, hi)`` for the generator at ``step`` (0-based)."""
    annealed = config.t_anneal_step is not None and step >= config.t_anneal_step
    t_max = config.t_max_annealed if annealed else config.t_max
    top = num_train_timesteps - 1
    return int(config.t_min * num_train_timesteps), min(int(t_max * num_train_timesteps), top)


def guidance_schedule(step: int, config: DistillConfig) -> float:
    """The CFG scale at ``step`` (0-based): ``guidance_scale_annealed`` from ``t_anneal_step`` on, when it is set.
    Guidance sets the size of what the prior draws, and a run grows towards it in the second phase
    (docs/quality.md#cfg-annealed)."""
    annealed = config.t_anneal_step is not None and step >= config.t_anneal_step
    if annealed and config.guidance_scale_annealed is not None:
        return config.guidance_scale_annealed
    return config.guidance_scale


def loss_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) as ``[B, 1, 1, 1]`` for integer timesteps ``t [B]``."""
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    if weighting == "sds":
        return 1.0 - abar
    if weighting == "uniform":
        return torch.ones_like(abar)
    return ((1.0 - abar) / abar.clamp_min(1e-8)).sqrt()


def generator_gradient(eps_cfg: torch.Tensor, eps_phi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``w(t) (eps_cfg - eps_phi)``, NaNs/infs zeroed as the official code does."""
    return torch.nan_to_num(weight * (eps_cfg - eps_phi), nan=0.0, posinf=0.0, neginf=0.0)


def surrogate_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 Σ (x0 - sg(x0 - grad))² / B``: its gradient w.r.t. ``x0`` is ``grad / B``."""
    target = (x0 - grad).detach()
    return 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]


def discriminator_loss(phi_fake: torch.Tensor, target_fake: torch.Tensor, prior_fake: torch.Tensor | None,
                       gamma: float, phi_real: torch.Tensor | None = None, target_real: torch.Tensor | None = None,
                       prior_real: torch.Tensor | None = None, eta: float = 0.5) -> torch.Tensor:
    """L'_D, or the full L_D of Eq. 5 when the real-sample tensors are given. All ``[B, C, h, w]``, native space."""
    loss = F.mse_loss(phi_fake, target_fake)
    if gamma != 0.0:
        loss = loss + gamma * F.mse_loss(phi_fake, prior_fake)
    if phi_real is not None:
        loss = loss - F.mse_loss(phi_real, target_real) + eta * F.mse_loss(phi_real, prior_real)
    return loss


@dataclass
class Conditioning:
    """Text conditioning of one step: ``cond``/``uncond`` ``[B, L, D]`` for the prior, ``camera [B, 16]`` for φ,
    optional Perp-Neg ``negatives [B, K, L, D]`` with ``negative_weights [B, K]``."""

    cond: torch.Tensor
    uncond: torch.Tensor
    camera: torch.Tensor | None = None
    negatives: torch.Tensor | None = None
    negative_weights: torch.Tensor | None = None


@dataclass
class StepResult:
    generator_loss: torch.Tensor    # scalar surrogate loss (backward it to update the generator)
    phi_loss: torch.Tensor | None   # scalar, detached (φ was already updated), None for SDS
    t: torch.Tensor                 # [B] generator timesteps
    grad_norm: float                # ‖grad‖ of Eq. 3 over the batch
    phi_drift: float | None = None  # ‖eps_phi - eps_prior_cond‖/‖eps_prior_cond‖ at x_t (free: both are computed);
    # 0 means φ is still the prior, and ASD's γ term does nothing


def sample_timesteps_and_noise(shape: torch.Size, lo: int, hi: int, generator: torch.Generator,
                               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``t [B]`` uniform in ``[lo, hi]`` and ``eps`` of ``shape``, drawn on the CPU ``generator`` so that a
    run's random stream does not depend on the device."""
    t = torch.randint(lo, hi + 1, (shape[0],), generator=generator).to(device)
    return t, torch.randn(shape, generator=generator).to(device)


def distill_step(x0: torch.Tensor, prior, phi, conditioning: Conditioning, config: DistillConfig, step: int,
                 generator: torch.Generator, reference: torch.Tensor | None = None) -> StepResult:
    """One step of Alg. 1 on the rendered/optimised ``x0 [B, C, h, w]`` (model space, differentiable). Updates φ in
    place (step 7), returns the generator's surrogate loss (step 6) for the caller to backward.
    ``reference [B, C, h, w]``: real samples in model space; enables the full L_D."""
    if None in (config.guidance_scale, config.t_min, config.t_max, config.gamma, config.weighting, config.phi_noise):
        raise ValueError("distill_step needs a resolved config: use settings.with_recipe(config, prior.recipe)")
    lo, hi = time_schedule(step, config, prior.num_train_timesteps)
    t, eps = sample_timesteps_and_noise(x0.shape, lo, hi, generator, x0.device)
    x0_detached = x0.detach()
    x_t = prior.add_noise(x0_detached, eps, t)
    gamma = config.gamma  # 0 unless ASD: settings.resolve applies the method rules
    with torch.no_grad():
        eps_cfg, prior_cond = prior.guided(x_t, t, conditioning.cond, conditioning.uncond,
                                           guidance_schedule(step, config),
                                           conditioning.negatives, conditioning.negative_weights)
    camera = conditioning.camera
    phi_loss = None
    if not config.uses_phi:
        eps_phi = eps
    else:
        # φ may sit on a second model (the official recipe: SD2.1-768 v for φ, SD2.1-base for the prior). Its outputs
        # and targets are in its own native space; the γ term then compares with its own base model, as theirs does.
        phi_prior = phi.prior
        separate = phi_prior is not prior
        if config.phi_noise == "shared":
            t2, eps2, x_t2, prior2 = t, eps, x_t, None if separate else prior_cond
        else:
            with torch.no_grad():
                eps_phi = phi_prior.to_eps(phi.model_output(x_t, t, camera), x_t, t)
            t2, eps2 = sample_timesteps_and_noise(x0.shape, 0, prior.num_train_timesteps - 1, generator, x0.device)
            x_t2, prior2 = prior.add_noise(x0_detached, eps2, t2), None
        target2 = phi_prior.training_target(x0_detached, eps2, t2)
        batch, x_phi, t_phi, cam_phi = x0.shape[0], x_t2, t2, camera
        if reference is not None:  # Eq. 5's real terms: same t and eps on the real samples, one φ forward
            x_r = prior.add_noise(reference, eps2, t2)
            x_phi, t_phi = torch.cat([x_t2, x_r]), torch.cat([t2, t2])
            cam_phi = None if camera is None else torch.cat([camera, torch.zeros_like(camera)])
        with torch.no_grad():  # the prior's conditional prediction where the γ/η terms need it and it is missing
            need = ([] if gamma == 0.0 or prior2 is not None else [x_t2]) + ([] if reference is None else [x_r])
            if need:
                x_need, t_need = torch.cat(need), torch.cat([t2] * len(need))
                extra = (phi.base_output(x_need, t_need) if separate else prior.model_output(
                    x_need, t_need, conditioning.cond.expand(batch, -1, -1).repeat(len(need), 1, 1)))
                if gamma != 0.0 and prior2 is None:
                    prior2, extra = extra[:batch], extra[batch:]
                prior_real = extra if reference is not None else None

        def loss_fn(out: torch.Tensor) -> torch.Tensor:
            if reference is None:
                return discriminator_loss(out, target2, prior2, gamma)
            return discriminator_loss(out[:batch], target2, prior2, gamma, out[batch:],
                                      phi_prior.training_target(reference, eps2, t2), prior_real, config.eta)

        phi_out, phi_loss = phi.train_step(x_phi, t_phi, loss_fn, cam_phi, generator)
        if config.phi_noise == "shared":
            eps_phi = phi_prior.to_eps(phi_out[:batch], x_t, t)
    grad = generator_gradient(eps_cfg, eps_phi, loss_weight(prior.alphas_cumprod, t, config.weighting))
    drift = None  # φ on a second model has another base: no like-for-like drift
    if config.uses_phi and phi.prior is prior:
        drift = float((eps_phi - (e := prior.to_eps(prior_cond, x_t, t))).norm() / e.norm().clamp_min(1e-12))
    return StepResult(surrogate_loss(x0, grad), phi_loss, t, float(grad.norm()), drift)
