"""Parsing recipe arguments: a YAML config file, command-line flags, or a YAML file followed by flags."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed
import yaml
from transformers import HfArgumentParser


def parse_recipe_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """``script.py config.yaml [--flag value ...]`` or ``script.py --flag value ...``.

    YAML keys become flags, so flags after the file override it and unknown keys fail with argparse's message
    naming them, exactly as unknown flags do.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise SystemExit(f"Config file {str(path)!r} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise SystemExit(f"{path} must hold a mapping of argument names to values.")
        flags = []
        for key, value in values.items():
            if isinstance(value, (dict, list)):
                value = yaml.safe_dump(value, default_flow_style=True).strip()
            flags += [f"--{key}", str(value)]
        argv = flags + argv
    return parser.parse_args_into_dataclasses(argv)


def end_distributed() -> None:
    """Destroy the ``torch.distributed`` process group if one is up; a no-op in a single process.

    Why: a rank that exits with its gloo process group still alive can abort in C++ teardown ("terminate called
    without an active exception", SIGABRT) after the work is done, and ``accelerate launch`` then reports the whole
    run as failed. Accelerate's ``Accelerator.end_training`` does the same teardown.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_recipe(main: Callable[[], object], prog: str) -> None:
    """Run a recipe's ``main`` as a script: bad arguments or data (``ValueError``) end with one line
    ``<prog>: error: <message>`` instead of a traceback, and the process group is torn down on every exit."""
    try:
        main()
    except ValueError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    finally:
        end_distributed()
