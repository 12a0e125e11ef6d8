"""Closed-form checks of the SDS / VSD / ASD math (Eq. 3, L'_D, Eq. 5) and of one full distillation step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asd_engine.prior.discriminator import PhiConfig, build_discriminator
from asd_engine.distill import (Conditioning, DistillConfig, discriminator_loss, distill_step, generator_gradient,
                                guidance_schedule, loss_weight, sample_timesteps_and_noise, surrogate_loss,
                                time_schedule)
from asd_engine.errors import UserInputError
from asd_engine.prior.diffusion import DiffusionPrior
from asd_engine.runs.settings import with_recipe

PROMPT = "a red cube"


def official_config(**fields) -> DistillConfig:
    """A distillation config resolved with the official recipe (what a run on Stable Diffusion gets)."""
    return with_recipe(DistillConfig(**fields))


def _setup(prior, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((batch, *prior.sample_shape(32)), generator=g).requires_grad_(True)
    cond = Conditioning(prior.encode_prompt([PROMPT]).expand(batch, -1, -1),
                        prior.encode_prompt([""]).expand(batch, -1, -1))
    return x0, cond


def _replay(rng_state, x0, prior, config, step=0):
    """Redraw the generator step's (t, eps) and the φ step's fresh (t', eps') from a saved RNG state."""
    g = torch.Generator()
    g.set_state(rng_state)
    lo, hi = time_schedule(step, config, prior.num_train_timesteps)
    t, eps = sample_timesteps_and_noise(x0.shape, lo, hi, g, x0.device)
    t2, eps2 = sample_timesteps_and_noise(x0.shape, 0, prior.num_train_timesteps - 1, g, x0.device)
    return t, eps, t2, eps2


def test_surrogate_loss_gradient_is_the_given_gradient_over_batch():
    x0 = torch.randn(3, 4, 8, 8, requires_grad=True)
    grad = torch.randn(3, 4, 8, 8)
    loss = surrogate_loss(x0, grad)
    loss.backward()
    assert torch.allclose(x0.grad, grad / 3, atol=1e-6)
    assert torch.allclose(loss, 0.5 * grad.square().sum() / 3)


def test_generator_gradient_zeroes_nans():
    grad = generator_gradient(torch.tensor([1.0, float("nan"), 3.0]), torch.zeros(3), torch.tensor(2.0))
    assert grad.tolist() == [2.0, 0.0, 6.0]


def test_loss_weights_closed_form():
    abar = torch.linspace(0.999, 0.001, 1000)
    t = torch.tensor([0, 500, 999])
    a = abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(loss_weight(abar, t, "sds"), 1 - a)
    assert torch.equal(loss_weight(abar, t, "uniform"), torch.ones_like(a))
    assert torch.allclose(loss_weight(abar, t, "sigma_over_alpha"), ((1 - a) / a).sqrt())


def test_time_schedule_anneals_at_the_given_step():
    cfg = official_config(t_min=0.02, t_max=0.98, t_max_annealed=0.5, t_anneal_step=10)
    assert time_schedule(9, cfg, 1000) == (20, 980)
    assert time_schedule(10, cfg, 1000) == (20, 500)
    assert time_schedule(10_000, official_config(), 1000) == (20, 980)  # no annealing unless asked
    assert time_schedule(0, official_config(t_min=0.0, t_max=1.0), 1000) == (0, 999)


def test_guidance_schedule_changes_the_cfg_at_the_anneal_step():
    cfg = official_config(guidance_scale=3.0, guidance_scale_annealed=2.0, t_anneal_step=10)
    assert [guidance_schedule(step, cfg) for step in (0, 9, 10, 5000)] == [3.0, 3.0, 2.0, 2.0]
    assert guidance_schedule(5000, official_config(t_anneal_step=10)) == 7.5  # the official recipe: the CFG holds
    held = official_config(guidance_scale=3.0, guidance_scale_annealed=2.0)  # no second phase: nothing changes
    assert guidance_schedule(10_000, held) == 3.0


def test_distill_step_guides_with_the_scheduled_cfg(prior, monkeypatch):
    """The prior is asked for the second phase's CFG from the anneal step on."""
    scales = []
    guided = prior.guided

    def spy(x_t, t, cond, uncond, scale, *rest):
        scales.append(scale)
        return guided(x_t, t, cond, uncond, scale, *rest)

    monkeypatch.setattr(prior, "guided", spy)
    config = official_config(method="sds", guidance_scale=3.0, guidance_scale_annealed=2.0, t_anneal_step=1)
    x0, cond = _setup(prior)
    for step in (0, 1):
        distill_step(x0, prior, None, cond, config, step, torch.Generator().manual_seed(0))
    assert scales == [3.0, 2.0]


def test_discriminator_loss_closed_form():
    g = torch.Generator().manual_seed(0)
    phi_f, tgt_f, pri_f, phi_r, tgt_r, pri_r = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(6))
    mean_sq = lambda a, b: (a - b).square().sum() / a.numel()  # noqa: E731
    vsd = discriminator_loss(phi_f, tgt_f, None, gamma=0.0)
    assert torch.allclose(vsd, mean_sq(phi_f, tgt_f))
    asd = discriminator_loss(phi_f, tgt_f, pri_f, gamma=-0.75)
    assert torch.allclose(asd, mean_sq(phi_f, tgt_f) - 0.75 * mean_sq(phi_f, pri_f))
    full = discriminator_loss(phi_f, tgt_f, pri_f, -0.75, phi_r, tgt_r, pri_r, eta=0.5)
    expected = (mean_sq(phi_f, tgt_f) - mean_sq(phi_r, tgt_r) + 0.5 * mean_sq(pri_r, phi_r)
                - 0.75 * mean_sq(pri_f, phi_f))
    assert torch.allclose(full, expected)


def test_sds_gradient_is_cfg_minus_the_noise(prior):
    x0, cond = _setup(prior)
    config = official_config(method="sds")
    rng = torch.Generator().manual_seed(5)
    state = rng.get_state()
    result = distill_step(x0, prior, None, cond, config, 0, rng)
    result.generator_loss.backward()
    assert result.phi_loss is None
    t, eps, _, _ = _replay(state, x0, prior, config)
    assert torch.equal(result.t, t)
    x_t = prior.add_noise(x0.detach(), eps, t)
    with torch.no_grad():
        eps_cfg, _ = prior.guided(x_t, t, cond.cond, cond.uncond, config.guidance_scale)
    expected = loss_weight(prior.alphas_cumprod, t, "sds") * (eps_cfg - eps) / x0.shape[0]
    assert torch.allclose(x0.grad, expected, atol=1e-6)


@pytest.mark.parametrize("phi_kind", ["lora", "ti"])
def test_asd_fresh_noise_step_matches_algorithm_1(prior, phi_kind):
    """Generator gets w (eps_cfg - eps_phi) with φ *before* its update; φ's loss is L'_D at fresh (t', eps')."""
    x0, cond = _setup(prior)
    config = official_config(method="asd", gamma=-0.75, weighting="uniform")
    phi = build_discriminator(prior, PROMPT, PhiConfig(kind=phi_kind, lr=1e-2))
    rng = torch.Generator().manual_seed(7)
    state = rng.get_state()
    t, eps, t2, eps2 = _replay(state, x0, prior, config)
    x_t, x_t2 = prior.add_noise(x0.detach(), eps, t), prior.add_noise(x0.detach(), eps2, t2)
    with torch.no_grad():
        eps_phi = prior.to_eps(phi.model_output(x_t, t), x_t, t)
        eps_cfg, _ = prior.guided(x_t, t, cond.cond, cond.uncond, config.guidance_scale)
        phi_out2 = phi.model_output(x_t2, t2)
        prior_out2 = prior.model_output(x_t2, t2, cond.cond)
    expected_phi_loss = discriminator_loss(phi_out2, prior.training_target(x0.detach(), eps2, t2), prior_out2, -0.75)

    result = distill_step(x0, prior, phi, cond, config, 0, rng)
    result.generator_loss.backward()
    assert torch.allclose(x0.grad, (eps_cfg - eps_phi) / x0.shape[0], atol=1e-5)
    assert torch.allclose(result.phi_loss, expected_phi_loss, atol=1e-6)
    with torch.no_grad():  # φ was updated by the step
        assert not torch.allclose(phi.model_output(x_t2, t2), phi_out2)


def test_asd_shared_noise_uses_one_phi_forward_for_both_updates(prior):
    x0, cond = _setup(prior)
    config = official_config(method="asd", phi_noise="shared")
    phi = build_discriminator(prior, PROMPT, PhiConfig(kind="lora", lr=1e-2))
    rng = torch.Generator().manual_seed(11)
    t, eps, _, _ = _replay(rng.get_state(), x0, prior, config)
    x_t = prior.add_noise(x0.detach(), eps, t)
    with torch.no_grad():
        phi_out = phi.model_output(x_t, t)
        eps_cfg, prior_cond = prior.guided(x_t, t, cond.cond, cond.uncond, config.guidance_scale)
    calls = []
    prior.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    result = distill_step(x0, prior, phi, cond, config, 0, rng)
    result.generator_loss.backward()
    assert calls == [4, 2]  # one batched CFG call (2B) and one φ call (B): no extra UNet work
    w = loss_weight(prior.alphas_cumprod, t, "sds")
    assert torch.allclose(x0.grad, w * (eps_cfg - prior.to_eps(phi_out, x_t, t)) / 2, atol=1e-5)
    expected = discriminator_loss(phi_out, prior.training_target(x0.detach(), eps, t), prior_cond, -0.75)
    assert torch.allclose(result.phi_loss, expected, atol=1e-6)


def test_unet_calls_per_step(prior_eps):
    """fresh noise: CFG (2B) + φ (B) + φ with grad (B) + prior cond for γ (B); VSD skips the γ call; SDS only CFG."""
    counts = {}
    for method in ("asd", "vsd", "sds"):
        x0, cond = _setup(prior_eps)
        phi = build_discriminator(prior_eps, PROMPT, PhiConfig()) if method != "sds" else None
        calls = []
        hook = prior_eps.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        distill_step(x0, prior_eps, phi, cond, official_config(method=method, gamma=0.0 if method == "vsd" else -0.75),
                     0, torch.Generator().manual_seed(0))
        hook.remove()
        counts[method] = calls
    assert counts == {"asd": [4, 2, 2, 2], "vsd": [4, 2, 2], "sds": [4]}


def _two_identical_priors(path):
    return DiffusionPrior.from_pretrained(path, device="cpu"), DiffusionPrior.from_pretrained(path, device="cpu")


def _run_steps(prior, config, steps=3, phi_prior=None, return_phi=False):
    torch.manual_seed(0)  # φ's LoRA init
    phi = build_discriminator(phi_prior or prior, PROMPT, PhiConfig(kind="lora", lr=1e-2))
    x0, cond = _setup(prior)
    rng = torch.Generator().manual_seed(3)
    grads, losses = [], []
    for step in range(steps):
        x0.grad = None
        result = distill_step(x0, prior, phi, cond, config, step, rng)
        result.generator_loss.backward()
        grads.append(x0.grad.clone())
        losses.append(result.phi_loss)
    return grads, losses, phi if return_phi else phi.state_tensors()


def test_asd_with_gamma_zero_is_exactly_vsd(tiny_eps_dir):
    prior_a, prior_b = _two_identical_priors(tiny_eps_dir)
    grads_a, losses_a, phi_a = _run_steps(prior_a, official_config(method="asd", gamma=0.0))
    grads_b, losses_b, phi_b = _run_steps(prior_b, official_config(method="vsd", gamma=0.0))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b))
    assert all(torch.equal(phi_a[k], phi_b[k]) for k in phi_a)


def test_asd_gamma_changes_the_discriminator(tiny_eps_dir):
    prior_a, prior_b = _two_identical_priors(tiny_eps_dir)
    _, losses_a, phi_a = _run_steps(prior_a, official_config(method="asd", gamma=-0.75))
    _, losses_b, phi_b = _run_steps(prior_b, official_config(method="vsd"))
    assert not all(torch.equal(phi_a[k], phi_b[k]) for k in phi_a)


def test_reference_images_add_the_real_sample_terms(prior_eps):
    x0, cond = _setup(prior_eps, batch=1)
    reference = torch.randn_like(x0).detach()
    config = official_config(method="asd", gamma=-0.75, eta=0.5)
    phi = build_discriminator(prior_eps, PROMPT, PhiConfig(kind="lora"))
    rng = torch.Generator().manual_seed(2)
    _, _, t2, eps2 = _replay(rng.get_state(), x0, prior_eps, config)
    x_g, x_r = prior_eps.add_noise(x0.detach(), eps2, t2), prior_eps.add_noise(reference, eps2, t2)
    with torch.no_grad():
        phi_g, phi_r = phi.model_output(x_g, t2), phi.model_output(x_r, t2)
        prior_g, prior_r = prior_eps.model_output(x_g, t2, cond.cond), prior_eps.model_output(x_r, t2, cond.cond)
    expected = discriminator_loss(phi_g, eps2, prior_g, -0.75, phi_r, eps2, prior_r, 0.5)
    result = distill_step(x0, prior_eps, phi, cond, config, 0, rng, reference=reference)
    assert torch.allclose(result.phi_loss, expected, atol=1e-6)


def test_unresolved_config_is_refused_by_distill_step(tiny_eps_dir):
    prior = DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")
    x0, cond = _setup(prior, batch=1)
    with pytest.raises(ValueError, match="with_recipe"):
        distill_step(x0, prior, None, cond, DistillConfig(method="sds"), 0, torch.Generator().manual_seed(0))


def test_config_validation():
    from asd_engine.runs import settings
    from asd_engine.runs.configs import Distill2DConfig

    def config(**fields):
        return Distill2DConfig(prompt="a cat", distill=official_config(**fields), from_recipe=[])

    settings.validate(config())
    for bad in ({"method": "gan"}, {"weighting": "x"}, {"phi_noise": "x"}, {"t_min": 0.5, "t_max": 0.4},
                {"method": "vsd", "gamma": -0.5}, {"t_anneal_step": -1}, {"guidance_scale": float("nan")}):
        with pytest.raises(UserInputError):
            settings.validate(config(**bad))


@pytest.mark.parametrize("phi_noise", ["fresh", "shared"])
def test_phi_on_a_second_copy_of_the_prior_is_the_same_algorithm(tiny_eps_dir, phi_noise):
    """φ on a separate model that happens to equal the prior: every gradient and φ loss as with φ on the prior
    (the γ term then reads φ's base model, which equals the prior here)."""
    prior_a, prior_b = _two_identical_priors(tiny_eps_dir)
    config = official_config(method="asd", gamma=-0.75, phi_noise=phi_noise)
    grads_same, losses_same, _ = _run_steps(prior_a, config)
    prior_c, prior_d = _two_identical_priors(tiny_eps_dir)
    grads_two, losses_two, phi = _run_steps(prior_c, config, phi_prior=prior_d, return_phi=True)
    assert phi.prior is prior_d and not any("lora" in n for n, _ in prior_c.unet.named_parameters())
    for a, b in zip(grads_same + losses_same, grads_two + losses_two):
        assert torch.allclose(a, b, atol=1e-6)


def test_phi_on_a_v_prediction_model_uses_its_own_targets(tiny_eps_dir, tiny_v_latent_dir):
    """The official pairing: an ε prior with φ on a v model. φ's loss is measured against v targets (its own
    space) and its prediction is converted to ε with its own parameterisation."""
    prior = DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")
    phi_prior = DiffusionPrior.from_pretrained(tiny_v_latent_dir, device="cpu")
    prior.check_shares_space(phi_prior, "--phi-model")
    config = official_config(method="asd", gamma=0.0)
    torch.manual_seed(0)
    phi = build_discriminator(phi_prior, PROMPT, PhiConfig(kind="lora"))
    x0, cond = _setup(prior, batch=1)
    rng = torch.Generator().manual_seed(2)
    _, _, t2, eps2 = _replay(rng.get_state(), x0, prior, config)
    x_t2 = prior.add_noise(x0.detach(), eps2, t2)
    with torch.no_grad():
        expected = F.mse_loss(phi.model_output(x_t2, t2), phi_prior.training_target(x0.detach(), eps2, t2))
    result = distill_step(x0, prior, phi, cond, config, 0, rng)
    assert torch.allclose(result.phi_loss, expected, atol=1e-6)


def test_phi_model_must_share_the_priors_space(tiny_eps_dir, tiny_v_dir):
    prior = DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")
    with pytest.raises(UserInputError, match="phi_model.*model space"):
        prior.check_shares_space(DiffusionPrior.from_pretrained(tiny_v_dir, device="cpu"), "phi_model")
