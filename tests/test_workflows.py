"""Shareable workflows: every UI-format graph and its API-format twin describe the same graph; the headless
client's offline behaviour (input parsing, overrides, refusing UI files, unreachable servers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows import comfy_client
from asd_engine.runs.configs import EXPORT_DEFAULTS, TOY_CPU_STEPS

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def ui_to_api(ui: dict, input_order, has_control) -> dict:
    """Independent reading of a UI-format file: links give the connected inputs, widgets_values (in input order,
    skipping the frontend's control_after_generate entry after inputs that have one) give the rest."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        inputs: dict = {}
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                _, source, slot, target, _, _ = links[entry["link"]]
                assert target == node["id"]
                inputs[entry["name"]] = [str(source), slot]
        values = list(node["widgets_values"])
        for name, kind in input_order(node["type"]):
            if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                continue
            if not values:  # a widget added after the file was saved (at the end): the frontend keeps its default
                break
            value = values.pop(0)
            if name not in inputs:
                inputs[name] = value
            if has_control(node["type"], name):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"{node['type']} has unread widget values {values}"
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node["title"]}}
    return api


def test_there_are_the_five_workflows_in_both_formats():
    assert set(NAMES) == {"text_to_3d_asd", "image_2d_asd", "compare_sds_vsd_asd", "mesh_to_core_save_glb",
                          "text_to_3d_sd21"}
    for name in NAMES:
        assert (WORKFLOWS / "api" / f"{name}.json").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_and_api_twin_describe_the_same_graph(name, make_workflows):
    generator = make_workflows
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert ui_to_api(ui, generator.node_inputs, generator.has_seed_control) == api
    # every link's type matches the output it leaves and the input it enters
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, source, slot, target, _, kind in ui["links"]:
        output = nodes[source]["outputs"][slot]
        assert output["type"] == kind and link_id in output["links"]
        (entry,) = [i for i in nodes[target]["inputs"] if i.get("link") == link_id]
        assert entry["type"] == kind


def test_workflow_files_are_up_to_date_with_the_nodes(make_workflows):
    generator = make_workflows
    for name, make in generator.GRAPHS.items():
        graph = make()
        assert json.loads((WORKFLOWS / f"{name}.json").read_text()) == json.loads(json.dumps(generator.to_ui(graph)))
        assert json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()) == generator.to_api(graph)


def test_workflows_use_only_known_nodes(pack, make_workflows):
    generator = make_workflows
    for name in NAMES:
        for node in json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()).values():
            assert node["class_type"] in pack.NODE_CLASS_MAPPINGS or node["class_type"] in generator.CORE_INPUTS


def test_workflows_leave_steps_mesh_threshold_and_recipe_values_to_the_preset_and_prior(pack):
    """The shipped graphs say "from preset" / "from prior" explicitly, and use no deprecated (legacy) node."""
    meshed = 0
    for name in NAMES:
        nodes = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()).values()
        for node in nodes:
            cls = pack.NODE_CLASS_MAPPINGS.get(node["class_type"])
            assert not getattr(cls, "DEPRECATED", False), (name, node["class_type"])
            inputs = node["inputs"]
            if node["class_type"] in ("ASDExportNeRFMesh", "ASDNeRFMesh"):
                assert inputs["threshold_source"] == "from preset", name
                meshed += 1
            if node["class_type"] == "ASDTrain":
                assert (inputs["steps_source"], inputs["cfg_source"], inputs["t_range_source"]) == (
                    "from preset", "from prior", "from prior"), name
            if node["class_type"] == "ASDDiscriminatorLoRA":
                assert (inputs["learning_rate_source"], inputs["gamma_source"]) == ("from prior", "from prior"), name
    assert meshed >= 3


LEGACY = ROOT / "tests" / "legacy_workflows"  # the previous version's shipped workflows, as they were


def _training_keys(api: dict, pack, monkeypatch) -> dict[str, str]:
    """Run an API graph in plain Python up to its Train Loops: the run key each would train."""
    asd_nodes = __import__(pack.__name__ + ".nodes.asd_nodes", fromlist=["train_node"])
    legacy = __import__(pack.__name__ + ".nodes.legacy_nodes", fromlist=["train_node"])
    plan = __import__(pack.__name__ + ".asd_engine.runs.plan", fromlist=["plan_from_specs"])

    def planned(prior, generator, values, phi=None, resume=None):
        return {"result": (plan.plan_from_specs(prior, generator, values, discriminator=phi).key(),)}

    monkeypatch.setattr(asd_nodes, "train_node", planned)
    monkeypatch.setattr(legacy, "train_node", planned)
    outputs: dict[str, tuple] = {}

    def evaluate(node_id: str) -> tuple:
        if node_id not in outputs:
            node = api[node_id]
            cls = pack.NODE_CLASS_MAPPINGS[node["class_type"]]
            inputs = {k: evaluate(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            out = getattr(cls(), cls.FUNCTION)(**inputs)
            outputs[node_id] = out["result"] if isinstance(out, dict) else out
        return outputs[node_id]

    return {node_id: evaluate(node_id)[0] for node_id, node in api.items()
            if node["class_type"] in ("ASDTrain", "ASDTrainLoop")}


@pytest.mark.parametrize("name", sorted(p.stem for p in LEGACY.glob("*.json")))
def test_the_previous_versions_workflows_load_and_mean_what_they_meant(name, pack, make_workflows, monkeypatch):
    """Each workflow the previous version shipped: its UI file still lines up with the (legacy) nodes' widgets, its
    graph plans exactly the runs this version's graph of the same name plans, and meshes at the same isosurface."""
    generator = make_workflows
    old_ui = json.loads((LEGACY / f"{name}.json").read_text())
    old_api = json.loads((LEGACY / "api" / f"{name}.json").read_text())
    assert ui_to_api(old_ui, generator.node_inputs, generator.has_seed_control) == old_api
    new_api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    presets = {n["inputs"]["preset"] for n in new_api.values() if n["class_type"] == "ASDNeRFGenerator"}
    for node_id, node in old_api.items():
        if node["class_type"] in ("ASDExportMesh", "ASDNeRFToMesh"):
            (preset,) = presets
            assert node["inputs"]["threshold"] == EXPORT_DEFAULTS[preset]["mesh_threshold"]
            assert new_api[node_id]["inputs"]["threshold_source"] == "from preset"
    if any(n["class_type"] == "CheckpointLoaderSimple" for n in old_api.values()):
        pytest.skip("needs core Load Checkpoint and SD 2.1's weights; its node inputs are checked above")
    old, new = _training_keys(old_api, pack, monkeypatch), _training_keys(new_api, pack, monkeypatch)
    assert old == new and len(old) >= 1


# ---------------------------------------------------------------------------------------------- client, offline
def test_client_overrides_by_id_title_and_class():
    graph = comfy_client.load_workflow(WORKFLOWS / "api" / "text_to_3d_asd.json")
    changed = comfy_client.apply_overrides(graph, ["4.steps=12", "ASD Train Loop.prompt=a blue torus",
                                                   "ASDRenderViews.views=[3]", "Load SD Model.precision=fp32"])
    assert changed["4"]["inputs"]["steps"] == 12 and changed["4"]["inputs"]["prompt"] == "a blue torus"
    assert changed["5"]["inputs"]["views"] == [3]
    assert graph["4"]["inputs"]["steps"] == TOY_CPU_STEPS  # the original is left alone (the toy-cpu preset's count)
    for bad, message in (("4.nope=1", "no input 'nope'"), ("99.steps=1", "no node '99'"), ("steps=1", "NODE.INPUT"),
                         ("SaveAnimatedWEBP.fps=1", None)):
        if message is None:
            comfy_client.apply_overrides(graph, [bad])  # one such node: fine
            continue
        with pytest.raises(comfy_client.ClientError, match=message):
            comfy_client.apply_overrides(graph, [bad])
    compare = comfy_client.load_workflow(WORKFLOWS / "api" / "compare_sds_vsd_asd.json")
    with pytest.raises(comfy_client.ClientError, match="matches nodes"):
        comfy_client.apply_overrides(compare, ["ASDTrain.steps=5"])


def test_client_refuses_ui_files_and_reports_an_unreachable_server(tmp_path, capsys):
    with pytest.raises(comfy_client.ClientError, match="UI format"):
        comfy_client.load_workflow(WORKFLOWS / "text_to_3d_asd.json")
    with pytest.raises(comfy_client.ClientError, match="does not exist"):
        comfy_client.load_workflow(tmp_path / "none.json")
    code = comfy_client.main([str(WORKFLOWS / "api" / "image_2d_asd.json"), "--server", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and ("cannot reach" in err or "no websocket" in err) and "--server" in err


def test_client_download_waits_for_the_history_the_server_writes_after_its_last_event(tmp_path, monkeypatch):
    client = comfy_client.Client("http://127.0.0.1:9", timeout=1.0)
    answers = iter([{}, {"p1": {"status": {"completed": False}}}])  # then the completed entry

    calls = []

    def history(route, payload=None):
        calls.append(route)
        return next(answers, {"p1": {"status": {"completed": True}, "outputs": {}}})

    monkeypatch.setattr(client, "_request", history)
    assert client.download("p1", tmp_path) == []
    assert calls == ["/history/p1"] * 3  # read until the entry was complete, not once
    with pytest.raises(comfy_client.ClientError, match="no completed history for prompt p2"):
        monkeypatch.setattr(client, "_request", lambda route, payload=None: {})
        client.download("p2", tmp_path)


def test_the_stable_diffusion_template_names_its_checkpoint_for_the_frontends_download_offer():
    ui = json.loads((WORKFLOWS / "text_to_3d_sd21.json").read_text())
    (loader,) = [n for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    (model,) = loader["properties"]["models"]
    assert model["name"] == loader["widgets_values"][0] == "v2-1_512-ema-pruned.safetensors"
    assert model["directory"] == "checkpoints" and model["url"].startswith("https://huggingface.co/stabilityai/")
    assert model["url"].endswith("/" + model["name"])


def test_every_template_has_a_thumbnail_beside_it():
    for name in NAMES:
        thumbnail = WORKFLOWS / f"{name}.jpg"
        assert thumbnail.is_file() and thumbnail.stat().st_size > 5_000, f"{thumbnail.name}: make it with the browser test"
