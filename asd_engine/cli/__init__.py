"""Command line: ``python -m asd_engine <command> ...`` (headless runs without ComfyUI).

Commands:
  demo            text-to-3D with ASD on the embedded toy prior (the README's main command)
  distill-2d      distil one image from a diffusion prior with ASD / VSD / SDS
  text-to-3d      distil a NeRF from a diffusion prior; exports a mesh, a turntable and views
  render          re-render views, turntable and mesh from a text-to-3d checkpoint
  quality         measure ASD vs VSD vs SDS on the embedded prior against analytic ground truth
  quality-report  the quality tables of finished harness folders, merged (per method and per prompt)
  clip-score      CLIP score of images against a prompt (local CLIP weights)
  toy-prior-report  sample grid, prompt fidelity, overhead tori's hole rate, loss curve of a toy prior
  train-toy-prior train the embedded toy prior on procedural shapes with known 3D truth
  tiny-pipeline   write a tiny random Stable-Diffusion-architecture pipeline (for tests and trying the CLI)

User errors print one line ``error: <flag>: <problem>; <fix>`` on stderr and exit with status 2; a run whose loss or
state stops being finite prints one line and exits with status 3, keeping its last (finite) checkpoint; an interrupted
run (Ctrl-C) finishes its current step, writes a resumable checkpoint and exits with status 130. The training
commands live in :mod:`.train`, the toy prior's and measuring ones in :mod:`.toy`, what they share in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import TrainingDiverged, UserInputError
from . import toy, train
from .common import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, error_line

__all__ = ["build_parser", "main", "EXIT_USER_ERROR", "EXIT_DIVERGED", "EXIT_INTERRUPTED"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m asd_engine", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    train.add_parsers(sub)
    toy.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserInputError as exc:
        sys.stderr.write(error_line(exc))
        return EXIT_USER_ERROR
    except TrainingDiverged as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_DIVERGED
    except KeyboardInterrupt:  # commands without their own Ctrl-C handling (the training commands have theirs)
        sys.stderr.write(f"interrupted: {args.command} stopped; nothing further was written\n")
        return EXIT_INTERRUPTED
