"""Node contract (without ComfyUI) and the node chain run in plain Python on tiny models."""

from __future__ import annotations

import inspect

import pytest
import torch

CORE_TYPES = {"IMAGE", "MASK", "STRING", "INT", "FLOAT", "BOOLEAN", "MODEL", "CLIP", "VAE"}


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_mappings_are_complete(pack):
    classes, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(classes) == set(names) and len(classes) >= 9
    assert all(names[k].strip() for k in names)
    expected = {"Load SD Model (ASD)", "ASD Discriminator (LoRA/TI)", "NeRF Generator (ASD)", "ASD Train Loop",
                "Render Views (ASD)", "Export Mesh (ASD)", "Save ASD Checkpoint", "Load ASD Checkpoint"}
    assert expected <= set(names.values())


def test_every_node_is_well_formed(pack):
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("ASD/"), key
        assert len(cls.DESCRIPTION) > 40, key
        assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), key
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), key
        for type_name in cls.RETURN_TYPES:
            assert type_name in CORE_TYPES or type_name.startswith("ASD_"), (key, type_name)
        function = getattr(cls, cls.FUNCTION)
        parameters = inspect.signature(function).parameters
        spec = cls.INPUT_TYPES()
        assert "required" in spec
        for name, value in _inputs(cls).items():
            assert name in parameters, (key, name)
            kind, options = value[0], value[1]
            assert options.get("tooltip"), (key, name)
            assert isinstance(kind, list) or kind in CORE_TYPES or kind.startswith("ASD_"), (key, name, kind)
        optional = set(spec.get("optional", {}))
        for name, parameter in parameters.items():
            if name != "self" and name not in spec["required"]:
                assert name in optional and parameter.default is None, (key, name)


@pytest.fixture
def nodes(pack):
    return {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}


def _node_prior(pack, path):
    prior_module = __import__(pack.__name__ + ".asd_engine.prior", fromlist=["DiffusionPrior"])
    return prior_module.DiffusionPrior.from_pretrained(path, device="cpu")


def test_3d_chain_trains_renders_exports_saves_and_resumes(pack, nodes, tiny_v_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside ComfyUI, outputs go to ./output
    prior = _node_prior(pack, tiny_v_dir)
    (phi,) = nodes["ASDDiscriminator"].build("lora", 4, 1, 0.0, -0.75, True)
    (generator,) = nodes["ASDNeRFGenerator"].build("toy-cpu", "", 1, 0)
    with torch.inference_mode():  # as ComfyUI executes nodes
        result, preview, checkpoint = nodes["ASDTrainLoop"].train(
            prior, generator, "a red cube", "", "asd", 3, 7.5, "sds", 0.02, 0.98, "fresh", "test", phi=phi)
    assert result.kind == "nerf" and result.step == 3 and preview.shape == (1, 64, 256, 3)
    assert (tmp_path / "output" / "asd" / "test_00001" / "checkpoint" / "state.safetensors").is_file()
    assert not any("lora_" in k for k in prior.unet.state_dict())  # φ removed: the shared prior is untouched
    with torch.inference_mode():
        images, depth, alpha, normals = nodes["ASDRenderViews"].render(result, 4, 32, 15.0, 1.5, 70.0, "white")
    assert images.shape == (4, 32, 32, 3) and depth.shape == (4, 32, 32, 3) and alpha.shape == (4, 32, 32)
    with torch.inference_mode():
        out = nodes["ASDExportMesh"].export(result, 32, 25.0, "glb+obj", "mesh")
    path = tmp_path / "output" / out["result"][0]
    assert path.suffix == ".glb" and path.is_file() and path.with_suffix(".obj").is_file()
    assert out["ui"]["asd_files"][0]["type"] == "output"
    saved = nodes["ASDSaveCheckpoint"].save(result, "saved")["result"][0]
    ckpt, loaded = nodes["ASDLoadCheckpoint"].load(saved)
    assert loaded.kind == "nerf" and loaded.step == 3
    with torch.inference_mode():
        resumed, _, _ = nodes["ASDTrainLoop"].train(prior, generator, "a red cube", "", "asd", 5, 7.5, "sds",
                                                   0.02, 0.98, "fresh", "test", phi=phi, resume=ckpt)
    assert resumed.step == 5
    with pytest.raises(RuntimeError, match="prompt"):
        nodes["ASDTrainLoop"].train(prior, generator, "a blue torus", "", "asd", 5, 7.5, "sds", 0.02, 0.98,
                                    "fresh", "test", resume=ckpt)


def test_2d_chain_and_user_errors(pack, nodes, tiny_eps_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior = _node_prior(pack, tiny_eps_dir)
    (generator,) = nodes["ASDImageGenerator"].build(32, "latent", 0.0, 1)
    with torch.inference_mode():
        result, preview, checkpoint = nodes["ASDTrainLoop"].train(
            prior, generator, "a red cube", "", "sds", 2, 7.5, "sds", 0.02, 0.98, "fresh", "img")
    assert result.kind == "image" and preview.shape == (1, 32, 32, 3)
    with pytest.raises(RuntimeError, match="text-to-3D"):
        nodes["ASDRenderViews"].render(result, 4, 32, 15.0, 1.5, 70.0, "white")
    _, loaded = nodes["ASDLoadCheckpoint"].load(checkpoint, prior=prior)
    assert torch.allclose(loaded.image, result.image, atol=1e-6)
    with pytest.raises(RuntimeError, match="resolution_schedule"):
        nodes["ASDNeRFGenerator"].build("toy-cpu", "64:32", 1, 0)
    with pytest.raises(RuntimeError, match="checkpoint"):
        nodes["ASDLoadCheckpoint"].load(str(tmp_path / "nothing"))


def test_phi_on_a_second_model_through_the_nodes(pack, nodes, tiny_eps_dir, tiny_v_latent_dir, tmp_path, monkeypatch):
    """The official pairing as a graph: an ε prior, φ on a v-prediction model wired into ASD Discriminator."""
    monkeypatch.chdir(tmp_path)
    prior, phi_model = _node_prior(pack, tiny_eps_dir), _node_prior(pack, tiny_v_latent_dir)
    (phi,) = nodes["ASDDiscriminator"].build("lora", 4, 1, 0.0, -0.75, False, phi_model=phi_model)
    (generator,) = nodes["ASDImageGenerator"].build(64, "latent", 0.0, 0)
    with torch.inference_mode():
        result, _, checkpoint = nodes["ASDTrainLoop"].train(
            prior, generator, "a red cube", "", "asd", 2, 7.5, "sds", 0.02, 0.98, "fresh", "pair", phi=phi)
        assert result.step == 2 and result.config.phi_model == str(tiny_v_latent_dir)
        assert not any("lora_" in k for k in prior.unet.state_dict()) and not any(
            "lora_" in k for k in phi_model.unet.state_dict())  # φ lived on the second model and was removed
        resumed, _, _ = nodes["ASDTrainLoop"].train(prior, generator, "a red cube", "", "asd", 3, 7.5, "sds",
                                                   0.02, 0.98, "fresh", "pair", phi=phi, resume=checkpoint)
    assert resumed.step == 3
