"""The run folder of `hf-distill run`: the only place that knows its layout, ``.done`` markers and run config.

::

    output_dir/
      run_config.json            the config of the run that owns the folder
      teacher/                   fine-tuned teacher (when teacher.finetune)
      student/                   the student cut from the teacher, before training
      distill/student/model/     the distilled student (checkpoints/ beside it while training, with
                                 checkpoints/stage_config.json: the config they were trained under)
      distill/baseline/model/    the same student trained on labels only (student.baseline)
      refine/adapter/            the PEFT-refined student (refine.enabled)
      export/onnx/               the ONNX export folder (export_onnx)
      bench/                     bench.json, bench.md, bench.png
      push/upload/               what `hf-distill push` uploads
      REPORT.md, report.json, bench.png
      <stage>/.done              written last by each stage: its results and its stage config as JSON

A stage's *stage config* is the part of the run config its result depends on (``stages.stage_config``): a finished
stage or a checkpoint recorded under another one is stale and never reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

DONE = ".done"
RUN_CONFIG = "run_config.json"
CHECKPOINT_CONFIG = "stage_config.json"  # inside a checkpoints/ folder
STAGE_CONFIG = "stage_config"  # key of the .done record
# Sections whose change does not make the folder another run's results.
_NOT_RESULTS = ("push", "bench")


class Workspace:
    """Paths and stage bookkeeping of one run folder."""

    def __init__(self, root: str | Path, force: bool = False) -> None:
        self.root, self.force = Path(root), force

    # --- layout -----------------------------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    @property
    def cut_student_dir(self) -> Path:
        return self.root / "student"

    def distill_dir(self, name: str = "student") -> Path:
        return self.root / "distill" / name

    def checkpoints(self, stage_folder: Path) -> Path:
        return stage_folder / "checkpoints"

    @property
    def student_model_dir(self) -> Path:
        """The distilled student (a plain transformers folder)."""
        return self.distill_dir("student") / "model"

    @property
    def refine_adapter_dir(self) -> Path:
        return self.root / "refine" / "adapter"

    @property
    def onnx_dir(self) -> Path:
        return self.root / "export" / "onnx"

    @property
    def bench_dir(self) -> Path:
        return self.root / "bench"

    @property
    def upload_dir(self) -> Path:
        return self.root / "push" / "upload"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "REPORT.md"

    @property
    def report_plot(self) -> Path:
        return self.root / "bench.png"

    # --- bookkeeping --------------------------------------------------------------------------------------------

    def claim(self, config: dict[str, Any]) -> None:
        """Refuse a folder holding another run's results (unless ``force``); record this run's config.

        Raises:
            ValueError: the folder holds a run with other settings, or unrelated files.
        """
        saved = self.root / RUN_CONFIG
        if saved.is_file():
            previous = json.loads(saved.read_text())
            relevant = [k for k in config if k not in _NOT_RESULTS]
            changed = sorted(k for k in relevant if previous.get(k) != json.loads(json.dumps(config[k])))
            if changed and not self.force:
                raise ValueError(
                    f"{self.root} holds the results of a run with a different config (sections {changed} differ). "
                    "Nothing was touched: use another output_dir, or --force to redo the stages."
                )
        elif self.root.exists() and any(self.root.iterdir()) and not self.force:
            raise ValueError(
                f"{self.root} is not empty and holds no hf-distill run; choose another output_dir or pass --force."
            )
        self.root.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(config, indent=2))

    def done(self, stage: str, stage_config: dict[str, Any]) -> bool:
        """Whether ``stage`` finished under this very stage config (always False with ``force``)."""
        path = self.stage_dir(stage) / DONE
        return not self.force and self._same(_read(path).get(STAGE_CONFIG), stage_config)

    def start(self, stage: str) -> None:
        """Create the stage's folder and drop its old ``.done``: a stage killed now must not look finished."""
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        (self.stage_dir(stage) / DONE).unlink(missing_ok=True)

    def finish(self, stage: str, info: dict[str, Any], stage_config: dict[str, Any]) -> None:
        (self.stage_dir(stage) / DONE).write_text(json.dumps({**info, STAGE_CONFIG: stage_config}, indent=2))

    def info(self, stage: str, stage_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``.done`` record of ``stage``; ``{}`` when unfinished, or finished under another ``stage_config``."""
        record = _read(self.stage_dir(stage) / DONE)
        return record if stage_config is None or self._same(record.get(STAGE_CONFIG), stage_config) else {}

    def training_checkpoints(self, stage_folder: Path, stage_config: dict[str, Any]) -> Path:
        """The checkpoint folder of a training run in ``stage_folder``, holding only checkpoints it may resume from.

        Checkpoints recorded under another stage config (other hyper-parameters, another student depth), or any
        checkpoints under ``force``, are deleted: resuming them would continue another run's schedule and optimizer
        state. Then ``stage_config`` is recorded beside the checkpoints that training writes next.
        """
        folder = self.checkpoints(stage_folder)
        record = folder / CHECKPOINT_CONFIG
        if folder.exists() and (self.force or not self._same(_read(record), stage_config)):
            if any(p.name != CHECKPOINT_CONFIG for p in folder.iterdir()):
                why = "--force" if self.force else "they were trained under another config"
                print(f"  removing the checkpoints in {folder} ({why})")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(stage_config, indent=2))
        return folder

    @staticmethod
    def _same(recorded: Any, stage_config: dict[str, Any]) -> bool:
        return recorded == json.loads(json.dumps(stage_config))  # as JSON: tuples and lists compare equal


def _read(path: Path) -> dict[str, Any]:
    """A JSON record, or ``{}`` when missing or unreadable (a write cut short counts as no record)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
