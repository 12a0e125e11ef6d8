"""Publishing to the Comfy Registry: `comfy node validate` and `comfy node pack` (comfy-cli, pinned in
tests/requirements.txt) on a copy of the repository as a commit would hold it, the archive's contents, the publish
workflow and its guard.

comfy-cli's own checks (comfy_cli/command/custom_nodes/command.py `validate`): pyproject.toml parses, the version is
not empty, and a ruff scan for exec (S102), eval (S307) and two statements on one line (E702), which it only warns
about; :func:`test_the_checks_comfy_node_validate_makes_hold_without_comfy_cli` repeats them without comfy-cli and
makes the warnings failures.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
WORKFLOW = ROOT / ".github" / "workflows" / "publish.yml"
# The publisher fills these once a public repository exists (docs/publishing.md, "Fields to fill").
PUBLISHER_FIELDS = ("[project.urls] Repository", "[tool.comfy] PublisherId", "[tool.comfy] Icon")
# What the archive may hold: the pack's runtime, its licences and the text docs.
RUNTIME = re.compile(r"(__init__\.py|README\.md|CHANGELOG\.md|LICENSE|NOTICE|pyproject\.toml|requirements\.txt"
                     r"|nodes/.+\.py|asd_engine/.+|workflows/(api/)?[\w.-]+\.(json|jpg)|workflows/comfy_client\.py"
                     r"|workflows/README\.md|docs/[\w-]+\.md)")


def _comfy() -> str | None:
    """The comfy-cli executable beside this Python (the test venv), else on PATH."""
    beside = Path(sys.executable).with_name("comfy")
    return str(beside) if beside.is_file() else shutil.which("comfy")


needs_comfy_cli = pytest.mark.skipif(_comfy() is None, reason="comfy-cli is not installed: `pip install -r "
                                     "tests/requirements.txt` (it pins comfy-cli) to run the Registry's own checks")


def _repository_files() -> list[str]:
    """The files a commit of this working tree would hold: tracked and new files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    if not out.strip():
        pytest.skip("not a git checkout: the shipped files cannot be listed")
    return sorted(p for p in set(out.splitlines()) if (ROOT / p).is_file())


@pytest.fixture(scope="module")
def committed_copy(tmp_path_factory) -> Path:
    """A git repository holding this working tree's files as a commit would (comfy-cli packs `git ls-files`)."""
    copy = tmp_path_factory.mktemp("publish") / "pack"
    for name in _repository_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    return copy


def _run_comfy(copy: Path, *args: str) -> subprocess.CompletedProcess:
    home = copy.parent / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1"}
    return subprocess.run([_comfy(), "--skip-prompt", "--no-enable-telemetry", "node", *args], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=300)


@needs_comfy_cli
def test_comfy_node_validate_passes_without_warnings(committed_copy):
    result = _run_comfy(committed_copy, "validate")
    said = result.stdout + result.stderr  # comfy-cli prints its verdict to stderr
    assert result.returncode == 0, said
    assert "All validation checks passed" in said and "warning" not in said.lower(), said


@pytest.fixture(scope="module")
def archive(committed_copy) -> zipfile.ZipFile:
    if _comfy() is None:
        pytest.skip("comfy-cli is not installed: `pip install -r tests/requirements.txt`")
    result = _run_comfy(committed_copy, "pack")
    assert result.returncode == 0, result.stdout + result.stderr
    return zipfile.ZipFile(committed_copy / "node.zip")


def test_the_publish_archive_holds_only_the_runtime_and_all_of_it(archive, committed_copy):
    names = [info.filename for info in archive.infolist() if not info.is_dir()]
    size = (committed_copy / "node.zip").stat().st_size
    print(f"\nnode.zip: {len(names)} files, {size / 1e6:.2f} MB")  # shown with -s; docs/publishing.md lists it
    extra = [n for n in names if not RUNTIME.fullmatch(n)]
    assert not extra, f"the archive holds files that are not runtime (add them to .comfyignore): {extra}"
    runtime = [n for n in _repository_files() if RUNTIME.fullmatch(n)]
    missing = sorted(set(runtime) - set(names))
    assert not missing, f".comfyignore leaves runtime files out of the archive: {missing}"
    for licence in PYPROJECT["project"]["license-files"]:
        assert licence in names, licence
    assert size < 10e6, f"node.zip is {size / 1e6:.1f} MB"


def test_the_unpacked_archive_loads_its_nodes_and_the_embedded_prior(archive, tmp_path):
    """What a user gets from the Registry works on its own: the pack imports, and Load SD Model loads the embedded
    prior from the unpacked files (the model weights must not be left out)."""
    unpacked = tmp_path / "adversarial-score-distillation"
    archive.extractall(unpacked)
    script = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('unpacked_pack', {str(unpacked / '__init__.py')!r},"
        f" submodule_search_locations=[{str(unpacked)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)\n"
        "node = pack.NODE_CLASS_MAPPINGS['ASDLoadPrior']()\n"
        "model = node.INPUT_TYPES()['required']['model'][0][0]\n"
        "(prior,) = node.load(model, 'auto', 'auto')\n"
        "print(len(pack.NODE_CLASS_MAPPINGS), model, prior.native_size)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    count, *_ = result.stdout.split()
    assert int(count) >= 10 and "embedded" in result.stdout, result.stdout


def _shipped_python() -> list[Path]:
    return [ROOT / n for n in _repository_files() if n.endswith(".py") and RUNTIME.fullmatch(n)]


def test_the_checks_comfy_node_validate_makes_hold_without_comfy_cli():
    """pyproject parses with a non-empty X.Y.Z version; no shipped file calls exec or eval (ruff S102/S307, which
    the Registry's standards forbid) or puts two statements on one line with ';' (E702)."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", PYPROJECT["project"]["version"])
    for path in _shipped_python():
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert node.func.id not in ("exec", "eval"), f"{where} calls {node.func.id}"
        semicolons = [tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                      if tok.type == tokenize.OP and tok.string == ";"]
        assert not semicolons, f"{path.relative_to(ROOT)}: ';' on lines {semicolons}"


def test_the_node_id_follows_the_registrys_advice():
    name = PYPROJECT["project"]["name"]
    assert "comfy" not in name.lower(), f"{name!r}: the Registry advises against 'comfyui' in a node id"
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", name) and len(name) < 100, name


def _guard_script() -> str:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["publish-node"]["steps"]
    guard = next(step for step in steps if "python3 -" in step.get("run", ""))
    return guard["run"].split("<<'PY'\n", 1)[1].rsplit("PY", 1)[0]


def _run_guard(pyproject: str, folder: Path) -> subprocess.CompletedProcess:
    (folder / "pyproject.toml").write_text(pyproject)
    return subprocess.run([sys.executable, "-c", _guard_script()], cwd=folder, capture_output=True, text=True)


def test_the_publish_workflow_publishes_on_a_version_change_through_the_registry_action():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    push = workflow[True]["push"]  # YAML 1.1 reads the key `on` as True
    assert push["paths"] == ["pyproject.toml"] and push["branches"] == ["main"]
    steps = workflow["jobs"]["publish-node"]["steps"]
    publish = steps[-1]
    assert publish["uses"].startswith("Comfy-Org/publish-node-action@")
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert [step.get("uses", "").split("@")[0] for step in steps][0] == "actions/checkout"


def test_the_publish_workflow_refuses_while_the_publishers_fields_are_empty(tmp_path):
    """Today the fields wait for a public repository: the guard names each one; filled in, it lets publishing go on."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    refused = _run_guard(text, tmp_path)
    assert refused.returncode != 0
    for field in PUBLISHER_FIELDS:
        assert field in refused.stderr, refused.stderr
    filled = (text.replace('Repository = ""', 'Repository = "https://github.com/someone/asd"')
              .replace('PublisherId = ""', 'PublisherId = "someone"')
              .replace('Icon = ""', 'Icon = "https://raw.githubusercontent.com/someone/asd/main/docs/images/icon.svg"'))
    assert _run_guard(filled, tmp_path).returncode == 0


def test_publishing_docs_name_every_field_to_fill_and_the_icon_is_square():
    docs = (ROOT / "docs" / "publishing.md").read_text(encoding="utf-8")
    for field in PUBLISHER_FIELDS:
        assert field.split()[-1] in docs, field
    empty = [k for k, v in {**PYPROJECT["project"]["urls"], **PYPROJECT["tool"]["comfy"]}.items() if v == ""]
    for key in empty:
        assert f"`{key}`" in docs, f"pyproject's empty {key} is not explained in docs/publishing.md"
    icon = (ROOT / "docs" / "images" / "icon.svg").read_text(encoding="utf-8")
    width, height = (int(re.search(rf'{k}="(\d+)"', icon).group(1)) for k in ("width", "height"))
    assert width == height <= 400 and 'viewBox="0 0 400 400"' in icon
    assert "docs/images/icon.svg" in docs
