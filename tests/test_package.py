"""The repository's own contract: layout, import rules, the README's two commands, the CI script."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "asd_engine"


def test_top_level_layout_is_exactly_the_cards():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an sdist): fall back to what is on disk
        tracked = [p.name for p in ROOT.iterdir()]
    top = {path.split("/")[0] for path in tracked if not path.startswith(".") or path.startswith(".ci")}
    expected = {"__init__.py", "LICENSE", "NOTICE", "nodes", "asd_engine", "workflows", "tests", "requirements.txt", "README.md",
                "pyproject.toml", ".ci", "benchmarks", "docs"}
    assert top <= expected, f"unexpected top-level entries: {sorted(top - expected)}"
    assert top == expected, f"missing top-level entries: {sorted(expected - top)}"


def test_pack_imports_in_plain_python_without_comfyui():
    spec = importlib.util.spec_from_file_location("comfyui_asd_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) <= set(module.NODE_CLASS_MAPPINGS)
        assert "comfy" not in sys.modules and "folder_paths" not in sys.modules
    finally:
        sys.modules.pop(spec.name, None)


def test_engine_never_imports_comfyui():
    forbidden = {"comfy", "folder_paths", "server", "execution", "nodes", "comfy_extras", "comfy_api"}
    for path in ENGINE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_distillation_math_lives_in_one_short_file():
    assert len((ENGINE / "distill.py").read_text().splitlines()) < 200
    # the ε/v conversion lives in the prior only
    for path in ENGINE.rglob("*.py"):
        if path.name != "prior.py":
            assert "sigma * x_t + alpha" not in path.read_text(), path.name


def test_no_pickle_loading_anywhere():
    for path in list(ENGINE.rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(|torch\.load\(", text), path


def test_torch_is_not_pinned_for_comfyui_users_but_is_for_the_dev_setup():
    runtime = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    assert not any(re.match(r"torch\b", l) for l in runtime if l)
    assert "torch==2.13.0" in (ROOT / "tests" / "requirements.txt").read_text()


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, flags=re.S)[:2]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    main_command, test_command = _readme_commands()
    assert "python -m asd_engine" in main_command and "\n" not in main_command.strip()
    assert "pytest" in test_command and "\n" not in test_command.strip()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [l for l in ci.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert test_command.strip() in ci_commands
    assert re.search(r'"\$status" -eq 5', ci), ".ci/run must fail on pytest's exit code 5"
