"""Headless ComfyUI client: queue an API-format workflow, follow it, download what it wrote.

    python workflows/comfy_client.py workflows/api/text_to_3d_asd.json --server http://127.0.0.1:8188 \\
        --set "ASD Train Loop.steps=200" --set 4.prompt="a blue torus" --out downloads/

``--set NODE.INPUT=VALUE``: NODE is a node id, its title, or its class type when only one node has it; VALUE is
read as JSON when it parses (numbers, true/false, "quoted strings", [lists]) and as a plain string otherwise.

ComfyUI queues the valid part of a graph even when other nodes are invalid and reports those in ``node_errors``:
this client treats any node error as a failure (it removes what was queued) and prints each one on its own line.
Exit status: 0 success, 1 the workflow failed while running, 2 bad input / node errors / server unreachable,
130 interrupted (Ctrl-C also interrupts the server's run). Progress goes to stderr; the written files are listed
on stdout. Uses the standard library plus ``websocket-client`` (in requirements.txt); never imports ComfyUI.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

EXIT_FAILED, EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 2, 130


class ClientError(Exception):
    """A problem the user can fix (printed as one ``error:`` line, exit status 2)."""


PROGRESS_TEXT = 3  # ComfyUI's binary event type for a status line on a node (server.BinaryEventTypes.TEXT)


def progress_text(message: bytes) -> tuple[str, str] | None:
    """A binary websocket frame → (node id, text) when it is a status line shown on a node, else None. The frame:
    event type (4 bytes, big-endian), node id length (4 bytes), node id, UTF-8 text."""
    if len(message) < 8 or struct.unpack(">I", message[:4])[0] != PROGRESS_TEXT:
        return None
    (length,) = struct.unpack(">I", message[4:8])
    return message[8:8 + length].decode("utf-8", "replace"), message[8 + length:].decode("utf-8", "replace")


def load_workflow(path: str | Path) -> dict[str, Any]:
    try:
        graph = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ClientError(f"workflow: '{path}' does not exist; give an API-format workflow (workflows/api/*.json)")
    except json.JSONDecodeError as exc:
        raise ClientError(f"workflow: '{path}' is not JSON ({exc}); give an API-format workflow file")
    if "nodes" in graph and "links" in graph:
        raise ClientError(f"workflow: '{path}' is in UI format; use its API-format twin (workflows/api/) or export "
                          "with 'Save (API)' in ComfyUI")
    if not graph or not all(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        raise ClientError(f"workflow: '{path}' is not an API-format workflow (a map of node id → class_type/inputs)")
    return graph


def _find_node(graph: dict[str, Any], key: str) -> str:
    if key in graph:
        return key
    by_title = [i for i, n in graph.items() if n.get("_meta", {}).get("title") == key]
    by_class = [i for i, n in graph.items() if n["class_type"] == key]
    for matches in (by_title, by_class):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ClientError(f"--set: '{key}' matches nodes {', '.join(matches)}; use a node id")
    raise ClientError(f"--set: no node '{key}' (ids: {', '.join(graph)}); use a node id, title or class type")


def apply_overrides(graph: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``NODE.INPUT=VALUE`` strings → a modified copy of ``graph``."""
    graph = json.loads(json.dumps(graph))
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_key, dot, name = target.rpartition(".")
        if not sep or not dot or not node_key or not name:
            raise ClientError(f"--set: '{item}' is not NODE.INPUT=VALUE; e.g. --set 4.steps=100")
        node = graph[_find_node(graph, node_key)]
        if name not in node["inputs"]:
            raise ClientError(f"--set: node '{node_key}' ({node['class_type']}) has no input '{name}'; it has "
                              f"{', '.join(node['inputs'])}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node["inputs"][name] = value
    return graph


class Client:
    def __init__(self, server: str, timeout: float = 30.0) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, route: str, payload: Any | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.server + route, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return json.loads(body)
            except json.JSONDecodeError:
                raise ClientError(f"--server: {route} answered HTTP {exc.code}: {body[:200]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ClientError(f"--server: cannot reach {self.server} ({getattr(exc, 'reason', exc)}); start ComfyUI "
                              "or pass its address, e.g. --server http://127.0.0.1:8188") from None
        return json.loads(body) if body else None

    def queue(self, graph: dict[str, Any]) -> str:
        """POST /prompt; raises :class:`ClientError` listing every node error (and unqueues a partial run)."""
        answer = self._request("/prompt", {"prompt": graph, "client_id": self.client_id}) or {}
        node_errors = answer.get("node_errors") or {}
        if answer.get("prompt_id") and node_errors:
            self._request("/queue", {"delete": [answer["prompt_id"]]})
        if node_errors or "error" in answer:
            lines = []
            for node_id, info in node_errors.items():
                title = graph.get(node_id, {}).get("_meta", {}).get("title", info.get("class_type", "?"))
                for error in info.get("errors", []):
                    detail = f" ({error['details']})" if error.get("details") else ""
                    lines.append(f"node {node_id} '{title}': {error.get('message', 'invalid')}{detail}")
            if not lines and "error" in answer:
                error = answer["error"]
                lines.append(f"{error.get('message', 'rejected')}: {error.get('details', '')}".rstrip(": "))
            raise ClientError("the server refused the workflow:\n  " + "\n  ".join(lines))
        return answer["prompt_id"]

    def connect(self) -> None:
        """Open the websocket *before* queueing, so that no event of a fast run is missed."""
        import websocket

        url = self.server.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={self.client_id}"
        try:
            self.ws = websocket.create_connection(url, timeout=5.0)
        except (OSError, websocket.WebSocketException) as exc:
            raise ClientError(f"--server: no websocket at {url} ({exc}); is it a ComfyUI server?") from None

    def follow(self, prompt_id: str, log=sys.stderr) -> str:
        """Follow progress over the websocket until the run ends → "success" / "error: ..." / "interrupted"."""
        import websocket

        ws = self.ws
        try:
            while True:
                try:
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if self._finished(prompt_id):
                        return "success"
                    continue
                if not isinstance(message, str):  # binary frames: preview images, and status lines on nodes
                    text = progress_text(message)
                    if text is not None:
                        log.write(f"\nnode {text[0]}: {text[1]}\n")
                    continue
                event = json.loads(message)
                kind, data = event.get("type"), event.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress":
                    log.write(f"\rnode {data.get('node')}: {data['value']}/{data['max']}")
                    log.flush()
                elif kind == "executing" and data.get("node") is not None:
                    log.write(f"\nrunning node {data['node']}\n")
                elif kind == "execution_error":
                    return f"error: node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message', '').strip()}"
                elif kind == "execution_interrupted":
                    return "interrupted"
                elif kind == "execution_success" or (kind == "executing" and data.get("node") is None):
                    return "success"
        finally:
            ws.close()

    def _history(self, prompt_id: str) -> dict[str, Any] | None:
        """The run's history entry once the server has recorded it as completed, else None."""
        entry = (self._request(f"/history/{prompt_id}") or {}).get(prompt_id)
        return entry if entry and entry.get("status", {}).get("completed", False) else None

    def _finished(self, prompt_id: str) -> bool:
        return self._history(prompt_id) is not None

    def interrupt(self) -> None:
        self._request("/interrupt", {})

    def download(self, prompt_id: str, out: Path) -> list[Path]:
        """Every file the run's outputs name (images, animations, meshes) → ``out/<subfolder>/<filename>``.

        The server writes the history entry just *after* its final websocket event, so this polls for it (up to
        the client's timeout) instead of reading a possibly empty entry."""
        deadline = time.monotonic() + self.timeout
        while (history := self._history(prompt_id)) is None:
            if time.monotonic() > deadline:
                raise ClientError(f"the server has no completed history for prompt {prompt_id} after "
                                  f"{self.timeout:.0f} s; look at its log")
            time.sleep(0.05)
        written = []
        for node_output in history.get("outputs", {}).values():
            for items in node_output.values():
                for item in items if isinstance(items, list) else []:
                    if not (isinstance(item, dict) and "filename" in item):
                        continue
                    query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
                    target = out / item.get("subfolder", "") / item["filename"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with urllib.request.urlopen(f"{self.server}/view?{query}", timeout=self.timeout) as response:
                        target.write_bytes(response.read())
                    written.append(target)
        return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python workflows/comfy_client.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/text_to_3d_asd.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change an input before queueing (repeatable)")
    parser.add_argument("--out", default="comfy_outputs", help="folder for downloaded outputs (default %(default)s)")
    parser.add_argument("--no-download", action="store_true", help="only run; do not download the outputs")
    args = parser.parse_args(argv)
    client = Client(args.server)
    try:
        graph = apply_overrides(load_workflow(args.workflow), args.overrides)
        client.connect()
        prompt_id = client.queue(graph)
        sys.stderr.write(f"queued {prompt_id} on {client.server}\n")
        try:
            status = client.follow(prompt_id)
        except KeyboardInterrupt:
            client.interrupt()
            sys.stderr.write("\ninterrupted: asked the server to stop\n")
            return EXIT_INTERRUPTED
    except ClientError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USER_ERROR
    sys.stderr.write("\n")
    if status != "success":
        sys.stderr.write(f"the workflow did not finish: {status}\n")
        return EXIT_INTERRUPTED if status == "interrupted" else EXIT_FAILED
    if not args.no_download:
        try:
            for path in client.download(prompt_id, Path(args.out)):
                print(path)
        except ClientError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
