"""`hf-distill run`: teacher -> student -> distill -> refine -> export -> bench -> report -> push.

Every stage writes its own folder under ``output_dir`` and marks it complete with a ``.done`` file written last; a
completed stage is skipped on the next run (``force`` redoes it), and an interrupted distillation resumes from its
last checkpoint. A folder that holds another run's results (a different config) is refused unless ``force``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_distill.pipeline_config import PipelineConfig

logger = logging.getLogger(__name__)
STAGES = ("teacher", "student", "distill", "refine", "export", "bench", "report", "push")
DONE = ".done"
RUN_CONFIG = "run_config.json"


def tokenize_text_classification(tokenizer: Any, raw: Any, text_column: str, label_column: str, max_length: int):
    """Tokenize a text-classification DatasetDict; adds `labels` and `length` (for length-grouped sampling)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    first = next(iter(raw.values()))
    return raw.map(encode, batched=True, remove_columns=first.column_names, desc="Tokenizing")


def finetune_teacher(
    source: str,
    data: Any,
    tokenizer: Any,
    output: Path,
    *,
    epochs: float,
    learning_rate: float,
    batch_size: int,
    seed: int,
    id2label: dict[int, str] | None = None,
) -> None:
    """Fine-tune a backbone (e.g. MiniLM) on the task with a plain `Trainer`; saves it to ``output``."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    id2label = id2label or {0: "negative", 1: "positive"}
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        use_safetensors=True,
    )
    args = TrainingArguments(
        output_dir=str(output / "checkpoints"),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        warmup_steps=50,
        weight_decay=0.01,
        train_sampling_strategy="group_by_length",
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    trainer.save_model(str(output))
    shutil.rmtree(output / "checkpoints", ignore_errors=True)


class Pipeline:
    """Runs the stages of one config; see the module docstring."""

    def __init__(self, config: PipelineConfig, force: bool = False, command: str | None = None) -> None:
        self.config, self.force = config, force
        self.root = Path(config.output_dir)
        self.command = command or "hf-distill " + " ".join(sys.argv[1:])
        self._data: Any = None
        self._tokenizer: Any = None
        self.timings: dict[str, float] = {}

    # --- bookkeeping -------------------------------------------------------------------------------------------

    def check_output_dir(self) -> None:
        """Refuse a folder holding another run's results; record this run's config."""
        saved = self.root / RUN_CONFIG
        current = self.config.to_dict()
        if saved.is_file():
            previous = json.loads(saved.read_text())
            relevant = [k for k in current if k not in ("push", "bench")]
            changed = sorted(k for k in relevant if previous.get(k) != json.loads(json.dumps(current[k])))
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
        saved.write_text(json.dumps(current, indent=2))

    def done(self, stage: str) -> bool:
        return (self.root / stage / DONE).is_file() and not self.force

    def finish(self, stage: str, info: dict[str, Any] | None = None) -> None:
        (self.root / stage / DONE).write_text(json.dumps(info or {}, indent=2))

    def info(self, stage: str) -> dict[str, Any]:
        path = self.root / stage / DONE
        return json.loads(path.read_text()) if path.is_file() else {}

    # --- data --------------------------------------------------------------------------------------------------

    def teacher_source(self) -> str:
        from hf_distill.data import minilm_path

        return minilm_path() if self.config.teacher.model == "minilm" else self.config.teacher.model

    def check_inputs(self) -> None:
        """Data files, columns and the teacher path, before any stage runs."""
        d = self.config.data
        for split in (d.train, d.validation):
            if not Path(split).is_file():
                raise ValueError(f"Data file {split!r} does not exist (config data.train / data.validation).")
        source = self.config.teacher.model
        looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
        if source != "minilm" and looks_like_path and not Path(source).expanduser().is_dir():
            raise ValueError(f"Teacher path {source!r} does not exist (config teacher.model).")
        columns = self.raw_data()["train"].column_names
        for column in (d.text_column, d.label_column):
            if column not in columns:
                raise ValueError(
                    f"Column {column!r} is not in {d.train} (columns: {columns}); set data.text_column / "
                    "data.label_column."
                )

    def raw_data(self) -> Any:
        import datasets

        d = self.config.data
        if self._data is None:
            files = {"train": d.train, "validation": d.validation}
            self._data = datasets.load_dataset(
                "csv", data_files=files, delimiter="\t" if d.train.endswith(".tsv") else ",", quoting=3
            )
            if d.train_size is not None and d.train_size < len(self._data["train"]):
                self._data["train"] = self._data["train"].shuffle(seed=self.config.seed).select(range(d.train_size))
        return self._data

    def tokenized(self) -> Any:
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.teacher_source())
        d = self.config.data
        return tokenize_text_classification(
            self._tokenizer, self.raw_data(), d.text_column, d.label_column, d.max_length
        ), self._tokenizer

    # --- running -----------------------------------------------------------------------------------------------

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        from hf_distill import stages as impl

        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"Unknown stage(s) {unknown}; stages are {list(STAGES)}.")
        self.check_inputs()
        self.check_output_dir()
        steps: dict[str, Callable[[Pipeline], dict[str, Any] | None]] = {
            "teacher": impl.teacher_stage,
            "student": impl.student_stage,
            "distill": impl.distill_stage,
            "refine": impl.refine_stage,
            "export": impl.export_stage,
            "bench": impl.bench_stage,
            "report": impl.report_stage,
            "push": impl.push_stage,
        }
        enabled = {
            "refine": self.config.refine.enabled,
            "export": self.config.export.enabled,
            "bench": self.config.bench.enabled and self.config.export.enabled,
            "push": self.config.push.enabled,
        }
        selected = [s for s in STAGES if s in stages and enabled.get(s, True)]
        started = time.time()
        for index, stage in enumerate(selected, 1):
            if stage != "report" and self.done(stage):
                print(f"[stage {index}/{len(selected)}] {stage}: done already, skipped ({self.root / stage})")
                continue
            print(f"[stage {index}/{len(selected)}] {stage} ... (elapsed {time.time() - started:.0f}s)", flush=True)
            stage_start = time.time()
            (self.root / stage).mkdir(parents=True, exist_ok=True)
            info = steps[stage](self) or {}
            self.timings[stage] = time.time() - stage_start
            self.finish(stage, {**info, "seconds": round(self.timings[stage], 1)})
        report_path = self.root / "report.json"
        return json.loads(report_path.read_text()) if report_path.is_file() else {}
