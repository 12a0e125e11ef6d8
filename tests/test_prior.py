"""The prior: offline loading of real pipeline layouts, ε/v conversion, batched CFG, VAE encode/decode."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from asd_engine.errors import UserInputError
from asd_engine.prior.diffusion import DiffusionPrior, inspect_pipeline_folder


def test_loads_both_prediction_types_and_spaces(prior_eps, prior_v):
    assert prior_eps.prediction_type == "epsilon" and prior_eps.latent_space
    assert prior_v.prediction_type == "v_prediction" and not prior_v.latent_space
    assert prior_eps.vae_scale_factor == 8 and prior_v.vae_scale_factor == 1
    assert prior_eps.sample_shape(32) == (4, 4, 4)
    assert prior_v.sample_shape(32) == (3, 32, 32)
    assert prior_eps.num_train_timesteps == 1000
    # every prior parameter is frozen
    for module in (prior_eps.unet, prior_eps.text_encoder, prior_eps.vae):
        assert not any(p.requires_grad for p in module.parameters())


def test_tiny_folder_is_a_real_stable_diffusion_layout(tiny_eps_dir):
    """The fixture folder loads with diffusers' own StableDiffusionPipeline, so our loader is tested on the real layout."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_eps_dir, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert (tiny_eps_dir / "tokenizer" / "vocab.json").is_file() and (tiny_eps_dir / "tokenizer" / "merges.txt").is_file()


def test_scheduler_alphas_match_the_pipelines_own_scheduler(tiny_v_dir, prior_v):
    from diffusers import DDIMScheduler

    own = DDIMScheduler.from_pretrained(tiny_v_dir, subfolder="scheduler")
    assert torch.allclose(prior_v.alphas_cumprod, own.alphas_cumprod.float())


def test_v_to_eps_conversion_recovers_the_noise(prior_v):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    eps = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([5, 500, 990])
    x_t = prior_v.add_noise(x0, eps, t)
    v = prior_v.training_target(x0, eps, t)  # v = alpha eps - sigma x0
    alpha, sigma = prior_v.alpha_sigma(t)
    assert torch.allclose(v, alpha * eps - sigma * x0)
    assert torch.allclose(prior_v.to_eps(v, x_t, t), eps, atol=1e-5)


def test_eps_prediction_is_passed_through(prior_eps):
    out = torch.randn(2, 4, 4, 4)
    x_t = torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    assert prior_eps.to_eps(out, x_t, t) is out
    assert prior_eps.training_target(torch.zeros_like(out), out, t) is out


def test_batched_cfg_equals_two_separate_calls(prior):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn((2, *prior.sample_shape(32)), generator=g)
    t = torch.tensor([100, 700])
    cond = prior.encode_prompt(["a red cube", "a blue torus"])
    uncond = prior.encode_prompt(["", ""])
    with torch.no_grad():
        eps_cfg, out_cond = prior.guided(x_t, t, cond, uncond, guidance_scale=7.5)
        eps_u = prior.to_eps(prior.model_output(x_t, t, uncond), x_t, t)
        eps_c = prior.to_eps(prior.model_output(x_t, t, cond), x_t, t)
        separate_cond = prior.model_output(x_t, t, cond)
    assert torch.allclose(eps_cfg, eps_u + 7.5 * (eps_c - eps_u), atol=1e-4)
    assert torch.allclose(out_cond, separate_cond, atol=1e-5)
    # guidance actually does something with these random weights (the test can fail)
    assert not torch.allclose(eps_cfg, eps_c, atol=1e-3)


def test_encode_uses_scaling_factor_and_gradients_reach_pixels(prior_eps):
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    latents = prior_eps.encode_images(images, sample=False)
    raw = prior_eps.vae.encode(images.detach() * 2 - 1).latent_dist.mode()
    assert torch.allclose(latents, raw * prior_eps.vae.config.scaling_factor, atol=1e-6)
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    decoded = prior_eps.decode(latents.detach())
    assert decoded.shape == (1, 3, 32, 32) and 0 <= decoded.min() and decoded.max() <= 1


def test_posterior_sampling_is_seeded(prior_eps):
    images = torch.rand(1, 3, 32, 32)
    a = prior_eps.encode_images(images, torch.Generator().manual_seed(3))
    b = prior_eps.encode_images(images, torch.Generator().manual_seed(3))
    c = prior_eps.encode_images(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pixel_space_round_trip(prior_v):
    images = torch.rand(1, 3, 16, 16)
    x0 = prior_v.encode_images(images)
    assert x0.min() >= -1 and x0.max() <= 1
    assert torch.allclose(prior_v.decode(x0), images, atol=1e-6)


def test_image_size_check(prior_eps):
    prior_eps.check_image_size(64)
    for bad in (20, 16, 0):
        with pytest.raises(UserInputError, match="at least 32 px"):
            prior_eps.check_image_size(bad)


@pytest.mark.parametrize("breakage", ["missing", "file", "no_index", "bad_json", "no_unet", "wrong_unet", "vae_dir"])
def test_folders_that_are_not_pipelines_are_refused(tmp_path, tiny_eps_dir, breakage):
    folder = tmp_path / "model"
    if breakage == "file":
        folder.write_text("not a folder")
    elif breakage != "missing":
        shutil.copytree(tiny_eps_dir, folder)
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text())
        if breakage == "no_index":
            index_file.unlink()
        elif breakage == "bad_json":
            index_file.write_text("{not json")
        elif breakage == "no_unet":
            shutil.rmtree(folder / "unet")
        elif breakage == "wrong_unet":
            index["unet"] = ["diffusers", "UNet2DModel"]
            index_file.write_text(json.dumps(index))
        elif breakage == "vae_dir":
            shutil.rmtree(folder / "vae")
    with pytest.raises(UserInputError) as info:
        inspect_pipeline_folder(folder)
    assert info.value.input_name == "model" and info.value.fix


def test_corrupt_weights_give_a_user_error(tmp_path, tiny_eps_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_eps_dir, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserInputError, match="could not load"):
        DiffusionPrior.from_pretrained(folder, device="cpu")


def test_memory_options_and_half_precision_keep_training_working(tiny_eps_dir):
    """low-vram's savers (and attention slicing) on a bf16 prior: φ and the image still train in fp32, the VAE
    encoder recomputes in backward, attention runs sliced."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from asd_engine.runs.distill_2d import Distill2D
    from asd_engine.runs.configs import Distill2DConfig
    from asd_engine.devices import resolve_precision, set_precision_provider

    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    set_precision_provider(lambda device: torch.bfloat16)  # a host's policy (ComfyUI's unet_dtype in the pack)
    try:
        assert resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
        assert resolve_precision("fp32", torch.device("cpu")) == torch.float32  # an explicit choice wins
    finally:
        set_precision_provider(None)
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    config = Distill2DConfig(prompt="a red cube", model=str(tiny_eps_dir), steps=2, parameterization="pixel",
                             precision="bf16", attention_slicing=True, vae_checkpointing=True)
    run = Distill2D(config, device="cpu")
    assert run.prior.dtype == torch.bfloat16 and run.prior.vae.encoder.gradient_checkpointing
    assert all(isinstance(p, SlicedAttnProcessor) for p in run.prior.unet.attn_processors.values())
    run.run()
    assert all(p.dtype == torch.float32 for p in run.phi.parameters())
    assert torch.isfinite(run.images()).all()
    from asd_engine.runs import settings

    with pytest.raises(UserInputError, match="precision"):
        settings.validate(Distill2DConfig(prompt="a", precision="fp8"))
