"""Folders written all at once: a temporary sibling folder that replaces the target only on success.

Exports, converted GGUF teachers and generated datasets use it, so an error or an interrupt never leaves a
half-written folder where a finished one is expected (and never touches an existing one before the end).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; on a clean exit it replaces ``target``, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    # mkdtemp makes the folder private (0700); the result should have the permissions of any folder made here.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
