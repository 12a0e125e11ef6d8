"""Checkpoints: one folder holding ``state.safetensors`` (every tensor) and ``checkpoint.json`` (everything else).

Writes are atomic at the folder level: the new checkpoint is written and fsynced into a temporary sibling folder,
then swapped in with renames, so a crash leaves either the old or the new checkpoint, never a mix. No pickle is
used anywhere: optimiser states are flattened into named tensors plus JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserInputError

FORMAT = "comfyui-asd-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "checkpoint.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically (re)write the checkpoint folder ``directory`` with ``tensors`` and JSON-serialisable ``meta``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(cpu, str(tmp / TENSORS_FILE))
    (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **meta}, indent=2))
    for name in (TENSORS_FILE, META_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _checkpoint_folder(directory: str | os.PathLike, input_name: str) -> Path:
    """The folder to read, with both files present. Falls back to the previous checkpoint if a crash happened
    between the two renames of :func:`save_checkpoint`."""
    directory = Path(directory).expanduser()
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.is_dir():
        directory = old
    if not directory.is_dir():
        raise UserInputError(input_name, f"'{directory}' is not a checkpoint folder",
                             "give the checkpoint/ folder a previous run wrote (it holds checkpoint.json)")
    if not (directory / META_FILE).is_file() or not (directory / TENSORS_FILE).is_file():
        raise UserInputError(input_name, f"'{directory}' lacks {META_FILE} or {TENSORS_FILE}",
                             "give the checkpoint/ folder a previous run wrote")
    return directory


def _damaged(directory: Path, input_name: str, exc: Exception) -> UserInputError:
    return UserInputError(input_name, f"'{directory}' is damaged ({type(exc).__name__}: {exc})",
                          "use an intact checkpoint folder")


def read_checkpoint_meta(directory: str | os.PathLike, input_name: str = "resume") -> dict:
    """A checkpoint folder's ``checkpoint.json`` (kind, step, config, ...), checked as :func:`load_checkpoint`
    checks it, without reading its tensors (for decisions that need only the settings: a NeRF's optimiser state
    can be hundreds of MB)."""
    directory = _checkpoint_folder(directory, input_name)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except Exception as exc:
        raise _damaged(directory, input_name, exc) from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise UserInputError(input_name, f"'{directory}' is not a ComfyUI-ASD checkpoint of version {FORMAT_VERSION}",
                             "resume from a checkpoint written by this version of the engine")
    return meta


def load_checkpoint(directory: str | os.PathLike, input_name: str = "resume") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder → ``(tensors on CPU, meta)``. Falls back to the previous checkpoint if a crash
    happened between the two renames of :func:`save_checkpoint`."""
    directory = _checkpoint_folder(directory, input_name)
    meta = read_checkpoint_meta(directory, input_name)
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise _damaged(directory, input_name, exc) from None
    return tensors, meta


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()`` into named tensors (``prefix.state.<i>.<key>``) plus a JSON part."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         prefix: str) -> None:
    """Inverse of :func:`optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            index, key = name[len(head):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
