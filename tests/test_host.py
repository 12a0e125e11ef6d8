"""Host tests: the pack inside a real ComfyUI (skipped with a clear message when no host is built here).

One ComfyUI server is started for the session (the ``host`` fixture in conftest.py, shared with the other host
test modules), loading this pack through ``extra_model_paths`` (never copied in).
Workflows run through the headless client with overrides that keep them to a few seconds on a CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from asd_engine import comfy_client
from comfy_host import PACK_NAME, ROOT, fast, host_missing_reason, run_graph

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

    for path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads(path.read_text())
        assert ui_to_api(ui, order) == json.loads((WORKFLOWS / "api" / path.name).read_text()), path.name
    templates = host.get_json("/workflow_templates")
    assert sorted(templates[PACK_NAME]) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.mark.parametrize("name", ["image_2d_asd", "text_to_3d_asd", "compare_sds_vsd_asd"])
def test_each_api_workflow_runs_to_success(host, tmp_path, name):
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / f"{name}.json"))
    _, status, files = run_graph(host, graph, tmp_path)
    assert status == "success", status
    suffixes = {p.suffix for p in files}
    if name == "image_2d_asd":
        assert ".png" in suffixes
    elif name == "text_to_3d_asd":
        assert {".webp", ".png", ".glb", ".obj"} <= suffixes
    else:
        assert len([p for p in files if p.suffix == ".webp"]) == 3


def test_interrupt_stops_training_quickly_and_the_checkpoint_resumes(host, tmp_path):
    graph = comfy_client.load_workflow(WORKFLOWS / "api" / "text_to_3d_asd.json")
    graph["4"]["inputs"].update(steps=5000, filename_prefix="interrupt_test")
    for node in ("5", "6", "7", "8", "9"):
        graph.pop(node)
    graph["10"] = {"class_type": "ASDSaveCheckpoint", "inputs": {"result": ["4", 0], "filename_prefix": "never"}}
    client = comfy_client.Client(host.url)
    client.connect()
    prompt_id = client.queue(graph)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few training steps were reported
        event = json.loads(client.ws.recv())
        if event.get("type") == "progress" and event["data"].get("node") == "4" and event["data"]["value"] >= 3:
            break
    started = time.time()
    client.interrupt()
    status = client.follow(prompt_id, log=open("/dev/null", "w"))
    stopped_after = time.time() - started
    assert status == "interrupted" and stopped_after < 5.0, (status, stopped_after)
    (folder,) = sorted((host.base / "output" / "asd").glob("interrupt_test_*"))
    meta = json.loads((folder / "checkpoint" / "checkpoint.json").read_text())
    assert 3 <= meta["step"] < 5000
    resume = {
        "1": graph["1"], "2": graph["2"], "3": graph["3"],
        "20": {"class_type": "ASDLoadCheckpoint", "inputs": {"checkpoint": str(folder / "checkpoint")}},
        "4": {**graph["4"], "inputs": {**graph["4"]["inputs"], "steps": meta["step"] + 2,
                                       "filename_prefix": "resumed_test", "resume": ["20", 0]}},
        "10": {"class_type": "ASDSaveCheckpoint", "inputs": {"result": ["4", 0], "filename_prefix": "resumed_saved"}},
    }
    _, status, _ = run_graph(host, resume, tmp_path)
    assert status == "success", status
    (saved,) = sorted((host.base / "output" / "asd").glob("resumed_saved_*"))
    assert json.loads((saved / "checkpoint" / "checkpoint.json").read_text())["step"] == meta["step"] + 2


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
    graph["4"]["inputs"]["steps"] = 2
    _, status, files = run_graph(host, graph, tmp_path)
    assert status == "success", status + host.log_text()[-3000:]
    assert any(p.suffix == ".png" for p in files)
    assert "[ASD] Prior from checkpoint: Load Checkpoint: Stable Diffusion 1.x, epsilon (ComfyUI's model sampling)" \
        in host.log_text()


def test_load_sd_model_lists_checkpoint_files_and_refuses_pickles(host, tiny_sd15, tmp_path):
    (host.base / "checkpoints" / "old.ckpt").write_bytes(b"not opened")
    choices = host.get_json("/object_info/ASDLoadPrior")["ASDLoadPrior"]["input"]["required"]["model"][0]
    assert tiny_sd15.name in choices and "old.ckpt" in choices
    graph = fast(comfy_client.load_workflow(WORKFLOWS / "api" / "image_2d_asd.json"))
    graph["1"]["inputs"]["model"] = tiny_sd15.name
    graph["3"]["inputs"]["size"] = 64
    graph["4"]["inputs"]["steps"] = 2
    _, status, _ = run_graph(host, graph, tmp_path / "ok")
    assert status == "success", status
    graph["1"]["inputs"]["model"] = "old.ckpt"
    _, status, _ = run_graph(host, graph, tmp_path / "bad")
    assert status.startswith("error: node 1") and "'old.ckpt' is a pickle checkpoint" in status, status


def _ui_tools() -> str | None:
    """Why the browser test cannot run, or None."""
    import os
    import shutil

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    modules = os.environ.get("PLAYWRIGHT_CORE_DIR", str(ROOT / "tests" / "ui" / "node_modules" / "playwright-core"))
    if not shutil.which("node"):
        return "node is not installed"
    if not os.path.exists(chromium):
        return f"no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"
    if not os.path.isdir(modules):
        return (f"playwright-core not found at {modules} (npm install --prefix tests/ui playwright-core, "
                "or set PLAYWRIGHT_CORE_DIR)")
    return None


@pytest.mark.skipif(_ui_tools() is not None, reason=_ui_tools() or "")
def test_ui_workflows_load_in_the_real_web_page_with_no_missing_node_types(host, tmp_path):
    import os
    import subprocess

    modules = os.environ.get("PLAYWRIGHT_CORE_DIR", str(ROOT / "tests" / "ui" / "node_modules" / "playwright-core"))
    files = [str(p) for p in sorted(WORKFLOWS.glob("*.json"))]
    proc = subprocess.run(["node", str(ROOT / "tests" / "ui" / "load_workflows.mjs"), host.url, str(tmp_path), *files],
                          env=dict(os.environ, PLAYWRIGHT_CORE_DIR=str(Path(modules).parent)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(missing) == {Path(f).stem for f in files}
    assert all(types == [] for types in missing.values()), missing
    assert all((tmp_path / f"{Path(f).stem}.png").stat().st_size > 10_000 for f in files)
