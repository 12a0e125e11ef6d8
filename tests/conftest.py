"""Shared fixtures: tiny random pipelines of the real SD architectures, built once per session, saved, loaded back."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the network (hub retries cost ~20 s each)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from asd_engine.prior.diffusion import DiffusionPrior
from asd_engine.prior.tiny_pipeline import build_tiny_pipeline

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_eps_dir(tmp_path_factory):
    """SD-1.x-like: latent (VAE ×8), epsilon prediction, PNDM scheduler."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-eps"), prediction_type="epsilon", latent=True)


@pytest.fixture(scope="session")
def tiny_v_dir(tmp_path_factory):
    """Pixel-space (no VAE), v-prediction, DDIM scheduler."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v"), prediction_type="v_prediction", latent=False)


@pytest.fixture(scope="session")
def tiny_v_latent_dir(tmp_path_factory):
    """SD-2.x-768-like: latent, v-prediction."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v-latent"), prediction_type="v_prediction", latent=True)


@pytest.fixture(params=["eps", "v"])
def pipeline_dir(request, tiny_eps_dir, tiny_v_dir):
    return {"eps": tiny_eps_dir, "v": tiny_v_dir}[request.param]


@pytest.fixture
def prior_eps(tiny_eps_dir) -> DiffusionPrior:
    return DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")


@pytest.fixture
def prior_v(tiny_v_dir) -> DiffusionPrior:
    return DiffusionPrior.from_pretrained(tiny_v_dir, device="cpu")


@pytest.fixture(params=["eps", "v"])
def prior(request, tiny_eps_dir, tiny_v_dir) -> DiffusionPrior:
    """Each test that takes ``prior`` runs on the ε/latent and the v/pixel pipeline."""
    return DiffusionPrior.from_pretrained({"eps": tiny_eps_dir, "v": tiny_v_dir}[request.param], device="cpu")


@pytest.fixture(scope="session")
def make_workflows():
    """``workflows/make_workflows.py`` (the workflow generator) loaded as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "workflows" / "make_workflows.py"
    spec = importlib.util.spec_from_file_location("make_workflows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack(make_workflows):
    """The node pack imported as a package (the way ComfyUI imports it), without ComfyUI present: the generator's
    loader, so the tests and the workflow files see the same node classes."""
    return make_workflows.load_pack()


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """One real ComfyUI server for every host test module (see tests/comfy_host.py); skips when none is built."""
    from comfy_host import host_missing_reason, start_host

    reason = host_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = start_host(tmp_path_factory.mktemp("comfyui-host"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_sd15(host):
    """A ComfyUI-loadable SD1 single file (fp16, ~420 MiB) in the host's models/checkpoints."""
    from single_file_models import build_comfy_sd1_checkpoint

    return build_comfy_sd1_checkpoint(host.base / "checkpoints" / "tiny_sd15.safetensors")
