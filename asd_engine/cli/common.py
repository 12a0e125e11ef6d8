"""What every command group shares: the one-line error parser, argument types, flags made from the settings table,
writable output folders and quiet libraries. Command groups import this module, never each other."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

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
            values[name] = ([str(Path(v).expanduser().resolve()) for v in value] if isinstance(value, list)
                            else str(Path(value).expanduser().resolve()))
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
