"""Single-file SD 1.x / 2.x checkpoints: exact equality with the diffusers original, detection, refusals."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asd_engine.errors import UserInputError
from asd_engine.prior.loading import load_prior

from asd_engine.prior.single_file import (CheckpointInfo, V_HEURISTIC_KEY, classify, clip_tokenizer, derive_configs,
                                    detect_prediction, family_config, inspect_single_file)
from single_file_models import build_tiny_sd

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd1"), "sd1", "epsilon")


@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    """SD2-768-like: OpenCLIP text encoder (with the unused last layer in the file), v-prediction marked with
    ComfyUI's ``v_pred`` key."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd2"), "sd2", "v_prediction", marker="v_pred")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("model", ["sd1", "sd2_v"])
def test_single_file_gives_the_same_predictions_as_the_diffusers_original(model, request, no_network):
    folder, file = request.getfixturevalue(model)
    original = load_prior(folder, device="cpu")
    loaded = load_prior(file, device="cpu")
    assert loaded.prediction_type == original.prediction_type
    assert loaded.source == str(file)
    assert loaded.detected.startswith(f"{file.name}: Stable Diffusion {'2' if model == 'sd2_v' else '1'}.x, "
                                      f"{original.prediction_type} (")
    prompts = ["a photo of a cat", ""]
    assert torch.equal(loaded.tokenize(prompts), original.tokenize(prompts))
    embeddings = original.encode_prompt(prompts)
    assert torch.equal(loaded.encode_prompt(prompts), embeddings)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn((2, 4, 8, 8), generator=g), torch.tensor([10, 900])
    assert torch.equal(loaded.model_output(x_t, t, embeddings), original.model_output(x_t, t, embeddings))
    assert torch.equal(loaded.decode(x_t), original.decode(x_t))
    assert torch.equal(loaded.alphas_cumprod, original.alphas_cumprod)


def test_clip_tokenizer_has_clips_ids():
    """The shipped BPE gives OpenAI CLIP's ids (the well-known 'a photo of a cat' example); SD2 pads with '!'."""
    ids = clip_tokenizer("sd1")(["a photo of a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407] and len(ids) == 77
    assert clip_tokenizer("sd2")(["a cat"], padding="max_length", max_length=77).input_ids[0][:5] == [49406, 320, 2368, 49407, 0]
    assert len(clip_tokenizer("sd1")) == 49408


def _real_size_shapes(family: str, v: bool) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a real SD checkpoint: the published configs built on the meta device (no memory),
    written in the single-file layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from ldm_layout import clip_l_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

    config = family_config(family)
    te = dict(config["text_encoder"], num_hidden_layers=config["text_encoder"]["num_hidden_layers"] + (family == "sd2"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config["unet"])
        vae = AutoencoderKL.from_config(config["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**te))
    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    state.update(open_clip_to_ldm(text_encoder.state_dict()) if family == "sd2" else clip_l_to_ldm(text_encoder.state_dict()))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if v:
        shapes["v_pred"] = (0,)
    return shapes


@pytest.mark.parametrize("family,v", [("sd1", False), ("sd2", False), ("sd2", True)])
def test_real_checkpoint_shapes_give_the_published_configs(family, v):
    info = CheckpointInfo(None, _real_size_shapes(family, v))
    assert classify(info) == family
    detect_prediction(info)
    assert info.prediction_type == ("v_prediction" if v else "epsilon")
    configs, published = derive_configs(info), family_config(family)
    assert configs["unet"] == {**published["unet"], **(published["v_prediction_overrides"]["unet"] if v else {})}
    assert configs["vae"]["block_out_channels"] == [128, 256, 512, 512] and configs["vae"]["layers_per_block"] == 2
    assert configs["text_encoder"] == published["text_encoder"]


def test_prediction_type_signals_in_order():
    def info(**kw):
        return CheckpointInfo(None, kw.pop("shapes", {}), kw.pop("metadata", {}), family="sd2")

    assert detect_prediction(info(metadata={"modelspec.prediction_type": "v"})) == "v_prediction"
    assert detect_prediction(info(metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"})) == "v_prediction"
    assert detect_prediction(info(shapes={"v_pred": (0,)})) == "v_prediction"
    wide, narrow = torch.randn(320) * 0.3, torch.randn(320) * 0.01
    assert detect_prediction(info(shapes={V_HEURISTIC_KEY: (320,)}), read_tensor=lambda k: wide) == "v_prediction"
    assert detect_prediction(info(shapes={V_HEURISTIC_KEY: (320,)}), read_tensor=lambda k: narrow) == "epsilon"
    unmarked = info()
    assert detect_prediction(unmarked) == "epsilon" and "set prediction_type" in unmarked.prediction_source
    overridden = info(shapes={"v_pred": (0,)})
    assert detect_prediction(overridden, "epsilon") == "epsilon" and overridden.prediction_source == "set by the user"
    with pytest.raises(UserInputError, match="prediction_type"):
        detect_prediction(info(), "x0")


def test_override_from_the_loader(sd2_v):
    _, file = sd2_v
    assert load_prior(file, device="cpu", prediction_type="epsilon").prediction_type == "epsilon"


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("model.ckpt", "model.pt", "model.bin", "disguised.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state_dict": Payload()}))
        with pytest.raises(UserInputError) as error:
            load_prior(path, device="cpu")
        message = str(error.value)
        assert name in message
        assert ("convert it to .safetensors" in message) if not name.endswith(".safetensors") else "corrupt" in message
    assert not marker.exists()


def test_truncated_or_corrupt_files_get_one_clear_line(sd1, tmp_path):
    _, file = sd1
    data = file.read_bytes()
    for name, content in (("cut-data.safetensors", data[: len(data) // 2]), ("cut-header.safetensors", data[:100]),
                          ("tiny.safetensors", data[:5]), ("noise.safetensors", bytes(range(256)) * 40)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserInputError, match=f"'{name}' is not a readable safetensors file.*corrupt") as error:
            inspect_single_file(tmp_path / name)
        assert "\n" not in str(error.value)


def _fake(tmp_path: Path, name: str, shapes: dict[str, tuple[int, ...]]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


UNET = "model.diffusion_model."
SD1_PARTS = {UNET + "input_blocks.0.0.weight": (32, 4, 3, 3), UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 64),
             "first_stage_model.encoder.conv_in.weight": (32, 3, 3, 3),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 64),
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 64),
             "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (96, 64)}


@pytest.mark.parametrize("name,shapes,expected", [
    ("sdxl", {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 8),
              UNET + "input_blocks.0.0.weight": (8, 4, 3, 3)}, "SDXL"),
    ("sd3", {UNET + "joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,)}, "Stable Diffusion 3"),
    ("flux", {"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "Flux"),
    ("inpaint", {**SD1_PARTS, UNET + "input_blocks.0.0.weight": (32, 9, 3, 3)}, "inpainting"),
    ("lora", {"lora_unet_down_blocks_0.lora_down.weight": (4, 8)}, "no model.diffusion_model UNet"),
    ("no-vae", {k: v for k, v in SD1_PARTS.items() if not k.startswith("first_stage")}, "has no VAE"),
    ("mismatch", {**SD1_PARTS, UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 1024)},
     "cross-attention expects 1024"),
])
def test_unsupported_families_are_named(tmp_path, name, shapes, expected):
    path = _fake(tmp_path, name, shapes)
    with pytest.raises(UserInputError, match=expected) as error:
        load_prior(path, device="cpu")
    assert path.name in str(error.value) and "\n" not in str(error.value)


def test_cli_runs_on_a_single_file_and_says_what_it_detected(sd2_v, tmp_path):
    _, file = sd2_v
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "asd_engine", "distill-2d", "--model", str(file), "--prompt",
                             "a red cube", "--steps", "2", "--size", "32", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model: sd2.safetensors: Stable Diffusion 2.x, v_prediction (the v_pred marker" in result.stderr
    assert json.loads((out / "run.json").read_text())["config"]["model"] == str(file)
    (tmp_path / "x.ckpt").write_bytes(b"")
    bad = subprocess.run([sys.executable, "-m", "asd_engine", "distill-2d", "--model", str(tmp_path / "x.ckpt"),
                          "--prompt", "a", "--steps", "1", "--out", str(tmp_path / "bad")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--model: 'x.ckpt' is a pickle checkpoint" in bad.stderr


def test_incomplete_files_name_what_is_missing_and_old_text_encoder_keys_load(sd1, tmp_path):
    from safetensors.torch import load_file

    folder, file = sd1
    state = load_file(str(file))
    missing = dict(state)
    del missing["model.diffusion_model.out.2.bias"]
    save_file(missing, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(UserInputError, match="'incomplete.safetensors' is incomplete: its UNet lacks 1 weights"):
        load_prior(tmp_path / "incomplete.safetensors", device="cpu")
    # Early SD1 files name the text encoder without the "text_model." level.
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in state.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    prompts = ["a photo of a cat"]
    assert torch.equal(load_prior(tmp_path / "old.safetensors", device="cpu").encode_prompt(prompts),
                       load_prior(folder, device="cpu").encode_prompt(prompts))


def test_load_sd_model_lists_only_files_it_can_load_reading_each_header_once(pack, sd1, tmp_path, monkeypatch):
    """SD 1.x/2.x safetensors are listed, SDXL / LoRA / non-checkpoint files are left out (judged from the header),
    pickles stay listed (choosing one says how to convert it); a header is read again only when the file changes."""
    import os

    from safetensors.torch import save_file

    bridge = __import__(pack.__name__ + ".nodes.comfy_bridge", fromlist=["loadable_checkpoints"])
    single = __import__(pack.__name__ + ".asd_engine.prior.single_file", fromlist=["header_problem"])
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, tmp_path / "sdxl.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)},
              tmp_path / "lora.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 8)
    (tmp_path / "old.ckpt").write_bytes(b"never opened")
    files = {p.name: str(p) for p in [sd1[1], *sorted(tmp_path.iterdir())]}
    reads = []
    monkeypatch.setattr(single, "header_problem", lambda path, real=single.header_problem: reads.append(path) or real(path))
    monkeypatch.setattr(bridge, "_header_verdicts", {})
    assert bridge.loadable_checkpoints(files) == [sd1[1].name, "old.ckpt"]
    assert len(reads) == 4  # every safetensors file once; the pickle is never opened
    assert bridge.loadable_checkpoints(files) == [sd1[1].name, "old.ckpt"] and len(reads) == 4  # cached
    stat = os.stat(tmp_path / "lora.safetensors")
    os.utime(tmp_path / "lora.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    bridge.loadable_checkpoints(files)
    assert reads[4:] == [str(tmp_path / "lora.safetensors")]  # only the changed file is read again
    assert "SDXL" in single.header_problem(tmp_path / "sdxl.safetensors")
