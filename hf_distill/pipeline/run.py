"""`hf-distill run`: the runner. Checks inputs, claims the run folder, then runs the enabled stages in order.

Every stage writes its own folder under ``output_dir`` and marks it complete with a ``.done`` file written last; a
stage completed under the same stage config is skipped on the next run (``force`` redoes it from scratch, deleting
its checkpoints), and an interrupted distillation or refinement resumes from its last checkpoint of the same stage
config. A folder that holds another run's results (a different config) is refused unless ``force``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_distill.pipeline.chat_stages import CHAT_STAGES
from hf_distill.pipeline.chat_stages import check_inputs as check_chat_inputs
from hf_distill.pipeline.config import PipelineConfig
from hf_distill.pipeline.context import RunContext
from hf_distill.pipeline.stage_keys import STAGE_NAMES, Stage, stage_config
from hf_distill.pipeline.stages import STAGES
from hf_distill.pipeline.workspace import Workspace


class Pipeline:
    """Runs the stages of one config; see the module docstring."""

    def __init__(self, config: PipelineConfig, force: bool = False, command: str | None = None) -> None:
        self.config, self.force = config, force
        self.workspace = Workspace(config.output_dir, force)
        self.root = self.workspace.root
        self.context = RunContext(config, self.workspace, command or "hf-distill " + " ".join(sys.argv[1:]))
        self.timings: dict[str, float] = {}

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stage table of the config's task (chat LMs: :data:`~hf_distill.pipeline.chat_stages.CHAT_STAGES`)."""
        return CHAT_STAGES if self.config.task == "causal-lm" else STAGES

    def check_inputs(self) -> None:
        """Data columns, the label set and the teacher path, before any stage runs (files and values:
        load_pipeline_config)."""
        if self.config.task == "causal-lm":
            check_chat_inputs(self.context)
            return
        d = self.config.data
        source = self.config.teacher.model
        looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
        if source != "minilm" and looks_like_path and not Path(source).expanduser().is_dir():
            raise ValueError(f"Teacher path {source!r} does not exist (config teacher.model).")
        raw = self.context.raw_data()
        for split, path in (("train", d.train), ("validation", d.validation)):
            columns = raw[split].column_names
            for column in (d.text_column, d.label_column):
                if column not in columns:
                    raise ValueError(
                        f"Column {column!r} is not in {path} (columns: {columns}); set data.text_column / "
                        "data.label_column."
                    )
        self.context.labels()  # labels the training file lacks, or a teacher with other classes: fail now

    def run(self, stages: Sequence[str] = STAGE_NAMES) -> dict[str, Any]:
        """Run ``stages`` (a subset of :data:`STAGE_NAMES`, in table order); returns ``report.json``'s content.

        Raises:
            ValueError: an unknown stage name, missing data columns or teacher, or a foreign output folder.
        """
        unknown = [s for s in stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"Unknown stage(s) {unknown}; stages are {list(STAGE_NAMES)}.")
        self.check_inputs()
        self.workspace.claim(self.config.to_dict())
        selected = [s for s in self.stages if s.name in stages and s.enabled(self.config)]
        started = time.time()
        for index, stage in enumerate(selected, 1):
            head = f"[stage {index}/{len(selected)}] {stage.name}"
            recorded_under = stage_config(self.config, stage.name)
            if not stage.always_runs and self.workspace.done(stage.name, recorded_under):
                print(f"{head}: done already, skipped ({self.workspace.stage_dir(stage.name)})")
                continue
            print(f"{head} ... (elapsed {time.time() - started:.0f}s)", flush=True)
            stage_start = time.time()
            self.workspace.start(stage.name)
            info = stage.run(self.context) or {}
            self.timings[stage.name] = time.time() - stage_start
            info["seconds"] = round(self.timings[stage.name], 1)
            self.workspace.finish(stage.name, info, recorded_under)
        report = self.workspace.report_json
        return json.loads(report.read_text()) if report.is_file() else {}
