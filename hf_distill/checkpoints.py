"""Which checkpoint of an interrupted training run to resume from."""

from __future__ import annotations

import json
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest checkpoint that was fully written (its trainer_state.json, written last, parses).

    transformers' get_last_checkpoint returns the newest folder even when a crash (SIGKILL, power loss) interrupted
    its writing; resuming from it then fails or restores a half-saved state.
    """
    if not os.path.isdir(folder):
        return None
    steps = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))
    )
    for _, name in reversed(steps):
        try:
            with open(os.path.join(folder, name, "trainer_state.json")) as f:
                json.load(f)
            return os.path.join(folder, name)
        except (OSError, ValueError):
            continue
    return None


__all__ = ["last_complete_checkpoint"]
