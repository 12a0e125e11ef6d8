"""Checkpoints: one folder holding ``state.safetensors`` (every tensor) and ``checkpoint.json`` (everything else).

Writes are atomic at the folder level: the new checkpoint is written and fsynced into a temporary sibling folder,
then swapped in with renames, so a crash leaves either the old or the new checkpoint, never a mix. No pickle is
used anywhere: optimiser states are flattened into named tensors plus JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserInputError
from .configs import upgrade_stored

if TYPE_CHECKING:
    from ..prior.diffusion import DiffusionPrior

FORMAT = "comfyui-asd-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "checkpoint.json"
RUN_KINDS = ("distill-2d", "text-to-3d")
INTACT = "use an intact checkpoint folder (this one was edited or damaged), or start a new run"


class ResumeNotice(UserWarning):
    """A resume that works but does not reproduce a straight run exactly (front doors show it as a notice)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary folders of saves whose process died mid-write (SIGKILL, power loss): nothing reads them."""
    for tmp in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # alive under another user: not ours to remove
            pass


def save_checkpoint(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    input_name: str = "out") -> Path:
    """Atomically (re)write the checkpoint folder ``directory`` with ``tensors`` and JSON-serialisable ``meta``.

    A failed write (disk full, a read-only folder, an interrupt) removes its temporary folder and leaves the
    previous checkpoint in place; disk errors become one :class:`UserInputError` naming ``input_name``."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old")
    moved_aside = False
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(cpu, str(tmp / TENSORS_FILE))
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **meta}, indent=2))
        for name in (TENSORS_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            moved_aside = True
        os.rename(tmp, directory)
        moved_aside = False
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not directory.exists():  # the new one never arrived: put the previous one back
            try:
                os.rename(old, directory)
            except OSError:
                pass  # _checkpoint_folder still finds it as .old
        if isinstance(exc, OSError):
            reason = exc.strerror or (errno.errorcode.get(exc.errno or 0) if exc.errno else None) or str(exc)
            raise UserInputError(input_name, f"cannot write the checkpoint to '{directory}': {reason}",
                                 "free space or choose another {=" + input_name + "} you can write to (the previous "
                                 "checkpoint, if any, is kept)") from None
        raise
    try:  # the new checkpoint is in place: what remains is tidying up
        _fsync_dir(directory.parent)
    except OSError:
        pass
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


def read_checkpoint_meta(directory: str | os.PathLike, input_name: str = "resume", run: bool = False) -> dict:
    """A checkpoint folder's ``checkpoint.json`` (kind, step, config, ...), checked as :func:`load_checkpoint`
    checks it, without reading its tensors (for decisions that need only the settings: a NeRF's optimiser state
    can be hundreds of MB). ``run``: a distillation run's checkpoint, whose structure is checked too
    (:func:`check_run_meta`)."""
    directory = _checkpoint_folder(directory, input_name)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except Exception as exc:
        raise _damaged(directory, input_name, exc) from None
    if not isinstance(meta, dict):
        raise UserInputError(input_name, f"'{directory / META_FILE}' holds a JSON {type(meta).__name__}, not an "
                             "object", INTACT)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise UserInputError(input_name, f"'{directory}' is not a ComfyUI-ASD checkpoint of version {FORMAT_VERSION}",
                             "resume from a checkpoint written by this version of the engine")
    if run:
        check_run_meta(meta, directory, input_name)
    return meta


def load_checkpoint(directory: str | os.PathLike, input_name: str = "resume",
                    run: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder → ``(tensors on CPU, meta)``. Falls back to the previous checkpoint if a crash
    happened between the two renames of :func:`save_checkpoint`. ``run``: as :func:`read_checkpoint_meta`, and
    every float tensor must be finite (a run resumed from NaN would only produce NaN)."""
    directory = _checkpoint_folder(directory, input_name)
    meta = read_checkpoint_meta(directory, input_name, run=run)
    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise _damaged(directory, input_name, exc) from None
    if run:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserInputError(input_name, f"'{directory}' holds non-finite values (NaN or inf) in {name}",
                                     "resume from an earlier checkpoint, or start a new run")
    return tensors, meta


def _bad(directory: Path, input_name: str, what: str) -> UserInputError:
    return UserInputError(input_name, f"'{directory / META_FILE}' {what}", INTACT)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_optimizer_meta(meta: Any, key: str, directory: Path, input_name: str) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("scalars"), dict):
        raise _bad(directory, input_name, f"has no valid '{key}' (param_groups and scalars)")
    for group in meta["param_groups"]:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) \
                or not all(_is_int(i) and i >= 0 for i in group["params"]):
            raise _bad(directory, input_name, f"has a damaged parameter group in '{key}'")
    for index, entries in meta["scalars"].items():
        if not index.isdigit() or not isinstance(entries, dict):
            raise _bad(directory, input_name, f"has damaged optimiser scalars in '{key}'")


def check_run_meta(meta: dict, directory: str | os.PathLike, input_name: str = "resume") -> None:
    """The structure a distillation run's ``checkpoint.json`` must have (every type a resume relies on), so a
    hand-edited or damaged file gives one line instead of an error deep inside the resume."""
    directory = Path(directory)
    kind = meta.get("kind")
    if kind not in RUN_KINDS:
        raise _bad(directory, input_name, f"has kind {kind!r}, not one of {', '.join(RUN_KINDS)}")
    step = meta.get("step")
    if not _is_int(step) or step < 0:
        raise _bad(directory, input_name, f"has step {step!r}, not a whole number ≥ 0")
    if not isinstance(meta.get("config"), dict):
        raise _bad(directory, input_name, "has no settings object ('config')")
    _check_optimizer_meta(meta.get("optimizer"), "optimizer", directory, input_name)
    if "phi_optimizer" in meta:
        _check_optimizer_meta(meta["phi_optimizer"], "phi_optimizer", directory, input_name)
    losses = meta.get("losses", {})
    if not isinstance(losses, dict) or not all(isinstance(v, list) and all(_is_number(x) for x in v)
                                               for v in losses.values()):
        raise _bad(directory, input_name, "has a damaged loss history ('losses')")
    fingerprints = meta.get("fingerprints", {})
    if not isinstance(fingerprints, dict) or not all(isinstance(v, str) for v in fingerprints.values()):
        raise _bad(directory, input_name, "has damaged weight fingerprints ('fingerprints')")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a config field of type ``hint`` (numbers finite; tuples as lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, h) for v, h in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True  # a type this check does not know: the settings' validation has the last word


def check_config(config_class: type, data: dict, directory: str | os.PathLike, input_name: str = "resume",
                 prefix: str = "config") -> None:
    """Every stored setting has its field's type (nested settings too), so building the run cannot fail on a value
    of the wrong type; ranges are the settings' validation's job. Unknown names are left to ``config_from_dict``."""
    data = upgrade_stored(config_class, data)
    hints = typing.get_type_hints(config_class)
    unknown = sorted(set(data) - {field.name for field in dataclasses.fields(config_class)})
    if unknown:
        raise UserInputError(input_name, f"'{Path(directory) / META_FILE}' has settings this version does not know "
                             f"({', '.join(f'{prefix}.{name}' for name in unknown[:3])})",
                             "resume with the engine version that wrote it, or use an intact checkpoint folder")
    for field in dataclasses.fields(config_class):
        if field.name not in data:
            continue
        value, hint = data[field.name], hints[field.name]
        if not _fits(value, hint):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise _bad(Path(directory), input_name, f"has {prefix}.{field.name} = {shown}, which is not a "
                                                    f"{_type_name(hint)}")
        if dataclasses.is_dataclass(hint):
            check_config(hint, value, directory, input_name, f"{prefix}.{field.name}")


def _type_name(hint: Any) -> str:
    names = {bool: "true/false", int: "whole number", float: "finite number", str: "text", type(None): "null"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in args)
    if origin in (list, tuple):
        return "list"
    if dataclasses.is_dataclass(hint):
        return "settings object"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def fingerprints(prior: "DiffusionPrior", phi_prior: "DiffusionPrior | None" = None) -> dict[str, str]:
    """What a checkpoint stores to recognise its models' weights wherever they move (see :func:`weights_match`)."""
    found = {"dtype": str(prior.dtype).removeprefix("torch."), "model": prior.fingerprint()}
    if phi_prior is not None and phi_prior is not prior:
        found["phi_model"] = phi_prior.fingerprint()
    return found


def weights_match(meta: dict, role: str, prior: "DiffusionPrior") -> bool | None:
    """Whether ``prior`` holds the weights the checkpoint's ``role`` ("model" / "phi_model") was trained with:
    None when that cannot be told (a checkpoint older than fingerprints, or the weights loaded at another
    precision, which changes the fingerprint)."""
    stored = meta.get("fingerprints") or {}
    if role not in stored or stored.get("dtype") != str(prior.dtype).removeprefix("torch."):
        return None
    return stored[role] == prior.fingerprint()


def state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                   shapes_only: bool = False) -> str | None:
    """Why the tensors ``given`` cannot be loaded where ``expected`` are (a shape or, unless ``shapes_only``, a name
    that differs), or None. Loaders may fill some missing names themselves: call with names after they failed."""
    for name, tensor in expected.items():
        if name in given and tuple(given[name].shape) != tuple(tensor.shape):
            return f"its {name} is {tuple(given[name].shape)}, the settings make {tuple(tensor.shape)}"
    if shapes_only:
        return None
    missing = sorted(set(expected) - set(given))
    if missing:
        return f"it lacks {len(missing)} of the {len(expected)} tensors the settings make (e.g. {missing[0]})"
    extra = sorted(set(given) - set(expected))
    if extra:
        return f"it has {len(extra)} tensors the settings do not make (e.g. {extra[0]})"
    return None


def state_does_not_fit(directory: str | os.PathLike, input_name: str, why: str) -> UserInputError:
    """The error for a state file that does not fit its ``checkpoint.json``: another run's tensors, another mode's,
    or settings edited (size, model, preset) after the run was saved."""
    return UserInputError(input_name, f"'{Path(directory) / TENSORS_FILE}' does not fit its {META_FILE}: {why}",
                          INTACT)


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
                         prefix: str, input_name: str = "resume") -> None:
    """Inverse of :func:`optimizer_state`. State that does not fit the optimiser's parameters (count, shapes) is a
    :class:`UserInputError` naming ``input_name``: torch would accept wrong shapes and fail at the next step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    try:
        for name, value in tensors.items():
            if name.startswith(head):
                index, key = name[len(head):].split(".", 1)
                state.setdefault(int(index), {})[key] = value
        for index, entries in meta["scalars"].items():
            state.setdefault(int(index), {}).update(entries)
        for index, entries in state.items():
            if not 0 <= index < len(params):
                raise ValueError(f"state for parameter {index} of {len(params)}")
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                    raise ValueError(f"{prefix} {key} of parameter {index} is {tuple(value.shape)}, the parameter is "
                                     f"{tuple(params[index].shape)}")
        groups = []
        for live, group in zip(optimizer.param_groups, meta["param_groups"]):
            for key, value in live.items():  # a hyper-parameter of the wrong type would fail at the next step
                if key != "params" and not _same_kind(value, group.get(key)):
                    raise ValueError(f"{prefix} {key} is {group.get(key)!r}")
            groups.append({**group, **({"betas": tuple(group["betas"])} if "betas" in group else {})})
        groups += meta["param_groups"][len(groups):]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split())  # one line, whatever torch wrote
        raise UserInputError(input_name, f"the checkpoint's optimiser state does not fit the run ({reason})",
                             INTACT) from None


def _same_kind(live: Any, stored: Any) -> bool:
    """A stored optimiser hyper-parameter can stand for the live one: a finite number for a number, a list of as
    many finite numbers for a tuple (Adam's betas); other values are torch's to judge."""
    if _is_number(live):
        return _is_number(stored) and math.isfinite(stored)
    if isinstance(live, (tuple, list)) and all(_is_number(v) for v in live):
        return isinstance(stored, (tuple, list)) and len(stored) == len(live) and all(
            _is_number(v) and math.isfinite(v) for v in stored)
    return True


@contextlib.contextmanager
def built_from(directory: str | os.PathLike, input_name: str, what: str):
    """Building ``what`` from stored settings of the right type but impossible values (a negative grid size, say)
    fails as one line naming the checkpoint, not as a traceback from deep inside torch."""
    try:
        yield
    except (UserInputError, torch.OutOfMemoryError):
        raise
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError, RuntimeError) as exc:
        raise UserInputError(input_name, f"'{directory}' describes {what} that cannot be built "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())})", INTACT) from None
