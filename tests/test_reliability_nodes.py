"""Issue 27 through the nodes in plain Python: every bad input gets the nodes' one-line error (``widget: problem;
fix``, a RuntimeError), never a traceback from deep inside, and nothing is written for it.

- The Train Loop's ``resume`` reads only the folders Load ASD Checkpoint lists (output/asd, models/asd), with one
  message whether or not the path exists.
- None or a wrong type from Python, NaN / inf / out-of-range numbers from API JSON and combo values outside the
  list are refused by each node's own INPUT_TYPES before any work.
- An empty (collapsed) NeRF renders its background, and its mesh export says it is empty.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_nodes import _node_prior, _train, nodes  # noqa: F401  (the fixture)

NAN, INF = float("nan"), float("inf")
REFUSED = "is not a checkpoint folder under output/asd or models/asd"


def _one_line(excinfo) -> str:
    """The message of a node error: a RuntimeError of one line, raised without a chained traceback."""
    exc = excinfo.value
    assert type(exc) is RuntimeError, repr(exc)
    assert exc.__cause__ is None and exc.__suppress_context__ or exc.__context__ is None, repr(exc.__context__)
    message = str(exc)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def _pack_module(pack, name: str):
    return __import__(f"{pack.__name__}.{name}", fromlist=["_"])


@pytest.fixture(scope="module")
def eps_prior(pack, tiny_eps_dir):
    return _node_prior(pack, tiny_eps_dir)


@pytest.fixture
def image_generator(nodes):
    (generator,) = nodes["ASDImage"].build("custom", 32, "latent", "default", 0.03, "from prior", 0, 1)
    return generator


def _train_inputs(prior, generator, **changes) -> dict:
    """ASD Train Loop's inputs by name, all valid (2 SDS steps), with ``changes`` applied."""
    inputs = dict(prior=prior, generator=generator, prompt="a red cube", negative_prompt="", method="sds",
                  steps_source="custom", steps=2, cfg_source="custom", cfg=7.5, weighting="sds",
                  t_range_source="custom", t_min=0.02, t_max=0.98, background="from prior",
                  noise_sharing="from prior")
    inputs.update(changes)
    return inputs


def _legacy_train_inputs(prior, generator, **changes) -> dict:
    inputs = dict(prior=prior, generator=generator, prompt="a red cube", negative_prompt="", method="sds", steps=2,
                  cfg=7.5, weighting="sds", t_min=0.02, t_max=0.98, noise_sharing="from prior")
    inputs.update(changes)
    return inputs


# ------------------------------------------------------------------------------- the Train Loop's resume folder
def test_resume_reads_only_the_folders_load_checkpoint_lists(pack, nodes, eps_prior, image_generator, tmp_path,
                                                              monkeypatch):
    """A real checkpoint copied outside output/asd, reached through a symlink or '..', a system folder, a missing
    path, a relative path: all refused before planning, with one message that does not depend on what exists.
    The run's own checkpoint (absolute path) and its Load ASD Checkpoint label still resume."""
    monkeypatch.chdir(tmp_path)
    _, _, checkpoint, _ = _train(nodes, eps_prior, image_generator, "a red cube", "sds", 1)
    outside = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(checkpoint, outside)  # a valid checkpoint, only in the wrong place
    link = tmp_path / "output" / "asd" / "link"
    link.symlink_to(outside.parent, target_is_directory=True)
    missing = tmp_path / "no_such_folder" / "checkpoint"
    hostile = [str(outside), str(link / "checkpoint"), str(tmp_path / "output" / "asd" / ".." / ".." / "elsewhere"
                                                          / "checkpoint"),
               "/etc", str(missing), "output/asd/../elsewhere/checkpoint", "elsewhere/checkpoint", ""]
    shapes = set()
    for train in (nodes["ASDTrain"].train, nodes["ASDTrainLoop"].train):
        legacy = train.__self__.__class__.__name__ == "ASDTrainLoop"
        for path in hostile:
            inputs = (_legacy_train_inputs if legacy else _train_inputs)(eps_prior, image_generator, steps=3,
                                                                          resume=path)
            with pytest.raises(RuntimeError) as excinfo, torch.inference_mode():
                train(**inputs)
            message = _one_line(excinfo)
            assert message.startswith(f"resume: '{path}' {REFUSED}; connect Load ASD Checkpoint"), message
            shapes.add(message.replace(f"'{path}'", "'…'"))
    assert len(shapes) == 1, shapes  # existing or not, inside a symlink or not: the same words
    assert (outside / "checkpoint.json").is_file()  # and nothing read was touched

    label = _pack_module(pack, "nodes.comfy_bridge").checkpoint_choices()
    (own_label,) = [k for k, v in label.items() if v.resolve() == Path(checkpoint).resolve()]
    for resume in (checkpoint, own_label):
        result, _, _, losses = _train(nodes, eps_prior, image_generator, "a red cube", "sds", 2, resume=resume)
        assert result.step == 2 and len(losses["loss"]) == 2


# ------------------------------------------------------------------------ None and wrong types from Python
@pytest.fixture
def nerf_result():
    """What the output nodes read of a 3D ASD_RESULT: a tiny untrained NeRF (a blob of density ≈ 10)."""
    from asd_engine.scene.field import FieldConfig
    from asd_engine.scene.nerf import NeRFGenerator
    from asd_engine.scene.render import RenderConfig

    nerf = NeRFGenerator(FieldConfig(n_levels=2, log2_hashmap_size=10, hidden_dim=8), RenderConfig())
    return SimpleNamespace(kind="nerf", nerf=nerf, step=0, config=None, checkpoint=None)


WRONG_TYPES = [  # (node, function's inputs changed from valid ones, the message's start)
    ("ASDTrain", {"prior": None}, "prior: None is not an ASD_PRIOR; connect the output of Load SD Model (ASD)"),
    ("ASDTrain", {"generator": "x"}, "generator: 'x' is not an ASD_GENERATOR; connect the output of NeRF Generator"),
    ("ASDTrain", {"steps": "5"}, "steps: '5' is not an integer; give a number in 1 ≤ value ≤ 100000"),
    ("ASDTrain", {"steps": 2.0}, "steps: 2.0 is not an integer"),
    ("ASDTrain", {"cfg": None}, "cfg: None is not a number; give a number in 0 ≤ value ≤ 1000"),
    ("ASDTrain", {"phi": 123}, "phi: 123 is not an ASD_PHI; connect the output of ASD Discriminator"),
    ("ASDTrain", {"resume": 5}, "resume: 5 is not an ASD_CHECKPOINT; connect the output of Load ASD Checkpoint"),
    ("ASDTrain", {"prompt": None}, "prompt: None is not text; give a text value"),
    ("ASDTrain", {"method": "gan"}, "method: 'gan' is not one of asd, vsd, sds; choose one of asd, vsd, sds"),
    ("ASDTrain", {"cfg_source": True}, "cfg_source: True is not one of from prior, custom"),
    ("ASDTrainLoop", {"cfg": "7"}, "cfg: '7' is not a number; give a number in 0 ≤ value ≤ 100"),
    ("ASDTrainLoop", {"generator": None}, "generator: None is not an ASD_GENERATOR"),
    ("ASDDiscriminatorLoRA", {"lora_rank": 2.5}, "lora_rank: 2.5 is not an integer"),
    ("ASDDiscriminatorLoRA", {"camera_embedding": "yes"}, "camera_embedding: 'yes' is not on/off; use true or false"),
    ("ASDDiscriminatorLoRA", {"phi_model": "sd21"}, "phi_model: 'sd21' is not an ASD_PRIOR"),
    ("ASDDiscriminatorTI", {"ti_init_word": 7}, "ti_init_word: 7 is not text"),
    ("ASDNeRFGenerator", {"seed": True}, "seed: True is not an integer"),
    ("ASDNeRFGenerator", {"resolution_schedule": None}, "resolution_schedule: None is not text"),
    ("ASDImage", {"size": None}, "size: None is not an integer"),
    ("ASDRenderViews", {"result": None}, "result: None is not an ASD_RESULT; connect the output of ASD Train Loop"),
    ("ASDRenderViews", {"views": "4"}, "views: '4' is not an integer"),
    ("ASDExportNeRFMesh", {"filename_prefix": None}, "filename_prefix: None is not text"),
    ("ASDNeRFMesh", {"result": "output/asd/x"}, "result: 'output/asd/x' is not an ASD_RESULT"),
    ("ASDSaveCheckpoint", {"result": None}, "result: None is not an ASD_RESULT"),
    ("ASDLoadCheckpoint", {"checkpoint": None}, "checkpoint: None is not text"),
    ("ASDLoadPrior", {"model": None}, "model: None is not text"),
    ("ASDLoadPrior", {"precision": "fp8"}, "precision: 'fp8' is not one of auto, fp32, fp16, bf16"),
    ("ASDSaveMeshGLB", {"mesh": None}, "mesh: None is not a MESH; connect a node's MESH output"),
]


def _valid_inputs(name: str, prior, generator, result) -> dict:
    return {
        "ASDTrain": lambda: _train_inputs(prior, generator),
        "ASDTrainLoop": lambda: _legacy_train_inputs(prior, generator),
        "ASDDiscriminatorLoRA": lambda: dict(lora_rank=4, lora_targets="from prior", learning_rate_source="from prior",
                                             learning_rate=1e-4, gamma_source="custom", gamma=-0.75,
                                             camera_embedding=True),
        "ASDDiscriminatorTI": lambda: dict(ti_tokens=1, ti_init_word="thing", learning_rate=5e-3,
                                           gamma_source="from prior", gamma=-0.75),
        "ASDNeRFGenerator": lambda: dict(preset="toy-cpu", resolution_schedule="", batch_size=1, seed=0),
        "ASDImage": lambda: dict(size_source="custom", size=32, parameterization="latent",
                                 learning_rate_source="default", learning_rate=0.03, jitter_source="from prior",
                                 jitter=0, seed=0),
        "ASDRenderViews": lambda: dict(result=result, views=2, size=16, elevation=15.0, distance=1.5, fov=70.0,
                                       background="white"),
        "ASDExportNeRFMesh": lambda: dict(result=result, resolution=32, threshold_source="custom", threshold=5.0,
                                          format="glb", filename_prefix="mesh"),
        "ASDNeRFMesh": lambda: dict(result=result, resolution=32, threshold_source="custom", threshold=5.0),
        "ASDExportMesh": lambda: dict(result=result, resolution=32, threshold=5.0, format="glb",
                                      filename_prefix="mesh"),
        "ASDNeRFToMesh": lambda: dict(result=result, resolution=32, threshold=5.0),
        "ASDSaveCheckpoint": lambda: dict(result=result, filename_prefix="saved"),
        "ASDLoadCheckpoint": lambda: dict(checkpoint="output/asd/none/checkpoint"),
        "ASDLoadPrior": lambda: dict(model="asd-toy-prior (embedded, 32 px)", precision="auto",
                                     prediction_type="auto"),
        "ASDSaveMeshGLB": lambda: dict(mesh=None, filename_prefix="mesh"),
    }[name]()


def _call(pack, nodes, name: str, inputs: dict):
    node = nodes[name]
    with torch.inference_mode():  # as ComfyUI runs nodes
        return getattr(node, type(node).FUNCTION)(**inputs)


def _assert_refused_before_any_work(pack, nodes, name, inputs, expected, tmp_path, monkeypatch) -> None:
    """The node refuses ``inputs`` with one line starting ``expected``, before any work: no run folder, no file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError) as excinfo:
        _call(pack, nodes, name, inputs)
    assert _one_line(excinfo).startswith(expected), str(excinfo.value)
    assert not (tmp_path / "output").exists()


@pytest.mark.parametrize("name, changes, expected", WRONG_TYPES,
                         ids=[f"{n}-{next(iter(c))}={c[next(iter(c))]!r}" for n, c, _ in WRONG_TYPES])
def test_none_and_wrong_types_from_python_get_the_nodes_one_line_error(pack, nodes, eps_prior, image_generator,
                                                                        nerf_result, tmp_path, monkeypatch, name,
                                                                        changes, expected):
    _assert_refused_before_any_work(pack, nodes, name, {**_valid_inputs(name, eps_prior, image_generator, nerf_result),
                                                         **changes}, expected, tmp_path, monkeypatch)


def test_a_missing_or_unknown_input_is_one_line_too(pack, nodes, eps_prior, image_generator):
    inputs = _train_inputs(eps_prior, image_generator)
    del inputs["cfg"]
    with pytest.raises(RuntimeError) as excinfo:
        nodes["ASDTrain"].train(**inputs)
    assert _one_line(excinfo) == "cfg: no value given; connect it or set its widget"
    with pytest.raises(RuntimeError) as excinfo:
        nodes["ASDTrain"].train(**_train_inputs(eps_prior, image_generator, guidance=3))
    assert _one_line(excinfo).startswith("ASDTrain: got an unexpected keyword argument 'guidance'")


def test_every_node_refuses_none_for_its_first_required_input(pack, nodes, tmp_path, monkeypatch):
    """Every node of the pack, legacy ones included, checks its inputs: all of them None → the first one's name."""
    import inspect

    monkeypatch.chdir(tmp_path)
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        required = cls.INPUT_TYPES()["required"]
        function = getattr(nodes[key], cls.FUNCTION)
        first = next(n for n in inspect.signature(function).parameters if n in required)
        with pytest.raises(RuntimeError) as excinfo:
            function(**{name: None for name in required})
        assert _one_line(excinfo).startswith(f"{first}: None is not "), (key, str(excinfo.value))
    assert not (tmp_path / "output").exists()


# ------------------------------------------------------------------------------ numbers from API JSON
NUMBERS = [  # training settings (the engine validates them too) and the output nodes' own
    ("ASDTrain", {"cfg": NAN}, "cfg: nan is not a finite number; give a number in 0 ≤ value ≤ 1000"),
    ("ASDTrain", {"cfg": INF}, "cfg: inf is not a finite number"),
    ("ASDTrain", {"t_min": NAN}, "t_min: nan is not a finite number; give a number in 0 ≤ value ≤ 1"),
    ("ASDTrain", {"t_max": 1.5}, "t_max: 1.5 is out of range; use 0 ≤ value ≤ 1"),
    ("ASDTrain", {"steps": 0}, "steps: 0 is out of range; use 1 ≤ value ≤ 100000"),
    ("ASDTrainLoop", {"cfg": NAN}, "cfg: nan is not a finite number; give a number in 0 ≤ value ≤ 100"),
    ("ASDTrainLoop", {"t_min": -INF}, "t_min: -inf is not a finite number"),
    ("ASDDiscriminatorLoRA", {"gamma": -50.0}, "gamma: -50 is out of range; use -1 ≤ value ≤ 0"),
    ("ASDDiscriminatorLoRA", {"gamma": NAN}, "gamma: nan is not a finite number; give a number in -1 ≤ value ≤ 0"),
    ("ASDDiscriminatorLoRA", {"learning_rate": NAN}, "learning_rate: nan is not a finite number"),
    ("ASDDiscriminatorTI", {"gamma": 0.5}, "gamma: 0.5 is out of range; use -1 ≤ value ≤ 0"),
    ("ASDImage", {"learning_rate": -1.0}, "learning_rate: -1 is out of range"),
    ("ASDNeRFGenerator", {"batch_size": 0}, "batch_size: 0 is out of range; use 1 ≤ value ≤ 64"),
    ("ASDRenderViews", {"views": 0}, "views: 0 is out of range; use 1 ≤ value ≤ 360"),
    ("ASDRenderViews", {"size": -32}, "size: -32 is out of range; use 16 ≤ value ≤ 2048"),
    ("ASDRenderViews", {"fov": NAN}, "fov: nan is not a finite number; give a number in 10 ≤ value ≤ 120"),
    ("ASDRenderViews", {"distance": 0.0}, "distance: 0 is out of range; use 0.5 ≤ value ≤ 10"),
    ("ASDRenderViews", {"elevation": NAN}, "elevation: nan is not a finite number; give a number in -89 ≤ value ≤ 89"),
    ("ASDRenderViews", {"background": "purple"}, "background: 'purple' is not one of white, black, learned"),
    ("ASDExportNeRFMesh", {"threshold": NAN}, "threshold: nan is not a finite number; give a number in 0 ≤ value ≤ 1000"),
    ("ASDExportNeRFMesh", {"resolution": 0}, "resolution: 0 is out of range; use 16 ≤ value ≤ 512"),
    ("ASDExportNeRFMesh", {"format": "stl"}, "format: 'stl' is not one of glb, obj, glb+obj; choose one of glb, obj, glb+obj"),
    ("ASDExportNeRFMesh", {"format": "glb+stl"}, "format: 'glb+stl' is not one of glb, obj, glb+obj"),
    ("ASDExportNeRFMesh", {"format": "obj+glb"}, "format: 'obj+glb' is not one of glb, obj, glb+obj"),
    ("ASDNeRFMesh", {"threshold": NAN}, "threshold: nan is not a finite number"),
    ("ASDNeRFMesh", {"resolution": 0}, "resolution: 0 is out of range; use 16 ≤ value ≤ 512"),
    ("ASDExportMesh", {"format": "ply"}, "format: 'ply' is not one of glb, obj, glb+obj"),
    ("ASDExportMesh", {"threshold": INF}, "threshold: inf is not a finite number"),
    ("ASDNeRFToMesh", {"threshold": NAN}, "threshold: nan is not a finite number"),
]


@pytest.mark.parametrize("name, changes, expected", NUMBERS,
                         ids=[f"{n}-{next(iter(c))}={c[next(iter(c))]!r}" for n, c, _ in NUMBERS])
def test_nan_and_out_of_range_values_are_refused_with_the_widgets_name(pack, nodes, eps_prior, image_generator,
                                                                        nerf_result, tmp_path, monkeypatch, name,
                                                                        changes, expected):
    _assert_refused_before_any_work(pack, nodes, name, {**_valid_inputs(name, eps_prior, image_generator, nerf_result),
                                                         **changes}, expected, tmp_path, monkeypatch)


def test_a_value_the_node_ignores_still_has_to_be_a_number(nodes, eps_prior, image_generator):
    """cfg NaN with cfg_source 'from prior' is refused too: ComfyUI's own min/max check would refuse any other bad
    value of that widget, so NaN is not the one that slips through."""
    with pytest.raises(RuntimeError) as excinfo:
        nodes["ASDTrain"].train(**_train_inputs(eps_prior, image_generator, cfg_source="from prior", cfg=NAN))
    assert _one_line(excinfo).startswith("cfg: nan is not a finite number")


def test_valid_edge_values_pass(nodes, nerf_result, tmp_path, monkeypatch):
    """The check refuses nothing the widgets allow: ints for FLOAT widgets, the bounds themselves."""
    monkeypatch.chdir(tmp_path)
    (phi,) = nodes["ASDDiscriminatorLoRA"].build(1, "all", "custom", 1, "custom", -1, False)
    assert phi.gamma == -1 and phi.phi.lr == 1
    with torch.inference_mode():
        images, _, alpha, _ = nodes["ASDRenderViews"].render(nerf_result, 1, 16, -89.0, 0.5, 120, "black")
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(images).all() and alpha.shape == (1, 16, 16)


# ---------------------------------------------------------------------------------- an empty NeRF
def _collapsed_result(blob_scale: float = 1000.0):
    """A NeRF with no density the renderer draws, the way training can leave one: its blob seed faded and a
    negative density bias that softplus turns into 0 (blob scale 1000) or ~1e-19 (25); no occupancy cell left."""
    from asd_engine.scene.field import FieldConfig
    from asd_engine.scene.nerf import NeRFGenerator
    from asd_engine.scene.render import RenderConfig

    nerf = NeRFGenerator(FieldConfig(n_levels=2, log2_hashmap_size=10, hidden_dim=8, density_blob_scale=blob_scale,
                                     density_blob_std=0.01), RenderConfig())
    with torch.no_grad():
        nerf.field.blob_seed.zero_()
        nerf.grid.binary.zero_()
    return SimpleNamespace(kind="nerf", nerf=nerf, step=400, config=SimpleNamespace(preset="toy-cpu"),
                           checkpoint=None)


@pytest.mark.parametrize("blob_scale", [1000.0, 25.0], ids=["zero", "1e-19"])
def test_mesh_export_of_an_empty_nerf_says_it_is_empty_and_writes_nothing(nodes, tmp_path, monkeypatch,
                                                                           blob_scale):
    """The engine's 'empty' error, named by the nodes' input ('result', not the CLI's checkpoint)."""
    monkeypatch.chdir(tmp_path)
    result = _collapsed_result(blob_scale)
    calls = [("ASDExportNeRFMesh", ("export", (result, 32, "from preset", 25.0, "glb+obj", "empty"))),
             ("ASDNeRFMesh", ("convert", (result, 32, "custom", 5.0))),
             ("ASDExportMesh", ("export", (result, 32, 5.0, "glb", "empty"))),
             ("ASDNeRFToMesh", ("convert", (result, 32, 5.0)))]
    for name, (function, args) in calls:
        with pytest.raises(RuntimeError) as excinfo, torch.inference_mode():
            getattr(nodes[name], function)(*args)
        message = _one_line(excinfo)
        assert message.startswith("result: the NeRF is empty: ") and "; " in message, (name, message)
    assert not (tmp_path / "output").exists()


def test_a_mesh_with_no_faces_is_refused_as_empty(pack, nodes, nerf_result, tmp_path, monkeypatch):
    """Whatever extract_mesh makes of a nearly empty field, a mesh without faces is never written."""
    import trimesh

    monkeypatch.chdir(tmp_path)
    export = _pack_module(pack, "asd_engine.scene.export")
    monkeypatch.setattr(export, "extract_mesh", lambda *a, **k: trimesh.Trimesh())
    with pytest.raises(RuntimeError) as excinfo, torch.inference_mode():
        nodes["ASDExportNeRFMesh"].export(nerf_result, 32, "custom", 5.0, "glb", "empty")
    assert _one_line(excinfo).startswith("result: the NeRF is empty: its mesh has no faces; train longer")
    assert not (tmp_path / "output").exists()


def test_render_views_of_an_empty_nerf_shows_its_background(nodes):
    with torch.inference_mode():
        images, depth, alpha, normals = nodes["ASDRenderViews"].render(_collapsed_result(), 2, 16, 15.0, 1.5, 70.0,
                                                                       "white")
    assert torch.equal(images, torch.ones_like(images)) and torch.all(alpha == 0) and torch.all(depth == 0)
    assert all(math.isfinite(float(t.sum())) for t in (images, depth, alpha, normals))
