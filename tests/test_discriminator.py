"""φ: LoRA on the shared UNet and textual inversion; it learns, and the frozen prior stays bit-identical."""

from __future__ import annotations

import pytest
import torch

from asd_engine.prior.discriminator import LoraDiscriminator, PhiConfig, TextualInversionDiscriminator, build_discriminator
from asd_engine.distill import discriminator_loss
from asd_engine.errors import UserInputError


def _snapshot(module: torch.nn.Module, skip: str | None = None) -> dict[str, torch.Tensor]:
    """State dict with peft's wrapper names undone (``to_q.base_layer.weight`` is the original ``to_q.weight``)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in module.state_dict().items()
            if skip is None or skip not in k}


def _batch(prior, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((batch, *prior.sample_shape(32)), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([200, 600][:batch])
    return prior.add_noise(x0, eps, t), t, prior.training_target(x0, eps, t)


def test_lora_starts_equal_to_the_prior_and_disabling_restores_it_exactly(prior):
    x_t, t, _ = _batch(prior)
    emb = prior.encode_prompt(["a red cube"])
    with torch.no_grad():
        before = prior.model_output(x_t, t, emb)
        phi = build_discriminator(prior, "a red cube", PhiConfig(kind="lora"))
        assert isinstance(phi, LoraDiscriminator)
        assert torch.equal(phi.model_output(x_t, t), before)  # LoRA B = 0 at init
        assert torch.equal(prior.model_output(x_t, t, emb), before)  # adapter is off outside φ's calls


# A token embedding moves a random tiny UNet's output only a little, so TI's bar is lower than LoRA's.
@pytest.mark.parametrize("kind,lr,ratio", [("lora", 1e-2, 0.95), ("ti", 3e-2, 0.999)])
def test_phi_loss_decreases_and_frozen_weights_stay_bit_identical(prior, kind, lr, ratio):
    frozen = {"unet": _snapshot(prior.unet, skip="lora_"), "text_encoder": _snapshot(prior.text_encoder)}
    if prior.vae is not None:
        frozen["vae"] = _snapshot(prior.vae)
    phi = build_discriminator(prior, "a red cube", PhiConfig(kind=kind, lr=lr))
    x_t, t, target = _batch(prior)
    with torch.no_grad():
        prior_out = prior.model_output(x_t, t, prior.encode_prompt(["a red cube"]))
    losses = []
    for _ in range(12):
        _, loss = phi.train_step(x_t, t, lambda out: discriminator_loss(out, target, prior_out, gamma=-0.75))
        losses.append(float(loss))
    assert losses[-1] < ratio * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 8, losses  # mostly decreasing, not one lucky step
    for name, module in (("unet", prior.unet), ("text_encoder", prior.text_encoder), ("vae", prior.vae)):
        if module is None:
            continue
        now = _snapshot(module, skip="lora_" if name == "unet" else None)
        assert now.keys() == frozen[name].keys()
        assert all(torch.equal(now[k], frozen[name][k]) for k in now), f"{name} changed"
    # φ itself did change
    with torch.no_grad():
        assert not torch.allclose(phi.model_output(x_t, t), prior_out)


def test_textual_inversion_trains_only_its_token_rows(prior_eps):
    embedding_before = prior_eps.text_encoder.get_input_embeddings().weight.detach().clone()
    plain_before = prior_eps.encode_prompt(["a blue torus"])
    phi = build_discriminator(prior_eps, "a red cube", PhiConfig(kind="ti", num_tokens=2, lr=1e-2))
    assert isinstance(phi, TextualInversionDiscriminator)
    rows_before = phi.token_embeddings.detach().clone()
    x_t, t, target = _batch(prior_eps)
    phi.train_step(x_t, t, lambda out: discriminator_loss(out, target, None, gamma=0.0))
    assert not torch.equal(phi.token_embeddings, rows_before)
    assert prior_eps.text_encoder.get_input_embeddings().weight.shape == embedding_before.shape  # no resize
    assert torch.equal(prior_eps.text_encoder.get_input_embeddings().weight, embedding_before)
    assert torch.equal(prior_eps.encode_prompt(["a blue torus"]), plain_before)
    # the tokens are single tokens of the tokenizer, and φ's embedding depends on the trained rows
    ids = prior_eps.tokenizer(" ".join(phi.tokens), add_special_tokens=False).input_ids
    assert ids == phi.token_ids.tolist()
    with torch.no_grad():
        emb = phi.encode()
        phi.token_embeddings.add_(1.0)
        assert not torch.allclose(phi.encode(), emb)


def test_camera_embedding_starts_at_zero_and_learns_to_use_the_camera(prior_eps):
    phi = build_discriminator(prior_eps, "a red cube", PhiConfig(kind="lora", lr=1e-2, camera_dropout=0.0),
                              with_camera=True)
    x_t, t, target = _batch(prior_eps)
    cam_a, cam_b = torch.zeros(2, 16), torch.ones(2, 16)
    with torch.no_grad():
        plain = prior_eps.model_output(x_t, t, phi.embeddings)
        assert torch.equal(phi.model_output(x_t, t, cam_b), plain)  # zero-initialised output layer
    for _ in range(3):
        phi.train_step(x_t, t, lambda out: discriminator_loss(out, target, None, 0.0), camera=cam_b)
    with torch.no_grad():
        assert not torch.allclose(phi.model_output(x_t, t, cam_a), phi.model_output(x_t, t, cam_b))
        assert torch.equal(prior_eps.model_output(x_t, t, phi.embeddings), plain)  # hook removed after φ's call


def test_two_discriminators_share_one_prior_without_interfering(prior_eps):
    x_t, t, target = _batch(prior_eps)
    phi_a = build_discriminator(prior_eps, "a red cube", PhiConfig(kind="lora", lr=1e-2))
    phi_b = build_discriminator(prior_eps, "a red cube", PhiConfig(kind="lora", lr=1e-2))
    phi_a.train_step(x_t, t, lambda out: discriminator_loss(out, target, None, 0.0))
    with torch.no_grad():
        a_out = phi_a.model_output(x_t, t)
        b_out = phi_b.model_output(x_t, t)
        plain = prior_eps.model_output(x_t, t, phi_b.embeddings)
    assert torch.equal(b_out, plain) and not torch.allclose(a_out, plain)
    for _ in range(2):
        phi_b.train_step(x_t, t, lambda out: discriminator_loss(out, target, None, 0.0))
    with torch.no_grad():
        assert torch.equal(phi_a.model_output(x_t, t), a_out)
    phi_a.remove()
    phi_b.remove()
    assert not any("lora_" in k for k in prior_eps.unet.state_dict())


@pytest.mark.parametrize("kind", ["lora", "ti"])
def test_state_tensors_round_trip(prior_eps, kind):
    phi = build_discriminator(prior_eps, "a red cube", PhiConfig(kind=kind, lr=1e-2))
    x_t, t, target = _batch(prior_eps)
    phi.train_step(x_t, t, lambda out: discriminator_loss(out, target, None, 0.0))
    saved = phi.state_tensors()
    other = build_discriminator(prior_eps, "a red cube", PhiConfig(kind=kind))
    other.load_state_tensors(saved)
    with torch.no_grad():
        assert torch.equal(other.model_output(x_t, t), phi.model_output(x_t, t))
    wrong = build_discriminator(prior_eps, "a red cube", PhiConfig(kind=kind, lora_rank=8, num_tokens=3))
    with pytest.raises(UserInputError):
        wrong.load_state_tensors(saved)


def test_lora_on_all_layers_reaches_every_resolution_and_leaves_the_prior_clean(prior_eps):
    """``lora_targets="all"`` adapts the convolutions too (the toy UNet's full-resolution layers have no attention),
    still starts equal to the prior, learns, and is removed without a trace."""
    x_t, t, target = _batch(prior_eps)
    with torch.no_grad():
        plain = prior_eps.model_output(x_t, t, prior_eps.encode_prompt(["a red cube"]))
    attention = build_discriminator(prior_eps, "a red cube", PhiConfig(kind="lora"))
    everywhere = build_discriminator(prior_eps, "a red cube", PhiConfig(kind="lora", lora_targets="all", lr=1e-2))
    adapted = lambda phi: {n.split(".lora_")[0] for n in phi._lora_params}  # noqa: E731
    assert not any(n.startswith("conv_in") for n in adapted(attention))
    assert {"conv_in", "conv_out"} <= {n.split(".")[0] for n in adapted(everywhere)}
    assert any(".resnets." in n and n.endswith("conv1") for n in adapted(everywhere))
    assert len(everywhere.parameters()) > 2 * len(attention.parameters())
    with torch.no_grad():
        assert torch.equal(everywhere.model_output(x_t, t), plain)  # B = 0 at init on every layer
    losses = [float(everywhere.train_step(x_t, t, lambda out: discriminator_loss(out, target, None, 0.0))[1])
              for _ in range(5)]
    assert losses[-1] < losses[0]
    attention.remove()
    everywhere.remove()
    assert not any("lora_" in k for k in prior_eps.unet.state_dict())
    with torch.no_grad():
        assert torch.equal(prior_eps.model_output(x_t, t, prior_eps.encode_prompt(["a red cube"])), plain)


def test_bad_phi_settings_are_refused():
    from asd_engine.runs import settings
    from asd_engine.runs.configs import Distill2DConfig

    for config in (PhiConfig(kind="gan"), PhiConfig(lora_rank=0), PhiConfig(lora_targets="convs"), PhiConfig(kind="ti", num_tokens=0),
                   PhiConfig(kind="ti", prompt_template="{prompt}"), PhiConfig(lr=float("inf"))):
        with pytest.raises(UserInputError, match="^phi"):
            settings.validate(Distill2DConfig(prompt="a red cube", phi=config))
