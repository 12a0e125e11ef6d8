"""Node contract (without ComfyUI) and the node chain run in plain Python on tiny models."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

CORE_TYPES = {"IMAGE", "MASK", "STRING", "INT", "FLOAT", "BOOLEAN", "MODEL", "CLIP", "VAE", "LOSS_MAP", "MESH"}


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_mappings_are_complete(pack):
    classes, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(classes) == set(names) and len(classes) >= 9
    assert all(names[k].strip() for k in names)
    expected = {"Load SD Model (ASD)", "ASD Discriminator (LoRA)", "ASD Discriminator (TI)", "NeRF Generator (ASD)",
                "ASD Train Loop", "Image Generator (ASD)",
                "Render Views (ASD)", "Export Mesh (ASD)", "Save ASD Checkpoint", "Load ASD Checkpoint"}
    assert expected <= set(names.values())


def test_nodes_are_found_by_the_words_users_search_for(pack):
    aliases = {a for cls in pack.NODE_CLASS_MAPPINGS.values() for a in getattr(cls, "SEARCH_ALIASES", [])}
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert all(isinstance(a, str) and a == a.lower() for a in getattr(cls, "SEARCH_ALIASES", []))
    assert {"text to 3d", "nerf", "sds", "vsd", "dreamfusion", "prolificdreamer", "score distillation"} <= aliases


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
        optional = set(spec.get("optional", {})) | set(spec.get("hidden", {}))
        for name, parameter in parameters.items():
            if name != "self" and name not in spec["required"]:
                assert name in optional and parameter.default is None, (key, name)


@pytest.fixture
def nodes(pack):
    return {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}


def _node_prior(pack, path):
    prior_module = __import__(pack.__name__ + ".asd_engine.prior.diffusion", fromlist=["DiffusionPrior"])
    return prior_module.DiffusionPrior.from_pretrained(path, device="cpu")


def _train(nodes, prior, generator, prompt, method, steps, phi=None, resume=None, cfg=7.5):
    """ASD Train Loop as ComfyUI runs it (inference mode); returns its four outputs."""
    with torch.inference_mode():
        out = nodes["ASDTrain"].train(prior, generator, prompt, "", method, "custom", steps, "custom", cfg, "sds",
                                      "custom", 0.02, 0.98, "from prior", "from prior", phi=phi, resume=resume)
    assert set(out) == {"ui", "result"}
    return out["result"]


def pack_plan(pack):
    return __import__(pack.__name__ + ".asd_engine.runs.plan", fromlist=["plan_from_specs"])


def _label(pack, folder):
    """Load ASD Checkpoint's dropdown label of a checkpoint folder."""
    bridge = __import__(pack.__name__ + ".nodes.comfy_bridge", fromlist=["checkpoint_choices"])
    (label,) = [k for k, v in bridge.checkpoint_choices().items() if v.resolve() == Path(folder).resolve()]
    return label


def test_3d_chain_trains_renders_exports_saves_and_resumes(pack, nodes, tiny_v_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside ComfyUI, outputs go to ./output
    prior = _node_prior(pack, tiny_v_dir)
    (phi,) = nodes["ASDDiscriminatorLoRA"].build(4, "from prior", "from prior", 1e-4, "custom", -0.75, True)
    (generator,) = nodes["ASDNeRFGenerator"].build("toy-cpu", "", 1, 0)
    result, preview, checkpoint, losses = _train(nodes, prior, generator, "a red cube", "asd", 3, phi=phi)
    assert result.kind == "nerf" and result.step == 3 and preview.shape == (1, 64, 256, 3)
    assert result.nerf.device.type == "cpu" and len(losses["loss"]) == len(losses["phi_loss"]) == 3
    assert Path(checkpoint).parent.parent == tmp_path / "output" / "asd" / "train"
    assert (Path(checkpoint) / "state.safetensors").is_file()
    assert not any("lora_" in k for k in prior.unet.state_dict())  # φ removed: the shared prior is untouched
    with torch.inference_mode():
        images, depth, alpha, normals = nodes["ASDRenderViews"].render(result, 4, 32, 15.0, 1.5, 70.0, "white")
    assert images.shape == (4, 32, 32, 3) and depth.shape == (4, 32, 32, 3) and alpha.shape == (4, 32, 32)
    with torch.inference_mode():
        out = nodes["ASDExportNeRFMesh"].export(result, 32, "custom", 25.0, "glb+obj", "mesh")
    path = tmp_path / "output" / out["result"][0]
    assert path.suffix == ".glb" and path.is_file() and path.with_suffix(".obj").is_file()
    assert out["ui"]["3d"][0]["type"] == "output"
    saved = nodes["ASDSaveCheckpoint"].save(result, "saved")[0]
    loader = nodes["ASDLoadCheckpoint"]
    assert loader.check_lazy_status(_label(pack, saved)) == []  # a 3D checkpoint never asks for the prior
    ckpt, loaded = loader.load(_label(pack, saved))
    assert loaded.kind == "nerf" and loaded.step == 3 and loaded.losses == losses
    version = type(loader).IS_CHANGED(_label(pack, checkpoint))
    assert version == type(loader).IS_CHANGED(_label(pack, checkpoint)) and "step 3" in version
    resumed, _, _, resumed_losses = _train(nodes, prior, generator, "a red cube", "asd", 5, phi=phi, resume=ckpt)
    assert resumed.step == 5 and resumed_losses["loss"][:3] == losses["loss"] and len(resumed_losses["loss"]) == 5
    # a run trained further in its own folder (a Cancel, then the same graph again) rewrites the checkpoint there:
    # a Load ASD Checkpoint of that folder must run again
    import shutil

    shutil.copytree(resumed.checkpoint, checkpoint, dirs_exist_ok=True)
    assert "step 5" in type(loader).IS_CHANGED(_label(pack, checkpoint)) != version
    with pytest.raises(RuntimeError, match="prompt"):
        _train(nodes, prior, generator, "a blue torus", "asd", 5, resume=ckpt)


def test_2d_chain_and_user_errors(pack, nodes, tiny_eps_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior = _node_prior(pack, tiny_eps_dir)
    (generator,) = nodes["ASDImage"].build("custom", 32, "latent", "default", 0.03, "from prior", 0, 1)
    result, preview, checkpoint, _ = _train(nodes, prior, generator, "a red cube", "sds", 2)
    assert result.kind == "image" and preview.shape == (1, 32, 32, 3)
    with pytest.raises(RuntimeError, match="text-to-3D"):
        nodes["ASDRenderViews"].render(result, 4, 32, 15.0, 1.5, 70.0, "white")
    _, loaded = nodes["ASDLoadCheckpoint"].load(_label(pack, checkpoint), prior=prior)
    assert torch.allclose(loaded.image, result.image, atol=1e-6)
    assert nodes["ASDLoadCheckpoint"].check_lazy_status(_label(pack, checkpoint)) == ["prior"]  # 2D: decode it
    assert nodes["ASDLoadCheckpoint"].check_lazy_status(_label(pack, checkpoint), prior=prior) == []
    with pytest.raises(RuntimeError, match="resolution_schedule"):
        nodes["ASDNeRFGenerator"].build("toy-cpu", "64:32", 1, 0)
    assert nodes["ASDNeRFGenerator"].build("toy-cpu", "", 1, 0)[0].field_backend == "auto"  # a graph without it
    (spec,) = nodes["ASDNeRFGenerator"].build("toy-cpu", "", 1, 0, "torch")
    plan = pack_plan(pack).plan_from_specs(prior, spec, {"prompt": "a red cube", "distill.method": "sds"})
    assert plan.config.nerf_field.backend == "torch"
    with pytest.raises(RuntimeError, match="^field_backend: 'fast' is not one of"):
        nodes["ASDNeRFGenerator"].build("toy-cpu", "", 1, 0, "fast")
    for source, widget, jitter in (("from prior", 5, None), ("custom", 0, 0), ("custom", 3, 3)):
        assert nodes["ASDImage"].build("custom", 32, "latent", "default", 0.03, source, widget, 0)[0].jitter == jitter
    (spec,) = nodes["ASDImage"].build("from prior", 512, "pixel", "custom", 0.02, "from prior", 0, 0)
    assert (spec.size, spec.parameterization, spec.lr, spec.jitter) == (None, "pixel", 0.02, None)
    (phi,) = nodes["ASDDiscriminatorLoRA"].build(4, "all", "from prior", 1e-4, "from prior", -0.75, True)
    assert phi.phi.lora_targets == "all" and phi.gamma is None and phi.phi.lr is None
    (ti,) = nodes["ASDDiscriminatorTI"].build(2, "thing", 5e-3, "custom", -0.5, None)
    assert (ti.phi.kind, ti.phi.num_tokens, ti.phi.init_word, ti.phi.lr, ti.gamma) == ("ti", 2, "thing", 5e-3, -0.5)
    with pytest.raises(RuntimeError, match="^lora_targets: 'convs'"):  # the widget's name, not the field's
        _train(nodes, prior, generator, "a red cube", "asd", 2,
               phi=nodes["ASDDiscriminatorLoRA"].build(4, "convs", "from prior", 1e-4, "from prior", -0.75, True)[0])
    with pytest.raises(RuntimeError, match="^gamma: .* out of range"):  # γ = -50 from API JSON passes no widget check
        _train(nodes, prior, generator, "a red cube", "asd", 2,
               phi=nodes["ASDDiscriminatorLoRA"].build(4, "all", "from prior", 1e-4, "custom", -50.0, True)[0])
    with pytest.raises(RuntimeError, match="^cfg: nan is not a finite number"):
        _train(nodes, prior, generator, "a red cube", "asd", 2, cfg=float("nan"))


def test_load_checkpoint_lists_only_output_and_model_folders_and_refuses_other_paths(pack, nodes, tiny_eps_dir,
                                                                                     tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior = _node_prior(pack, tiny_eps_dir)
    (generator,) = nodes["ASDImage"].build("custom", 32, "latent", "default", 0.03, "from prior", 0, 1)
    _, _, checkpoint, _ = _train(nodes, prior, generator, "a red cube", "sds", 1)
    choices = nodes["ASDLoadCheckpoint"].INPUT_TYPES()["required"]["checkpoint"][0]
    assert choices == [_label(pack, checkpoint)] and choices[0].startswith("output/asd/train/")
    for hostile in (checkpoint, "~/" + choices[0], "output/asd/../../etc", "/etc", "../output/asd/train", ""):
        with pytest.raises(RuntimeError, match="not a checkpoint folder under output/asd"):
            nodes["ASDLoadCheckpoint"].load(hostile)


def test_requeue_reuses_a_finished_run_and_a_cancelled_run_resumes_to_the_straight_result(
        pack, nodes, tiny_eps_dir, tmp_path, monkeypatch):
    """Re-running the node with the same inputs (after ComfyUI's cache is gone) runs no step; a run stopped by an
    interrupt continues from its checkpoint, and ends bit for bit where an uninterrupted run ends."""
    from safetensors.torch import load_file

    asd_nodes = __import__(pack.__name__ + ".nodes.asd_nodes", fromlist=["Progress"])
    prior = _node_prior(pack, tiny_eps_dir)
    (generator,) = nodes["ASDImage"].build("custom", 32, "latent", "default", 0.03, "from prior", 0, 3)
    steps_run = []
    original = asd_nodes.Progress.on_step

    def counting(self, info):
        steps_run.append(info.step)
        if stop_at and info.step == stop_at:
            raise KeyboardInterrupt  # what ComfyUI's Cancel raises between steps (InterruptProcessingException)
        original(self, info)

    monkeypatch.setattr(asd_nodes.Progress, "on_step", counting)
    monkeypatch.chdir(tmp_path / "straight" if (tmp_path / "straight").mkdir() is None else tmp_path)
    stop_at = None
    _, _, straight, _ = _train(nodes, prior, generator, "a red cube", "asd", 6)
    assert steps_run == [1, 2, 3, 4, 5, 6]
    steps_run.clear()
    _train(nodes, prior, generator, "a red cube", "asd", 6)
    assert steps_run == []  # the finished run is reused, not retrained

    monkeypatch.chdir(tmp_path / "cancelled" if (tmp_path / "cancelled").mkdir() is None else tmp_path)
    stop_at = 4
    with pytest.raises(KeyboardInterrupt):
        _train(nodes, prior, generator, "a red cube", "asd", 6)
    stop_at = None
    steps_run.clear()
    _, _, resumed, losses = _train(nodes, prior, generator, "a red cube", "asd", 6)
    assert steps_run == [5, 6] and len(losses["loss"]) == 6
    assert Path(resumed).relative_to(tmp_path / "cancelled") == Path(straight).relative_to(tmp_path / "straight")
    a, b = load_file(Path(straight) / "state.safetensors"), load_file(Path(resumed) / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("lora_" in k for k in prior.unet.state_dict())  # φ removed after the interrupt too


def test_run_identity_follows_what_changes_the_result(pack, tiny_eps_dir):
    specs = __import__(pack.__name__ + ".asd_engine.runs.plan", fromlist=["plan_run"])
    prior, again = _node_prior(pack, tiny_eps_dir), _node_prior(pack, tiny_eps_dir)
    image = specs.ImageGeneratorSpec(size=32)

    names = {"guidance_scale": "distill.guidance_scale", "phi_noise": "distill.phi_noise", "method": "distill.method",
             "background": "background"}

    def key(p=prior, generator=image, prompt="a red cube", steps=5, **settings):
        values = {"prompt": prompt, "steps": steps, **{names[k]: v for k, v in settings.items()}}
        return specs.plan_from_specs(p, generator, values).key()

    base = key()
    assert key(p=again) == base  # the same weights loaded twice
    assert key(guidance_scale=None) == base and key(guidance_scale=7.5) == base  # 7.5 is the prior's recipe value
    assert key(phi_noise=None) == base and key(phi_noise="fresh") == base  # fresh: this prior's recipe value
    changed = [key(prompt="a blue cube"), key(steps=6), key(guidance_scale=3.0), key(method="vsd"),
               key(phi_noise="shared"), key(generator=specs.ImageGeneratorSpec(size=32, seed=1)), key(background="black")]
    assert len(set(changed + [base])) == len(changed) + 1
    with torch.no_grad():
        again.unet.conv_in.bias.add_(1.0)
    again._fingerprint = None
    assert key(p=again) != base  # other weights, another run


def test_phi_on_a_second_model_through_the_nodes(pack, nodes, tiny_eps_dir, tiny_v_latent_dir, tmp_path, monkeypatch):
    """The official pairing as a graph: an ε prior, φ on a v-prediction model wired into ASD Discriminator."""
    monkeypatch.chdir(tmp_path)
    prior, phi_model = _node_prior(pack, tiny_eps_dir), _node_prior(pack, tiny_v_latent_dir)
    (phi,) = nodes["ASDDiscriminatorLoRA"].build(4, "from prior", "from prior", 1e-4, "custom", -0.75, False,
                                                 phi_model=phi_model)
    (generator,) = nodes["ASDImage"].build("custom", 64, "latent", "default", 0.03, "from prior", 0, 0)
    with torch.inference_mode():
        result, _, checkpoint, _ = _train(nodes, prior, generator, "a red cube", "asd", 2, phi=phi)
        assert result.step == 2 and result.config.phi_model == str(tiny_v_latent_dir)
        assert not any("lora_" in k for k in prior.unet.state_dict()) and not any(
            "lora_" in k for k in phi_model.unet.state_dict())  # φ lived on the second model and was removed
        resumed, _, _, _ = _train(nodes, prior, generator, "a red cube", "asd", 3, phi=phi, resume=checkpoint)
    assert resumed.step == 3


def test_a_missing_requirement_is_one_line_naming_requirements_txt(tmp_path):
    """In a Python without scikit-image and nerfacc the pack still imports (workflows open); a node that needs them
    fails with one line naming the packages and the pip command, not a ModuleNotFoundError traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = f"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):  # as if these were never installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("skimage", "nerfacc"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
sys.path[:0] = [{str(root)!r}, {str(root / "workflows")!r}, {str(root / "tests")!r}]
from make_workflows import load_pack
pack = load_pack()
bridge = sys.modules[pack.__name__ + ".nodes.comfy_bridge"]
print(bridge.missing_requirements())
from test_export_nodes import _nerf, _result
try:
    pack.NODE_CLASS_MAPPINGS["ASDNeRFMesh"]().convert(_result(_nerf()), 16, "custom", 25.0)
except RuntimeError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    listed, message = result.stdout.strip().splitlines()
    assert listed == "['nerfacc', 'scikit-image']"
    assert message == (f"missing Python packages nerfacc, scikit-image: run `{sys.executable} -m pip install -r "
                       f"{root / 'requirements.txt'}` and restart ComfyUI")
