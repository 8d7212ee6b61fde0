"""Validation of ONNX variants on real batches: max |Δlogits| against PyTorch, the task metric, the accuracy gate."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_distill.export.inputs import input_names_for, pad_id
from hf_distill.tasks import IGNORE_INDEX, Task


class GateError(ValueError):
    """An exported variant lost more of the task metric than ``max_metric_drop`` allows."""

    def __init__(self, failed: list[str], report: dict[str, Any]) -> None:
        self.failed, self.report = failed, report
        lines = [
            f"  {r['variant']:<15} {r['metric']}={r['metric_value']:.4f} drop={r['metric_drop']:.2f} "
            f"max|Δ|={r['max_abs_diff']:.3g} {'pass' if r['passed'] else 'FAIL'}"
            for r in report["variants"]
        ]
        super().__init__(
            f"Variants {failed} lost more than max_metric_drop={report['max_metric_drop']} "
            f"(reference {report['reference']['metric']}={report['reference']['value']:.4f}):\n"
            + "\n".join(lines)
            + "\nNothing was written. Drop those variants, raise max_metric_drop, or pass fail_on_gate=False "
            "(--allow-failed) to keep them marked as failed."
        )


@dataclass
class EvalBatches:
    """Padded numpy inputs per batch, with labels (class ids, token labels, or next-token ids for causal LM)."""

    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return sum(len(b) for b in self.labels)


@dataclass
class Reference:
    logits: list[np.ndarray]
    metric: str
    value: float

    def as_dict(self) -> dict[str, Any]:
        return {"engine": "pytorch", "metric": self.metric, "value": self.value}


def make_batches(
    data: Any,
    tokenizer: Any,
    model: Any,
    task: Task,
    *,
    text_column: str,
    label_column: str,
    limit: int,
    max_length: int,
    batch_size: int,
) -> EvalBatches:
    """Tokenize (if needed) and pad up to ``limit`` examples of the user's data; column errors come first."""
    if data is None:
        raise ValueError(
            "export_onnx validates every variant on real data: pass validation_data= (a datasets.Dataset "
            f"with '{text_column}' and '{label_column}' columns, or tokenized 'input_ids' and 'labels')."
        )
    columns = list(getattr(data, "column_names", None) or [])
    pretokenized = "input_ids" in columns
    if not pretokenized and text_column not in columns:
        raise ValueError(
            f"Validation/calibration data has columns {columns}: it needs a text column "
            f"'{text_column}' (set text_column=) or tokenized 'input_ids'."
        )
    if not pretokenized and tokenizer is None:
        raise ValueError("Raw-text validation data needs a tokenizer: save it next to the model or pass tokenizer=.")
    label_key = "labels" if "labels" in columns else label_column
    if task is not Task.CAUSAL_LM and label_key not in columns:
        raise ValueError(
            f"Validation data has columns {columns} but no labels ('labels' or '{label_column}'): the "
            "accuracy gate needs them."
        )
    if task is Task.TOKEN_CLASSIFICATION and not pretokenized:
        raise ValueError("Token classification validation data must be tokenized with word-aligned 'labels'.")
    rows = data.select(range(min(limit, len(data))))
    pad = pad_id(tokenizer, model.config)
    names = input_names_for(model)
    batches = EvalBatches()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if pretokenized:
            ids = [list(x)[:max_length] for x in chunk["input_ids"]]
        else:
            ids = tokenizer(list(chunk[text_column]), truncation=True, max_length=max_length)["input_ids"]
        width = max(len(x) for x in ids)
        input_ids = np.array([x + [pad] * (width - len(x)) for x in ids], dtype=np.int64)
        mask = np.array([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=np.int64)
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        batches.inputs.append(feed)
        if task is Task.CAUSAL_LM:
            batches.labels.append(np.where(mask == 1, input_ids, IGNORE_INDEX))
        elif task is Task.TOKEN_CLASSIFICATION:
            labels = [list(x)[:max_length] for x in chunk[label_key]]
            batches.labels.append(np.array([x + [IGNORE_INDEX] * (width - len(x)) for x in labels], dtype=np.int64))
        else:
            batches.labels.append(np.asarray(chunk[label_key], dtype=np.int64))
    if not batches.inputs:
        raise ValueError("Validation data is empty.")
    return batches


def task_metric(task: Task, logits: list[np.ndarray], labels: list[np.ndarray]) -> tuple[str, float]:
    """Accuracy in % (classification) or perplexity (causal LM) over the labelled positions."""
    if task is Task.CAUSAL_LM:
        nll, count = 0.0, 0
        for batch_logits, batch_labels in zip(logits, labels, strict=True):
            shifted = torch.from_numpy(batch_logits[:, :-1]).float()
            targets = torch.from_numpy(batch_labels[:, 1:])
            keep = targets != IGNORE_INDEX
            nll += float(torch.nn.functional.cross_entropy(shifted[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
        return "perplexity", math.exp(nll / max(count, 1))
    correct = total = 0
    for batch_logits, batch_labels in zip(logits, labels, strict=True):
        keep = batch_labels != IGNORE_INDEX
        correct += int((batch_logits.argmax(-1)[keep] == batch_labels[keep]).sum())
        total += int(keep.sum())
    return "accuracy", 100.0 * correct / max(total, 1)


def metric_drop(metric: str, reference: float, value: float) -> float:
    """Points of accuracy lost, or percent of perplexity gained."""
    return reference - value if metric == "accuracy" else 100.0 * (value / reference - 1.0)


@torch.no_grad()
def evaluate_torch(model: Any, batches: EvalBatches, task: Task, virtual_tokens: int = 0) -> Reference:
    """PyTorch logits and metric; a prompt-learning PEFT model's leading virtual positions are dropped."""
    logits = []
    for feed in batches.inputs:
        kwargs = {k: torch.from_numpy(v) for k, v in feed.items() if k != "prompt_embeds"}
        if task is Task.CAUSAL_LM:
            kwargs["use_cache"] = False
        out = model(**kwargs).logits.float()
        logits.append((out[:, virtual_tokens:] if out.dim() == 3 else out).numpy())
    metric, value = task_metric(task, logits, batches.labels)
    return Reference(logits, metric, value)


def run_onnx(path: str | Path, batches: EvalBatches, providers: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [
        session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0].astype(np.float32)
        for feed in batches.inputs
    ]


def validate_variant(
    built: Any, folder: Path, batches: EvalBatches, reference: Reference, task: Task, max_metric_drop: float
) -> dict[str, Any]:
    path = folder / built.file
    outputs = run_onnx(path, batches)
    diffs = []
    for out, ref, feed in zip(outputs, reference.logits, batches.inputs, strict=True):
        delta = np.abs(out - ref)
        if delta.ndim == 3:  # padded positions carry no meaning
            delta = delta[feed["attention_mask"] == 1]
        diffs.append(float(delta.max()))
    metric, value = task_metric(task, outputs, batches.labels)
    drop = metric_drop(metric, reference.value, value)
    size = os.path.getsize(path) + sum(os.path.getsize(p) for p in folder.glob(built.file + ".data"))
    return {
        "variant": built.variant,
        "file": built.file,
        "size_bytes": size,
        "max_abs_diff": max(diffs),
        "metric": metric,
        "metric_value": value,
        "reference_metric_value": reference.value,
        "metric_drop": drop,
        "passed": bool(drop <= max_metric_drop),
        "settings": built.settings,
    }
