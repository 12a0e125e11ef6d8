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
                "pyproject.toml", ".ci", "benchmarks", "docs", "CHANGELOG.md"}
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
        if path != ENGINE / "prior" / "diffusion.py":
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


def _engine_import_graph() -> dict[str, set[str]]:
    """``module → engine modules it imports`` (relative imports anywhere in the file, function-level ones too)."""
    def name(path: Path) -> str:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in ENGINE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        deps = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and id(node) not in typing_only:
                target = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        graph[module] = {d for d in deps if d in modules and d != module}
    return graph


# The engine's layers, lowest first: a module may import its own package and the layers below, never above.
ENGINE_LAYERS = [{"errors", "devices", "images", "distill", "clip_score"}, {"scene"}, {"prior"}, {"runs"}, {"toy"},
                 {"cli", "__main__"}]


def test_engine_imports_run_one_way():
    graph = _engine_import_graph()

    def layer(module: str) -> int:
        part = module.split(".")[1] if "." in module else ""
        return next((i for i, names in enumerate(ENGINE_LAYERS) if part in names), -1)  # asd_engine itself: -1

    for module, deps in graph.items():
        for dep in deps:
            assert module not in graph[dep], f"{module} and {dep} import each other"
            assert layer(dep) <= layer(module), f"{module} (lower layer) imports {dep}"

    def depth(module: str, seen: tuple = ()) -> int:
        assert module not in seen, f"import cycle: {' → '.join(seen + (module,))}"
        return 1 + max((depth(d, seen + (module,)) for d in graph[module]), default=0)

    assert max(depth(m) for m in graph) <= 12  # 13 before the engine was split by role


def test_the_toy_prior_and_the_comfyui_client_stay_out_of_the_core():
    graph = _engine_import_graph()
    core = [m for m in graph if m.split(".")[1:2][0:1] and m.split(".")[1] in {"prior", "scene", "runs"}]
    for module in core:
        assert not any(d.startswith("asd_engine.toy") for d in graph[module]), module
    assert not (ENGINE / "comfy_client.py").exists() and (ROOT / "workflows" / "comfy_client.py").is_file()


def test_no_source_file_is_git_ignored():
    """An ignore rule meant for outputs (``runs/``) once hid the new ``asd_engine/runs/`` modules from commits."""
    sources = [str(p.relative_to(ROOT)) for folder in ("asd_engine", "nodes", "tests", "workflows", "benchmarks")
               for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts and "node_modules" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sources], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert sources and not ignored, f"ignored by .gitignore: {ignored}"


def test_nodes_use_only_core_model_management_functions_never_edit_its_lists():
    """ComfyUI's loaded-model list belongs to core: the pack reads it at most, and loads/unloads through
    load_models_gpu / free_memory (a later core may rename or restructure the list)."""
    for path in (ROOT / "nodes").rglob("*.py"):
        text = path.read_text()
        edits = re.findall(r"current_loaded_models\s*(?:\.\s*(?:pop|remove|append|insert|clear|extend)\b|\[[^\]]*\]\s*=)"
                           r"|del\s+\S*current_loaded_models", text)
        assert not edits, f"{path.name} edits comfy.model_management.current_loaded_models: {edits}"
