"""Bad models, bad harness arguments, over-long prompts, impossible sizes and emptied NeRFs (issue 27).

Each fault gets one line: ``error: <flag>: <problem>; <fix>`` and exit 2 through the CLI, a ``UserInputError`` naming
the input from the library, or (an empty NeRF, a cut prompt) a warning while the work goes on.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asd_engine.cli import main
from asd_engine.errors import UserInputError
from asd_engine.prior import default_prior_path
from asd_engine.prior.diffusion import DiffusionPrior
from asd_engine.prior.loading import load_prior

UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"
VAE_FILE = Path("vae") / "diffusion_pytorch_model.safetensors"


def one_line_error(capsys, code: int, flag: str) -> str:
    """The CLI's answer must be exit 2 and a single ``error: <flag>: ...`` line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith(f"error: {flag}: ") and "Traceback" not in err, err
    return err


def distill_2d(model: Path | str, out: Path) -> int:
    return main(["distill-2d", "--model", str(model), "--prompt", "a red cube", "--steps", "1", "--size", "32",
                 "--out", str(out)])


@pytest.fixture
def pipeline_copy(tiny_eps_dir, tmp_path) -> Path:
    """A private copy of the tiny ε pipeline a test may damage."""
    return Path(shutil.copytree(tiny_eps_dir, tmp_path / "pipeline"))


# ------------------------------------------------------------------------------------------------ symlink loops
@pytest.fixture
def symlink_loop(tmp_path) -> Path:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def test_a_symlink_loop_as_model_is_refused_by_the_loader(symlink_loop):
    with pytest.raises(UserInputError, match="symbolic link loop") as caught:
        load_prior(symlink_loop)
    assert caught.value.input_name == "model"


def test_a_symlink_loop_as_model_is_one_line_in_the_quality_harness(symlink_loop, tmp_path, capsys):
    code = main(["quality", "--model", str(symlink_loop), "--methods", "sds", "--prompts", "a red cube",
                 "--seeds", "1", "--steps", "1", "--mode", "2d", "--out", str(tmp_path / "q")])
    assert "symbolic link loop" in one_line_error(capsys, code, "--model")


def test_a_symlink_loop_as_model_is_one_line_in_a_training_run(symlink_loop, tmp_path, capsys):
    """Needs the CLI to make --model absolute without resolving links (Path.resolve raises on a loop)."""
    code = distill_2d(symlink_loop, tmp_path / "out")
    assert "symbolic link loop" in one_line_error(capsys, code, "--model")


# ------------------------------------------------------------------------------------------------ model_index.json
@pytest.mark.parametrize("content, expected", [("[1, 2]", "JSON list"), ('"unet"', "JSON string"),
                                               ("null", "JSON null"), ("{unet: ", "not valid JSON")])
def test_a_model_index_that_is_not_an_object_is_one_line(pipeline_copy, tmp_path, capsys, content, expected):
    (pipeline_copy / "model_index.json").write_text(content)
    with pytest.raises(UserInputError, match=expected) as caught:
        load_prior(pipeline_copy)
    assert caught.value.input_name == "model" and "model_index.json" in caught.value.problem
    err = one_line_error(capsys, distill_2d(pipeline_copy, tmp_path / "out"), "--model")
    assert expected in err and "model_index.json" in err


# ------------------------------------------------------------------------------------------------ pickle weights
@pytest.fixture
def no_torch_load(monkeypatch) -> list:
    """torch.load must never run on a model folder's files: record any call and fail it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


def _unet_to_pickle(folder: Path, keep_safetensors: bool) -> Path:
    state = load_file(folder / UNET_FILE)
    pickle_file = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save(state, pickle_file)  # the test writes the pickle; the engine must never read it
    if not keep_safetensors:
        (folder / UNET_FILE).unlink()
    return pickle_file


def test_a_pickle_bin_in_a_pipeline_folder_is_refused_unopened(pipeline_copy, tmp_path, capsys, no_torch_load):
    _unet_to_pickle(pipeline_copy, keep_safetensors=False)
    with pytest.raises(UserInputError, match=r"unet/diffusion_pytorch_model\.bin' is a pickle") as caught:
        load_prior(pipeline_copy)
    assert caught.value.input_name == "model" and "safetensors" in caught.value.fix
    err = one_line_error(capsys, distill_2d(pipeline_copy, tmp_path / "out"), "--model")
    assert "diffusion_pytorch_model.bin" in err and "not opened" in err
    assert no_torch_load == []


def test_a_pickle_beside_its_safetensors_twin_is_never_read(pipeline_copy, no_torch_load):
    _unet_to_pickle(pipeline_copy, keep_safetensors=True)
    prior = load_prior(pipeline_copy, device="cpu")
    assert prior.unet is not None and no_torch_load == []


def test_a_component_without_any_weights_names_it(pipeline_copy):
    (pipeline_copy / VAE_FILE).unlink()
    with pytest.raises(UserInputError, match="holds no .safetensors weights"):
        load_prior(pipeline_copy)


# ------------------------------------------------------------------------------------------------ non-finite weights
def _relabel(file: Path, dtype: str) -> str:
    """Rewrite the safetensors header so the first F32 tensor claims ``dtype`` (same byte size): returns its name."""
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    file.write_bytes(raw[:8] + text.ljust(length) + raw[8 + length:])
    return name


def test_weights_stored_as_integers_are_refused(pipeline_copy, tmp_path, capsys):
    """F32 bits read as I32 are finite numbers near 1e9 once cast: only the header can tell."""
    name = _relabel(pipeline_copy / UNET_FILE, "I32")
    with pytest.raises(UserInputError, match=f"unet weight {name} \\(I32\\) is stored as integers") as caught:
        load_prior(pipeline_copy)
    assert caught.value.input_name == "model"
    assert "stored as integers" in one_line_error(capsys, distill_2d(pipeline_copy, tmp_path / "out"), "--model")


@pytest.mark.parametrize("part", ["text_encoder", "unet"])
def test_weights_a_pipeline_lacks_are_refused_not_left_random(pipeline_copy, tmp_path, capsys, part):
    """A weight missing from the file (or stored under names this library version does not read: transformers < 5.6
    reads the embedded prior's text encoder that way) would stay at random initialisation with only a warning."""
    from safetensors.torch import load_file, save_file

    (file,) = (pipeline_copy / part).glob("*.safetensors")
    weights = load_file(file)
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, file)
    with pytest.raises(UserInputError, match=f"its {part} weights do not fit its config: 1 weights are missing") as caught:
        load_prior(pipeline_copy)
    assert caught.value.input_name == "model" and "pip install -r requirements.txt" in caught.value.fix
    assert "weights are missing" in one_line_error(capsys, distill_2d(pipeline_copy, tmp_path / "out"), "--model")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused(pipeline_copy, tmp_path, capsys, value):
    weights = load_file(pipeline_copy / VAE_FILE)
    name = sorted(weights)[3]
    weights[name].view(-1)[0] = value
    save_file(weights, pipeline_copy / VAE_FILE, metadata={"format": "pt"})
    with pytest.raises(UserInputError, match=f"vae weight {name} holds NaN or infinite values"):
        load_prior(pipeline_copy, device="cpu")
    assert "NaN or infinite" in one_line_error(capsys, distill_2d(pipeline_copy, tmp_path / "out"), "--model")


def test_a_single_file_with_non_finite_or_integer_weights_is_refused(tmp_path):
    from single_file_models import build_tiny_sd

    _, file = build_tiny_sd(tmp_path, "sd1")
    weights = load_file(file)
    key = next(k for k in sorted(weights) if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, tmp_path / "nan.safetensors")
    with pytest.raises(UserInputError, match="unet weight .* holds NaN or infinite values"):
        load_prior(tmp_path / "nan.safetensors", device="cpu")
    # any float weight relabelled as integers: first F32 tensor in the header
    shutil.copy(file, tmp_path / "int.safetensors")
    _relabel(tmp_path / "int.safetensors", "I32")
    with pytest.raises(UserInputError, match="as int32 where the model needs floats"):
        load_prior(tmp_path / "int.safetensors", device="cpu")


# ------------------------------------------------------------------------------------------------ quality harness
@pytest.mark.parametrize("args, flag", [(["--seeds", "0"], "--seeds"), (["--seeds", "-2"], "--seeds"),
                                        (["--methods", ","], "--methods"), (["--methods", "asd,xyz"], "--methods"),
                                        (["--prompts", ";"], "--prompts"), (["--steps", "0"], "--steps"),
                                        (["--cfg", "nan"], "--cfg")])
def test_quality_refuses_a_harness_that_measures_nothing(tmp_path, capsys, args, flag):
    out = tmp_path / "q"
    one_line_error(capsys, main(["quality", "--mode", "2d", "--out", str(out), *args]), flag)
    assert not out.exists()  # refused before anything is made


def test_the_quality_library_refuses_the_same(tmp_path):
    from asd_engine.toy.quality import QualitySettings, run_quality

    for settings, name in ((QualitySettings(methods=["asd"], prompts=["a red cube"], seeds=0), "seeds"),
                           (QualitySettings(methods=[], prompts=["a red cube"]), "methods"),
                           (QualitySettings(methods=["asd"], prompts=[]), "prompts"),
                           (QualitySettings(methods=["asd"], prompts=["a red cube"], field_backend="cuda"),
                            "nerf_field.backend")):
        with pytest.raises(UserInputError) as caught:
            run_quality(settings, tmp_path / "q", device="cpu", log=lambda line: None)
        assert caught.value.input_name == name
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------------------ long prompts
@pytest.fixture(scope="module")
def toy_prior() -> DiffusionPrior:
    return DiffusionPrior.from_pretrained(default_prior_path(), device="cpu")


def test_a_prompt_beyond_the_text_window_warns_once_naming_the_cut_words(toy_prior):
    window = toy_prior.tokenizer.model_max_length  # 16 for the toy prior
    prompt = "a red cube " + " ".join(["green torus"] * window)
    with pytest.warns(UserWarning, match=f"window of {window} tokens: '.*torus' is cut off") as caught:
        toy_prior.encode_prompt([prompt])
        toy_prior.encode_prompt([prompt, prompt])
    assert len([w for w in caught if "cut off" in str(w.message)]) == 1
    cut = toy_prior.cut_text(prompt)
    kept = window - toy_prior.tokenizer.num_special_tokens_to_add()
    assert len(toy_prior.tokenizer(cut, add_special_tokens=False).input_ids) == 2 * window + 3 - kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toy_prior.encode_prompt(["a blue sphere"])


def test_a_prompt_that_leaves_no_room_for_the_view_suffix_says_so(toy_prior):
    from asd_engine.prior.prompts import ViewPrompts

    room = toy_prior.tokenizer.model_max_length - toy_prior.tokenizer.num_special_tokens_to_add()
    prompt = "a red cube" + " red" * (room - 3)  # fills the window exactly: ", front view" is cut
    assert toy_prior.cut_text(prompt) == ""
    with pytest.warns(UserWarning, match="view suffixes: '.*view' is cut off"):
        ViewPrompts(toy_prior, prompt)


def test_a_cut_prompt_warns_on_a_clip_sized_window(tiny_eps_dir):
    prior = DiffusionPrior.from_pretrained(tiny_eps_dir, device="cpu")
    assert prior.tokenizer.model_max_length == 77  # CLIP's window
    with pytest.warns(UserWarning, match="'zzzz' is cut off"):  # the tiny tokenizer has one token per character
        prior.encode_prompt(["x" * 75 + "zzzz"])


# ------------------------------------------------------------------------------------------------ image memory
def test_a_size_whose_memory_cannot_fit_is_refused_with_the_estimate(prior_eps, monkeypatch):
    from asd_engine.prior import memory

    small, huge = memory.image_memory_estimate(64, prior_eps), memory.image_memory_estimate(100_000, prior_eps)
    assert 0 < small.total < huge.total and huge.total > 1024 ** 4  # 10⁵ px: terabytes
    assert memory.image_memory_estimate(64, prior_eps, "pixel").total > small.total  # pixels keep encoder maps
    assert memory.check_image_memory(64, prior_eps).total == small.total  # fits: no refusal
    with pytest.raises(UserInputError, match=r"100000 px needs at least .* TB .* but cpu has .* free") as caught:
        memory.check_image_memory(100_000, prior_eps)
    assert caught.value.input_name == "size" and "{=size}" in caught.value.fix
    monkeypatch.setattr(memory, "available_memory", lambda device: small.total)  # exactly 64 px's worth
    with pytest.raises(UserInputError, match="the model's own 64 px"):
        memory.check_image_memory(128, prior_eps)


# ------------------------------------------------------------------------------------------------ empty NeRFs
def _empty(nerf) -> None:
    """Make the density head output -30 everywhere (constant hash features through a bias-free ReLU MLP): with the
    blob's +10 at most, the density peaks near 2e-9, positive but far below what the renderer draws."""
    first, last = [m for m in nerf.field.density_head.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        nerf.field.encoding.params.fill_(1.0)
        first.weight.fill_(1.0)                                         # every hidden unit = the feature count
        last.weight.fill_(-30.0 / (first.in_features * first.out_features))
        nerf.grid.binary.zero_()


@pytest.fixture(scope="module")
def emptied_run(toy_prior):
    from asd_engine.runs.plan import NeRFGeneratorSpec, make_run

    run = make_run(toy_prior, NeRFGeneratorSpec(preset="toy-cpu", seed=0),
                   {"prompt": "a red cube", "steps": 4, "distill.method": "sds"})
    _empty(run.nerf)
    return run


def test_a_training_step_of_an_empty_nerf_warns_once_and_goes_on(emptied_run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = [emptied_run.train_step() for _ in range(2)]
    empty = [str(w.message) for w in caught if "NeRF is empty" in str(w.message)]
    assert len(empty) == 1 and empty[0].startswith("step 1 of 4:"), empty
    assert [info.extras["samples"] for info in infos] == [0.0, 0.0]
    assert emptied_run.step == 2


def test_exporting_an_empty_nerf_writes_views_and_says_the_mesh_is_empty(emptied_run, tmp_path, capsys):
    from asd_engine.scene.export import EmptyField, export_outputs, extract_mesh

    with pytest.raises(EmptyField, match="the NeRF is empty"):
        extract_mesh(emptied_run.nerf, resolution=16, coarse_resolution=16)
    written = export_outputs(emptied_run.nerf, tmp_path, views=2, size=16, mesh_resolution=16)
    err = capsys.readouterr().err
    assert err.count("warning: no mesh written: the NeRF is empty") == 1, err
    assert (tmp_path / "views" / "rgb_001.png").is_file() and (tmp_path / "turntable.webp").is_file()
    assert not (tmp_path / "mesh.glb").exists() and all(p.exists() for p in written)


def test_rendering_an_empty_nerf_checkpoint_is_not_a_traceback(emptied_run, tmp_path, capsys):
    emptied_run.save_checkpoint(tmp_path / "checkpoint")
    code = main(["render", "--checkpoint", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "out"),
                 "--views", "2", "--view-size", "16", "--mesh-resolution", "16"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    mesh_lines = [line for line in err.splitlines() if "mesh" in line]
    assert len(mesh_lines) == 1 and mesh_lines[0].startswith("warning: no mesh written: the NeRF is empty"), err
    assert (tmp_path / "out" / "turntable.webp").is_file() and not (tmp_path / "out" / "mesh.glb").exists()
