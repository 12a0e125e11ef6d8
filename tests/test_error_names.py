"""Every engine error names an input the user can actually type, in the CLI and in the nodes.

The engine raises ``UserInputError(name, problem, fix)`` with ``name`` a settings field (``distill.gamma``) or an
input (``resume``) and writes ``{=name}`` where a fix mentions another; the CLI renders them as flags
(``settings.flag_of``), the nodes as widgets (``settings.widget_of``). These tests check the names statically (every
call site), check that every flag and widget the table promises exists, and run a few real bad inputs through the CLI.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from asd_engine.cli import build_parser, main
from asd_engine.runs import settings
from asd_engine.runs.settings import BY_FIELD, INPUTS, flag_of, widget_of

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "asd_engine"
PLACEHOLDER = re.compile(r"\{=([A-Za-z_][A-Za-z0-9_.]*)\}")
KNOWN = set(BY_FIELD) | set(INPUTS)
# Engine-internal config fields with no flag and no widget: a value the user cannot type can only come from a
# checkpoint's or a library caller's config, so settings.py's validation may name them (and nothing else may).
CONFIG_ONLY = {"phi.prompt_template"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _cli_names() -> tuple[set[str], set[str]]:
    """(every option string of every subcommand, every positional's name)."""
    options, positionals = set(), set()
    for sub in _subparsers(build_parser()).values():
        for action in sub._actions:
            if action.option_strings:
                options.update(action.option_strings)
            else:
                positionals.add(action.dest)
    return options, positionals


CLI_OPTIONS, CLI_POSITIONALS = _cli_names()


def _source_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py")) + sorted((ROOT / "nodes").glob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _called(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _name_problems(path: Path, tree: ast.AST) -> list[str]:
    in_cli = ENGINE / "cli" in path.parents
    fails_too = path == ENGINE / "runs" / "settings.py"
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        called = _called(node)
        if called != "UserInputError" and not (fails_too and called == "_fail"):
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue  # a variable (input_name, a row's field): its sources are checked where they are literals
        name = first.value
        if in_cli and name.startswith("--"):
            if name not in CLI_OPTIONS:
                problems.append(f"{_where(path, node)}: {called}({name!r}) is no flag of any subcommand")
        elif name not in KNOWN and not (fails_too and name in CONFIG_ONLY):
            problems.append(f"{_where(path, node)}: {called}({name!r}) is neither a settings field nor an input")
    return problems


def _placeholder_problems(path: Path, tree: ast.AST) -> list[str]:
    skip = _docstrings(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            for name in PLACEHOLDER.findall(node.value):
                if name not in KNOWN:
                    problems.append(f"{_where(path, node)}: {{={name}}} is neither a settings field nor an input")
    return problems


def _input_name_problems(path: Path, tree: ast.AST) -> list[str]:
    problems = []
    for node in ast.walk(tree):
        defaults: list[tuple[ast.arg, ast.AST | None]] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            positional = node.args.posonlyargs + node.args.args
            defaults += list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
            defaults += list(zip(node.args.kwonlyargs, node.args.kw_defaults))
            for arg, default in defaults:
                if (arg.arg == "input_name" and isinstance(default, ast.Constant) and isinstance(default.value, str)
                        and default.value not in KNOWN):
                    problems.append(f"{_where(path, node)}: input_name defaults to {default.value!r}")
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                value = keyword.value
                if (keyword.arg == "input_name" and isinstance(value, ast.Constant) and isinstance(value.value, str)
                        and value.value not in KNOWN):
                    problems.append(f"{_where(path, node)}: passes input_name={value.value!r}")
    return problems


def _scan(check, files) -> list[str]:
    problems = []
    for path in files:
        problems += check(path, ast.parse(path.read_text(), filename=str(path)))
    return problems


# ------------------------------------------------------------------------------------------------ (a) call sites
def test_every_error_names_a_field_or_an_input():
    problems = _scan(_name_problems, _source_files())
    assert not problems, "errors naming no field/input (add a settings.INPUTS row, or use the field):\n" + \
        "\n".join(problems)


def test_config_only_names_are_real_config_fields():
    from asd_engine.runs.configs import Distill2DConfig, TextTo3DConfig

    for name in CONFIG_ONLY:
        assert name not in KNOWN
        for config in (Distill2DConfig(prompt="x"), TextTo3DConfig(prompt="x")):
            assert settings.has_field(config, name), name


def test_every_placeholder_names_a_field_or_an_input():
    problems = _scan(_placeholder_problems, _source_files())
    assert not problems, "\n".join(problems)


def test_every_input_name_is_a_field_or_an_input():
    problems = _scan(_input_name_problems, _source_files() + sorted((ROOT / "benchmarks").glob("*.py")))
    assert not problems, "\n".join(problems)


def test_the_scan_catches_bad_names(tmp_path):
    """The scanner itself: a flag, an unknown name and an unknown placeholder are each found."""
    source = ('def f(x, input_name="--model"):\n'
              '    raise UserInputError("--gamma", "bad", "use {=distill.gama}")\n'
              'g(input_name="no_such_input")\n'
              'raise UserInputError("distill.gamma", "bad", "use {=distill.method}")\n')
    path = ENGINE / "runs" / "example.py"  # never written: only its place in the tree matters
    tree = ast.parse(source)
    assert len(_name_problems(path, tree)) == 1
    assert len(_placeholder_problems(path, tree)) == 1
    assert len(_input_name_problems(path, tree)) == 2
    cli_path = ENGINE / "cli" / "example.py"
    assert not _name_problems(cli_path, ast.parse('UserInputError("--gamma", "bad", "fix")'))
    assert _name_problems(cli_path, ast.parse('UserInputError("--no-such-flag", "bad", "fix")'))


def test_no_flag_literals_in_the_engine_outside_the_cli():
    """Outside asd_engine/cli only the settings table spells flags (its flag column); errors and help use names."""
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    problems = []
    for path in sorted(ENGINE.rglob("*.py")):
        if ENGINE / "cli" in path.parents:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        table_flags = set()
        if path == ENGINE / "runs" / "settings.py":
            table_flags = {id(n.args[1]) for n in ast.walk(tree) if isinstance(n, ast.Call) and _called(n) == "S"
                           and len(n.args) > 1}
            table_flags |= {id(e) for n in ast.walk(tree) if isinstance(n, ast.Tuple) for e in n.elts[:1]}
        skip = _docstrings(tree) | table_flags
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if flag.search(node.value):
                    problems.append(f"{_where(path, node)}: {node.value!r}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------ (b) the table
def _node_inputs(pack) -> set[str]:
    names = set()
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        types = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            names.update(types.get(group, {}))
    return names


def _table() -> list[tuple[str, str | None, str | None]]:
    return [(s.field, s.flag, s.widget) for s in BY_FIELD.values()] + \
        [(name, flag, widget) for name, (flag, widget) in INPUTS.items()]


def test_every_flag_of_the_table_is_an_option_of_some_subcommand():
    missing = [f"{name} → {flag}" for name, flag, _ in _table() if flag is not None and flag not in CLI_OPTIONS]
    assert not missing, "flags in settings.py that no subcommand has:\n" + "\n".join(missing)
    # an input without a flag is a positional (clip-score's images) or has no CLI at all (node-only); fields
    # without either (phi.camera_dropout) come from a checkpoint's or a library caller's config
    for name, flag, widget in _table():
        if flag is None and widget is None and name in INPUTS:
            assert name in CLI_POSITIONALS, f"{name}: no flag, no widget and no positional of that name"
        assert flag_of(name) == (flag or name)
        assert widget_of(name) == (widget or name)


def test_every_widget_of_the_table_is_an_input_of_some_node(pack):
    inputs = _node_inputs(pack)
    missing = sorted({f"{name} → {widget}" for name, _, widget in _table() if widget is not None
                      and widget not in inputs})
    if missing:
        print("node widgets named in settings.py that no node has:", ", ".join(missing))
    assert not missing, "node widgets named in settings.py that no node has: " + ", ".join(missing)


# ------------------------------------------------------------------------------------------------ (c) the CLI
FIELD_STYLE = re.compile(r"\b(?:distill|phi)\.[a-z_]+")
FLAG = re.compile(r"--[a-z][a-z-]*")


def _bad_inputs(model: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    base = ["distill-2d", "--prompt", "a red cube", "--steps", "2", "--size", "32", "--out", str(tmp_path / "o")]
    with_model = base + ["--model", str(model)]
    return {
        "gamma above 0": (with_model + ["--gamma", "0.5"], "--gamma"),
        "cfg not finite": (with_model + ["--cfg", "nan"], "--cfg"),
        "t_min above t_max": (with_model + ["--t-min", "0.9", "--t-max", "0.1"], "--t-min"),
        "vsd with gamma": (with_model + ["--method", "vsd", "--gamma", "-0.5"], "--gamma"),
        "missing model folder": (base + ["--model", str(tmp_path / "no-such-model")], "--model"),
        "resume a missing checkpoint": (base + ["--resume", str(tmp_path / "no-such-checkpoint")], "--resume"),
        "size not multiple of 8": (with_model + ["--size", "36"], "--size"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(Path("m"), Path("t"))))
def test_cli_errors_name_real_flags(case, tiny_eps_dir, tmp_path, capsys):
    args, expected = _bad_inputs(tiny_eps_dir, tmp_path)[case]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    named = FLAG.findall(err.split(":", 2)[1])  # the name the line starts with
    assert named == [expected], (case, err)
    unknown = [flag for flag in FLAG.findall(err) if flag not in CLI_OPTIONS]
    assert not unknown, (case, unknown, err)
    assert not FIELD_STYLE.search(err), (case, err)
    assert "{=" not in err, err


def test_cli_renders_placeholders_in_fixes(tiny_eps_dir, tmp_path, capsys):
    args, _ = _bad_inputs(tiny_eps_dir, tmp_path)["vsd with gamma"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--method" in err and "--gamma" in err, err


def test_every_known_name_renders_to_a_flag_or_positional_or_is_node_only():
    """A CLI rendering of any field or input is a real flag, a positional, or (node-only inputs) never on the CLI."""
    for name, flag, widget in _table():
        rendered = flag_of(name)
        assert rendered in CLI_OPTIONS or rendered in CLI_POSITIONALS or (flag is None and widget is not None) or \
            name in BY_FIELD and BY_FIELD[name].flag is None, name
    assert settings.flag_of("distill.gamma") == "--gamma" and settings.widget_of("distill.gamma") == "gamma"
