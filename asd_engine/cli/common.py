"""What every command group shares: the one-line error parser, argument types, flags made from the settings table,
writable output folders and quiet libraries. Command groups import this module, never each other."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserInputError
from ..runs import settings

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
PATH_FIELDS = ("model", "phi_model", "references")


class Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("python -m asd_engine").strip()
        sys.stderr.write(f"error: {message}; see `python -m asd_engine {command + ' ' if command else ''}--help`\n")
        sys.exit(EXIT_USER_ERROR)


def integer(text: str) -> int:
    """Integers are parsed here and range-checked by the settings' validation (which says what range is valid)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"'{text}' is not on/off")
    return text == "on"


def schedule(text: str) -> list[tuple[int, int]]:
    try:
        return settings.parse_resolution_schedule(text) or []
    except UserInputError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def add_settings(parser: argparse.ArgumentParser, mode: str, only: tuple[str, ...] | None = None) -> None:
    """One flag per row of the settings table that applies to ``mode`` (all default None: "not given")."""
    for setting in settings.settings_for(mode):
        if setting.flag is None or (only is not None and setting.field not in only):
            continue
        kwargs: dict[str, Any] = {}
        if setting.kind is bool:
            kwargs.update(type=on_off, metavar="on|off")
        elif setting.kind is int:
            kwargs.update(type=integer)
        elif setting.kind is float:
            kwargs.update(type=float)
        elif setting.field == "resolution_schedule":
            kwargs.update(type=schedule, metavar="STEP:PX,...")
        elif setting.kind is list:
            kwargs.update(nargs="+", metavar="IMAGE")
        elif setting.choices:
            kwargs.update(choices=list(setting.choices))
        default = settings.default_text(setting, mode)
        help_text = setting.help + (f" ({default})" if default else "")
        parser.add_argument(setting.flag, default=None, help=help_text.replace("%", "%%"), **kwargs)


def given_values(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The settings the user actually gave, by field name, with paths made absolute."""
    values = {}
    for setting in settings.settings_for(mode):
        value = None if setting.flag is None else getattr(args, setting.flag[2:].replace("-", "_"), None)
        if value is not None:
            values[setting.field] = value
    for name in PATH_FIELDS:
        if name in values:
            value = values[name]
            # abspath, not resolve(): a symlink loop must reach the loader, which names it in one line
            values[name] = ([os.path.abspath(os.path.expanduser(v)) for v in value] if isinstance(value, list)
                            else os.path.abspath(os.path.expanduser(value)))
    return values


def quiet_libraries() -> None:
    """Library progress bars and INFO chatter would bury our own progress bar."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging_module in (diffusers_logging, transformers_logging):
        logging_module.set_verbosity_error()
        logging_module.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def ensure_writable_dir(path: str, input_name: str = "out") -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a :class:`UserInputError`."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(input_name, f"cannot write to '{folder}' ({exc.strerror or exc})",
                             "choose a folder you can write to") from None
    return folder


def error_line(exc: UserInputError) -> str:
    """A user error as the CLI prints it: inputs named by their flags."""
    return f"error: {exc.render(settings.flag_of)}\n"


# ---------------------------------------------------------------------------------------------- output folders
LOCK_FILE = ".asd-run.lock"   # the one hidden file a command creates in --out: it is not content
LOCK_GRACE_S = 10.0           # a lock without a readable pid younger than this: a run that is still writing it
_CHECKPOINT_FILES = r"(state\.safetensors|checkpoint\.json)"
_TEMPORARY = r"\.[^/]+\.tmp-\d+(\.[a-z]+)?"  # an atomic write's temporary file, left by a killed process
# What the commands write into --out, as full matches of paths relative to it. Only files matching these, in a folder
# that holds an earlier run, are ever removed (by --overwrite); everything else in --out is left alone.
EXPORT_OUTPUTS: tuple[str, ...] = (r"mesh\.(glb|obj)", r"turntable\.(webp|gif)", r"render\.json",
                                   r"views/(rgb|alpha|depth|normal)_\d{3,}\.png", rf"(views/)?{_TEMPORARY}")
RUN_OUTPUTS: tuple[str, ...] = EXPORT_OUTPUTS + (
    r"run\.json", r"metrics\.jsonl", r"final\.png", r"previews/step_\d{6,}\.png", rf"previews/{_TEMPORARY}",
    rf"checkpoint/{_CHECKPOINT_FILES}", rf"\.checkpoint\.(old|tmp-\d+)/{_CHECKPOINT_FILES}")
_OUTPUT_FOLDERS = re.compile(r"previews|views|checkpoint|\.checkpoint\.(old|tmp-\d+)")


def is_output(relative: str, patterns: tuple[str, ...] = RUN_OUTPUTS) -> bool:
    return any(re.fullmatch(pattern, relative) for pattern in patterns)


def folder_contents(folder: Path) -> tuple[list[str], list[str]]:
    """``(outputs, others)``: the paths in ``folder`` (relative, '/'-separated) that are this tool's outputs by name,
    and everything else. Only the tool's own subfolders are looked into (never a user's tree); links are others."""
    outputs: list[str] = []
    others: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink() and _OUTPUT_FOLDERS.fullmatch(entry.name):
            children = sorted(entry.iterdir())
            if not children:
                outputs.append(entry.name + "/")
            for child in children:
                relative = f"{entry.name}/{child.name}"
                is_file = child.is_file() and not child.is_symlink()
                (outputs if is_file and is_output(relative) else others).append(relative)
        else:
            is_file = entry.is_file() and not entry.is_symlink()
            (outputs if is_file and is_output(entry.name) else others).append(entry.name + ("/" if entry.is_dir()
                                                                                            else ""))
    return outputs, others


def earlier_run(folder: Path) -> dict[str, Any] | None:
    """What ``folder`` says about the earlier run that wrote it: its ``run.json`` (a training command's) or
    ``render.json`` (render's), or ``{"command": None}`` for a bare checkpoint of this tool; None when it holds none
    (then nothing in it is provably this tool's)."""
    from ..runs.checkpoint import FORMAT

    for name in ("run.json", "render.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("command"), str):
            return data
    for checkpoint in ("checkpoint", ".checkpoint.old"):
        try:
            if json.loads((folder / checkpoint / "checkpoint.json").read_text()).get("format") == FORMAT:
                return {"command": None}
        except (OSError, ValueError, AttributeError):
            continue
    return None


def remove_outputs(folder: Path, outputs: list[str]) -> None:
    """Delete ``outputs`` (from :func:`folder_contents`) in ``folder``, then their subfolders if that left them empty.
    Files only, one by one: a folder is removed only when nothing else is in it."""
    for relative in outputs:
        if not relative.endswith("/"):
            (folder / relative).unlink(missing_ok=True)
    for sub in sorted({relative.split("/")[0] for relative in outputs if "/" in relative}):
        with contextlib.suppress(OSError):
            (folder / sub).rmdir()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: ask the kernel instead
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def lock_holder(lock: Path) -> str | None:
    """Who holds ``lock``: ``"process N"`` (possibly ``on HOST``) while that process lives, None when the lock is
    stale (its process is gone) or absent."""
    try:
        text = lock.read_text()
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None
    pid_text, _, host = text.strip().partition(" ")
    if not pid_text.isdigit():
        return "a run that is starting" if age < LOCK_GRACE_S else None
    if host and host != socket.gethostname():
        return f"process {pid_text} on {host}"  # cannot look at another machine's processes: assume it lives
    return f"process {pid_text}" if _pid_alive(int(pid_text)) else None


@contextlib.contextmanager
def locked_folder(path: str, input_name: str = "out") -> Iterator[Path]:
    """Create ``path`` if needed and lock it for this process (``.asd-run.lock`` with the pid, created with
    O_EXCL, so two runs never write into one folder) for the ``with`` block. A lock whose process is gone is taken
    over. On leaving — normally, on an error or on Ctrl-C — the lock is removed, and so are the folders this call
    created if nothing was written into them. Raises a :class:`UserInputError` naming ``input_name``."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserInputError(input_name, f"'{folder}' is a file, not a folder", "choose a folder")
    created = []
    for parent in (folder, *folder.absolute().parents):
        if parent.exists():
            break
        created.append(parent)
    lock = folder / LOCK_FILE
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserInputError(input_name, f"cannot write to '{folder}' ({exc.strerror or exc})",
                                 "choose a folder you can write to") from None
        _take_lock(lock, folder, input_name)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)
        _remove_empty(created)


def _take_lock(lock: Path, folder: Path, input_name: str) -> None:
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(lock)
            if holder is not None:
                raise UserInputError(input_name, f"'{folder}' is in use by another run ({holder})",
                                     f"wait for it to end or choose another folder (if no run uses it, delete "
                                     f"{lock})") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        except OSError as exc:
            raise UserInputError(input_name, f"cannot write to '{folder}' ({exc.strerror or exc})",
                                 "choose a folder you can write to") from None
        try:
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        finally:
            os.close(fd)
        return
    raise UserInputError(input_name, f"'{folder}' is in use by another run", "choose another folder")


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a command that wrote nothing leaves nothing."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
