"""Comfy Registry metadata: pyproject's [project] / [tool.comfy], the licence files and the notices.

The field rules are those of https://docs.comfy.org/registry/specifications and of comfy-cli's parser
(comfy_cli/registry/config_parser.py), which is what `comfy node publish` sends to the Registry.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]

APACHE_HEADER = ["Apache License", "Version 2.0, January 2004", "http://www.apache.org/licenses/"]
# file names that carry a licence or a notice; any such file below the root is a shipped third-party notice
NOTICE_NAMES = ("*LICENSE*", "*LICENCE*", "*COPYING*", "*NOTICE*")
# comfy-cli accepts exactly these (anything else makes it drop all OS / accelerator information)
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
COMFY_VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")


def _requirement_lines(path: Path) -> list[str]:
    """Requirement lines of a pip requirements file (comments, blank lines and pip options dropped)."""
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _distribution_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group().lower().replace("_", "-")


def _repository_files() -> list[str]:
    """Tracked files plus new files that git does not ignore (what a commit, and `comfy node publish`, would ship)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if not out.strip():
        pytest.skip("not a git checkout: the shipped files cannot be listed")
    return sorted(set(out.splitlines()))


def _third_party_notice_files() -> list[str]:
    return [path for path in _repository_files()
            if "/" in path and any(fnmatch.fnmatch(path.rsplit("/", 1)[1].upper(), p) for p in NOTICE_NAMES)]


def test_project_table_has_what_the_registry_needs():
    name, version = PROJECT["name"], PROJECT["version"]
    # node id: < 100 chars, alphanumerics and - _ . only, no two special characters in a row, starts with a letter
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name), name
    assert not re.search(r"[._-]{2}", name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"version must be X.Y.Z, got {version!r}"
    assert PROJECT["description"].strip()
    assert PROJECT["requires-python"].startswith(">=")


def test_license_is_apache_2_and_its_files_are_shipped():
    assert PROJECT["license"] == "Apache-2.0"  # SPDX expression (PEP 639); comfy-cli sends it as {"text": ...}
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert [line.strip() for line in license_text.strip().splitlines()[:3]] == APACHE_HEADER
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    files = PROJECT["license-files"]
    assert "LICENSE" in files and "NOTICE" in files
    for pattern in files:
        assert list(ROOT.glob(pattern)), f"license-files entry {pattern!r} matches no file"


def test_dependencies_equal_requirements_txt_and_leave_torch_to_comfyui():
    requirements = _requirement_lines(ROOT / "requirements.txt")
    dependencies = [dep.strip() for dep in PROJECT["dependencies"]]
    assert len(set(dependencies)) == len(dependencies), "duplicate entries in [project].dependencies"
    assert sorted(dependencies) == sorted(requirements), (
        "[project].dependencies and requirements.txt differ: "
        f"only in pyproject {sorted(set(dependencies) - set(requirements))}, "
        f"only in requirements.txt {sorted(set(requirements) - set(dependencies))}")
    assert "torch" not in {_distribution_name(r) for r in requirements}


def test_tool_comfy_table():
    # PublisherId, Icon and the URLs may be empty until a public repository exists (the publish workflow refuses
    # to run until they are filled: tests/test_publishing.py)
    assert COMFY["DisplayName"].strip() and "PublisherId" in COMFY and "Icon" in COMFY
    for part in COMFY.get("requires-comfyui", "").split(","):
        assert COMFY_VERSION_PART.match(part.strip()), f"requires-comfyui part {part!r} is not [op]X.Y.Z"
    # the Registry stores these as URLs: a repository-relative path would show as a broken link
    urls = {f"[tool.comfy] {key}": COMFY[key] for key in ("Icon", "Banner") if key in COMFY}
    urls |= {f"[project.urls] {key}": value for key, value in PROJECT.get("urls", {}).items()}
    for field, value in urls.items():
        assert value == "" or re.match(r"https://[^/\s]+/\S+$", value), f"{field}: not an absolute https URL: {value!r}"


def test_classifiers_are_ones_the_registry_understands():
    for classifier in PROJECT.get("classifiers", []):
        if classifier.startswith("Operating System :: "):
            assert classifier[len("Operating System :: "):].startswith(OS_PREFIXES), classifier
        if classifier.startswith("Environment ::"):
            assert classifier[len("Environment :: "):] in ACCELERATORS, classifier
        assert not classifier.startswith("License ::"), "the SPDX `license` replaces licence classifiers (PEP 639)"


def test_every_shipped_third_party_notice_is_listed():
    shipped = _third_party_notice_files()
    assert "asd_engine/assets/clip_tokenizer/LICENSE" in shipped
    notice = (ROOT / "NOTICE").read_text(encoding="utf-8")
    missing = [path for path in shipped if path not in notice]
    assert not missing, f"NOTICE does not list these shipped licence/notice files: {missing}"
    not_in_metadata = [path for path in shipped if path not in PROJECT["license-files"]]
    assert not not_in_metadata, f"[project].license-files lacks {not_in_metadata}"
    for path in shipped:
        assert (ROOT / path).stat().st_size > 0, path


def test_every_floor_is_a_tested_version():
    """requirements.txt's floors are exactly the versions benchmarks/floors.sh installs (tests/requirements-floors.txt)
    and runs the suite with, and the floors run uses the same torch as the test set-up."""
    floors = {}
    for line in _requirement_lines(ROOT / "tests" / "requirements-floors.txt"):
        name, version = line.split("==")
        floors[_distribution_name(name)] = version
    for requirement in _requirement_lines(ROOT / "requirements.txt"):
        name = _distribution_name(requirement)
        assert re.fullmatch(rf"{re.escape(name)}>=[\d.]+", requirement.lower().replace("_", "-")), requirement
        assert requirement.split(">=")[1] == floors.get(name), f"{requirement}: floors run pins {floors.get(name)}"
    test_torch = [r for r in _requirement_lines(ROOT / "tests" / "requirements.txt") if r.startswith("torch==")]
    assert test_torch == [f"torch=={floors['torch']}"]
