"""Host tests: the pack inside a real ComfyUI (skipped with a clear message when no host is built here).

One ComfyUI server is started for the session (the ``host`` fixture in conftest.py, shared with the other host
test modules), loading this pack through ``extra_model_paths`` (never copied in).
Workflows run through the headless client with overrides that keep them to a few seconds on a CPU.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import websocket

from workflows import comfy_client
from comfy_host import PACK_NAME, ROOT, browser_env, browser_missing_reason, fast, host_missing_reason, run_graph

reason = host_missing_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")
WORKFLOWS = ROOT / "workflows"


def test_pack_imports_inside_comfyui_without_errors(host):
    log = host.log_text()
    ours = [line for line in log.splitlines() if PACK_NAME in line]
    # ComfyUI lists every custom-node folder under "Import times for custom nodes", marking failures
    assert any("seconds:" in line for line in ours), log[-3000:]
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in ours), "\n".join(ours)
    assert host.get_json("/system_stats")["system"]["comfyui_version"]


def test_object_info_lists_every_node_with_its_inputs(host, pack):
    info = host.get_json("/object_info")
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert key in info, key
        assert info[key]["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[key]
        assert info[key]["category"].startswith("ASD/")
        assert set(info[key]["input"]["required"]) == set(cls.INPUT_TYPES()["required"])
    choices = info["ASDLoadPrior"]["input"]["required"]["model"][0]
    assert choices and choices[0].startswith("asd-toy-prior")  # the embedded prior is listed first


def test_ui_workflows_match_their_api_twins_with_the_servers_own_input_order(host):
    from test_workflows import ui_to_api

    info = host.get_json("/object_info")

    def order(class_type):
        spec = info[class_type]["input"]
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        return [(n, "COMBO" if isinstance(v[0], list) or v[0] == "COMBO" else v[0]) for n, v in inputs.items()]

    def has_control(class_type, name):  # the frontend's rule, on the server's own input specs
        spec = info[class_type]["input"]
        options = {**spec.get("required", {}), **spec.get("optional", {})}[name]
        options = options[1] if len(options) > 1 else {}
        return options.get("control_after_generate", name in ("seed", "noise_seed"))

    for path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(path.read_text())
        assert ui_to_api(ui, order, has_control) == json.loads((WORKFLOWS / "api" / path.name).read_text()), path.name
    templates = host.get_json("/workflow_templates")
    assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.mark.parametrize("name", ["image_2d_asd", "text_to_3d_asd", "compare_sds_vsd_asd", "mesh_to_core_save_glb"])
def test_each_api_workflow_runs_to_success(host, tmp_path, name):
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / f"{name}.json"))
    _, status, files = run_graph(host, graph, tmp_path)
    assert status == "success", status
    suffixes = {p.suffix for p in files}
    if name == "image_2d_asd":
        assert ".png" in suffixes
    elif name == "text_to_3d_asd":
        assert {".webp", ".png", ".glb", ".obj"} <= suffixes
    elif name == "mesh_to_core_save_glb":
        assert len([p for p in files if p.suffix == ".glb"]) == 2  # core Save GLB's and the coloured one
    else:
        assert len([p for p in files if p.suffix == ".webp"]) == 3


def test_the_stable_diffusion_template_runs_on_a_checkpoint_of_its_architecture(host, tiny_sd15, tmp_path):
    """The SD 2.1 template's graph, with the tiny SD 1.x checkpoint in place of the 5 GB file, a few steps and the
    toy-cpu NeRF (presets are tested in the engine)."""
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / "text_to_3d_sd21.json"))
    graph["10"]["inputs"]["ckpt_name"] = tiny_sd15.name
    graph["3"]["inputs"].update(preset="toy-cpu", resolution_schedule="64")
    # ~20 s: the tiny checkpoint carries a full-size VAE, encoded with gradients
    graph["4"]["inputs"].update(steps_source="custom", steps=1)
    graph.pop("9")  # core Plot Loss Graph divides by the loss range: it needs two steps (the mesh template draws one)
    _, status, files = run_graph(host, graph, tmp_path)
    assert status == "success", status + host.log_text()[-3000:]
    assert {".webp", ".glb"} <= {p.suffix for p in files}


def _events(host, graph: dict, interrupt_at: tuple[str, int] | None = None) -> tuple[str, list[dict]]:
    """Queue ``graph`` and collect its websocket events until it ends → (status, events). ``interrupt_at`` =
    (node id, step): POST /interrupt once that node reports that step."""
    client = comfy_client.Client(host.url)
    client.connect()
    prompt_id = client.queue(graph)
    events, deadline = [], time.time() + 300
    while time.time() < deadline:
        try:
            message = client.ws.recv()
        except websocket.WebSocketTimeoutException:  # a long step: keep waiting until the deadline
            continue
        if not isinstance(message, str):
            text = comfy_client.progress_text(message)  # binary frames: previews, and status lines on nodes
            if text is not None:
                events.append({"type": "progress_text", "data": {"node": text[0], "text": text[1]}})
            continue
        event = json.loads(message)
        data = event.get("data", {})
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        events.append(event)
        kind = event["type"]
        if interrupt_at and kind == "progress" and data["node"] == interrupt_at[0] and data["value"] >= interrupt_at[1]:
            client.interrupt()
            interrupt_at = None
        if kind == "execution_interrupted":
            return "interrupted", events
        if kind == "execution_error":
            return "error: " + data.get("exception_message", ""), events
        if kind == "execution_success" or (kind == "executing" and data.get("node") is None):
            return "success", events
    raise AssertionError("the graph did not finish within 300 s")


def _progress(events: list[dict], node: str) -> list[int]:
    return [e["data"]["value"] for e in events if e["type"] == "progress" and e["data"]["node"] == node]


def _texts(events: list[dict]) -> list[tuple[str, str]]:
    """(node, text) of the status lines shown on nodes (core's progress-text channel)."""
    return [(e["data"]["node"], e["data"]["text"]) for e in events if e["type"] == "progress_text"]


def _cached(events: list[dict]) -> set[str]:
    return {n for e in events if e["type"] == "execution_cached" for n in e["data"]["nodes"]}


def test_training_is_never_thrown_away_requeue_rename_and_cancel(host):
    """Queue → Cancel mid-run → Queue: training resumes at the checkpoint's step and ends where a straight run ends
    (the same bytes); queueing again, or renaming an output, runs no training step."""
    from safetensors.torch import load_file

    graph = comfy_client.load_workflow(WORKFLOWS / "api" / "text_to_3d_asd.json")
    for node in ("5", "6", "7", "8", "9"):
        graph.pop(node)
    graph["4"]["inputs"].update(steps_source="custom", steps=12, prompt="a green cone")
    graph["10"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "asd/keep"}}
    status, events = _events(host, graph, interrupt_at=("4", 3))
    assert status == "interrupted", status
    (folder,) = (host.base / "output" / "asd" / "train").glob("a_green_cone_*")
    stopped = json.loads((folder / "checkpoint" / "checkpoint.json").read_text())["step"]
    assert 3 <= stopped < 12

    status, events = _events(host, graph)
    assert status == "success", status
    assert _progress(events, "4")[0] == stopped and _progress(events, "4")[-1] == 12  # resumed, not restarted
    label = f"output/asd/train/{folder.name}/checkpoint"
    assert f"resuming {label} at step {stopped} of 12" in host.log_text()
    assert ("4", f"resuming {label} at step {stopped} of 12") in _texts(events)  # shown on the node
    assert ("4", f"checkpoint: {label} (step 12)") in _texts(events)

    status, events = _events(host, graph)  # unchanged graph: ComfyUI's cache, nothing runs
    assert status == "success" and "4" in _cached(events) and _progress(events, "4") == []
    graph["10"]["inputs"]["filename_prefix"] = "asd/renamed"  # only where things are saved changed
    status, events = _events(host, graph)
    assert status == "success" and "4" in _cached(events) and _progress(events, "4") == []
    graph["1"]["inputs"]["precision"] = "fp32"  # a cache miss upstream that computes the same: the same run
    status, events = _events(host, graph)
    assert status == "success" and _progress(events, "4") == [12]  # its finished checkpoint, no step
    assert ("4", f"reusing the finished run in {label} at step 12 of 12") in _texts(events)

    resumed = folder.with_name(folder.name + "_resumed")
    folder.rename(resumed)
    graph["1"]["inputs"]["precision"] = "auto"
    status, events = _events(host, graph)  # a straight run of the same identity
    assert status == "success" and _progress(events, "4")[:2] == [0, 1]
    a = load_file(resumed / "checkpoint" / "state.safetensors")
    b = load_file(folder / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "checkpoint" / "state.safetensors").read_bytes() == (folder / "checkpoint" / "state.safetensors").read_bytes()


def test_the_prior_goes_through_comfyuis_model_management_only_while_training():
    """In ComfyUI's own Python: Load SD Model leaves the prior unloaded; during a Train Loop ComfyUI lists it as a
    loaded model (after being asked to free the weights plus the training reserve); after it — finished or
    cancelled — ComfyUI no longer lists it, its weights are on the offload device, and no run or optimiser lives.
    Unloading goes through core's public free_memory: a model ComfyUI had loaded beside it stays loaded."""
    import os
    import subprocess

    from comfy_host import comfyui_path

    comfy = comfyui_path()
    result = subprocess.run([str(comfy / ".venv" / "bin" / "python"), str(ROOT / "tests" / "host_memory_check.py"),
                             str(comfy), str(ROOT)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["after_load"] is False
    assert report["during_training"] and all(report["during_training"]), report
    assert report["after_training"] is False and report["after_cancel"] is False, report
    assert report["cancelled"] and report["during_cancelled"] and all(report["during_cancelled"]), report
    assert all(asked > report["unet_bytes"] for asked in report["memory_required"]), report
    assert report["bystander_before"] and report["bystander_after_cancel"], report
    assert report["prior_device"] == report["offload_device"] and not report["lora_left"], report
    assert report["alive"] == [], report


def test_a_core_sd_graph_runs_after_ours_in_the_same_server(host, tiny_sd15, tmp_path):
    _, status, _ = run_graph(host, fast(comfy_client.load_workflow(WORKFLOWS / "api" / "image_2d_asd.json")), tmp_path)
    assert status == "success", status
    core = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "core_after_asd"}},
    }
    _, status, files = run_graph(host, core, tmp_path / "core")
    assert status == "success", status + host.log_text()[-3000:]
    assert any(p.suffix == ".png" for p in files)


def test_load_checkpoint_refuses_paths_outside_its_folders_through_post_prompt(host):
    graph = {"1": {"class_type": "ASDLoadCheckpoint", "inputs": {"checkpoint": ""}},
             "2": {"class_type": "ASDRenderViews", "inputs": {"result": ["1", 1], "views": 1, "size": 16,
                                                              "elevation": 15.0, "distance": 1.5, "fov": 70.0,
                                                              "background": "white"}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    before = len(host.get_json("/history"))
    for hostile in ("/etc", "~/.ssh", "../../../etc", "output/asd/../../../etc", str(host.base / "output")):
        graph["1"]["inputs"]["checkpoint"] = hostile
        with pytest.raises(comfy_client.ClientError, match="node 1"):
            comfy_client.Client(host.url).queue(graph)
    time.sleep(0.5)
    assert len(host.get_json("/history")) == before  # nothing ran


def test_a_bad_graph_yields_node_errors_through_the_client(host, tmp_path, capsys):
    path = tmp_path / "bad.json"
    graph = comfy_client.load_workflow(WORKFLOWS / "api" / "image_2d_asd.json")
    graph["4"]["inputs"]["method"] = "gan"          # not one of asd/vsd/sds
    graph["3"]["inputs"]["size"] = "large"          # not an integer
    path.write_text(json.dumps(graph))
    before = len(host.get_json("/history"))
    code = comfy_client.main([str(path), "--server", host.url, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err, err
    assert "node 4 'ASD Train Loop'" in err and "node 3" in err
    time.sleep(1.0)
    assert len(host.get_json("/history")) == before  # nothing of the graph ran


def test_prior_from_core_load_checkpoint_computes_what_comfyui_computes(tiny_sd15):
    """In ComfyUI's own Python, under inference mode as nodes run: core Load Checkpoint → our adapter → a prior
    whose text embeddings and UNet output equal ComfyUI's own, and equal our single-file loader's on the file."""
    import subprocess

    from comfy_host import comfyui_path

    comfy = comfyui_path()
    result = subprocess.run([str(comfy / ".venv" / "bin" / "python"), str(ROOT / "tests" / "host_adapter_check.py"),
                             str(comfy), str(ROOT), str(tiny_sd15)], capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["prediction"] == "epsilon" and "Stable Diffusion 1.x, epsilon" in report["detected"]
    assert report["params_requiring_no_inference"]
    assert report["text_vs_comfyui"] < 1e-4 and report["unet_vs_comfyui"] < 1e-4, report
    assert report["unet_nodes_vs_file"] == 0.0 and report["vae_nodes_vs_file"] == 0.0, report


def test_core_load_checkpoint_feeds_the_train_loop(host, tiny_sd15, tmp_path):
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / "image_2d_asd.json"))
    graph["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": tiny_sd15.name}}
    graph["1"] = {"class_type": "ASDPriorFromCheckpoint",
                  "inputs": {"model": ["10", 0], "clip": ["10", 1], "vae": ["10", 2], "precision": "fp32"}}
    graph["3"]["inputs"]["size"] = 64
    graph["4"]["inputs"].update(steps_source="custom", steps=2)
    _, status, files = run_graph(host, graph, tmp_path)
    assert status == "success", status + host.log_text()[-3000:]
    assert any(p.suffix == ".png" for p in files)
    assert "[ASD] Prior from checkpoint: Load Checkpoint: Stable Diffusion 1.x, epsilon (ComfyUI's model sampling)" \
        in host.log_text()


def test_load_sd_model_lists_checkpoint_files_and_refuses_pickles(host, tiny_sd15, tmp_path):
    """It lists the SD 1.x file and the pickle (which it refuses with the fix), and leaves out an SDXL file, saying
    why in the console."""
    from safetensors.torch import save_file

    (host.base / "checkpoints" / "old.ckpt").write_bytes(b"not opened")
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)},
              host.base / "checkpoints" / "sdxl_like.safetensors")
    choices = host.get_json("/object_info/ASDLoadPrior")["ASDLoadPrior"]["input"]["required"]["model"][0]
    assert tiny_sd15.name in choices and "old.ckpt" in choices and "sdxl_like.safetensors" not in choices
    assert "Load SD Model leaves out models/checkpoints/sdxl_like.safetensors: 'sdxl_like.safetensors' is an SDXL " \
        "checkpoint" in host.log_text()
    core = host.get_json("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]
    assert "sdxl_like.safetensors" in core["ckpt_name"][0]  # core's own loader still offers it
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / "image_2d_asd.json"))
    graph["1"]["inputs"]["model"] = tiny_sd15.name
    graph["3"]["inputs"]["size"] = 64
    graph["4"]["inputs"].update(steps_source="custom", steps=2)
    _, status, _ = run_graph(host, graph, tmp_path / "ok")
    assert status == "success", status
    graph["1"]["inputs"]["model"] = "old.ckpt"
    _, status, _ = run_graph(host, graph, tmp_path / "bad")
    assert status.startswith("error: node 1") and "'old.ckpt' is a pickle checkpoint" in status, status


@pytest.mark.skipif(browser_missing_reason() is not None, reason=browser_missing_reason() or "")
def test_ui_workflows_load_in_the_real_web_page_with_no_missing_node_types(host, tmp_path):
    import os
    import subprocess

    files = [str(p) for p in sorted(WORKFLOWS.glob("*.json"))]
    proc = subprocess.run(["node", str(ROOT / "tests" / "ui" / "load_workflows.mjs"), host.url, str(tmp_path), *files],
                          env=browser_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(missing) == {Path(f).stem for f in files}
    assert all(report["missing_types"] == [] for report in missing.values()), missing
    # the Stable Diffusion template makes the frontend offer its checkpoint; the toy graphs need no download
    assert missing["text_to_3d_sd21"]["missing_models"] == ["checkpoints / v2-1_512-ema-pruned.safetensors"], missing
    assert all(r["missing_models"] == [] for name, r in missing.items() if name != "text_to_3d_sd21"), missing
    assert all((tmp_path / f"{Path(f).stem}.png").stat().st_size > 10_000 for f in files)
    if os.environ.get("ASD_WRITE_THUMBNAILS"):  # refresh the templates' thumbnails from these screenshots
        from PIL import Image

        for f in files:
            shot = Image.open(tmp_path / f"{Path(f).stem}.png").convert("RGB")
            shot.resize((800, 500), Image.LANCZOS).save(WORKFLOWS / f"{Path(f).stem}.jpg", quality=85)
    for f in files:  # ComfyUI serves each template's thumbnail beside it
        with urllib.request.urlopen(f"{host.url}/api/workflow_templates/{PACK_NAME}/{Path(f).stem}.jpg") as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize("flags, dtype", [([], "float32"), (["--force-fp32"], "float32"),
                                          (["--fp16-unet"], "float16"), (["--bf16-unet"], "bfloat16")])
def test_auto_precision_follows_comfyuis_dtype_flags(flags, dtype):
    """'auto' precision is core's choice for a diffusion model on its device: --force-fp32 gives fp32, --fp16-unet
    and --bf16-unet their dtypes (on this CPU host core's default is fp32); an explicit precision wins."""
    import os
    import subprocess

    from comfy_host import comfyui_path

    comfy = comfyui_path()
    result = subprocess.run([str(comfy / ".venv" / "bin" / "python"), str(ROOT / "tests" / "host_precision_check.py"),
                             str(comfy), str(ROOT), *flags], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"auto": f"torch.{dtype}", "fp32": "torch.float32", "core": f"torch.{dtype}"}, report


def _executed(events: list[dict]) -> set[str]:
    return {e["data"]["node"] for e in events if e["type"] == "executing" and e["data"].get("node") is not None}


def test_load_checkpoint_runs_no_prior_for_3d_and_runs_again_when_the_checkpoint_changed(host):
    """Load ASD Checkpoint's 'prior' is lazy: for a 3D checkpoint the linked Load SD Model never runs. Its outputs
    are cached while the checkpoint on disk is unchanged, and refreshed when it changed (IS_CHANGED)."""
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / "text_to_3d_asd.json"))
    graph = {key: graph[key] for key in ("1", "2", "3", "4")}
    graph["4"]["inputs"]["prompt"] = "a lazy yellow cube"
    status, _ = _events(host, graph)
    assert status == "success", status
    (folder,) = (host.base / "output" / "asd" / "train").glob("a_lazy_yellow_cube_*")
    label = f"output/asd/train/{folder.name}/checkpoint"
    loader = {"class_type": "ASDLoadPrior", "inputs": {"model": graph["1"]["inputs"]["model"], "precision": "fp32",
                                                       "prediction_type": "auto"}}
    views = {"1": loader, "2": {"class_type": "ASDLoadCheckpoint", "inputs": {"checkpoint": label, "prior": ["1", 0]}},
             "3": {"class_type": "ASDRenderViews", "inputs": {"result": ["2", 1], "views": 2, "size": 32,
                   "elevation": 15.0, "distance": 1.5, "fov": 70.0, "background": "white"}},
             "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    status, events = _events(host, views)
    assert status == "success", status
    assert "1" not in _executed(events) and {"2", "3"} <= _executed(events)  # the prior was never loaded
    status, events = _events(host, views)
    assert status == "success" and _executed(events) & {"1", "2", "3"} == set()  # unchanged: cached
    meta = folder / "checkpoint" / "checkpoint.json"
    meta.write_text(meta.read_text())  # the run's folder written again (as a resumed run does)
    status, events = _events(host, views)
    assert status == "success" and {"2", "3"} <= _executed(events) and "1" not in _executed(events)
