"""Issue 27 through a real ComfyUI (``POST /prompt``): what a user of the server sees for a ``resume`` path outside
the allowed folders, a NaN cfg, and γ = −50. Skipped when no host is built (tests/comfy_host.py).

Each graph is refused before any training step: the resume and NaN graphs when our Train Loop runs (ComfyUI's
validation lets both through), γ = −50 by ComfyUI's own validation (the widget's minimum).
"""

from __future__ import annotations

import json
import math
import time

import pytest

from comfy_host import host_missing_reason, post
from workflows import comfy_client

reason = host_missing_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

TOY_PRIOR = "asd-toy-prior (embedded, 32 px)"


def _graph(prompt: str, **train_inputs) -> dict:
    """Toy prior → 32 px image → ASD Train Loop (2 SDS steps) → Save Image."""
    train = {"prior": ["1", 0], "generator": ["3", 0], "prompt": prompt, "negative_prompt": "", "method": "sds",
             "steps_source": "custom", "steps": 2, "cfg_source": "from prior", "cfg": 3.0, "weighting": "from prior",
             "t_range_source": "from prior", "t_min": 0.02, "t_max": 0.98, "background": "from prior",
             "noise_sharing": "from prior"}
    train.update(train_inputs)
    return {
        "1": {"class_type": "ASDLoadPrior", "inputs": {"model": TOY_PRIOR, "precision": "auto",
                                                       "prediction_type": "auto"}},
        "3": {"class_type": "ASDImage", "inputs": {"size_source": "custom", "size": 32, "parameterization": "latent",
                                                   "learning_rate_source": "default", "learning_rate": 0.03,
                                                   "jitter_source": "from prior", "jitter": 0, "seed": 0}},
        "4": {"class_type": "ASDTrain", "inputs": train},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "asd/reliability"}},
    }


def _run(host, graph: dict) -> str:
    """Queue ``graph`` (ComfyUI's validation must accept it) and wait → the client's status line."""
    client = comfy_client.Client(host.url)
    client.connect()
    prompt_id = client.queue(graph)
    return client.follow(prompt_id, log=open("/dev/null", "w"))


def _runs(host, prompt: str) -> list:
    return list((host.base / "output" / "asd" / "train").glob(prompt.replace(" ", "_") + "_*"))


def test_resume_outside_the_allowed_folders_fails_with_one_line_whether_or_not_it_exists(host):
    """An ASD_CHECKPOINT link input given as a literal path in API JSON: ComfyUI checks nothing of it, so the
    Train Loop must. A system folder, a missing path, a folder beside output/ that holds a checkpoint.json, and
    the same folder reached through output/asd/../..: the same words for each; none is read and no run starts."""
    outside = host.base / "elsewhere" / "checkpoint"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "checkpoint.json").write_text(json.dumps({"kind": "distill-2d", "step": 1}))
    shapes = set()
    for path in ("/etc", str(host.base / "missing" / "checkpoint"), str(outside),
                 str(host.base / "output" / "asd" / ".." / ".." / "elsewhere" / "checkpoint")):
        status = _run(host, _graph("a resume probe", resume=path))
        assert status.startswith("error: node 4 (ASDTrain): resume: "), status
        assert f"'{path}' is not a checkpoint folder under output/asd or models/asd; connect Load ASD Checkpoint" \
            in status, status
        assert "\n" not in status and "Traceback" not in status, status
        shapes.add(status.replace(f"'{path}'", "'…'"))
    assert len(shapes) == 1, shapes
    assert _runs(host, "a resume probe") == []  # refused before planning: no run folder


def test_a_nan_cfg_passes_comfyuis_validation_and_the_train_loop_refuses_it(host):
    """Python's json writes NaN and ComfyUI's server parses it; ComfyUI's min/max check lets NaN through (every
    comparison with NaN is false), so the node's message is what the user sees. Infinity is above the widget's
    maximum: ComfyUI itself refuses it at POST /prompt."""
    graph = _graph("a nan probe", cfg_source="custom", cfg=math.nan)
    assert "NaN" in json.dumps(graph)
    status = _run(host, graph)
    assert status == ("error: node 4 (ASDTrain): cfg: nan is not a finite number; give a number in "
                      "0 ≤ value ≤ 1000"), status
    assert _runs(host, "a nan probe") == []

    graph["4"]["inputs"]["cfg"] = math.inf
    with pytest.raises(comfy_client.ClientError) as excinfo:
        comfy_client.Client(host.url).queue(graph)
    assert "node 4 'ASDTrain': Value inf bigger than max of 1000.0 (cfg)" in str(excinfo.value), str(excinfo.value)


def test_gamma_below_the_widgets_minimum_is_refused_by_comfyuis_own_validation(host):
    """γ = −50 on ASD Discriminator (LoRA): ComfyUI refuses it at POST /prompt (node_errors, nothing queued),
    with its own wording; the node's check (tests/test_reliability_nodes.py) covers direct calls."""
    graph = _graph("a gamma probe", method="asd", phi=["2", 0])
    graph["2"] = {"class_type": "ASDDiscriminatorLoRA", "inputs": {
        "lora_rank": 4, "lora_targets": "from prior", "learning_rate_source": "from prior", "learning_rate": 1e-4,
        "gamma_source": "custom", "gamma": -50.0, "camera_embedding": False}}
    before = len(host.get_json("/history"))
    answer = None
    try:
        post(host, "/prompt", {"prompt": graph})
    except Exception as exc:  # urllib raises HTTPError for ComfyUI's 400; its body is the answer
        answer = json.loads(exc.read())
    assert answer is not None, "ComfyUI accepted γ = -50"
    (error,) = answer["node_errors"]["2"]["errors"]
    assert error["message"] == "Value -50.0 smaller than min of -1" and error["details"] == "gamma", error
    with pytest.raises(comfy_client.ClientError) as excinfo:  # what the headless client prints
        comfy_client.Client(host.url).queue(graph)
    assert "node 2 'ASDDiscriminatorLoRA': Value -50.0 smaller than min of -1 (gamma)" in str(excinfo.value)
    time.sleep(0.5)
    assert len(host.get_json("/history")) == before and _runs(host, "a gamma probe") == []
