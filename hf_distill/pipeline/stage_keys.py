"""What every stage table of `hf-distill run` shares: the stage names in order, the config keys each stage's result
depends on (a stage finished under other values is stale), and resuming from checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_distill.pipeline.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any], dict[str, Any]]  # RunContext -> the stage's record (its .done content)
    enabled: Callable[[PipelineConfig], bool] = lambda _config: True
    always_runs: bool = False  # rebuilt on every run (the report reads every other stage)


_TEACHER = ("seed", "task", "data", "teacher")
_DISTILL = (*_TEACHER, "student", "distill")
_EXPORT = (*_DISTILL, "refine", "export")
# The config keys each stage's result depends on: its own section and its inputs'.
STAGE_USES: dict[str, tuple[str, ...]] = {
    "teacher": _TEACHER,
    "student": (*_TEACHER, "student"),
    "distill": _DISTILL,
    "refine": (*_DISTILL, "refine"),
    "export": _EXPORT,
    "bench": (*_EXPORT, "bench"),
    "report": (*_EXPORT, "bench"),
    "push": (*_EXPORT, "bench", "push"),
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGE_USES)
# The stage subsets of the CLI's commands.
COMMAND_STAGES = {
    "run": STAGE_NAMES,
    "distill": ("teacher", "student", "distill"),
    "push": ("report", "push"),
}


def stage_config(config: PipelineConfig, stage: str) -> dict[str, Any]:
    """The part of the run config that ``stage``'s result depends on, as JSON values: a finished stage or a
    checkpoint recorded under another stage config is stale (``Workspace.done``, ``training_checkpoints``). A chat
    run's teacher, student and distill stages score answers, so ``evaluate`` belongs to theirs too."""
    uses = STAGE_USES[stage]
    if config.task == "causal-lm" and "teacher" in uses:
        uses = (*uses, "evaluate")
    values = config.to_dict()
    return {key: values[key] for key in uses}


def stage_infos(config: PipelineConfig, ws: Any) -> dict[str, dict[str, Any]]:
    """Every stage's ``.done`` record, empty for stages not finished under the current config."""
    return {name: ws.info(name, stage_config(config, name)) for name in STAGE_NAMES}


def resume_point(checkpoints: Path, name: str) -> str | None:
    """The newest complete checkpoint in ``checkpoints`` (printed), or None to start afresh."""
    from hf_distill.checkpoints import last_complete_checkpoint

    last = last_complete_checkpoint(checkpoints)
    if last:
        print(f"  resuming {name} from {last}")
    return last
