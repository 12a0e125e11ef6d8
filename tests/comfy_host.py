"""Start a real ComfyUI for host tests, with this pack loaded through ``extra_model_paths`` (as ComfyUI's own
tests load packs), never copied into it. ComfyUI is found via ``COMFYUI_PATH`` (default ``~/ComfyUI``); build one
with ``../shared/comfyui/install-host.sh <fetched ComfyUI git dir>``. Tests skip with that hint when it is absent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the folder a Registry install creates in custom_nodes/: the node id
PACK_NAME = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]


def comfyui_path() -> Path:
    return Path(os.environ.get("COMFYUI_PATH", Path.home() / "ComfyUI")).expanduser()


def host_missing_reason() -> str | None:
    """Why host tests cannot run here, or None when they can."""
    path = comfyui_path()
    python = path / ".venv" / "bin" / "python"
    if not (path / "main.py").is_file() or not python.is_file():
        return (f"no ComfyUI host at {path} (set COMFYUI_PATH, or build one with "
                "../shared/comfyui/install-host.sh <ComfyUI git dir>)")
    probe = subprocess.run([str(python), "-c", "import diffusers, peft, transformers, safetensors, nerfacc, trimesh, skimage, websocket"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"the ComfyUI host at {path} lacks this pack's requirements "
                f"(run: {python} -m pip install -r {ROOT / 'requirements.txt'})")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyHost:
    url: str
    process: subprocess.Popen
    log: Path
    base: Path

    def get_json(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_host(base: Path, timeout: float = 180.0) -> ComfyHost:
    """Start ComfyUI on a free loopback port with its own output/user/temp folders under ``base``."""
    path = comfyui_path()
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"asd_tests:\n  base_path: {base}\n  custom_nodes: {custom_nodes}\n  checkpoints: checkpoints\n")
    for folder in ("output", "temp", "user", "input", "checkpoints"):
        (base / folder).mkdir(exist_ok=True)
    port = _free_port()
    log = base / "comfyui.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [str(path / ".venv" / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--extra-model-paths-config", str(config), "--output-directory", str(base / "output"),
         "--temp-directory", str(base / "temp"), "--user-directory", str(base / "user"),
         "--input-directory", str(base / "input")],
        cwd=path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    host = ComfyHost(f"http://127.0.0.1:{port}", process, log, base)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{host.log_text()[-4000:]}")
        try:
            host.get_json("/system_stats")
            return host
        except OSError:
            time.sleep(0.5)
    host.stop()
    raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{host.log_text()[-4000:]}")


FAST = {  # per class type: inputs that make any workflow quick on a CPU
    "ASDTrain": {"steps_source": "custom", "steps": 3},
    "ASDTrainLoop": {"steps": 3},
    "ASDRenderViews": {"views": 3, "size": 32},
    "ASDExportNeRFMesh": {"resolution": 32},
    "ASDNeRFMesh": {"resolution": 32},
    "ASDExportMesh": {"resolution": 32},
    "ASDNeRFToMesh": {"resolution": 32},
    "ASDImage": {"size_source": "custom", "size": 32},
    "ASDImageGenerator": {"size": 32},
}


def fast(graph: dict) -> dict:
    """``graph`` with the :data:`FAST` inputs applied to every node of those types."""
    for node in graph.values():
        for name, value in FAST.get(node["class_type"], {}).items():
            node["inputs"][name] = value
    return graph


def post(host: ComfyHost, route: str, payload: dict) -> dict:
    request = urllib.request.Request(host.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else {}


def run_graph(host: ComfyHost, graph: dict, out: Path) -> tuple[str, str, list[Path]]:
    """Queue ``graph`` through the headless client and wait: (prompt id, status, downloaded files)."""
    from workflows import comfy_client

    client = comfy_client.Client(host.url)
    client.connect()
    prompt_id = client.queue(graph)
    status = client.follow(prompt_id, log=open("/dev/null", "w"))
    return prompt_id, status, client.download(prompt_id, out) if status == "success" else []


PLAYWRIGHT_CORE = os.environ.get("PLAYWRIGHT_CORE_DIR", str(ROOT / "tests" / "ui" / "node_modules" / "playwright-core"))


def browser_missing_reason() -> str | None:
    """Why the browser tests (tests/ui/*.mjs: node, Chromium, playwright-core) cannot run here, or None."""
    import shutil

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not shutil.which("node"):
        return "node is not installed"
    if not os.path.exists(chromium):
        return f"no Chromium at {chromium} (apt-get install chromium, or set CHROMIUM)"
    if not os.path.isdir(PLAYWRIGHT_CORE):
        return (f"playwright-core not found at {PLAYWRIGHT_CORE} (npm install --prefix tests/ui playwright-core, "
                "or set PLAYWRIGHT_CORE_DIR)")
    return None


def browser_env() -> dict[str, str]:
    """The environment tests/ui/*.mjs run in (they find playwright-core through PLAYWRIGHT_CORE_DIR)."""
    return dict(os.environ, PLAYWRIGHT_CORE_DIR=str(Path(PLAYWRIGHT_CORE).parent))
